"""The recipes' compiled optimizer step (``compile: true``, or ``compile.optimizer_step``).

``torch.compile`` of torch's multi-tensor Adam/AdamW step fuses each parameter's update into one pass over its
tensors, near the memory bandwidth (docs/performance.md). Two things stand in the way of compiling
``optimizer.step`` as it is:

- **Recompiles.** The step folds the float learning rate into its code, so every step of an lr schedule fails the
  guard. torch's answer (its "compiled optimizer with an LR scheduler" tutorial) is a learning rate held in a
  0-dim tensor, which the scheduler fills in place, with ``capturable`` steps (the multi-tensor path that takes a
  tensor learning rate). That changes the optimizer's param groups, so checkpoints would carry a tensor learning
  rate and ``capturable: true`` into runs that step eagerly; the state-dict hook below saves them as plain values,
  and the load hook puts the tensors back.
- **Compile time that grows with depth.** One graph over every parameter compiles for about 0.3 s per parameter
  tensor (2.5 minutes at 48 decoder layers). For Adam and AdamW the step is therefore compiled per bucket of
  parameters, a decoder layer each (``layers``): torch's functional ``torch.optim.adam.adam`` is compiled once,
  and every layer of the same shapes reuses its graph, so the compile time does not grow with the number of
  layers. A bucket is split by device mesh too (expert parallelism keeps the experts on a mesh of their own). Other
  ``torch.optim`` optimizers have their whole ``step`` compiled.

Why written here: torch compiles an optimizer's ``step`` as one graph only, and neither torchtune nor torchao has a
per-layer compiled step for torch's optimizers.
"""

from __future__ import annotations

import types
from typing import Iterable, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam as _adam

__all__ = ["compile_optimizer_step", "defer_grad_scaling"]

# One compiled function for every bucket: a decoder layer's tensors have the same shapes in every layer, so all
# layers share one graph (dynamic=False: each distinct set of shapes, say a dense and an MoE layer, gets a static
# graph of its own rather than one with symbolic sizes). The step's host time grows with the number of tensors
# (15-30 us each on an H200 host, hidden behind the GPU's update of a large model); Inductor's size and stride
# asserts on every input, which repeat what the guards have checked, were a fifth of it.
# The multi-tensor update becomes one Triton "foreach" kernel per call. Inductor leaves such kernels untuned with one
# block size shared by every tensor; tuning them (``combo_kernels_autotune=2``) with a block size per tensor
# (``combo_kernel_per_subkernel_blocks``) took the step of a 4-layer Qwen3-30B-A3B-width model (3.1B bf16
# parameters) from 11.6 to 10.4-10.8 ms on an H200 (3.8 -> 4.0-4.2 TB/s, where a plain copy reaches 4.3), the
# same numbers to the bit, for +0.5 s at the first step (benchmarks/NOTES.md, session 24).
_OPTIONS = {"size_asserts": False, "combo_kernels_autotune": 2, "combo_kernel_per_subkernel_blocks": True}
_adam_compiled = torch.compile(_adam, dynamic=False, options=_OPTIONS)


# With a factor handed by :func:`defer_grad_scaling`, the gradients enter multiplied by a 0-dim tensor: inside the same
# kernel the multiply costs nothing, where a pass of its own over 3.1B bf16 gradients takes 4.4 ms on an H200
# (benchmarks/NOTES.md, session 25). A tensor, so that a new factor at each step does not recompile. A graph of its
# own, called with plain tensors only (DTensors come as their local shards, _adam_bucket): with DTensor gradients
# (expert parallelism's 2-D mesh) the multiply inside the compiled step crashed a 2-process CPU test intermittently.
def _adam_with_grad_factor(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, grad_factor, **kwargs):
    """torch's functional ``adam`` of the gradients times ``grad_factor`` (a 0-dim fp32 tensor)."""
    _adam(params, torch._foreach_mul(grads, grad_factor), exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, **kwargs)


_adam_scaled_compiled = torch.compile(_adam_with_grad_factor, dynamic=False, options=_OPTIONS)


