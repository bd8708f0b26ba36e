"""Hugging Face checkpoint files: safetensors reading, the streaming sharded writer, side files, config.json.

Plain file I/O on tensor names and shapes; it knows no model family (the key names are
``torchtune_moe.models``' job) and nothing in ``torchtune_moe.models`` imports it.
"""

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

__all__ = [
    "EXTRA_STATE_FILE",
    "INDEX_FILE",
    "TORCH_DTYPES",
    "read_hf_config",
    "checkpoint_files",
    "read_headers",
    "tensor_files",
    "stream_tensors",
    "write_safetensors",
    "write_sharded",
    "copy_hf_side_files",
]

#: File written beside the Hub files for state the Hub format has no slot for (router buffers).
EXTRA_STATE_FILE = "torchtune_moe_extra_state.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_MAX_LISTED = 40

# torch dtype <-> safetensors dtype name.
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def read_hf_config(checkpoint_dir: Union[str, Path]) -> dict:
    """Reads ``checkpoint_dir/config.json``.

    Raises:
        ValueError: the file is missing, not valid JSON or not a JSON object, naming the file.
    """
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: checkpoint_dir must be a Hugging Face model directory")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it from the original model directory") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object (the model's config), got {type(config).__name__}")
    return config


def checkpoint_files(checkpoint_dir: Path) -> dict[str, list[str]]:
    """safetensors file -> the tensor names it should hold (from the index, or all names of a single file)."""
    index_path = checkpoint_dir / INDEX_FILE
    if index_path.is_file():
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(str(checkpoint_dir / file), []).append(name)
        absent = sorted(f for f in files if not os.path.isfile(f))
        if absent:
            raise ValueError(f"{index_path} names files that do not exist: {absent}")
        return files
    single = checkpoint_dir / _SINGLE_FILE
    if single.is_file():
        return {str(single): []}
    present = sorted(p.name for p in checkpoint_dir.iterdir()) if checkpoint_dir.is_dir() else []
    raise ValueError(
        f"{checkpoint_dir} has neither {INDEX_FILE} nor {_SINGLE_FILE} (found {present}); only safetensors "
        "checkpoints are supported (pytorch_model.bin files are not)"
    )


def read_headers(files: dict[str, list[str]]) -> dict[str, tuple[tuple, str]]:
    """Tensor name -> (shape, safetensors dtype), from the file headers only (no tensor data is read).

    Raises:
        ValueError: a file that is not a readable safetensors file, or lacks tensors its index names.
    """
    from safetensors import safe_open

    found: dict[str, tuple[tuple, str]] = {}
    for path, names in files.items():
        try:
            f = safe_open(path, framework="pt")
        except Exception as e:  # safetensors raises its own SafetensorError for truncated or garbage files
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
        with f:
            keys = set(f.keys())
            listed_absent = sorted(set(names) - keys)
            if listed_absent:
                raise ValueError(f"{path} lacks tensors its index assigns to it: {listed_absent[:_MAX_LISTED]}")
            for name in keys:
                if names and name not in names:
                    continue  # the index assigns this name to another file
                s = f.get_slice(name)
                found[name] = (tuple(s.get_shape()), s.get_dtype())
    return found


def tensor_files(files: dict[str, list[str]]) -> dict[str, str]:
    """Tensor name -> the file holding it (from the index; a single file's names from its header)."""
    from safetensors import safe_open

    where = {}
    for path, names in files.items():
        if not names:
            with safe_open(path, framework="pt") as f:
                names = list(f.keys())
        where.update({name: path for name in names})
    return where


def stream_tensors(files: dict[str, list[str]], dest: Callable[[str], Optional[torch.Tensor]]) -> None:
    """Copies every tensor of the files into ``dest(name)`` (skipped when it returns None), one at a time."""
    from safetensors import safe_open

    for path, names in files.items():
        with safe_open(path, framework="pt") as f:
            for name in names or list(f.keys()):
                target = dest(name)
                if target is not None:
                    target.copy_(f.get_tensor(name))


def write_safetensors(path: Path, tensors: list[tuple[str, Callable[[], torch.Tensor], tuple, torch.dtype]]) -> None:
    """Writes a safetensors file one tensor at a time: ``(name, get_tensor, shape, dtype)`` entries.

    Written by hand because safetensors' ``save_file`` needs every tensor of a file in memory at once (and a
    contiguous copy of each expert slice): streaming keeps the extra memory of saving a 30B+ model to one
    expert matrix. The format: 8-byte little-endian header size, JSON header (names, dtypes, shapes, byte
    ranges, ``__metadata__``), then the raw little-endian data in header order.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, _, shape, dtype in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name, get, shape, dtype in tensors:
            t = get().detach().to("cpu", dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{name}: shape {tuple(t.shape)} changed while saving (expected {shape})")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def write_sharded(
    entries: list[tuple[str, Callable[[], torch.Tensor], tuple, torch.dtype]],
    save_dir: Union[str, Path],
    max_shard_size: int,
) -> list[str]:
    """Writes ``(name, get_tensor, shape, dtype)`` entries into ``model-0000i-of-0000n.safetensors`` shards of at
    most ``max_shard_size`` bytes (one tensor larger than that gets a shard of its own) and
    ``model.safetensors.index.json``, as the Hub checkpoints are laid out. Returns the files written."""
    if max_shard_size < 1:
        raise ValueError(f"max_shard_size must be >= 1 byte, got {max_shard_size}")
    save_dir = Path(save_dir)
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[2]) * entry[3].itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    weight_map, written, total = {}, [], 0
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(save_dir / name, shard)
        written.append(name)
        for hf_key, _, shape, dtype in shard:
            weight_map[hf_key] = name
            total += math.prod(shape) * dtype.itemsize
    with open(save_dir / INDEX_FILE, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    written.append(INDEX_FILE)
    return written


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def copy_hf_side_files(src_dir: Union[str, Path], dst_dir: Union[str, Path]) -> list[str]:
    """Copies config.json, tokenizer, generation and other non-weight files of a Hub directory (top level)."""
    copied = []
    for path in sorted(Path(src_dir).iterdir()):
        name = path.name
        if (
            not path.is_file()
            or name.startswith(".")
            or name.endswith(_WEIGHT_SUFFIXES)
            or name in (INDEX_FILE, "pytorch_model.bin.index.json")
        ):
            continue
        shutil.copy2(path, Path(dst_dir) / name)
        copied.append(name)
    return copied
