"""Memory-bound pieces of the routed-expert block, fused: SwiGLU with the routing weight, gather-sums, and the
per-expert LoRA products (low-rank projections fused with the row gathers, in-place low-rank adds, factor
gradients).

Each function has one definition of what it computes (the pure-torch code below, used on CPU and when
Triton is missing) and, on CUDA, a Triton kernel that computes the same thing in one pass over memory.
The kernels are registered as custom ops (``torch.ops.torchtune_moe.*``) so that ``torch.compile`` keeps
them as they are rather than tracing into them: Inductor's own fusion of the torch code measured slower
(benchmarks/NOTES.md). Eager, each is launched directly, without the op's dispatch
(:mod:`~torchtune_moe.modules._custom_op`). Why hand-written: no library we
depend on fuses "SwiGLU times a per-row weight" with its backward (recomputing the output instead of
saving it), or sums a token's gathered rows (K of them, or a variable number) without materialising the
gather or accumulating with atomics.

Rows at or past ``num_valid`` (a 1-element int32 device tensor: dropped slots sorted last, whose grouped
GEMM rows hold garbage) read as zero when ``may_drop`` is set; with it unset every row is used. The Triton
kernels neither read nor write those rows of their [A, *] outputs (no consumer reads them: the grouped GEMMs
stop at the last expert's offset, the combines skip them); the torch code writes zeros there.
"""

from typing import Optional

import torch

from torchtune_moe.modules._custom_op import custom_op

try:  # Triton comes with CUDA builds of torch; CPU-only installs use the torch code.
    from torchtune_moe.modules._kernels import _triton

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    _triton = None
    _HAS_TRITON = False

