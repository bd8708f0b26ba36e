"""The routed experts' grouped GEMMs through quack-kernels (CuTe-DSL, Hopper), with the dispatch gathers fused.

:func:`bf16_gemm` picks the grouped GEMMs of :class:`~torchtune_moe.modules.moe_linear._RoutedExperts`:
:data:`CUTE` when ``quack-kernels`` imports (a dependency of the package on Linux; a CPU install has no Triton,
so it does not import there), the tokens are bf16 on a compute-capability 9.x GPU (H100, H200) and the
environment does not say otherwise; else torch's ``F.grouped_mm``
(:data:`~torchtune_moe.modules._grouped_gemm.BF16`). The environment variable ``TORCHTUNE_MOE_GROUPED_GEMM`` is
``auto`` (the default), ``torch`` (never quack) or ``cute`` (quack or an error). Under ``auto`` a quack GEMM that
fails at run time (say the DSL's JIT on an unsupported driver) costs one warning: that call and every later one
compute the same result with torch's GEMMs (each op's fallback), and new layers take torch's path.

Why not torch's: quack's persistent Hopper GEMMs read a gathered operand's rows by index as they load them, so
the dispatch gathers of ``x`` (forward and up weight gradient) and of the output gradient (down input and weight
gradients) are never written out, and at 128 x 256 tiles they run the experts' GEMMs a little faster than
``F.grouped_mm``. Measured on one H200, compiled layer: OLMoE 5.08 -> 4.94 ms, Qwen3-30B-A3B 4.52 -> 4.29 ms, 256
MiB less peak memory per layer (benchmarks/NOTES.md, "quack's grouped GEMMs"). Two of them also run SwiGLU as they
store their output (the up projection) and SwiGLU's backward with the routing weights' gradient (the down
projection's input gradient), which replaces our two SwiGLU kernels (``CuteGroupedGemm.fuses_swiglu``): another
0.05-0.13 ms per compiled layer at OLMoE and Qwen3, and a smaller error, the activation coming from the fp32
accumulator. quack is a maintained package (the kernels of sonic-moe). We call its GEMM entry points with a fixed
tile configuration; its autotuner would compile dozens of kernels on the first step. Compiled, each call is a torch
custom op, so torch.compile treats each GEMM as one opaque node; eager, the op's function is called directly
(:mod:`~torchtune_moe.modules._custom_op`).

Costs:
- The first call of each GEMM kind in a process JIT-compiles it (2-4 s each). quack keeps the compiled kernels on
  disk (``QUACK_CACHE_DIR``, default a directory under the system's temp dir), so later processes load them in
  milliseconds.
- Each GEMM takes about 73 µs of host time from the layer (quack's entry point ~35 µs of it; torch's grouped GEMM:
  26-30 µs). The eager layer at the Qwen3-30B-A3B shape runs about as fast as the host issues it; through the
  custom op (~150 µs per GEMM) it was slower than with torch's GEMMs.

Results: the same fp32-accumulated bf16 GEMMs as torch's (GPU tests in ``tests/modules/test_cute_gemm_gpu.py``).
"""

import functools
import os
import warnings
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from torchtune_moe.modules._custom_op import custom_op
from torchtune_moe.modules._grouped_gemm import BF16, GroupedGemm, Rows, _deinterleave, _interleave, gathered
from torchtune_moe.modules._utils import is_hopper

__all__ = [
    "CUTE", "CuteGroupedGemm", "ENV_VAR", "bf16_gemm", "check_grouped_gemm_env", "cute_available", "dense_mm",
    "gemm_usable",
]

ENV_VAR = "TORCHTUNE_MOE_GROUPED_GEMM"
_CHOICES = ("auto", "torch", "cute")

