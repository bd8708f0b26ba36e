"""All routed experts of one MoE layer as stacked weights, run with torch's grouped GEMM."""

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from torch.distributed.tensor import DTensor

from torchtune_moe.modules import _kernels
from torchtune_moe.modules._cute_gemm import CUTE, bf16_gemm
from torchtune_moe.modules._grouped_gemm import (
    BF16, FP8_ALIGN, Fp8GroupedGemm, Fp8Rows, GroupedGemm, Rows, pad_offsets,
)
from torchtune_moe.modules.dispatch import dispatch_combine
from torchtune_moe.modules.routers import RouterOutput

# torch.nn.functional.grouped_mm needs every row stride to be a multiple of 16 bytes.
_ALIGN_ELEMENTS = 8


class ClampedSwiGLU:
    """GPT-OSS's expert activation, a GLU over the whole up-projection output with gate and up interleaved
    (columns ``0::2`` the gate, ``1::2`` the up projection, as the Hub's fused ``gate_up_proj`` stores them):

        g = clamp(gate, max=limit);  u = clamp(up, -limit, limit);  out = (u + 1) * g * sigmoid(alpha * g)

    :class:`MoELinear` calls it on ``[A, 2H]`` rows and gets ``[A, H]`` (any other activation ``act`` gives
    ``act(gate) * up`` with the gate in the first half).

    Args:
        alpha (float): sigmoid gain (config.json ``swiglu_alpha``, 1.702).
        limit (float): clamp (config.json ``swiglu_limit``, 7.0).
    """

    def __init__(self, alpha: float = 1.702, limit: float = 7.0):
        if not limit > 0:
            raise ValueError(f"swiglu limit must be > 0, got {limit}")
        self.alpha = alpha
        self.limit = limit

    def __call__(self, h_AF: torch.Tensor) -> torch.Tensor:
        """[A, 2H] interleaved gate/up -> [A, H]"""
        gate_AH = h_AF[..., 0::2].clamp(max=self.limit)
        up_AH = h_AF[..., 1::2].clamp(-self.limit, self.limit)
        return (up_AH + 1) * (gate_AH * torch.sigmoid(gate_AH * self.alpha))

    def __repr__(self) -> str:
        return f"ClampedSwiGLU(alpha={self.alpha}, limit={self.limit})"


def _glu(h_AF: torch.Tensor, act) -> torch.Tensor:
    """``act(gate) * up`` of ``[A, 2H]`` rows (gate first), or ``act(h_AF)`` for a :class:`ClampedSwiGLU`."""
    if isinstance(act, ClampedSwiGLU):
        return act(h_AF)
    gate_AH, up_AH = h_AF.chunk(2, dim=-1)
    return act(gate_AH) * up_AH


def _get_activation(activation: str | Callable[[torch.Tensor], torch.Tensor]):
    if callable(activation):
        return activation
    table = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}
    if activation not in table:
        raise ValueError(f"activation must be one of {sorted(table)} or a callable, got {activation!r}")
    return table[activation]


def _local(w: torch.Tensor) -> torch.Tensor:
    """This rank's experts of a weight: the local shard of a DTensor sharded by expert (expert parallelism; the
    gradient flows back as a DTensor), else the weight itself."""
    return w.to_local() if isinstance(w, DTensor) else w


