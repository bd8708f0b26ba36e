"""The routed experts' grouped GEMMs one by one, bf16 against fp8, through quack's CuTe-DSL kernels and torch's
``_scaled_grouped_mm``: how fast an fp8 grouped GEMM itself can be at each layer shape, before any quantization.

What the OLMoE fp8 target (issue 13: the fp8 layer 1.1x our bf16 one) needs from its GEMMs, measured
(docs/performance.md, "fp8 GEMMs: quack's against torch's"). 8192 tokens, balanced experts (every expert gets
T x K / E rows); operands already fp8 (unit scales) or bf16; per GEMM kind:

- ``up_fwd`` ``x[rows] @ gate_up^T``, ``down_fwd`` ``act @ down^T``, ``down_dgrad`` ``grad_y[rows] @ down``,
  ``up_dgrad`` ``grad_h @ gate_up``: quack with the rows gathered inside the GEMM where the layer gathers them
  (``[rows]``), at four tile configurations (tile_m x tile_n, cluster_m, ping-pong or cooperative), and torch's
  fp8 grouped GEMM on rows gathered beforehand (it cannot gather); ``--bf16`` also times quack in bf16 (the
  default path's GEMMs, without their SwiGLU epilogues);
- ``ours_scaled_*``: the same GEMMs through ``_cute_fp8_kernels.scaled_fp8_grouped_mm`` (expert_fp8's: quack's
  with power-of-2 row and column scales multiplied in its epilogue), ``err`` against torch's scaled GEMM on the
  same operands and scales;
- ``up_wgrad`` / ``down_wgrad`` (weight gradients): quack in bf16 (varlen over K, as the bf16 path) against
  torch's fp8 (column-major fp8 operands). quack's fp8 needs both operands K-major, which its varlen-K GEMM
  does not take.

quack 0.4.1 has no fp8 entry point: the script adds float8_e4m3fn to its dtype table and, with ``--accum fast``
(the default), subclasses its Hopper GEMM with ``fp8_fast_accum=True`` (what torch's ``use_fast_accum=True``
does; quack's default promotes the accumulator every K block, ``--accum slow``). Both touch quack internals and
live here only. No scales in the epilogue but for ``ours_scaled_*``: the times are the GEMMs' alone.

``err``: each quack fp8 output against ``F.grouped_mm`` of the same fp8 values in bf16 (relative Frobenius error;
fast accumulation adds ~1e-3). Median of 20 CUDA-event timings after 3 warm-up calls.

    python3 benchmarks/fp8_gemms.py --shapes olmoe qwen3 mixtral --out $OUT/fp8_gemms    # one H100/H200
    python3 benchmarks/fp8_gemms.py --shapes olmoe --accum slow --bf16
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _models import median_ms, prepare_out, save_json  # noqa: E402

# name: (tokens T, top-k K, experts E, dim D, expert hidden H)
SHAPES = {
    "olmoe": (8192, 8, 64, 2048, 1024),
    "qwen3": (8192, 8, 128, 2048, 768),
    "mixtral": (8192, 2, 8, 4096, 14336),
}
# (tile_m, tile_n, cluster_m, pingpong)
TILES = [(128, 256, 1, False), (128, 256, 2, False), (128, 192, 2, True), (256, 128, 2, False)]
FP8 = torch.float8_e4m3fn


def _quack(accum: str):
    """quack's GEMM entry point and config class, with fp8 operands allowed (and fast accumulation)."""
    import cutlass
    import quack.cute_dsl_utils as qcu
    import quack.gemm as qg
    from quack.gemm_config import GemmConfig
    from quack.gemm_interface import gemm_tuned

    qcu.torch2cute_dtype_map[FP8] = cutlass.Float8E4M3FN
    if accum == "fast" and not getattr(qg.GemmDefaultSm90, "_fast_accum", False):
        base = qg.GemmDefaultSm90

        class FastAccum(base):
            _fast_accum = True

            def __init__(self, *args, **kwargs):
                kwargs["fp8_fast_accum"] = True
                super().__init__(*args, **kwargs)

        qg.GemmDefaultSm90 = FastAccum
    return gemm_tuned.fn, GemmConfig


def _time(fn):
    """Median ms of one call: 20 calls, each between two CUDA events, after 3 warm-up calls."""
    return median_ms(fn, iters=20, warmup=3, per_event=1)


def _fp8(t):
    return t.float().clamp(-400, 400).to(FP8)


