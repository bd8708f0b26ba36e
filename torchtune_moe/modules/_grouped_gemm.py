"""The three grouped GEMMs of the routed experts, behind one seam: bf16 (torch's ``F.grouped_mm``) or rowwise fp8.

Every grouped GEMM of :class:`~torchtune_moe.modules.moe_linear._RoutedExperts` is one of three operations on
rows sorted by expert (``offsets_E`` [E] int32, cumulative rows per expert; rows past ``offsets_E[-1]`` are not
computed). A row operand may be a :class:`Rows`, a dispatch gather not yet made: a GEMM that gathers as it loads
(:mod:`~torchtune_moe.modules._cute_gemm`) reads the source rows directly, the others call :meth:`Rows.gather`.

- :meth:`~GroupedGemm.forward`: ``a_AK @ w_ENK^T`` per expert -> [A, N] (the two projections);
- :meth:`~GroupedGemm.input_grad`: ``g_AN @ w_ENK`` per expert -> [A, K] (gradients of their inputs);
- :meth:`~GroupedGemm.weight_grad`: ``g_AN^T @ a_AK`` over each expert's rows -> [E, N, K] (weight gradients).

:data:`BF16` is the plain path, the exact ``F.grouped_mm`` calls autograd would make. :class:`Fp8GroupedGemm`
is torchao's rowwise float8 recipe (``torchao.prototype.moe_training.scaled_grouped_mm._Float8GroupedMM``, which
is a whole autograd function of one GEMM: we need its three GEMMs separately inside our fused node, so this
module computes what its pieces — ``tensor_to_scale``, ``to_fp8_saturated`` and its two Triton quantization
kernels — compute, the same scales and fp8 values; where they make extra passes over memory or need a transpose
copy, a kernel of ours stands in, as listed):

- e4m3, power-of-2 scales; left operand row-major with one scale per row, right operand column-major with one
  scale per column; ``torch._scaled_grouped_mm(..., use_fast_accum=True)``, output bf16;
- weight gradients: both operands scaled per column within each expert's rows (the values of torchao's
  ``triton_fp8_per_group_colwise_scales``, which wants column-major inputs; our kernel
  :func:`~torchtune_moe.modules._kernels.per_group_colwise_fp8` reads the row-major ones without a transpose
  copy);
- the input gradient ``g @ w[e]``, the one place we depart from torchao's recipe: w enters as the forward quantized
  it (one scale per row n, the axis this GEMM sums over), written column-major in one pass
  (:func:`~torchtune_moe.modules._kernels.scaled_transpose_fp8`), and the row scales move onto g's columns as exact
  powers of 2 before g's row quantization (:func:`~torchtune_moe.modules._kernels.rowwise_fp8` with a factor).
  torchao's ``triton_fp8_rowwise_3d_transpose_rhs`` scales w per column k instead, which needs two reads of w each
  backward (1.8 of the 22 ms of Mixtral's fp8 layer; ours 1.05 ms; benchmarks/NOTES.md). Measured: the layer's
  largest error against fp32 and a 336-step training loss unchanged;
- activation rows, and the forward's ``w^T`` (column-major with one scale per output column: the rows of ``w``
  as they lie, scaled per row): one pass of our Triton kernel (:func:`~torchtune_moe.modules._kernels.rowwise_fp8`),
  the values of torchao's ``tensor_to_scale`` + ``to_fp8_saturated`` (and of
  ``triton_fp8_rowwise_3d_transpose_rhs(w)``, which reads ``w`` twice).

It needs every expert's row count to be a multiple of 16 (:func:`pad_offsets`; ``MoELinear.routed`` pads).
``Fp8GroupedGemm(emulate=True)`` quantizes exactly as the GPU path (the same scales and fp8 values: torch code
for the two Triton kernels, see :func:`per_group_colwise_fp8` and :func:`transpose_rhs_fp8`), dequantizes and
multiplies with ``F.grouped_mm`` in fp32: it runs on CPU, for tests.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torchao.float8.config import ScalingGranularity
from torchao.float8.float8_utils import amax_to_scale, tensor_to_scale, to_fp8_saturated

from torchtune_moe.modules import _kernels

__all__ = ["GroupedGemm", "BF16", "Fp8GroupedGemm", "FP8_ALIGN", "Rows", "pad_offsets"]

#: Rows per expert must be a multiple of this for the fp8 grouped GEMMs (as torchtitan pads token groups).
FP8_ALIGN = 16
_FP8 = torch.float8_e4m3fn


class Rows:
    """The rows ``src_TK[index_A]`` [A, K] of a dispatch gather, made only if a GEMM asks (:meth:`gather`, once).

    Args:
        src_TK (torch.Tensor): [T, K] source rows (tokens, or their gradients).
        index_A (torch.Tensor): [A] source row of each routed row, as the GEMMs take it
            (:meth:`GroupedGemm.prepare`: int64, or int32 for quack's).
        num_valid (torch.Tensor): [1] int32; rows at or past it are dropped slots (read only with ``may_drop``).
        may_drop (bool): some rows are dropped slots (their values are unspecified once gathered).
        gathered_AK (Optional[torch.Tensor]): [A, K] the gathered rows when the caller already has them (a kernel
            that gathers and projects in one pass), returned by :meth:`gather`.
    """

    def __init__(
        self, src_TK: torch.Tensor, index_A: torch.Tensor, num_valid: torch.Tensor, may_drop: bool,
        gathered_AK: Optional[torch.Tensor] = None,
    ):
        self.src_TK, self.index_A, self.num_valid, self.may_drop = src_TK, index_A, num_valid, may_drop
        self._gathered: Optional[torch.Tensor] = gathered_AK

    def gather(self) -> torch.Tensor:
        """[A, K]: the gathered rows (:func:`~torchtune_moe.modules._kernels.gather_rows`), made on the first call."""
        if self._gathered is None:
            self._gathered = _kernels.gather_rows(self.src_TK, self.index_A, self.num_valid, self.may_drop)
        return self._gathered


@dataclass
class Fp8Rows:
    """A row operand already quantized for an fp8 GEMM by the kernel that made it (torchao's rowwise scales): ``q_AK``
    [A, K] float8_e4m3fn and ``scale_A1`` [A, 1] fp32, ``q = rows * scale`` saturated. Only GEMMs with
    ``quantizes_swiglu`` take it (:class:`~torchtune_moe.modules._cute_fp8.QuackFp8GroupedGemm`)."""

    q_AK: torch.Tensor
    scale_A1: torch.Tensor


def gathered(a: "torch.Tensor | Rows") -> torch.Tensor:
    """``a`` itself, or the rows a :class:`Rows` stands for."""
    return a.gather() if isinstance(a, Rows) else a


class GroupedGemm:
    """bf16 (any dtype): torch's grouped GEMM, exactly as autograd runs it."""

    #: Whether :class:`Rows` operands are read by index inside the GEMMs' loads (quack's) rather than gathered
    #: first: a caller that could produce the gathered copy for free need not.
    loads_rows: bool = False

    @staticmethod
    def prepare(offsets_E: torch.Tensor, rows_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert segments and the routed rows' source index as this class's GEMMs take them, made once per
        step (the forward keeps them for the backward): ``offsets_E`` [E] int32 cumulative row ends and ``rows_A``
        [A] int64 as they are (quack's GEMMs take [E + 1] bounds from 0 and an int32 index)."""
        return offsets_E, rows_A

    @staticmethod
    def forward(a_AK: "torch.Tensor | Rows", w_ENK: torch.Tensor, offsets_E: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``a_AK @ w_ENK[e]^T`` for each expert's rows: [A, K], [E, N, K] -> [A, N]; and what :meth:`input_grad`
        takes from the forward (nothing here; the fp8 GEMMs' weight scales)."""
        return F.grouped_mm(gathered(a_AK), w_ENK.transpose(-2, -1), offs=offsets_E), None

    @staticmethod
    def input_grad(
        g_AN: "torch.Tensor | Rows", w_ENK: torch.Tensor, offsets_E: torch.Tensor, w_state=None
    ) -> torch.Tensor:
        """``g_AN @ w_ENK[e]`` for each expert's rows: [A, N], [E, N, K] -> [A, K] (``w_state``: the forward's
        second output)."""
        return F.grouped_mm(gathered(g_AN), w_ENK, offs=offsets_E)

    @staticmethod
    def weight_grad(
        g_AN: "torch.Tensor | Rows", a_AK: "torch.Tensor | Rows", offsets_E: torch.Tensor
    ) -> torch.Tensor:
        """``g_AN[rows of e]^T @ a_AK[rows of e]`` for each expert: [A, N], [A, K] -> [E, N, K]."""
        return F.grouped_mm(gathered(g_AN).t(), gathered(a_AK), offs=offsets_E)

    # SwiGLU in the GEMMs' epilogues. A class with ``fuses_swiglu`` (quack's) runs the up projection with SwiGLU
    # applied as its output tiles are stored, and the down projection's input gradient with SwiGLU's backward
    # applied the same way; the routed experts then call the four methods below in place of the up projection's
    # GEMMs and the separate SwiGLU kernels, and the routing weight moves from the activation into the combine.
    # The epilogues pair neighbouring columns, so the up projection's output ``h`` [A, 2H] and its gradient hold
    # gate and up interleaved (columns 0::2 the gate, 1::2 the up projection); the weights keep their [gate; up]
    # rows. The torch code here defines what each computes (CPU tests run the routed experts through it).

    #: Whether the routed experts hand this class SwiGLU's output (the down projection's input) and the up
    #: projection's output gradient as :class:`Fp8Rows`, quantized by the SwiGLU kernels as they compute them
    #: (:func:`~torchtune_moe.modules._kernels.swiglu_forward_fp8`, ``swiglu_backward_fp8`` with the factors of
    #: :meth:`grad_rows_mul`), so that no bf16 copy is written and read back to be quantized.
    quantizes_swiglu: bool = False

    #: Whether the routed experts use the four methods below (torch's GEMMs do not: the separate SwiGLU kernels
    #: cost no more than this code's extra passes).
    fuses_swiglu: bool = False

    @staticmethod
    def swiglu_forward(
        x_AD: "torch.Tensor | Rows", w_EFD: torch.Tensor, offsets_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The up projection and SwiGLU: ``h = x_AD @ w_EFD[e]^T`` per expert ([A, D], [E, 2H, D] with rows
        [gate; up]) and ``silu(gate) * up`` [A, H] in fp32, stored in x's dtype. Returns ``h_AF`` [A, 2H] with gate
        and up interleaved, and the activation."""
        h_AF = F.grouped_mm(gathered(x_AD), _interleave(w_EFD, 1).transpose(-2, -1), offs=offsets_E)
        h32_AF = h_AF.float()
        return h_AF, (F.silu(h32_AF[:, 0::2]) * h32_AF[:, 1::2]).to(h_AF.dtype)

    @staticmethod
    def swiglu_backward(
        g_AD: "torch.Tensor | Rows", w_EDH: torch.Tensor, h_AF: torch.Tensor, weights_A: torch.Tensor,
        offsets_E: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The down projection's input gradient and SwiGLU's backward, for ``y = w * (silu(gate) * up) @ w_EDH[e]^T``
        per row (w the routing weight), given the unweighted output gradient ``g_AD`` [A, D], ``w_EDH``
        [E, D, H], :meth:`swiglu_forward`'s ``h_AF`` and ``weights_A`` [A] (fp32). With ``d = g @ w_EDH[e]`` [A, H]
        and ``a = silu(gate) * up`` (fp32): returns the gradient of ``h`` (``w * d`` through SwiGLU, [A, 2H]
        interleaved as ``h_AF``), ``w * a`` [A, H] (the down projection's input, for its weight gradient) and
        ``sum(a * d)`` per row [A] fp32 (the routing weight's gradient). Rows past ``offsets_E[-1]`` are
        unspecified."""
        d_AH = F.grouped_mm(gathered(g_AD), w_EDH, offs=offsets_E)
        # SwiGLU x weight's backward as the separate kernels compute it, on h with its halves put back together
        grad_h_AF, grad_w_A, hs_AH = _kernels.swiglu_backward(_deinterleave(h_AF, 1), weights_A, d_AH, offsets_E[-1:])
        return _interleave(grad_h_AF, 1), hs_AH, grad_w_A

    @staticmethod
    def swiglu_input_grad(grad_h_AF: torch.Tensor, w_EFD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """``grad_h_AF @ w_EFD[e]`` per expert, the gradient interleaved as :meth:`swiglu_forward`'s ``h``: [A, 2H],
        [E, 2H, D] -> [A, D]."""
        return F.grouped_mm(grad_h_AF, _interleave(w_EFD, 1), offs=offsets_E)

    @staticmethod
    def swiglu_weight_grad(
        grad_h_AF: torch.Tensor, x_AD: "torch.Tensor | Rows", offsets_E: torch.Tensor
    ) -> torch.Tensor:
        """The up projection's weight gradient ``grad_h^T @ x`` over each expert's rows, the gradient interleaved as
        :meth:`swiglu_forward`'s ``h``: [A, 2H], [A, D] -> [E, 2H, D] with rows [gate; up]."""
        return _deinterleave(F.grouped_mm(grad_h_AF.t(), gathered(x_AD), offs=offsets_E), 1)


def _interleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Halves [gate; up] along ``dim`` -> gate_0, up_0, gate_1, up_1, ... (a copy)."""
    return t.unflatten(dim, (2, -1)).transpose(dim, dim + 1).flatten(dim, dim + 1)


def _deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of :func:`_interleave`: gate_0, up_0, ... along ``dim`` -> halves [gate; up] (a copy)."""
    return t.unflatten(dim, (-1, 2)).transpose(dim, dim + 1).flatten(dim, dim + 1)


BF16 = GroupedGemm()


# The quantizers: torchao's functions. torchao.float8 is plain torch; its two Triton kernels (the GPU path only)
# are imported where used, so that CPU installs without Triton import this module.


def rowwise_fp8(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 ``t`` with one power-of-2 scale per slice along ``dim`` (the amax is taken over ``dim``), as torchao's
    ``_Float8GroupedMM``: returns ``(t * scale saturated to e4m3, scale)``, the scale keeping ``dim`` as size 1.
    The fp8 tensor keeps ``t``'s strides (a column-major input stays column-major). Rows of a 2-D CUDA tensor
    (``dim=-1``, the activations) go through one Triton kernel (:func:`_kernels.rowwise_fp8`), the same values."""
    if dim == -1 and t.dim() == 2 and _kernels.use_triton(t):
        return _kernels.rowwise_fp8(t)
    return rowwise_fp8_torch(t, dim)


def rowwise_fp8_torch(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rowwise_fp8` in torch code: torchao's functions."""
    scale = tensor_to_scale(
        t, _FP8, scaling_granularity=ScalingGranularity.AXISWISE, axiswise_dim=dim, round_scales_to_power_of_2=True
    )
    return to_fp8_saturated(t.to(torch.float32) * scale, _FP8), scale


def per_group_colwise_fp8(t_AN: torch.Tensor, offsets_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch code for torchao's ``triton_fp8_per_group_colwise_scales`` and our
    :func:`~torchtune_moe.modules._kernels.per_group_colwise_fp8` (same scales and fp8 values): each column of each
    expert's rows scaled by its own power-of-2 scale.

    Returns:
        tuple: fp8 [A, N] (row-major here; the kernel returns it column-major), scales [E * N] fp32 (expert-major,
        as the kernel's). Rows past ``offsets_E[-1]`` hold unspecified values.
    """
    E, (A, N) = offsets_E.shape[0], t_AN.shape
    expert_A = _kernels.row_experts(offsets_E, A)
    abs_AN = torch.where(_kernels.valid_rows(A, offsets_E[-1:]), t_AN.abs(), 0)
    amax_EN = abs_AN.new_zeros(E, N).scatter_reduce_(0, expert_A.unsqueeze(-1).expand(A, N), abs_AN, "amax")
    scales_EN = amax_to_scale(amax_EN, _FP8, round_scales_to_power_of_2=True)
    return to_fp8_saturated(t_AN.to(torch.float32) * scales_EN[expert_A], _FP8), scales_EN.flatten()


def transpose_rhs_fp8(hp_EKN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch code for torchao's ``triton_fp8_rowwise_3d_transpose_rhs(hp_EKN)`` (same scales and fp8 values): the
    transpose ``hp^T`` [E, N, K] in fp8 with one power-of-2 scale per (expert, k), the amax over N. Returns (fp8,
    scales [E, K]). Both GEMMs with a weight as right operand take it this way: ``hp = w_ENK`` gives the
    forward's ``w^T`` [E, K, N] scaled per output column n; ``hp = w_ENK^T`` the input gradient's ``w``."""
    q_ENK, scale_E1K = rowwise_fp8_torch(hp_EKN.transpose(-2, -1), dim=-2)
    return q_ENK, scale_E1K.squeeze(1)


def pad_offsets(offsets_E: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's rows rounded up to a multiple of :data:`FP8_ALIGN`, the last expert taking every row up to
    ``num_rows`` (a multiple of it, at least ``offsets_E[-1] + (FP8_ALIGN - 1) * E``). No host sync.

    Returns:
        tuple: ``padded_E`` [E] int32 cumulative padded rows (``padded_E[-1] == num_rows``) and ``shift_G`` [E + 1]
        int64: how far the rows of expert e move (its padded start minus its start), and last, how far the rows
        past ``offsets_E[-1]`` (dropped slots) move (the padded total minus ``offsets_E[-1]``).
    """
    counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).long()
    padded_counts_E = (counts_E + FP8_ALIGN - 1) // FP8_ALIGN * FP8_ALIGN
    padded_end_E = padded_counts_E.cumsum(0)
    shift_E = (padded_end_E - padded_counts_E) - (offsets_E.long() - counts_E)
    shift_G = torch.cat([shift_E, padded_end_E[-1:] - offsets_E[-1:].long()])
    padded_E = torch.cat([padded_end_E[:-1], padded_end_E.new_full((1,), num_rows)]).to(torch.int32)
    return padded_E, shift_G


@dataclass(frozen=True)
class Fp8GroupedGemm:
    """Rowwise-scaled float8 (e4m3) grouped GEMMs, torchao's recipe but for the input gradient's weight (see the
    module doc). Inputs bf16 (or fp32), outputs in the input's dtype (computed as bf16 on the GPU). Every expert's
    row count must be a multiple of :data:`FP8_ALIGN`; ``K`` and ``N`` multiples of 16.

    Args:
        emulate (bool): quantize as the GPU path, then dequantize and multiply in fp32 with ``F.grouped_mm``
            (any device; for tests). False: ``torch._scaled_grouped_mm`` (CUDA, compute capability 9.0+).
    """

    emulate: bool = False

    prepare = staticmethod(GroupedGemm.prepare)
    loads_rows = fuses_swiglu = quantizes_swiglu = False

    def forward(
        self, a_AK: torch.Tensor, w_ENK: torch.Tensor, offsets_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``a_AK @ w_ENK[e]^T`` per expert, in fp8: a per row, w per output row n. Returns the product and the
        weight's row scales [E, N] (fp32), which :meth:`input_grad` takes to quantize the weight again in one pass."""
        a_AK = gathered(a_AK)
        a8_AK, a_scale_A1 = rowwise_fp8(a_AK, dim=-1)
        if self.emulate:
            w8_EKN, w_scale_EN = transpose_rhs_fp8(w_ENK)
            a_AK32 = a8_AK.float() / a_scale_A1
            w_EKN32 = w8_EKN.float() / w_scale_EN.unsqueeze(1)
            return F.grouped_mm(a_AK32, w_EKN32, offs=offsets_E).to(a_AK.dtype), w_scale_EN
        # torchao's _Float8GroupedMM quantizes the forward's weight with tensor_to_scale (several passes in eager).
        # w^T column-major with one scale per n is w's own layout scaled per row: the rows of w [E * N, K] through
        # our one-pass kernel, the values of triton_fp8_rowwise_3d_transpose_rhs(w_ENK) without its second read.
        E, N, K = w_ENK.shape
        w8_NK, w_scale_N1 = _kernels.rowwise_fp8(w_ENK.reshape(E * N, K))
        w8_EKN, w_scale_EN = w8_NK.view(E, N, K).transpose(-2, -1), w_scale_N1.view(E, N)
        out = torch._scaled_grouped_mm(
            a8_AK, w8_EKN, a_scale_A1.squeeze(-1).reciprocal(), w_scale_EN.reciprocal(), offsets_E,
            out_dtype=torch.bfloat16, use_fast_accum=True,
        )
        return out.to(a_AK.dtype), w_scale_EN

    def input_grad(
        self,
        g_AN: torch.Tensor,
        w_ENK: torch.Tensor,
        offsets_E: torch.Tensor,
        w_scale_EN: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``g_AN @ w_ENK[e]`` per expert, in fp8, reusing the forward's quantization of w (``w_scale_EN``, its row
        scales; computed here when None): ``sum_n g[a, n] w[n, k] = sum_n (g[a, n] / s[n]) (w[n, k] s[n])``.

        The weight is the forward's fp8 ``w * s`` (scaled per row n, the reduction axis here), written column-major
        in one pass; the factor ``1 / s[e, n]`` moves to g, exactly (powers of 2), normalized by the expert's
        smallest scale ``m[e]`` so that it is at most 1: g's rows are quantized as ``g[a] * m[e] / s[e]`` (one
        scale per row), and ``1 / m[e]`` is the right operand's scale. torchao's recipe instead quantizes w per
        column k (amax over n), which takes two reads of w each backward (1.8 ms at Mixtral's two weights; 1.05 ms
        this way, benchmarks/NOTES.md)."""
        g_AN = gathered(g_AN)
        E, N, K = w_ENK.shape
        if w_scale_EN is None and self.emulate:
            w_scale_EN = transpose_rhs_fp8(w_ENK)[1]
        elif w_scale_EN is None:
            w_scale_EN = _kernels.rowwise_fp8(w_ENK.reshape(E * N, K))[1].view(E, N)
        m_E = w_scale_EN.amin(dim=-1)
        mul_EN = m_E.unsqueeze(-1) / w_scale_EN  # powers of 2, <= 1
        expert_A = _kernels.row_experts(offsets_E, g_AN.shape[0])
        if self.emulate:
            u8_AN, u_scale_A1 = rowwise_fp8_torch(g_AN.float() * mul_EN[expert_A], dim=-1)
            w8_ENK = to_fp8_saturated(w_ENK.float() * w_scale_EN.unsqueeze(-1), _FP8)
            u_AN32 = u8_AN.float() / u_scale_A1
            w_ENK32 = w8_ENK.float() / m_E.view(E, 1, 1)
            return F.grouped_mm(u_AN32, w_ENK32, offs=offsets_E).to(g_AN.dtype)
        u8_AN, u_scale_A1 = _kernels.rowwise_fp8(g_AN, mul_EN.to(torch.bfloat16), expert_A)  # bf16: exact for 2^k
        w8_ENK = _kernels.scaled_transpose_fp8(w_ENK, w_scale_EN)
        out = torch._scaled_grouped_mm(
            u8_AN, w8_ENK, u_scale_A1.squeeze(-1).reciprocal(),
            m_E.reciprocal().unsqueeze(-1).expand(E, K).contiguous(), offsets_E, out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )
        return out.to(g_AN.dtype)

    def weight_grad(self, g_AN: torch.Tensor, a_AK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """``g_AN^T @ a_AK`` over each expert's rows, in fp8: both scaled per column within each expert."""
        g_AN, a_AK = gathered(g_AN), gathered(a_AK)
        if self.emulate:
            E = offsets_E.shape[0]
            expert_A = _kernels.row_experts(offsets_E, g_AN.shape[0])
            g8_AN, g_scale_EN = per_group_colwise_fp8(g_AN, offsets_E)
            a8_AK, a_scale_EK = per_group_colwise_fp8(a_AK, offsets_E)
            g_AN32 = g8_AN.float() / g_scale_EN.view(E, -1)[expert_A]
            a_AK32 = a8_AK.float() / a_scale_EK.view(E, -1)[expert_A]
            return F.grouped_mm(g_AN32.t(), a_AK32, offs=offsets_E).to(g_AN.dtype)
        # torchao's triton_fp8_per_group_colwise_scales wants column-major inputs: on our row-major ones it needs a
        # bf16 transpose copy, which cost more than its kernel. Ours reads the rows as they are (the same values).
        g8_AN, g_scale_EN = _kernels.per_group_colwise_fp8(g_AN, offsets_E)
        a8_AK, a_scale_EK = _kernels.per_group_colwise_fp8(a_AK, offsets_E)
        out = torch._scaled_grouped_mm(
            g8_AN.t(), a8_AK, g_scale_EN.reciprocal(), a_scale_EK.reciprocal(), offsets_E,
            out_dtype=torch.bfloat16, use_fast_accum=True,
        )
        return out.to(g_AN.dtype)
