"""quack's grouped GEMMs (``_cute_gemm``) against torch's ``F.grouped_mm``, each GEMM and the whole layer.

Marked ``gpu`` and skipped unless quack-kernels imports and a compute-capability 9.x GPU is present. Run on
an H100/H200 (quack-kernels installs with the package on Linux) with
``python -m pytest -m gpu tests/modules/test_cute_gemm_gpu.py``.
"""

import pytest
import torch

from torchtune_moe.models import moe_layer
from torchtune_moe.modules import _cute_gemm
from torchtune_moe.modules._grouped_gemm import BF16, Rows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and _cute_gemm.cute_available()),
        reason="needs quack-kernels and a compute-capability 9.x GPU",
    ),
]

T, K, D, H = 1024, 4, 256, 384


def _routing(E: int, empty_expert: bool, drop: int):
    """Rows sorted by expert for T tokens x K slots over E experts (expert 1 given no rows with ``empty_expert``);
    the last ``drop`` rows are dropped slots (past ``offsets_E[-1]``)."""
    experts_TK = torch.randint(0, E, (T, K), device="cuda")
    if empty_expert:
        experts_TK[experts_TK == 1] = 0
    order_A = torch.argsort(experts_TK.flatten(), stable=True)
    rows_A = order_A // K
    counts_E = torch.bincount(experts_TK.flatten(), minlength=E)
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    if drop:
        offsets_E = offsets_E.clamp(max=T * K - drop)
    return rows_A, offsets_E


def _rand(*shape):
    return torch.randn(*shape, device="cuda").to(torch.bfloat16)


def _operands(empty_expert: bool, drop: int):
    """E = 8 experts' weights, and tokens and output gradients routed to them (:func:`_routing`), in both forms:
    quack's (segment bounds, :class:`Rows` with the int32 index) and torch's (offsets, rows gathered)."""
    E = 8
    rows_A, offsets_E = _routing(E, empty_expert, drop)
    x_TD, g_TD, num_valid = _rand(T, D), _rand(T, D), offsets_E[-1:]
    cu_E1, idx_A = _cute_gemm.CUTE.prepare(offsets_E, rows_A)  # quack's segment bounds [E + 1], int32 index
    return (
        rows_A.shape[0], int(offsets_E[-1]), offsets_E, cu_E1, _rand(E, 2 * H, D) / 16, _rand(E, D, H) / 16,
        Rows(x_TD, idx_A, num_valid, drop > 0), Rows(g_TD, idx_A, num_valid, drop > 0), x_TD[rows_A], g_TD[rows_A],
    )


@pytest.mark.parametrize("empty_expert,drop", [(False, 0), (True, 0), (True, 300)])
def test_each_gemm_matches_torch(empty_expert, drop):
    A, n, offsets_E, cu_E1, w_EFD, w_EDH, x_rows, g_rows, x_AD, g_AD = _operands(empty_expert, drop)
    h_AH, gh_AF = _rand(A, H), _rand(A, 2 * H)
    cute, ref = _cute_gemm.CUTE, BF16
    pairs = [
        (cute.forward(x_rows, w_EFD, cu_E1)[0], ref.forward(x_AD, w_EFD, offsets_E)[0]),
        (cute.forward(h_AH, w_EDH, cu_E1)[0], ref.forward(h_AH, w_EDH, offsets_E)[0]),
        (cute.input_grad(g_rows, w_EDH, cu_E1), ref.input_grad(g_AD, w_EDH, offsets_E)),
        (cute.input_grad(gh_AF, w_EFD, cu_E1), ref.input_grad(gh_AF, w_EFD, offsets_E)),
    ]
    for got, want in pairs:  # rows past offsets_E[-1] are unspecified in both
        torch.testing.assert_close(got[:n], want[:n], rtol=1e-2, atol=1e-2)
    wgrads = [
        (cute.weight_grad(g_rows, h_AH, cu_E1), ref.weight_grad(g_AD, h_AH, offsets_E)),
        (cute.weight_grad(gh_AF, x_rows, cu_E1), ref.weight_grad(gh_AF, x_AD, offsets_E)),
        (cute.weight_grad(gh_AF, x_AD, cu_E1), ref.weight_grad(gh_AF, x_AD, offsets_E)),
    ]
    for got, want in wgrads:
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-2, atol=5e-2)
    if empty_expert:  # an expert with no rows gets a zero weight gradient, written (not left as garbage)
        assert wgrads[0][0][1].abs().max() == 0 and wgrads[1][0][1].abs().max() == 0


