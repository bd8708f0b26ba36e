"""quack's Hopper GEMM in fp8 with rowwise scales multiplied in its epilogue and the left operand's rows gathered as
they load (CuTe-DSL; imported only where quack-kernels imports: :mod:`~torchtune_moe.modules._cute_fp8` calls it).

``out[r, n] = (sum_k a8[idx[r], k] * w8[e(r), n, k]) * a_scale[r] * w_scale[e(r), n]`` for the rows ``r`` of each
expert ``e`` (segments of ``cu_seqlens``), in bf16, fp32 accumulation with fp8 fast accumulation (as torch's
``_scaled_grouped_mm(..., use_fast_accum=True)``). ``a_scale`` and ``w_scale`` are the dequantization factors (the
reciprocals of the quantization's power-of-2 scales), per output row and per (expert, output column).

Written here because quack 0.4.1 has no scaled fp8 entry point: its default epilogue adds its row and column
vectors (a bias). This subclasses its Hopper GEMM with an epilogue that multiplies them instead (quack's own
``vec_multiply``), turns on fast accumulation (quack's default promotes the accumulator every K block: 65-330
TFLOP/s at OLMoE against 900-1270, benchmarks/fp8_gemms.py), and compiles it through quack's TVM-FFI path, cached
under this module's own key. quack 0.4.1's torch-to-CuTe dtype table has no fp8 entry: the fake tensors name the
CuTe types directly.

CPU compile check (no GPU, no driver: the DSL traces and lowers, then stops at loading the kernel):
``QUACK_ARCH=sm_90 CUTE_DSL_ARCH=sm_90a python -c "from torchtune_moe.modules._cute_fp8_kernels import _compile;
_compile.__wrapped__('k', 'k', (128, 192), (2, 1, 1), True, True, (9, 0))"`` raises at the driver load when the
kernel compiled.
"""

from typing import Optional

import torch

import cutlass.cute as cute
from cutlass import BFloat16, Float8E4M3FN, Float32
from quack.cache_utils import jit_cache
from quack.compile_utils import make_fake_tensor
from quack.cute_dsl_utils import get_device_capacity, get_max_active_clusters
from quack.epi_ops import vec_multiply
from quack.gemm_default_epi import GemmDefaultEpiMixin
from quack.gemm_sm90 import GemmSm90
from quack.gemm_tvm_ffi_utils import (
    compile_gemm_kernel,
    get_majors,
    make_fake_gemm_tensors,
    make_fake_scheduler_args,
    make_fake_varlen_args,
    make_scheduler_args,
    make_varlen_args,
    perm3d,
)
from quack.rounding import RoundingMode

__all__ = ["scaled_fp8_grouped_mm"]

#: (tile_m, tile_n, cluster_m, pingpong): the fastest of benchmarks/fp8_gemms.py's four at OLMoE for three of the
#: four GEMMs (128 x 192, a cluster of 2, ping-pong). Ping-pong only (one warp group per tile): with cooperative
#: tiles (two warp groups on one tile, 128 x 256) the scaled epilogue gave wrong values in scattered rows in one of
#: two runs of tests/modules/test_cute_fp8_gpu.py (a race, not found), so :func:`scaled_fp8_grouped_mm` refuses them.
DEFAULT_TILE = (128, 192, 2, True)


class _ScaledEpiMixin(GemmDefaultEpiMixin):
    """quack's default epilogue arguments, with the row vector (per output column, per expert) and the column vector
    (per output row) multiplied into the accumulator instead of added."""

    @cute.jit
    def epi_visit_subtile(self, params, epi_loop_tensors, tRS_rD: cute.Tensor, tRS_rC: Optional[cute.Tensor] = None):
        vec_multiply(self, tRS_rD, epi_loop_tensors["mColVecBroadcast"], epi_loop_tensors["mRowVecBroadcast"])
        return None


class ScaledFp8GemmSm90(_ScaledEpiMixin, GemmSm90):
    """quack's Hopper GEMM with the scaling epilogue and fp8 fast accumulation (its default promotes the accumulator
    every K block: 65-330 TFLOP/s at OLMoE against 900-1270, benchmarks/fp8_gemms.py)."""

    def __init__(self, *args, **kwargs):
        kwargs["fp8_fast_accum"] = True
        super().__init__(*args, **kwargs)


