"""Routers: which experts see which tokens, and with what weight.

Every router maps ``x_TD`` to a :class:`RouterOutput`: a flat list of A (token, expert, weight) assignments
that the MoE layer dispatches with one sort and two grouped GEMMs. Token choice gives A = T*K, expert
choice A = E*C, causal expert choice (Expert Threshold routing) A = T*K_max with unused slots marked as
dropped. One dispatch path serves them all (and a user's own router that returns a ``RouterOutput``).

Routers that learn from observed load (aux-loss-free bias, expert thresholds) accumulate statistics in
training forwards and apply them in :meth:`Router.update` (called once per optimizer step by
:func:`torchtune_moe.modules.update_routers`), so the routing inside one forward never depends on the
batch being routed and activation-checkpoint recomputes see the same routing as the first forward.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from torchtune_moe.modules._custom_op import custom_op

__all__ = [
    "RouterOutput",
    "Router",
    "TokenChoiceTopKRouter",
    "ExpertChoiceTopKRouter",
    "CausalExpertChoiceRouter",
    "ExpertThresholdRouter",
]

_SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass
class RouterOutput:
    """Routing decisions for T tokens and E experts, as A assignments.

    Attributes:
        token_ids_A (torch.Tensor): [A] int64, token of each assignment.
        expert_ids_A (torch.Tensor): [A] int64, expert of each assignment; the value E marks a dropped
            slot that is not computed and contributes nothing.
        weights_A (torch.Tensor): [A] fp32 combine weights.
        logits_TE (torch.Tensor): [T, E] fp32 router logits (for the z-loss).
        probs_TE (torch.Tensor): [T, E] fp32 router probabilities, each row summing to 1 (for balance losses).
        experts_TK (Optional[torch.Tensor]): [T, K] selected experts when the router picks a fixed K per
            token and A = T*K in token-major order (token choice); None otherwise. Routing capture uses it.
        may_drop (bool): whether some ``expert_ids_A`` may equal E.
        slots_per_token (Optional[int]): S when the assignments are token-major slots, A = T*S with assignment
            ``t*S + s`` the s-th slot of token t (token choice: S = K; causal expert choice: S = K_max, some
            slots dropped). The layer then combines by a gather-sum over S slots per token; None: any layout.
    """

    token_ids_A: torch.Tensor
    expert_ids_A: torch.Tensor
    weights_A: torch.Tensor
    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    experts_TK: Optional[torch.Tensor] = None
    may_drop: bool = False
    slots_per_token: Optional[int] = None

    @staticmethod
    def from_topk(
        experts_TK: torch.Tensor, weights_TK: torch.Tensor, logits_TE: torch.Tensor, probs_TE: torch.Tensor
    ) -> "RouterOutput":
        """Builds the output of a router that picks K experts per token ([T, K] experts and weights)."""
        T, K = experts_TK.shape
        token_ids_A = torch.arange(T, device=experts_TK.device).repeat_interleave(K)
        return RouterOutput(
            token_ids_A=token_ids_A,
            expert_ids_A=experts_TK.reshape(-1),
            weights_A=weights_TK.reshape(-1),
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            experts_TK=experts_TK,
            slots_per_token=K,
        )


def _in_backward_recompute() -> bool:
    """True while autograd runs a backward (where activation checkpointing recomputes forwards)."""
    return torch._C._current_graph_task_id() != -1


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` of two bf16 matrices with fp32 accumulation, rounded once to ``out_dtype``: a tensor-core GEMM on
    CUDA; elsewhere (aten has no CPU kernel for ``mm(..., out_dtype=)``) the same product of upcast copies."""
    if a.is_cuda:
        return torch.mm(a, b) if out_dtype == a.dtype else torch.mm(a, b, out_dtype=out_dtype)
    return torch.mm(a.float(), b.float()).to(out_dtype)


