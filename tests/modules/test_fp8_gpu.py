"""expert_fp8 on the GPU: torchao's Triton quantizers against our torch code for them (bit for bit), the real fp8
grouped GEMMs (torch._scaled_grouped_mm) against the emulation and against bf16, the layer's outputs and
gradients, and torch.compile.

Marked ``gpu`` (skipped without CUDA, as in CI) and skipped below compute capability 9.0. Run:
``python3 -m pytest -q -m gpu tests/modules/test_fp8_gpu.py``.
"""

import copy
import dataclasses

import pytest
import torch

from torchtune_moe.models import moe_layer
from torchtune_moe.modules import _grouped_gemm as gg
from torchtune_moe.modules.moe_linear import ClampedSwiGLU

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
        reason="expert_fp8 needs CUDA compute capability 9.0+",
    ),
]

FP8 = torch.float8_e4m3fn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def _offsets(counts):
    return torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)


def test_torchao_kernels_equal_our_torch_code():
    """The emulation quantizes exactly as the GPU path: same scales, same fp8 bytes."""
    from torchao.prototype.moe_training.kernels import (
        triton_fp8_per_group_colwise_scales,
        triton_fp8_rowwise_3d_transpose_rhs,
    )

    torch.manual_seed(0)
    offsets_E = _offsets([32, 0, 160, 16, 48])  # an empty expert included
    A = int(offsets_E[-1])
    t = (torch.randn(A, 512, device="cuda") * torch.logspace(-2, 2, 512, device="cuda")).bfloat16()
    q_k, s_k = triton_fp8_per_group_colwise_scales(t.t().contiguous().t(), offsets_E, FP8, round_scales_to_power_of_2=True)
    q_t, s_t = gg.per_group_colwise_fp8(t, offsets_E)
    nonempty = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).cpu() > 0
    assert torch.equal(s_k.view(5, -1)[nonempty.cuda()], s_t.view(5, -1)[nonempty.cuda()])
    assert torch.equal(q_k.float(), q_t.float())
    w = torch.randn(4, 384, 256, device="cuda").bfloat16()  # [E, N, K]
    for hp in (w, w.transpose(-2, -1)):  # the forward's w^T, the input gradient's w
        q_k, s_k = triton_fp8_rowwise_3d_transpose_rhs(hp, output_dtype=FP8, round_scales_to_power_of_2=True)
        q_t, s_t = gg.transpose_rhs_fp8(hp)
        assert torch.equal(s_k, s_t) and torch.equal(q_k.float(), q_t.float())
        assert q_k.stride(-2) == 1  # column-major, as _scaled_grouped_mm wants its right operand


@pytest.mark.parametrize("K", [96, 2048, 4112, 14336, 20000, 28672, 40000])
def test_rowwise_fp8_kernel_equals_torchao_code(K):
    """Our Triton quantizer of activation rows against torchao's torch code: same scales, same bytes (rows held in
    registers up to 32768 elements, 1 to 64 rows per program; longer rows in two passes: K = 40000)."""
    from torchtune_moe.modules import _kernels

    torch.manual_seed(0)
    x = (torch.randn(301, K, device="cuda") * torch.logspace(-3, 3, 301, device="cuda").unsqueeze(-1)).bfloat16()
    x[3] = 0  # a zero row (the padding)
    x[5] = 1.75  # amax 1.75: the scale 448 / 1.75 = 256 exactly, a power of 2
    x[6, :7] = torch.tensor([84.0, -84.0, 124.0, 1e-30, -3e4, 0.5, 3.0], device="cuda")  # ties, tiny, huge
    q, s = _kernels.rowwise_fp8(x)
    q_t, s_t = gg.rowwise_fp8_torch(x, -1)
    assert q.dtype == FP8 and q.is_contiguous() and s.shape == (301, 1)
    assert torch.equal(s, s_t)
    assert torch.equal(q.view(torch.uint8), q_t.view(torch.uint8))
    q32, s32 = _kernels.rowwise_fp8(x.float())  # fp32 rows too
    q32_t, s32_t = gg.rowwise_fp8_torch(x.float(), -1)
    assert torch.equal(s32, s32_t) and torch.equal(q32.view(torch.uint8), q32_t.view(torch.uint8))


