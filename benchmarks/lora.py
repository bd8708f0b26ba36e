"""LoRA / QLoRA on the GPU: the routed-expert layer's cost with adapters, and Qwen3-30B-A3B training on one GPU.

    python benchmarks/lora.py [--parts layer model hf] [--tokens 8192] [--rank 16] [--out DIR]
    python benchmarks/lora.py --parts hf --layers 12 48 --out DIR   # against transformers + PEFT
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
hf:    LoRA training against transformers + PEFT on the same model at ``--layers`` depths (default 12; both sides
       at each): transformers' ``Qwen3MoeForCausalLM`` from the same config.json (random init, grouped_mm experts,
       sdpa attention, aux loss on) with PEFT LoRA on q/k/v/o and the per-expert gate/up/down projections, which
       PEFT 0.21 puts on transformers 5's fused expert parameters (gate_up_proj at rank 2r, down_proj at rank r:
       the form it loads our adapters in); ours built by the qwen3_moe builder with the same rank, alpha and
       targets. Both: bf16 base and adapters, activation checkpointing on every decoder layer, AdamW on the
       adapters, ``--batch`` x ``--seq-len`` random tokens, median of ``--hf-steps`` steps after 3 warm-up steps.
       Reports tokens/s, peak memory, trainable parameters (PEFT's fused gate_up adapter has one B of rank 2r
       where ours has a rank-r pair for gate and for up: 2I x r x E more parameters per layer, zero-initialised
       as the rest of B). An out-of-memory side is reported as such and the other still measured. Writes
       ``OUT/lora.json`` and ``OUT/lora_vs_peft.md``.
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

from _models import (  # noqa: E402
    SHAPES, build_hf, build_ours, hf_config, median_ms, prepare_out, routed_batch, save_json,
)

from torchtune_moe.modules import MoELinear, collect_aux_loss, dispatch_combine  # noqa: E402
from torchtune_moe.modules.peft import LoRAMoELinear  # noqa: E402

GiB = 1024**3


def _time(fn, iters: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` (CUDA events; wall clock on CPU)."""
    return median_ms(fn, iters=iters, warmup=warmup, per_event=1) / 1000


def bench_layer(args, dev, dtype) -> dict:
    E, K, D, H = (128, 8, 2048, 768) if not args.dry_run else (8, 2, 64, 32)
    T = args.tokens if not args.dry_run else 256
    torch.manual_seed(0)
    x, routing, grad = routed_batch(E, K, D, T, dev, dtype)

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
        try:
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
        except Exception as e:  # reported, the other variants still measured (GPU runs are scarce); CPU: raised
            if args.dry_run:
                raise
            out.setdefault("errors", {})[name] = repr(e)[-2000:]
            print(f"--- {name} failed: {e!r}", flush=True)
        experts = params = None
        gc.collect()
    # relative error of the kernels' output and gradients (x, then the adapter factors) against the torch code
    if "lora" in results and "lora_torch" in results:
        out["lora_kernels_rel_err"] = [
            float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))
            for a, b in zip(results["lora"], results["lora_torch"])
        ]
    for name in ("lora", "lora_torch", "qlora", "full"):
        if name in out["ms"] and "frozen" in out["ms"]:
            out[f"{name}_over_frozen"] = out["ms"][name] / out["ms"]["frozen"]
    return out


ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]  # ours; transformers names the last o_proj
# The same adapters in transformers' per-expert names (the layout our PEFT adapters are written in): PEFT 0.21 turns
# gate_proj/up_proj/down_proj into LoRA on transformers 5's fused expert parameters (``target_parameters``
# mlp.experts.gate_up_proj at rank 2r and alpha 2 alpha, mlp.experts.down_proj at rank r), as it does when it loads
# an adapter of ours (tests/peft/test_peft_adapter.py checks the logits match).
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model_config(args, layers: int) -> dict:
    """Qwen3-30B-A3B's config.json at ``layers`` layers (tiny widths on a dry run, each adapted weight a multiple of
    NF4's 16384-element blocks for QLoRA)."""
    config = hf_config("qwen3", layers=layers, seq_len=args.seq_len if not args.dry_run else 64, tiny=args.dry_run)
    if args.dry_run:
        config.update(hidden_size=128, head_dim=32, num_key_value_heads=4, moe_intermediate_size=128)
    return config


def build_ours_lora(config: dict, dev, dtype, rank: int, quantize: bool = False):
    """Our model of ``config`` with rank-``rank`` adapters (alpha 2 rank) on q/k/v/o and the routed experts, only
    the adapters trainable, activation checkpointing on every decoder layer."""
    from torchtune import training
    from torchtune.modules import TransformerSelfAttentionLayer
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from torchtune_moe.modules.peft import apply_lora

    with training.set_default_dtype(dtype), dev:
        model = apply_lora(
            build_ours(config, dev, dtype), lora_attn_modules=ATTN, apply_lora_to_experts=True, lora_rank=rank,
            lora_alpha=2.0 * rank, quantize_base=quantize,
        )
    set_trainable_params(model, get_adapter_params(model))
    training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    return model