# The tile configuration of all six GEMMs [tile_m, tile_n, cluster_m, pingpong]: 128 x 256, cooperative (two warp
# groups on one tile), no cluster. Chosen in the compiled layer on one H200 (benchmarks/NOTES.md, "quack's grouped
# GEMMs"): 2-3% faster per layer at OLMoE and Qwen3 than quack's default (128 x 192, a cluster of two, ping-pong);
# 256 x 128, 128 x 128 and no-cluster ping-pong were slower.
_TILE = [128, 256, 1, 0]
# The two GEMMs with SwiGLU (or its backward) in the epilogue: the same tile, faster in the compiled layer than
# 128 x 192 with a cluster of two ping-pong (sonic-moe's), 128 x 128 cluster 2 ping-pong and 256 x 128 (one H200;
# benchmarks/NOTES.md, "SwiGLU in quack's GEMM epilogues").
_SWIGLU_TILE = _TILE
# ``auto`` takes quack's GEMMs for experts up to this hidden dim: measured faster at 768 and 1024; at Mixtral's
# 14336 no faster (compiled, within the run-to-run spread of torch's; eager 1% slower with quack's default tile);
# between them untested.
_MAX_HIDDEN = 4096


class _Quack(NamedTuple):
    gemm: Callable  # quack's untuned GEMM entry points: plain,
    gated: Callable  # with SwiGLU in the epilogue,
    dgated: Callable  # with SwiGLU's backward in the epilogue
    config: type  # quack's GemmConfig


@functools.cache
def _quack_gemm() -> "_Quack | str":
    """quack's GEMMs and config class, or why quack (or its CUTLASS DSL, or Triton) cannot be imported here."""
    try:
        from quack.gemm_config import GemmConfig
        from quack.gemm_interface import gemm_dgated_tuned, gemm_gated_tuned, gemm_tuned
    except Exception as e:  # ImportError (no Triton in a CPU install), or the DSL failing to load its libraries
        return f"{type(e).__name__}: {e}"
    return _Quack(gemm_tuned.fn, gemm_gated_tuned.fn, gemm_dgated_tuned.fn, GemmConfig)


def cute_available() -> bool:
    """Whether quack-kernels can be imported here."""
    return not isinstance(_quack_gemm(), str)


