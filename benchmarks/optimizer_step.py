"""The optimizer step alone: torch's fused AdamW against the recipe's compiled step, at real widths and depths.

    python benchmarks/optimizer_step.py [--shapes olmoe qwen3] [--layers 16 4] [--variants fused compiled] [--out DIR]
    python benchmarks/optimizer_step.py --shapes qwen3 --layers 48 --tiny   # tiny widths: host time and compile time

Needs a CUDA GPU (``--dry-run``: tiny shapes on CPU, foreach instead of fused). For each shape and depth (``--layers``
gives one depth per shape, in order; default 4): our bf16 model with random gradients, then

  fused             ``torch.optim.AdamW(fused=True)``, what the configs used before the step was compiled;
  compiled          ``torchtune_moe.training.compile_optimizer_step(opt, model.layers)`` (the recipe's
                    ``compile: true``): one compiled multi-tensor step per decoder layer, a graph shared by all;
  compiled_whole    the same function with one bucket (the whole step in one graph: its compile time grows
                    with the number of parameter tensors).

``--finish`` adds what the recipe does between the backward and the step, timed with the step: ``torchtune``
(torchtune's ``scale_grads`` by a 0-dim tensor, then torch's ``clip_grad_norm_``, then reading the norm: the recipe
before session 25) or ``ours`` (``grad_norms``, one host read, ``scale_and_clip_grads``: one multiply pass, or none
for the compiled step, which takes the factors); scale 1 / 8188 and ``clip_grad_norm`` 1.0, the gradients restored
before each timed step.

Reports: ``first_s`` (the first step, compile included), ``host_ms`` (median time until ``step()`` returns),
``step_ms`` (median time with the GPU's work, synchronized before and after), ``extra_mib`` (memory above the
parameters, gradients and states during a step), ``unique_graphs``. With ``--tiny`` the GPU work is negligible and
``host_ms`` is the host's cost per step.
"""

import argparse
import itertools
import os
import statistics
import sys
import time

import torch
from torchtune import training as tt_training

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _models import SHAPES, build_ours, hf_config, prepare_out, save_json  # noqa: E402

from torchtune_moe.training import (  # noqa: E402
    compile_optimizer_step,
    grad_norms,
    gradient_groups,
    scale_and_clip_grads,
)

VARIANTS = ("fused", "compiled", "compiled_whole")


def run(shape: str, layers: int, variant: str, tiny: bool, dev: str, steps: int, finish: str = "none") -> dict:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build_ours(hf_config(shape, layers=layers, seq_len=2048, tiny=tiny), dev,
                       dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    fused = variant == "fused" and dev == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-5, fused=fused, foreach=not fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))  # a changing lr, as in a run
    if variant == "compiled":
        compile_optimizer_step(opt, model.layers)
    elif variant == "compiled_whole":
        compile_optimizer_step(opt)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    saved = [p.grad.clone() for p in params] if finish != "none" else None
    scale = torch.tensor(1 / 8188, device=dev)

    def step():
        if finish == "torchtune":
            tt_training.scale_grads(model, scale)
            float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        elif finish == "ours":
            groups = gradient_groups(model)
            scale_and_clip_grads(groups, grad_norms(groups, scale.device).tolist(), 1 / 8188, 1.0, opt)
        opt.step()

    def restore():
        if saved is not None:
            torch._foreach_copy_([p.grad for p in params], saved)

    sync()
    t = time.perf_counter()
    step()
    sched.step()
    sync()
    first_s = time.perf_counter() - t
    for _ in range(2):
        restore()
        step()
        sched.step()
    sync()
    base = torch.cuda.memory_allocated() if dev == "cuda" else 0
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    host, total = [], []
    for _ in range(steps):
        restore()
        sync()
        t = time.perf_counter()
        step()
        host.append((time.perf_counter() - t) * 1e3)
        sync()
        total.append((time.perf_counter() - t) * 1e3)
        sched.step()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev == "cuda" else 0.0
    res = dict(first_s=first_s, host_ms=statistics.median(host), step_ms=statistics.median(total), extra_mib=extra,
               unique_graphs=counters["stats"]["unique_graphs"], tensors=len(params),
               params=sum(p.numel() for p in params))
    assert all(torch.isfinite(p).all() for p in params), f"{shape} {variant}: non-finite parameters"
    del model, opt, params, saved
    if dev == "cuda":
        torch.cuda.empty_cache()
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--layers", nargs="+", type=int, default=None,
                   help="decoder layers, one per shape (default 4 each)")
    p.add_argument("--variants", nargs="+", default=["fused", "compiled"], choices=VARIANTS)
    p.add_argument("--tiny", action="store_true", help="tiny widths: the host's cost and the compile time")
    p.add_argument("--finish", nargs="+", default=["none"], choices=["none", "torchtune", "ours"],
                   help="also time the recipe's work between the backward and the step (see above)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models: checks the script runs")
    args = p.parse_args()
    layers = args.layers or [4] * len(args.shapes)
    if len(layers) != len(args.shapes) or min(layers) < 1:
        p.error(f"--layers takes one depth >= 1 per shape ({len(args.shapes)}), got {args.layers}")
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("benchmarks/optimizer_step.py needs a CUDA GPU (or --dry-run)")
    prepare_out(p, args.out)
    dev = "cpu" if args.dry_run else "cuda"
    env = dict(gpu=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__)
    print(env, flush=True)
    results, lines = {}, [
        "| shape | layers | params | variant | finish | first step s | host ms | step ms | extra MiB | graphs |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for (shape, n), variant, finish in itertools.product(zip(args.shapes, layers), args.variants, args.finish):
        r = run(shape, n, variant, args.tiny or args.dry_run, dev, args.steps, finish)
        results[f"{shape}_{n}_{variant}" + ("" if finish == "none" else f"_{finish}")] = r
        line = (f"| {shape}{' (tiny)' if args.tiny or args.dry_run else ''} | {n} | {r['params'] / 1e9:.2f}B | "
                f"{variant} | {finish} | {r['first_s']:.1f} | {r['host_ms']:.2f} | {r['step_ms']:.2f} | "
                f"{r['extra_mib']:.0f} | {r['unique_graphs']} |")
        lines.append(line)
        print(line, flush=True)
    save_json(args.out, "optimizer_step.json", dict(env=env, results=results))
    if args.out:
        with open(os.path.join(args.out, "optimizer_step.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
