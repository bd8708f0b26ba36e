"""The recipes' compiled optimizer step (``compile.optimizer_step``).

``torch.compile(optimizer.step)`` of torch's multi-tensor AdamW fuses each parameter's update into one pass over
its tensors, near the memory bandwidth (docs/performance.md). Compiled as it is, though, it recompiles at every
step of an lr schedule: the step folds the float learning rate into its code, and a changed value fails the
guard. torch's answer (its "compiled optimizer with an LR scheduler" tutorial) is a learning rate held in a
0-dim tensor, which the scheduler fills in place, with ``capturable`` steps (the multi-tensor path that takes a
tensor learning rate). That changes the optimizer's param groups, so checkpoints would carry a tensor learning
rate and ``capturable: true`` into runs that step eagerly; the state-dict hook below saves them as plain values,
and the load hook puts the tensors back.
"""

from __future__ import annotations

import torch

__all__ = ["compile_optimizer_step"]


def compile_optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """Compiles ``optimizer.step`` in place, for a torch.optim optimizer on the multi-tensor (``foreach``) path.

    Call it after the lr scheduler is made: the scheduler wraps the step it finds, and a compiled step has no
    ``__func__`` for it to wrap. The first step compiles, about 0.3 s per parameter tensor on an H200 host (18 s
    for 47 tensors, 78 s for 267); a scheduler's new learning rate at each step does not recompile it.
    """
    _tensor_lr(optimizer)
    optimizer.register_state_dict_post_hook(_plain_groups)
    optimizer.register_load_state_dict_post_hook(_tensor_lr)
    optimizer.step = torch.compile(optimizer.step)


def _tensor_lr(optimizer: torch.optim.Optimizer) -> None:
    """Each param group's learning rate as a 0-dim tensor on its parameters' device, with ``capturable`` steps
    (whose step counts live on that device too)."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:  # restored from a checkpoint of an eager run: a CPU count
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def _plain_groups(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """A saved state dict as an eager run keeps it: float learning rates, ``capturable: false``."""
    for group in state_dict["param_groups"]:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = False
    return state_dict
