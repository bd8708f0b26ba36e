"""Token dispatch for the routed experts: order the routing's assignments by expert, run the experts, sum the
results back per token.

A dispatcher is a callable ``(x_TD, routing, experts) -> (out_TD, tokens_per_expert_E)`` held by the experts
module (:attr:`MoELinear.dispatcher`) and called from its ``forward``. :func:`dispatch_combine` is the local one
(every expert on this device, the default); :class:`~torchtune_moe.modules.expert_parallel.AllToAllDispatcher`
sends rows to the ranks that hold their experts (expert parallelism).
"""

from typing import Optional

import torch

from torchtune_moe.modules._custom_op import custom_op
from torchtune_moe.modules.routers import RouterOutput

__all__ = ["dispatch_combine", "sort_by_expert"]


# The one host read of dispatch_combine (routings that drop slots), split in two custom ops: opaque to
# torch.compile, which traces through them (the kept rows get an unbacked size) instead of breaking the graph
# at an ``int(tensor)``; and non-blocking on CUDA, so the GPU runs the launches queued between the two.
_PENDING_HOST_COPIES: dict[int, "torch.cuda.Event"] = {}


@custom_op("copy_to_host", mutates_args=())
def _copy_to_host(t: torch.Tensor) -> torch.Tensor:
    """Starts copying ``t`` to host memory and returns the host tensor without waiting (CUDA: pinned memory,
    ``non_blocking``, a CUDA event recorded for :func:`_kept_prefix` to wait on). Elsewhere a plain copy."""
    if not t.is_cuda:
        return t.to("cpu", copy=True)
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    _PENDING_HOST_COPIES[host.data_ptr()] = done
    return host


@_copy_to_host.register_fake
def _(t):
    return torch.empty(t.shape, dtype=t.dtype, device="cpu")


@custom_op("kept_prefix", mutates_args=())
def _kept_prefix(src_A: torch.Tensor, num_kept: torch.Tensor) -> torch.Tensor:
    """``src_A[:max(num_kept, 1)]`` (a copy): the one host-device sync of :func:`dispatch_combine`. Waits for
    the copy of ``num_kept`` ([] host tensor from :func:`_copy_to_host`) to land, not for the whole stream."""
    done = _PENDING_HOST_COPIES.pop(num_kept.data_ptr(), None)
    if done is not None:
        done.synchronize()
    return src_A[: max(int(num_kept), 1)].clone()


@_kept_prefix.register_fake
def _(src_A, num_kept):
    A = src_A.shape[0]  # a bound for the compiler when static (dispatch_combine also checks it)
    R = torch.library.get_ctx().new_dynamic_size(min=1, max=A if isinstance(A, int) and A > 0 else None)
    return src_A.new_empty((R, *src_A.shape[1:]))


def sort_by_expert(
    routing: RouterOutput, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Orders the A assignments by expert (a stable sort; dropped slots, expert id E, last). No host sync.

    Expert offsets come from the sorted expert ids (a binary search per expert: no atomics).

    Args:
        routing (RouterOutput): A assignments.
        num_experts (int): E.

    Returns:
        tuple: ``counts_E`` [E] int64 (rows per expert), ``offsets_E`` [E] int32 (their cumulative sum),
        ``rows_A`` [A] int64 (token of each sorted row), ``weights_A`` [A] (weight of each sorted row;
        differentiable), ``combine_TS`` [T, S] int64 (sorted position of slot s of token t) when the routing has
        token-major slots (``routing.slots_per_token``), else None.
    """
    expert_ids_A = routing.expert_ids_A
    device = expert_ids_A.device
    # Dropped slots (expert id E) sort last, past offsets_E[-1]. The keys in the narrowest integer type that holds
    # 0..E: the GPU's radix sort makes a pass per key byte (8 for int64, 1 for uint8; 10 kernels -> 3 per layer).
    key_dtype = torch.uint8 if num_experts < 255 else torch.int16 if num_experts < 2**15 - 1 else expert_ids_A.dtype
    sorted_ids_A, order_A = torch.sort(expert_ids_A.to(key_dtype), stable=True)
    offsets_E = torch.searchsorted(sorted_ids_A, torch.arange(1, num_experts + 1, device=device, dtype=key_dtype))
    counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
    offsets_E = offsets_E.to(torch.int32)
    rows_A = routing.token_ids_A[order_A]
    weights_A = routing.weights_A.gather(0, order_A)  # backward: a scatter (index's backward sorts)
    combine_TS = None
    if routing.slots_per_token is not None:
        # Token-major, S slots per token: position of slot (t, s) in the sorted order (dropped: >= offsets_E[-1]).
        arange_A = torch.arange(expert_ids_A.shape[0], device=device)
        combine_TS = torch.empty_like(order_A).scatter_(0, order_A, arange_A).view(-1, routing.slots_per_token)
    return counts_E, offsets_E, rows_A, weights_A, combine_TS


def dispatch_combine(x_TD: torch.Tensor, routing: RouterOutput, experts) -> tuple[torch.Tensor, torch.Tensor]:
    """The local dispatcher (every expert on this device): sort assignments by expert
    (:func:`sort_by_expert`), grouped GEMMs, weighted sum back per token.

    The experts run
    as one fused autograd node (:meth:`MoELinear.routed`). Routers with token-major slots
    (``routing.slots_per_token``: token choice, causal expert choice) combine by a gather-sum over each
    token's slots, any other layout (expert choice) by a sum over each token's rows, grouped with a second
    sort.

    Host-device syncs: none, except for routings that may drop slots (``routing.may_drop``: causal expert
    choice, whose T*K_max slots keep about T*K). Those cost one host read of the number of kept slots, so
    that every [rows, *] buffer of the experts (the gathered input, the up-projection output saved for
    backward, their gradients) is sized by the kept rows, as token choice's are, instead of by all T*K_max
    slots (twice the activation memory at the default K_max = 2K). The read starts (a non-blocking copy on
    CUDA) before the sort and is waited on after every launch that does not need it, so the GPU is not left
    idle while the host waits. Under torch.compile the read is a custom op whose output (the kept rows) has a
    data-dependent size: with ``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` (the recipe
    sets it when ``compile`` is on) dynamo traces through it, otherwise it breaks the graph there.

    Args:
        x_TD (torch.Tensor): [T, D] tokens.
        routing (RouterOutput): A assignments.
        experts (MoELinear): the E experts (all of them on this device).

    Returns:
        tuple: ``out_TD`` [T, D] and ``tokens_per_expert_E`` [E] (int64, dropped slots excluded).
    """
    E = experts.num_experts
    expert_ids_A = routing.expert_ids_A
    A = expert_ids_A.shape[0]
    if routing.may_drop:
        num_kept = _copy_to_host((expert_ids_A < E).sum())
    counts_E, offsets_E, rows_R, weights_R, combine_TS = sort_by_expert(routing, E)
    if routing.may_drop:
        # The R kept rows (at least one, so that no buffer is empty: a lone dropped row is masked as any other).
        rows_R = _kept_prefix(rows_R, num_kept)
        R = rows_R.shape[0]
        torch._check(R <= A)  # for torch.compile, where R is data-dependent
        weights_R = weights_R[:R]
    out_TD = experts.routed(x_TD, rows_R, weights_R, offsets_E, combine_TS, may_drop=routing.may_drop)
    return out_TD, counts_E


