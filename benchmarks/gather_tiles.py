"""Tile sweep of the token-choice layer's row kernels (``_kernels.gather_rows``: the dispatch gather of x, and in
backward of the output gradient and of x again; ``_kernels.gather_sum``: the combine and the input gradient's sum)
at the Qwen3-30B-A3B / OLMoE width (D 2048, 8192 tokens x top-8 = 65536 rows).

Each configuration (``_triton._GATHER_ROWS`` / ``_GATHER_SUM``) is timed alone (median of CUDA-event timings, 20
calls per pair of events) and its output compared with the default's (a copy and a fixed-order sum: equal bits).
With ``--layer`` the token-choice ``moe_layer`` (eager, forward + backward with its aux loss) at the Qwen3-30B-A3B
and OLMoE shapes is timed under the default and the best configurations, the steps interleaved.

    python3 benchmarks/gather_tiles.py --layer --out $OUT/gather    # one GPU (CUDA and Triton)
    python3 benchmarks/gather_tiles.py --dry-run                    # CPU, tiny shapes, the torch code
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _models import median_ms, save_json, sweep_setup  # noqa: E402

from torchtune_moe.models import moe_layer  # noqa: E402
from torchtune_moe.modules import _kernels  # noqa: E402

ROWS = [dict(BLOCK_M=m, BLOCK_D=d, num_warps=w) for m, d, w in
        [(4, 1024, 4), (1, 2048, 4), (1, 2048, 8), (2, 1024, 4), (2, 2048, 8), (4, 512, 4), (4, 2048, 8),
         (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (1, 1024, 4), (2, 512, 2)]]
SUMS = [dict(BLOCK_D=d, num_warps=w) for d, w in
        [(1024, 4), (2048, 4), (2048, 8), (512, 2), (512, 4), (256, 2), (1024, 2), (1024, 8)]]
LAYER_SHAPES = {"qwen3": (128, 8, 2048, 768, True), "olmoe": (64, 8, 2048, 1024, False)}  # moe_layer.py's


def _layer_times(T, pairs, repeats, iters, dev, dt, tokens, shapes):
    """``moe_layer`` (token choice, eager, as benchmarks/moe_layer.py builds it) forward + backward at each shape
    under each (name, rows config, sum config), steps interleaved round after round; median ms."""
    out = {}
    for shape in shapes:
        E, K, D, H, norm_topk = LAYER_SHAPES[shape] if not dev.type == "cpu" else (8, 2, 64, 32, True)
        torch.manual_seed(0)
        layer = moe_layer(
            dim=D, moe_hidden_dim=H, num_experts=E, experts_per_token=K, aux_loss_coeff=0.01, norm_topk_prob=norm_topk
        ).to(dev, dt).train()
        x = torch.randn(1, tokens, D, device=dev, dtype=dt, requires_grad=True)
        gy = torch.randn(1, tokens, D, device=dev, dtype=dt)

        def step():
            y = layer(x)
            torch.autograd.backward([y, layer.aux_loss], [gy, None])
            layer.zero_grad(set_to_none=True)
            x.grad = None

        times = {name: [] for name, _, _ in pairs}
        for _ in range(repeats):
            for name, rows_cfg, sum_cfg in pairs:
                T._GATHER_ROWS, T._GATHER_SUM = dict(rows_cfg), dict(sum_cfg)
                times[name].append(median_ms(step, iters=iters, warmup=2, per_event=1))
        out[shape] = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return out


def main():
    args, T, dev, dt = sweep_setup(__doc__, "gather_tiles.py", dict(_GATHER_ROWS={}, _GATHER_SUM={}), layer_repeats=5)
    tokens, K, D = (64, 2, 64) if args.dry_run else (8192, 8, 2048)
    A = tokens * K
    torch.manual_seed(0)
    # rows sorted by expert, as the token-choice dispatch lays them out: the token of each row, and each slot's row
    experts_TK = torch.randint(0, 128, (tokens, K), device=dev)
    order_A = experts_TK.flatten().argsort(stable=True)
    rows_A = (order_A // K).to(torch.int32)
    index_TK = order_A.argsort().view(tokens, K).to(torch.int32)
    num_valid = torch.tensor([A], dtype=torch.int32, device=dev)
    x_TD = torch.randn(tokens, D, device=dev, dtype=dt)
    y_AD = torch.randn(A, D, device=dev, dtype=dt)
    default = (dict(T._GATHER_ROWS), dict(T._GATHER_SUM))

    def gather():
        return _kernels.gather_rows(x_TD, rows_A, num_valid, False)

    def gsum():
        return _kernels.gather_sum(y_AD, index_TK, num_valid, False)

    ref_g, ref_s = gather(), gsum()
    result = {"device": str(dev), "shape": dict(tokens=tokens, K=K, D=D, A=A), "gather_rows": [], "gather_sum": []}
    for key, cfgs, fn, ref in [("gather_rows", ROWS, gather, ref_g), ("gather_sum", SUMS, gsum, ref_s)]:
        for cfg in cfgs:
            setattr(T, "_GATHER_ROWS" if key == "gather_rows" else "_GATHER_SUM", dict(cfg))
            try:
                same = bool(torch.equal(fn(), ref))
                ms = median_ms(fn, iters=3 if args.dry_run else 15)
            except Exception as e:  # a configuration the compiler refuses: reported
                print(f"{key} {cfg}: {e!r}"[:300], flush=True)
                continue
            result[key].append(dict(cfg=cfg, ms=ms, equal=same))
            print(f"{key:11s} {cfg}: {ms:.4f} ms{'' if same else ' DIFFERS'}", flush=True)
        T._GATHER_ROWS, T._GATHER_SUM = dict(default[0]), dict(default[1])
    best = {k: min((r for r in result[k] if r["equal"]), key=lambda r: r["ms"]) for k in ("gather_rows", "gather_sum")}
    result["best"] = best
    print(f"best gather_rows {best['gather_rows']}\nbest gather_sum {best['gather_sum']}", flush=True)

    if args.layer:
        pairs = [("default", *default), ("best", best["gather_rows"]["cfg"], best["gather_sum"]["cfg"])]
        result["layer_ms"] = _layer_times(
            T, pairs, args.layer_repeats, 2 if args.dry_run else 20, dev, dt, tokens, ["qwen3", "olmoe"]
        )
        for shape, ms in result["layer_ms"].items():
            print(f"layer {shape}: default {ms['default']:.3f} ms, best {ms['best']:.3f} ms", flush=True)
        T._GATHER_ROWS, T._GATHER_SUM = dict(default[0]), dict(default[1])
    save_json(args.out, "gather_tiles.json", result)


if __name__ == "__main__":
    main()
