"""Expert parallelism: each rank of an expert-parallel group holds E / P of a layer's routed experts, and the rows
routed to an expert travel to its rank and back with all-to-all.

Routers run on each rank's own tokens, as without expert parallelism, so routing semantics (token choice,
group-limited routing, the aux-loss-free bias, expert choice, causal expert choice, routing replay) do not change;
only where the experts compute moves. Per MoE layer forward, :class:`AllToAllDispatcher`:

1. sorts this rank's assignments by expert (:func:`~torchtune_moe.modules.dispatch.sort_by_expert`); the experts of
   EP rank p are ``p * E/P .. (p+1) * E/P - 1``, so the rows for each rank are contiguous;
2. exchanges the per-expert row counts (an all-to-all of E integers) and reads them on the host: the one
   host-device sync, needed because all-to-all takes its split sizes as Python integers (and the receive buffer
   must be allocated with its size);
3. sends the rows and their routing weights (all-to-all, variable splits), orders the received rows by local
   expert and runs the local experts as one fused node (:meth:`MoELinear.routed`, the routing weight folded into
   the activation, as locally);
4. sends the results back (all-to-all) and sums each token's rows (fp32, no atomics), as the local combine does.

Backward runs the same collectives in reverse (one autograd node per direction, :class:`_AllToAll`), so every
rank of the group must run every MoE forward and backward: eval and generation included (all ranks do).

Written here rather than reused: torchtitan's expert parallelism is tied to its own MoE module and permutation
kernels; torch's ``all_to_all_single_autograd`` returns asynchronous tensors whose waits would interleave with our
fused node, while one hand-written node sends the rows and their weights in a fixed order in both directions.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from torchtune_moe.modules import _kernels
from torchtune_moe.modules.dispatch import sort_by_expert
from torchtune_moe.modules.moe_layer import moe_layers
from torchtune_moe.modules.moe_linear import MoELinear, _combine, token_segments
from torchtune_moe.modules.routers import RouterOutput

__all__ = ["AllToAllDispatcher", "apply_expert_parallel", "check_expert_parallel_degree"]


def check_expert_parallel_degree(degree: int, world_size: int, num_experts: list[int]) -> None:
    """Refuses an expert-parallel degree that does not divide the world size and every MoE layer's expert count.

    Raises:
        ValueError: naming ``expert_parallel_degree`` and the degrees allowed.
    """
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
        raise ValueError(f"expert_parallel_degree: got {degree!r}; allowed: an integer >= 1 (1 = off)")
    if degree == 1:
        return
    counts = sorted(set(num_experts))
    allowed = [d for d in range(1, world_size + 1) if world_size % d == 0 and all(e % d == 0 for e in counts)]
    if not counts:
        raise ValueError(f"expert_parallel_degree: got {degree}, but the model has no MoE layer; allowed: 1")
    if world_size % degree or any(e % degree for e in counts):
        raise ValueError(
            f"expert_parallel_degree: got {degree}; it must divide the number of processes ({world_size}) and the "
            f"experts per MoE layer ({', '.join(map(str, counts))}); allowed: {', '.join(map(str, allowed))}"
        )


class _AllToAll(torch.autograd.Function):
    """All-to-all of several [N, *] tensors with one set of split sizes, in a fixed order; backward sends the
    gradients back with the splits swapped (also in a fixed order, so every rank issues the same collectives)."""

    @staticmethod
    def forward(ctx, group, out_splits: list[int], in_splits: list[int], *tensors):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        return tuple(_all_to_all(t, out_splits, in_splits, group) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        back = tuple(_all_to_all(g.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group) for g in grads)
        return (None, None, None, *back)


def _all_to_all(t: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = t.new_empty((sum(out_splits), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), out_splits, in_splits, group=group)
    return out


class _TokenRows:
    """Which token each of R rows (sorted by expert) belongs to, and how to sum the rows back per token."""

    def __init__(self, rows_R: torch.Tensor, combine_TS: Optional[torch.Tensor], num_tokens: int, may_drop: bool):
        R = rows_R.shape[0]
        self.rows_R, self.combine_TS, self.num_tokens = rows_R, combine_TS, num_tokens
        self.num_valid = torch.full((1,), R, dtype=torch.int32, device=rows_R.device)
        self.may_drop = may_drop  # combine_TS entries >= R are dropped slots
        self.index_J = self.offsets_T = None
        if combine_TS is None:
            self.index_J, self.offsets_T = token_segments(rows_R, self.num_valid, num_tokens)

    def gather(self, x_TD: torch.Tensor) -> torch.Tensor:
        return _kernels.gather_rows(x_TD, self.rows_R)

    def sum(self, y_RD: torch.Tensor) -> torch.Tensor:
        if y_RD.shape[0] == 0:  # no row kept (every slot dropped)
            return y_RD.new_zeros((self.num_tokens, y_RD.shape[1]))
        return _combine(y_RD, self.combine_TS, self.index_J, self.offsets_T, self.num_valid, self.may_drop)


class _GatherRows(torch.autograd.Function):
    """``x_TD[rows_R]``; backward sums each token's row gradients (fp32, no atomics)."""

    @staticmethod
    def forward(ctx, x_TD, rows: _TokenRows):
        ctx.rows = rows
        return rows.gather(x_TD)

    @staticmethod
    def backward(ctx, grad_RD):
        return ctx.rows.sum(grad_RD.contiguous()), None


class _SumRows(torch.autograd.Function):
    """Sum of each token's rows (fp32, no atomics); backward gathers the token gradients to the rows."""

    @staticmethod
    def forward(ctx, y_RD, rows: _TokenRows):
        ctx.rows = rows
        return rows.sum(y_RD)

    @staticmethod
    def backward(ctx, grad_TD):
        return ctx.rows.gather(grad_TD.contiguous()), None


