"""``expert_fp8`` through quack's fp8 GEMM (:class:`QuackFp8GroupedGemm`): the forward and input-gradient GEMMs in
rowwise-scaled fp8, their left operand's rows gathered as the GEMM loads them and the scales multiplied in its
epilogue (:mod:`~torchtune_moe.modules._cute_fp8_kernels`), the weight gradients in quack's bf16 GEMM.

``MoELinear._fp8_gemm`` picks it where the layer's bf16 GEMMs are quack's (:func:`~torchtune_moe.modules.
_cute_gemm.bf16_gemm`'s rule: quack imports, a compute-capability 9.x GPU, ``TORCHTUNE_MOE_GROUPED_GEMM`` not
``torch``, experts up to 4096 wide); elsewhere torch's fp8 grouped GEMMs
(:class:`~torchtune_moe.modules._grouped_gemm.Fp8GroupedGemm`, torchao's recipe, all six GEMMs).

Why (one H200, benchmarks/fp8_gemms.py and docs/performance.md, "fp8 GEMMs: quack's against torch's"): at the
OLMoE and Qwen3-30B-A3B shapes quack's fp8 GEMM with fast accumulation runs 1.2-1.4x torch's CUTLASS fp8 grouped
GEMM and gathers its rows as it loads them (torch's needs them gathered and each expert padded to 16 rows), so the
row operands are quantized once per token, not per routed row. The weight gradients stay in bf16: quack's GEMM over
a variable K wants one operand M-major and fp8 wants both K-major, and torch's fp8 there needs each expert's rows
quantized per column first, which costs more than it saves at small experts. With large experts (Mixtral) the
weight gradients dominate and torch's fp8 for all six GEMMs is faster: hence the 4096 limit.

SwiGLU writes its output straight to fp8 and its backward writes ``grad_h`` in bf16 (the weight gradient's) and
in fp8 (the input gradient's) in the same pass (``quantizes_swiglu``: :func:`~torchtune_moe.modules._kernels.
swiglu_forward_fp8`, ``swiglu_backward_fp8``), so no bf16 activation is written only to be read back and quantized.

Measured (one H200, ``benchmarks/moe_layer.py``, docs/performance.md "fp8 expert GEMMs"): the OLMoE layer 5.08 ->
4.61 ms eager and 5.03 -> 4.51 ms compiled against bf16 (1.10x / 1.12x; torch's fp8 path was 0.90x / 0.95x), the
Qwen3-30B-A3B layer 0.95x / 0.97x (fp8 does not pay there); ``small/full`` over 336 steps ends at the bf16 loss.

Scales: torchao's rowwise recipe (one power-of-2 scale per row of each operand, along the reduction), with one
change the torch path also makes: the up projection's input gradient reuses the forward's fp8 weight, transposed,
and moves its per-row factor onto the gradient's rows (:meth:`QuackFp8GroupedGemm.input_grad`).
"""

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from torchtune_moe.modules import _kernels
from torchtune_moe.modules._cute_gemm import CuteGroupedGemm, _operand
from torchtune_moe.modules._custom_op import custom_op
from torchtune_moe.modules._grouped_gemm import Fp8Rows, Rows, rowwise_fp8_torch

__all__ = ["QUACK_FP8", "QuackFp8GroupedGemm"]

_failed: list = []


def _dequantized_mm(a8_AK, w8_ENK, a_scale_M, w_scale_EN, cu_seqlens_E1, index_M) -> torch.Tensor:
    """What :func:`_scaled_fp8_mm` computes, in torch code: the fp8 operands dequantized to bf16 (exact: fp8 values
    times powers of 2), then torch's grouped GEMM. Its fallback where quack's kernel fails."""
    rows_MK = a8_AK if index_M is None else a8_AK.index_select(0, index_M)
    a_MK = (rows_MK.float() * a_scale_M.unsqueeze(-1)).bfloat16()
    w_ENK = (w8_ENK.float() * w_scale_EN.unsqueeze(-1)).bfloat16()
    return F.grouped_mm(a_MK, w_ENK.transpose(-2, -1), offs=cu_seqlens_E1[1:])


