"""Checkpoints that no process holds whole: ``torch.distributed.checkpoint`` (DCP) for the training state, and
the full tensors of a sharded model gathered one at a time for the Hub-format export.

- :func:`save_training_state` / :func:`load_training_state`: the model (parameters and persistent buffers, router
  state included) and the optimizer state of a sharded or plain model, through torch's
  ``get_state_dict``/``set_state_dict`` and ``dcp.save``/``dcp.load``. Each rank writes and reads only its own
  shards; DCP stores every tensor with its global shape and the pieces each rank wrote, so a checkpoint resumes
  under any sharding (another world size, a 2-D mesh with an expert dimension, or one process without FSDP).
- :class:`GatheredStateDict`: the sharded model's state dict as a read-only mapping of full CPU tensors,
  gathered key by key when rank 0 asks for one (the other ranks serve the gathers in :meth:`serve`); only the
  last gathered tensor is kept, so exporting needs one tensor's full copy of host memory, not the model's.

Written here rather than reused: torchtune 0.6.1's distributed checkpointing (``DistributedCheckpointer``) writes
straight into its output directory and assumes its own recipe state layout; this keeps the recipe's atomic
``step_N`` directories and integrity checks.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from torchtune_moe.models._convert_weights import TRANSPOSED

__all__ = [
    "DCP_DIRNAME",
    "GatheredStateDict",
    "dcp_problems",
    "load_training_state",
    "read_slices_into",
    "local_nonfinite_key",
    "save_training_state",
    "tensor_meta",
]

#: Directory of a checkpoint holding the DCP files (``.metadata`` and one ``__R_0.distcp`` per rank).
DCP_DIRNAME = "distcp"
_METADATA = ".metadata"


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _dcp(fn, state: dict, path: Path) -> None:
    """Runs ``dcp.save``/``dcp.load``; its ``CheckpointException`` (a BaseException, holding every failed rank's
    traceback) becomes a RuntimeError naming the first rank's error, the exception kept as the cause."""
    from torch.distributed.checkpoint.api import CheckpointException

    no_dist = _no_dist()
    try:
        with warnings.catch_warnings():  # one process: DCP says it assumes so, which is what no_dist=True asks
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            fn(state, checkpoint_id=str(path), no_dist=no_dist)
    except CheckpointException as e:
        failures = getattr(e, "failures", {}) or {}
        rank, first = next(iter(sorted(failures.items(), key=lambda kv: kv[0])), (None, e))
        raise RuntimeError(f"{path}: rank {rank}: {type(first).__name__}: {first}") from e


def save_training_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], path: Path) -> None:
    """Every rank writes its shards of the model (parameters and persistent buffers) and of the optimizer state
    into the DCP directory ``path`` (a collective; rank 0 writes ``.metadata`` last, after every rank's data).

    Args:
        model: the (FSDP2-sharded or plain) model.
        optimizer: its optimizer, or None (model only).
        path: the directory to write, on storage all ranks see.
    """
    if optimizer is None:
        state = {"model": get_state_dict(model, [])[0]}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
    _dcp(dcp.save, state, path)


def load_training_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], path: Path) -> None:
    """Loads what :func:`save_training_state` wrote into the model and optimizer (every rank reads only the
    pieces its shards need; DCP reshards across world sizes and meshes). The model must be materialised (no
    meta tensors); the optimizer's state is created first (torch's ``get_state_dict`` does it).

    Raises:
        ValueError: the checkpoint holds model tensors this model lacks (its config lost a part since the save,
            e.g. ``model.gate_bias``): DCP would skip them silently, dropping trained weights.
        RuntimeError: DCP's error when a tensor is missing from the checkpoint or shaped otherwise (e.g. router
            options changed since the save).
    """
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    if optimizer is None:
        model_sd = get_state_dict(model, [])[0]
        state = {"model": model_sd}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        _add_saved_group_keys(optim_sd, metadata)
        state = {"model": model_sd, "optimizer": optim_sd}
    extra = sorted(
        k[len("model."):] for k in metadata.state_dict_metadata if k.startswith("model.") and k[len("model."):] not in model_sd
    )
    if extra:
        shown = ", ".join(extra[:4]) + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
        raise ValueError(
            f"resume_from_checkpoint: {path} holds {len(extra)} model tensors this model does not have ({shown}): "
            f"the model config changed since the save and resuming would drop them. Resume with the checkpoint's "
            f"model config (see the config differences above), or start a new run"
        )
    _dcp(dcp.load, state, path)
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _add_saved_group_keys(optim_sd: dict, metadata) -> None:
    """DCP loads only the keys the target holds: param-group entries a fresh optimizer lacks (``initial_lr``,
    which an lr scheduler adds) get a placeholder, so that the saved value is read into it."""
    prefix = "optimizer.param_groups."
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith(prefix):
            index, name = key[len(prefix) :].split(".", 1)
            groups = optim_sd.get("param_groups", [])
            if index.isdigit() and int(index) < len(groups) and "." not in name and name not in groups[int(index)]:
                # A tensor (torchao's optimizers keep lr as one) needs a tensor of its size to be read into.
                size, props = getattr(md, "size", None), getattr(md, "properties", None)
                placeholder = None if size is None else torch.empty(size, dtype=props.dtype)
                groups[int(index)][name] = placeholder


