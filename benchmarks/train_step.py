"""Training step of 4-layer full-width MoE models: ours vs transformers' same-shape models.

    python benchmarks/train_step.py [--shapes qwen3 olmoe] [--variants ours ours_compile hf] [--out DIR]
    python benchmarks/train_step.py --profile --shapes qwen3 --out DIR   # also where each step's GPU time goes
    python benchmarks/train_step.py --prompt-frac 0.5 ...   # SFT-like labels: the first half of each sample masked

Needs a CUDA GPU. Each model: bf16 weights, batch 4 x 2048 random tokens, next-token cross-entropy on the
full logits plus the load-balancing aux loss, ``torch.optim.AdamW(fused=True)`` (transformers' ``Trainer``
default; every variant but ``ours_compiled_step``), ``zero_grad(set_to_none=True)``. Reports tokens/s (median step
time over the timed steps, CUDA events) and peak memory (``torch.cuda.max_memory_allocated`` over the timed
steps: weights, gradients, optimizer state and activations). ``--prompt-frac F``: the labels of the first F of
each sample are -100 (a masked prompt, as SFT datasets give; every variant gets the same labels). ``--profile``:
after the timed steps, ``--profile-steps`` more steps under ``torch.profiler``; the top ``--profile-rows`` (25) GPU
kernels by total time (ms per step, share, calls) of each shape and variant go to
``OUT/profile_<shape>_<variant>.txt``, and with ``--trace`` the timeline to ``OUT/trace_<shape>_<variant>.json.gz``.

Variants:
  ours          torchtune_moe model built from the same config.json values, eager, the same loss as hf
                (cross-entropy on the full fp32 logits).
  ours_chunked  the same with torchtune's chunked-output cross-entropy (``CEWithChunkedOutputLoss``, 8
                chunks: logits upcast one chunk at a time), as torchtune's recipes train.
  ours_compile  ours_chunked with each decoder layer compiled (``torchtune.training.compile_model``) and the
                loss compiled (``torchtune.training.compile_loss``).
  ours_linear_ce  ours_compile with ``torchtune_moe.modules.LinearCrossEntropyLoss`` (``num_output_chunks=8``
                and its default ``min_tokens_per_chunk=2048``: 4 chunks of 2048 tokens here; its per-chunk
                softmax compiled) and the final norm compiled too (``torchtune_moe.training.compile_model``, as
                the recipe compiles): the model returns hidden states, the loss applies the output projection and
                makes its gradients chunk by chunk, keeping no logits (the shipped configs' loss), and torch's
                fused AdamW.
  ours_fp8_dense  ours_linear_ce with ``enable_fp8_training`` (the recipe's option): the attention projections
                and dense MLPs through torchao's ``Float8Linear``, tensorwise scales (not a default variant: an
                fp8 step against transformers' bf16 one).
  ours_compiled_step  ours_linear_ce with the optimizer step compiled, as the shipped GPU configs train
                (``compile: true``, ``optimizer.fused: false``): AdamW's multi-tensor step compiled by
                ``torchtune_moe.training.compile_optimizer_step``, one graph shared by the decoder layers; its
                compile time is in the warm-up). On an H100/H200 the loss's softmax runs as quack's kernel.
  ours_torch_softmax  ours_compiled_step with the loss's softmax as compiled torch code instead of quack's
                cross-entropy kernel (the shipped configs before session 23; the same everywhere but on
                an H100/H200).
  hf            transformers ``*ForCausalLM`` from the config, ``experts_implementation="grouped_mm"``, sdpa
                attention, ``output_router_logits=True`` (its loss adds the aux loss).
"""

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import traceback
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _models import SHAPES, build_hf, build_ours, hf_config, kernel_table, prepare_out  # noqa: E402

from torchtune_moe.modules import collect_aux_loss, update_routers  # noqa: E402
from torchtune_moe.modules import linear_cross_entropy as lce_module  # noqa: E402

SEQ, BATCH = 2048, 4
DEV = "cuda"
PROMPT_FRAC = 0.0  # --prompt-frac

LAYERS = 4


def _mask_prompt(tokens: torch.Tensor) -> torch.Tensor:
    """[B, S] labels before the shift: the tokens, -100 over the first PROMPT_FRAC of each sample."""
    labels = tokens.clone()
    labels[:, : int(PROMPT_FRAC * tokens.shape[1])] = -100
    return labels