@custom_op("cute_scaled_fp8_mm", device_types="cuda")
def _scaled_fp8_mm(
    a8_AK: torch.Tensor,
    w8_ENK: torch.Tensor,
    a_scale_M: torch.Tensor,
    w_scale_EN: torch.Tensor,
    cu_seqlens_E1: torch.Tensor,
    index_M: Optional[torch.Tensor],
) -> torch.Tensor:
    """``a8[index] @ w8[e]^T`` per expert segment times ``a_scale`` per row and ``w_scale`` per (expert, column), bf16
    (:func:`~torchtune_moe.modules._cute_fp8_kernels.scaled_fp8_grouped_mm`). If quack's kernel fails (say its JIT on
    this driver), one warning and torch code for this and every later call."""
    if not _failed:
        try:
            from torchtune_moe.modules._cute_fp8_kernels import scaled_fp8_grouped_mm

            return scaled_fp8_grouped_mm(a8_AK, w8_ENK, a_scale_M, w_scale_EN, cu_seqlens_E1, index_M)
        except Exception as e:
            _failed.append(e)
            warnings.warn(f"quack's fp8 GEMM failed ({type(e).__name__}: {e}); expert_fp8 dequantizes its operands "
                          f"to bf16 from now on in this process (TORCHTUNE_MOE_GROUPED_GEMM=torch runs torch's fp8)")
    return _dequantized_mm(a8_AK, w8_ENK, a_scale_M, w_scale_EN, cu_seqlens_E1, index_M)


@_scaled_fp8_mm.register_fake
def _(a8_AK, w8_ENK, a_scale_M, w_scale_EN, cu_seqlens_E1, index_M):
    rows = index_M.shape[0] if index_M is not None else a8_AK.shape[0]
    return a8_AK.new_empty(rows, w8_ENK.shape[1], dtype=torch.bfloat16)