def _env_choice() -> str:
    """``TORCHTUNE_MOE_GROUPED_GEMM`` (lower case; unset or empty: ``auto``), refused by name unless allowed."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(_CHOICES)}; got {os.environ[ENV_VAR]!r}")
    return choice


# The choice below is a constant for torch.compile (assume_constant_result): traced, the import and the
# device query would each break the graph.
@torch.compiler.assume_constant_result
def _choice(device_type: str, device_index: int, dtype: torch.dtype, hidden_dim: int) -> bool:
    """True: quack's GEMMs; False: torch's. Raises on a bad ``TORCHTUNE_MOE_GROUPED_GEMM``."""
    choice = _env_choice()
    if choice == "torch" or (choice == "auto" and _failed):
        return False
    usable = (
        device_type == "cuda" and dtype == torch.bfloat16 and is_hopper(device_index)
    )
    if choice == "cute":
        if not cute_available():
            raise RuntimeError(
                f"{ENV_VAR}=cute needs quack-kernels (installed with torchtune-moe on Linux), which could not be "
                f"imported here ({_quack_gemm()}); allowed without it: {ENV_VAR}=auto or torch"
            )
        if not usable:
            raise RuntimeError(
                f"{ENV_VAR}=cute runs bf16 tokens on a compute-capability 9.x GPU (H100, H200); got {dtype} "
                f"tokens on {device_type} (allowed there: {ENV_VAR}=auto or torch)"
            )
        return True
    return usable and hidden_dim <= _MAX_HIDDEN and cute_available()


def check_grouped_gemm_env(device: torch.device, dtype: torch.dtype) -> bool:
    """Checks ``TORCHTUNE_MOE_GROUPED_GEMM`` for tokens of ``dtype`` on ``device`` before any work (recipes call it
    at setup): whether quack's GEMMs can run there (for hidden dims up to :data:`_MAX_HIDDEN`).

    Raises:
        ValueError: the variable's value is not one of ``auto``, ``torch``, ``cute``; or it is ``cute`` and quack
            is missing, or the tokens are not bf16 on a compute-capability 9.x GPU.
    """
    index = device.index if device.index is not None else 0
    try:
        return _choice(device.type, index, dtype, 0)
    except RuntimeError as e:
        raise ValueError(str(e)) from e


def bf16_gemm(x_TD: torch.Tensor, num_rows: int, hidden_dim: int) -> GroupedGemm:
    """The grouped GEMMs for routed rows of ``x_TD`` (see the module doc): :data:`CUTE` or torch's.

    Args:
        x_TD (torch.Tensor): [T, D] the layer's tokens (their device and dtype decide).
        num_rows (int): A, the routed rows (none: torch's, nothing to run).
        hidden_dim (int): H, the experts' hidden dim (``auto`` takes quack's up to :data:`_MAX_HIDDEN`).
    """
    if num_rows == 0:
        return BF16
    index = x_TD.device.index if x_TD.device.index is not None else 0
    return CUTE if _choice(x_TD.device.type, index, x_TD.dtype, hidden_dim) else BF16


def gemm_usable(t: torch.Tensor) -> bool:
    """Whether quack's GEMMs serve operands like ``t`` here (bf16 on a compute-capability 9.x GPU, quack importable,
    none failed, ``TORCHTUNE_MOE_GROUPED_GEMM`` not ``torch``): the rule of :func:`bf16_gemm`, for the dense GEMMs
    other modules run through :func:`dense_mm`."""
    index = t.device.index if t.device.index is not None else 0
    return _choice(t.device.type, index, t.dtype, 0)


def dense_mm(a_MK: torch.Tensor, b_KN: torch.Tensor, tile: list[int]) -> torch.Tensor:
    """``a @ b`` ([M, K] x [K, N] -> [M, N], a's dtype, fp32 accumulation) through quack's dense GEMM at ``tile``
    (tile_m, tile_n, cluster_m, pingpong), eager; torch's ``mm`` where quack fails (as the grouped GEMMs, see
    :func:`_run`). For operands :func:`gemm_usable` accepts; ``b`` is read as its transpose [N, K] (a row-major
    weight ``w`` passed as ``w.t()`` is read in place)."""
    out_MN = a_MK.new_empty(a_MK.shape[0], b_KN.shape[1])
    if out_MN.numel() == 0 or a_MK.shape[1] == 0 or b_KN.shape[1] % (16 // out_MN.element_size()):
        return torch.mm(a_MK, b_KN)  # nothing to compute, or output rows quack's stores cannot align
    result = _run("gemm", lambda: torch.mm(a_MK, b_KN), tile, _operand(a_MK), _operand(b_KN.mT).mT, out_MN)
    return out_MN if result is None else result


def _operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` if quack can load it (unit stride in its last dim, 16-byte aligned rows and start, as TMA needs), else
    a copy. Compiled, the start is not checked (``storage_offset`` would break the graph): Inductor's buffers and
    the layer's inputs start aligned."""
    per_16_bytes = 16 // t.element_size()
    aligned = t.stride(-1) == 1 and all(s % per_16_bytes == 0 for s in t.stride()[:-1])
    if aligned and not torch.compiler.is_compiling():
        aligned = t.storage_offset() % per_16_bytes == 0
    return t if aligned else t.clone(memory_format=torch.contiguous_format)  # .contiguous() keeps a bad start


@functools.cache
def _config(tile: tuple[int, ...]):
    """quack's ``GemmConfig`` for ``tile`` (tile_m, tile_n, cluster_m, pingpong), made once."""
    tile_m, tile_n, cluster_m, pingpong = tile
    return _quack_gemm().config(
        tile_m=tile_m, tile_n=tile_n, cluster_m=cluster_m, cluster_n=1, pingpong=bool(pingpong),
        is_dynamic_persistent=False,
    )


# Set when a quack call failed in this process under ``auto``: from then on the ops compute with torch's grouped
# GEMMs (each op's fallback) and :func:`_choice` picks torch's for new layers and traces.
_failed: list[str] = []


def _run(kernel: str, fallback: Callable, tile: list[int], *args, **kwargs):
    """Calls quack's GEMM ``kernel`` (a field of :class:`_Quack`) with the config of ``tile``. If it fails (e.g. the
    DSL's JIT on this driver): under ``TORCHTUNE_MOE_GROUPED_GEMM=cute`` an error that says how to run without
    quack; under ``auto`` a warning (once) and ``fallback()``, torch's grouped GEMMs for the same result, for this
    and every later call."""
    if not _failed or _env_choice() == "cute":
        try:
            return getattr(_quack_gemm(), kernel)(*args, config=_config(tuple(tile)), **kwargs)
        except Exception as e:
            why = f"quack's grouped GEMM failed ({type(e).__name__}: {e})"
            if _env_choice() == "cute":
                raise RuntimeError(f"{why}; {ENV_VAR}=torch runs torch's grouped GEMM instead") from e
            _failed.append(why)
            warnings.warn(f"{why}; the MoE layers use torch's grouped GEMMs from now on in this process "
                          f"({ENV_VAR}=torch skips quack, {ENV_VAR}=cute makes this an error)")
    return fallback()


