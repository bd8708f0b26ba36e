"""What the benchmarks share: the published shapes as config.json dicts at a chosen depth, our model and
transformers' model built from the same dict, the profile table, the kernel timer.

Used by ``train_step.py`` (full fine-tune, 4 layers), ``lora.py`` (LoRA against transformers + PEFT) and the tile
sweeps (``swiglu_lora_tiles.py``, ``gather_tiles.py``).
"""

import argparse
import json
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchtune_moe.models.olmoe import OLMOE_1B_7B  # noqa: E402
from torchtune_moe.models.qwen3_moe import QWEN3_MOE_30B_A3B  # noqa: E402

# The published config.json network keys (one place: the model builders), plus the keys transformers' config
# classes need to pick the model.
SHAPES = {
    "qwen3": dict(
        QWEN3_MOE_30B_A3B, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_act="silu",
        sliding_window=None, use_sliding_window=False,
    ),
    "olmoe": dict(OLMOE_1B_7B, model_type="olmoe", architectures=["OlmoeForCausalLM"], hidden_act="silu"),
}

# --dry-run: the same families at tiny widths (CPU, seconds).
_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=32, head_dim=16, num_attention_heads=4, num_experts=8,
             num_experts_per_tok=2)


def hf_config(shape: str, *, layers: int, seq_len: int, tiny: bool = False) -> dict:
    """config.json of ``shape`` (a key of :data:`SHAPES`) with ``layers`` decoder layers and RoPE up to
    ``seq_len``; ``tiny``: widths cut for CPU dry runs (the family, routing and layer types unchanged)."""
    config = dict(SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=seq_len)
    if tiny:
        config.update(_TINY)
        config["num_key_value_heads"] = 4 if config["model_type"] == "olmoe" else 2
        if "moe_intermediate_size" in config:
            config["moe_intermediate_size"] = 32
    return config


def build_ours(config: dict, device, dtype=torch.bfloat16):
    """Our model from ``config`` (random init on ``device``), in training mode."""
    from torchtune_moe.models import build_from_hf_config

    return build_from_hf_config(config, device=device, dtype=dtype, max_seq_len=config["max_position_embeddings"]).train()


def build_hf(config: dict, device, dtype=torch.bfloat16, *, output_router_logits: bool = True):
    """transformers' ``*ForCausalLM`` from ``config`` (random init on ``device``), in training mode: experts through
    ``grouped_mm`` (transformers 5's fastest expert implementation), sdpa attention; with ``output_router_logits``
    its loss adds the load-balancing aux loss."""
    import transformers

    cls = getattr(transformers, config["architectures"][0])
    kw = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    cfg = cls.config_class(**kw, output_router_logits=output_router_logits)
    cfg._experts_implementation = "grouped_mm"
    cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.to(dtype).train()


def kernel_table(prof, steps: int, rows: int = 25) -> str:
    """The top ``rows`` GPU kernels of a ``torch.profiler.profile`` over ``steps`` steps, by total time (per step:
    total ms, share of all kernel time, calls, mean us). Without CUDA events (a CPU dry run): the CPU operators
    by self time instead."""
    events = prof.key_averages()
    cuda = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    if cuda:
        pick, what = cuda, "GPU kernels"

        def t_us(e):
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    else:
        pick, what = list(events), "CPU operators (no CUDA events)"

        def t_us(e):
            return e.self_cpu_time_total

    total = sum(t_us(e) for e in pick) or 1.0
    pick = sorted(pick, key=t_us, reverse=True)[:rows]
    lines = [
        f"top {len(pick)} {what} by total time, {steps} steps profiled; all of them: {total / 1000 / steps:.2f} ms per step",
        f"{'ms/step':>9} {'share':>6} {'calls/step':>10} {'mean us':>9}  name",
    ]
    for e in pick:
        t = t_us(e)
        lines.append(f"{t / 1000 / steps:9.3f} {100 * t / total:5.1f}% {e.count / steps:10.1f} {t / max(e.count, 1):9.1f}  "
                     f"{e.key[:160]}")
    return "\n".join(lines)


def routed_batch(E: int, K: int, D: int, T: int, dev, dtype) -> tuple:
    """T random tokens of width D routed by a token-choice router (top-K of E experts, normalised weights), and
    an output gradient: ``(x_TD, routing, grad_TD)``, the inputs of a layer timing."""
    from torchtune_moe.modules import TokenChoiceTopKRouter

    router = TokenChoiceTopKRouter(D, E, K, norm_topk_prob=True).to(dev, dtype)
    x_TD = torch.randn(T, D, device=dev, dtype=dtype)
    with torch.no_grad():
        routing = router(x_TD)
    return x_TD, routing, torch.randn(T, D, device=dev, dtype=dtype)


def median_ms(fn, iters: int = 15, warmup: int = 2, per_event: int = 20) -> float:
    """Median ms per call of ``fn``, ``per_event`` calls between two CUDA events (the launches queue while the GPU
    runs, so the host's per-call overhead is hidden as it is in a training step); wall clock on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_event):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / per_event)
        else:
            t0 = time.perf_counter()
            for _ in range(per_event):
                fn()
            times.append(1000 * (time.perf_counter() - t0) / per_event)
    return sorted(times)[len(times) // 2]


def sweep_setup(doc: str, script: str, stand_in: dict, layer_repeats: int):
    """The command line of a tile sweep (``--layer``, ``--layer-repeats``, ``--out``, ``--dry-run``) and what it
    runs on: ``(args, T, dev, dtype)``, with ``T`` the Triton kernels' module whose configuration dicts the sweep
    sets, or without Triton (a dry run on a CPU-only install) a stand-in holding ``stand_in``'s names (the
    configurations then change nothing: the torch code runs)."""
    from torchtune_moe.modules import _kernels

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", action="store_true", help="then time the layer under the default and the best")
    p.add_argument("--layer-repeats", type=int, default=layer_repeats)
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shapes, the torch code (checks the script runs; the configurations change nothing)")
    args = p.parse_args()
    if args.layer_repeats < 1:
        p.error(f"--layer-repeats must be >= 1, got {args.layer_repeats}")
    if not args.dry_run and (not torch.cuda.is_available() or not _kernels._HAS_TRITON):
        sys.exit(f"{script} needs a CUDA GPU and Triton (or --dry-run)")
    prepare_out(p, args.out)
    T = _kernels._triton or types.SimpleNamespace(**stand_in)
    dev = torch.device("cpu" if args.dry_run else "cuda")
    return args, T, dev, torch.float32 if args.dry_run else torch.bfloat16


def save_json(out, name: str, result) -> None:
    """Writes ``result`` to ``out/name`` (the directory :func:`prepare_out` checked); nothing without ``--out``."""
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, name), "w") as f:
            json.dump(result, f, indent=1)


def prepare_out(parser: argparse.ArgumentParser, out) -> None:
    """Creates the ``--out`` directory before any work (a benchmark writes its results at the end: a path that is a
    file, or not writable, would lose them), refusing by name a path it cannot use."""
    if not out:
        return
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write_check")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        parser.error(f"--out {out}: not a directory the results can be written to ({e.strerror})")