def compile_optimizer_step(optimizer: torch.optim.Optimizer, layers: Optional[Iterable[nn.Module]] = None) -> None:
    """Compiles ``optimizer.step`` in place, for a torch.optim optimizer on the multi-tensor (``foreach``) path.

    Args:
        optimizer (torch.optim.Optimizer): its param groups get a 0-dim tensor learning rate and
            ``capturable: True``; saved state dicts keep plain values (a float lr, ``capturable: False``).
        layers (Optional[Iterable[nn.Module]]): modules whose parameters are stepped together, one compiled call
            each (the model's decoder layers, ``model.layers``); parameters in none of them make one more bucket.
            Layers of the same shapes share one graph, so the compile time does not grow with their number. Used
            for ``torch.optim.Adam`` and ``AdamW``; other optimizers compile their whole step. Default: one bucket.

    Call it after the lr scheduler is made: the scheduler wraps the step it finds, and a compiled step has no
    ``__func__`` for it to wrap. The first step compiles: a bucketed Adam/AdamW step in a few seconds per distinct
    bucket, a whole step about 0.3 s per parameter tensor on an H200 host (18 s for 47 tensors, 78 s for 267). A
    scheduler's new learning rate at each step does not recompile it.

    Raises:
        TypeError: ``layers`` not an iterable of modules.
    """
    try:
        layers = list(layers or [])
    except TypeError:
        layers = [layers]  # a single module or a number: refused below, by name
    if not all(isinstance(m, nn.Module) for m in layers):
        raise TypeError(
            f"compile_optimizer_step: layers must be modules (the model's decoder layers, model.layers), got "
            f"{sorted({type(m).__name__ for m in layers if not isinstance(m, nn.Module)})}"
        )
    _tensor_lr(optimizer)
    optimizer.register_state_dict_post_hook(_plain_groups)
    optimizer.register_load_state_dict_post_hook(_tensor_lr)
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        optimizer.step = _bucketed_adam_step(optimizer, [list(m.parameters()) for m in layers])
    else:
        optimizer.step = torch.compile(optimizer.step)


def defer_grad_scaling(
    optimizer: torch.optim.Optimizer, factors: Iterable[tuple[Iterable[torch.Tensor], float]]
) -> bool:
    """Hands the next step of a compiled Adam/AdamW step (:func:`compile_optimizer_step`) the factor each parameter's
    gradient is to be multiplied by: the update multiplies as it reads the gradient, instead of a pass of its own
    over the gradients first (the gradients themselves are left as they are). Used once, by the next step.

    Args:
        optimizer (torch.optim.Optimizer): the optimizer.
        factors (Iterable[tuple[Iterable[torch.Tensor], float]]): (parameters, factor) pairs; parameters in none
            of them keep their gradients as they are.

    Returns:
        bool: False if the optimizer's step cannot take factors (any step not made by :func:`compile_optimizer_step`
        for Adam or AdamW), or if a DTensor parameter's gradient is sharded otherwise than the parameter: nothing
        was handed, the caller multiplies the gradients itself. FSDP2's and expert parallelism's DTensors are
        taken: their compiled update runs on the local shards (:func:`_adam_bucket`).
    """
    factors = [(list(params), float(factor)) for params, factor in factors]
    if not getattr(optimizer, "_takes_grad_factors", False) or not all(
        _shards_alike(p, p.grad) for params, _ in factors for p in params if p.grad is not None
    ):
        return False
    optimizer._grad_factors = {id(p): factor for params, factor in factors for p in params}
    return True