@jit_cache
def _compile(a_major: str, b_major: str, tile_mn: tuple, cluster_mnk: tuple, pingpong: bool, gather_a: bool,
             device_capacity: tuple):
    """The compiled kernel for one configuration (quack's in-memory and disk cache, keyed by this function)."""
    mA, mB, mD, mC, m, n, k, l = make_fake_gemm_tensors(
        Float8E4M3FN, Float8E4M3FN, BFloat16, None, a_major, b_major, "n", None, varlen_m=True, gather_A=gather_a
    )
    epi_args = ScaledFp8GemmSm90.EpilogueArguments(
        alpha=None,
        beta=None,
        mRowVecBroadcast=make_fake_tensor(Float32, (l, n), leading_dim=1, divisibility=4),
        mColVecBroadcast=make_fake_tensor(Float32, (m,), leading_dim=0, divisibility=4),
        add_to_output=False,
        rounding_mode=RoundingMode.RN,
        sr_seed=None,
    )
    return compile_gemm_kernel(
        ScaledFp8GemmSm90, Float8E4M3FN, tile_mn, cluster_mnk, pingpong, True, gather_a, False, device_capacity,
        mA, mB, mD, mC, epi_args, make_fake_scheduler_args(False, False, l),
        make_fake_varlen_args(True, False, gather_a, m),
    )


def scaled_fp8_grouped_mm(
    a8_AK: torch.Tensor,
    w8_ENK: torch.Tensor,
    a_scale_M: torch.Tensor,
    w_scale_EN: torch.Tensor,
    cu_seqlens_E1: torch.Tensor,
    index_M: Optional[torch.Tensor] = None,
    tile: tuple = DEFAULT_TILE,
) -> torch.Tensor:
    """``a8[index] @ w8[e]^T`` per expert segment, times ``a_scale`` per row and ``w_scale`` per (expert, column).

    Args:
        a8_AK (torch.Tensor): [A, K] float8_e4m3fn, K contiguous: the rows (or the rows ``index_M`` gathers).
        w8_ENK (torch.Tensor): [E, N, K] float8_e4m3fn, K contiguous.
        a_scale_M (torch.Tensor): [M] fp32, each output row's factor (the gathered rows' order).
        w_scale_EN (torch.Tensor): [E, N] fp32, contiguous.
        cu_seqlens_E1 (torch.Tensor): [E + 1] int32, the experts' row offsets from 0.
        index_M (torch.Tensor, optional): [M] int32, the row of ``a8_AK`` of each output row; None: ``M = A``.
        tile (tuple): (tile_m, tile_n, cluster_m, pingpong).

    Returns:
        torch.Tensor: [M, N] bf16.
    """
    tile_m, tile_n, cluster_m, pingpong = tile
    if not pingpong:
        raise ValueError(f"scaled_fp8_grouped_mm runs ping-pong tiles only (see DEFAULT_TILE), got {tile}")
    M = index_M.shape[0] if index_M is not None else a8_AK.shape[0]
    out_MN = torch.empty(M, w8_ENK.shape[1], dtype=torch.bfloat16, device=a8_AK.device)
    if M == 0:
        return out_MN
    A_p, B_p, D_p, _ = perm3d(a8_AK, w8_ENK, out_MN, None, varlen_m=True)
    a_major, b_major, _, _ = get_majors(A_p, B_p, D_p, None)
    capacity = get_device_capacity(a8_AK.device)
    cluster = (cluster_m, 1, 1)
    kernel = _compile(a_major, b_major, (tile_m, tile_n), cluster, pingpong, index_M is not None, capacity)
    epi_args = ScaledFp8GemmSm90.EpilogueArguments(
        alpha=None, beta=None, mRowVecBroadcast=w_scale_EN, mColVecBroadcast=a_scale_M, add_to_output=None,
        rounding_mode=None, sr_seed=None,
    )
    scheduler_args = make_scheduler_args(get_max_active_clusters(cluster_m, device_capacity=capacity), 8, None)
    kernel(A_p, B_p, D_p, None, epi_args, scheduler_args, make_varlen_args(cu_seqlens_E1, None, index_M), None)
    return out_MN