def _concat_dim(t: torch.Tensor) -> int:
    """The strided one of ``t``'s last two dims (the one quack's ``concat_layout`` reads or writes interleaved)."""
    return t.dim() - 2 if t.stride(-1) == 1 else t.dim() - 1


def _rows(a: torch.Tensor, a_idx: Optional[torch.Tensor]) -> torch.Tensor:
    """``a``, or its rows ``a_idx`` (the gather quack's loads make; the fallbacks' copy of it)."""
    return a if a_idx is None else a.index_select(0, a_idx)


def _torch_grouped_mm(a, b, cu_seqlens, a_idx, varlen_k, target, concat) -> torch.Tensor:
    """What :func:`_cute_grouped_mm` computes into ``target``, with torch's grouped GEMM (its fallback)."""
    # varlen_k: a is [K, T], gathered as [A, K] rows and viewed back (a [K, A] copy would need A to be a multiple
    # of 8: torch's grouped GEMM wants 16-byte aligned strides)
    a = _rows(a.t(), a_idx).t() if varlen_k else _rows(a, a_idx)
    if concat == "B":
        b = _interleave(b, _concat_dim(b))
    out = F.grouped_mm(a, b, offs=cu_seqlens[1:])
    return _deinterleave(out, _concat_dim(target)) if concat == "out" else out


@custom_op("cute_grouped_mm", device_types="cuda")
def _cute_grouped_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    cu_seqlens: torch.Tensor,
    a_idx: Optional[torch.Tensor],
    varlen_k: bool,
    transpose_out: bool,
    tile: list[int],
    concat: str = "",
) -> torch.Tensor:
    """quack's grouped GEMM ``a @ b`` over segments of ``cu_seqlens`` [L + 1] (int32, from 0): of a's rows
    (``varlen_k`` False: a [M or T, K], b [L, K, N] -> [M, N]) or of the reduction axis (True: a [M, K or T],
    b [K, N] -> [L, M, N], or [L, N, M] stored transposed with ``transpose_out``). ``a_idx`` [M] (or [K]) int32
    gathers a's rows (or columns) as they load. ``tile``: tile_m, tile_n, cluster_m, pingpong. ``concat`` "B" (or
    "out"): b's (the output's) strided dim holds [gate; up] halves, read (written) as interleaved columns."""
    out = _empty_out(a, b, cu_seqlens, a_idx, varlen_k, transpose_out)
    target = out.transpose(-2, -1) if transpose_out else out
    _run(
        "gemm", lambda: target.copy_(_torch_grouped_mm(a, b, cu_seqlens, a_idx, varlen_k, target, concat)), tile,
        a, b, target, cu_seqlens_m=None if varlen_k else cu_seqlens,
        cu_seqlens_k=cu_seqlens if varlen_k else None, A_idx=a_idx, concat_layout=(concat,) if concat else None,
    )
    return out


def _check_index(a_idx: Optional[torch.Tensor]) -> None:
    if a_idx is not None and a_idx.dtype != torch.int32:
        raise ValueError(f"quack's grouped GEMM gathers by an int32 index (CuteGroupedGemm.prepare), got {a_idx.dtype}")


def _empty_out(a, b, cu_seqlens, a_idx, varlen_k, transpose_out) -> torch.Tensor:
    """The GEMM's output, made empty (the op and its fake); refuses an index quack would misread."""
    _check_index(a_idx)
    if not varlen_k:
        rows = a_idx.shape[0] if a_idx is not None else a.shape[0]
        return a.new_empty(rows, b.shape[-1])
    L = cu_seqlens.shape[0] - 1
    return a.new_empty((L, b.shape[-1], a.shape[0]) if transpose_out else (L, a.shape[0], b.shape[-1]))


@_cute_grouped_mm.register_fake
def _(a, b, cu_seqlens, a_idx, varlen_k, transpose_out, tile, concat=""):
    return _empty_out(a, b, cu_seqlens, a_idx, varlen_k, transpose_out)