def _bucketed_adam_step(optimizer: torch.optim.Adam, layer_params: list[list[torch.Tensor]]):
    """``optimizer.step`` as one compiled functional Adam call per bucket of each param group. Like ``Adam.step``
    it runs the optimizer's step hooks and profiler label (``Optimizer.profile_hook_step``), and it keeps an lr
    scheduler's mark on the step it replaces (the scheduler warns of an overridden step without it)."""
    bucket_of = {id(p): b for b, params in enumerate(layer_params) for p in params}
    rest = len(layer_params)
    scheduled = hasattr(optimizer.step, "_wrapped_by_lr_sched")
    # Per device, the 0-dim fp32 gradient factor the compiled update reads, and the value last written to it: one
    # tensor serves every bucket, refilled (a tiny kernel, no host sync) where the factor changes, in stream order.
    factor_of_device: dict[torch.device, list] = {}
    optimizer._takes_grad_factors = True
    optimizer._grad_factors = None

    def grad_factor(device: torch.device, value: float) -> torch.Tensor:
        if device not in factor_of_device:
            factor_of_device[device] = [torch.ones((), dtype=torch.float32, device=device), 1.0]
        slot = factor_of_device[device]
        if slot[1] != value:
            slot[0].fill_(value)
            slot[1] = value
        return slot[0]

    @torch.no_grad()
    def step(opt, closure=None):
        if closure is not None:
            raise ValueError("compile_optimizer_step: a compiled Adam/AdamW step takes no closure")
        opt._opt_called = True  # what the lr scheduler's wrapper records
        factors, opt._grad_factors = opt._grad_factors or {}, None  # handed by defer_grad_scaling, used once
        for group in opt.param_groups:
            # By device mesh too: a compiled foreach op cannot take DTensors of two meshes in one list (expert
            # parallelism keeps the experts on their own mesh; eager foreach ops take them).
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    mesh = p.device_mesh if isinstance(p, DTensor) else None
                    key = (bucket_of.get(id(p), rest), mesh, factors.get(id(p), 1.0))
                    buckets.setdefault(key, []).append(p)
            for (_, _, factor), params in buckets.items():
                _adam_bucket(opt, group, params, None if factor == 1.0 else grad_factor(params[0].device, factor))

    step.__qualname__ = f"{type(optimizer).__name__}.step"
    hooked = torch.optim.Optimizer.profile_hook_step(step)
    if scheduled:
        hooked._wrapped_by_lr_sched = True
    return types.MethodType(hooked, optimizer)


def _adam_bucket(
    optimizer: torch.optim.Adam, group: dict, params: list[torch.Tensor], grad_factor: Optional[torch.Tensor]
) -> None:
    """One compiled multi-tensor Adam/AdamW update of ``params`` (all with gradients, each times ``grad_factor``, a
    0-dim fp32 tensor on their device, if given) under ``group``'s settings, making their state first as ``Adam``
    does (a capturable step count on the parameter's device)."""
    grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], []
    for p in params:
        if p.grad.is_sparse:
            raise RuntimeError("Adam does not support sparse gradients")
        state = optimizer.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        grads.append(p.grad)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        if group["amsgrad"]:
            max_exp_avg_sqs.append(state["max_exp_avg_sq"])
        steps.append(state["step"])
    if all(_shards_alike(p, t) for ts in (grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs) for p, t in zip(params, ts)):
        # Adam is elementwise: on DTensors sharded alike (FSDP2's, expert parallelism's) the update of the local
        # shards is the whole update. The compiled call then sees plain tensors only: no DTensor dispatch to trace,
        # and the gradient factor (a plain 0-dim tensor) never meets a DTensor, which on the experts' 2-D mesh
        # crashed the compiled step intermittently on CPU (benchmarks/NOTES.md, sessions 25 and 26).
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = (
            [_local(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
        )
    beta1, beta2 = group["betas"]
    factor = () if grad_factor is None else (grad_factor,)
    (_adam_compiled if grad_factor is None else _adam_scaled_compiled)(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *factor,
        foreach=True, capturable=True, differentiable=False, fused=None, grad_scale=None, found_inf=None,
        has_complex=any(p.dtype.is_complex for p in params),
        decoupled_weight_decay=group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)),
        amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
        eps=group["eps"], maximize=group["maximize"],
    )


def _shards_alike(p: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether ``t`` (a gradient or a state of ``p``) is sharded as ``p``: the same global shape, mesh and placements,
    hence the same local shard (both plain tensors: True). Attribute reads only: it runs for every parameter of
    every step."""
    if not isinstance(p, DTensor) and not isinstance(t, DTensor):
        return True
    return (
        isinstance(p, DTensor) and isinstance(t, DTensor) and p.device_mesh == t.device_mesh
        and p.placements == t.placements and p.shape == t.shape
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (its storage: updates in place reach the DTensor), a tensor itself. The attribute,
    not ``to_local()``, whose autograd function would cost host time for every tensor of every step."""
    return t._local_tensor if isinstance(t, DTensor) else t


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