class MoELinear(nn.Module):
    """The routed experts of one layer: E feed-forward networks held as stacked weights.

    Gated (SwiGLU by default): ``y = down(act(x @ gate^T) * (x @ up^T))``; ungated: ``y = down(act(x @ up^T))``;
    with ``bias``, ``y = down(act(x @ gate_up^T + gate_up_bias)) + down_bias`` (GPT-OSS; the routing weight
    scales the whole of ``y``, down bias included).

    Weights (``nn.Linear`` layout, out x in, per expert):
      - ``gate_up_proj``: [E, 2*H, D] when gated (rows [0:H] are the gate, [H:2H] the up projection),
        [E, H, D] when not.
      - ``down_proj``: [E, D, H].

    ``forward(x_TD, routing)`` is the whole routed path, through ``nn.Module.__call__`` (so FSDP2's hooks
    gather the weights): ``dispatcher`` orders the routing's assignments by expert, runs them through
    :meth:`routed` (both projections as one grouped GEMM each, ``torch.nn.functional.grouped_mm``: no Python
    loop over experts) and sums the results back per token. The dispatcher is swappable:
    :func:`~torchtune_moe.modules.dispatch.dispatch_combine` (local, the default) or
    :class:`~torchtune_moe.modules.expert_parallel.AllToAllDispatcher` (expert parallelism, installed by
    :func:`~torchtune_moe.modules.expert_parallel.apply_expert_parallel`, which also shards the weights by
    expert: each is then a DTensor, ``Shard(0)``, and this module computes with its local experts).

    Args:
        num_experts (int): E.
        dim (int): model dim D.
        hidden_dim (int): expert hidden dim H.
        activation (str | Callable): ``"silu"`` (default), ``"gelu"``, ``"gelu_tanh"``, ``"relu"``, a callable,
            or a :class:`ClampedSwiGLU` (GPT-OSS: gated only; ``gate_up_proj`` rows then interleave gate and up).
        gated (bool): gated (GLU) experts. Default True.
        bias (bool): per-expert biases ``gate_up_proj_bias`` [E, 2H] (or [E, H]) and ``down_proj_bias`` [E, D]
            (GPT-OSS; sharded by expert like the weights under expert parallelism). Default False.
        expert_fp8 (bool): run the grouped GEMMs of :meth:`routed` in rowwise-scaled float8 (torchao's recipe with
            one change); weights and activations stay in their dtype (bf16), only the GEMM operands are quantized,
            per step. Where quack's GEMMs serve the layer (Hopper, experts up to 4096 wide): the forward and
            input-gradient GEMMs through quack's fp8 GEMM, the weight gradients in bf16
            (:mod:`~torchtune_moe.modules._cute_fp8`); else all six through torch's fp8 grouped GEMM, each
            expert's rows padded to a multiple of 16 inside :meth:`routed`
            (:mod:`~torchtune_moe.modules._grouped_gemm`). Needs a CUDA GPU of compute capability 9.0+ (H100, H200)
            and ``dim``, ``hidden_dim`` multiples of 16. Default False.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        *,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "silu",
        gated: bool = True,
        bias: bool = False,
        expert_fp8: bool = False,
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim)):
            if value < 1 or value % _ALIGN_ELEMENTS:
                raise ValueError(
                    f"{name} must be a positive multiple of {_ALIGN_ELEMENTS} (grouped GEMM needs 16-byte "
                    f"aligned rows), got {value}"
                )
        if not isinstance(expert_fp8, bool):
            raise ValueError(f"expert_fp8 must be true or false, got {expert_fp8!r}")
        if expert_fp8:
            bad = {name: value for name, value in (("dim", dim), ("hidden_dim", hidden_dim)) if value % FP8_ALIGN}
            if bad:
                raise ValueError(
                    f"expert_fp8=True needs dim and hidden_dim multiples of {FP8_ALIGN} (fp8 grouped GEMM rows are "
                    f"16-byte aligned), got {bad}"
                )
        self.num_experts = num_experts
        self.expert_fp8 = expert_fp8
        # Tests only: run expert_fp8 on any device by quantizing as the GPU does and multiplying in fp32.
        self._fp8_emulate = False
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.gated = gated
        self.act = _get_activation(activation)
        if isinstance(self.act, ClampedSwiGLU) and not gated:
            raise ValueError("activation ClampedSwiGLU is a gated activation: it needs gated=True")
        in_rows = 2 * hidden_dim if gated else hidden_dim
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, in_rows, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, in_rows))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, dim))
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None
        # Called as dispatcher(x_TD, routing, self) -> (out_TD, tokens_per_expert_E); not a module (no state).
        self.dispatcher = dispatch_combine
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init as one nn.Linear per expert (kaiming uniform with a=sqrt(5)).
        for w, b in ((self.gate_up_proj, self.gate_up_proj_bias), (self.down_proj, self.down_proj_bias)):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def forward(self, x_TD: torch.Tensor, routing: RouterOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Dispatch, experts, combine (see the class doc).

        Args:
            x_TD (torch.Tensor): [T, D] tokens.
            routing (RouterOutput): A assignments of these tokens to the E experts.

        Returns:
            tuple: ``out_TD`` [T, D] (``sum_k w_k * expert_k(x)`` per token) and ``tokens_per_expert_E`` [E]
            int64, the rows this rank's tokens sent to each expert (dropped slots excluded).
        """
        return self.dispatcher(x_TD, routing, self)

    def grouped(self, x_AD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """The experts on rows already sorted by expert, with plain autograd (a reference; training uses the
        fused :meth:`routed`).

        Args:
            x_AD (torch.Tensor): [A, D] rows sorted by expert (A = routed assignments).
            offsets_E (torch.Tensor): [E] int32, cumulative row counts: expert e owns rows
                ``offsets_E[e-1]:offsets_E[e]``. Rows past ``offsets_E[-1]`` are not computed (their output is
                undefined: the caller masks them).

        Returns:
            torch.Tensor: [A, D]
        """
        h_AH = F.grouped_mm(x_AD, _local(self.gate_up_proj).transpose(-2, -1), offs=offsets_E)
        if self.gate_up_proj_bias is not None:
            expert_A = _kernels.row_experts(offsets_E, x_AD.shape[0])
            h_AH = h_AH + _local(self.gate_up_proj_bias)[expert_A]
        h_AH = _glu(h_AH, self.act) if self.gated else self.act(h_AH)
        y_AD = F.grouped_mm(h_AH, _local(self.down_proj).transpose(-2, -1), offs=offsets_E)
        if self.down_proj_bias is not None:
            y_AD = y_AD + _local(self.down_proj_bias)[expert_A]
        return y_AD

    def routed(
        self,
        x_TD: torch.Tensor,
        rows_A: torch.Tensor,
        weights_A: torch.Tensor,
        offsets_E: torch.Tensor,
        combine_TK: Optional[torch.Tensor] = None,
        may_drop: bool = False,
    ) -> torch.Tensor:
        """Gathers each routed row, runs it through its expert, scales it by its weight and sums it back into
        its token: ``out[t] = sum over rows a of token t of weights[a] * expert_a(x[t])``.

        One autograd node with fused memory-bound steps (see :class:`_RoutedExperts`); in training it keeps
        only the up-projection output (``[A, 2H]``) besides its inputs.

        Args:
            x_TD (torch.Tensor): [T, D] tokens.
            rows_A (torch.Tensor): [A] int64, token of each row, rows sorted by expert.
            weights_A (torch.Tensor): [A] routing weight of each row (fp32; differentiable).
            offsets_E (torch.Tensor): [E] int32 cumulative row counts per expert (see :meth:`grouped`; under expert
                parallelism E is this rank's experts). Rows
                past ``offsets_E[-1]`` are dropped slots.
            combine_TK (Optional[torch.Tensor]): [T, S] int64, row of the s-th slot of token t, when every
                token has S slots (token choice; causal expert choice, whose dropped slots point at or past
                ``offsets_E[-1]``): the combine is a gather-sum over S. None: any number of rows per token
                (grouped by token with one more sort, :func:`token_segments`, and summed per token).
            may_drop (bool): some rows, or some entries of ``combine_TK``, are at or past ``offsets_E[-1]``
                (they contribute nothing).

        Returns:
            torch.Tensor: [T, D] in ``x_TD``'s dtype.
        """
        index_J = offsets_T = None
        if combine_TK is None:
            index_J, offsets_T = token_segments(rows_A, offsets_E[-1:], x_TD.shape[0])
        if self.expert_fp8 and rows_A.shape[0] > 0:  # no rows (no tokens here): nothing to quantize or pad
            gemm = self._fp8_gemm(x_TD)
            if isinstance(gemm, Fp8GroupedGemm):  # torch's fp8 grouped GEMM: rows per expert a multiple of 16
                rows_A, weights_A, offsets_E, combine_TK, index_J = _pad_groups(
                    rows_A, weights_A, offsets_E, combine_TK, index_J
                )
        else:
            gemm = bf16_gemm(x_TD, rows_A.shape[0], self.hidden_dim)
        expert_A = gate_up_bias = None
        if self.gate_up_proj_bias is not None:
            # offsets_E counts this rank's experts (all E without expert parallelism): expert_A indexes the local
            # shard of the biases, cut by expert like the weights.
            expert_A = _kernels.row_experts(offsets_E, rows_A.shape[0])
            gate_up_bias = _local(self.gate_up_proj_bias)
        out_TD = _RoutedExperts.apply(
            x_TD, weights_A, _local(self.gate_up_proj), _local(self.down_proj), rows_A, offsets_E, combine_TK, index_J,
            offsets_T,
            may_drop, self.act, self.gated, gate_up_bias, expert_A, gemm,
        )
        return self._add_down_bias(out_TD, rows_A, weights_A, offsets_E, expert_A)

    def _fp8_gemm(self, x_TD: torch.Tensor) -> GroupedGemm:
        """The fp8 grouped GEMMs for this layer's tokens: quack's where its bf16 GEMMs serve the layer
        (:mod:`~torchtune_moe.modules._cute_fp8`), else torch's (torchao's recipe)."""
        if self._fp8_emulate:
            return _FP8_EMULATED
        if not x_TD.is_cuda:
            raise RuntimeError(
                f"expert_fp8=True runs the experts' GEMMs with torch._scaled_grouped_mm, on a CUDA GPU of compute "
                f"capability 9.0+ (H100, H200); got tokens on {x_TD.device} (allowed there: expert_fp8=False)"
            )
        if bf16_gemm(x_TD, 1, self.hidden_dim) is CUTE:  # quack's GEMMs serve this layer: its fp8 one too
            from torchtune_moe.modules._cute_fp8 import QUACK_FP8

            return QUACK_FP8
        return _FP8

    def _add_down_bias(
        self,
        out_TD: torch.Tensor,
        rows_A: torch.Tensor,
        weights_A: torch.Tensor,
        offsets_E: torch.Tensor,
        expert_A: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """``out_TD`` plus, per token t, the sum over its rows a of ``weights[a] * down_proj_bias[expert_a]``
        (as transformers' GPT-OSS: the routing weight scales the bias too); ``out_TD`` unchanged without biases.
        Plain autograd, one [A, D] product. Under expert parallelism the "tokens" are the received rows and
        ``down_proj_bias`` this rank's experts' shard, so each (token, expert) pair still gets its weighted bias."""
        if self.down_proj_bias is None:
            return out_TD
        valid_A = torch.arange(rows_A.shape[0], device=rows_A.device) < offsets_E[-1]
        w_A = torch.where(valid_A, weights_A.float(), 0.0)
        bias_AD = w_A.unsqueeze(-1) * _local(self.down_proj_bias)[expert_A].float()
        bias_TD = torch.zeros(out_TD.shape, dtype=torch.float32, device=out_TD.device)
        return out_TD + bias_TD.index_add(0, rows_A, bias_AD).to(out_TD.dtype)

    def extra_repr(self) -> str:
        bias = ", bias=True" if self.gate_up_proj_bias is not None else ""
        fp8 = ", expert_fp8=True" if self.expert_fp8 else ""
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, gated={self.gated}{bias}{fp8}"
        )


_FP8 = Fp8GroupedGemm()
_FP8_EMULATED = Fp8GroupedGemm(emulate=True)


def _pad_groups(
    rows_A: torch.Tensor,
    weights_A: torch.Tensor,
    offsets_E: torch.Tensor,
    combine_TK: Optional[torch.Tensor],
    index_J: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The routed rows with each expert's segment padded to a multiple of 16 rows, for the fp8 grouped GEMMs.

    P = ``A + 15 E`` rounded up to 16 rows (static: no host sync). Pad rows have token 0 and routing weight 0,
    so their activation output, gradients and contributions to every weight gradient are exactly 0; the last
    expert takes every row up to P (so no row holds an uncomputed value), the dropped slots of the input (rows
    at or past ``offsets_E[-1]``) among them with weight 0. ``combine_TK`` and ``index_J`` are remapped to the
    rows' new positions (dropped entries of ``combine_TK`` to P, which the combine skips): no combine reads a
    pad row.

    Returns:
        tuple: ``rows_P``, ``weights_P`` (differentiable in ``weights_A``), ``offsets_E`` (padded,
        ``offsets_E[-1] == P``), ``combine_TK`` and ``index_J`` (remapped; None stays None).
    """
    A, E = rows_A.shape[0], offsets_E.shape[0]
    P = -(-(A + (FP8_ALIGN - 1) * E) // FP8_ALIGN) * FP8_ALIGN
    padded_E, shift_G = pad_offsets(offsets_E, P)
    num_valid = offsets_E[-1]
    arange_A = torch.arange(A, device=rows_A.device)
    valid_A = arange_A < num_valid
    group_A = torch.searchsorted(offsets_E, arange_A.to(offsets_E.dtype), right=True)  # E: a dropped slot
    pos_A = arange_A + shift_G[group_A]
    rows_P = rows_A.new_zeros(P).scatter(0, pos_A, torch.where(valid_A, rows_A, 0))
    weights_P = weights_A.new_zeros(P).scatter(0, pos_A, torch.where(valid_A, weights_A, 0))
    if combine_TK is not None:
        combine_TK = torch.where(combine_TK < num_valid, pos_A[combine_TK.clamp(max=A - 1)], P)
    if index_J is not None:
        index_J = pos_A[index_J]
    return rows_P, weights_P, padded_E, combine_TK, index_J


def _bias_grad(
    grad_h_AF: torch.Tensor,
    expert_A: torch.Tensor,
    shape: torch.Size,
    dtype: torch.dtype,
    num_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient of a per-expert bias ``[E, F]`` added to rows ``h_AF`` [A, F]: each expert's rows summed (fp32).

    With ``num_valid`` (routings that drop slots), rows at or past it are left out: they are dropped slots, which
    the Triton SwiGLU backward does not write (their values are garbage there, zeros in the torch code)."""
    grad_A_F = grad_h_AF.float()
    if num_valid is not None:
        grad_A_F = torch.where(_kernels.valid_rows(grad_h_AF.shape[0], num_valid), grad_A_F, 0.0)
    grad_EF = torch.zeros(shape, dtype=torch.float32, device=grad_h_AF.device)
    return grad_EF.index_add_(0, expert_A, grad_A_F).to(dtype)


def _activate(
    h_AF: torch.Tensor, weights_A: torch.Tensor, num_valid: torch.Tensor, may_drop: bool, act, gated: bool
) -> torch.Tensor:
    """``act(gate) * up * w`` (or ``act(h) * w``) per row, in fp32, stored in ``h``'s dtype."""
    if gated and act is F.silu:
        return _kernels.swiglu_forward(h_AF, weights_A, num_valid, may_drop)
    h32_AF = h_AF.float()
    act_AH = _glu(h32_AF, act) if gated else act(h32_AF)
    hs_AH = (act_AH * weights_A.float().unsqueeze(-1)).to(h_AF.dtype)
    if may_drop:
        hs_AH = torch.where(_kernels.valid_rows(h_AF.shape[0], num_valid), hs_AH, 0)
    return hs_AH


def _activate_backward(
    h_AF: torch.Tensor,
    weights_A: torch.Tensor,
    grad_hs_AH: torch.Tensor,
    num_valid: torch.Tensor,
    may_drop: bool,
    act,
    gated: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_activate` w.r.t. ``h`` and ``weights``, and its output, recomputed."""
    if gated and act is F.silu:
        return _kernels.swiglu_backward(h_AF, weights_A, grad_hs_AH, num_valid, may_drop)
    # Any other activation: recompute under autograd (SwiGLU, the common case, has the fused kernel above).
    if may_drop:
        valid_A1 = _kernels.valid_rows(h_AF.shape[0], num_valid)
        h_AF = torch.where(valid_A1, h_AF, 0)
        grad_hs_AH = torch.where(valid_A1, grad_hs_AH, 0)
    with torch.enable_grad():
        h_AF = h_AF.detach().requires_grad_()
        w_A = weights_A.detach().float().requires_grad_()
        hs_AH = _activate(h_AF, w_A, num_valid, may_drop, act, gated)
        grad_h_AF, grad_w_A = torch.autograd.grad(hs_AH, (h_AF, w_A), grad_hs_AH)
    return grad_h_AF, grad_w_A, hs_AH.detach()


def token_segments(
    rows_A: torch.Tensor, num_valid: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of each token, for a combine with any number of rows per token (:func:`_kernels.segment_sum`).

    Args:
        rows_A (torch.Tensor): [A] int64, token of each row.
        num_valid (torch.Tensor): [1] rows at or past it are dropped slots and belong to no token.
        num_tokens (int): T.

    Returns:
        tuple: ``index_A`` [A] int64 (rows grouped by token, dropped rows last) and ``offsets_T`` [T] int32
        (cumulative rows per token). No host-device sync.
    """
    A = rows_A.shape[0]
    key_A = torch.where(torch.arange(A, device=rows_A.device) < num_valid, rows_A, num_tokens)
    index_A = torch.argsort(key_A, stable=True)
    counts_T = torch.zeros(num_tokens + 1, dtype=torch.long, device=rows_A.device)
    counts_T.scatter_add_(0, key_A, torch.ones_like(key_A))
    return index_A, counts_T[:num_tokens].cumsum(0).to(torch.int32)


def _combine(
    y_AD: torch.Tensor,
    combine_TK: Optional[torch.Tensor],
    index_J: Optional[torch.Tensor],
    offsets_T: Optional[torch.Tensor],
    num_valid: torch.Tensor,
    may_drop: bool,
    weights_A: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out[t] = sum of the rows of y that belong to token t`` (each times its ``weights_A`` when given; fp32
    accumulation), [A, D] -> [T, D]: a gather-sum over the S slots of ``combine_TK``, else over the segments
    ``(index_J, offsets_T)``."""
    if combine_TK is not None:
        return _kernels.gather_sum(y_AD, combine_TK, num_valid, may_drop, weights_A)
    return _kernels.segment_sum(y_AD, index_J, offsets_T, weights_A)


class _RoutedExperts(torch.autograd.Function):
    """Dispatch gather -> grouped GEMM -> activation x routing weight -> grouped GEMM -> combine, one node.

    Written by hand (instead of letting autograd record each op) to control what is kept for backward and
    how each step runs: the routing weight is folded into the activation (so no [A, D] product is kept,
    and its gradient comes out of the fused activation backward), the combine and the backward of the
    gather are gather-sums over each token's rows (no atomics, fp32 accumulation), the gathered input
    ``x_AD`` and the activation output are recomputed in backward rather than stored. Saved: ``x_TD`` (the caller holds it anyway),
    ``h_AF`` [A, 2H], and the index tensors. The grouped GEMMs are torch's; their backward is spelled out
    exactly as autograd's (``grouped_mm(a.t(), b, offs)`` for weight gradients). With ``gate_up_bias`` [E, 2H]
    (GPT-OSS), ``expert_A`` gives each row's expert: the bias is added to ``h_AF`` and its gradient is the sum of
    ``grad_h_AF`` over each expert's rows (dropped rows have zero gradient). ``gemm`` runs the six grouped GEMMs
    (:data:`~torchtune_moe.modules._grouped_gemm.BF16`, torch's ``F.grouped_mm``; quack's on Hopper,
    :mod:`~torchtune_moe.modules._cute_gemm`; or fp8). The gathered operands reach it as
    :class:`~torchtune_moe.modules._grouped_gemm.Rows`: quack's GEMMs gather them as they load, the others
    gather them first (once each).

    With a ``gemm`` that ``fuses_swiglu`` (quack's), SiLU experts without biases run SwiGLU in the GEMMs'
    epilogues instead (:meth:`~torchtune_moe.modules._grouped_gemm.GroupedGemm.swiglu_forward` and
    ``swiglu_backward``): the activation ``a`` is not weighted, the combine weights each row's output instead
    (``sum_k w_k * (a_k @ down^T)``, the same value), the down projection's input gradient comes out of its GEMM
    already through SwiGLU's backward, with the routing weights' gradient ``sum(a * d)`` reduced in the same
    epilogue, and ``h_AF`` holds gate and up interleaved. No separate SwiGLU pass in either direction.
    """

    @staticmethod
    def forward(
        ctx, x_TD, weights_A, gate_up_proj, down_proj, rows_A, offsets_E, combine_TK, index_J, offsets_T, may_drop,
        act, gated, gate_up_bias=None, expert_A=None, gemm: GroupedGemm = BF16,
    ):
        num_valid = offsets_E[-1:]
        seg_E, index_A = gemm.prepare(offsets_E, rows_A)  # in the GEMMs' form, once; kept for the backward
        x_AD = Rows(x_TD, index_A, num_valid, may_drop)
        fused = gemm.fuses_swiglu and gated and act is F.silu and gate_up_bias is None
        quantized = gemm.quantizes_swiglu and gated and act is F.silu
        if fused:  # SwiGLU in the epilogue; the routing weight in the combine
            h_AF, a_AH = gemm.swiglu_forward(x_AD, gate_up_proj, seg_E)
            y_AD, down_state = gemm.forward(a_AH, down_proj, seg_E)
            out_TD = _combine(y_AD, combine_TK, index_J, offsets_T, num_valid, may_drop, weights_A)
            gate_up_state = None
        else:
            h_AF, gate_up_state = gemm.forward(x_AD, gate_up_proj, seg_E)
            if gate_up_bias is not None:
                h_AF = h_AF + gate_up_bias[expert_A]
            if quantized:  # SwiGLU's output straight to fp8 (no bf16 copy)
                hs_AH = Fp8Rows(*_kernels.swiglu_forward_fp8(h_AF, weights_A, num_valid, may_drop))
            else:
                hs_AH = _activate(h_AF, weights_A, num_valid, may_drop, act, gated)
            y_AD, down_state = gemm.forward(hs_AH, down_proj, seg_E)
            out_TD = _combine(y_AD, combine_TK, index_J, offsets_T, num_valid, may_drop)
        ctx.save_for_backward(
            x_TD, weights_A, gate_up_proj, down_proj, index_A, offsets_E, seg_E, combine_TK, index_J, offsets_T, h_AF,
            expert_A, gate_up_state, down_state,
        )
        ctx.may_drop, ctx.act, ctx.gated, ctx.gemm, ctx.fused, ctx.quantized = may_drop, act, gated, gemm, fused, quantized
        ctx.bias_shape = None if gate_up_bias is None else (gate_up_bias.shape, gate_up_bias.dtype)
        return out_TD

    @staticmethod
    def backward(ctx, grad_out_TD):
        (
            x_TD, weights_A, gate_up_proj, down_proj, index_A, offsets_E, seg_E, combine_TK, index_J, offsets_T, h_AF,
            expert_A, gate_up_state, down_state,
        ) = ctx.saved_tensors
        need_x, need_w, need_gate_up, need_down = ctx.needs_input_grad[:4]
        num_valid = offsets_E[-1:]
        grad_y_AD = Rows(grad_out_TD, index_A, num_valid, ctx.may_drop)  # gathered at most once, by the GEMMs
        gemm = ctx.gemm
        if ctx.fused:
            grad_h_AF, hs_AH, grad_w_A = gemm.swiglu_backward(grad_y_AD, down_proj, h_AF, weights_A, seg_E)
            if ctx.may_drop:  # dropped rows: no gradient (the epilogue's sums there are unspecified)
                grad_w_A = torch.where(_kernels.valid_rows(h_AF.shape[0], num_valid).squeeze(-1), grad_w_A, 0.0)
        else:
            grad_hs_AH = gemm.input_grad(grad_y_AD, down_proj, seg_E, down_state)
            if ctx.quantized:  # grad_h also straight to fp8, for the up projection's input gradient
                mul_EF, row_expert_A = gemm.grad_rows_mul(gate_up_state, seg_E, h_AF.shape[0])
                grad_h_AF, grad_w_A, hs_AH, q_AF, scale_A1 = _kernels.swiglu_backward_fp8(
                    h_AF, weights_A, grad_hs_AH, num_valid, ctx.may_drop, mul_EF, row_expert_A
                )
                grad_h_rows = Fp8Rows(q_AF, scale_A1)
            else:
                grad_h_AF, grad_w_A, hs_AH = _activate_backward(
                    h_AF, weights_A, grad_hs_AH, num_valid, ctx.may_drop, ctx.act, ctx.gated
                )
                grad_h_rows = grad_h_AF
            del grad_hs_AH
        grad_down = gemm.weight_grad(grad_y_AD, hs_AH, seg_E) if need_down else None
        del grad_y_AD, hs_AH
        grad_x_TD = grad_gate_up = None
        if need_x:
            if ctx.fused:
                grad_x_AD = gemm.swiglu_input_grad(grad_h_AF, gate_up_proj, seg_E)
            else:
                grad_x_AD = gemm.input_grad(grad_h_rows, gate_up_proj, seg_E, gate_up_state)
            grad_x_TD = _combine(grad_x_AD, combine_TK, index_J, offsets_T, num_valid, ctx.may_drop)
            del grad_x_AD
        if need_gate_up:
            x_AD = Rows(x_TD, index_A, num_valid, ctx.may_drop)
            weight_grad = gemm.swiglu_weight_grad if ctx.fused else gemm.weight_grad
            grad_gate_up = weight_grad(grad_h_AF, x_AD, seg_E)
        grad_w_A = grad_w_A.to(weights_A.dtype) if need_w else None
        grad_bias = None
        if ctx.bias_shape is not None and ctx.needs_input_grad[12]:
            grad_bias = _bias_grad(grad_h_AF, expert_A, *ctx.bias_shape, num_valid if ctx.may_drop else None)
        return (
            grad_x_TD, grad_w_A, grad_gate_up, grad_down, None, None, None, None, None, None, None, None, grad_bias, None,
            None,
        )