@custom_op("cute_swiglu_mm", device_types="cuda")
def _cute_swiglu_mm(
    a: torch.Tensor, b: torch.Tensor, cu_seqlens: torch.Tensor, a_idx: Optional[torch.Tensor], tile: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """quack's grouped GEMM with SwiGLU in its epilogue: ``h = a @ b`` over segments of a's rows (a [M or T, K],
    ``a_idx`` as in :func:`_cute_grouped_mm`; b [L, K, 2H], its 2H columns [gate; up]), stored as [M, 2H] with gate
    and up interleaved, and ``silu(gate) * up`` [M, H] from the fp32 accumulator."""
    h, act = _empty_swiglu(a, b, a_idx)

    def fallback():
        for t, r in zip((h, act), GroupedGemm.swiglu_forward(_rows(a, a_idx), b.transpose(-2, -1), cu_seqlens[1:])):
            t.copy_(r)

    _run("gated", fallback, tile, a, b, h, act, None, None, "swiglu", cu_seqlens, a_idx, False,
         concat_layout=("B",))
    return h, act


def _empty_swiglu(a, b, a_idx) -> tuple[torch.Tensor, torch.Tensor]:
    _check_index(a_idx)
    rows = a_idx.shape[0] if a_idx is not None else a.shape[0]
    return a.new_empty(rows, b.shape[-1]), a.new_empty(rows, b.shape[-1] // 2)


@_cute_swiglu_mm.register_fake
def _(a, b, cu_seqlens, a_idx, tile):
    return _empty_swiglu(a, b, a_idx)


@custom_op("cute_dswiglu_mm", device_types="cuda")
def _cute_dswiglu_mm(
    g: torch.Tensor,
    b: torch.Tensor,
    h: torch.Tensor,
    scale: torch.Tensor,
    cu_seqlens: torch.Tensor,
    g_idx: Optional[torch.Tensor],
    tile: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quack's grouped GEMM with SwiGLU's backward in its epilogue: ``d = g @ b`` over segments of g's rows (g
    [M or T, K], ``g_idx`` as ``a_idx`` of :func:`_cute_grouped_mm`; b [L, K, H]) and, with ``h`` [M, 2H] gate and
    up interleaved, ``a = silu(gate) * up`` and ``scale`` [M] fp32: the gradient of h for ``scale * d`` [M, 2H]
    (interleaved), ``scale * a`` [M, H], and ``sum(a * d)`` per row [M] fp32."""
    grad_h, scaled_act = _empty_dswiglu(h, g_idx)

    def fallback():
        d_h, d_scaled, d_reduced = GroupedGemm.swiglu_backward(_rows(g, g_idx), b, h, scale, cu_seqlens[1:])
        grad_h.copy_(d_h)
        scaled_act.copy_(d_scaled)
        return d_reduced.float()

    reduced = _run(  # quack sums the epilogue's per-tile partial sums into a new [M] fp32 tensor
        "dgated", fallback, tile, g, b, h, grad_h, scaled_act, colvec_scale=scale, activation="swiglu",
        colvec_reduce=True, cu_seqlens_m=cu_seqlens, A_idx=g_idx, dynamic_scheduler=False,
    )
    return grad_h, scaled_act, reduced


def _empty_dswiglu(h, g_idx) -> tuple[torch.Tensor, torch.Tensor]:
    _check_index(g_idx)
    return torch.empty_like(h), h.new_empty(h.shape[0], h.shape[1] // 2)


@_cute_dswiglu_mm.register_fake
def _(g, b, h, scale, cu_seqlens, g_idx, tile):
    return (*_empty_dswiglu(h, g_idx), h.new_empty(h.shape[0], dtype=torch.float32))


def _source(a: "torch.Tensor | Rows") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A row operand as quack loads it: (rows, None), or (source rows, int32 index) for a :class:`Rows`."""
    if isinstance(a, Rows):
        return _operand(a.src_TK), a.index_A
    return _operand(a), None


class CuteGroupedGemm(GroupedGemm):
    """quack's grouped GEMMs (bf16, compute capability 9.x), gathering :class:`Rows` operands as they load.
    Same operations and shapes as :class:`~torchtune_moe.modules._grouped_gemm.GroupedGemm`; the segments are
    ``cu_E1`` [E + 1] int32 bounds from 0 and :class:`Rows` index int32 (:meth:`prepare`)."""

    loads_rows = True

    @staticmethod
    def prepare(offsets_E: torch.Tensor, rows_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``offsets_E`` [E] int32 cumulative row ends -> ``cu_E1`` [E + 1] int32 from 0 (quack's segment bounds),
        and ``rows_A`` [A] as the int32 index quack's loads read."""
        return F.pad(offsets_E, (1, 0)), rows_A.to(torch.int32)

    @staticmethod
    def forward(a_AK: "torch.Tensor | Rows", w_ENK: torch.Tensor, cu_E1: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``a_AK @ w_ENK[e]^T`` per expert: [A, K], [E, N, K] -> [A, N]."""
        src, idx = _source(a_AK)
        out = _cute_grouped_mm(src, w_ENK.transpose(-2, -1), cu_E1, idx, False, False, _TILE)
        return out, None

    @staticmethod
    def input_grad(
        g_AN: "torch.Tensor | Rows", w_ENK: torch.Tensor, cu_E1: torch.Tensor, w_state=None
    ) -> torch.Tensor:
        """``g_AN @ w_ENK[e]`` per expert: [A, N], [E, N, K] -> [A, K]."""
        src, idx = _source(g_AN)
        return _cute_grouped_mm(src, w_ENK, cu_E1, idx, False, False, _TILE)

    @staticmethod
    def weight_grad(
        g_AN: "torch.Tensor | Rows", a_AK: "torch.Tensor | Rows", cu_E1: torch.Tensor
    ) -> torch.Tensor:
        """``g_AN[rows of e]^T @ a_AK[rows of e]`` per expert: [A, N], [A, K] -> [E, N, K]. quack gathers its
        left operand only: with ``a_AK`` a :class:`Rows`, it computes ``a^T g`` [E, K, N] into the transposed
        output."""
        if isinstance(a_AK, Rows) and not isinstance(g_AN, Rows):
            src, idx = _source(a_AK)
            return _cute_grouped_mm(src.t(), _operand(g_AN), cu_E1, idx, True, True, _TILE)
        src, idx = _source(g_AN)
        return _cute_grouped_mm(src.t(), _operand(gathered(a_AK)), cu_E1, idx, True, False, _TILE)


    fuses_swiglu = True

    @staticmethod
    def swiglu_forward(
        x_AD: "torch.Tensor | Rows", w_EFD: torch.Tensor, cu_E1: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`GroupedGemm.swiglu_forward`: one GEMM, SwiGLU in its epilogue."""
        src, idx = _source(x_AD)
        return _cute_swiglu_mm(src, w_EFD.transpose(-2, -1), cu_E1, idx, _SWIGLU_TILE)

    @staticmethod
    def swiglu_backward(
        g_AD: "torch.Tensor | Rows", w_EDH: torch.Tensor, h_AF: torch.Tensor, weights_A: torch.Tensor,
        cu_E1: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See :meth:`GroupedGemm.swiglu_backward`: one GEMM, SwiGLU's backward and the weights' gradient in its
        epilogue."""
        src, idx = _source(g_AD)
        return _cute_dswiglu_mm(src, w_EDH, _operand(h_AF), _operand(weights_A.float()), cu_E1, idx, _SWIGLU_TILE)

    @staticmethod
    def swiglu_input_grad(grad_h_AF: torch.Tensor, w_EFD: torch.Tensor, cu_E1: torch.Tensor) -> torch.Tensor:
        """See :meth:`GroupedGemm.swiglu_input_grad`: the weight's [gate; up] rows read interleaved."""
        return _cute_grouped_mm(_operand(grad_h_AF), w_EFD, cu_E1, None, False, False, _TILE, "B")

    @staticmethod
    def swiglu_weight_grad(
        grad_h_AF: torch.Tensor, x_AD: "torch.Tensor | Rows", cu_E1: torch.Tensor
    ) -> torch.Tensor:
        """See :meth:`GroupedGemm.swiglu_weight_grad`: ``x^T grad_h`` (x gathered as it loads) into the transposed
        output, its interleaved columns written as [gate; up] rows."""
        src, idx = _source(x_AD)
        return _cute_grouped_mm(src.t(), _operand(grad_h_AF), cu_E1, idx, True, True, _TILE, "out")


CUTE = CuteGroupedGemm()
