"""The scale bookkeeping of ``QuackFp8GroupedGemm`` (expert_fp8 through quack's fp8 GEMM) on CPU, with quack's GEMM
replaced by a dequantizing loop and the Triton kernels by their torch code: the forward and the input gradients
(gathered rows, per-row gradients, an empty expert) equal the torch path's emulation to the bit where they share
its quantization. The kernel itself: tests/modules/test_cute_fp8_gpu.py."""

import dataclasses

import pytest
import torch

from torchtune_moe.modules import _grouped_gemm as gg, _kernels


def _dequantizing_gemm(a8, w8_ENK, a_scale, w_scale_EN, cu, index=None):
    rows = a8[index.long()] if index is not None else a8
    out = torch.zeros(rows.shape[0], w8_ENK.shape[1])
    for e in range(w8_ENK.shape[0]):
        s, t = int(cu[e]), int(cu[e + 1])
        out[s:t] = (rows[s:t].float() @ w8_ENK[e].float().t()) * a_scale[s:t, None] * w_scale_EN[e][None, :]
    return out.bfloat16()


def _rowwise(t, mul=None, expert=None):
    """The Triton row quantizer's values in torchao's torch code."""
    return gg.rowwise_fp8_torch(t.float() * mul.float()[expert] if mul is not None else t, -1)


def _scaled_transpose(w, s):
    """The Triton weight transpose's values and layout ([E, N, K] fp8, strides (N * K, 1, N)) in torch code."""
    from torchao.float8.float8_utils import to_fp8_saturated

    q = to_fp8_saturated(w.float() * s.unsqueeze(-1), torch.float8_e4m3fn)
    return q.transpose(-2, -1).contiguous().transpose(-2, -1)


def _case(T, D=32):
    """Segments over 4 experts (one empty) of 64 routed rows, their int32 token index and bf16 tokens [T, D]."""
    counts = torch.tensor([16, 0, 32, 16])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    return cu, torch.randint(0, T, (int(counts.sum()),), dtype=torch.int32), torch.randn(T, D).bfloat16()


def test_scales_match_the_torch_path(monkeypatch):
    import torchtune_moe.modules._cute_fp8 as cf

    monkeypatch.setattr(_kernels, "rowwise_fp8", _rowwise)
    monkeypatch.setattr(cf, "_scaled_fp8_mm", _dequantizing_gemm)
    torch.manual_seed(0)
    T, E, D, N = 64, 4, 32, 48
    cu, idx, x = _case(T)
    w = (torch.randn(E, N, D) * torch.logspace(-3, 1, N).view(1, N, 1)).bfloat16()  # rows of different scales
    torch_path = gg.Fp8GroupedGemm(emulate=True)

    out, _ = cf.QUACK_FP8.forward(gg.Rows(x, idx, cu[-1:], False), w, cu)
    want, _ = torch_path.forward(x[idx.long()], w, cu[1:])
    assert torch.equal(out, want)

    g = torch.randn(T, N).bfloat16()
    got = cf.QUACK_FP8.input_grad(gg.Rows(g, idx, cu[-1:], False), w, cu)
    ref = torch.cat([g[idx.long()][int(cu[e]) : int(cu[e + 1])].float() @ w[e].float() for e in range(E)])
    rel = ((got.float() - ref).norm() / ref.norm()).item()
    want = torch_path.input_grad(g[idx.long()], w, cu[1:])
    rel_torch_path = ((want.float() - ref).norm() / ref.norm()).item()
    assert rel < 0.08 and rel < 1.5 * rel_torch_path  # another scaling of w (per column k): fp8's error, no more


def test_input_grad_of_per_row_gradients_reuses_the_forward_scales(monkeypatch):
    """The up projection's input gradient (``grad_h``, one row per routed row): the forward's row scales of w come
    back as the state, w's fp8 bytes are the forward's transposed, and the result equals the torch path's
    emulation (the same trick) to the bit."""
    import torchtune_moe.modules._cute_fp8 as cf



    monkeypatch.setattr(_kernels, "rowwise_fp8", _rowwise)
    monkeypatch.setattr(_kernels, "scaled_transpose_fp8", _scaled_transpose)
    monkeypatch.setattr(cf, "_scaled_fp8_mm", _dequantizing_gemm)
    torch.manual_seed(1)
    T, E, D, N = 64, 4, 32, 48
    cu, idx, x = _case(T)
    w = (torch.randn(E, N, D) * torch.logspace(-3, 1, N).view(1, N, 1)).bfloat16()
    torch_path = gg.Fp8GroupedGemm(emulate=True)

    _, state = cf.QUACK_FP8.forward(gg.Rows(x, idx, cu[-1:], False), w, cu)
    _, want_state = torch_path.forward(x[idx.long()], w, cu[1:])
    assert torch.equal(state, want_state)
    A = int(cu[-1])
    g = (torch.randn(A, N) * torch.logspace(-2, 2, A).view(A, 1)).bfloat16()  # rows of different scales
    got = cf.QUACK_FP8.input_grad(g, w, cu, state)
    want = torch_path.input_grad(g, w, cu[1:], want_state)
    assert torch.equal(got, want)
    ref = torch.cat([g[int(cu[e]) : int(cu[e + 1])].float() @ w[e].float() for e in range(E)])
    assert ((got.float() - ref).norm() / ref.norm()).item() < 0.08