@pytest.mark.parametrize("empty_expert,drop", [(False, 0), (True, 0), (True, 300)])
def test_swiglu_epilogue_gemms_match_torch_code(empty_expert, drop):
    """quack's SwiGLU-epilogue GEMMs (CUTE.fuses_swiglu) against GroupedGemm's torch code for them."""
    A, n, offsets_E, cu_E1, w_EFD, w_EDH, x_rows, g_rows, x_AD, g_AD = _operands(empty_expert, drop)
    weights_A = torch.rand(A, device="cuda")
    cute, ref = _cute_gemm.CUTE, BF16
    got, want = cute.swiglu_forward(x_rows, w_EFD, cu_E1), ref.swiglu_forward(x_AD, w_EFD, offsets_E)
    h_AF = want[0]
    got += cute.swiglu_backward(g_rows, w_EDH, h_AF, weights_A, cu_E1)
    want += ref.swiglu_backward(g_AD, w_EDH, h_AF, weights_A, offsets_E)
    grad_h_AF = want[2]
    got += (cute.swiglu_input_grad(grad_h_AF, w_EFD, cu_E1),)
    want += (ref.swiglu_input_grad(grad_h_AF, w_EFD, offsets_E),)
    # h, a, grad_h, w * a, sum(a * d), grad_x
    for i, (g, w) in enumerate(zip(got, want)):  # rows past offsets_E[-1] are unspecified in both
        assert g.shape == w.shape and g.dtype == w.dtype, i
        # sum(a * d) over H: quack's d is the fp32 accumulator, the torch code's is rounded to bf16 first (0.4%
        # per term): compared to 1% of its largest value
        atol = 1e-2 * w[:n].abs().max().item() if i == 4 else 1e-2
        torch.testing.assert_close(g[:n], w[:n], rtol=2e-2, atol=atol)
    wgrad = cute.swiglu_weight_grad(grad_h_AF, x_rows, cu_E1)
    want_wgrad = ref.swiglu_weight_grad(grad_h_AF, x_AD, offsets_E)
    assert wgrad.shape == want_wgrad.shape and wgrad.is_contiguous()
    torch.testing.assert_close(wgrad, want_wgrad, rtol=1e-2, atol=5e-2)
    if empty_expert:
        assert wgrad[1].abs().max() == 0


@pytest.mark.parametrize(
    "router,compile",
    [("token_choice", False), ("token_choice", True), ("expert_choice", False), ("causal_expert_choice", False)],
)
def test_layer_uses_quack_and_matches_torch(monkeypatch, router, compile):
    """The layer with quack's GEMMs (SwiGLU in their epilogues) against torch's, eager and compiled; expert choice
    (any number of rows per token) and causal expert choice (dropped slots) too."""
    torch.manual_seed(0)
    layer = moe_layer(dim=D, hidden_dim=H, num_experts=16, experts_per_token=K, router=router)
    layer = layer.cuda().to(torch.bfloat16)
    x = _rand(2, T // 2, D)
    assert _cute_gemm.bf16_gemm(x, 1, H) is _cute_gemm.CUTE

    from torch._dynamo.utils import counters

    graphs = {}

    state = {k: v.clone() for k, v in layer.state_dict().items()}  # routers' statistics: the same for both runs

    def run(choice):
        layer.load_state_dict(state)
        monkeypatch.setenv(_cute_gemm.ENV_VAR, choice)
        torch._dynamo.reset()
        counters.clear()
        fn = torch.compile(layer) if compile else layer
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.float().square().mean().backward()
        graphs[choice] = (counters["stats"]["unique_graphs"], dict(counters["graph_break"]))
        return out, xi.grad, [p.grad for p in layer.parameters()]

    got, want = run("cute"), run("torch")
    assert graphs["cute"] == graphs["torch"]  # quack's GEMMs are opaque nodes: no graph break of their own
    torch.testing.assert_close(got[0], want[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[1], want[1], rtol=1e-2, atol=1e-3)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_fallback_after_a_quack_failure_matches_torch(monkeypatch, compile):
    """After a quack GEMM failed in this process (``auto``), layers already built on quack's ops (a compiled graph
    holds them) compute each op with torch's GEMMs, in bf16 on the GPU, with the layouts the ops receive there;
    the results match torch's path, dropped slots included."""
    from torchtune_moe.modules import moe_linear as moe_linear_module

    torch.manual_seed(0)
    layer = moe_layer(dim=D, hidden_dim=H, num_experts=16, experts_per_token=K, router="causal_expert_choice")
    layer = layer.cuda().to(torch.bfloat16)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _rand(2, T // 2, D)
    monkeypatch.delenv(_cute_gemm.ENV_VAR, raising=False)

    def run(fallback):
        layer.load_state_dict(state)
        if fallback:  # quack's ops, each of them failed before: their fallback computes
            monkeypatch.setattr(_cute_gemm, "_failed", ["a failure before"])
            monkeypatch.setattr(moe_linear_module, "bf16_gemm", lambda *a: _cute_gemm.CUTE)
        torch._dynamo.reset()
        fn = torch.compile(layer) if compile else layer
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.float().square().mean().backward()
        return out, xi.grad, [p.grad for p in layer.parameters()]

    want, got = run(False), run(True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[1], want[1], rtol=1e-2, atol=1e-3)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("rows", [300, 2048])
def test_dense_mm_matches_torch(rows):
    """The loss's logits GEMM (``dense_mm`` at the loss's tile) against torch's ``mm``: rows that fill no whole
    tile, a weight read as its transpose in place, an output row stride quack can store (5008, a multiple of 8)."""
    from torchtune_moe.modules.linear_cross_entropy import _LOGITS_TILE

    _cute_gemm._failed.clear()
    h, w = _rand(rows, 512), _rand(5008, 512) / 16
    got = _cute_gemm.dense_mm(h, w.t(), _LOGITS_TILE)
    assert not _cute_gemm._failed, _cute_gemm._failed
    ref = (h.float() @ w.float().t())
    torch.testing.assert_close(got.float(), ref, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(got, h @ w.t(), rtol=1.6e-2, atol=1e-2)