@pytest.mark.parametrize(
    "counts, pad_rows, N",
    [
        ([32, 0, 160, 16, 48], 0, 512),  # an empty expert
        ([16, 2048, 0, 0, 4096, 16], 16, 96),  # long groups, N not a multiple of the 64-column block, rows past the end
        ([0, 48, 1024, 0], 0, 2080),  # empty first and last experts, N a multiple of 32 but not of 64
        ([5, 0, 27, 100], 3, 160),  # counts and A not multiples of 16 (A % 16 != 0: no aligned-store hints)
    ],
)
def test_per_group_colwise_kernel_equals_torchao_kernel(counts, pad_rows, N):
    """Our kernel on the row-major input against torchao's on the transposed copy (what weight_grad called before):
    the same fp8 bytes in the same column-major layout, the same scales; and against our torch code (the emulation).
    torchao's stores its scales with a mask that is wrong for N not a multiple of its 32 columns (it writes past
    N into the next expert's): our N keep to multiples of 32 when comparing with it."""
    from torchao.prototype.moe_training.kernels import triton_fp8_per_group_colwise_scales

    from torchtune_moe.modules import _kernels

    torch.manual_seed(0)
    offsets_E = _offsets(counts)
    E, L = len(counts), int(offsets_E[-1])
    A = L + pad_rows
    t = (torch.randn(A, N, device="cuda") * torch.logspace(-3, 3, N, device="cuda")).bfloat16()
    t[: min(L, 7), 0] = torch.tensor([84.0, -84.0, 124.0, 1e-30, -3e4, 0.5, 3.0], device="cuda")[: min(L, 7)]
    t[:, 1] = 0  # a zero column
    q, s = _kernels.per_group_colwise_fp8(t, offsets_E)
    assert q.dtype == FP8 and q.shape == (A, N) and q.stride() == (1, A) and s.shape == (E * N,)
    q_k, s_k = triton_fp8_per_group_colwise_scales(t.t().contiguous().t(), offsets_E, FP8, round_scales_to_power_of_2=True)
    assert q_k.stride() == q.stride()
    assert torch.equal(s, s_k)
    assert torch.equal(q[:L].view(torch.uint8), q_k[:L].view(torch.uint8))  # rows past offsets_E[-1]: unspecified
    q_t, s_t = gg.per_group_colwise_fp8(t, offsets_E)
    assert torch.equal(s, s_t)
    assert torch.equal(q[:L].view(torch.uint8), q_t[:L].view(torch.uint8))
    # the fake's shapes and strides against the kernel's (not the compiled-graph checks: rows past offsets_E[-1]
    # are left unwritten, so two calls need not agree there)
    torch.library.opcheck(
        _kernels._per_group_colwise_fp8_op.op, (t, offsets_E), test_utils=("test_schema", "test_faketensor")
    )


def test_forward_weight_quantization_equals_torchao_kernel():
    """The forward's w^T through our rowwise kernel: the values and layout of triton_fp8_rowwise_3d_transpose_rhs."""
    from torchao.prototype.moe_training.kernels import triton_fp8_rowwise_3d_transpose_rhs

    from torchtune_moe.modules import _kernels

    torch.manual_seed(0)
    w = (torch.randn(4, 384, 272, device="cuda") * torch.logspace(-3, 3, 384, device="cuda").unsqueeze(-1)).bfloat16()
    q_k, s_k = triton_fp8_rowwise_3d_transpose_rhs(w, output_dtype=FP8, round_scales_to_power_of_2=True)
    q_NK, s_N1 = _kernels.rowwise_fp8(w.reshape(-1, 272))
    q = q_NK.view(4, 384, 272).transpose(-2, -1)
    assert q.stride() == q_k.stride() and torch.equal(s_N1.view(4, 384), s_k)
    assert torch.equal(q.view(torch.uint8), q_k.view(torch.uint8))


