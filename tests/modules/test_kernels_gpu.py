"""The Triton kernels (CUDA) against the torch code they replace (CPU), and the whole layer on the GPU.

Marked ``gpu``: skipped where CUDA is absent (CI). Run on a GPU machine with ``python -m pytest -m gpu``.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from torchtune_moe.models import moe_layer
from torchtune_moe.modules import _kernels
from torchtune_moe.modules.routers import router_logits

pytestmark = pytest.mark.gpu

A, T, K, D, H = 4096, 512, 8, 256, 384


def _rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=torch.float32).to(dtype)


def _close(gpu: torch.Tensor, cpu: torch.Tensor, tol: float = 1e-2) -> None:
    gpu, cpu = gpu.float().cpu(), cpu.float()
    assert torch.isfinite(gpu).all()
    err = (gpu - cpu).norm() / cpu.norm().clamp(min=1e-12)
    assert err < tol, f"relative error {err:.2e}"


def test_triton_is_used_on_cuda():
    assert _kernels.use_triton(torch.empty(1, device="cuda"))


def _valid(t: torch.Tensor, num_valid: torch.Tensor, may_drop: bool) -> torch.Tensor:
    """The rows a consumer reads: all, or with ``may_drop`` those before ``num_valid`` (the Triton kernels
    leave the others unwritten)."""
    return t[: int(num_valid)] if may_drop and t.dim() == 2 else t


def _poisoned(fn, *args):
    """Runs ``fn`` with the caching allocator's next blocks full of NaN: rows a kernel leaves unwritten would
    then read as NaN, so a check of the rows it must write sees any it missed."""
    torch.full((64 * 2**20,), float("nan"), device="cuda")  # freed at once, reused by the next allocations
    return fn(*args)


@pytest.mark.parametrize("may_drop", [False, True])
def test_swiglu_forward_and_backward_match_torch_code(may_drop):
    h_AF, w_A, g_AH = _rand(A, 2 * H), torch.rand(A, device="cuda"), _rand(A, H)
    num_valid = torch.tensor([A - 100], dtype=torch.int32, device="cuda")
    cpu = [t.cpu() for t in (h_AF, w_A, g_AH, num_valid)]
    fwd = _poisoned(_kernels.swiglu_forward, h_AF, w_A, num_valid, may_drop)
    _close(_valid(fwd, num_valid, may_drop),
           _valid(_kernels.swiglu_forward(cpu[0], cpu[1], cpu[3], may_drop), num_valid, may_drop))
    bwd = _poisoned(_kernels.swiglu_backward, h_AF, w_A, g_AH, num_valid, may_drop)
    for got, want in zip(bwd, _kernels.swiglu_backward(*cpu[:3], cpu[3], may_drop)):
        _close(_valid(got, num_valid, may_drop), _valid(want, num_valid, may_drop))
    if may_drop:  # the routing-weight gradient of a dropped row is written, as zero
        assert bwd[1][int(num_valid):].abs().max() == 0
    assert torch.equal(_valid(bwd[2], num_valid, may_drop), _valid(fwd, num_valid, may_drop))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("may_drop", [False, True])
def test_gather_rows_and_gather_sum_match_torch_code(may_drop, weighted):
    src_TD = _rand(T, D)
    index_A = torch.randint(0, T, (A,), device="cuda")
    num_valid = torch.tensor([A - 300], dtype=torch.int32, device="cuda")
    got = _poisoned(_kernels.gather_rows, src_TD, index_A, num_valid, may_drop)
    assert torch.equal(_valid(got, num_valid, may_drop).cpu(), _valid(src_TD.cpu()[index_A.cpu()], num_valid, may_drop))
    src_AD = _rand(A, D)
    weights_A = torch.rand(A, device="cuda") if weighted else None
    index_TK = torch.randperm(A, device="cuda")[: T * K].view(T, K)
    cpu_w = weights_A.cpu() if weighted else None
    _close(_kernels.gather_sum(src_AD, index_TK, num_valid, may_drop, weights_A),
           _kernels.gather_sum(src_AD.cpu(), index_TK.cpu(), num_valid.cpu(), may_drop, cpu_w), tol=5e-3)


@pytest.mark.parametrize("weighted", [False, True])
def test_segment_sum_matches_torch_code(weighted):
    """Variable rows per token (some none), entries past the last segment never read."""
    src_AD = _rand(A, D)
    weights_A = torch.rand(A, device="cuda") if weighted else None
    counts_T = torch.randint(0, 2 * K, (T,), device="cuda")
    counts_T[:5] = 0
    offsets_T = counts_T.cumsum(0).to(torch.int32)
    index_J = torch.randint(0, A, (int(offsets_T[-1]) + 50,), device="cuda")
    got = _kernels.segment_sum(src_AD, index_J, offsets_T, weights_A)
    cpu_w = weights_A.cpu() if weighted else None
    _close(got, _kernels.segment_sum(src_AD.cpu(), index_J.cpu(), offsets_T.cpu(), cpu_w), tol=5e-3)
    assert got[:5].abs().max() == 0


@pytest.mark.parametrize("router", ["token_choice", "causal_expert_choice", "expert_choice"])
def test_layer_on_gpu_matches_cpu(router):
    """The same bf16 layer and input on the GPU (Triton kernels, CUDA grouped GEMM) and on the CPU (torch
    code): same routing (fp32 router logits from the same bf16 values), outputs and gradients to bf16
    rounding."""
    torch.manual_seed(0)
    kwargs = dict(dim=D, hidden_dim=H, num_experts=16, experts_per_token=4, router=router, aux_loss_coeff=0.01)
    cpu = moe_layer(**kwargs).to(torch.bfloat16)
    gpu = moe_layer(**kwargs)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda().to(torch.bfloat16)
    if router == "causal_expert_choice":  # thresholds on: a varying number of experts per token, some none
        for layer in (cpu, gpu):
            layer.router.thresholds.fill_(0.08)
            layer.router.num_updates.fill_(1)
    x = torch.randn(4, 128, D).to(torch.bfloat16)
    x_gpu = x.cuda().requires_grad_()
    x = x.requires_grad_()
    out, out_gpu = cpu(x), gpu(x_gpu)
    assert torch.equal(gpu.tokens_per_expert.cpu(), cpu.tokens_per_expert)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (out_gpu * g.cuda()).sum().backward()
    _close(out_gpu, out.detach(), tol=2e-2)
    _close(x_gpu.grad, x.grad, tol=2e-2)
    _close(gpu.experts.down_proj.grad, cpu.experts.down_proj.grad, tol=2e-2)
    _close(gpu.experts.gate_up_proj.grad, cpu.experts.gate_up_proj.grad, tol=2e-2)
    _close(gpu.router.gate.weight.grad, cpu.router.gate.weight.grad, tol=5e-2)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def _logits_and_grads(fn, x_TD, w_ED, g_TE):
    x_TD, w_ED = x_TD.detach().requires_grad_(), w_ED.detach().requires_grad_()
    logits_TE = fn(x_TD, w_ED)
    (logits_TE * g_TE).sum().backward()
    return logits_TE.detach(), x_TD.grad, w_ED.grad


@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_router_logits_on_tensor_cores_match_fp32_path(compiled):
    """bf16 tokens and gate: the logits come from a bf16 GEMM with fp32 output (``aten.mm.dtype``) and match
    fp64 to fp32 rounding; the gradients match the fp32 GEMM of upcast copies (the path it replaces), and
    under torch.compile the function traces as one graph with the same results."""
    torch.manual_seed(0)
    T, D, E = 2048, 2048, 128
    x_TD, w_ED = _rand(T, D), (_rand(E, D).float() * 0.02).bfloat16()
    g_TE = torch.randn(T, E, device="cuda") * 1e-3
    fn = torch.compile(router_logits, fullgraph=True) if compiled else router_logits
    if not compiled:
        with _RecordOps() as rec:
            fn(x_TD, w_ED)
        assert "aten.mm.dtype" in rec.ops, sorted(rec.ops)
    ours = _logits_and_grads(fn, x_TD, w_ED, g_TE)
    fp32 = _logits_and_grads(lambda x, w: F.linear(x.float(), w.float()), x_TD, w_ED, g_TE)
    fp64 = _logits_and_grads(lambda x, w: x @ w.t(), x_TD.double(), w_ED.double(), g_TE.double())  # not rounded
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == torch.bfloat16

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    assert rel(ours[0], fp64[0]) < 1e-4
    for got, want, exact in zip(ours[1:], fp32[1:], fp64[1:]):  # grad_x, grad_w (bf16, as the fp32 path's)
        assert rel(got, want) < 1e-3
        assert rel(got, exact) <= 1.05 * rel(want, exact) + 1e-6


def test_kept_prefix_waits_for_the_copy_of_its_count():
    """dispatch_combine's host read: the count, computed behind ~ms of queued GEMMs and copied to the host
    without blocking, is waited for (not read early), and the kept prefix is right."""
    from torchtune_moe.modules import moe_layer as moe_layer_module

    big_NN = torch.randn(4096, 4096, device="cuda")
    for _ in range(8):
        big_NN = big_NN @ big_NN * 1e-2
    count = (big_NN[0, 0] * 0).nan_to_num().long() + 37  # 37, known only once the GEMMs are done
    host = moe_layer_module._copy_to_host(count)
    assert host.device.type == "cpu" and host.is_pinned()
    src_A = torch.arange(100, device="cuda")
    kept_R = moe_layer_module._kept_prefix(src_A, host)
    assert torch.equal(kept_R.cpu(), torch.arange(37))
    assert moe_layer_module._kept_prefix(src_A, moe_layer_module._copy_to_host(count * 0)).shape == (1,)


def test_compiled_causal_expert_choice_is_one_graph_and_matches_eager():
    """With dynamo allowed to trace data-dependent sizes (as the recipe sets it), the causal expert choice
    layer compiles without a graph break at its kept rows or its threshold statistic (the only break left is
    the layer's bookkeeping after its output, token choice's too), and matches eager: output, gradients and
    the accumulated batch thresholds."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    layer = moe_layer(
        dim=D, hidden_dim=H, num_experts=16, experts_per_token=4, router="causal_expert_choice", aux_loss_coeff=0.01
    ).cuda().to(torch.bfloat16)
    layer.router.thresholds.fill_(0.08)
    layer.router.num_updates.fill_(1)
    x = _rand(2, 256, D)

    def step(mod):
        for p in layer.parameters():
            p.grad = None
        layer.router._thr_sum.zero_()
        layer.router._thr_count.zero_()
        xg = x.detach().requires_grad_()
        out = mod(xg)
        (out.float().square().sum() + layer.aux_loss).backward()
        return [out, xg.grad, layer.router._thr_sum.clone()] + [p.grad for p in layer.parameters()]

    want = step(layer)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = step(torch.compile(layer))
    breaks = " ".join(counters["graph_break"])
    assert "kept_prefix" not in breaks and "accumulate_batch_thresholds" not in breaks, breaks
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["graph_break"])
    assert layer.router._thr_count.item() == 1
    for g, w in zip(got, want):
        _close(g, w.detach().cpu(), tol=2e-2)
