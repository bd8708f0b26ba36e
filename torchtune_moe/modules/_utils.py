"""Small helpers shared by the components and the training code (which imports them from here)."""

import torch

__all__ = ["clean_module_name", "is_hopper"]

# Wrappers that activation checkpointing / torch.compile / FSDP1 insert into module names.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_module_name(name: str) -> str:
    """``name`` without the wrapper parts that activation checkpointing or compile add
    (``layers.0._checkpoint_wrapped_module.mlp`` -> ``layers.0.mlp``)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def is_hopper(device_index: int) -> bool:
    """Whether CUDA device ``device_index`` has compute capability 9.x (H100, H200): where quack's kernels run."""
    return torch.cuda.get_device_capability(device_index)[0] == 9
