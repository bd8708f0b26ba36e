"""MoE layer, forward + backward, training mode: ours vs transformers' blocks vs the dense-GEMM ceiling.

    python benchmarks/moe_layer.py [--shapes olmoe qwen3 mixtral] [--tokens 8192] [--variants ...]
                                   [--routers token_choice expert_choice causal_expert_choice] [--out DIR]

Needs a CUDA GPU (bf16). For each shape it checks every variant against an fp32 per-expert loop on the same
routing (relative error ||out - ref|| / ||ref||; for ours also the gradients of x, both expert weights and the
routing weights), then times forward + backward (median of ``triton.testing.do_bench``, weight gradients reset
to None between runs so no accumulation is timed) and prints one table. TFLOP/s counts the expert GEMMs
only (18 * T * K * D * H per forward + backward); "of ceiling" is the dense ceiling's time over the variant's.

Variants:
  dense        the ceiling: the same GEMM FLOPs as plain matmuls [T*K, D] x [D, 2H] and [T*K, H] x [H, D]
               with SiLU, no routing (eager).
  hf_grouped   transformers' sparse MoE block (router + experts), experts_implementation="grouped_mm".
  hf_eager     the same block with experts_implementation="eager" (loop over experts).
  v0           our first version (sort + grouped_mm + index_add, autograd records every op), kept here
               as the starting point.
  ours         torchtune_moe's MoE layer (router with aux loss, dispatch_combine), eager.
  ours_compile the same, under torch.compile.
  ours_compile_max  the same, torch.compile mode="max-autotune-no-cudagraphs" (experiment; not the default).
  ours_compile_graphs  the same, torch.compile mode="reduce-overhead" (its CUDA graphs; what the recipe's
               compile.cuda_graphs does to each decoder layer); on CPU compiled without graphs.
  ours_sep_swiglu  ours with SwiGLU in our own kernels rather than in quack's GEMM epilogues
               (``CuteGroupedGemm.fuses_swiglu`` off for the variant): the A/B of that fusion. The same as ours
               where quack's GEMMs are not used.
  ours_sep_swiglu_compile  the same, under torch.compile.
  ours_fp8     ours with expert_fp8=True (the six expert GEMMs in rowwise fp8, torchao's recipe), eager; its
               errors are fp8's against the fp32 reference. Needs compute capability 9.0+ (skipped otherwise,
               and in --dry-run, with the reason printed).
  ours_fp8_compile  the same, under torch.compile.
  profile_fp8  as profile, for ours_fp8 (CUDA time per kernel, eager).
  host         ours (eager): the host's time to enqueue one forward + backward on an idle GPU, against the
               GPU's busy time per pass (its kernels' sum under the profiler; not on CPU). Where the host's is
               the larger, the layer waits on Python and launches, not on its kernels.
  host_fp8     the same for ours_fp8.
  ours_graph   ours (eager) captured once in a CUDA graph (forward, backward of the output and the aux loss) and
               replayed: the same kernels with no host work between them (checked against one eager pass). CUDA
               only (skipped in --dry-run, with the reason printed); needs a router with no host read (token or
               expert choice).
  ours_fp8_graph  ours_fp8 captured and replayed as ours_graph.
  gmm_only     only the six grouped GEMMs of forward + backward on pre-sorted rows (no routing, no
               activation): what grouped_mm itself reaches.

Routers (``--routers``): the variants ours, ours_again, ours_compile, ours_compile_max, ours_sep_swiglu(_compile),
parts and profile run
once per router kind of ``moe_layer(..., router=...)``, rows named ``ours`` (token choice), ``ours/ec``
(expert_choice, capacity factor 1) and ``ours/cec`` (causal_expert_choice); every other variant runs with
token choice. Causal expert choice is timed with its thresholds on: one training forward on the benchmark's
batch and ``update()`` set them to that batch's expert-choice thresholds (else it would route as token choice
before its first update). The "experts/token" column is the average number of experts a token gets.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _models import prepare_out  # noqa: E402

from torchtune_moe.models.moe import moe_layer  # noqa: E402
from torchtune_moe.modules import moe_layer as moe_layer_module  # noqa: E402

DEV = torch.device("cuda")
OUT_DIR = None

# name: (experts E, top-k K, dim D, expert hidden H, norm_topk_prob)
SHAPES = {
    "olmoe": (64, 8, 2048, 1024, False),
    "qwen3": (128, 8, 2048, 768, True),
    "mixtral": (8, 2, 4096, 14336, True),
    "small": (16, 2, 768, 768, False),  # configs/small/full.yaml's experts (its steps hold 16384 tokens: --tokens)
}


def v0_dispatch_combine(x_TD, routing, experts):
    """The first dispatch_combine of this repository (kept as the benchmark's starting point)."""
    E = experts.num_experts
    expert_ids_A = routing.expert_ids_A
    counts_E = torch.zeros(E + 1, dtype=torch.long, device=x_TD.device)
    counts_E.scatter_add_(0, expert_ids_A, torch.ones_like(expert_ids_A))
    counts_E = counts_E[:E]
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    order_A = torch.argsort(expert_ids_A, stable=True)
    token_ids_A = routing.token_ids_A[order_A]
    weights_A1 = routing.weights_A[order_A].unsqueeze(-1)
    x_AD = x_TD[token_ids_A]
    y_AD = experts.grouped(x_AD, offsets_E)
    y_AD = y_AD * weights_A1.to(y_AD.dtype)
    out_TD = torch.zeros_like(x_TD).index_add_(0, token_ids_A, y_AD)
    return out_TD, counts_E


def reference(x_TD, gate_up, down, token_ids_A, expert_ids_A, weights_A):
    """fp32 loop over experts: ``out[t] = sum_a w_a * down_e(silu(gate_e x_t) * up_e x_t)``; dropped slots
    (expert id E) skipped. Inputs are upcast copies; differentiable."""
    E, H2, _ = gate_up.shape
    out = torch.zeros_like(x_TD)
    for e in range(E):
        sel = (expert_ids_A == e).nonzero().squeeze(-1)
        if sel.numel() == 0:
            continue
        t = token_ids_A[sel]
        h = x_TD[t] @ gate_up[e].t()
        g, u = h.chunk(2, dim=-1)
        y = (F.silu(g) * u) @ down[e].t()
        out = out.index_add(0, t, y * weights_A[sel].unsqueeze(-1))
    return out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_dispatch(dispatch, layer, x_TD, routing, empty_expert=None):
    """Runs ``dispatch`` on ``routing`` (weights made a leaf) and the fp32 reference; relative errors of the
    output and of the gradients of x (experts path), both expert weights and the routing weights."""
    experts = layer.experts
    w_leaf = routing.weights_A.detach().clone().requires_grad_()
    routing = dataclasses.replace(routing, weights_A=w_leaf)
    x = x_TD.detach().clone().requires_grad_()
    for p in experts.parameters():
        p.grad = None
    torch.manual_seed(1)
    out, _ = dispatch(x, routing, experts)
    g = torch.randn_like(out)
    out.backward(g)
    got = [out, x.grad, experts.gate_up_proj.grad, experts.down_proj.grad, w_leaf.grad]
    x32 = x_TD.detach().float().requires_grad_()
    gu32 = experts.gate_up_proj.detach().float().requires_grad_()
    dn32 = experts.down_proj.detach().float().requires_grad_()
    w32 = routing.weights_A.detach().float().requires_grad_()
    ref = reference(x32, gu32, dn32, routing.token_ids_A, routing.expert_ids_A, w32)
    ref.backward(g.float())
    want = [ref, x32.grad, gu32.grad, dn32.grad, w32.grad]
    names = ["out", "grad_x", "grad_gate_up", "grad_down", "grad_weights"]
    errs = {n: rel(a, b) for n, a, b in zip(names, got, want)}
    if empty_expert is not None:  # its weight gradients must be exactly zero (not left unwritten)
        errs["empty_expert_grad_absmax"] = max(got[2][empty_expert].abs().max().item(), got[3][empty_expert].abs().max().item())
    for p in experts.parameters():
        p.grad = None
    return errs


def bench(fn, grad_to_none, rep_ms=400):
    """(median ms, peak extra MiB of one call) after a warm-up call."""
    fn()
    if DEV.type == "cpu":  # --dry-run: exercise the code, time roughly
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3, 0.0
    import triton

    torch.cuda.synchronize()
    for t in grad_to_none:
        t.grad = None
    torch.cuda.reset_peak_memory_stats()
    m0 = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - m0) / 2**20
    ms = triton.testing.do_bench(fn, warmup=100, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")
    return ms, peak


def hf_block(name, E, K, D, H, norm_topk, impl):
    if name == "olmoe":
        from transformers.models.olmoe.configuration_olmoe import OlmoeConfig as C
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as B

        cfg = C(hidden_size=D, intermediate_size=H, num_experts=E, num_experts_per_tok=K, norm_topk_prob=norm_topk)
    elif name == "qwen3":
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig as C
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as B

        cfg = C(hidden_size=D, moe_intermediate_size=H, num_experts=E, num_experts_per_tok=K, norm_topk_prob=norm_topk)
    else:
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig as C
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as B

        cfg = C(hidden_size=D, intermediate_size=H, num_local_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = impl
    with torch.device("meta"):
        block = B(cfg)
    return block, cfg


def dense_fn(A, D, H, dev):
    x = torch.randn(A, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(2 * H, D, device=dev, dtype=torch.bfloat16) / math.sqrt(D)).requires_grad_()
    w2 = (torch.randn(D, H, device=dev, dtype=torch.bfloat16) / math.sqrt(H)).requires_grad_()
    gy = torch.randn(A, D, device=dev, dtype=torch.bfloat16)

    def fn():
        h = F.linear(x, w1)
        g, u = h.chunk(2, dim=-1)
        F.linear(F.silu(g) * u, w2).backward(gy)

    return fn, [x, w1, w2]


def gmm_only_fn(layer, x_TD, routing):
    """The six grouped GEMMs of forward + backward on already sorted rows, nothing else."""
    E = layer.experts.num_experts
    counts = torch.bincount(routing.expert_ids_A, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    A, D = routing.expert_ids_A.shape[0], x_TD.shape[1]
    W1, W2 = layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach()
    H = W2.shape[-1]
    x_AD = torch.randn(A, D, device=x_TD.device, dtype=x_TD.dtype)
    hs = torch.randn(A, H, device=x_TD.device, dtype=x_TD.dtype)
    gy = torch.randn(A, D, device=x_TD.device, dtype=x_TD.dtype)
    gh = torch.randn(A, 2 * H, device=x_TD.device, dtype=x_TD.dtype)
    gemms = {
        "fwd_gate_up": lambda: F.grouped_mm(x_AD, W1.transpose(-2, -1), offs=offs),
        "fwd_down": lambda: F.grouped_mm(hs, W2.transpose(-2, -1), offs=offs),
        "dgrad_down": lambda: F.grouped_mm(gy, W2, offs=offs),
        "wgrad_down": lambda: F.grouped_mm(gy.t(), hs, offs=offs),
        "dgrad_gate_up": lambda: F.grouped_mm(gh, W1, offs=offs),
        "wgrad_gate_up": lambda: F.grouped_mm(gh.t(), x_AD, offs=offs),
    }

    def fn():
        for f in gemms.values():
            f()

    return fn, gemms


VARIANTS = [
    "dense", "ours", "v0", "hf_grouped", "hf_eager", "gmm_only", "kernels", "parts", "profile", "ours_compile",
    "ours_again", "ours_fp8", "ours_fp8_compile", "profile_fp8", "host", "host_fp8", "ours_sep_swiglu",
    "ours_sep_swiglu_compile", "ours_graph", "ours_fp8_graph", "ours_compile_graphs", "ours_compile_max",
]


ROUTER_TAGS = {"token_choice": "", "expert_choice": "/ec", "causal_expert_choice": "/cec"}
ROUTER_VARIANTS = (
    "ours", "ours_again", "ours_compile", "ours_fp8", "ours_fp8_compile", "ours_compile_max", "parts", "profile",
    "profile_fp8", "host", "host_fp8", "ours_sep_swiglu", "ours_sep_swiglu_compile", "ours_graph", "ours_fp8_graph",
)


def run_shape(name, T, variants, results, routers=("token_choice",)):
    E, K, D, H, norm_topk = SHAPES[name]
    rows = {}
    for i, router in enumerate(routers):
        vs = set(variants) if i == 0 else set(variants) & set(ROUTER_VARIANTS)
        if router != "token_choice":  # transformers' blocks route by token choice
            vs -= {"hf_grouped", "hf_eager"}
        if i > 0 and "dense" in variants:
            vs.add("dense_again")
        run_router(name, T, vs, rows, router)
    results[name] = dict(E=E, K=K, D=D, H=H, T=T, flops=18 * T * K * D * H, rows=rows)
    torch.cuda.empty_cache() if DEV.type == "cuda" else None


def run_router(name, T, variants, rows, router):
    E, K, D, H, norm_topk = SHAPES[name]
    tag = ROUTER_TAGS[router]
    dev = DEV
    A = T * K
    flops = 18 * A * D * H
    torch.manual_seed(0)
    router_kwargs = {"norm_topk_prob": norm_topk} if router == "token_choice" else {}
    layer = moe_layer(
        dim=D, hidden_dim=H, num_experts=E, experts_per_token=K, router=router, aux_loss_coeff=0.01, **router_kwargs
    )
    layer = layer.to(dev, torch.bfloat16).train()
    x = torch.randn(1, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(1, T, D, device=dev, dtype=torch.bfloat16)
    params = list(layer.parameters())
    x_TD = x.detach().view(T, D)
    if router == "causal_expert_choice":  # thresholds on (see the module docstring)
        with torch.no_grad():
            layer.router(x_TD)
        layer.router.update()
    with torch.no_grad():  # no autograd graph kept on the parameters (ours_graph's capture needs none alive)
        routing = layer.router(x_TD)
    experts_per_token = ((routing.expert_ids_A < E).sum() / T).item()

    def record(variant, ms, peak, errs=None, note=""):
        tflops = flops / (ms * 1e-3) / 1e12
        variant = variant + tag
        rows[variant] = dict(ms=ms, tflops=tflops, act_mib=peak, errs=errs or {}, note=note, router=router,
                             experts_per_token=experts_per_token)
        print(f"  {name:8s} {variant:13s} {ms:9.3f} ms {tflops:7.1f} TFLOP/s  mem {peak:8.0f} MiB  "
              f"max err {max(errs.values()) if errs else float('nan'):.2e} {note}", flush=True)

    def attempt(variant, f):
        if variant not in variants:
            return
        try:
            f()
        except Exception as e:  # keep going: one failed variant must not lose the others
            traceback.print_exc()
            rows[variant + tag] = dict(error=repr(e)[:500])
            print(f"  {name:8s} {variant:13s} FAILED {e!r:.200}", flush=True)

    # dense ceiling
    def v_dense():
        fn, g = dense_fn(A, D, H, dev)
        ms, peak = bench(fn, g)
        record("dense", ms, peak)

    attempt("dense", v_dense)

    def v_dense_again():  # the ceiling once more, next to this router's rows: its spread is the noise
        fn, g = dense_fn(A, D, H, dev)
        ms, peak = bench(fn, g)
        record("dense_again", ms, peak)

    attempt("dense_again", v_dense_again)

    def layer_fn(mod, mark_step=False):
        def fn():
            if mark_step:  # torch.compile's CUDA graphs: a new pass, the previous one's outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            out = mod(x)
            torch.autograd.backward([out, layer.aux_loss], [gy, None])

        return fn

    # ours, eager
    def v_ours(label="ours"):
        errs = check_dispatch(moe_layer_module.dispatch_combine, layer, x_TD, routing)
        if router == "token_choice":  # an expert that gets no token: its weight gradients must be exactly zero
            scores = layer.router.scores(x_TD)[1].detach().clone()
            scores[:, 0] = -1
            forced = scores.topk(K, dim=-1).indices
            r0 = layer.router(x_TD, forced_experts_TK=forced)
            errs0 = check_dispatch(moe_layer_module.dispatch_combine, layer, x_TD, r0, empty_expert=0)
            errs.update({f"empty_expert_{k}": v for k, v in errs0.items()})
        ms, peak = bench(layer_fn(layer), params + [x])
        record(label, ms, peak, errs)

    attempt("ours", v_ours)

    # v0
    def v_v0():
        errs = check_dispatch(v0_dispatch_combine, layer, x_TD, routing)
        saved = layer.experts.dispatcher
        layer.experts.dispatcher = v0_dispatch_combine  # the experts' swappable dispatch (MoELinear.dispatcher)
        try:
            ms, peak = bench(layer_fn(layer), params + [x])
        finally:
            layer.experts.dispatcher = saved
        record("v0", ms, peak, errs)

    attempt("v0", v_v0)

    # transformers
    for impl, variant in (("grouped_mm", "hf_grouped"), ("eager", "hf_eager")):
        def v_hf(impl=impl, variant=variant):
            block, cfg = hf_block(name, E, K, D, H, norm_topk, impl)
            block = block.to_empty(device=dev).to(torch.bfloat16).train()
            block.experts.gate_up_proj = layer.experts.gate_up_proj
            block.experts.down_proj = layer.experts.down_proj
            block.gate.weight = layer.router.gate.weight
            got = {}
            hook = block.experts.register_forward_pre_hook(
                lambda m, args: got.update(idx=args[1].detach(), w=args[2].detach())
            )
            with torch.no_grad():
                out = block(x).view(T, D)
            hook.remove()
            idx, w = got["idx"], got["w"]
            ref = reference(
                x_TD.float(), layer.experts.gate_up_proj.detach().float(), layer.experts.down_proj.detach().float(),
                torch.arange(T, device=dev).repeat_interleave(K), idx.reshape(-1), w.reshape(-1).float(),
            )
            errs = {"out": rel(out, ref)}

            def fn():
                block(x).backward(gy)

            ms, peak = bench(fn, params + [x], rep_ms=400 if impl == "grouped_mm" else 200)
            record(variant, ms, peak, errs, note=f"impl={cfg._experts_implementation}")

        attempt(variant, v_hf)

    def v_gmm():
        fn, gemms = gmm_only_fn(layer, x_TD, routing)
        ms, _ = bench(fn, [])
        per = {k: bench(f, [])[0] for k, f in gemms.items()}
        record("gmm_only", ms, 0.0, note=" ".join(f"{k}={v:.3f}" for k, v in per.items()))
        rows["gmm_only"]["per_gemm_ms"] = per

    attempt("gmm_only", v_gmm)

    def v_kernels():
        """Achieved bandwidth of the memory-bound steps (bytes = inputs read once + outputs written once)."""
        from torchtune_moe.modules import _kernels

        nv = torch.tensor([A], dtype=torch.int32, device=dev)
        h = torch.randn(A, 2 * H, device=dev, dtype=torch.bfloat16)
        w = torch.rand(A, device=dev)
        ghs = torch.randn(A, H, device=dev, dtype=torch.bfloat16)
        y = torch.randn(A, D, device=dev, dtype=torch.bfloat16)
        idx = torch.randperm(A, device=dev).view(T, K)
        rows_A = torch.randint(0, T, (A,), device=dev)
        big = torch.empty(2**29, dtype=torch.bfloat16, device=dev).normal_()  # 1 GiB
        e = 2  # bytes per element
        cases = {
            "copy_1GiB": (lambda: big.clone(), 2 * big.numel() * e),
            "swiglu_fwd": (lambda: _kernels.swiglu_forward(h, w, nv), A * 3 * H * e + A * 4),
            "swiglu_bwd": (lambda: _kernels.swiglu_backward(h, w, ghs, nv), A * 6 * H * e + A * 8),
            "gather_sum": (lambda: _kernels.gather_sum(y, idx, nv), (A + T) * D * e + A * 8),
            "index_select": (lambda: x_TD.index_select(0, rows_A), (A + T) * D * e + A * 8),
            "gather_rows": (lambda: _kernels.gather_rows(x_TD, rows_A), (A + T) * D * e + A * 8),
        }
        # accuracy of each kernel and of the torch code it replaces, against the same math in fp64
        g64, u64 = h.double().chunk(2, dim=-1)
        act64 = F.silu(g64) * u64
        hs64 = act64 * w.double()[:, None]
        sig64 = torch.sigmoid(g64)
        gact64 = ghs.double() * w.double()[:, None]
        gh64 = torch.cat([gact64 * u64 * sig64 * (1 + g64 * (1 - sig64)), gact64 * g64 * sig64], dim=-1)
        gw64 = (ghs.double() * act64).sum(-1)
        gs64 = y.double()[idx].sum(1)
        acc = {}
        saved = _kernels.use_triton
        try:
            for impl in ("triton", "torch"):
                if impl == "torch":
                    _kernels.use_triton = lambda t: False
                hs = _kernels.swiglu_forward(h, w, nv)
                gh, gw, hs_again = _kernels.swiglu_backward(h, w, ghs, nv)
                acc[impl] = dict(
                    swiglu_fwd=rel(hs, hs64), swiglu_bwd_gh=rel(gh, gh64), swiglu_bwd_gw=rel(gw, gw64),
                    recompute_bitwise=bool(torch.equal(hs, hs_again)),
                    gather_sum=rel(_kernels.gather_sum(y, idx, nv), gs64),
                    gather_rows=bool(torch.equal(_kernels.gather_rows(x_TD, rows_A), x_TD[rows_A])),
                )
        finally:
            _kernels.use_triton = saved
        rows.setdefault("kernels", {})["accuracy"] = acc
        print(f"  {name:8s} kernel accuracy vs fp64: {acc}", flush=True)
        note = []
        for k, (f, nbytes) in cases.items():
            ms_k = bench(f, [])[0]
            rows.setdefault("kernels", {})[k] = dict(ms=ms_k, gbps=nbytes / (ms_k * 1e-3) / 1e9)
            note.append(f"{k}={ms_k:.3f}ms/{nbytes / (ms_k * 1e-3) / 1e9:.0f}GB/s")
        print(f"  {name:8s} kernels  " + " ".join(note), flush=True)
        del big

    attempt("kernels", v_kernels)

    def v_parts():
        """Router forward + backward alone, and the routing bookkeeping of dispatch_combine (no grad)."""
        xr = x_TD.detach().clone().requires_grad_()
        gw = torch.rand(routing.weights_A.shape[0], device=dev)

        def router_fn():
            r = layer.router(xr)
            ((r.weights_A * gw).sum() + r.probs_TE.float().mean()).backward()

        ms_r = bench(router_fn, [xr] + list(layer.router.parameters()))[0]

        def prep_fn():  # dispatch_combine's bookkeeping before the experts (token-major slots)
            with torch.no_grad():
                ids = routing.expert_ids_A
                sorted_ids, o = torch.sort(ids, stable=True)
                torch.searchsorted(sorted_ids, torch.arange(1, E + 1, device=dev)).to(torch.int32)
                routing.token_ids_A[o], routing.weights_A.gather(0, o)
                torch.empty_like(o).scatter_(0, o, torch.arange(o.numel(), device=dev))

        ms_p = bench(prep_fn, [])[0]
        rows["parts" + tag] = dict(router_fwd_bwd_ms=ms_r, dispatch_prep_ms=ms_p)
        print(f"  {name:8s} parts    router fwd+bwd {ms_r:.3f} ms, dispatch prep {ms_p:.3f} ms", flush=True)

    attempt("parts", v_parts)

    def v_profile(label="profile"):
        """Where the time of ours (eager) goes: CUDA time per kernel over 5 forward + backward passes."""
        from torch.profiler import ProfilerActivity, profile

        fn = layer_fn(layer)
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                for p_ in params + [x]:
                    p_.grad = None
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
        rows[label + tag] = table
        if OUT_DIR:
            with open(os.path.join(OUT_DIR, f"{label}_{name}{tag.replace('/', '_')}.txt"), "w") as f:
                f.write(table)
        print("\n".join(table.splitlines()[:20]), flush=True)

    attempt("profile", v_profile)

    def v_host(label="host"):
        """Host time per forward + backward of ours (eager): the time to enqueue one pass on an idle GPU (Python,
        autograd and launches; median of 30), against the GPU's busy time per pass (the sum of its kernels under
        the profiler, over 5 passes). The layer is host-bound wherever the first is the larger."""
        from torch.profiler import ProfilerActivity, profile

        fn = layer_fn(layer)
        fn()
        sync = torch.cuda.synchronize if DEV.type == "cuda" else (lambda: None)
        hosts = []
        for _ in range(30):
            for p_ in params + [x]:
                p_.grad = None
            sync()
            t0 = time.perf_counter()
            fn()
            hosts.append((time.perf_counter() - t0) * 1e3)
            sync()
        host_ms = sorted(hosts)[len(hosts) // 2]
        busy_ms = float("nan")
        if DEV.type == "cuda":
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    for p_ in params + [x]:
                        p_.grad = None
                    fn()
                sync()
            busy_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 5 / 1e3
        rows[label + tag] = dict(host_ms=host_ms, gpu_busy_ms=busy_ms)
        print(f"  {name:8s} {label + tag:13s} host {host_ms:.2f} ms per pass, GPU busy {busy_ms:.2f} ms per pass",
              flush=True)

    attempt("host", v_host)

    # Lets dynamo trace causal expert choice's kept rows (an output size that depends on data; see
    # dispatch_combine), as the recipe does with compile on: the layer is then one graph (else it breaks there).
    @torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
    def v_compile(variant="ours_compile", mode=None):
        if variant.startswith("ours_fp8") and not fp8_ok(variant):
            return
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()
        compiled = torch.compile(layer, dynamic=False, mode=mode)
        mark = mode == "reduce-overhead"
        t0 = time.time()
        layer_fn(compiled, mark)()
        torch.cuda.synchronize() if DEV.type == "cuda" else None
        ctime = time.time() - t0
        graphs = counters["stats"]["unique_graphs"]
        ms, peak = bench(layer_fn(compiled, mark), params + [x])
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        out = compiled(x).detach().view(T, D)
        r = layer.last_routing
        ref = reference(
            x_TD.float(), layer.experts.gate_up_proj.detach().float(), layer.experts.down_proj.detach().float(),
            r.token_ids_A, r.expert_ids_A, r.weights_A.float(),
        )
        record(variant, ms, peak, {"out": rel(out, ref)}, note=f"compile {ctime:.0f}s, {graphs} graphs")

    attempt("ours_compile", v_compile)

    def fp8_ok(variant):
        why = None
        if DEV.type != "cuda":
            why = "needs a CUDA GPU"
        elif torch.cuda.get_device_capability() < (9, 0):
            why = f"needs compute capability 9.0+, this GPU has {torch.cuda.get_device_capability()}"
        if why:
            print(f"  {name:8s} {variant + tag:13s} skipped: expert_fp8 {why}", flush=True)
        return why is None

    def with_fp8(f):  # runs f with the experts' GEMMs in fp8, then back to bf16
        def run():
            layer.experts.expert_fp8 = True
            try:
                f()
            finally:
                layer.experts.expert_fp8 = False

        return run

    def v_fp8():
        if not fp8_ok("ours_fp8"):
            return
        errs = check_dispatch(moe_layer_module.dispatch_combine, layer, x_TD, routing)
        ms, peak = bench(layer_fn(layer), params + [x])
        record("ours_fp8", ms, peak, errs)

    attempt("ours_fp8", with_fp8(v_fp8))
    attempt("ours_fp8_compile", with_fp8(lambda: v_compile("ours_fp8_compile")))
    attempt("profile_fp8", with_fp8(lambda: fp8_ok("profile_fp8") and v_profile("profile_fp8")))
    attempt("host_fp8", with_fp8(lambda: fp8_ok("host_fp8") and v_host("host_fp8")))

    def with_separate_swiglu(f):  # runs f with quack's SwiGLU epilogues off (SwiGLU in our kernels), then on
        def run():
            from torchtune_moe.modules._cute_gemm import CuteGroupedGemm

            CuteGroupedGemm.fuses_swiglu = False
            try:
                f()
            finally:
                CuteGroupedGemm.fuses_swiglu = True

        return run

    attempt("ours_sep_swiglu", with_separate_swiglu(lambda: v_ours("ours_sep_swiglu")))
    attempt("ours_sep_swiglu_compile", with_separate_swiglu(lambda: v_compile("ours_sep_swiglu_compile")))

    def v_graph(label="ours_graph"):
        """ours captured in one CUDA graph per forward + backward (``torchtune_moe.training.capture_cuda_graph``:
        the aux losses of earlier passes dropped, warm-up and capture on one side stream, gradients None) and
        replayed (docs/performance.md, "CUDA graphs")."""
        if DEV.type != "cuda":
            print(f"  {name:8s} {label + tag:13s} skipped: CUDA graphs need a CUDA GPU", flush=True)
            return
        if router == "causal_expert_choice":
            print(f"  {name:8s} {label + tag:13s} skipped: causal expert choice reads its kept rows' count on the "
                  "host, which a CUDA graph cannot capture", flush=True)
            return
        from torchtune_moe.training import capture_cuda_graph

        def step():
            x.grad = None
            out = layer(x)
            torch.autograd.backward([out, layer.aux_loss], [gy, None])
            return out

        leaves = params + [x]
        m0 = torch.cuda.memory_reserved()
        graph, out_static = capture_cuda_graph(layer, step)
        pool_mib = (torch.cuda.memory_reserved() - m0) / 2**20  # the warm-up's and the graph's new reservations
        grads_static = [p_.grad for p_ in leaves]
        graph.replay()
        for p_ in params:
            p_.grad = None
        out_eager = step()  # one eager pass on the same inputs: the replay must match it
        errs = {"out": rel(out_static, out_eager)}
        errs.update({f"grad_{i}": rel(a, p_.grad) for i, (a, p_) in enumerate(zip(grads_static, leaves))})
        ms, _ = bench(graph.replay, [])
        record(label, ms, pool_mib, errs, note="one CUDA graph per pass; MiB: reserved by its warm-up and pool")
        del graph, out_static, grads_static
        layer.clear_aux_losses()

    attempt("ours_graph", v_graph)
    attempt("ours_fp8_graph", with_fp8(lambda: fp8_ok("ours_fp8_graph") and v_graph("ours_fp8_graph")))

    # the same variant again: the spread between the two is the noise
    def v_again():
        ms, peak = bench(layer_fn(layer), params + [x])
        record("ours_again", ms, peak)

    attempt("ours_again", v_again)
    attempt("ours_compile_max", lambda: v_compile("ours_compile_max", "max-autotune-no-cudagraphs"))
    attempt("ours_compile_graphs", lambda: v_compile("ours_compile_graphs", "reduce-overhead"))
    del layer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--variants", nargs="+", default=VARIANTS[:-1], choices=VARIANTS,
                   help="default: all but ours_compile_max (minutes of autotuning)")
    p.add_argument("--routers", nargs="+", default=["token_choice"], choices=list(ROUTER_TAGS),
                   help="router kinds for the variants ours* / parts / profile (default: token_choice)")
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script runs")
    args = p.parse_args()
    if args.tokens < 1:
        p.error(f"--tokens must be at least 1, got {args.tokens}")
    global DEV, OUT_DIR
    if args.dry_run:
        DEV = torch.device("cpu")
        for k, (E, K, D, H, n) in list(SHAPES.items()):
            SHAPES[k] = (min(E, 8), min(K, 2), 64, 32, n)
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/moe_layer.py needs a CUDA GPU")
    prepare_out(p, args.out)
    OUT_DIR = args.out
    import transformers

    env = dict(
        gpu=torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", torch=torch.__version__,
        transformers=transformers.__version__, tokens=args.tokens,
    )
    print(env, flush=True)
    results = {}
    for name in args.shapes:
        run_shape(name, args.tokens, set(args.variants), results, args.routers)
    ours = [
        "ours", "ours_again", "ours_compile", "ours_sep_swiglu", "ours_sep_swiglu_compile", "ours_fp8",
        "ours_fp8_compile", "ours_graph", "ours_fp8_graph", "ours_compile_graphs", "ours_compile_max",
    ]
    order = ["dense"] + [v + ROUTER_TAGS[r] for r in args.routers for v in ["dense_again"] + ours]
    order += ["v0", "hf_grouped", "hf_eager", "gmm_only"]
    lines = [
        f"MoE layer fwd+bwd, {args.tokens} tokens, bf16, {env['gpu']}, torch {env['torch']}",
        "| shape | variant | ms | TFLOP/s | of dense ceiling | act. MiB | max rel err | experts/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        dense_ms = res["rows"].get("dense", {}).get("ms")
        for v in order:
            r = res["rows"].get(v)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {name} | {v} | failed | | | | | |")
                continue
            frac = f"{dense_ms / r['ms']:.2f}" if dense_ms else "-"
            err = f"{max(r['errs'].values()):.1e}" if r["errs"] else "-"
            ept = f"{r['experts_per_token']:.2f}" if "ours" in v else "-"
            lines.append(
                f"| {name} | {v} | {r['ms']:.2f} | {r['tflops']:.0f} | {frac} | {r['act_mib']:.0f} | {err} | {ept} |"
            )
    host_rows = [(name, v, r) for name, res in results.items() for v, r in res["rows"].items()
                 if "host_ms" in r]
    if host_rows:
        lines += ["", "| shape | variant | host ms per pass | GPU busy ms per pass |", "|---|---|---|---|"]
        lines += [f"| {name} | {v} | {r['host_ms']:.2f} | {r['gpu_busy_ms']:.2f} |" for name, v, r in host_rows]
    table = "\n".join(lines)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "moe_layer.json"), "w") as f:
            json.dump(dict(env=env, results=results), f, indent=1)
        with open(os.path.join(args.out, "moe_layer.md"), "w") as f:
            f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
