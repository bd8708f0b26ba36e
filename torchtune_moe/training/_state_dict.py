"""State-dict plumbing shared by the MoE recipes: check a checkpoint against the model before loading it, set
the model's buffers from a full state dict, and materialise the buffers a state dict has no slot for."""

from __future__ import annotations

import torch
from torchtune import utils

from torchtune_moe.modules import Router
from torchtune_moe.training._metrics import clean_module_name

__all__ = ["check_state_dict", "load_buffers", "materialize_meta_buffers", "materialize_model"]

log = utils.get_logger("INFO")


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raises ValueError listing missing, unexpected and mis-shaped keys (before any weight is loaded).

    Router buffers (aux-loss-free ``expert_bias``, Expert Threshold ``thresholds``) may be missing: a Hugging Face
    checkpoint has no slot for them, and they keep their initial values (zeros).
    """
    expected = model.state_dict()
    router_buffers = {
        f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, Router) for b, _ in m.named_buffers()
    }
    absent_buffers = sorted(set(expected) & router_buffers - set(state_dict))
    if absent_buffers:
        utils.log_rank_zero(log, f"checkpointer: router state not in the checkpoint, starting from zeros: {absent_buffers}")
    missing = sorted(set(expected) - set(state_dict) - router_buffers)
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or misshaped:
        raise ValueError(
            "checkpointer: the checkpoint does not match the model.\n"
            f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n  mis-shaped: {misshaped}"
        )


def load_buffers(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Sets the model's persistent buffers from ``state_dict`` (the same full tensor on every rank: FSDP2 does not
    shard buffers; torchtune's full-state-dict loader would turn them into parameters); returns the remaining
    (parameter) entries."""
    buffers = {}
    for prefix, module in model.named_modules():
        for name, _ in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                key = clean_module_name(f"{prefix}.{name}" if prefix else name)
                buffers[key] = (module, name)
    rest = {}
    for key, value in state_dict.items():
        if key in buffers:
            module, name = buffers[key]
            setattr(module, name, value.to(device))
        else:
            rest[key] = value
    return rest


def materialize_meta_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Replaces buffers still on the meta device after loading by zeros on ``device``: the routers' buffers
    that state dicts lack (non-persistent load accumulators; router state a Hub checkpoint has no slot for),
    all zero-initialised by the routers. RoPE caches must be rebuilt by ``rope_init`` before."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype, device=device))


def materialize_model(model: torch.nn.Module, param_device: torch.device, buffer_device: torch.device) -> None:
    """Allocates a model built (and sharded) on the meta device before its weights are read: parameters
    uninitialised on ``param_device`` (the CPU under FSDP2 CPU offload, else the device), RoPE caches computed on
    ``buffer_device`` (under the caller's default dtype), router buffers zero there (their initial value).

    Raises:
        RuntimeError: a buffer of another kind, which this function would not know how to initialise.
    """
    model.to_empty(device=param_device)
    unknown = []
    for prefix, module in model.named_modules():
        if hasattr(module, "rope_init"):
            with torch.device(buffer_device):
                module.rope_init()
        elif isinstance(module, Router):
            for name, buf in list(module.named_buffers(recurse=False)):
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype, device=buffer_device))
        else:
            unknown += [f"{prefix}.{name}" for name, _ in module.named_buffers(recurse=False)]
    if unknown:
        raise RuntimeError(f"materialize_model does not know how to initialise the buffers {unknown}")