def dcp_problems(path: Path) -> list[str]:
    """What is wrong with a DCP directory, one line per problem; empty when intact. Reads the metadata only:
    every data file it names must exist and be long enough for the byte ranges stored in it."""
    path = Path(path)
    meta_path = path / _METADATA
    if not meta_path.is_file():
        return [f"{meta_path}: missing (the sharded save did not complete)"]
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, OSError, RuntimeError) as e:
        return [f"{meta_path}: truncated or corrupt ({type(e).__name__})"]
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, end in sorted(ends.items()):
        f = path / name
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size < end:
            problems.append(f"{f}: truncated ({f.stat().st_size} bytes, the metadata needs {end})")
    return problems


def local_nonfinite_key(model: torch.nn.Module) -> Optional[str]:
    """The first state-dict key whose local values (this rank's shard) hold a NaN or infinity, or None (quantized
    tensor subclasses are not checked)."""
    for key, value in model.state_dict().items():
        local = value.to_local() if isinstance(value, DTensor) else value
        if type(local) not in (torch.Tensor, torch.nn.Parameter):
            # A tensor subclass such as torchao's NF4Tensor (QLoRA's frozen base) has no isfinite; it is
            # quantized once from loaded weights and never trained.
            continue
        if local.is_floating_point() and not torch.isfinite(local).all():
            return key
    return None


def tensor_meta(state_dict: Mapping) -> dict[str, tuple[tuple, torch.dtype]]:
    """Key -> (full shape, dtype) of a state dict or a :class:`GatheredStateDict`, without gathering anything."""
    if isinstance(state_dict, GatheredStateDict):
        return state_dict.meta
    return {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()}


class GatheredStateDict(Mapping):
    """A sharded model's state dict seen as full CPU tensors, gathered one key at a time.

    Rank 0 reads it as a mapping (``sd[key]`` gathers that tensor: a collective the other ranks join in
    :meth:`serve`) and calls :meth:`close` when done; the other ranks call :meth:`serve` meanwhile, which returns
    after rank 0's ``close``. Only the most recently gathered tensor is kept, so host memory for the export is one
    full tensor (the largest is one layer's stacked experts), whatever order the reader asks in. Keys, shapes and
    dtypes (:attr:`meta`) are known without gathering. Without a process group (one process) ``sd[key]`` is the
    tensor on the CPU.

    Use::

        sd = GatheredStateDict(model)
        if rank == 0:
            try:
                checkpointer.save_checkpoint(sd, save_dir)
            finally:
                sd.close()
        else:
            sd.serve()
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._sd = model.state_dict()
        self.meta = {k: (tuple(v.shape), v.dtype) for k, v in self._sd.items()}
        self._distributed = not _no_dist() and dist.get_world_size() > 1
        self._cached: tuple[Optional[str], Optional[torch.Tensor]] = (None, None)
        self.gathered_values = 0  # total values gathered (instrumentation for tests and logs)
        self.largest_values = 0  # the largest tensor held at once

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)

    def _full(self, key: str, to_cpu: bool = True) -> torch.Tensor:
        value = self._sd[key]
        full = value.full_tensor() if isinstance(value, DTensor) else value
        return full.detach().to("cpu") if to_cpu else full

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._sd:
            raise KeyError(key)
        if self._cached[0] == key:
            return self._cached[1]
        self._cached = (None, None)  # free the previous one before gathering the next
        if self._distributed:
            request = [key]
            dist.broadcast_object_list(request, src=0)
        tensor = self._full(key)
        self.gathered_values += tensor.numel()
        self.largest_values = max(self.largest_values, tensor.numel())
        self._cached = (key, tensor)
        return tensor

    def serve(self) -> None:
        """Other ranks: joins each gather rank 0 asks for, until rank 0 calls :meth:`close`."""
        while True:
            request = [None]
            dist.broadcast_object_list(request, src=0)
            if request[0] is None:
                return
            self._full(request[0], to_cpu=False)

    def close(self) -> None:
        """Rank 0: ends the other ranks' :meth:`serve` (call it also when the export failed)."""
        self._cached = (None, None)
        if self._distributed:
            dist.broadcast_object_list([None], src=0)


