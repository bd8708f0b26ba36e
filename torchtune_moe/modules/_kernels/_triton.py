"""Triton kernels behind :mod:`torchtune_moe.modules._kernels` (CUDA only; same results as its torch code).

All are memory-bound: each reads its inputs once and writes its outputs once, in 16-byte vectors,
computing in fp32. With ``MAY_DROP``, rows at or past ``num_valid`` (dropped slots) are neither read nor
written, except the routing-weight gradient, which they get as zero.
"""

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests without a GPU)


@triton.jit
def _row_block(num_valid_ptr, A, MAY_DROP: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's BLOCK_M rows, which exist (``rows_in``), and which are also not dropped slots (``rows_ok``)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = rows < A
    if MAY_DROP:
        rows_ok = rows_in & (rows < tl.load(num_valid_ptr))
    else:
        rows_ok = rows_in
    return rows, rows_in, rows_ok


@triton.jit
def _swiglu_fwd_kernel(
    h_ptr, w_ptr, out_ptr, num_valid_ptr, A, H, stride_h, stride_out,
    MAY_DROP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, rows_in, rows_ok = _row_block(num_valid_ptr, A, MAY_DROP, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_in = cols < H
    rows64 = rows.to(tl.int64)
    h_rows = h_ptr + rows64[:, None] * stride_h + cols[None, :]
    load_mask = rows_ok[:, None] & cols_in[None, :]
    gate = tl.load(h_rows, mask=load_mask, other=0.0).to(tl.float32)
    up = tl.load(h_rows + H, mask=load_mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + rows, mask=rows_ok, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up * w[:, None]
    out_rows = out_ptr + rows64[:, None] * stride_out + cols[None, :]
    tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=load_mask)


@triton.jit
def _swiglu_grads(gate, up, ghs, w):
    """SwiGLU's backward on fp32 tiles (``w`` per row): the gate and up gradients and the activation ``act``."""
    sig = tl.sigmoid(gate)
    silu = gate * sig
    act = silu * up
    grad_act = ghs * w[:, None]
    grad_up = grad_act * silu
    grad_gate = grad_act * up * sig * (1.0 + gate * (1.0 - sig))
    return grad_gate, grad_up, act


@triton.jit
def _swiglu_bwd_tile(gate, up, ghs, w, gh_ptr, hs_ptr, rows64, cols, mask, stride_gh, stride_hs, H: tl.constexpr):
    """The SwiGLU backward of one [rows, cols] tile (fp32 ``gate``, ``up``, ``ghs``; ``w`` per row): stores the
    gate and up gradients and the recomputed output ``act * w``, returns the tile's routing-weight gradient
    (``sum(ghs * act)`` per row). Shared by the plain and the LoRA SwiGLU backward kernels."""
    grad_gate, grad_up, act = _swiglu_grads(gate, up, ghs, w)
    gh_rows = gh_ptr + rows64[:, None] * stride_gh + cols[None, :]
    tl.store(gh_rows, grad_gate.to(gh_ptr.dtype.element_ty), mask=mask)
    tl.store(gh_rows + H, grad_up.to(gh_ptr.dtype.element_ty), mask=mask)
    hs_rows = hs_ptr + rows64[:, None] * stride_hs + cols[None, :]
    tl.store(hs_rows, (act * w[:, None]).to(hs_ptr.dtype.element_ty), mask=mask)
    return tl.sum(ghs * act, axis=1)


@triton.jit
def _swiglu_bwd_kernel(
    h_ptr, w_ptr, ghs_ptr, gh_ptr, gw_ptr, hs_ptr, num_valid_ptr, A,
    stride_h, stride_ghs, stride_gh, stride_hs,
    H: tl.constexpr, MAY_DROP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, rows_in, rows_ok = _row_block(num_valid_ptr, A, MAY_DROP, BLOCK_M)
    rows64 = rows.to(tl.int64)
    w = tl.load(w_ptr + rows, mask=rows_ok, other=0.0).to(tl.float32)
    grad_w = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, H, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cols_in = cols < H
        load_mask = rows_ok[:, None] & cols_in[None, :]
        store_mask = load_mask  # dropped rows are left unwritten: no consumer reads them
        h_rows = h_ptr + rows64[:, None] * stride_h + cols[None, :]
        gate = tl.load(h_rows, mask=load_mask, other=0.0).to(tl.float32)
        up = tl.load(h_rows + H, mask=load_mask, other=0.0).to(tl.float32)
        ghs = tl.load(ghs_ptr + rows64[:, None] * stride_ghs + cols[None, :], mask=load_mask, other=0.0)
        grad_w += _swiglu_bwd_tile(
            gate, up, ghs.to(tl.float32), w, gh_ptr, hs_ptr, rows64, cols, store_mask, stride_gh, stride_hs, H
        )
    tl.store(gw_ptr + rows, grad_w, mask=rows_in)


@triton.jit
def _gather_sum_kernel(
    src_ptr, index_ptr, weights_ptr, out_ptr, num_valid_ptr, D, stride_src, stride_out,
    K: tl.constexpr, MAY_DROP: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cols_in = cols < D
    if MAY_DROP:
        num_valid = tl.load(num_valid_ptr)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(K):
        row = tl.load(index_ptr + t * K + k)
        mask = cols_in
        if MAY_DROP:  # the row's test broadcast over the columns (Triton 3.9's interpreter refuses a scalar & tensor mask)
            mask = mask & (tl.zeros_like(cols) + row < num_valid)
        val = tl.load(src_ptr + row.to(tl.int64) * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            if MAY_DROP:
                val *= tl.load(weights_ptr + row, mask=row < num_valid, other=0.0).to(tl.float32)
            else:
                val *= tl.load(weights_ptr + row).to(tl.float32)
        acc += val
    tl.store(out_ptr + t.to(tl.int64) * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=cols_in)


@triton.jit
def _segment_sum_kernel(
    src_ptr, index_ptr, weights_ptr, offsets_ptr, out_ptr, D, stride_src, stride_out, WEIGHTED: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cols_in = cols < D
    end = tl.load(offsets_ptr + t)
    start = tl.load(offsets_ptr + t - 1, mask=t > 0, other=0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(start, end):
        row = tl.load(index_ptr + j).to(tl.int64)
        val = tl.load(src_ptr + row * stride_src + cols, mask=cols_in, other=0.0).to(tl.float32)
        if WEIGHTED:
            val *= tl.load(weights_ptr + row).to(tl.float32)
        acc += val
    tl.store(out_ptr + t.to(tl.int64) * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=cols_in)


@triton.jit
def _gather_rows_kernel(
    src_ptr, index_ptr, out_ptr, num_valid_ptr, A, D, stride_src, stride_out,
    MAY_DROP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows_in = rows < A
    if MAY_DROP:
        rows_in = rows_in & (rows < tl.load(num_valid_ptr))
    mask = rows_in[:, None] & (cols < D)[None, :]
    src_rows = tl.load(index_ptr + rows, mask=rows_in, other=0).to(tl.int64)
    vals = tl.load(src_ptr + src_rows[:, None] * stride_src + cols[None, :], mask=mask)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], vals, mask=mask)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def swiglu_forward(h_AF, weights_A, num_valid, may_drop):
    h_AF = _rows_contiguous(h_AF)
    A, F2 = h_AF.shape
    H = F2 // 2
    out_AH = torch.empty((A, H), dtype=h_AF.dtype, device=h_AF.device)
    BLOCK_M, BLOCK_N = 8, 256
    grid = (triton.cdiv(A, BLOCK_M), triton.cdiv(H, BLOCK_N))
    _swiglu_fwd_kernel[grid](
        h_AF, weights_A.contiguous(), out_AH, num_valid, A, H, h_AF.stride(0), out_AH.stride(0),
        MAY_DROP=may_drop, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return out_AH


def _swiglu_backward_inputs(h_AF, grad_hs_AH):
    """The SwiGLU backward kernels' row-contiguous inputs and their outputs ``grad_h_AF``, ``grad_w_A``, ``hs_AH``."""
    h_AF, grad_hs_AH = _rows_contiguous(h_AF), _rows_contiguous(grad_hs_AH)
    A, F2 = h_AF.shape
    grad_h_AF = torch.empty_like(h_AF)
    grad_w_A = torch.empty((A,), dtype=torch.float32, device=h_AF.device)
    hs_AH = torch.empty((A, F2 // 2), dtype=h_AF.dtype, device=h_AF.device)
    return h_AF, grad_hs_AH, grad_h_AF, grad_w_A, hs_AH


def swiglu_backward(h_AF, weights_A, grad_hs_AH, num_valid, may_drop):
    h_AF, grad_hs_AH, grad_h_AF, grad_w_A, hs_AH = _swiglu_backward_inputs(h_AF, grad_hs_AH)
    A, F2 = h_AF.shape
    H = F2 // 2
    BLOCK_M, BLOCK_N = 4, 512
    grid = (triton.cdiv(A, BLOCK_M),)
    _swiglu_bwd_kernel[grid](
        h_AF, weights_A.contiguous(), grad_hs_AH, grad_h_AF, grad_w_A, hs_AH, num_valid, A,
        h_AF.stride(0), grad_hs_AH.stride(0), grad_h_AF.stride(0), hs_AH.stride(0),
        H=H, MAY_DROP=may_drop, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return grad_h_AF, grad_w_A, hs_AH


@triton.jit
def _swiglu_whole_rows(h_ptr, num_valid_ptr, A, H, stride_h, MAY_DROP: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_H: tl.constexpr):
    """This program's BLOCK_M whole rows of h (gate and up halves, fp32; 0 where masked) and their indices and
    masks, for the fp8 SwiGLU kernels."""
    rows, rows_in, rows_ok = _row_block(num_valid_ptr, A, MAY_DROP, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    rows64 = rows.to(tl.int64)
    mask = rows_ok[:, None] & (cols < H)[None, :]
    h_rows = h_ptr + rows64[:, None] * stride_h + cols[None, :]
    gate = tl.load(h_rows, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_rows + H, mask=mask, other=0.0).to(tl.float32)
    return rows, rows_in, rows_ok, rows64, cols, mask, gate, up


@triton.jit
def _swiglu_fwd_fp8_kernel(
    h_ptr, w_ptr, q_ptr, scale_ptr, num_valid_ptr, A, H, stride_h, stride_q,
    FP8_MAX: tl.constexpr, EPS: tl.constexpr, MAY_DROP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # _swiglu_fwd_kernel's output, rounded to h's dtype as it stores it, quantized per row as _rowwise_fp8_kernel
    # does: whole rows per program, the bf16 output never written
    rows, rows_in, rows_ok, rows64, cols, mask, gate, up = _swiglu_whole_rows(
        h_ptr, num_valid_ptr, A, H, stride_h, MAY_DROP, BLOCK_M, BLOCK_H
    )
    w = tl.load(w_ptr + rows, mask=rows_ok, other=0.0).to(tl.float32)
    out = (gate * tl.sigmoid(gate) * up * w[:, None]).to(h_ptr.dtype.element_ty).to(tl.float32)
    scale = _pow2_fp8_scale(tl.max(tl.abs(out), axis=1), FP8_MAX, EPS)
    tl.store(scale_ptr + rows, scale, mask=rows_in)
    q = tl.clamp(out * scale[:, None], -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + rows64[:, None] * stride_q + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_fp8_kernel(
    h_ptr, w_ptr, ghs_ptr, gh_ptr, gw_ptr, hs_ptr, q_ptr, scale_ptr, mul_ptr, expert_ptr, num_valid_ptr, A,
    stride_h, stride_ghs, stride_gh, stride_hs, stride_q, stride_mul,
    H: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr, MAY_DROP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # _swiglu_bwd_kernel on whole rows, and its gate and up gradients (as stored, in h's dtype) times
    # mul[expert[row]] quantized per row as _rowwise_fp8_kernel does: grad_h is not read back
    rows, rows_in, rows_ok, rows64, cols, mask, gate, up = _swiglu_whole_rows(
        h_ptr, num_valid_ptr, A, H, stride_h, MAY_DROP, BLOCK_M, BLOCK_H
    )
    ghs = tl.load(ghs_ptr + rows64[:, None] * stride_ghs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + rows, mask=rows_ok, other=0.0).to(tl.float32)
    grad_w = _swiglu_bwd_tile(gate, up, ghs, w, gh_ptr, hs_ptr, rows64, cols, mask, stride_gh, stride_hs, H)
    tl.store(gw_ptr + rows, grad_w, mask=rows_in)
    grad_gate, grad_up, _ = _swiglu_grads(gate, up, ghs, w)
    mul_rows = mul_ptr + tl.load(expert_ptr + rows, mask=rows_in, other=0).to(tl.int64)[:, None] * stride_mul
    mul_gate = tl.load(mul_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mul_up = tl.load(mul_rows + H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    grad_gate = grad_gate.to(gh_ptr.dtype.element_ty).to(tl.float32) * mul_gate
    grad_up = grad_up.to(gh_ptr.dtype.element_ty).to(tl.float32) * mul_up
    amax = tl.maximum(tl.max(tl.abs(grad_gate), axis=1), tl.max(tl.abs(grad_up), axis=1))
    scale = _pow2_fp8_scale(amax, FP8_MAX, EPS)
    tl.store(scale_ptr + rows, scale, mask=rows_in)
    q_rows = q_ptr + rows64[:, None] * stride_q + cols[None, :]
    tl.store(q_rows, tl.clamp(grad_gate * scale[:, None], -FP8_MAX, FP8_MAX).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(q_rows + H, tl.clamp(grad_up * scale[:, None], -FP8_MAX, FP8_MAX).to(q_ptr.dtype.element_ty), mask=mask)


#: The longest SwiGLU half the fp8 SwiGLU kernels take (whole rows per program, held in registers).
SWIGLU_FP8_MAX_HIDDEN = 4096


def _swiglu_fp8_blocks(H: int) -> tuple[int, int, int]:
    BLOCK_H = triton.next_power_of_2(H)
    if BLOCK_H > SWIGLU_FP8_MAX_HIDDEN:
        raise ValueError(f"the fp8 SwiGLU kernels take hidden dims up to {SWIGLU_FP8_MAX_HIDDEN}, got {H}")
    return max(1, 2048 // BLOCK_H), BLOCK_H, 8 if BLOCK_H <= 2048 else 16


def _fp8_rows(A: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty fp8 rows [A, width] and their scales [A, 1] fp32 (a row quantizer's outputs)."""
    return (
        torch.empty((A, width), dtype=torch.float8_e4m3fn, device=device),
        torch.empty((A, 1), dtype=torch.float32, device=device),
    )


def swiglu_forward_fp8(h_AF, weights_A, num_valid, may_drop):
    """``rowwise_fp8(swiglu_forward(h, weights, ...))`` in one kernel: fp8 [A, H] and scales [A, 1] fp32."""
    h_AF = _rows_contiguous(h_AF)
    A, F2 = h_AF.shape
    H = F2 // 2
    q_AH, scale_A1 = _fp8_rows(A, H, h_AF.device)
    BLOCK_M, BLOCK_H, num_warps = _swiglu_fp8_blocks(H)
    _swiglu_fwd_fp8_kernel[(triton.cdiv(A, BLOCK_M),)](
        h_AF, weights_A.contiguous(), q_AH, scale_A1, num_valid, A, H, h_AF.stride(0), q_AH.stride(0),
        FP8_MAX=448.0, EPS=1e-12, MAY_DROP=may_drop, BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H, num_warps=num_warps,
    )
    return q_AH, scale_A1


def swiglu_backward_fp8(h_AF, weights_A, grad_hs_AH, num_valid, may_drop, mul_EF, expert_A):
    """``swiglu_backward(...)`` and ``rowwise_fp8(grad_h, mul_EF, expert_A)`` in one kernel: grad_h [A, 2H],
    grad_weights [A] fp32, hs [A, H], grad_h in fp8 [A, 2H] and its scales [A, 1] fp32."""
    h_AF, grad_hs_AH, grad_h_AF, grad_w_A, hs_AH = _swiglu_backward_inputs(h_AF, grad_hs_AH)
    mul_EF = _rows_contiguous(mul_EF)
    A, F2 = h_AF.shape
    H = F2 // 2
    q_AF, scale_A1 = _fp8_rows(A, F2, h_AF.device)
    BLOCK_M, BLOCK_H, num_warps = _swiglu_fp8_blocks(H)
    _swiglu_bwd_fp8_kernel[(triton.cdiv(A, BLOCK_M),)](
        h_AF, weights_A.contiguous(), grad_hs_AH, grad_h_AF, grad_w_A, hs_AH, q_AF, scale_A1, mul_EF,
        expert_A.contiguous(), num_valid, A, h_AF.stride(0), grad_hs_AH.stride(0), grad_h_AF.stride(0),
        hs_AH.stride(0), q_AF.stride(0), mul_EF.stride(0),
        H=H, FP8_MAX=448.0, EPS=1e-12, MAY_DROP=may_drop, BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H, num_warps=num_warps,
    )
    return grad_h_AF, grad_w_A, hs_AH, q_AF, scale_A1


def gather_sum(src_AD, index_TK, num_valid, may_drop, weights_A=None):
    src_AD = _rows_contiguous(src_AD)
    index_TK = index_TK.contiguous()
    T, K = index_TK.shape
    D = src_AD.shape[1]
    out_TD = torch.empty((T, D), dtype=src_AD.dtype, device=src_AD.device)
    BLOCK_D = min(_GATHER_SUM["BLOCK_D"], triton.next_power_of_2(D))
    grid = (T, triton.cdiv(D, BLOCK_D))
    weighted = weights_A is not None
    _gather_sum_kernel[grid](
        src_AD, index_TK, weights_A.contiguous() if weighted else src_AD, out_TD, num_valid, D, src_AD.stride(0),
        out_TD.stride(0), K=K, MAY_DROP=may_drop, WEIGHTED=weighted, BLOCK_D=BLOCK_D,
        num_warps=_GATHER_SUM["num_warps"],
    )
    return out_TD


def segment_sum(src_AD, index_J, offsets_T, weights_A=None):
    src_AD = _rows_contiguous(src_AD)
    T = offsets_T.shape[0]
    D = src_AD.shape[1]
    out_TD = torch.empty((T, D), dtype=src_AD.dtype, device=src_AD.device)
    BLOCK_D = min(1024, triton.next_power_of_2(D))
    grid = (T, triton.cdiv(D, BLOCK_D))
    weighted = weights_A is not None
    _segment_sum_kernel[grid](
        src_AD, index_J.contiguous(), weights_A.contiguous() if weighted else src_AD, offsets_T.contiguous(), out_TD,
        D, src_AD.stride(0), out_TD.stride(0), WEIGHTED=weighted, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return out_TD


# Tiles of the row gather and of the gather-sum, chosen by benchmarks/gather_tiles.py at D = 2048, 65536 rows on an
# H200: gather 8 x 512 at 4 warps 0.093 ms (4 x 1024: 0.101), gather-sum 1024 columns at 8 warps 0.075 ms (at 4
# warps: 0.088). The outputs are the same bits under every tiling.
_GATHER_ROWS = dict(BLOCK_M=8, BLOCK_D=512, num_warps=4)
_GATHER_SUM = dict(BLOCK_D=1024, num_warps=8)


def gather_rows(src_TD, index_A, num_valid, may_drop):
    src_TD = _rows_contiguous(src_TD)
    A = index_A.shape[0]
    D = src_TD.shape[1]
    out_AD = torch.empty((A, D), dtype=src_TD.dtype, device=src_TD.device)
    cfg = _GATHER_ROWS
    BLOCK_M, BLOCK_D = cfg["BLOCK_M"], min(cfg["BLOCK_D"], triton.next_power_of_2(D))
    grid = (triton.cdiv(A, BLOCK_M), triton.cdiv(D, BLOCK_D))
    _gather_rows_kernel[grid](
        src_TD, index_A.contiguous(), out_AD, num_valid, A, D, src_TD.stride(0), out_AD.stride(0),
        MAY_DROP=may_drop, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=cfg["num_warps"],
    )
    return out_AD


# --- LoRA on the routed experts: the low-rank products, rows sorted by expert (``offsets_E`` cumulative ends) ---


@triton.jit
def _expert_tile(offsets_ptr, tile, E, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """Tile ``tile`` of the row tiles laid expert by expert (each expert's rows cut into BLOCK_M-row tiles, the
    last one partial): ``(e, row0, hi)``, rows ``[row0, min(row0 + BLOCK_M, hi))`` of expert ``e``; ``e == E``
    past the last tile. As a grouped GEMM schedules its tiles: one expert per tile, so one weight tile."""
    es = tl.arange(0, BLOCK_E)
    in_e = es < E
    ends = tl.load(offsets_ptr + es, mask=in_e, other=0)
    starts = tl.load(offsets_ptr + es - 1, mask=in_e & (es > 0), other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tile_ends = tl.cumsum(tiles, 0)
    e = tl.sum((in_e & (tile_ends <= tile)).to(tl.int32), axis=0)
    mine = es == e
    first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), axis=0)
    row0 = tl.sum(tl.where(mine, starts, 0), axis=0) + (tile - first_tile) * BLOCK_M
    hi = tl.sum(tl.where(mine, ends, 0), axis=0)
    return e, row0, hi


@triton.jit
def _lowrank_add_kernel(
    y_ptr, z_ptr, w_ptr, offsets_ptr, E, N, scale,
    stride_y, stride_z, stride_we, stride_wn, stride_wr,
    R: tl.constexpr, PART_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # y[a, n] += scale * sum_k z[a, p*R + k] * w[e(a), n, k], p = n // PART_N (BLOCK_N divides PART_N)
    e, row0, hi = _expert_tile(offsets_ptr, tl.program_id(1), E, BLOCK_E, BLOCK_M)
    if e < E:  # rows past the last expert's end (dropped slots) are in no tile: left alone
        n0 = tl.program_id(0) * BLOCK_N
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = n0 + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_R)
        rows_ok = rows < hi
        cols_ok = cols < N
        rows64 = rows.to(tl.int64)
        z = tl.load(
            z_ptr + rows64[:, None] * stride_z + (n0 // PART_N) * R + ks[None, :],
            mask=rows_ok[:, None] & (ks < R)[None, :], other=0.0,
        )
        w = tl.load(
            w_ptr + e.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wr,
            mask=(ks < R)[:, None] & cols_ok[None, :], other=0.0,
        )
        y_tile = y_ptr + rows64[:, None] * stride_y + cols[None, :]
        mask = rows_ok[:, None] & cols_ok[None, :]
        y = tl.load(y_tile, mask=mask, other=0.0).to(tl.float32)
        y += scale * tl.dot(z.to(w.dtype), w)
        tl.store(y_tile, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expert_outer_tile(
    acc, start, hi, big_ptr, small_ptr, index_ptr, cols, cols_ok, ks, small_col0, stride_big, stride_small,
    R: tl.constexpr, HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rows = start + tl.arange(0, BLOCK_M)
    rows_ok = rows < hi
    if HAS_INDEX:
        src = tl.load(index_ptr + rows, mask=rows_ok, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    big = tl.load(big_ptr + src[:, None] * stride_big + cols[None, :], mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    small = tl.load(
        small_ptr + rows.to(tl.int64)[:, None] * stride_small + small_col0 + ks[None, :],
        mask=rows_ok[:, None] & (ks < R)[None, :], other=0.0,
    )
    return acc + tl.dot(tl.trans(big), small.to(big.dtype))


@triton.jit
def _expert_outer_kernel(
    big_ptr, small_ptr, index_ptr, offsets_ptr, out_ptr, N, scale,
    stride_big, stride_small, stride_oe, stride_on, stride_or,
    R: tl.constexpr, PART_N: tl.constexpr, HAS_INDEX: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # out[e, n, k] = scale * sum_{a in e} big[index[a] or a, n] * small[a, p*R + k], p = n // PART_N
    n0 = tl.program_id(0) * BLOCK_N
    e = tl.program_id(1)
    lo = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    hi = tl.load(offsets_ptr + e)
    cols = n0 + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_R)
    cols_ok = cols < N
    small_col0 = (n0 // PART_N) * R
    acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    if INTERPRET:  # the interpreter's range() refuses loaded bounds; the compiled for loop is pipelined
        start = lo
        while start < hi:
            acc = _expert_outer_tile(
                acc, start, hi, big_ptr, small_ptr, index_ptr, cols, cols_ok, ks, small_col0, stride_big,
                stride_small, R, HAS_INDEX, BLOCK_M,
            )
            start += BLOCK_M
    else:
        for start in range(lo, hi, BLOCK_M):
            acc = _expert_outer_tile(
                acc, start, hi, big_ptr, small_ptr, index_ptr, cols, cols_ok, ks, small_col0, stride_big,
                stride_small, R, HAS_INDEX, BLOCK_M,
            )
    out = out_ptr + e.to(tl.int64) * stride_oe + cols[:, None] * stride_on + ks[None, :] * stride_or
    tl.store(out, (scale * acc).to(out_ptr.dtype.element_ty), mask=cols_ok[:, None] & (ks < R)[None, :])


def _part_block(part_n: int, cap: int) -> int:
    """Largest power of two <= ``cap`` dividing ``part_n`` (a column block must not straddle two parts)."""
    b = cap
    while part_n % b:
        b //= 2
    return b


def lowrank_add_(y_AN, z_AP, w_ENR, offsets_E, scale, parts):
    assert y_AN.stride(-1) == 1 and z_AP.stride(-1) == 1
    E, N, R = w_ENR.shape
    part_n = N // parts
    BLOCK_M, BLOCK_N = 64, _part_block(part_n, 128)
    BLOCK_R = max(16, triton.next_power_of_2(R))
    # tiles: at most cdiv(A, BLOCK_M) + E (each expert's last tile may be partial); column blocks vary fastest,
    # so the programs reading one tile of z run together (z comes from L2 after the first)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(y_AN.shape[0], BLOCK_M) + E)
    _lowrank_add_kernel[grid](
        y_AN, z_AP, w_ENR, offsets_E, E, N, scale,
        y_AN.stride(0), z_AP.stride(0), *w_ENR.stride(),
        R=R, PART_N=part_n, BLOCK_E=triton.next_power_of_2(E),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, num_warps=8,
    )


def expert_outer(big_XN, small_AP, offsets_E, index_A, scale, parts, out_ENR):
    big_XN, small_AP = _rows_contiguous(big_XN), _rows_contiguous(small_AP)
    E, N, R = out_ENR.shape
    part_n = N // parts
    BLOCK_M, BLOCK_N = 64, _part_block(part_n, 128)
    BLOCK_R = max(16, triton.next_power_of_2(R))
    grid = (triton.cdiv(N, BLOCK_N), E)
    _expert_outer_kernel[grid](
        big_XN, small_AP, index_A if index_A is not None else offsets_E, offsets_E, out_ENR, N, scale,
        big_XN.stride(0), small_AP.stride(0), *out_ENR.stride(),
        R=R, PART_N=part_n, HAS_INDEX=index_A is not None, INTERPRET=_INTERPRET,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, num_warps=8,
    )
    return out_ENR


@triton.jit
def _rows_project_kernel(
    y_ptr, index_ptr, w_ptr, offsets_ptr, z_ptr, copy_ptr, E, scale,
    stride_y, stride_z, stride_copy, stride_we, stride_wn, stride_wr,
    R: tl.constexpr, PART_N: tl.constexpr, PARTS: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_COPY: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # z[a, p*R + k] = scale * sum_{n in part p} y[index[a] or a, n] * w[e(a), n, k]; copy[a] = y[index[a]]
    e, row0, hi = _expert_tile(offsets_ptr, tl.program_id(0), E, BLOCK_E, BLOCK_M)
    if e < E:  # rows past the last expert's end (dropped slots) are in no tile: neither read nor written
        rows = row0 + tl.arange(0, BLOCK_M)
        rows_ok = rows < hi
        rows64 = rows.to(tl.int64)
        if HAS_INDEX:
            src = tl.load(index_ptr + rows, mask=rows_ok, other=0).to(tl.int64)
        else:
            src = rows64
        ks = tl.arange(0, BLOCK_R)
        w_e = w_ptr + e.to(tl.int64) * stride_we
        for p in tl.static_range(PARTS):
            acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for n0 in range(p * PART_N, (p + 1) * PART_N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                cols_ok = cols < (p + 1) * PART_N
                mask = rows_ok[:, None] & cols_ok[None, :]
                y = tl.load(y_ptr + src[:, None] * stride_y + cols[None, :], mask=mask, other=0.0)
                if HAS_COPY:
                    tl.store(copy_ptr + rows64[:, None] * stride_copy + cols[None, :], y, mask=mask)
                w = tl.load(
                    w_e + cols[:, None] * stride_wn + ks[None, :] * stride_wr,
                    mask=cols_ok[:, None] & (ks < R)[None, :], other=0.0,
                )
                acc += tl.dot(y.to(w.dtype), w)
            tl.store(
                z_ptr + rows64[:, None] * stride_z + p * R + ks[None, :],
                (scale * acc).to(z_ptr.dtype.element_ty), mask=rows_ok[:, None] & (ks < R)[None, :],
            )


def rows_project(y_XN, w_ENR, offsets_E, index_A, scale, parts, copy):
    y_XN = _rows_contiguous(y_XN)
    E, N, R = w_ENR.shape
    A = index_A.shape[0] if index_A is not None else y_XN.shape[0]
    z_AP = torch.empty((A, parts * R), dtype=y_XN.dtype, device=y_XN.device)
    copy_AN = torch.empty((A if copy else 0, N), dtype=y_XN.dtype, device=y_XN.device)
    BLOCK_M, BLOCK_N = 64, 128
    _rows_project_kernel[(triton.cdiv(A, BLOCK_M) + E,)](
        y_XN, index_A if index_A is not None else offsets_E, w_ENR, offsets_E, z_AP, copy_AN, E, scale,
        y_XN.stride(0), z_AP.stride(0), copy_AN.stride(0), *w_ENR.stride(),
        R=R, PART_N=N // parts, PARTS=parts, HAS_INDEX=index_A is not None, HAS_COPY=copy,
        BLOCK_E=triton.next_power_of_2(E), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_R=max(16, triton.next_power_of_2(R)), num_warps=8,
    )
    return z_AP, copy_AN


@triton.jit
def _swiglu_lora_tile(
    h_ptr, b_e, xa_g, xa_u, rows64, rows_ok, cols, cols_ok, ks, scale, stride_h, stride_bn, stride_br,
    H: tl.constexpr, R: tl.constexpr,
):
    """Gate and up columns ``cols`` of ``h + scale * [xa_g @ B_g[e]^T, xa_u @ B_u[e]^T]`` for a tile of one
    expert's rows, in fp32 (the adapter's delta never rounded to h's dtype)."""
    mask = rows_ok[:, None] & cols_ok[None, :]
    b_mask = (ks < R)[:, None] & cols_ok[None, :]
    b_g = tl.load(b_e + cols[None, :] * stride_bn + ks[:, None] * stride_br, mask=b_mask, other=0.0)
    b_u = tl.load(b_e + (H + cols[None, :]) * stride_bn + ks[:, None] * stride_br, mask=b_mask, other=0.0)
    h_rows = h_ptr + rows64[:, None] * stride_h + cols[None, :]
    gate = tl.load(h_rows, mask=mask, other=0.0).to(tl.float32) + scale * tl.dot(xa_g, b_g)
    up = tl.load(h_rows + H, mask=mask, other=0.0).to(tl.float32) + scale * tl.dot(xa_u, b_u)
    return gate, up


@triton.jit
def _swiglu_lora_xa(xa_ptr, b_ptr, rows64, rows_ok, ks, stride_xa, R: tl.constexpr):
    """The tile's rows of ``xa`` [A, 2R]: gate part (columns [0, R)) and up part ([R, 2R))."""
    mask = rows_ok[:, None] & (ks < R)[None, :]
    xa_rows = xa_ptr + rows64[:, None] * stride_xa + ks[None, :]
    xa_g = tl.load(xa_rows, mask=mask, other=0.0).to(b_ptr.dtype.element_ty)
    xa_u = tl.load(xa_rows + R, mask=mask, other=0.0).to(b_ptr.dtype.element_ty)
    return xa_g, xa_u


@triton.jit
def _swiglu_lora_fwd_kernel(
    h_ptr, w_ptr, xa_ptr, b_ptr, offsets_ptr, out_ptr, E, scale,
    stride_h, stride_xa, stride_be, stride_bn, stride_br, stride_out,
    H: tl.constexpr, R: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # out = silu(gate') * up' * w, h' = h + scale * delta (see _swiglu_lora_tile), rows in expert tiles
    e, row0, hi = _expert_tile(offsets_ptr, tl.program_id(1), E, BLOCK_E, BLOCK_M)
    if e < E:  # rows past the last expert's end (dropped slots) are in no tile: neither read nor written
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_R)
        rows_ok = rows < hi
        cols_ok = cols < H
        rows64 = rows.to(tl.int64)
        b_e = b_ptr + e.to(tl.int64) * stride_be
        xa_g, xa_u = _swiglu_lora_xa(xa_ptr, b_ptr, rows64, rows_ok, ks, stride_xa, R)
        gate, up = _swiglu_lora_tile(
            h_ptr, b_e, xa_g, xa_u, rows64, rows_ok, cols, cols_ok, ks, scale, stride_h, stride_bn, stride_br, H, R
        )
        w = tl.load(w_ptr + rows, mask=rows_ok, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up * w[:, None]
        out_rows = out_ptr + rows64[:, None] * stride_out + cols[None, :]
        tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None] & cols_ok[None, :])


@triton.jit
def _swiglu_lora_bwd_kernel(
    h_ptr, w_ptr, xa_ptr, b_ptr, offsets_ptr, ghs_ptr, gh_ptr, gw_ptr, hs_ptr, E, scale,
    stride_h, stride_xa, stride_be, stride_bn, stride_br, stride_ghs, stride_gh, stride_hs,
    H: tl.constexpr, R: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # _swiglu_bwd_kernel at h' = h + scale * delta: one program per expert row tile, looping over the columns
    e, row0, hi = _expert_tile(offsets_ptr, tl.program_id(0), E, BLOCK_E, BLOCK_M)
    if e < E:  # dropped slots are in no tile: their grad_w is zeroed by the caller, the rest left unwritten
        rows = row0 + tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_R)
        rows_ok = rows < hi
        rows64 = rows.to(tl.int64)
        b_e = b_ptr + e.to(tl.int64) * stride_be
        xa_g, xa_u = _swiglu_lora_xa(xa_ptr, b_ptr, rows64, rows_ok, ks, stride_xa, R)
        w = tl.load(w_ptr + rows, mask=rows_ok, other=0.0).to(tl.float32)
        grad_w = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, H, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            cols_ok = cols < H
            mask = rows_ok[:, None] & cols_ok[None, :]
            gate, up = _swiglu_lora_tile(
                h_ptr, b_e, xa_g, xa_u, rows64, rows_ok, cols, cols_ok, ks, scale, stride_h, stride_bn,
                stride_br, H, R,
            )
            ghs = tl.load(ghs_ptr + rows64[:, None] * stride_ghs + cols[None, :], mask=mask, other=0.0)
            grad_w += _swiglu_bwd_tile(
                gate, up, ghs.to(tl.float32), w, gh_ptr, hs_ptr, rows64, cols, mask, stride_gh, stride_hs, H
            )
        tl.store(gw_ptr + rows, grad_w, mask=rows_ok)


# 16-row tiles of one expert (one B tile per column block), chosen by benchmarks/swiglu_lora_tiles.py at the
# Qwen3-30B-A3B shape on an H200 (benchmarks/NOTES.md, Issue 12): forward 16 x 128 at 4 warps (0.122 ms against
# 0.134 for the earlier 64 x 64 at 8 warps), backward 16 x 128 at 8 warps (0.227 ms against 0.331 for 64 x 32; the
# plain SwiGLU kernels take 0.079 / 0.175 ms on the same rows). Tiles of fixed rows holding several experts (one
# low-rank product per expert in the tile) measured slower at every size.
_SWIGLU_LORA_FWD = dict(BLOCK_M=16, BLOCK_N=128, num_warps=4)
_SWIGLU_LORA_BWD = dict(BLOCK_M=16, BLOCK_N=128, num_warps=8)


def _swiglu_lora_args(h_AF, xa_AP, b_ENR, offsets_E):
    E, F2, R = b_ENR.shape
    assert h_AF.stride(-1) == 1 and xa_AP.stride(-1) == 1 and xa_AP.shape[1] == 2 * R and F2 == h_AF.shape[1]
    consts = dict(H=F2 // 2, R=R, BLOCK_E=triton.next_power_of_2(E), BLOCK_R=max(16, triton.next_power_of_2(R)))
    return E, F2 // 2, consts


def swiglu_lora_forward(h_AF, weights_A, xa_AP, b_ENR, offsets_E, scale):
    h_AF, xa_AP = _rows_contiguous(h_AF), _rows_contiguous(xa_AP)
    E, H, consts = _swiglu_lora_args(h_AF, xa_AP, b_ENR, offsets_E)
    A = h_AF.shape[0]
    out_AH = torch.empty((A, H), dtype=h_AF.dtype, device=h_AF.device)
    BLOCK_M, BLOCK_N = _SWIGLU_LORA_FWD["BLOCK_M"], _SWIGLU_LORA_FWD["BLOCK_N"]
    # tiles as lowrank_add_'s: at most cdiv(A, BLOCK_M) + E, column blocks fastest (a tile's xa read from L2)
    grid = (triton.cdiv(H, BLOCK_N), triton.cdiv(A, BLOCK_M) + E)
    _swiglu_lora_fwd_kernel[grid](
        h_AF, weights_A.contiguous(), xa_AP, b_ENR, offsets_E, out_AH, E, scale,
        h_AF.stride(0), xa_AP.stride(0), *b_ENR.stride(), out_AH.stride(0), **consts, **_SWIGLU_LORA_FWD,
    )
    return out_AH


def swiglu_lora_backward(h_AF, weights_A, grad_hs_AH, xa_AP, b_ENR, offsets_E, scale):
    h_AF, xa_AP, grad_hs_AH = _rows_contiguous(h_AF), _rows_contiguous(xa_AP), _rows_contiguous(grad_hs_AH)
    E, H, consts = _swiglu_lora_args(h_AF, xa_AP, b_ENR, offsets_E)
    A = h_AF.shape[0]
    grad_h_AF = torch.empty_like(h_AF)
    hs_AH = torch.empty((A, H), dtype=h_AF.dtype, device=h_AF.device)
    grad_w_A = torch.zeros((A,), dtype=torch.float32, device=h_AF.device)  # dropped slots: in no tile, zero
    grid = (triton.cdiv(A, _SWIGLU_LORA_BWD["BLOCK_M"]) + E,)
    _swiglu_lora_bwd_kernel[grid](
        h_AF, weights_A.contiguous(), xa_AP, b_ENR, offsets_E, grad_hs_AH, grad_h_AF, grad_w_A, hs_AH, E, scale,
        h_AF.stride(0), xa_AP.stride(0), *b_ENR.stride(), grad_hs_AH.stride(0), grad_h_AF.stride(0),
        hs_AH.stride(0), **consts, **_SWIGLU_LORA_BWD,
    )
    return grad_h_AF, grad_w_A, hs_AH


@triton.jit
def _pow2_fp8_scale(amax, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    # torchao's amax_to_scale: FP8_MAX / max(amax, EPS) in fp64, to fp32, rounded down to a power of 2 (here by
    # clearing the mantissa bits: exact, where exp2(floor(log2)) on approximate hardware log2 may be off by one)
    scale = (FP8_MAX / tl.maximum(amax.to(tl.float64), EPS)).to(tl.float32)
    return (scale.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)


@triton.jit
def _load_rows_fp32(src_ptr, mul_rows, rows64, rows_in, cols, stride_src, K, HAS_MUL: tl.constexpr):
    # the [BLOCK_M, BLOCK_K] tile of rows x cols in fp32 (0 outside), times mul[expert[row], col] with HAS_MUL
    mask = rows_in[:, None] & (cols < K)[None, :]
    x = tl.load(src_ptr + rows64[:, None] * stride_src + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_MUL:
        x = x * tl.load(mul_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return x, mask


@triton.jit
def _rowwise_fp8_kernel(
    src_ptr, out_ptr, scale_ptr, mul_ptr, expert_ptr, A, stride_src, stride_out, stride_mul,
    K: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr, ONE_PASS: tl.constexpr, HAS_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # with HAS_MUL, each row a is first multiplied by mul[expert[a], :] (powers of 2: exact)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = rows < A
    rows64 = rows.to(tl.int64)
    mul_rows = mul_ptr
    if HAS_MUL:
        mul_rows = mul_ptr + tl.load(expert_ptr + rows, mask=rows_in, other=0).to(tl.int64) * stride_mul
    if ONE_PASS:  # BLOCK_K >= K: the rows are read once and held in registers
        cols = tl.arange(0, BLOCK_K)
        x, mask = _load_rows_fp32(src_ptr, mul_rows, rows64, rows_in, cols, stride_src, K, HAS_MUL)
        scale = _pow2_fp8_scale(tl.max(tl.abs(x), axis=1), FP8_MAX, EPS)
        tl.store(scale_ptr + rows, scale, mask=rows_in)
        q = tl.clamp(x * scale[:, None], -FP8_MAX, FP8_MAX)
        tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], q.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):  # pass 1: the row's amax
            x, mask = _load_rows_fp32(src_ptr, mul_rows, rows64, rows_in, start + tl.arange(0, BLOCK_K), stride_src,
                                      K, HAS_MUL)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale = _pow2_fp8_scale(amax, FP8_MAX, EPS)
        tl.store(scale_ptr + rows, scale, mask=rows_in)
        for start in range(0, K, BLOCK_K):  # pass 2: scale, saturate, cast (the rows read again)
            cols = start + tl.arange(0, BLOCK_K)
            x, mask = _load_rows_fp32(src_ptr, mul_rows, rows64, rows_in, cols, stride_src, K, HAS_MUL)
            q = tl.clamp(x * scale[:, None], -FP8_MAX, FP8_MAX)
            tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], q.to(out_ptr.dtype.element_ty), mask=mask)


# Rows of up to 32768 elements are quantized in one pass, held in registers (8192 elements per program at 8 warps,
# 16384 or 32768 at 16: up to 64 fp32 values per thread). The earlier kernel read each row twice, 4 rows x 1024
# columns at a time: its second read missed L2 at the Mixtral shape (2.57 ms for six calls, ~2.2G elements, about
# the time of reading everything twice from HBM; benchmarks/NOTES.md, Issue 13). Longer rows keep the two passes.
_ROWWISE_ONE_PASS_MAX = 32768


def rowwise_fp8(src_AK, mul_EK=None, expert_A=None):
    """[A, K] -> fp8 e4m3 [A, K] row-major and fp32 scales [A, 1]: one power-of-2 scale per row, exactly as
    torchao's ``tensor_to_scale(..., AXISWISE, axiswise_dim=-1, round_scales_to_power_of_2=True)`` and
    ``to_fp8_saturated`` compute them, in one kernel (the torch code makes ~5 passes over memory). With ``mul_EK``
    (powers of 2) and ``expert_A``, row a is first multiplied by ``mul_EK[expert_A[a]]``."""
    src_AK = _rows_contiguous(src_AK)
    A, K = src_AK.shape
    out_AK, scale_A1 = _fp8_rows(A, K, src_AK.device)
    one_pass = triton.next_power_of_2(K) <= _ROWWISE_ONE_PASS_MAX
    if one_pass:
        BLOCK_K = triton.next_power_of_2(K)
        BLOCK_M = max(1, 8192 // BLOCK_K)
        num_warps = 16 if BLOCK_M * BLOCK_K > 8192 else 8
    else:
        BLOCK_M, BLOCK_K, num_warps = 4, 1024, 4
    has_mul = mul_EK is not None
    if has_mul:
        mul_EK = _rows_contiguous(mul_EK)
    _rowwise_fp8_kernel[(triton.cdiv(A, BLOCK_M),)](
        src_AK, out_AK, scale_A1, mul_EK if has_mul else src_AK, expert_A if has_mul else src_AK, A,
        src_AK.stride(0), out_AK.stride(0), mul_EK.stride(0) if has_mul else 0,
        K=K, FP8_MAX=448.0, EPS=1e-12, ONE_PASS=one_pass, HAS_MUL=has_mul, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
        num_warps=num_warps,
    )
    return out_AK, scale_A1


@triton.jit
def _scaled_transpose_fp8_kernel(
    w_ptr, scale_ptr, out_ptr, N, K, FP8_MAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[e, k, n] = fp8(w[e, n, k] * scale[e, n]): tiles read along w's rows, stored along the output's (Triton's
    # coalescing pass transposes the tile through shared memory)
    e = tl.program_id(2).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (ns < N)[:, None] & (ks < K)[None, :]
    base = e * N * K
    x = tl.load(w_ptr + base + ns.to(tl.int64)[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + e * N + ns, mask=ns < N, other=0.0)
    q = tl.clamp(x * scale[:, None], -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + base + ks.to(tl.int64)[None, :] * N + ns[:, None], q, mask=mask)


def scaled_transpose_fp8(w_ENK, scale_EN):
    """[E, N, K], [E, N] fp32 -> fp8 e4m3 ``w * scale`` per row, saturated, as [E, N] x K with strides
    (N * K, 1, N) (column-major per expert: one read of w, one fp8 write)."""
    w_ENK = w_ENK.contiguous()
    E, N, K = w_ENK.shape
    out_ENK = torch.empty_strided((E, N, K), (N * K, 1, N), dtype=torch.float8_e4m3fn, device=w_ENK.device)
    BLOCK_N, BLOCK_K = 128, 64  # 128-byte segments of the fp8 columns written and of the bf16 rows read
    _scaled_transpose_fp8_kernel[(triton.cdiv(K, BLOCK_K), triton.cdiv(N, BLOCK_N), E)](
        w_ENK, scale_EN.contiguous(), out_ENK, N, K, FP8_MAX=448.0, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4,
    )
    return out_ENK


@triton.jit
def _colwise_transpose_fp8_kernel(
    w_ptr, out_ptr, scale_ptr, N, K, FP8_MAX: tl.constexpr, EPS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out[e, k, n] = fp8(w[e, n, k] * s[e, k]), s[e, k] from the amax over n of w[e, :, k]. Each program owns BLOCK_K
    # columns of one expert and reads them twice: the amax, then scale, saturate and store (the second read from L2:
    # BLOCK_K x N x 2 bytes per program)
    e = tl.program_id(1).to(tl.int64)
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_in = ks < K
    base = e * N * K
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        mask = (ns < N)[:, None] & k_in[None, :]
        x = tl.load(w_ptr + base + ns.to(tl.int64)[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
    scale = _pow2_fp8_scale(amax, FP8_MAX, EPS)
    tl.store(scale_ptr + e * K + ks, scale, mask=k_in)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        mask = (ns < N)[:, None] & k_in[None, :]
        x = tl.load(w_ptr + base + ns.to(tl.int64)[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(x * scale[None, :], -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + base + ks.to(tl.int64)[None, :] * N + ns[:, None], q, mask=mask)


def colwise_transpose_fp8(w_ENK):
    """[E, N, K] -> fp8 e4m3 ``w^T`` [E, K, N] contiguous with one power-of-2 scale per (expert, k) from the amax
    over n, and those scales [E, K] fp32: the values of ``rowwise_fp8_torch(w.transpose(-2, -1), dim=-1)`` (torchao's
    scale and saturation) in one kernel, each column block read twice (the second time from L2)."""
    w_ENK = w_ENK.contiguous()
    E, N, K = w_ENK.shape
    out_EKN = torch.empty((E, K, N), dtype=torch.float8_e4m3fn, device=w_ENK.device)
    scale_EK = torch.empty((E, K), dtype=torch.float32, device=w_ENK.device)
    BLOCK_N, BLOCK_K = 128, 64
    _colwise_transpose_fp8_kernel[(triton.cdiv(K, BLOCK_K), E)](
        w_ENK, out_EKN, scale_EK, N, K, FP8_MAX=448.0, EPS=1e-12, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4,
    )
    return out_EKN, scale_EK


@triton.jit
def _group_colwise_fp8_kernel(
    src_ptr, offsets_ptr, out_ptr, scale_ptr, N, stride_src, stride_out,
    ALIGNED: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # one program per (column block, expert group); tiles [BLOCK_M rows, BLOCK_N columns] read along the row-major
    # input's rows and stored into the column-major output along its columns (Triton's coalescing pass transposes
    # the tile through shared memory for the store).
    g = tl.program_id(1)
    start = tl.load(offsets_ptr + tl.maximum(g - 1, 0)) * (g > 0)
    end = tl.load(offsets_ptr + g)
    if ALIGNED:  # every group starts and ends on a multiple of 16 rows: 16-byte fp8 stores along a column
        start = tl.multiple_of(start, 16)
        end = tl.multiple_of(end, 16)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_in = cols < N
    cols64 = cols.to(tl.int64)
    amax_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=src_ptr.dtype.element_ty)  # |x| and max are exact in x's dtype
    for r in range(start, end, BLOCK_M):  # pass 1: each column's amax over the group's rows
        rows = r + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None] & cols_in[None, :]
        x = tl.load(src_ptr + rows.to(tl.int64)[:, None] * stride_src + cols[None, :], mask=mask, other=0.0)
        amax_MN = tl.maximum(amax_MN, tl.abs(x)).to(amax_MN.dtype)  # elementwise: one cross-thread max, after the loop
    amax = tl.max(amax_MN.to(tl.float32), axis=0)
    scale = _pow2_fp8_scale(amax, FP8_MAX, EPS)  # an empty group: FP8_MAX / EPS rounded, as torchao's kernel
    tl.store(scale_ptr + g * N + cols, scale, mask=cols_in)
    for r in range(start, end, BLOCK_M):  # pass 2: scale, saturate, cast, store transposed
        rows = r + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None] & cols_in[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(src_ptr + rows64[:, None] * stride_src + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(x * scale[None, :], -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + cols64[None, :] * stride_out + rows64[:, None], q, mask=mask)


def per_group_colwise_fp8(src_AN, offsets_E):
    """Row-major [A, N] -> fp8 e4m3 [A, N] column-major (strides (1, A)) and fp32 scales [E * N] (expert-major):
    one power-of-2 scale per column of each expert's rows, exactly torchao's
    ``triton_fp8_per_group_colwise_scales(src_AN.t().contiguous().t(), ...)`` without the transpose copy. Rows past
    ``offsets_E[-1]`` are not written."""
    src_AN = _rows_contiguous(src_AN)
    A, N = src_AN.shape
    E = offsets_E.shape[0]
    out_AN = torch.empty_strided((A, N), (1, A), dtype=torch.float8_e4m3fn, device=src_AN.device)
    scale_EN = torch.empty((E * N,), dtype=torch.float32, device=src_AN.device)
    # tiles of 128 rows x 64 columns: 128-byte segments both of the bf16 rows read and of the fp8 columns written
    BLOCK_M, BLOCK_N = 128, 64
    _group_colwise_fp8_kernel[(triton.cdiv(N, BLOCK_N), E)](
        src_AN, offsets_E, out_AN, scale_EN, N, src_AN.stride(0), out_AN.stride(1),
        ALIGNED=A % 16 == 0, FP8_MAX=448.0, EPS=1e-12, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return out_AN, scale_EN
