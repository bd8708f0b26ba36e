"""Hugging Face MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): :class:`HFMoECheckpointer` for the
recipe and :func:`from_hf_pretrained` for scripts. Both read the Hub format, and the checkpointer writes it
back, so a fine-tuned directory loads unchanged in transformers, vLLM or SGLang.

Written here rather than reused: torchtune's ``FullModelHFCheckpointer`` maps keys for torchtune's dense
families only (and keeps whole copies of the state dict while converting); MoE checkpoints need stacked experts
split into per-expert tensors, written one at a time. The key names come from each family's
``_convert_weights.py`` (``torchtune_moe.models``), the file handling from :mod:`._hf_files`.
"""

import json
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from torchtune import training
from torchtune.modules import TransformerDecoder
from torchtune.utils import get_logger

from torchtune_moe.models._convert_weights import (
    HFLayout,
    check_hf_tensors,
    check_tune_state_dict,
    hf_layout,
    is_extra_state_key,
    router_state_of_moe_layer,
    take,
    tune_layout,
)
from torchtune_moe.models._hf_families import detect_family, hf_config_to_kwargs
from torchtune_moe.models.gpt_oss._convert_weights import dequantize_mxfp4
from torchtune_moe.modules import Router
from torchtune_moe.training._hf_files import (
    EXTRA_STATE_FILE,
    TORCH_DTYPES,
    checkpoint_files,
    copy_hf_side_files,
    read_headers,
    read_hf_config,
    stream_tensors,
    tensor_files,
    write_sharded,
)
from torchtune_moe.training._sharded_checkpoint import _local_box, read_slices_into, tensor_meta

log = get_logger("INFO")

__all__ = ["HFMoECheckpointer", "from_hf_pretrained", "is_extra_state_key", "EXTRA_STATE_FILE"]

_MAX_LISTED = 40


def _read_extra_state(checkpoint_dir: Path, layout: HFLayout, strict: bool) -> dict[str, torch.Tensor]:
    """Router state saved beside the Hub files. ``strict``: the model of ``layout`` must have each tensor
    (same router options); else any router state of an MoE layer is returned, for the caller's model to take."""
    path = checkpoint_dir / EXTRA_STATE_FILE
    if not path.is_file():
        if layout.extra_keys:
            log.info(
                f"{checkpoint_dir} has no {EXTRA_STATE_FILE}: router state {layout.extra_keys[:4]}... starts from "
                "its initial value"
            )
        return {}
    from safetensors.torch import load_file

    try:
        extra = load_file(str(path))
    except Exception as e:  # SafetensorError for a truncated or garbage file
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
    if not strict:
        bad = sorted(k for k in extra if not router_state_of_moe_layer(k, layout.shapes))
        if bad:
            raise ValueError(f"{path} holds tensors that are not router state of an MoE layer: {bad[:_MAX_LISTED]}")
        return extra
    unexpected = sorted(k for k in extra if k not in layout.extra_keys)
    if unexpected:
        raise ValueError(
            f"{path} holds router state {unexpected[:_MAX_LISTED]} that the model does not have. It was trained with "
            "other router options: pass them (e.g. expert_bias_update_rate=... for expert_bias, "
            "router='causal_expert_choice' for thresholds)"
        )
    misshaped = sorted(k for k, v in extra.items() if tuple(v.shape) != layout.shapes[k])
    if misshaped:
        raise ValueError(f"{path} has wrongly shaped tensors: {misshaped}")
    missing = sorted(k for k in layout.extra_keys if k not in extra)
    if missing:
        log.info(f"{path} lacks router state {missing[:4]}...: it starts from its initial value")
    return extra


# MXFP4 (GPT-OSS's published experts): a pair ``X_blocks`` [..., R, G, 16] / ``X_scales`` [..., R, G] (uint8) in
# the files stands for the Hub tensor ``X`` [..., G * 32, R] (in x out, as transformers dequantises it). The
# checkpointer checks and reads the pair as X, dequantised (``dequantize_mxfp4``); saving writes X unquantised.


