"""The step's gradients after the backward: their norm, then one pass that scales and clips them.

The recipes' backward weights each micro-batch's loss by its label tokens (torchtune's convention), so at the end of
a step every gradient must be divided by the step's label tokens (times the world size: FSDP2 averages over ranks),
the routed experts' under expert parallelism by the degree P once more (:func:`shard_experts`), and all of them
clipped to ``clip_grad_norm``. torchtune's ``scale_grads`` followed by torch's ``clip_grad_norm_`` makes two passes
over the gradients after the norm's, and the first is slow: it multiplies each gradient by a 0-dim CUDA tensor, which
takes torch's broadcasting kernel. For 3.1B bf16 gradients (4-layer Qwen3-30B-A3B width) on an H200:
``scale_grads`` 12.2 ms, ``clip_grad_norm_`` 7.3 ms (norm 2.9, multiply 4.4; benchmarks/NOTES.md, session 25).

Here the norm is taken of the gradients as the backward left them (:func:`grad_norms`, on the device, no host sync),
read by the host with the step's other statistics (the recipe's one sync per step), and a single multi-tensor
multiply by a Python number per group applies the scale and the clipping coefficient together
(:func:`scale_and_clip_grads`): 2.9 + 4.4 ms. torch's ``_foreach_mul_`` takes its vectorised kernel for a Python
number; with a 0-dim fp32 tensor and bf16 gradients it falls back to one broadcasting multiply per tensor (11.7 ms).
With the compiled Adam/AdamW step (``compile: true``) even that pass goes: the step's update kernel multiplies each
gradient as it reads it (:func:`~torchtune_moe.training.defer_grad_scaling`), 2.9 ms in all (one device; FSDP2's and
expert parallelism's shards take the same path, the update running on the local shards).

Why written here: neither torchtune nor torch has a clip that also applies a known scale (torch's
``_clip_grads_with_norm_`` multiplies by a tensor), and torchtune's ``scale_grads`` is the slow pass above.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from torchtune_moe.modules import moe_layers
from torchtune_moe.training._optimizer_step import defer_grad_scaling

__all__ = ["GradGroup", "gradient_groups", "grad_norms", "scale_and_clip_grads"]


class GradGroup(NamedTuple):
    """Parameters whose gradients share a device mesh (None: plain tensors) and a factor beyond the step's scale."""

    params: list[nn.Parameter]
    factor: float


def gradient_groups(model: nn.Module, expert_parallel_degree: int = 1) -> list[GradGroup]:
    """The parameters of ``model`` that have gradients, grouped by device mesh and factor: under expert parallelism
    (``expert_parallel_degree`` P > 1) the routed experts' factor is ``1 / P`` (their gradients sum the rows of all
    P ranks of their group: :func:`~torchtune_moe.training.shard_experts`), everything else's 1. Every rank gets
    the same groups in the same order."""
    experts: set[int] = set()
    if expert_parallel_degree > 1:
        for _, layer in moe_layers(model):
            experts.update(id(p) for p in layer.experts.parameters())
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.grad is None:
            continue
        mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
        factor = 1.0 / expert_parallel_degree if id(p) in experts else 1.0
        groups.setdefault((mesh, factor), []).append(p)
    return [GradGroup(params, factor) for (_, factor), params in groups.items()]


def grad_norms(groups: Sequence[GradGroup], device: torch.device) -> Optional[torch.Tensor]:
    """[G] fp32 on ``device``: the 2-norm of each group's gradients as they are, reduced over their shards (the same
    on every rank; a collective per sharded group). No host sync. None for no groups.

    Each gradient's norm is accumulated and returned in fp32 (``torch._foreach_norm(..., dtype=float32)``), bf16
    gradients included. torch's ``get_total_norm`` (and so ``clip_grad_norm_``) rounds each bf16 gradient's norm to
    bf16 before summing them, which left the logged ``grad_norm`` with three significant digits."""
    norms = []
    for group in groups:
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for p in group.params:
            by_kind.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        per_tensor = [n for grads in by_kind.values() for n in torch._foreach_norm(grads, 2.0, dtype=torch.float32)]
        first = per_tensor[0].device
        norm = torch.linalg.vector_norm(torch.stack([n if n.device == first else n.to(first) for n in per_tensor]))
        norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).to(device))
    return torch.stack(norms) if norms else None


@torch.no_grad()
def scale_and_clip_grads(
    groups: Sequence[GradGroup], norms: Sequence[float], scale: float, max_norm: Optional[float],
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> float:
    """Multiplies each group's gradients by ``scale * factor``, and with ``max_norm`` by torch's clipping coefficient
    ``min(1, max_norm / (total + 1e-6))`` of the scaled gradients' total norm too, in one multi-tensor pass per
    group, device and dtype (nothing where the product is exactly 1); or, for an ``optimizer`` whose step takes the
    factors (the compiled Adam/AdamW step: :func:`~torchtune_moe.training.defer_grad_scaling`), in its next step's
    update, with no pass of its own (the gradients are left as they are).

    Args:
        groups (Sequence[GradGroup]): from :func:`gradient_groups`.
        norms (Sequence[float]): each group's norm before scaling (:func:`grad_norms`, read by the host).
        scale (float): the step's scale (world size over label tokens).
        max_norm (Optional[float]): clip to this total norm; None: no clipping.
        optimizer (Optional[torch.optim.Optimizer]): the optimizer whose next step the gradients are for.

    Returns:
        float: the total norm of the scaled gradients, before clipping. Not finite: the gradients are left as they
        are (the recipe skips the step or stops).
    """
    if len(norms) != len(groups):
        raise ValueError(f"scale_and_clip_grads: {len(norms)} norms for {len(groups)} groups")
    total = math.hypot(*(scale * group.factor * norm for group, norm in zip(groups, norms)))
    if not math.isfinite(total):
        return total
    coef = 1.0 if max_norm is None else min(1.0, float(max_norm) / (total + 1e-6))
    if optimizer is not None and defer_grad_scaling(optimizer, [(g.params, scale * g.factor * coef) for g in groups]):
        return total
    for group in groups:
        factor = scale * group.factor * coef
        if factor == 1.0:
            continue
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for p in group.params:
            grad = p.grad._local_tensor if isinstance(p.grad, DTensor) else p.grad
            by_kind.setdefault((grad.device, grad.dtype), []).append(grad)
        for grads in by_kind.values():
            torch._foreach_mul_(grads, factor)
    return total