def run_shape(name, gemm, config_cls, bf16, accum):
    T, K, E, D, H = SHAPES[name]
    dev = "cuda"
    torch.manual_seed(0)
    TK = T * K
    rows = (torch.randperm(TK, device=dev) // K).to(torch.int32)  # the token of each row, E equal groups
    cu = torch.arange(0, TK + 1, TK // E, device=dev, dtype=torch.int32)
    offs = cu[1:]
    x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    act = torch.randn(TK, H, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    dh = torch.randn(TK, 2 * H, device=dev, dtype=torch.bfloat16)
    w1 = torch.randn(E, 2 * H, D, device=dev, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(E, D, H, device=dev, dtype=torch.bfloat16) * 0.02
    gemms = {  # name: (left operand, its row index or None, weight [E, N, K])
        "up_fwd": (x, rows, w1), "down_fwd": (act, None, w2),
        "down_dgrad": (dy, rows, w2.transpose(-2, -1).contiguous()),
        "up_dgrad": (dh, None, w1.transpose(-2, -1).contiguous()),
    }
    out_rows = []

    def record(gemm_name, variant, ms, flops, err=None):
        tflops = flops / ms / 1e9
        out_rows.append(dict(shape=name, gemm=gemm_name, variant=variant, ms=ms, tflops=tflops, err=err))
        e = "" if err is None else f"  err {err:.1e}"
        print(f"{name:8s} {gemm_name:11s} {variant:28s} {ms:7.3f} ms {tflops:6.0f} TFLOP/s{e}", flush=True)

    for gname, (a, idx, w) in gemms.items():
        N, Kd = w.shape[1], w.shape[2]
        flops = 2 * TK * N * Kd
        a8, w8 = _fp8(a), _fp8(w)
        kinds = [("fp8", a8, w8)] + ([("bf16", a, w)] if bf16 else [])
        for dt, aa, ww in kinds:
            for tm, tn, cm, pp in TILES:
                cfg = config_cls(
                    tile_m=tm, tile_n=tn, cluster_m=cm, cluster_n=1, pingpong=pp, is_dynamic_persistent=False
                )
                out = torch.empty(TK, N, device=dev, dtype=torch.bfloat16)
                label = f"quack_{dt}{'_' + accum if dt == 'fp8' else ''}_{tm}x{tn}c{cm}{'pp' if pp else 'co'}"
                try:
                    ms = _time(lambda: gemm(aa, ww.transpose(-2, -1), out, cu_seqlens_m=cu, A_idx=idx, config=cfg))
                except Exception as ex:  # a tile quack refuses for this dtype: say so, keep going
                    print(f"{name:8s} {gname:11s} {label:28s} FAILED {ex!r:.200}", flush=True)
                    continue
                err = None
                if dt == "fp8":
                    ref = F.grouped_mm(
                        (aa[idx.long()] if idx is not None else aa).to(torch.bfloat16),
                        ww.to(torch.bfloat16).transpose(-2, -1), offs=offs,
                    )
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                record(gname, label, ms, flops, err)
        # expert_fp8's GEMM (modules/_cute_fp8_kernels.py): quack's with the scales multiplied in its epilogue;
        # err against torch's scaled GEMM on the same operands and scales
        from torchtune_moe.modules._cute_fp8_kernels import scaled_fp8_grouped_mm

        a_scale = 2.0 ** torch.randint(-4, 0, (TK,), device=dev).float()
        w_scale = 2.0 ** torch.randint(-4, 0, (E, N), device=dev).float()
        ag8 = _fp8(a[idx.long()] if idx is not None else a)
        want = torch._scaled_grouped_mm(
            ag8, w8.transpose(-2, -1), a_scale, w_scale, offs, out_dtype=torch.bfloat16, use_fast_accum=True)
        for tile in ((128, 192, 2, True), (128, 128, 1, True)):
            label = f"ours_scaled_{tile[0]}x{tile[1]}c{tile[2]}{'pp' if tile[3] else 'co'}"
            try:
                got = scaled_fp8_grouped_mm(a8, w8, a_scale, w_scale, cu, idx, tile)
                err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                ms = _time(lambda: scaled_fp8_grouped_mm(a8, w8, a_scale, w_scale, cu, idx, tile))
                record(gname, label, ms, flops, err)
            except Exception as ex:
                print(f"{name:8s} {gname:11s} {label:28s} FAILED {ex!r:.300}", flush=True)
        ones_a, ones_w = torch.ones(TK, device=dev), torch.ones(E, N, device=dev)
        ms = _time(lambda: torch._scaled_grouped_mm(
            ag8, w8.transpose(-2, -1), ones_a, ones_w, offs, out_dtype=torch.bfloat16, use_fast_accum=True))
        record(gname, "torch_fp8_fast_pregathered", ms, flops)

    cfg = config_cls(tile_m=128, tile_n=256, cluster_m=1, cluster_n=1, pingpong=False, is_dynamic_persistent=False)
    for gname, g, a in (("up_wgrad", dh, x[rows.long()]), ("down_wgrad", dy[rows.long()], act)):
        N, Kd = g.shape[1], a.shape[1]
        flops = 2 * TK * N * Kd
        out = torch.empty(E, N, Kd, device=dev, dtype=torch.bfloat16)
        record(gname, "quack_bf16_128x256", _time(lambda: gemm(g.t(), a, out, cu_seqlens_k=cu, config=cfg)), flops)
        g8, a8 = _fp8(g).t().contiguous().t(), _fp8(a).t().contiguous().t()  # column-major
        ones_g, ones_a = torch.ones(E * N, device=dev), torch.ones(E * Kd, device=dev)
        ms = _time(lambda: torch._scaled_grouped_mm(
            g8.t(), a8, ones_g, ones_a, offs, out_dtype=torch.bfloat16, use_fast_accum=True))
        record(gname, "torch_fp8_fast", ms, flops)
    return out_rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["olmoe"], choices=list(SHAPES))
    p.add_argument("--accum", default="fast", choices=["fast", "slow"],
                   help="quack's fp8 accumulation: fast (fp8_fast_accum, as torch's use_fast_accum) or its default")
    p.add_argument("--bf16", action="store_true", help="also time quack's bf16 GEMMs at the same tiles")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        sys.exit("benchmarks/fp8_gemms.py needs a CUDA GPU of compute capability 9.x (H100, H200) and quack-kernels")
    prepare_out(p, args.out)
    gemm, config_cls = _quack(args.accum)
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, accum=args.accum)
    print(env, flush=True)
    rows = []
    for name in args.shapes:
        rows += run_shape(name, gemm, config_cls, args.bf16, args.accum)
    save_json(args.out, "fp8_gemms.json", dict(env=env, rows=rows))


if __name__ == "__main__":
    main()