def _dense_headers(headers: dict[str, tuple[tuple, str]]) -> tuple[dict, dict[str, tuple[str, str]]]:
    """``headers`` with each MXFP4 pair replaced by the tensor it stands for (bf16, Hub shape), and those
    tensors' pairs (name -> (blocks name, scales name))."""
    pairs = {
        n.removesuffix("_blocks"): (n, n.removesuffix("_blocks") + "_scales")
        for n in headers if n.endswith("_blocks") and n.removesuffix("_blocks") + "_scales" in headers
    }
    dense = {k: v for k, v in headers.items() if not any(k in pair for pair in pairs.values())}
    for name, (blocks, _) in pairs.items():
        *prefix, rows, groups, _ = headers[blocks][0]
        dense[name] = ((*prefix, groups * 32, rows), "BF16")
    return dense, pairs


def _read_mxfp4(where: dict[str, str], pair: tuple[str, str], box: tuple = ()) -> torch.Tensor:
    """The dequantised tensor of an MXFP4 pair, in the Hub's in x out layout [..., C, R]; ``box``: slices of its
    leading dims and R (every C is read)."""
    from safetensors import safe_open

    parts = []
    for name in pair:
        with safe_open(where[name], framework="pt") as f:
            if box:  # box over [..., C, R] -> blocks/scales [..., R, G(, 16)]: leading dims, then R
                parts.append(f.get_slice(name)[(*box[:-2], box[-1])])
            else:
                parts.append(f.get_tensor(name))
    return dequantize_mxfp4(*parts, torch.float32).transpose(-2, -1)


def _copy_into(
    files: dict[str, list[str]], layout: HFLayout, dest: dict[str, torch.Tensor],
    pairs: Optional[dict[str, tuple[str, str]]] = None,
) -> None:
    """Streams every Hub tensor into ``dest[our_key][index]``, one tensor at a time (MXFP4 ``pairs``
    dequantised)."""
    def target(name: str) -> Optional[torch.Tensor]:
        if name not in layout.hf_keys:
            return None  # ignored (checked before), or half of an MXFP4 pair (below)
        key, index, _ = layout.hf_keys[name]
        return take(dest[key], index)

    with torch.no_grad():
        stream_tensors(files, target)
        if pairs:
            where = tensor_files(files)
            for name, pair in pairs.items():
                target(name).copy_(_read_mxfp4(where, pair))