def _peft_without_torchao():
    """PEFT 0.21 refuses torchao < 0.16 as soon as it looks for torchao-quantized layers, and torchtune 0.6.1 needs
    torchao < 0.16: this model has no torchao layers, so PEFT is told torchao is absent (as the PEFT tests do)."""
    import peft.tuners.lora.torchao
    import peft.utils.quantization_utils

    for module in (peft.tuners.lora.torchao, peft.utils.quantization_utils):
        if hasattr(module, "is_torchao_available"):
            module.is_torchao_available = lambda: False


def build_hf_lora(config: dict, dev, dtype, rank: int):
    """transformers' model of ``config`` (:func:`build_hf`: grouped_mm experts, sdpa) with PEFT LoRA of rank
    ``rank`` (alpha 2 rank) on :data:`HF_TARGETS`, adapters in ``dtype`` as ours (``autocast_adapter_dtype=False``;
    PEFT's default would keep them in fp32), activation checkpointing (non-reentrant) on every decoder layer."""
    import peft

    _peft_without_torchao()
    model = build_hf(config, dev, dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=HF_TARGETS)
    return peft.get_peft_model(model, lora, autocast_adapter_dtype=False).train()


def _trainable(model) -> dict:
    """Trainable parameter counts (all, and those of the routed experts' adapters) and the number of decoder layers
    under activation checkpointing (torch's checkpoint wrapper, or transformers' ``gradient_checkpointing`` flag)."""
    named = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    return {"trainable_params": sum(n for _, n in named),
            "trainable_expert_params": sum(n for name, n in named if ".experts." in name),
            "checkpointed_layers": sum(_checkpointed(m) for m in model.modules())}


def _checkpointed(module) -> bool:
    if type(module).__name__ == "CheckpointWrapper":  # ours: torchtune's set_activation_checkpointing
        return True
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return False
    return isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing


def _train(model, loss_fn, vocab: int, args, dev, steps: int, warmup: int) -> dict:
    """AdamW on the trainable parameters; median step time over ``steps`` after ``warmup``, tokens/s, peak memory
    of training (weights, adapters, optimizer state, activations), the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    B, S = (args.batch, args.seq_len) if not args.dry_run else (2, 64)
    torch.manual_seed(1)
    tokens = torch.randint(0, vocab, (B, S + 1), device=dev)
    losses = []

    def step():
        loss = loss_fn(tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    model.train()
    step_s = _time(step, iters=2 if args.dry_run else steps, warmup=1 if args.dry_run else warmup)
    out = {
        "tokens_per_step": B * S,
        "step_s": step_s,
        "tokens_per_s": B * S / step_s,
        "train_peak_gib": torch.cuda.max_memory_allocated() / GiB if dev.type == "cuda" else None,
        "losses": losses,
    }
    del opt, params
    return out


def _ours_loss(model):
    def loss_fn(tokens):
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) + collect_aux_loss(model)

    return loss_fn


def _free(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def bench_model(args, dev, dtype, quantize: bool) -> dict:
    torch.manual_seed(0)
    _free(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    config = _model_config(args, layers=_model_layers(args))
    t0 = time.perf_counter()
    model = build_ours_lora(config, dev, dtype, args.rank, quantize)
    build_s = time.perf_counter() - t0
    build_peak = torch.cuda.max_memory_allocated() / GiB if dev.type == "cuda" else None
    out = {
        "variant": "qlora" if quantize else "lora",
        "layers": len(model.layers),
        "total_params": sum(p.numel() for p in model.parameters()),
        **_trainable(model),
        "build_s": build_s,
        "build_peak_gib": build_peak,
        **_train(model, _ours_loss(model), config["vocab_size"], args, dev, steps=args.steps, warmup=2),
    }
    del model
    _free(dev)
    return out


def _model_layers(args) -> int:
    """Depth of the ``model`` part: Qwen3-30B-A3B's 48 layers (2 on a dry run)."""
    return 2 if args.dry_run else SHAPES["qwen3"]["num_hidden_layers"]