__all__ = [
    "gather_rows", "swiglu_forward", "swiglu_backward", "gather_sum", "segment_sum", "use_triton", "valid_rows",
    "row_experts",
    "lowrank_add_", "expert_outer", "rows_project", "lowrank_supported", "rowwise_fp8", "per_group_colwise_fp8",
    "scaled_transpose_fp8", "colwise_transpose_fp8", "swiglu_forward_fp8", "swiglu_backward_fp8",
    "swiglu_fp8_supported",
    "swiglu_lora_forward", "swiglu_lora_backward", "swiglu_lora_supported",
]


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve ``t``: a CUDA tensor and Triton importable."""
    return _HAS_TRITON and t.is_cuda


if _HAS_TRITON:
    # Custom ops around the kernels: opaque to torch.compile (a fake implementation gives output shapes).
    Tensor = torch.Tensor

    @custom_op("gather_rows", mutates_args=())
    def _gather_rows_op(src_TD: Tensor, index_A: Tensor, num_valid: Tensor, may_drop: bool) -> Tensor:
        return _triton.gather_rows(src_TD, index_A, num_valid, may_drop)

    @_gather_rows_op.register_fake
    def _(src_TD, index_A, num_valid, may_drop):
        return src_TD.new_empty((index_A.shape[0], src_TD.shape[1]))

    @custom_op("swiglu_forward", mutates_args=())
    def _swiglu_forward_op(h_AF: Tensor, weights_A: Tensor, num_valid: Tensor, may_drop: bool) -> Tensor:
        return _triton.swiglu_forward(h_AF, weights_A, num_valid, may_drop)

    @_swiglu_forward_op.register_fake
    def _(h_AF, weights_A, num_valid, may_drop):
        return h_AF.new_empty((h_AF.shape[0], h_AF.shape[1] // 2))

    @custom_op("swiglu_backward", mutates_args=())
    def _swiglu_backward_op(
        h_AF: Tensor, weights_A: Tensor, grad_hs_AH: Tensor, num_valid: Tensor, may_drop: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _triton.swiglu_backward(h_AF, weights_A, grad_hs_AH, num_valid, may_drop)

    @_swiglu_backward_op.register_fake
    def _(h_AF, weights_A, grad_hs_AH, num_valid, may_drop):
        A, F2 = h_AF.shape
        return h_AF.new_empty((A, F2)), h_AF.new_empty((A,), dtype=torch.float32), h_AF.new_empty((A, F2 // 2))

    @custom_op("swiglu_forward_fp8", mutates_args=())
    def _swiglu_forward_fp8_op(
        h_AF: Tensor, weights_A: Tensor, num_valid: Tensor, may_drop: bool
    ) -> tuple[Tensor, Tensor]:
        return _triton.swiglu_forward_fp8(h_AF, weights_A, num_valid, may_drop)

    @_swiglu_forward_fp8_op.register_fake
    def _(h_AF, weights_A, num_valid, may_drop):
        A, F2 = h_AF.shape
        return h_AF.new_empty((A, F2 // 2), dtype=torch.float8_e4m3fn), h_AF.new_empty((A, 1), dtype=torch.float32)

    @custom_op("swiglu_backward_fp8", mutates_args=())
    def _swiglu_backward_fp8_op(
        h_AF: Tensor, weights_A: Tensor, grad_hs_AH: Tensor, num_valid: Tensor, may_drop: bool, mul_EF: Tensor,
        expert_A: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _triton.swiglu_backward_fp8(h_AF, weights_A, grad_hs_AH, num_valid, may_drop, mul_EF, expert_A)

    @_swiglu_backward_fp8_op.register_fake
    def _(h_AF, weights_A, grad_hs_AH, num_valid, may_drop, mul_EF, expert_A):
        A, F2 = h_AF.shape
        return (
            h_AF.new_empty((A, F2)), h_AF.new_empty((A,), dtype=torch.float32), h_AF.new_empty((A, F2 // 2)),
            h_AF.new_empty((A, F2), dtype=torch.float8_e4m3fn), h_AF.new_empty((A, 1), dtype=torch.float32),
        )

    @custom_op("gather_sum", mutates_args=())
    def _gather_sum_op(
        src_AD: Tensor, index_TK: Tensor, num_valid: Tensor, may_drop: bool, weights_A: Optional[Tensor]
    ) -> Tensor:
        return _triton.gather_sum(src_AD, index_TK, num_valid, may_drop, weights_A)

    @_gather_sum_op.register_fake
    def _(src_AD, index_TK, num_valid, may_drop, weights_A):
        return src_AD.new_empty((index_TK.shape[0], src_AD.shape[1]))

    @custom_op("segment_sum", mutates_args=())
    def _segment_sum_op(src_AD: Tensor, index_J: Tensor, offsets_T: Tensor, weights_A: Optional[Tensor]) -> Tensor:
        return _triton.segment_sum(src_AD, index_J, offsets_T, weights_A)

    @_segment_sum_op.register_fake
    def _(src_AD, index_J, offsets_T, weights_A):
        return src_AD.new_empty((offsets_T.shape[0], src_AD.shape[1]))

    @custom_op("lowrank_add_", mutates_args=("y_AN",))
    def _lowrank_add_op(
        y_AN: Tensor, z_AP: Tensor, w_ENR: Tensor, offsets_E: Tensor, scale: float, parts: int
    ) -> None:
        _triton.lowrank_add_(y_AN, z_AP, w_ENR, offsets_E, scale, parts)

    @_lowrank_add_op.register_fake
    def _(y_AN, z_AP, w_ENR, offsets_E, scale, parts):
        return None

    @custom_op("expert_outer", mutates_args=())
    def _expert_outer_op(
        big_XN: Tensor, small_AP: Tensor, offsets_E: Tensor, index_A: Optional[Tensor], scale: float, parts: int,
        transposed: bool,
    ) -> Tensor:
        E, N, R = offsets_E.shape[0], big_XN.shape[1], small_AP.shape[1] // parts
        if transposed:  # [E, R, N] written through an [E, N, R] view
            out = big_XN.new_empty((E, R, N))
            _triton.expert_outer(big_XN, small_AP, offsets_E, index_A, scale, parts, out.transpose(-2, -1))
            return out
        return _triton.expert_outer(big_XN, small_AP, offsets_E, index_A, scale, parts, big_XN.new_empty((E, N, R)))

    @custom_op("rows_project", mutates_args=())
    def _rows_project_op(
        y_XN: Tensor, w_ENR: Tensor, offsets_E: Tensor, index_A: Optional[Tensor], scale: float, parts: int,
        copy: bool,
    ) -> tuple[Tensor, Tensor]:
        return _triton.rows_project(y_XN, w_ENR, offsets_E, index_A, scale, parts, copy)

    @_rows_project_op.register_fake
    def _(y_XN, w_ENR, offsets_E, index_A, scale, parts, copy):
        A = index_A.shape[0] if index_A is not None else y_XN.shape[0]
        return y_XN.new_empty((A, parts * w_ENR.shape[2])), y_XN.new_empty((A if copy else 0, y_XN.shape[1]))

    @_expert_outer_op.register_fake
    def _(big_XN, small_AP, offsets_E, index_A, scale, parts, transposed):
        E, N, R = offsets_E.shape[0], big_XN.shape[1], small_AP.shape[1] // parts
        return big_XN.new_empty((E, R, N) if transposed else (E, N, R))

    @custom_op("swiglu_lora_forward", mutates_args=())
    def _swiglu_lora_forward_op(
        h_AF: Tensor, weights_A: Tensor, xa_AP: Tensor, b_ENR: Tensor, offsets_E: Tensor, scale: float
    ) -> Tensor:
        return _triton.swiglu_lora_forward(h_AF, weights_A, xa_AP, b_ENR, offsets_E, scale)

    @_swiglu_lora_forward_op.register_fake
    def _(h_AF, weights_A, xa_AP, b_ENR, offsets_E, scale):
        return h_AF.new_empty((h_AF.shape[0], h_AF.shape[1] // 2))

    @custom_op("swiglu_lora_backward", mutates_args=())
    def _swiglu_lora_backward_op(
        h_AF: Tensor, weights_A: Tensor, grad_hs_AH: Tensor, xa_AP: Tensor, b_ENR: Tensor, offsets_E: Tensor,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _triton.swiglu_lora_backward(h_AF, weights_A, grad_hs_AH, xa_AP, b_ENR, offsets_E, scale)

    @_swiglu_lora_backward_op.register_fake
    def _(h_AF, weights_A, grad_hs_AH, xa_AP, b_ENR, offsets_E, scale):
        A, F2 = h_AF.shape
        return h_AF.new_empty((A, F2)), h_AF.new_empty((A,), dtype=torch.float32), h_AF.new_empty((A, F2 // 2))

    @custom_op("rowwise_fp8", mutates_args=())
    def _rowwise_fp8_op(
        src_AK: Tensor, mul_EK: Optional[Tensor], expert_A: Optional[Tensor]
    ) -> tuple[Tensor, Tensor]:
        return _triton.rowwise_fp8(src_AK, mul_EK, expert_A)

    @_rowwise_fp8_op.register_fake
    def _(src_AK, mul_EK, expert_A):
        A, K = src_AK.shape
        return src_AK.new_empty((A, K), dtype=torch.float8_e4m3fn), src_AK.new_empty((A, 1), dtype=torch.float32)

    @custom_op("per_group_colwise_fp8", mutates_args=())
    def _per_group_colwise_fp8_op(src_AN: Tensor, offsets_E: Tensor) -> tuple[Tensor, Tensor]:
        return _triton.per_group_colwise_fp8(src_AN, offsets_E)

    @_per_group_colwise_fp8_op.register_fake
    def _(src_AN, offsets_E):
        A, N = src_AN.shape
        q_AN = src_AN.new_empty_strided((A, N), (1, A), dtype=torch.float8_e4m3fn)
        return q_AN, src_AN.new_empty((offsets_E.shape[0] * N,), dtype=torch.float32)

    @custom_op("colwise_transpose_fp8", mutates_args=())
    def _colwise_transpose_fp8_op(w_ENK: Tensor) -> tuple[Tensor, Tensor]:
        return _triton.colwise_transpose_fp8(w_ENK)

    @_colwise_transpose_fp8_op.register_fake
    def _(w_ENK):
        E, N, K = w_ENK.shape
        return w_ENK.new_empty((E, K, N), dtype=torch.float8_e4m3fn), w_ENK.new_empty((E, K), dtype=torch.float32)

    @custom_op("scaled_transpose_fp8", mutates_args=())
    def _scaled_transpose_fp8_op(w_ENK: Tensor, scale_EN: Tensor) -> Tensor:
        return _triton.scaled_transpose_fp8(w_ENK, scale_EN)

    @_scaled_transpose_fp8_op.register_fake
    def _(w_ENK, scale_EN):
        E, N, K = w_ENK.shape
        return w_ENK.new_empty_strided((E, N, K), (N * K, 1, N), dtype=torch.float8_e4m3fn)


def gather_rows(
    src_TD: torch.Tensor, index_A: torch.Tensor, num_valid: Optional[torch.Tensor] = None, may_drop: bool = False
) -> torch.Tensor:
    """``out[a] = src[index[a]]`` (the dispatch gather): [T, D], [A] int64 -> [A, D].

    The Triton kernel moves 4 rows per program in 16-byte vectors; ``index_select`` reaches ~2/3 of the
    copy bandwidth on this access pattern (benchmarks/NOTES.md).

    Args:
        src_TD (torch.Tensor): [T, D] rows.
        index_A (torch.Tensor): [A] int64.
        num_valid (torch.Tensor): [1] int32, read only with ``may_drop``.
        may_drop (bool): rows at or past ``num_valid`` are dropped slots that nothing reads: the Triton
            kernel leaves them unwritten (their values are unspecified), saving their traffic.
    """
    if use_triton(src_TD):
        if num_valid is None:
            num_valid, may_drop = index_A.new_zeros(1, dtype=torch.int32), False
        return _gather_rows_op(src_TD, index_A, num_valid, may_drop)
    return src_TD.index_select(0, index_A)


def valid_rows(num_rows: int, num_valid: torch.Tensor) -> torch.Tensor:
    """[num_rows, 1] bool: rows before ``num_valid`` (a 1-element tensor), i.e. not dropped slots."""
    return (torch.arange(num_rows, device=num_valid.device) < num_valid).unsqueeze(-1)


def row_experts(offsets_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[num_rows] int64 expert of each row sorted by expert (``offsets_E`` [E] cumulative ends; rows past
    ``offsets_E[-1]``, dropped slots: the last expert, masked by the caller). No host-device sync."""
    rows_A = torch.arange(num_rows, device=offsets_E.device, dtype=offsets_E.dtype)
    return torch.searchsorted(offsets_E, rows_A, right=True).clamp_(max=offsets_E.shape[0] - 1)