def test_input_grad_quantizers_equal_torch_code():
    """The input gradient's two quantizers: the weight as the forward quantizes it (per row n) written column-major
    in one pass, and g's rows times a power of 2 per (expert, n) quantized per row: the bytes of the torch code."""
    from torchtune_moe.modules import _kernels

    torch.manual_seed(0)
    E, N, K = 3, 1040, 272  # N past the 128-row tiles and not a multiple of them, K not a multiple of 64
    w = (torch.randn(E, N, K, device="cuda") * torch.logspace(-3, 3, N, device="cuda").unsqueeze(-1)).bfloat16()
    w[1, 5] = 0  # a zero row
    q_NK, s_N1 = _kernels.rowwise_fp8(w.reshape(E * N, K))  # what the forward computes
    q = _kernels.scaled_transpose_fp8(w, s_N1.view(E, N))
    assert q.shape == (E, N, K) and q.stride() == (N * K, 1, N)
    assert torch.equal(q.view(torch.uint8), q_NK.view(E, N, K).view(torch.uint8))
    offsets_E = _offsets([96, 0, 205])
    for width in (N, 20000, 40000):  # one pass (up to 32768) and two
        g = torch.randn(301, width, device="cuda") * torch.logspace(-3, 3, 301, device="cuda").unsqueeze(-1)
        g = g.bfloat16()
        mul = torch.exp2(-torch.randint(0, 20, (E, width), device="cuda").float())
        expert = _kernels.row_experts(offsets_E, 301)
        u8, s = _kernels.rowwise_fp8(g, mul.bfloat16(), expert)
        u8_t, s_t = gg.rowwise_fp8_torch(g.float() * mul[expert], -1)
        assert torch.equal(s, s_t) and torch.equal(u8.view(torch.uint8), u8_t.view(torch.uint8))
    torch.library.opcheck(
        _kernels._scaled_transpose_fp8_op.op, (w, s_N1.view(E, N)), test_utils=("test_schema", "test_faketensor")
    )


@pytest.mark.parametrize("op", ["forward", "input_grad", "weight_grad"])
def test_fp8_gemms_against_emulation_and_bf16(op):
    torch.manual_seed(0)
    offsets_E = _offsets([256, 0, 512, 128, 1152])
    A, N, K = int(offsets_E[-1]), 768, 512
    real, emul = gg.Fp8GroupedGemm(), gg.Fp8GroupedGemm(emulate=True)
    w = torch.randn(5, N, K, device="cuda").bfloat16()
    if op == "weight_grad":
        args = (torch.randn(A, N, device="cuda").bfloat16(), torch.randn(A, K, device="cuda").bfloat16(), offsets_E)
    elif op == "forward":
        args = (torch.randn(A, K, device="cuda").bfloat16(), w, offsets_E)
    else:
        args = (torch.randn(A, N, device="cuda").bfloat16(), w, offsets_E)
    got = getattr(real, op)(*args)
    emulated = getattr(emul, op)(*[a.cpu() for a in args[:2]], args[2].cpu())
    exact = getattr(gg.BF16, op)(*args)
    if op == "forward":  # (product, the weight's row scales): the same scales on both paths
        (got, scale), (emulated, scale_emul), exact = got, emulated, exact[0]
        assert torch.equal(scale.cpu(), scale_emul)
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    assert _rel(got, emulated) < 1e-2
    assert _rel(got, exact) < 0.06


def _routed_inputs(layer_cpu, x_cpu, router):
    """A routing made on CPU in fp32, moved to CUDA: both devices see the same assignments."""
    routing = router(x_cpu.float())
    return routing, dataclasses.replace(
        routing, **{f.name: getattr(routing, f.name).cuda() for f in dataclasses.fields(routing)
                    if isinstance(getattr(routing, f.name), torch.Tensor)}
    )


def _run(experts, x, routing):
    x = x.detach().requires_grad_()
    w = routing.weights_A.detach().clone().requires_grad_()
    out, _ = experts(x, dataclasses.replace(routing, weights_A=w))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    params = [x, experts.gate_up_proj, experts.down_proj, w]
    if experts.gate_up_proj_bias is not None:
        params += [experts.gate_up_proj_bias, experts.down_proj_bias]
    return [out, *torch.autograd.grad((out.float() * g.float()).sum(), params)]


