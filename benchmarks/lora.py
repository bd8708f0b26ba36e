"""LoRA / QLoRA on the GPU: the routed-expert layer's cost with adapters, and Qwen3-30B-A3B training on one GPU.

    python benchmarks/lora.py [--parts layer model] [--tokens 8192] [--rank 16] [--out DIR]
    python benchmarks/lora.py --dry-run          # tiny shapes on CPU: checks the code only

layer: the routed experts of one MoE layer at the Qwen3-30B-A3B shape (E 128, K 8, D 2048, H 768), forward +
       backward of ``dispatch_combine`` on ``--tokens`` tokens (routing fixed, input gradient needed as in a
       model), median of CUDA-event timings: frozen base (no weight gradients), LoRA (per-expert adapters,
       rank ``--rank``, through the Triton adapter kernels), LoRA with the adapters' torch code (grouped GEMMs
       and separate adds: ``lora_kernels = False``, the path before the kernels), QLoRA (NF4 base weights), and
       the base trained in full for reference.
model: Qwen3-30B-A3B at full depth (48 layers, random init, real shapes) with adapters on q/k/v/o and the
       routed experts, one GPU, bf16, activation checkpointing, AdamW on the adapters, ``--batch`` x
       ``--seq-len`` random tokens per step: LoRA (bf16 base) and QLoRA (NF4 base). Reports tokens/s and the peak
       memory of training (and of building the model, which holds the bf16 base before quantizing).
"""

import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchtune_moe.modules import MoELinear, TokenChoiceTopKRouter, collect_aux_loss, dispatch_combine  # noqa: E402
from torchtune_moe.modules.peft import LoRAMoELinear  # noqa: E402

GiB = 1024**3


def _time(fn, iters: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` (CUDA events; wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_layer(args, dev, dtype) -> dict:
    E, K, D, H = (128, 8, 2048, 768) if not args.dry_run else (8, 2, 64, 32)
    T = args.tokens if not args.dry_run else 256
    torch.manual_seed(0)
    router = TokenChoiceTopKRouter(D, E, K, norm_topk_prob=True).to(dev, dtype)
    x = torch.randn(T, D, device=dev, dtype=dtype)
    with torch.no_grad():
        routing = router(x)
    grad = torch.randn(T, D, device=dev, dtype=dtype)

    def variant(name):
        torch.manual_seed(1)  # the same weights in every variant (lora and lora_torch are compared below)
        base = MoELinear(E, D, H).to(dev, dtype)
        if name == "full":
            return base
        base.requires_grad_(False)
        if name == "frozen":
            return base
        lora = LoRAMoELinear.from_moe_linear(base, rank=args.rank, alpha=2.0 * args.rank, quantize_base=name == "qlora")
        lora.lora_kernels = name != "lora_torch"
        lora.quantize_base_weights()
        with torch.no_grad():
            lora.lora_gate_up_b.normal_(0, 0.01)
            lora.lora_down_b.normal_(0, 0.01)
        for p in lora.adapter_params():
            lora.get_parameter(p).requires_grad_(True)
        return lora

    out = {"shape": dict(E=E, K=K, D=D, H=H, tokens=T, rank=args.rank), "ms": {}}
    results = {}
    for name in ("frozen", "lora", "lora_torch", "qlora", "full"):
        experts = variant(name)
        params = [p for p in experts.parameters() if p.requires_grad]

        def step():
            xx = x.detach().requires_grad_(True)
            y, _ = dispatch_combine(xx, routing, experts)
            y.backward(grad)
            for p in params:
                p.grad = None

        out["ms"][name] = 1000 * _time(step, iters=5 if args.dry_run else 20)
        if name in ("lora", "lora_torch"):  # one more step, kept: the kernels against the torch code
            xx = x.detach().requires_grad_(True)
            y, _ = dispatch_combine(xx, routing, experts)
            y.backward(grad)
            results[name] = [y.detach(), xx.grad] + [p.grad for p in params]
            for p in params:
                p.grad = None
        if args.profile and name in ("frozen", "lora", "lora_torch"):
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(3):
                    step()
            sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
            print(f"--- profile: {name} (3 steps)\n" + prof.key_averages().table(sort_by=sort, row_limit=20), flush=True)
        del experts, params
        gc.collect()
    # relative error of the kernels' output and gradients (x, then the adapter factors) against the torch code
    out["lora_kernels_rel_err"] = [
        float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))
        for a, b in zip(results["lora"], results["lora_torch"])
    ]
    for name in ("lora", "lora_torch", "qlora", "full"):
        out[f"{name}_over_frozen"] = out["ms"][name] / out["ms"]["frozen"]
    return out


def bench_model(args, dev, dtype, quantize: bool) -> dict:
    from torchtune import training
    from torchtune.modules import TransformerSelfAttentionLayer
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from torchtune_moe.models import lora_model, moe

    torch.manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    lora_kwargs = dict(
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_experts=True,
        lora_rank=args.rank, lora_alpha=2.0 * args.rank, quantize_base=quantize,
    )
    t0 = time.perf_counter()
    with training.set_default_dtype(dtype), dev:
        if args.dry_run:
            model = lora_model(
                moe, vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=128, max_seq_len=256,
                num_experts=8, experts_per_token=2, moe_hidden_dim=128, **lora_kwargs,
            )
        else:
            model = lora_model("torchtune_moe.models.qwen3_moe.qwen3_moe_30b_a3b", max_seq_len=args.seq_len, **lora_kwargs)
    build_s = time.perf_counter() - t0
    set_trainable_params(model, get_adapter_params(model))
    training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=torch.cuda.is_available())
    build_peak = torch.cuda.max_memory_allocated() / GiB if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    B, S = (args.batch, args.seq_len) if not args.dry_run else (2, 64)
    vocab = model.tok_embeddings.num_embeddings
    tokens = torch.randint(0, vocab, (B, S + 1), device=dev)
    losses = []

    def step():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) + collect_aux_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    model.train()
    step_s = _time(step, iters=2 if args.dry_run else args.steps, warmup=1 if args.dry_run else 2)
    out = {
        "variant": "qlora" if quantize else "lora",
        "layers": len(model.layers),
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in params),
        "tokens_per_step": B * S,
        "step_s": step_s,
        "tokens_per_s": B * S / step_s,
        "build_s": build_s,
        "build_peak_gib": build_peak,
        "train_peak_gib": torch.cuda.max_memory_allocated() / GiB if torch.cuda.is_available() else None,
        "losses": losses,
    }
    del model, opt, params
    gc.collect()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["layer", "model"], choices=["layer", "model"])
    p.add_argument("--variants", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--profile", action="store_true", help="print the top kernels of the frozen and LoRA layer steps")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --dry-run)")
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    results = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    if "layer" in args.parts:
        results["layer"] = bench_layer(args, dev, dtype)
        print(json.dumps(results["layer"], indent=1), flush=True)
    if "model" in args.parts:
        results["model"] = []
        for v in args.variants:
            r = bench_model(args, dev, dtype, quantize=v == "qlora")
            results["model"].append(r)
            print(json.dumps(r, indent=1), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "lora.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