class _Bf16Logits(torch.autograd.Function):
    """fp32 router logits ``x_TD @ w_ED^T`` of bf16 tokens and a bf16 gate weight, on tensor cores.

    Written by hand because ``torch.mm(..., out_dtype=torch.float32)`` (bf16 operands, fp32 accumulation and
    output) has no autograd formula in torch. A product of two bf16 values is exact in fp32, so the logits equal
    those of the fp32 GEMM of upcast copies up to summation order; that GEMM ran without tensor cores (~0.3 ms
    forward + backward per layer at the Qwen3-30B-A3B shape) and kept an fp32 copy of ``x`` for backward.

    Backward: the fp32 logit gradient is split into two bf16 terms, ``g = g_hi + g_lo`` (g_hi its leading 8
    bits, g_lo the rest rounded to bf16: relative error <= 2^-16), and both GEMMs run in bf16 with fp32
    accumulation on ``g_TF = [g_hi, g_lo]`` (F = 2E): ``grad_x = g_TF @ [w; w]`` rounded once to bf16 (as the
    fp32 path's cast did), and ``grad_w`` = the sum of the two [E, D] halves of ``g_TF^T @ x`` in fp32, then
    cast to the weight's dtype. Both are the fp32 path's gradients up to summation order and that 2^-16
    (rounding g to bf16 instead, with no g_lo, would raise their error against fp64 by ~1.4x).
    """

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TD, w_ED)
        return _mm(x_TD, w_ED.t(), torch.float32)

    @staticmethod
    def backward(ctx, grad_TE: torch.Tensor):
        x_TD, w_ED = ctx.saved_tensors
        # g_hi: g with its low 16 bits cleared (exactly a bf16 value). Not g.to(bf16): Inductor drops the
        # rounding of a bf16 -> fp32 round trip inside a fused kernel, which would leave g_lo = 0.
        hi32_TE = (grad_TE.view(torch.int32) & -65536).view(torch.float32)
        g_TF = torch.cat([hi32_TE, grad_TE - hi32_TE], dim=1).to(torch.bfloat16)
        grad_x_TD = grad_w_ED = None
        if ctx.needs_input_grad[0]:
            grad_x_TD = _mm(g_TF, torch.cat([w_ED, w_ED], dim=0), x_TD.dtype)
        if ctx.needs_input_grad[1]:
            E = w_ED.shape[0]
            grad_FD = _mm(g_TF.t(), x_TD, torch.float32)
            grad_w_ED = (grad_FD[:E] + grad_FD[E:]).to(w_ED.dtype)
        return grad_x_TD, grad_w_ED