def test_fused_fp8_kernels_match_the_kernels_they_fuse_in_triton_interpreter():
    """_fp8_kernels_cases.py under TRITON_INTERPRET=1 (skipped where Triton is not installed, as in CI)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "_fp8_kernels_cases.py")],
        env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])),
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("router", ["token_choice", "causal_expert_choice"])
def test_layer_through_quack_fp8_on_cpu(monkeypatch, router):
    """The routed experts with QuackFp8GroupedGemm (quack's kernel replaced by the dequantizing loop, its bf16 weight
    gradients by torch's): SwiGLU's output and the up projection's output gradient reach the GEMMs as Fp8Rows
    (quantized by the fp8 SwiGLU functions), and the outputs and every gradient stay within fp8's error of the
    torch path's emulation and of bf16. Dropped slots with causal expert choice."""
    import copy

    import torchtune_moe.modules._cute_fp8 as cf
    from torchtune_moe.models import moe_layer
    from torchtune_moe.modules._grouped_gemm import GroupedGemm

    seen = []

    def gemm(a8, w8_ENK, a_scale, w_scale_EN, cu, index=None):
        seen.append(a8.shape)
        return _dequantizing_gemm(a8, w8_ENK, a_scale, w_scale_EN, cu, index)



    def weight_grad(g, a, cu):
        return GroupedGemm.weight_grad(g, a, cu[1:])

    fused = []
    real_fwd, real_bwd = _kernels.swiglu_forward_fp8, _kernels.swiglu_backward_fp8
    monkeypatch.setattr(_kernels, "swiglu_forward_fp8", lambda *a: fused.append("fwd") or real_fwd(*a))
    monkeypatch.setattr(_kernels, "swiglu_backward_fp8", lambda *a: fused.append("bwd") or real_bwd(*a))
    monkeypatch.setattr(_kernels, "rowwise_fp8", _rowwise)
    monkeypatch.setattr(_kernels, "scaled_transpose_fp8", _scaled_transpose)
    monkeypatch.setattr(cf, "_scaled_fp8_mm", gemm)
    monkeypatch.setattr(cf.QuackFp8GroupedGemm, "weight_grad", staticmethod(weight_grad))

    torch.manual_seed(0)
    D, H, T = 64, 48, 96
    layer = moe_layer(dim=D, moe_hidden_dim=H, num_experts=4, experts_per_token=2, router=router)
    if router == "causal_expert_choice":  # thresholds on: some slots dropped
        with torch.no_grad():
            layer.router(torch.randn(T, D))
        layer.router.update()
    x = torch.randn(T, D)
    routing = layer.router(x)
    bf16 = layer.experts
    quack, emul = copy.deepcopy(bf16), copy.deepcopy(bf16)
    quack.expert_fp8 = emul.expert_fp8 = emul._fp8_emulate = True
    monkeypatch.setattr(quack, "_fp8_gemm", lambda x_TD: cf.QUACK_FP8)

    def run(experts):
        xx = x.detach().bfloat16().requires_grad_()
        w = routing.weights_A.detach().clone().requires_grad_()
        out, _ = experts.to(torch.bfloat16)(xx, dataclasses.replace(routing, weights_A=w))
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
        params = [xx, experts.gate_up_proj, experts.down_proj, w]
        return [out, *torch.autograd.grad((out.float() * g.float()).sum(), params)]

    got = run(quack)
    assert fused == ["fwd", "bwd"] and len(seen) == 4  # both SwiGLU steps quantized; four fp8 GEMMs
    for name, a, b, c in zip(["out", "grad_x", "grad_gate_up", "grad_down", "grad_weights"], got, run(emul), run(bf16)):
        assert torch.isfinite(a.float()).all(), name
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 0.08, name
        assert ((a.float() - c.float()).norm() / c.float().norm()).item() < 0.12, name
