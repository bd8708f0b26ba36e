"""Adapter directories on disk: the PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``, Hub
names, mapped by :mod:`torchtune_moe.models._peft`) and the native one (torchtune_moe key names)."""

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from torchtune_moe.models._peft import adapter_state_from_peft, peft_adapter_tensors

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "save_peft_adapter",
    "load_peft_adapter",
    "save_native_adapter",
    "load_native_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_NATIVE_CONFIG = {"format": "torchtune_moe"}


def save_peft_adapter(
    model: nn.Module,
    config: dict,
    out_dir: Union[str, Path],
    *,
    base_model_name_or_path: Optional[str] = None,
    lora_dropout: float = 0.0,
    adapter_state: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """Writes the adapters of ``model`` as a PEFT LoRA directory for the Hub model ``config`` describes.

    Args:
        model (nn.Module): a model with LoRA modules (:func:`~torchtune_moe.models.lora_model`).
        config (dict): the base checkpoint's config.json.
        out_dir (str | Path): directory to write (created).
        base_model_name_or_path (Optional[str]): recorded in adapter_config.json.
        lora_dropout (float): recorded in adapter_config.json.
        adapter_state (Optional[dict]): the adapter values by state-dict key (e.g. gathered from FSDP shards);
            default: ``model``'s own.

    Raises:
        ValueError: no adapter, adapters of different ranks or alphas, or an unsupported family.
    """
    tensors, adapter_config = peft_adapter_tensors(
        model,
        config,
        base_model_name_or_path=base_model_name_or_path,
        lora_dropout=lora_dropout,
        adapter_state=adapter_state,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")


def load_peft_adapter(model: nn.Module, config: dict, adapter_dir: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Reads a PEFT LoRA directory (per-expert layout, as :func:`save_peft_adapter` writes) into an adapter
    state dict of ``model`` (CPU; load it with ``model.load_state_dict(sd, strict=False)``).

    Raises:
        ValueError: missing or unexpected tensors, or a rank / alpha other than the model's, listed.
    """
    adapter_dir = Path(adapter_dir)
    adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    return adapter_state_from_peft(model, config, tensors, adapter_config, where=str(adapter_dir))


def save_native_adapter(adapter_state: dict[str, torch.Tensor], out_dir: Union[str, Path]) -> None:
    """Writes an adapter state dict under torchtune_moe key names (the adapter of a native checkpoint)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_state.items()}
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(_NATIVE_CONFIG) + "\n")


def load_native_adapter(adapter_dir: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Reads what :func:`save_native_adapter` wrote."""
    return load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