def _colwise_transposed_fp8(w_ENK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w^T`` [E, K, N] fp8, contiguous, with one power-of-2 scale per (expert, k) from the amax over n: the input
    gradient's right operand when g's rows are per token (``g @ w[e]`` contracts over n, so its scales lie along k).
    One Triton kernel on CUDA (two reads of w); torch code elsewhere. Returns (fp8, scales [E, K] fp32)."""
    if _kernels.use_triton(w_ENK):
        return _kernels.colwise_transpose_fp8(w_ENK)
    q_EKN, scale_EK1 = rowwise_fp8_torch(w_ENK.transpose(-2, -1), dim=-1)
    return q_EKN.contiguous(), scale_EK1.squeeze(-1)


def _rows_fp8(a) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """A row operand in fp8: (source rows, quack's int32 index or None, each output row's dequantization factor).
    Gathered rows (:class:`~torchtune_moe.modules._grouped_gemm.Rows`) are quantized per source row (once per
    token, not per routed row) and gathered by the GEMM; their factors are gathered here ([A] floats). Rows
    already in fp8 (:class:`~torchtune_moe.modules._grouped_gemm.Fp8Rows`) are taken as they are."""
    if isinstance(a, Fp8Rows):
        return a.q_AK, None, a.scale_A1.squeeze(-1).reciprocal()
    if isinstance(a, Rows):
        q_TK, scale_T1 = _kernels.rowwise_fp8(_operand(a.src_TK))
        # Dropped slots (past the last segment) are not computed; their index may point anywhere: clamp to read.
        index_A = a.index_A
        rows_A = index_A.long().clamp(0, q_TK.shape[0] - 1)
        return q_TK, index_A, scale_T1.squeeze(-1).reciprocal()[rows_A].contiguous()
    q_AK, scale_A1 = _kernels.rowwise_fp8(_operand(a))
    return q_AK, None, scale_A1.squeeze(-1).reciprocal().contiguous()


class QuackFp8GroupedGemm(CuteGroupedGemm):
    """``expert_fp8`` through quack (module doc): forward and input gradients in rowwise-scaled fp8
    (:func:`_scaled_fp8_mm`), weight gradients in quack's bf16 (:class:`~torchtune_moe.modules._cute_gemm.
    CuteGroupedGemm`). SwiGLU in our kernels (no fp8 epilogue for it). No row padding: quack's segments need no
    alignment. Operands bf16 on a compute-capability 9.x GPU; segments and index in quack's form (:meth:`prepare`)."""

    fuses_swiglu = False
    quantizes_swiglu = True

    @staticmethod
    def forward(
        a_AK: "torch.Tensor | Rows | Fp8Rows", w_ENK: torch.Tensor, cu_E1: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``a_AK @ w_ENK[e]^T`` per expert in fp8 ([A, K], [E, N, K] -> [A, N] bf16), and the weight's row scales
        [E, N] fp32 (what :meth:`input_grad` takes of the forward)."""
        a8, index, a_scale = _rows_fp8(a_AK)
        E, N, K = w_ENK.shape
        w8_NK, w_scale_N1 = _kernels.rowwise_fp8(w_ENK.reshape(E * N, K))
        w_scale_EN = w_scale_N1.view(E, N)
        return _scaled_fp8_mm(a8, w8_NK.view(E, N, K), a_scale, w_scale_EN.reciprocal(), cu_E1, index), w_scale_EN

    @staticmethod
    def grad_rows_mul(w_scale_EN: torch.Tensor, cu_E1: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors per-row gradients take before their quantization for :meth:`input_grad`: ``mul_EN`` [E, N]
        bf16 (``min_n s[e, n] / s[e, n]`` from the forward's row scales ``w_scale_EN``: powers of 2, at most 1,
        exact in bf16) and each row's expert [num_rows] int64."""
        mul_EN = w_scale_EN.amin(dim=-1, keepdim=True) / w_scale_EN
        return mul_EN.to(torch.bfloat16), _kernels.row_experts(cu_E1[1:], num_rows)

    @classmethod
    def input_grad(
        cls, g_AN: "torch.Tensor | Rows | Fp8Rows", w_ENK: torch.Tensor, cu_E1: torch.Tensor,
        w_scale_EN: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``g_AN @ w_ENK[e]`` per expert in fp8 ([A, N], [E, N, K] -> [A, K] bf16).

        Rows of g per routed row (the up projection's ``grad_h``) with the forward's row scales ``w_scale_EN``: the
        forward's fp8 weight (scaled per row n, the reduction axis here) transposed in one read, its factor
        ``1 / s[e, n]`` moved onto g's rows exactly (:meth:`grad_rows_mul`), as
        :meth:`~torchtune_moe.modules._grouped_gemm.Fp8GroupedGemm.input_grad`. Such rows may come quantized with
        those factors already (:class:`~torchtune_moe.modules._grouped_gemm.Fp8Rows`, from SwiGLU's backward).
        Rows of g gathered per token (the down projection's ``grad_y``, a
        :class:`~torchtune_moe.modules._grouped_gemm.Rows`): g quantized once per token and w per column k (two
        reads of w), since the factor would make g's quantization per routed row (top-k times the rows)."""
        if isinstance(g_AN, Rows) or w_scale_EN is None:
            g8, index, g_scale = _rows_fp8(g_AN)
            w8_EKN, w_scale_EK = _colwise_transposed_fp8(w_ENK)
            return _scaled_fp8_mm(g8, w8_EKN, g_scale, w_scale_EK.reciprocal(), cu_E1, index)
        E, N, K = w_ENK.shape
        if not isinstance(g_AN, Fp8Rows):
            g_AN = Fp8Rows(*_kernels.rowwise_fp8(_operand(g_AN), *cls.grad_rows_mul(w_scale_EN, cu_E1, g_AN.shape[0])))
        w8_EKN = _kernels.scaled_transpose_fp8(w_ENK, w_scale_EN).transpose(-2, -1)  # [E, K, N] contiguous
        w_factor_EK = w_scale_EN.amin(dim=-1, keepdim=True).reciprocal().expand(E, K).contiguous()
        return _scaled_fp8_mm(g_AN.q_AK, w8_EKN, g_AN.scale_A1.squeeze(-1).reciprocal(), w_factor_EK, cu_E1, None)


#: The fp8 grouped GEMMs through quack (:func:`~torchtune_moe.modules.moe_linear.MoELinear._fp8_gemm` picks it).
QUACK_FP8 = QuackFp8GroupedGemm()
