"""The fp8 quantizers of ``expert_fp8`` at the Mixtral shape (8 experts, D 4096, H 14336, 8192 tokens x top-2 =
16384 rows), with equal bytes and scales checked against the torch code:

- ``_kernels.rowwise_fp8`` (activation rows, one scale per row) at the widths it meets there (x and grad_y 4096,
  hs 14336, grad_h 28672), with rows up to ``_triton._ROWWISE_ONE_PASS_MAX`` elements held in registers (one read)
  and longer ones in two passes: timed with the limit at 16384 (grad_h in two passes, the code before 2026-11-29)
  and at 32768 (the default: every width in one pass);
  also with a power-of-2 factor per (expert, column) (the input gradient's left operand, which carries the
  weight's row scales since 2026-11-29);
- the input gradient's right operand on both expert weights: ``_kernels.scaled_transpose_fp8`` (the forward's row
  scales, one read) against what the recipe used before, torchao's ``triton_fp8_rowwise_3d_transpose_rhs`` (one
  scale per (expert, k), two reads).

Median of CUDA-event timings (10 calls per pair of events); GB/s counts one read of the bf16 input and one write.

    python3 benchmarks/fp8_quantizers.py --out $OUT/q      # one GPU (CUDA, Triton, torchao)
    python3 benchmarks/fp8_quantizers.py --dry-run         # CPU, tiny shapes, the torch code
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _models import median_ms, prepare_out, save_json  # noqa: E402

from torchtune_moe.modules import _grouped_gemm as gg, _kernels  # noqa: E402

FP8 = torch.float8_e4m3fn


def _same(a, b):
    return all(torch.equal(x.view(torch.uint8) if x.dtype == FP8 else x, y.view(torch.uint8) if y.dtype == FP8 else y)
               for x, y in zip(a, b))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the torch code (the script's plumbing)")
    args = p.parse_args()
    if not args.dry_run and (not torch.cuda.is_available() or not _kernels._HAS_TRITON):
        sys.exit("fp8_quantizers.py needs a CUDA GPU and Triton (or --dry-run)")
    prepare_out(p, args.out)
    dev = torch.device("cpu" if args.dry_run else "cuda")
    A, E, D, H = (64, 2, 64, 96) if args.dry_run else (16384, 8, 4096, 14336)
    iters = 3 if args.dry_run else 10
    torch.manual_seed(0)
    result = {"device": str(dev), "shape": dict(A=A, E=E, D=D, H=H), "rowwise": [], "weights": []}

    for K in (D, H, 2 * H):
        x = torch.randn(A, K, device=dev).bfloat16()
        ref = gg.rowwise_fp8_torch(x, -1)
        row = {"K": K, "GB": A * K * 3 / 1e9}
        if args.dry_run:
            row["torch_code_ms"] = median_ms(lambda: gg.rowwise_fp8_torch(x, -1), iters=iters)
        else:
            T = _kernels._triton
            default = T._ROWWISE_ONE_PASS_MAX
            for limit in (16384, 32768):
                T._ROWWISE_ONE_PASS_MAX = limit
                row[f"one_pass_max_{limit}"] = dict(
                    ms=median_ms(lambda: _kernels.rowwise_fp8(x), iters=iters, per_event=10),
                    equal=_same(_kernels.rowwise_fp8(x), ref))
            T._ROWWISE_ONE_PASS_MAX = default
            mul = torch.exp2(-torch.randint(0, 8, (E, K), device=dev).float())
            expert = torch.arange(A, device=dev) * E // A
            ref_mul = gg.rowwise_fp8_torch(x.float() * mul[expert], -1)
            mul16 = mul.bfloat16()
            row["with_factor"] = dict(
                ms=median_ms(lambda: _kernels.rowwise_fp8(x, mul16, expert), iters=iters, per_event=10),
                equal=_same(_kernels.rowwise_fp8(x, mul16, expert), ref_mul))
        print(f"rowwise K={K}: {row}", flush=True)
        result["rowwise"].append(row)
        del x, ref

    for name, (N, K) in {"gate_up_proj": (2 * H, D), "down_proj": (D, H)}.items():
        w = (torch.randn(E, N, K, device=dev) * 0.02).bfloat16()
        ref = gg.transpose_rhs_fp8(w.transpose(-2, -1))
        row = {"weight": name, "shape": [E, N, K], "GB": E * N * K * 3 / 1e9}
        if args.dry_run:
            row["torch_code_ms"] = median_ms(lambda: gg.transpose_rhs_fp8(w.transpose(-2, -1)), iters=iters)
        else:
            from torchao.prototype.moe_training.kernels import triton_fp8_rowwise_3d_transpose_rhs

            def torchao():
                return triton_fp8_rowwise_3d_transpose_rhs(
                    w.transpose(-2, -1), output_dtype=FP8, round_scales_to_power_of_2=True)

            row["torchao"] = dict(ms=median_ms(torchao, iters=iters, per_event=10), equal=_same(torchao(), ref))
            q_NK, s_N1 = _kernels.rowwise_fp8(w.reshape(E * N, K))  # the forward's quantization of w
            s_EN = s_N1.view(E, N)
            row["ours_forward_scales"] = dict(
                ms=median_ms(lambda: _kernels.scaled_transpose_fp8(w, s_EN), iters=iters, per_event=10),
                equal=_same([_kernels.scaled_transpose_fp8(w, s_EN)], [q_NK.view(E, N, K)]))
        print(f"weight {name}: {row}", flush=True)
        result["weights"].append(row)
        del w, ref
    save_json(args.out, "fp8_quantizers.json", result)


if __name__ == "__main__":
    main()