def run(name: str, variant: str, steps: int, warmup: int, profile_steps: int = 0, out: str = None,
        rows: int = 25, trace: bool = False) -> dict:
    config = hf_config(name, layers=LAYERS, seq_len=SEQ, tiny=DEV == "cpu")
    V = config["vocab_size"]
    torch.manual_seed(0)
    if variant == "hf":
        model = build_hf(config, DEV)

        def loss_fn(tokens):
            return model(input_ids=tokens, labels=_mask_prompt(tokens)).loss  # transformers shifts the labels

    else:
        model = build_ours(config, DEV)
        if variant == "ours":

            def loss_fn(tokens):
                logits = model(tokens)
                ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), _mask_prompt(tokens)[:, 1:].reshape(-1))
                return ce + collect_aux_loss(model)

        elif variant in ("ours_linear_ce", "ours_fp8_dense", "ours_compiled_step", "ours_torch_softmax"):
            from torchtune_moe.modules import LinearCrossEntropyLoss
            from torchtune_moe.training import compile_model, convert_to_float8_training

            if variant == "ours_fp8_dense":  # before compiling, as the recipe does (emulated on the dry run's CPU)
                convert_to_float8_training(model, "tensorwise", emulate=DEV == "cpu")
            lce = LinearCrossEntropyLoss(num_output_chunks=8)
            lce.set_model_output(model)
            compile_model(model, verbose=False)  # the recipe's: the decoder layers and the final norm
            lce.apply_compile_strategy()

            def loss_fn(tokens):
                labels = F.pad(_mask_prompt(tokens)[:, 1:], (0, 1), value=-100)
                return lce(model(tokens), labels) + collect_aux_loss(model)

        else:
            from torchtune import training
            from torchtune.modules.loss import CEWithChunkedOutputLoss

            chunked = CEWithChunkedOutputLoss(num_output_chunks=8)
            model.set_num_output_chunks(8)
            if variant == "ours_compile":
                training.compile_model(model, verbose=False)
                chunked = training.compile_loss(chunked, verbose=False)

            def loss_fn(tokens):
                labels = F.pad(_mask_prompt(tokens)[:, 1:], (0, 1), value=-100)
                return chunked(model(tokens), labels) + collect_aux_loss(model)

    n_params = sum(p.numel() for p in model.parameters())
    if variant in ("ours_compiled_step", "ours_torch_softmax"):
        from torchtune_moe.training import compile_optimizer_step

        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)  # foreach: the recipe's rule on a CPU
        compile_optimizer_step(opt, model.layers)  # a compiled graph per decoder layer, shared by all of them
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEV == "cuda")
    batches = [torch.randint(0, V, (BATCH, SEQ), device=DEV) for _ in range(4)]

    def step(i):
        loss = loss_fn(batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if variant != "hf":
            update_routers(model)
        return loss

    def profile():  # after the timed steps: the timing and peak memory are unaffected
        from torch.profiler import ProfilerActivity, profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            for i in range(profile_steps):
                step(i)
            if DEV == "cuda":
                torch.cuda.synchronize()
        table = f"{name} {variant}: {LAYERS} layers, batch {BATCH} x {SEQ}\n" + kernel_table(prof, profile_steps, rows)
        print(table, flush=True)
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"profile_{name}_{variant}.txt"), "w") as f:
                f.write(table + "\n")
            if trace:  # the timeline, for gaps between kernels (chrome://tracing or Perfetto read it gzipped)
                prof.export_chrome_trace(os.path.join(out, f"trace_{name}_{variant}.json.gz"))

    t0 = time.time()
    for i in range(warmup):
        loss = step(i)
    if DEV == "cpu":  # --dry-run: the code runs; no timing
        res = dict(step_ms=1.0, step_ms_all=[], tokens_per_s=1.0, peak_gib=0.0, params=n_params,
                   loss=loss.item(), warmup_s=time.time() - t0)
        if profile_steps:
            profile()
        return res
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        loss = step(i)
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    ms = [a.elapsed_time(b) for a, b in times]
    med = statistics.median(ms)
    res = dict(
        step_ms=med, step_ms_all=ms, tokens_per_s=BATCH * SEQ / (med * 1e-3),
        peak_gib=torch.cuda.max_memory_allocated() / 2**30, params=n_params, loss=loss.item(), warmup_s=warm_s,
    )
    if profile_steps:
        profile()
    del model, opt, batches
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--variants", nargs="+",
                   default=["hf", "ours", "ours_chunked", "ours_compile", "ours_linear_ce", "ours_compiled_step"],
                   choices=["hf", "ours", "ours_chunked", "ours_compile", "ours_linear_ce", "ours_fp8_dense",
                            "ours_compiled_step", "ours_torch_softmax"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--profile", action="store_true",
                   help="also profile --profile-steps steps after the timed ones: the top --profile-rows GPU "
                        "kernels by total time of each shape and variant, into OUT/profile_<shape>_<variant>.txt "
                        "(and printed)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-rows", type=int, default=25, help="kernels listed per profile (default 25)")
    p.add_argument("--trace", action="store_true",
                   help="with --profile: also the profiled steps' timeline, OUT/trace_<shape>_<variant>.json.gz")
    p.add_argument("--prompt-frac", type=float, default=0.0,
                   help="fraction of each sample's labels masked (-100) as a prompt, in [0, 1)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models: checks the script runs")
    args = p.parse_args()
    if args.trace and not (args.profile and args.out):
        p.error("--trace needs --profile and --out (or $OUT)")
    if args.profile_rows < 1:
        p.error(f"--profile-rows must be >= 1, got {args.profile_rows}")
    if not 0.0 <= args.prompt_frac < 1.0:
        p.error(f"--prompt-frac must be in [0, 1), got {args.prompt_frac}")
    global DEV, SEQ, BATCH, PROMPT_FRAC
    PROMPT_FRAC = args.prompt_frac
    if args.dry_run:
        DEV, SEQ, BATCH = "cpu", 32, 2
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/train_step.py needs a CUDA GPU")
    prepare_out(p, args.out)
    import transformers

    env = dict(gpu=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch=torch.__version__,
               transformers=transformers.__version__, prompt_frac=PROMPT_FRAC)
    print(env, flush=True)
    results = {}
    for name in args.shapes:
        for variant in args.variants:
            # ours_torch_softmax: LinearCrossEntropyLoss told that quack's kernel cannot serve it
            no_quack = (mock.patch.object(lce_module, "_quack_usable", lambda t, vocab: False)
                        if variant == "ours_torch_softmax" else contextlib.nullcontext())
            try:
                with no_quack:
                    r = run(name, variant, args.steps, args.warmup, args.profile_steps if args.profile else 0,
                            args.out, args.profile_rows, args.trace)
            except Exception as e:  # keep going: report the others
                traceback.print_exc()
                r = dict(error=repr(e)[:500])
                gc.collect()
                if DEV == "cuda":
                    torch.cuda.empty_cache()
            results.setdefault(name, {})[variant] = r
            if "error" in r:
                print(f"  {name} {variant}: FAILED {r['error'][:200]}", flush=True)
            else:
                print(f"  {name} {variant}: {r['tokens_per_s']:.0f} tok/s, step {r['step_ms']:.1f} ms, peak "
                      f"{r['peak_gib']:.1f} GiB, loss {r['loss']:.3f}, warm-up {r['warmup_s']:.0f}s", flush=True)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, "train_step.json"), "w") as f:
                    json.dump(dict(env=env, results=results), f, indent=1)
    lines = [
        f"Training step, 4 layers, batch {BATCH} x {SEQ}, bf16, AdamW, aux loss on, prompt masked over "
        f"{PROMPT_FRAC:.0%} of each sample, {env['gpu']}, torch {env['torch']}",
        "| shape | variant | tokens/s | vs hf | step ms | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in results.items():
        hf = rs.get("hf", {}).get("tokens_per_s")
        for v, r in rs.items():
            if "error" in r:
                lines.append(f"| {name} | {v} | failed | | | |")
                continue
            rel = f"{r['tokens_per_s'] / hf:.2f}x" if hf else "-"
            lines.append(f"| {name} | {v} | {r['tokens_per_s']:.0f} | {rel} | {r['step_ms']:.1f} | {r['peak_gib']:.1f} |")
    table = "\n".join(lines)
    if args.out:
        with open(os.path.join(args.out, "train_step.md"), "w") as f:
            f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