class HFMoECheckpointer:
    """Loads and saves a Hugging Face MoE checkpoint directory.

    The constructor reads config.json and checks every option (the family's translation refuses what it cannot
    reproduce) without building a model. Loading checks every tensor of the (sharded) safetensors files by
    name and shape from the file headers, before reading data, and stops with a list of the missing,
    unexpected and mis-shaped tensors (against the model, when ``load_checkpoint(model)`` is given one, even
    on the meta device; else against the family's key map and config.json); the per-expert Hub tensors are
    stacked into the ``experts.gate_up_proj`` / ``experts.down_proj`` tensors of torchtune_moe (one full copy
    of the model, in the stored dtype).

    Saving writes the Hub format into ``save_dir``: ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_size`` bytes with per-expert keys as published and ``model.safetensors.index.json``, streamed
    one tensor at a time (no second copy of the model), plus every non-weight file of ``checkpoint_dir``
    (config.json, tokenizer and generation files, license, ...). The saved tensors must be the ones
    ``checkpoint_dir`` holds (same names and shapes). Router state the Hub format has no slot for
    (``expert_bias`` of aux-loss-free balancing, Expert Threshold ``thresholds``) goes to
    ``torchtune_moe_extra_state.safetensors`` beside it, with a warning; loading picks it back up.

    Args:
        checkpoint_dir (str): Hub model directory (config.json + safetensors), e.g. from
            ``huggingface-cli download Qwen/Qwen3-30B-A3B --local-dir ...``; or a directory this checkpointer
            saved (resuming).
        max_shard_size (int): largest safetensors shard in bytes. Default 5 GB (as the Hub checkpoints).
        model_type (Optional[str]): expected config.json ``model_type`` (``mixtral``, ``qwen2_moe``,
            ``qwen3_moe``, ``olmoe``); checked at construction so a config pointed at another family's
            checkpoint stops at once. None: any supported family.
        output_dir (Optional[str]): deprecated and unused (the recipe saves into ``{output_dir}/step_{N}``).

    Raises:
        ValueError: no or unreadable config.json, an unsupported family or option, or ``model_type`` mismatch.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        output_dir: Optional[str] = None,
        max_shard_size: int = 5_000_000_000,
        model_type: Optional[str] = None,
    ) -> None:
        if checkpoint_dir is None:
            raise ValueError("checkpointer.checkpoint_dir is required: the Hugging Face model directory to fine-tune")
        if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size < 1:
            raise ValueError(f"checkpointer.max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
        if output_dir is not None:
            warnings.warn(
                "checkpointer.output_dir is deprecated and unused by HFMoECheckpointer: remove it from the config",
                FutureWarning,
                stacklevel=2,
            )
        self.checkpoint_dir = Path(checkpoint_dir)
        self.max_shard_size = max_shard_size
        self.config = read_hf_config(self.checkpoint_dir)
        self.family = detect_family(self.config)
        if model_type is not None and model_type != self.family.model_type:
            raise ValueError(
                f"checkpointer.model_type is {model_type!r} but {self.checkpoint_dir}/config.json is a "
                f"{self.family.model_type!r} checkpoint"
            )
        # Checks every config.json option now, before any training work (no model is built).
        _, self._kwargs = hf_config_to_kwargs(self.config)
        self._key_map = self.family.key_map(self._kwargs)
        self._layout: Optional[HFLayout] = None  # the checkpoint's tensors, from the headers (on first use)

    def _checkpoint_layout(self, headers: dict[str, tuple[tuple, str]]) -> HFLayout:
        layout, bad = hf_layout({k: v[0] for k, v in headers.items()}, self._key_map)
        num_experts = self._kwargs["num_experts"]
        bad += sorted(
            hf_key
            for key, pieces in layout.pieces.items()
            if key.endswith(".mlp.experts.down_proj") and layout.shapes[key][0] != num_experts
            for hf_key, _ in pieces
        )
        if bad:
            raise ValueError(
                f"checkpoint {self.checkpoint_dir} does not match its config.json ({num_experts} experts per MoE "
                f"layer):\n  unexpected ({len(bad)}): {', '.join(sorted(bad)[:_MAX_LISTED])}"
            )
        return layout

    def load_checkpoint(self, model: Optional[nn.Module] = None) -> dict[str, Any]:
        """``{"model": state_dict}`` in torchtune_moe key names (router state from the extra-state file
        included when present; check keys with :func:`is_extra_state_key` to tolerate its absence).

        Args:
            model (Optional[nn.Module]): the model the state dict is for (any device, meta included): every
                tensor is checked against it by name and shape before any data is read.

        Raises:
            ValueError: missing, unexpected or mis-shaped tensors, listed.
        """
        files = checkpoint_files(self.checkpoint_dir)
        headers, pairs = _dense_headers(read_headers(files))
        if model is not None:
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            wanted = tune_layout(shapes, self._key_map)
            check_hf_tensors(wanted, {k: v[0] for k, v in headers.items()}, where=str(self.checkpoint_dir))
        layout = self._layout = self._checkpoint_layout(headers)
        state: dict[str, torch.Tensor] = {}
        for key, pieces in layout.pieces.items():
            st_dtype = headers[pieces[0][0]][1]
            if st_dtype not in TORCH_DTYPES:
                raise ValueError(f"{pieces[0][0]} has dtype {st_dtype}, which torch cannot hold")
            state[key] = torch.empty(layout.shapes[key], dtype=TORCH_DTYPES[st_dtype])
        _copy_into(files, layout, state, pairs)
        state.update(_read_extra_state(self.checkpoint_dir, layout, strict=False))
        log.info(
            f"Loaded {len(state)} tensors of {self.family.model_type} from {self.checkpoint_dir} "
            f"({sum(t.numel() for t in state.values()):,} values)"
        )
        return {"model": state}

    def load_sharded(self, model: nn.Module) -> int:
        """Loads the checkpoint into ``model`` (materialised, FSDP2-sharded or not): every rank reads only the
        slices of the Hub tensors that its shards hold (``safe_open(...).get_slice``), converting the key map per
        tensor, so no rank holds the full state. Tensors are checked against the model by name and shape from the
        file headers first. Router state of the extra-state file is read whole (it is small).

        Returns:
            int: the number of values this rank read from the files.

        Raises:
            ValueError: missing, unexpected or mis-shaped tensors, listed (before any data is read).
        """
        files = checkpoint_files(self.checkpoint_dir)
        headers, pairs = _dense_headers(read_headers(files))
        wanted = tune_layout({k: tuple(v.shape) for k, v in model.state_dict().items()}, self._key_map)
        check_hf_tensors(wanted, {k: v[0] for k, v in headers.items()}, where=str(self.checkpoint_dir))
        self._layout = self._checkpoint_layout(headers)
        bad = sorted({headers[hf][1] for hf in wanted.hf_keys} - set(TORCH_DTYPES))
        if bad:
            raise ValueError(f"{self.checkpoint_dir} holds tensors of dtype {bad}, which torch cannot hold")
        where = tensor_files(files)
        sources = {
            key: [(where[hf], hf, index) for hf, index in pieces]
            for key, pieces in wanted.pieces.items() if pieces[0][0] not in pairs
        }
        read = read_slices_into(model, sources)
        state = model.state_dict()
        for key, pieces in wanted.pieces.items():
            if pieces[0][0] in pairs:  # MXFP4: this rank's box of ours (stacked experts, TRANSPOSED on the Hub)
                local, offset = _local_box(state[key])
                if local.numel():
                    box = tuple(slice(o, o + n) for o, n in zip(offset, local.shape))
                    src = _read_mxfp4(where, pairs[pieces[0][0]], box[:-2] + (box[-1], box[-2])).transpose(-2, -1)
                    with torch.no_grad():
                        local.copy_(src[..., box[-1]])
                    read += local.numel()
        extra = _read_extra_state(self.checkpoint_dir, wanted, strict=True)
        state = model.state_dict()
        with torch.no_grad():
            for key, value in extra.items():  # buffers: FSDP2 does not shard them
                state[key].copy_(value)
                read += value.numel()
        return read

    def save_checkpoint(self, model_state_dict: dict[str, torch.Tensor], save_dir: Union[str, Path]) -> None:
        """Writes the Hub files into ``save_dir`` (existing and empty; the recipe renames it into place).

        ``model_state_dict`` may be a :class:`~torchtune_moe.training.GatheredStateDict` (the recipe's, under
        FSDP2): tensors are then gathered one at a time, in the order they are written, so host memory holds
        one full tensor (the largest: one layer's stacked experts) besides the expert slice being written.

        Raises:
            ValueError: the state dict does not match the checkpoint (missing, unexpected or mis-shaped keys).
        """
        if self._layout is None:
            self._layout = self._checkpoint_layout(_dense_headers(read_headers(checkpoint_files(self.checkpoint_dir)))[0])
        meta = tensor_meta(model_state_dict)
        shells = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in meta.items()}
        check_tune_state_dict(shells, self._layout, f"the checkpoint {self.checkpoint_dir}")
        save_dir = Path(save_dir)
        weights = [k for k in meta if k in self._layout.pieces]
        layout = tune_layout({k: meta[k][0] for k in weights}, self._key_map)
        entries = [
            (hf_key, (lambda k=key, i=index: take(model_state_dict[k], i)), layout.hf_keys[hf_key][2], meta[key][1])
            for key, pieces in layout.pieces.items()
            for hf_key, index in pieces
        ]
        written = write_sharded(entries, save_dir, self.max_shard_size)
        extra = {k: model_state_dict[k] for k in meta if k not in layout.pieces}  # router state (checked above)
        if extra:
            from safetensors.torch import save_file

            save_file({k: v.detach().to("cpu").contiguous() for k, v in extra.items()}, str(save_dir / EXTRA_STATE_FILE))
            written.append(EXTRA_STATE_FILE)
            log.warning(
                f"{len(extra)} router tensors ({', '.join(sorted(extra)[:3])}, ...) have no slot in the Hugging Face "
                f"format: saved beside it in {EXTRA_STATE_FILE}. torchtune_moe loads them back; transformers and "
                "vLLM ignore them and route without them."
            )
        copied = copy_hf_side_files(self.checkpoint_dir, save_dir)
        if "quantization_config" in self.config:  # MXFP4 experts were dequantised on load and are saved unquantised
            config = {k: v for k, v in self.config.items() if k != "quantization_config"}
            (save_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shards = sum(name.endswith(".safetensors") and name.startswith("model-") for name in written)
        log.info(
            f"Saved {self.family.model_type} in Hugging Face format to {save_dir}: {shards} safetensors shards + "
            f"index, {', '.join(copied)}" + (f", {EXTRA_STATE_FILE}" if EXTRA_STATE_FILE in written else "")
        )


def _reset_buffers(model: nn.Module, device: torch.device) -> None:
    """After ``to_empty``: recompute RoPE caches and zero router statistics (all router buffers start at 0)."""
    handled = set()
    with torch.device(device):
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
                handled.update(id(b) for b in module.buffers(recurse=False))
            elif isinstance(module, Router):
                for b in module.buffers(recurse=False):
                    b.zero_()
                    handled.add(id(b))
    unknown = [n for n, b in model.named_buffers() if id(b) not in handled]
    if unknown:  # a new kind of buffer: refuse rather than leave uninitialised memory in the model
        raise RuntimeError(f"from_hf_pretrained does not know how to initialise buffers {unknown}")


def from_hf_pretrained(
    checkpoint_dir: Union[str, Path],
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    max_seq_len: Optional[int] = None,
    **options,
) -> TransformerDecoder:
    """Loads a Hugging Face MoE checkpoint (config.json + sharded safetensors) as a torchtune model.

    The family comes from config.json (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE); each tensor is streamed from the
    safetensors files straight into the model's parameters (the model is allocated once, uninitialised, no
    extra copy). Router state saved beside the weights (``torchtune_moe_extra_state.safetensors``) is loaded too.

    Args:
        checkpoint_dir (str | Path): directory with config.json and ``model.safetensors.index.json`` (or one
            ``model.safetensors``).
        dtype (Optional[torch.dtype]): parameter dtype; None = config.json ``dtype``/``torch_dtype``, else fp32.
        device (str | torch.device): where the model is allocated.
        max_seq_len (Optional[int]): RoPE cache length and longest sequence; default config.json
            ``max_position_embeddings``.
        **options: training options (``aux_loss_coeff``, ``aux_loss_pooled``, ``z_loss_coeff``, ``router``,
            ``expert_bias_update_rate``, ...). By default ``aux_loss_coeff`` reproduces config.json's
            ``router_aux_loss_coef`` (see :func:`torchtune_moe.models._utils.hf_aux_loss_coeff`).

    Returns:
        TransformerDecoder: in eval mode (as transformers returns models); call ``.train()`` to fine-tune.

    Raises:
        ValueError: unsupported architecture or option, unreadable config.json (named); missing, unexpected or
            mis-shaped tensors (listed).
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = read_hf_config(checkpoint_dir)
    if dtype is None:
        name = config.get("dtype") or config.get("torch_dtype") or "float32"
        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(
                f"{checkpoint_dir / 'config.json'} dtype {name!r} is not a floating-point torch dtype; pass dtype="
            )
    device = torch.device(device)
    family, kwargs = hf_config_to_kwargs(config, max_seq_len=max_seq_len, **options)
    with training.set_default_dtype(dtype), torch.device("meta"):
        model = family.builder(**kwargs)
    layout = tune_layout({k: tuple(v.shape) for k, v in model.state_dict().items()}, family.key_map(kwargs))
    files = checkpoint_files(checkpoint_dir)
    headers, pairs = _dense_headers(read_headers(files))
    check_hf_tensors(layout, {k: v[0] for k, v in headers.items()}, where=str(checkpoint_dir))
    extra = _read_extra_state(checkpoint_dir, layout, strict=True)
    model.to_empty(device=device)
    _reset_buffers(model, device)
    dest = model.state_dict(keep_vars=True)
    _copy_into(files, layout, dest, pairs)
    with torch.no_grad():
        for key, value in extra.items():
            dest[key].copy_(value)
    return model.eval()