def bench_hf(args, dev, dtype, layers: int) -> dict:
    """Ours (LoRA, :func:`build_ours_lora`) against transformers + PEFT (:func:`build_hf_lora`) on the same
    depth-reduced Qwen3-30B-A3B, the same adapters, tokens, optimizer and activation checkpointing."""
    import peft
    import transformers

    config = _model_config(args, layers)
    out = {"layers": layers, "activation_checkpointing": True, "rank": args.rank, "alpha": 2 * args.rank,
           "transformers": transformers.__version__, "peft": peft.__version__, "dtype": str(dtype).removeprefix("torch.")}
    for side in ("ours", "hf_peft"):
        torch.manual_seed(0)
        _free(dev)
        try:
            if side == "ours":
                model = build_ours_lora(config, dev, dtype, args.rank)
                loss_fn = _ours_loss(model)
                r = {"experts": "ours (grouped GEMM, per-expert LoRA pairs)"}
            else:
                model = build_hf_lora(config, dev, dtype, args.rank)

                def loss_fn(tokens):  # transformers' loss: next-token cross-entropy (fp32) + the aux loss
                    return model(input_ids=tokens[:, :-1], labels=tokens[:, :-1], use_cache=False).loss

                pc = model.peft_config["default"]
                r = {
                    "experts": f"transformers {model.config._experts_implementation} + PEFT ParamWrapper",
                    "attention": model.config._attn_implementation,
                    "peft_target_modules": sorted(pc.target_modules or []),
                    "peft_target_parameters": sorted(pc.target_parameters or []),
                    "peft_rank_pattern": dict(pc.rank_pattern or {}),
                    "peft_alpha_pattern": dict(pc.alpha_pattern or {}),
                }
            r.update(total_params=sum(p.numel() for p in model.parameters()), **_trainable(model))
            r.update(_train(model, loss_fn, config["vocab_size"], args, dev, steps=args.hf_steps, warmup=3))
        except torch.cuda.OutOfMemoryError as e:  # report it and keep the other side's figures
            r = {"error": f"out of memory at {layers} layers: {str(e)[:300]}"}
        model = loss_fn = None
        _free(dev)
        out[side] = r
        print(side, json.dumps(r, indent=1), flush=True)
    if "error" not in out["ours"] and "error" not in out["hf_peft"]:
        out["ours_over_hf_tokens_per_s"] = out["ours"]["tokens_per_s"] / out["hf_peft"]["tokens_per_s"]
    return out


def _hf_table(r: dict) -> str:
    lines = [
        f"Qwen3-30B-A3B shape at {r['layers']} layers, LoRA rank {r['rank']} alpha {r['alpha']} on q/k/v/o and the "
        f"routed experts, {r['dtype']}, activation checkpointing on both, AdamW on the adapters "
        f"(transformers {r['transformers']}, PEFT {r['peft']})",
        "| | tokens/s | step s | peak GiB | trainable params (experts) |",
        "|---|---|---|---|---|",
    ]
    for side, name in (("ours", "torchtune-moe"), ("hf_peft", "transformers + PEFT")):
        x = r[side]
        if "error" in x:
            lines.append(f"| {name} | {x['error'][:80]} | | | |")
            continue
        peak = f"{x['train_peak_gib']:.1f}" if x["train_peak_gib"] is not None else "-"
        lines.append(f"| {name} | {x['tokens_per_s']:.0f} | {x['step_s']:.3f} | {peak} | "
                     f"{x['trainable_params'] / 1e6:.1f}M ({x['trainable_expert_params'] / 1e6:.1f}M) |")
    if "ours_over_hf_tokens_per_s" in r:
        lines.append(f"\nours / transformers+PEFT tokens/s: {r['ours_over_hf_tokens_per_s']:.2f}x")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["layer", "model"], choices=["layer", "model", "hf"])
    p.add_argument("--variants", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=4, help="timed steps of the model part (after 2 warm-up steps)")
    p.add_argument("--layers", type=int, nargs="+", default=[12],
                   help="depths of the hf part (both sides at each; 48 is Qwen3-30B-A3B's full depth)")
    p.add_argument("--hf-steps", type=int, default=10, help="timed steps of the hf part (after 3 warm-up steps)")
    p.add_argument("--profile", action="store_true", help="print the top kernels of the frozen and LoRA layer steps")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args()
    for name in ("tokens", "rank", "batch", "seq_len", "steps", "hf_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.layers) < 1:
        p.error(f"--layers must be >= 1 each, got {args.layers}")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --dry-run)")
    prepare_out(p, args.out)
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
    if "hf" in args.parts:
        results["hf"] = []
        for layers in args.layers if not args.dry_run else [2]:
            results["hf"].append(bench_hf(args, dev, dtype, layers))
            print(_hf_table(results["hf"][-1]), flush=True)
    save_json(args.out, "lora.json", results)
    if args.out and "hf" in results:
        with open(os.path.join(args.out, "lora_vs_peft.md"), "w") as f:
            f.write("\n\n".join(_hf_table(r) for r in results["hf"]) + "\n")


if __name__ == "__main__":
    main()