def _swiglu_parts(h_AF: torch.Tensor):
    gate_AH, up_AH = h_AF.float().chunk(2, dim=-1)
    sig_AH = torch.sigmoid(gate_AH)
    silu_AH = gate_AH * sig_AH
    return gate_AH, up_AH, sig_AH, silu_AH, silu_AH * up_AH


def swiglu_forward(
    h_AF: torch.Tensor, weights_A: torch.Tensor, num_valid: torch.Tensor, may_drop: bool = False
) -> torch.Tensor:
    """``hs = silu(gate) * up * weight`` per row, computed in fp32, stored in ``h``'s dtype.

    Args:
        h_AF (torch.Tensor): [A, 2H] gate columns then up columns.
        weights_A (torch.Tensor): [A] routing weight of each row.
        num_valid (torch.Tensor): [1] int32, rows past it are dropped (only read when ``may_drop``).
        may_drop (bool): rows at or past ``num_valid`` are dropped: zero (torch code) or left unwritten (Triton).

    Returns:
        torch.Tensor: [A, H]
    """
    if use_triton(h_AF):
        return _swiglu_forward_op(h_AF, weights_A, num_valid, may_drop)
    *_, act_AH = _swiglu_parts(h_AF)
    hs_AH = (act_AH * weights_A.float().unsqueeze(-1)).to(h_AF.dtype)
    if may_drop:
        hs_AH = torch.where(valid_rows(h_AF.shape[0], num_valid), hs_AH, 0)
    return hs_AH


