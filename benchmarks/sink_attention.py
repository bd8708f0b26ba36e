"""GPT-OSS's sink attention, forward + backward at the real shape: this package's SDPA form (the sink as one more
key, :class:`torchtune_moe.modules.attention.SinkAttention`) against the explicit-scores form (transformers'
eager path: [b, heads, s, s] scores in fp32, softmax with the sink column): peak memory above the inputs, time
(median of ``triton.testing.do_bench``), and the relative difference of the outputs and q/k/v/sink gradients.

    python benchmarks/sink_attention.py [--seq-len 2048] [--window 128] [--out DIR]

Needs a CUDA GPU (bf16). gpt-oss attention: 64 query heads (GQA expanded before this call), head_dim 64.
``--dry-run`` runs tiny shapes on the CPU to check the code.
"""

import argparse
import json
import os

import torch
from torch import nn

from torchtune_moe.modules.attention import SinkAttention

HEADS, HEAD_DIM = 64, 64


def explicit(q, k, v, sinks, window):
    """transformers' eager GPT-OSS attention: explicit scores, sink column, fp32 softmax."""
    b, h, s, d = q.shape
    scores = torch.matmul(q, k.transpose(-2, -1)).float() * d**-0.5
    i, j = torch.arange(s, device=q.device).unsqueeze(1), torch.arange(s, device=q.device).unsqueeze(0)
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.cat([scores, sinks.float().view(1, h, 1, 1).expand(b, h, s, 1)], -1).softmax(-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


def measure(fn, inputs, grad, device):
    """(peak MiB above the live inputs, ms) of one forward + backward."""
    def step():
        for t in inputs:
            t.grad = None
        fn().backward(grad)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        from triton.testing import do_bench

        ms = do_bench(step, warmup=5, rep=50)
        return peak, ms
    return float("nan"), float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--window", type=int, default=None, help="sliding window (gpt-oss: 128 on half the layers)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    b, h, d = args.batch_size, (4 if args.dry_run else HEADS), (8 if args.dry_run else HEAD_DIM)
    s = 16 if args.dry_run else args.seq_len
    torch.manual_seed(0)
    attn = SinkAttention(
        sliding_window=args.window, embed_dim=h * d, num_heads=h, num_kv_heads=h, head_dim=d,
        q_proj=nn.Identity(), k_proj=nn.Identity(), v_proj=nn.Identity(), output_proj=nn.Identity(),
    ).to(device)
    with torch.no_grad():
        attn.sinks.normal_(0.0, 1.0)
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(b, h, s, d, device=device, dtype=dtype)
    rows = {}
    for name, fn in (
        ("sdpa (ours)", lambda: attn._sink_attention(q, k, v, None, 0.0, True)),
        ("explicit scores", lambda: explicit(q, k, v, attn.sinks, args.window)),
    ):
        peak, ms = measure(fn, [q, k, v, attn.sinks], grad, device)
        out = fn()
        out.backward(grad)
        rows[name] = dict(peak_mib=round(peak, 1), ms=round(ms, 3), out=out.detach().float().cpu(),
                          grads=[t.grad.detach().float().cpu().clone() for t in (q, k, v, attn.sinks)])
        for t in (q, k, v, attn.sinks):
            t.grad = None
    ours, ref = rows["sdpa (ours)"], rows["explicit scores"]
    rel = lambda a, c: float((a - c).norm() / c.norm().clamp(min=1e-12))  # noqa: E731
    result = dict(
        seq_len=s, heads=h, head_dim=d, window=args.window, device=str(device),
        ours=dict(peak_mib=ours["peak_mib"], ms=ours["ms"]), explicit=dict(peak_mib=ref["peak_mib"], ms=ref["ms"]),
        rel_diff_out=rel(ours["out"], ref["out"]),
        rel_diff_grads=[rel(a, c) for a, c in zip(ours["grads"], ref["grads"])],
    )
    print(json.dumps(result))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"sink_attention_w{args.window}.json"), "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