def router_logits(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``x_TD @ w_ED^T`` ([T, D] x [E, D] -> [T, E]): bf16 inputs use a bf16 GEMM with fp32
    accumulation and output (:class:`_Bf16Logits`), any other dtypes an fp32 GEMM of upcast copies."""
    if x_TD.dtype == w_ED.dtype == torch.bfloat16:
        return _Bf16Logits.apply(x_TD, w_ED)
    return F.linear(x_TD.float(), w_ED.float())


def _check_common(dim: int, num_experts: int, experts_per_token: int, score_func: str) -> None:
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= experts_per_token <= num_experts:
        raise ValueError(
            f"experts_per_token must be between 1 and num_experts ({num_experts}), got {experts_per_token}"
        )
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if score_func not in _SCORE_FUNCS:
        raise ValueError(f"score_func must be one of {_SCORE_FUNCS}, got {score_func!r}")


class Router(nn.Module):
    """Base class: a linear gate ``dim -> num_experts`` whose logits are computed in fp32.

    Subclasses implement ``forward(x_TD, forced_experts_TK=None) -> RouterOutput`` and, if they learn
    from load, :meth:`update`. ``gate_bias=True`` gives the gate a trained bias added to the logits (GPT-OSS).
    """

    def __init__(
        self, dim: int, num_experts: int, experts_per_token: int, score_func: str = "softmax", gate_bias: bool = False
    ):
        super().__init__()
        _check_common(dim, num_experts, experts_per_token, score_func)
        self.num_experts = num_experts
        self.experts_per_token = experts_per_token
        self.score_func = score_func
        self.gate = nn.Linear(dim, num_experts, bias=gate_bias)

    def scores(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns fp32 ``(logits_TE, scores_TE, probs_TE)``; scores are softmax or sigmoid of the logits,
        probs are the scores normalised to sum to 1 per token."""
        logits_TE = router_logits(x_TD, self.gate.weight)
        if self.gate.bias is not None:
            logits_TE = logits_TE + self.gate.bias.float()
        if self.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
            probs_TE = scores_TE
        else:
            scores_TE = logits_TE.sigmoid()
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        return logits_TE, scores_TE, probs_TE

    def update(self, process_group: Optional[dist.ProcessGroup] = None) -> None:
        """Applies the load statistics accumulated since the last call (no-op for routers without any)."""

    def _all_reduce(self, t: torch.Tensor, process_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, group=process_group)
        return t


class TokenChoiceTopKRouter(Router):
    """Each token picks its top-K experts.

    ``weights = scores[top-K]``, optionally renormalised to sum to 1 (``norm_topk_prob``), times
    ``route_scale``. Options:

    - ``score_func``: ``"softmax"`` (Mixtral, Qwen, OLMoE) or ``"sigmoid"`` (DeepSeek-V3).
    - Group-limited routing (``num_expert_groups``, ``num_limited_groups``): experts form G equal groups,
      each group is scored by the sum of its top-2 selection scores (its max if groups have one expert),
      and a token only picks among the experts of its best ``num_limited_groups`` groups.
    - Aux-loss-free balancing (``expert_bias_update_rate > 0``, DeepSeek-V3): a per-expert bias is added to
      the scores when *selecting* experts, never to the weights. It is a buffer, updated outside autograd
      by :meth:`update` from the loads seen since the last update:
      ``bias += rate * sign(mean_load - load)``.

    Args:
        dim (int): model dim D.
        num_experts (int): E.
        experts_per_token (int): K.
        score_func (str): ``"softmax"`` or ``"sigmoid"``.
        norm_topk_prob (bool): renormalise the K weights of each token to sum to 1.
        route_scale (float): multiplies the weights.
        num_expert_groups (Optional[int]): G, must divide E.
        num_limited_groups (Optional[int]): groups each token may use, 1..G.
        expert_bias_update_rate (float): 0 disables the aux-loss-free bias.
        expert_bias (bool): keep the bias buffer even at update rate 0 (a checkpoint's fixed bias, e.g.
            DeepSeek-V3's ``e_score_correction_bias``, used for selection and not updated).
        gate_bias (bool): a trained bias on the gate's logits (GPT-OSS). With softmax scores and
            ``norm_topk_prob`` the weights are the softmax of the K selected logits, as GPT-OSS computes them.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        experts_per_token: int,
        *,
        score_func: str = "softmax",
        norm_topk_prob: bool = True,
        route_scale: float = 1.0,
        num_expert_groups: Optional[int] = None,
        num_limited_groups: Optional[int] = None,
        expert_bias_update_rate: float = 0.0,
        expert_bias: bool = False,
        gate_bias: bool = False,
    ):
        super().__init__(dim, num_experts, experts_per_token, score_func, gate_bias=gate_bias)
        if route_scale <= 0:
            raise ValueError(f"route_scale must be > 0, got {route_scale}")
        if expert_bias_update_rate < 0:
            raise ValueError(f"expert_bias_update_rate must be >= 0, got {expert_bias_update_rate}")
        if (num_expert_groups is None) != (num_limited_groups is None):
            raise ValueError("num_expert_groups and num_limited_groups must be given together (or neither)")
        if num_expert_groups is not None:
            if num_expert_groups < 1 or num_experts % num_expert_groups:
                raise ValueError(
                    f"num_expert_groups must be >= 1 and divide num_experts ({num_experts}), got {num_expert_groups}"
                )
            if not 1 <= num_limited_groups <= num_expert_groups:
                raise ValueError(
                    f"num_limited_groups must be between 1 and num_expert_groups ({num_expert_groups}), "
                    f"got {num_limited_groups}"
                )
            group_size = num_experts // num_expert_groups
            if num_limited_groups * group_size < experts_per_token:
                raise ValueError(
                    f"num_limited_groups ({num_limited_groups}) groups of {group_size} experts hold fewer than "
                    f"experts_per_token ({experts_per_token}) experts"
                )
        self.norm_topk_prob = norm_topk_prob
        self.route_scale = route_scale
        self.num_expert_groups = num_expert_groups
        self.num_limited_groups = num_limited_groups
        self.expert_bias_update_rate = expert_bias_update_rate
        if expert_bias_update_rate > 0 or expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
            self.register_buffer("_load_accum", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        else:
            self.expert_bias = None

    def _select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        choice_TE = scores_TE if self.expert_bias is None else scores_TE + self.expert_bias
        if self.num_expert_groups is not None and self.num_limited_groups < self.num_expert_groups:
            T, E = choice_TE.shape
            G = self.num_expert_groups
            grouped_TGS = choice_TE.view(T, G, E // G)
            group_scores_TG = grouped_TGS.topk(min(2, E // G), dim=-1).values.sum(-1)
            best_groups_TL = group_scores_TG.topk(self.num_limited_groups, dim=-1).indices
            keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, best_groups_TL, True)
            choice_TE = grouped_TGS.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)
        return choice_TE.topk(self.experts_per_token, dim=-1).indices

    def forward(self, x_TD: torch.Tensor, forced_experts_TK: Optional[torch.Tensor] = None) -> RouterOutput:
        """
        Args:
            x_TD (torch.Tensor): [T, D] tokens.
            forced_experts_TK (Optional[torch.Tensor]): [T, K] experts to use instead of the router's choice
                (routing replay); the weights still come from the current scores, so the gate gets gradients.

        Returns:
            RouterOutput: A = T*K assignments.
        """
        logits_TE, scores_TE, probs_TE = self.scores(x_TD)
        if forced_experts_TK is None:
            experts_TK = self._select(scores_TE.detach())
        else:
            experts_TK = forced_experts_TK.to(device=x_TD.device, dtype=torch.long)
        weights_TK = scores_TE.gather(1, experts_TK)
        if self.norm_topk_prob:  # as Hugging Face does, also for K = 1 (the weight is then 1)
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if self.route_scale != 1.0:
            weights_TK = weights_TK * self.route_scale
        if self.expert_bias_update_rate > 0 and self.training and not _in_backward_recompute():
            with torch.no_grad():
                self._load_accum.scatter_add_(
                    0, experts_TK.reshape(-1), torch.ones(experts_TK.numel(), device=x_TD.device)
                )
        return RouterOutput.from_topk(experts_TK, weights_TK, logits_TE, probs_TE)

    @torch.no_grad()
    def update(self, process_group: Optional[dist.ProcessGroup] = None) -> None:
        """``bias += rate * sign(mean_load - load)`` with the loads since the last update (all ranks)."""
        if self.expert_bias is None or self.expert_bias_update_rate == 0:
            return
        load_E = self._all_reduce(self._load_accum.clone(), process_group)
        # No load seen gives sign(0) = 0: no change, and no host-device sync to find out.
        self.expert_bias.add_(self.expert_bias_update_rate * torch.sign(load_E.mean() - load_E))
        self._load_accum.zero_()

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, experts_per_token={self.experts_per_token}, "
            f"score_func={self.score_func}, norm_topk_prob={self.norm_topk_prob}, route_scale={self.route_scale}"
        )


class _CapacityRouter(Router):
    """Base of the two expert-choice routers: an expert's capacity ``C = ceil(capacity_factor * T * K / E)``
    (at least 1, at most T) for T tokens."""

    def __init__(
        self, dim: int, num_experts: int, experts_per_token: int, capacity_factor: float, score_func: str,
        gate_bias: bool = False,
    ):
        super().__init__(dim, num_experts, experts_per_token, score_func, gate_bias=gate_bias)
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.capacity_factor = capacity_factor

    def capacity(self, num_tokens: int) -> int:
        """C for T tokens."""
        c = math.ceil(self.capacity_factor * num_tokens * self.experts_per_token / self.num_experts)
        return max(1, min(num_tokens, c))


class ExpertChoiceTopKRouter(_CapacityRouter):
    """Each expert takes its top-C tokens (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

    ``C = ceil(capacity_factor * T * K / E)`` (at most T). Scores are the per-token softmax (or sigmoid) over
    experts; the weight of an assignment is its score. Load is balanced by construction, but a token may be
    taken by no expert (dropped: only the residual and shared experts carry it) or by many.

    **Not causal.** An expert ranks all T tokens of the batch, so whether token t is routed depends on later
    tokens of its sequence and on other sequences. In a decoder this leaks the future during training and
    cannot be reproduced at generation time. Use it for encoders or as a reference; for decoders use
    :class:`CausalExpertChoiceRouter`.

    Args:
        dim (int): model dim D.
        num_experts (int): E.
        experts_per_token (int): K, the average number of experts per token at capacity_factor 1.
        capacity_factor (float): > 0.
        score_func (str): ``"softmax"`` or ``"sigmoid"``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        experts_per_token: int,
        *,
        capacity_factor: float = 1.0,
        score_func: str = "softmax",
        gate_bias: bool = False,
    ):
        super().__init__(dim, num_experts, experts_per_token, capacity_factor, score_func, gate_bias)

    def forward(self, x_TD: torch.Tensor, forced_experts_TK: Optional[torch.Tensor] = None) -> RouterOutput:
        """
        Args:
            x_TD (torch.Tensor): [T, D] tokens.

        Returns:
            RouterOutput: A = E*C assignments, expert-major.
        """
        if forced_experts_TK is not None:
            raise ValueError("ExpertChoiceTopKRouter cannot replay per-token routing (forced_experts_TK)")
        logits_TE, scores_TE, probs_TE = self.scores(x_TD)
        C = self.capacity(x_TD.shape[0])
        weights_EC, token_ids_EC = scores_TE.t().topk(C, dim=-1)
        expert_ids_EC = torch.arange(self.num_experts, device=x_TD.device).unsqueeze(1).expand(-1, C)
        return RouterOutput(
            token_ids_A=token_ids_EC.reshape(-1),
            expert_ids_A=expert_ids_EC.reshape(-1),
            weights_A=weights_EC.reshape(-1),
            logits_TE=logits_TE,
            probs_TE=probs_TE,
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, experts_per_token={self.experts_per_token}, capacity_factor={self.capacity_factor}"


@custom_op("accumulate_batch_thresholds", mutates_args=("thr_sum_E", "thr_count"))
def _accumulate_batch_thresholds(
    thr_sum_E: torch.Tensor, thr_count: torch.Tensor, scores_TE: torch.Tensor, capacity: int
) -> None:
    """``thr_sum_E += `` the ``capacity``-th largest score of each expert over the batch, ``thr_count += 1``;
    nothing in a backward recompute (activation checkpointing). A custom op so that torch.compile runs that
    check at every call, inside the layer's graph, instead of breaking the graph at it."""
    if _in_backward_recompute():
        return
    thr_sum_E += scores_TE.topk(capacity, dim=0).values[capacity - 1]
    thr_count += 1


@_accumulate_batch_thresholds.register_fake
def _(thr_sum_E, thr_count, scores_TE, capacity):
    return None


class CausalExpertChoiceRouter(_CapacityRouter):
    """Causal-safe expert choice (``router="causal_expert_choice"``): Expert Threshold (ET) routing
    (arXiv 2603.11535). ``ExpertThresholdRouter`` is a deprecated alias of this class.

    Each expert e keeps a threshold ``tau_e``: an exponential moving average of the score that expert choice
    with capacity ``C = capacity_factor * T * K / E`` would have needed in the batches seen so far (the C-th
    largest score of expert e over the batch). A token goes to every expert whose threshold its score
    reaches (``score >= tau_e``), at most ``max_experts_per_token`` of them (its best ones), with its score as
    weight. So the average load matches expert choice and balances without an aux loss, while the routing of
    token t depends only on token t's own hidden state (hence only on positions <= t of its own sequence) and on
    thresholds fixed before the forward: training and generation route alike.

    - Thresholds are buffers, saved in checkpoints; a forward in training mode only *accumulates* the batch
      thresholds; :meth:`update` (once per optimizer step) folds their mean into the EMA
      (``tau = decay * tau + (1 - decay) * mean``; the first update sets ``tau`` directly).
    - Before the first update there are no thresholds yet, so tokens use token-choice top-K (also causal).
    - A token may pass no threshold: it then gets no routed expert (residual and shared experts only).

    Args:
        dim (int): model dim D.
        num_experts (int): E.
        experts_per_token (int): K, average experts per token the thresholds aim at.
        capacity_factor (float): > 0, scales the target capacity.
        max_experts_per_token (Optional[int]): cap on experts a token can use, K..E (default min(E, 2K)).
        threshold_ema_decay (float): EMA decay in [0, 1).
        score_func (str): ``"softmax"`` or ``"sigmoid"``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        experts_per_token: int,
        *,
        capacity_factor: float = 1.0,
        max_experts_per_token: Optional[int] = None,
        threshold_ema_decay: float = 0.99,
        score_func: str = "softmax",
        gate_bias: bool = False,
    ):
        super().__init__(dim, num_experts, experts_per_token, capacity_factor, score_func, gate_bias)
        if max_experts_per_token is None:
            max_experts_per_token = min(num_experts, 2 * experts_per_token)
        if not experts_per_token <= max_experts_per_token <= num_experts:
            raise ValueError(
                f"max_experts_per_token must be between experts_per_token ({experts_per_token}) and "
                f"num_experts ({num_experts}), got {max_experts_per_token}"
            )
        if not 0.0 <= threshold_ema_decay < 1.0:
            raise ValueError(f"threshold_ema_decay must be in [0, 1), got {threshold_ema_decay}")
        self.max_experts_per_token = max_experts_per_token
        self.threshold_ema_decay = threshold_ema_decay
        self.register_buffer("thresholds", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("_thr_sum", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("_thr_count", torch.zeros((), dtype=torch.float32), persistent=False)

    def forward(self, x_TD: torch.Tensor, forced_experts_TK: Optional[torch.Tensor] = None) -> RouterOutput:
        """
        Args:
            x_TD (torch.Tensor): [T, D] tokens.

        Returns:
            RouterOutput: A = T*K_max slots; slots whose score is under the expert's threshold are dropped.
        """
        if forced_experts_TK is not None:
            raise ValueError("CausalExpertChoiceRouter cannot replay per-token routing (forced_experts_TK)")
        logits_TE, scores_TE, probs_TE = self.scores(x_TD)
        T, E = scores_TE.shape
        K, Kmax = self.experts_per_token, self.max_experts_per_token
        top_scores_TK, experts_TK = scores_TE.topk(Kmax, dim=-1)
        # >=: a threshold equal to the C-th largest score of a batch gives each expert C tokens of that batch.
        passes_TK = top_scores_TK.detach() >= self.thresholds[experts_TK]
        warm_TK = (torch.arange(Kmax, device=x_TD.device) < K).expand(T, Kmax)
        keep_TK = torch.where(self.num_updates > 0, passes_TK, warm_TK)
        expert_ids_TK = torch.where(keep_TK, experts_TK, E)
        weights_TK = top_scores_TK * keep_TK
        if self.training:
            _accumulate_batch_thresholds(self._thr_sum, self._thr_count, scores_TE.detach(), self.capacity(T))
        return RouterOutput(
            token_ids_A=torch.arange(T, device=x_TD.device).repeat_interleave(Kmax),
            expert_ids_A=expert_ids_TK.reshape(-1),
            weights_A=weights_TK.reshape(-1),
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            may_drop=True,
            slots_per_token=Kmax,
        )

    @torch.no_grad()
    def update(self, process_group: Optional[dist.ProcessGroup] = None) -> None:
        """Folds the batch thresholds seen since the last update (mean over micro-batches and ranks) into
        the EMA."""
        stats = self._all_reduce(torch.cat([self._thr_sum, self._thr_count.view(1)]), process_group)
        count = stats[-1]
        seen = count > 0  # written with torch.where, not `if`: no host-device sync
        mean_E = stats[:-1] / count.clamp(min=1.0)
        decay = torch.where(self.num_updates > 0, self.threshold_ema_decay, 0.0)
        decay = torch.where(seen, decay, 1.0)
        self.thresholds.mul_(decay).add_((1 - decay) * mean_E)
        self.num_updates += seen.long()
        self._thr_sum.zero_()
        self._thr_count.zero_()

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, experts_per_token={self.experts_per_token}, "
            f"max_experts_per_token={self.max_experts_per_token}, capacity_factor={self.capacity_factor}"
        )


# Deprecated alias (the class's earlier name): the same class, kept importable for code written against it.
ExpertThresholdRouter = CausalExpertChoiceRouter