class AllToAllDispatcher:
    """The expert-parallel dispatcher (a :attr:`MoELinear.dispatcher`): see the module doc for the steps.

    Host-device syncs: one per MoE layer forward (and per activation-checkpoint recompute), reading the
    ``2 * E`` row counts that the all-to-alls take as split sizes. Causal expert choice's dropped slots are left
    out of what is sent, so that sync also replaces the local path's read of the kept count.

    Args:
        group (dist.ProcessGroup): the expert-parallel group (P ranks; EP rank p holds experts
            ``p * E/P .. (p+1) * E/P - 1``).
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)

    # Never traced: under ``compile`` the layer's graph breaks around the dispatch, which runs eagerly (the experts'
    # grouped GEMMs are custom ops either way). Dynamo cannot keep a process group in an autograd Function's ctx
    # (torch 2.13 fails at the first forward) and, on torch 2.11, traced these Functions into wrong gradients
    # (2 H200s, small/full: grad norm 5.28 against 5.40 at step 1, loss 4.17 against 3.64 at step 3).
    @torch.compiler.disable
    def __call__(self, x_TD: torch.Tensor, routing: RouterOutput, experts: MoELinear) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x_TD (torch.Tensor): [T, D] this rank's tokens.
            routing (RouterOutput): their A assignments to the E experts (all ranks' experts).
            experts (MoELinear): the layer's experts, holding this rank's E / P of them.

        Returns:
            tuple: ``out_TD`` [T, D] and ``tokens_per_expert_E`` [E] (this rank's rows per expert, all E).
        """
        E, P = experts.num_experts, self.size
        EL = E // P  # experts per rank
        T, D = x_TD.shape
        counts_E, _, rows_A, weights_A, combine_TS = sort_by_expert(routing, E)

        # Row counts: sent per (rank, local expert), received per (source rank, local expert). The host sync.
        send_PL = counts_E.view(P, EL)
        recv_PL = torch.empty_like(send_PL)
        dist.all_to_all_single(recv_PL, send_PL, group=self.group)
        host = torch.cat([send_PL.sum(1), recv_PL.sum(1)]).tolist()
        send_splits, recv_splits = host[:P], host[P:]
        R, N = sum(send_splits), sum(recv_splits)  # rows sent (dropped slots excluded), rows received

        # Dispatch: this rank's rows, sorted by expert, to the ranks of their experts.
        rows = _TokenRows(rows_A[:R], combine_TS, T, routing.may_drop)
        x_RD = _GatherRows.apply(x_TD, rows)
        x_ND, w_N = _AllToAll.apply(self.group, recv_splits, send_splits, x_RD, weights_A[:R])

        # The local experts on the received rows (ordered by source rank, then expert): sorted by local expert.
        expert_N = torch.repeat_interleave(
            torch.arange(EL, device=x_TD.device).repeat(P), recv_PL.flatten(), output_size=N
        )
        order_N = torch.argsort(expert_N, stable=True)
        offsets_L = recv_PL.sum(0).cumsum(0).to(torch.int32)
        back_N1 = torch.empty_like(order_N).scatter_(0, order_N, torch.arange(N, device=x_TD.device)).view(N, 1)
        if N == 0:
            # Nothing for this rank's experts: one masked row (past offsets_L[-1]) keeps every buffer non-empty
            # and the weights in the graph (zero gradients), as in the local path.
            x_ND = torch.cat([x_ND, x_ND.new_zeros(1, D)])
            w_N = torch.cat([w_N, w_N.new_zeros(1)])
            order_N = torch.zeros(1, dtype=torch.long, device=x_TD.device)
            back_N1 = order_N.view(1, 1)
        y_ND = experts.routed(x_ND, order_N, w_N[order_N], offsets_L, back_N1, may_drop=N == 0)[:N]

        # Combine: results back to the rows' ranks, summed per token.
        (y_RD,) = _AllToAll.apply(self.group, send_splits, recv_splits, y_ND)
        return _SumRows.apply(y_RD, rows), counts_E


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shards the routed experts of every MoE layer of ``model`` by expert over ``ep_mesh`` (1-D, P ranks) and
    installs :class:`AllToAllDispatcher`.

    Each ``gate_up_proj`` / ``down_proj`` (and, for experts with biases, ``gate_up_proj_bias`` /
    ``down_proj_bias``: the biases travel with their experts) becomes a DTensor ``Shard(0)`` on ``ep_mesh`` whose
    local tensor is this rank's E / P experts, cut from the module's full weights (every rank must hold the same full weights:
    the recipe builds them with one seed; on the meta device nothing is read). State-dict keys do not change;
    ``full_tensor()`` (and so ``torch.distributed.checkpoint`` and full-state-dict gathering) sees all E experts.
    Apply it before FSDP2 (``fully_shard`` of the experts then shards over the other mesh dimension).
    """
    P, p = ep_mesh.size(), ep_mesh.get_local_rank()
    for name, layer in moe_layers(model):
        experts = layer.experts
        if experts.num_experts % P:
            raise ValueError(
                f"expert_parallel_degree: {P} does not divide the {experts.num_experts} experts of {name}"
            )
        for pname in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            w = getattr(experts, pname)
            if w is None:  # experts without biases
                continue
            local = w.detach().chunk(P, dim=0)[p].clone()
            dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(experts, pname, nn.Parameter(dt, requires_grad=w.requires_grad))
        experts.dispatcher = AllToAllDispatcher(ep_mesh.get_group())