def swiglu_backward(
    h_AF: torch.Tensor,
    weights_A: torch.Tensor,
    grad_hs_AH: torch.Tensor,
    num_valid: torch.Tensor,
    may_drop: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`swiglu_forward`, which it also recomputes (so the forward need not save it).

    Args:
        h_AF (torch.Tensor): [A, 2H] the forward's input.
        weights_A (torch.Tensor): [A] routing weights.
        grad_hs_AH (torch.Tensor): [A, H] gradient of the output.
        num_valid (torch.Tensor): [1] int32 (see :func:`swiglu_forward`).
        may_drop (bool): rows at or past ``num_valid`` are dropped: their ``grad_weights`` is zero, their rows
            of ``grad_h`` and ``hs`` are zero (torch code) or left unwritten (Triton).

    Returns:
        tuple: ``grad_h_AF`` [A, 2H] (``h``'s dtype), ``grad_weights_A`` [A] fp32, ``hs_AH`` [A, H] (the
        forward output, recomputed bit for bit).
    """
    if use_triton(h_AF):
        return _swiglu_backward_op(h_AF, weights_A, grad_hs_AH, num_valid, may_drop)
    gate_AH, up_AH, sig_AH, silu_AH, act_AH = _swiglu_parts(h_AF)
    w_A1 = weights_A.float().unsqueeze(-1)
    grad_hs_AH = grad_hs_AH.float()
    grad_w_A = (grad_hs_AH * act_AH).sum(-1)
    grad_act_AH = grad_hs_AH * w_A1
    grad_up_AH = grad_act_AH * silu_AH
    grad_gate_AH = grad_act_AH * up_AH * sig_AH * (1 + gate_AH * (1 - sig_AH))
    grad_h_AF = torch.cat([grad_gate_AH, grad_up_AH], dim=-1).to(h_AF.dtype)
    hs_AH = (act_AH * w_A1).to(h_AF.dtype)
    if may_drop:
        valid_A1 = valid_rows(h_AF.shape[0], num_valid)
        grad_h_AF = torch.where(valid_A1, grad_h_AF, 0)
        hs_AH = torch.where(valid_A1, hs_AH, 0)
        grad_w_A = torch.where(valid_A1.squeeze(-1), grad_w_A, 0)
    return grad_h_AF, grad_w_A, hs_AH


def swiglu_fp8_supported(h_AF: torch.Tensor) -> bool:
    """Whether :func:`swiglu_forward_fp8` and :func:`swiglu_backward_fp8` take rows like ``h_AF`` [A, 2H] as one
    kernel each (CUDA with Triton, H up to 4096: whole rows per program); elsewhere they compose SwiGLU's function
    with :func:`rowwise_fp8` (which needs CUDA with Triton)."""
    return use_triton(h_AF) and h_AF.shape[-1] // 2 <= _triton.SWIGLU_FP8_MAX_HIDDEN


def swiglu_forward_fp8(
    h_AF: torch.Tensor, weights_A: torch.Tensor, num_valid: torch.Tensor, may_drop: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`swiglu_forward` quantized per row for an fp8 GEMM, without writing its bf16 output: the values of
    ``rowwise_fp8(swiglu_forward(h_AF, weights_A, num_valid, may_drop))`` (rows past ``num_valid`` unspecified
    under ``may_drop``).

    Returns:
        tuple: ``q_AH`` [A, H] float8_e4m3fn and ``scale_A1`` [A, 1] fp32 (q = hs * scale).
    """
    if swiglu_fp8_supported(h_AF):
        return _swiglu_forward_fp8_op(h_AF, weights_A, num_valid, may_drop)
    return rowwise_fp8(swiglu_forward(h_AF, weights_A, num_valid, may_drop))


def swiglu_backward_fp8(
    h_AF: torch.Tensor,
    weights_A: torch.Tensor,
    grad_hs_AH: torch.Tensor,
    num_valid: torch.Tensor,
    may_drop: bool,
    mul_EF: torch.Tensor,
    expert_A: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`swiglu_backward`, and its ``grad_h`` quantized per row for an fp8 GEMM as
    ``rowwise_fp8(grad_h, mul_EF, expert_A)`` (each row first times the powers of 2 ``mul_EF[expert_A[a]]``, [E, 2H]),
    without reading ``grad_h`` back. ``grad_weights`` may differ from :func:`swiglu_backward`'s in its last bits (the
    row's sum in another order).

    Returns:
        tuple: ``grad_h_AF`` [A, 2H], ``grad_weights_A`` [A] fp32, ``hs_AH`` [A, H], ``q_AF`` [A, 2H]
        float8_e4m3fn and ``scale_A1`` [A, 1] fp32.
    """
    if swiglu_fp8_supported(h_AF):
        return _swiglu_backward_fp8_op(h_AF, weights_A, grad_hs_AH, num_valid, may_drop, mul_EF, expert_A)
    grad_h_AF, grad_w_A, hs_AH = swiglu_backward(h_AF, weights_A, grad_hs_AH, num_valid, may_drop)
    return (grad_h_AF, grad_w_A, hs_AH, *rowwise_fp8(grad_h_AF, mul_EF, expert_A))


def gather_sum(
    src_AD: torch.Tensor,
    index_TK: torch.Tensor,
    num_valid: torch.Tensor,
    may_drop: bool = False,
    weights_A: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out[t] = sum_k src[index[t, k]]`` (times ``weights[index[t, k]]`` when given), accumulated in fp32, stored
    in ``src``'s dtype.

    The combine of token-choice routing (``index`` = sorted position of each (token, k) assignment) and,
    with the same index, the backward of the dispatch gather. Deterministic: no atomics.

    Args:
        src_AD (torch.Tensor): [A, D] rows.
        index_TK (torch.Tensor): [T, K] int64 rows of ``src`` to sum per token.
        num_valid (torch.Tensor): [1] int32; with ``may_drop``, rows at or past it count as zero.
        may_drop (bool): see ``num_valid``.
        weights_A (Optional[torch.Tensor]): [A] a factor per row of ``src`` (the routing weights, when the rows
            are unweighted expert outputs), applied in fp32.

    Returns:
        torch.Tensor: [T, D]
    """
    if use_triton(src_AD):
        return _gather_sum_op(src_AD, index_TK, num_valid, may_drop, weights_A)
    if may_drop:  # dropped entries may point past the last row of src: read row 0 instead, then zero it
        valid_TK = index_TK < num_valid
        safe_TK = torch.where(valid_TK, index_TK, 0)
        rows_TKD = torch.where(valid_TK.unsqueeze(-1), src_AD[safe_TK], 0).float()
        if weights_A is not None:
            rows_TKD = rows_TKD * torch.where(valid_TK, weights_A[safe_TK].float(), 0).unsqueeze(-1)
    else:
        rows_TKD = src_AD[index_TK].float()
        if weights_A is not None:
            rows_TKD = rows_TKD * weights_A[index_TK].float().unsqueeze(-1)
    return rows_TKD.sum(dim=1).to(src_AD.dtype)


def segment_sum(
    src_AD: torch.Tensor, index_J: torch.Tensor, offsets_T: torch.Tensor, weights_A: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``out[t] = sum of src[index[j]] for j in [offsets[t-1], offsets[t])`` (``offsets[-1]`` read as 0; each term
    times ``weights[index[j]]`` when given), accumulated in fp32, stored in ``src``'s dtype.

    The combine for any number of rows per token (expert choice, a user's router): ``index`` lists the rows
    of ``src`` token by token. Deterministic: no atomics. Entries of ``index`` past ``offsets[T-1]`` are
    never read.

    Args:
        src_AD (torch.Tensor): [A, D] rows.
        index_J (torch.Tensor): [J] int64, rows of ``src`` grouped by token.
        offsets_T (torch.Tensor): [T] int32, cumulative number of rows of tokens 0..t.
        weights_A (Optional[torch.Tensor]): [A] a factor per row of ``src``, applied in fp32.

    Returns:
        torch.Tensor: [T, D]
    """
    if use_triton(src_AD):
        return _segment_sum_op(src_AD, index_J, offsets_T, weights_A)
    T, J = offsets_T.shape[0], index_J.shape[0]
    # token of each entry (entries past offsets[T-1] get token T, a row that is cut off below)
    token_J = torch.searchsorted(offsets_T.long(), torch.arange(J, device=src_AD.device), right=True)
    rows_JD = src_AD[index_J].float()
    if weights_A is not None:
        rows_JD = rows_JD * weights_A[index_J].float().unsqueeze(-1)
    out_TD = torch.zeros(T + 1, src_AD.shape[1], dtype=torch.float32, device=src_AD.device)
    return out_TD.index_add_(0, token_J, rows_JD)[:T].to(src_AD.dtype)


# LoRA on the routed experts. Rows are sorted by expert: expert e owns rows [offsets_E[e-1], offsets_E[e]) (0 for
# e = 0); rows at or past offsets_E[-1] (dropped slots) belong to none. A "part" splits the N columns into
# ``parts`` equal blocks, block p paired with columns [p*R, (p+1)*R) of the [A, parts*R] low-rank operand: the
# gate and up projections' separate LoRA pairs without a block-diagonal B. Why hand-written: torch's grouped GEMM
# writes each low-rank product to a new tensor (then added in a second pass) and reads its big operand once per
# product; these kernels add in place and gather their rows by index (benchmarks/NOTES.md, issue 12).


def lowrank_supported(n: int, parts: int, rank: int) -> bool:
    """Whether the Triton kernels take N = ``n`` columns in ``parts`` parts of rank ``rank`` (tensor-core tiles:
    each part a multiple of 16 columns, rank <= 64); otherwise callers use the torch code."""
    return n % parts == 0 and (n // parts) % 16 == 0 and rank <= 64


def lowrank_add_(
    y_AN: torch.Tensor, z_AP: torch.Tensor, w_ENR: torch.Tensor, offsets_E: torch.Tensor, scale: float,
    parts: int = 1, triton: bool = True,
) -> torch.Tensor:
    """``y[a, n] += scale * z[a, p*R:(p+1)*R] @ w[e(a), n, :]`` in place, ``p = n // (N / parts)``, ``e(a)`` the
    expert of row ``a``; rows past ``offsets_E[-1]`` are left as they are (Triton) or get unspecified values
    (torch code: grouped GEMM rows outside every group). Accumulates in fp32 (Triton) and rounds once.

    Args:
        y_AN (torch.Tensor): [A, N], rows contiguous; updated in place and returned.
        z_AP (torch.Tensor): [A, parts*R] low-rank rows, rows contiguous.
        w_ENR (torch.Tensor): [E, N, R] per-expert up-projection (any strides: a transposed view is read as is).
        offsets_E (torch.Tensor): [E] int32 cumulative rows per expert.
        scale (float): multiplier of the product.
        parts (int): column parts (see above).
        triton (bool): False runs the torch code on CUDA too (benchmarks and tests compare the two).
    """
    E, N, R = w_ENR.shape
    if triton and use_triton(y_AN) and lowrank_supported(N, parts, R):
        _lowrank_add_op(y_AN, z_AP, w_ENR, offsets_E, scale, parts)
        return y_AN
    n = N // parts
    for p in range(parts):
        prod = torch.nn.functional.grouped_mm(
            z_AP[:, p * R : (p + 1) * R].contiguous(), w_ENR[:, p * n : (p + 1) * n].transpose(-2, -1),
            offs=offsets_E,
        )
        y_AN[:, p * n : (p + 1) * n].add_(prod, alpha=scale)
    return y_AN


def expert_outer(
    big_XN: torch.Tensor, small_AP: torch.Tensor, offsets_E: torch.Tensor, *, scale: float = 1.0, parts: int = 1,
    index_A: Optional[torch.Tensor] = None, transposed: bool = False, triton: bool = True,
) -> torch.Tensor:
    """Per-expert sum of outer products: ``out[e, n, k] = scale * sum over rows a of e of big[i(a), n] *
    small[a, p*R + k]`` with ``i(a) = index_A[a]`` (rows gathered on the fly) or ``a``, ``p = n // (N/parts)``:
    the weight gradients of the low-rank factors. An expert without rows gets zeros.

    Args:
        big_XN (torch.Tensor): [X, N] (X = A, or the rows ``index_A`` points into).
        small_AP (torch.Tensor): [A, parts*R].
        offsets_E (torch.Tensor): [E] int32 cumulative rows per expert.
        scale (float): multiplier.
        parts (int): column parts (see above).
        index_A (torch.Tensor): optional [A] int64 row of ``big`` for each row.
        transposed (bool): return ``[E, R, N]`` (contiguous) instead of ``[E, N, R]``.
        triton (bool): False runs the torch code on CUDA too.

    Returns:
        torch.Tensor: [E, N, R] (or [E, R, N]) in ``big``'s dtype.
    """
    N, R = big_XN.shape[1], small_AP.shape[1] // parts
    if triton and use_triton(big_XN) and lowrank_supported(N, parts, R):
        return _expert_outer_op(big_XN, small_AP, offsets_E, index_A, scale, parts, transposed)
    big_AN = big_XN if index_A is None else big_XN.index_select(0, index_A)
    n = N // parts
    outs = []
    for p in range(parts):
        small = small_AP[:, p * R : (p + 1) * R] if parts == 1 else small_AP[:, p * R : (p + 1) * R].contiguous()
        big = big_AN[:, p * n : (p + 1) * n]
        if transposed:
            outs.append(torch.nn.functional.grouped_mm(small.t(), big, offs=offsets_E))
        else:
            outs.append(torch.nn.functional.grouped_mm(big.t(), small, offs=offsets_E))
    out = outs[0] if parts == 1 else torch.cat(outs, dim=-1 if transposed else 1)
    return out.mul_(scale) if scale != 1.0 else out


def rows_project(
    y_XN: torch.Tensor, w_ENR: torch.Tensor, offsets_E: torch.Tensor, *, scale: float = 1.0, parts: int = 1,
    index_A: Optional[torch.Tensor] = None, copy: bool = False, triton: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The down-projection of each row by its expert's low-rank factor: ``z[a, p*R + k] = scale * sum over n of
    part p of y[i(a), n] * w[e(a), n, k]``, ``i(a) = index_A[a]`` (rows gathered on the fly) or ``a``; with
    ``copy`` also the gathered rows ``y[i(a)]`` (the dispatch gather and the projection in one pass over them).
    Rows past ``offsets_E[-1]`` (dropped slots) get unspecified values in both outputs.

    Args:
        y_XN (torch.Tensor): [X, N] (X = A, or the rows ``index_A`` points into).
        w_ENR (torch.Tensor): [E, N, R] per-expert factor (any strides: a transposed view is read as is).
        offsets_E (torch.Tensor): [E] int32 cumulative rows per expert.
        scale (float): multiplier of ``z``.
        parts (int): column parts (see above): ``z`` has ``parts*R`` columns.
        index_A (torch.Tensor): optional [A] int64 row of ``y`` for each row.
        copy (bool): also return the gathered rows.
        triton (bool): False runs the torch code on CUDA too.

    Returns:
        tuple: ``z_AP`` [A, parts*R] and the gathered rows [A, N] (``None`` without ``copy``).
    """
    E, N, R = w_ENR.shape
    if triton and use_triton(y_XN) and lowrank_supported(N, parts, R):
        z_AP, copy_AN = _rows_project_op(y_XN, w_ENR, offsets_E, index_A, scale, parts, copy)
        return z_AP, copy_AN if copy else None
    y_AN = y_XN if index_A is None else gather_rows(y_XN, index_A)
    n = N // parts
    zs = [
        torch.nn.functional.grouped_mm(y_AN[:, p * n : (p + 1) * n], w_ENR[:, p * n : (p + 1) * n], offs=offsets_E)
        for p in range(parts)
    ]
    z_AP = zs[0] if parts == 1 else torch.cat(zs, dim=-1)
    if scale != 1.0:
        z_AP = z_AP.mul_(scale)
    return z_AP, y_AN if copy else None


def swiglu_lora_supported(h_AF: torch.Tensor, b_ENR: torch.Tensor) -> bool:
    """Whether :func:`swiglu_lora_forward` / :func:`swiglu_lora_backward` run their Triton kernels for ``h_AF``
    [A, 2H] and the gate/up factor ``b_ENR`` [E, 2H, R] (CUDA with Triton, the :func:`lowrank_supported`
    shapes with 2 parts); otherwise they run the torch code."""
    return use_triton(h_AF) and lowrank_supported(b_ENR.shape[1], 2, b_ENR.shape[2])


def _lowrank_added(h_AF, xa_AP, b_ENR, offsets_E, scale):
    return lowrank_add_(h_AF.clone(), xa_AP, b_ENR, offsets_E, scale, 2, triton=False)


def swiglu_lora_forward(
    h_AF: torch.Tensor, weights_A: torch.Tensor, xa_AP: torch.Tensor, b_ENR: torch.Tensor, offsets_E: torch.Tensor,
    scale: float, num_valid: torch.Tensor, may_drop: bool = False,
) -> torch.Tensor:
    """:func:`swiglu_forward` of ``h' = h + scale * [xa_g @ B_g[e]^T, xa_u @ B_u[e]^T]`` (the gate and up LoRA
    pairs, ``e`` each row's expert), with ``h'`` never written: the Triton kernel adds the low-rank delta on the
    fly, in fp32, per tile of one expert's rows (its factor tile loaded once per tile). Rows past
    ``offsets_E[-1]`` are in no tile and left unwritten (with ``may_drop`` they are the dropped slots, as in
    :func:`swiglu_forward`); the torch code (CPU, other shapes) adds the delta with :func:`lowrank_add_`'s
    torch code into a copy of ``h`` (rounded once to ``h``'s dtype), then runs :func:`swiglu_forward`.

    Args:
        h_AF (torch.Tensor): [A, 2H] the base projection (gate columns then up columns), without the adapter.
        weights_A (torch.Tensor): [A] routing weight of each row.
        xa_AP (torch.Tensor): [A, 2R] ``x @ A^T`` of the gate part (columns [0, R)) and the up part ([R, 2R)).
        b_ENR (torch.Tensor): [E, 2H, R] the B factors, gate rows then up rows.
        offsets_E (torch.Tensor): [E] int32 cumulative rows per expert; ``offsets_E[-1:]`` is ``num_valid``
            when ``may_drop``.
        scale (float): LoRA scale.
        num_valid, may_drop: as :func:`swiglu_forward`.

    Returns:
        torch.Tensor: [A, H]
    """
    if swiglu_lora_supported(h_AF, b_ENR):
        return _swiglu_lora_forward_op(h_AF, weights_A, xa_AP, b_ENR, offsets_E, scale)
    return swiglu_forward(_lowrank_added(h_AF, xa_AP, b_ENR, offsets_E, scale), weights_A, num_valid, may_drop)


def swiglu_lora_backward(
    h_AF: torch.Tensor, weights_A: torch.Tensor, grad_hs_AH: torch.Tensor, xa_AP: torch.Tensor, b_ENR: torch.Tensor,
    offsets_E: torch.Tensor, scale: float, num_valid: torch.Tensor, may_drop: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`swiglu_backward` at ``h'`` (see :func:`swiglu_lora_forward`, same arguments plus ``grad_hs_AH``
    [A, H]): ``grad_h`` is the gradient w.r.t. the whole ``h'`` (base plus delta), ``hs`` the forward's output
    recomputed with the delta. Rows past ``offsets_E[-1]``: ``grad_weights`` zero, ``grad_h`` and ``hs``
    unwritten (Triton) or as :func:`swiglu_backward` leaves them (torch code).

    Returns:
        tuple: ``grad_h_AF`` [A, 2H], ``grad_weights_A`` [A] fp32, ``hs_AH`` [A, H].
    """
    if swiglu_lora_supported(h_AF, b_ENR):
        return _swiglu_lora_backward_op(h_AF, weights_A, grad_hs_AH, xa_AP, b_ENR, offsets_E, scale)
    h_AF = _lowrank_added(h_AF, xa_AP, b_ENR, offsets_E, scale)
    return swiglu_backward(h_AF, weights_A, grad_hs_AH, num_valid, may_drop)


def rowwise_fp8(
    src_AK: torch.Tensor, mul_EK: Optional[torch.Tensor] = None, expert_A: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 rows with one power-of-2 scale per row, in one pass (CUDA with Triton only: check
    :func:`use_triton`). The definition is torchao's ``tensor_to_scale`` + ``to_fp8_saturated``
    (:func:`torchtune_moe.modules._grouped_gemm.rowwise_fp8_torch`), which makes about five passes over memory in
    eager mode; torchao has no one-pass kernel for the left operand of its rowwise grouped GEMM.

    Args:
        src_AK (torch.Tensor): [A, K] rows (bf16 or fp32).
        mul_EK (Optional[torch.Tensor]): [E, K] powers of 2 (bf16 or fp32): row a is quantized as
            ``src[a] * mul_EK[expert_A[a]]`` (exact: a power-of-2 factor changes only the exponent).
        expert_A (Optional[torch.Tensor]): [A] int, each row's expert (with ``mul_EK``).

    Returns:
        tuple: ``q_AK`` [A, K] float8_e4m3fn row-major (``src * scale`` saturated) and ``scale_A1`` [A, 1] fp32.
    """
    return _rowwise_fp8_op(src_AK, mul_EK, expert_A)


def scaled_transpose_fp8(w_ENK: torch.Tensor, scale_EN: torch.Tensor) -> torch.Tensor:
    """fp8 e4m3 ``w[e, n, :] * scale[e, n]`` saturated (the bytes :func:`rowwise_fp8` gives ``w``'s rows with these
    scales), stored column-major per expert: [E, N, K] with strides (N * K, 1, N), the layout
    ``torch._scaled_grouped_mm`` wants for a right operand reduced over n. One read of ``w``, one write (CUDA with
    Triton only).

    Args:
        w_ENK (torch.Tensor): [E, N, K] (bf16 or fp32).
        scale_EN (torch.Tensor): [E, N] fp32, the power-of-2 row scales (the forward's, from :func:`rowwise_fp8`).

    Returns:
        torch.Tensor: [E, N, K] float8_e4m3fn, strides (N * K, 1, N).
    """
    return _scaled_transpose_fp8_op(w_ENK, scale_EN)


def colwise_transpose_fp8(w_ENK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 ``w^T`` [E, K, N] contiguous with one power-of-2 scale per (expert, k) from the amax over n: the
    input gradient's right operand for quack's fp8 GEMM (K-major) where its left rows are per token, the bytes of
    ``rowwise_fp8_torch(w.transpose(-2, -1), dim=-1)`` in one kernel, two reads of ``w`` (CUDA with Triton only).

    Returns:
        tuple: [E, K, N] float8_e4m3fn and the scales [E, K] fp32.
    """
    return _colwise_transpose_fp8_op(w_ENK)


def per_group_colwise_fp8(src_AN: torch.Tensor, offsets_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 with one power-of-2 scale per column of each expert's rows (the weight gradients' operands), read
    from the row-major input in one kernel (CUDA with Triton only: check :func:`use_triton`). The definition is
    torchao's ``triton_fp8_per_group_colwise_scales`` (torch code:
    :func:`torchtune_moe.modules._grouped_gemm.per_group_colwise_fp8`), whose kernel is fast only on a
    column-major input: called on ours it needs a transpose copy in bf16, which costs more than the kernel itself.
    This one reads the rows as they are and writes the transposed tiles (benchmarks/NOTES.md, Issue 13).

    Args:
        src_AN (torch.Tensor): [A, N] rows sorted by expert (bf16 or fp32).
        offsets_E (torch.Tensor): [E] int32 cumulative rows per expert, each expert's row count a multiple of 16
            when ``A`` is (the fp8 path pads them: the kernel then stores 16 bytes at a time along a column).

    Returns:
        tuple: ``q_AN`` [A, N] float8_e4m3fn column-major (strides (1, A)), rows past ``offsets_E[-1]`` unwritten;
        ``scales`` [E * N] fp32, expert-major (an empty expert's scales are 448 / 1e-12 rounded down, as torchao's).
    """
    return _per_group_colwise_fp8_op(src_AN, offsets_E.to(torch.int32))