@pytest.mark.parametrize("router", ["token_choice", "expert_choice", "causal_expert_choice"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gemms", ["default", "torch"])
def test_fp8_layer_against_emulation_and_bf16(router, bias, gemms, monkeypatch):
    """Outputs and gradients (tokens, both weights, routing weights, biases) of the real fp8 experts: close to the
    emulation on the same routing, within fp8 error of the bf16 experts. ``default``: quack's fp8 GEMMs where
    quack imports (else torch's again); ``torch``: torch's (``TORCHTUNE_MOE_GROUPED_GEMM=torch``)."""
    from torchtune_moe.modules import _cute_fp8, _cute_gemm

    if gemms == "torch":
        monkeypatch.setenv(_cute_gemm.ENV_VAR, "torch")
    torch.manual_seed(0)
    E, D, H, T = 8, 512, 256, 1024
    layer = moe_layer(dim=D, moe_hidden_dim=H, num_experts=E, experts_per_token=2, router=router,
                      expert_linear_bias=bias)
    if bias:
        layer.experts.act = ClampedSwiGLU()
    if router == "causal_expert_choice":  # thresholds on: some slots dropped
        with torch.no_grad():
            layer.router(torch.randn(T, D))
        layer.router.update()
    x_cpu = torch.randn(T, D).bfloat16()
    routing_cpu, routing = _routed_inputs(layer, x_cpu, layer.router)
    bf16 = layer.experts.to(torch.bfloat16)
    fp8 = copy.deepcopy(bf16).cuda()
    fp8.expert_fp8 = True
    emul = copy.deepcopy(bf16)
    emul.expert_fp8, emul._fp8_emulate = True, True
    assert isinstance(fp8._fp8_gemm(x_cpu.cuda()), _cute_fp8.QuackFp8GroupedGemm) == (
        gemms == "default" and _cute_gemm.cute_available()
    )
    got = _run(fp8, x_cpu.cuda(), routing)
    want_emul = _run(emul, x_cpu, routing_cpu)
    want_bf16 = _run(bf16.cuda(), x_cpu.cuda(), routing)
    names = ["out", "grad_x", "grad_gate_up", "grad_down", "grad_weights", "grad_gate_up_bias", "grad_down_bias"]
    for name, a, b, c in zip(names, got, want_emul, want_bf16):
        # vs the emulation: the same quantization; fast accumulation and bf16 rounding move a few values across an
        # fp8 rounding boundary of the next GEMM. quack's path scales w per column for the down projection's input
        # gradient (the emulation per row): 0.038 measured on grad_gate_up. vs bf16: fp8's error (the CPU tests').
        assert _rel(a, b) < (3e-2 if gemms == "torch" else 5e-2), (name, _rel(a, b))
        assert _rel(a, c) < 0.12, (name, _rel(a, c))
    assert not _cute_fp8._failed  # quack's fp8 kernel ran where chosen (no silent fallback)


def test_fp8_layer_compiled():
    """torch.compile of the fp8 layer matches eager fp8."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    D, H, T = 512, 256, 2048
    layer = moe_layer(dim=D, moe_hidden_dim=H, num_experts=8, experts_per_token=2, expert_fp8=True)
    layer = layer.to("cuda", torch.bfloat16)
    x = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16)

    def run(mod):
        xx = x.detach().requires_grad_()
        out = mod(xx)
        grads = torch.autograd.grad(out.float().square().sum(), [xx, layer.experts.gate_up_proj, layer.experts.down_proj])
        return [out, *grads]

    eager = run(layer)
    compiled = run(torch.compile(layer, dynamic=False))
    for a, b in zip(compiled, eager):
        assert _rel(a, b) < 1e-2


def test_fp8_padding_is_exact_with_bf16_gemms_on_gpu(monkeypatch):
    """The padded layout through the Triton kernels (which leave dropped rows unwritten) adds nothing."""
    torch.manual_seed(0)
    layer = moe_layer(dim=256, moe_hidden_dim=128, num_experts=8, experts_per_token=2, router="expert_choice")
    layer = layer.to("cuda", torch.bfloat16)
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    routing = layer.router(x)
    padded = copy.deepcopy(layer.experts)
    padded.expert_fp8 = True
    monkeypatch.setattr(padded, "_fp8_gemm", lambda x: gg.BF16)
    for a, b in zip(_run(padded, x, routing), _run(layer.experts, x, routing)):
        # bf16 GEMM tiles may round differently with the row count; a pad row leaking into a token would not
        tol = 2e-2 * b.float().abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=tol)


def test_fused_fp8_kernels_match_the_kernels_they_fuse():
    """SwiGLU's fp8 kernels (forward: the output quantized per row; backward: grad_h times the input gradient's
    factors, quantized per row) give the bytes of SwiGLU's kernels followed by the row quantizer."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import _fp8_kernels_cases

    _fp8_kernels_cases.check("cuda")