def _local_box(value: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """This rank's part of a (DTensor or plain) tensor and its offset in the full tensor, for any mesh and
    placements (FSDP2's Shard(0), an expert-parallel dimension, replication)."""
    if isinstance(value, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        return value.to_local(), tuple(offset)
    return value, (0,) * value.dim()


def _copy_piece(local: torch.Tensor, offset: tuple, full_shape: tuple, index: tuple, read) -> int:
    """Copies the part of one stored tensor that falls in this rank's box. The stored tensor is
    ``full[index]`` (``index``: ints and slices over the leading dims, e.g. ``(e,)`` for expert e of a stacked
    tensor or ``(e, slice(0, H))`` for its gate half); ``read(slices)`` reads a slice of it from the file.
    Returns the number of values read (0 when the piece lies on other ranks). ``index`` ``TRANSPOSED``: the
    stored tensor is the whole of ours with its last two dims swapped (GPT-OSS's stacked experts)."""
    if index == TRANSPOSED:
        dst = local
        box = [slice(o, o + n) for o, n in zip(offset, local.shape)]
        if any(n == 0 for n in local.shape):
            return 0
        src = read(tuple(box[:-2] + [box[-1], box[-2]])).transpose(-2, -1)
        with torch.no_grad():
            dst.copy_(src)
        return src.numel()
    starts, stops, kept = [], [], []
    for d, size in enumerate(full_shape):
        i = index[d] if d < len(index) else slice(None)
        if isinstance(i, int):
            starts.append(i)
            stops.append(i + 1)
        else:
            a, b, _ = i.indices(size)
            starts.append(a)
            stops.append(b)
            kept.append(d)
    lo = [max(s, o) for s, o in zip(starts, offset)]
    hi = [min(e, o + n) for e, o, n in zip(stops, offset, local.shape)]
    if any(a >= b for a, b in zip(lo, hi)):
        return 0
    src = read(tuple(slice(lo[d] - starts[d], hi[d] - starts[d]) for d in kept))
    dst = local[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))]
    with torch.no_grad():
        dst.copy_(src.reshape(dst.shape))
    return src.numel()


def read_slices_into(model: torch.nn.Module, sources: dict[str, list[tuple[str, str, tuple]]]) -> int:
    """Fills the model's (sharded or plain, materialised) state from safetensors files, each rank reading only
    the slices of the stored tensors that its shards hold (``safe_open(...).get_slice``): no rank reads or holds
    a full copy of the checkpoint, only, at most, one stored tensor's part that lands on it.

    Args:
        model: the model; its ``state_dict()`` values (DTensor shards or plain tensors) are written in place.
        sources: our state-dict key -> ``[(file, stored name, index into our full tensor)]``: where each of its
            pieces is stored (``()`` for the whole tensor; ``(e,)`` / ``(e, slice)`` for one expert's part of a
            stacked expert tensor). Keys absent here are left as they are.

    Returns:
        int: the number of values this rank read (instrumentation: about the model's size / world size).
    """
    from safetensors import safe_open

    state = model.state_dict()
    handles: dict[str, object] = {}
    read_values = 0
    try:
        for key, pieces in sources.items():
            local, offset = _local_box(state[key])
            full_shape = tuple(state[key].shape)
            for path, name, index in pieces:
                if path not in handles:
                    handles[path] = safe_open(path, framework="pt").__enter__()
                f = handles[path]
                read_values += _copy_piece(
                    local, offset, full_shape, index, lambda sl, f=f, n=name: f.get_slice(n)[sl] if sl else f.get_tensor(n)
                )
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return read_values
