"""Tile sweep of the SwiGLU-LoRA kernels (``_kernels.swiglu_lora_forward`` / ``_backward``) at the Qwen3-30B-A3B
shape (E 128, H 768, rank 16, 8192 tokens x top-8 = 65536 rows), against the plain SwiGLU kernels on the same rows.

Tiles are BLOCK_M rows of one expert (laid expert by expert, grid cdiv(A, BLOCK_M) + E) by BLOCK_N columns; the
forward runs one column block per program, the backward loops over the columns (it sums grad_w per row). Two
other designs were timed with this script and dropped (benchmarks/NOTES.md, Issue 12): tiles of fixed rows
holding several experts, and kernels that also fuse the down adapter's products (slower).

Each configuration is timed alone (median of CUDA-event timings, 20 calls per pair of events) and checked against
the default configuration's outputs. With ``--layer`` the default, the previous default (64-row tiles) and the
sweep's best are then timed inside the whole LoRA layer (``benchmarks/lora.py``'s layer part: frozen and LoRA),
the steps interleaved. ``--dry-run``: CPU, tiny shapes, the torch code (the script's plumbing only).

    python3 benchmarks/swiglu_lora_tiles.py --layer --out $OUT/tiles     # one GPU (CUDA and Triton)
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _models import median_ms as _median_ms, routed_batch, save_json, sweep_setup  # noqa: E402

from torchtune_moe.modules import _kernels  # noqa: E402


PREVIOUS = (dict(BLOCK_M=64, BLOCK_N=64, num_warps=8), dict(BLOCK_M=64, BLOCK_N=32, num_warps=8))  # until 2026-11-29


def _configs():
    fwd = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w) for m, n, w in
           [(64, 64, 8), (64, 128, 8), (32, 64, 4), (32, 128, 4), (32, 64, 8), (16, 128, 4), (16, 64, 4),
            (16, 256, 4)]]
    bwd = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w) for m, n, w in
           [(64, 32, 8), (64, 64, 8), (32, 64, 4), (32, 64, 8), (16, 64, 4), (16, 128, 4), (16, 128, 8),
            (16, 256, 4), (16, 64, 2)]]
    return fwd, bwd


def _layer_times(T, pairs, repeats: int, iters: int, dev, dt, shape: dict):
    """The frozen and the LoRA layer (benchmarks/lora.py's layer part: Qwen3-30B-A3B shape, 8192 tokens, rank 16),
    forward + backward, for each (name, forward config, backward config): the steps interleaved (frozen, then
    LoRA under each configuration, round after round) so that clock drift hits all alike; median ms each."""
    from torchtune_moe.modules import MoELinear, dispatch_combine
    from torchtune_moe.modules.peft import LoRAMoELinear

    E, K, D, H, tokens = (shape[k] for k in ("E", "K", "D", "H", "tokens"))
    torch.manual_seed(0)
    x, routing, grad = routed_batch(E, K, D, tokens, dev, dt)
    torch.manual_seed(1)
    frozen = MoELinear(E, D, H).to(dev, dt).requires_grad_(False)
    lora = LoRAMoELinear.from_moe_linear(frozen, rank=16, alpha=32.0)
    with torch.no_grad():
        lora.lora_gate_up_b.normal_(0, 0.01)
        lora.lora_down_b.normal_(0, 0.01)
    params = [lora.get_parameter(n).requires_grad_(True) for n in lora.adapter_params()]

    def step(experts):
        xx = x.detach().requires_grad_(True)
        y, _ = dispatch_combine(xx, routing, experts)
        y.backward(grad)
        for p in params:
            p.grad = None

    runs = [("frozen", None, None)] + list(pairs)
    times = {name: [] for name, _, _ in runs}
    for _ in range(repeats):
        for name, f, b in runs:
            if f is not None:
                T._SWIGLU_LORA_FWD, T._SWIGLU_LORA_BWD = dict(f), dict(b)
            experts = frozen if name == "frozen" else lora
            times[name].append(_median_ms(lambda: step(experts), iters=iters, warmup=2, per_event=1))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}, times


def main():
    args, T, dev, dt = sweep_setup(__doc__, "swiglu_lora_tiles.py", dict(_SWIGLU_LORA_FWD={}, _SWIGLU_LORA_BWD={}), layer_repeats=7)
    shape = dict(E=128, K=8, D=2048, H=768, R=16, tokens=8192)  # Qwen3-30B-A3B, 8192 tokens, rank 16
    if args.dry_run:
        shape = dict(E=8, K=2, D=64, H=64, R=16, tokens=256)
    E, H, R, A, s = shape["E"], shape["H"], shape["R"], shape["tokens"] * shape["K"], 2.0
    torch.manual_seed(0)
    counts = torch.bincount(torch.randint(0, E, (A,), device=dev), minlength=E)
    offsets_E = counts.cumsum(0).to(torch.int32)
    num_valid = offsets_E[-1:]
    h = torch.randn(A, 2 * H, device=dev, dtype=dt)
    w = torch.rand(A, device=dev, dtype=dt)
    xa = torch.randn(A, 2 * R, device=dev, dtype=dt)
    b = 0.01 * torch.randn(E, 2 * H, R, device=dev, dtype=dt)
    ghs = torch.randn(A, H, device=dev, dtype=dt)
    default = (dict(T._SWIGLU_LORA_FWD), dict(T._SWIGLU_LORA_BWD))

    def fwd():
        return _kernels.swiglu_lora_forward(h, w, xa, b, offsets_E, s, num_valid)

    def bwd():
        return _kernels.swiglu_lora_backward(h, w, ghs, xa, b, offsets_E, s, num_valid)

    def rel(a, ref):
        return float((a.float() - ref.float()).norm() / ref.float().norm())

    ref_f, ref_b = fwd(), bwd()
    result = {"device": str(dev), "shape": dict(shape, A=A), "plain_ms": {
        "forward": _median_ms(lambda: _kernels.swiglu_forward(h, w, num_valid, False)),
        "backward": _median_ms(lambda: _kernels.swiglu_backward(h, w, ghs, num_valid, False)),
    }, "forward": [], "backward": []}
    print(f"plain SwiGLU kernels: forward {result['plain_ms']['forward']:.3f} ms, "
          f"backward {result['plain_ms']['backward']:.3f} ms", flush=True)
    fwd_cfgs, bwd_cfgs = _configs()
    for cfg in fwd_cfgs:
        T._SWIGLU_LORA_FWD = cfg
        try:
            err = rel(fwd(), ref_f)
            ms = _median_ms(fwd)
        except Exception as e:  # a configuration the compiler refuses (registers, shared memory): reported
            print(f"forward {cfg}: {e!r}"[:300], flush=True)
            continue
        result["forward"].append(dict(cfg=cfg, ms=ms, err=err))
        print(f"forward  {cfg}: {ms:.3f} ms err {err:.1e}", flush=True)
    T._SWIGLU_LORA_FWD = default[0]
    for cfg in bwd_cfgs:
        T._SWIGLU_LORA_BWD = cfg
        try:
            errs = [rel(a, r) for a, r in zip(bwd(), ref_b)]
            ms = _median_ms(bwd)
        except Exception as e:
            print(f"backward {cfg}: {e!r}"[:300], flush=True)
            continue
        result["backward"].append(dict(cfg=cfg, ms=ms, err=max(errs)))
        print(f"backward {cfg}: {ms:.3f} ms err {max(errs):.1e}", flush=True)
    T._SWIGLU_LORA_BWD = default[1]
    ok = lambda rows: [r for r in rows if r["err"] < 1e-2]  # noqa: E731
    best = (min(ok(result["forward"]), key=lambda r: r["ms"]), min(ok(result["backward"]), key=lambda r: r["ms"]))
    result["best"] = {"forward": best[0], "backward": best[1]}
    print(f"best forward {best[0]}\nbest backward {best[1]}", flush=True)

    if args.layer:  # the default, the previous default and the sweep's best (when neither)
        pairs = [("default", *default), ("previous (64-row tiles)", *PREVIOUS)]
        if (best[0]["cfg"], best[1]["cfg"]) not in [default, PREVIOUS]:
            pairs.append((f"fwd {best[0]['cfg']} bwd {best[1]['cfg']}", best[0]["cfg"], best[1]["cfg"]))
        medians, all_times = _layer_times(T, pairs, args.layer_repeats, 2 if args.dry_run else 20, dev, dt, shape)
        result["layer"] = {"median_ms": medians, "times_ms": all_times}
        for name, ms in medians.items():
            print(f"layer {name}: {ms:.3f} ms, {ms / medians['frozen']:.3f}x frozen", flush=True)
        T._SWIGLU_LORA_FWD, T._SWIGLU_LORA_BWD = default
    save_json(args.out, "swiglu_lora_tiles.json", result)


if __name__ == "__main__":
    main()
