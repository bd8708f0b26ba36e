"""Grouped-GEMM experts (MoELinear, dispatch_combine) against a per-expert Python loop reference."""

import pytest
import torch
import torch.nn.functional as F

from torchtune_moe.modules import (
    ExpertChoiceTopKRouter,
    CausalExpertChoiceRouter,
    MoELinear,
    RouterOutput,
    TokenChoiceTopKRouter,
    dispatch_combine,
)

D, H, E = 16, 24, 4
ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def expert_ref(experts: MoELinear, e: int, x_ND: torch.Tensor, act) -> torch.Tensor:
    """Expert e as plain matmuls on its own weights (the nn.Linear layout documented by MoELinear)."""
    w = experts.gate_up_proj[e]
    if experts.gated:
        gate_HD, up_HD = w[: experts.hidden_dim], w[experts.hidden_dim :]
        h_NH = act(x_ND @ gate_HD.t()) * (x_ND @ up_HD.t())
    else:
        h_NH = act(x_ND @ w.t())
    return h_NH @ experts.down_proj[e].t()


def combine_ref(x_TD: torch.Tensor, routing: RouterOutput, experts: MoELinear, act) -> torch.Tensor:
    """Loop over experts: out[t] += w * expert_e(x[t]) for every assignment that is not dropped."""
    out_TD = torch.zeros_like(x_TD)
    for e in range(experts.num_experts):
        sel_A = routing.expert_ids_A == e
        tok_N = routing.token_ids_A[sel_A]
        y_ND = expert_ref(experts, e, x_TD[tok_N], act) * routing.weights_A[sel_A].unsqueeze(-1)
        out_TD = out_TD.index_add(0, tok_N, y_ND)
    return out_TD


def make_router(kind: str, T: int) -> torch.nn.Module:
    if kind == "token_choice":
        return TokenChoiceTopKRouter(D, E, 2)
    if kind == "expert_choice":
        return ExpertChoiceTopKRouter(D, E, 2, capacity_factor=1.5)
    router = CausalExpertChoiceRouter(D, E, 2, max_experts_per_token=3)
    # Active thresholds: the median score of each expert, so about half of the slots are dropped.
    with torch.no_grad():
        _, scores_TE, _ = router.scores(torch.randn(T, D))
        router.thresholds.copy_(scores_TE.median(dim=0).values)
        router.num_updates.fill_(1)
    return router


def grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * g).sum(), inputs, retain_graph=True)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
def test_moelinear_equals_loop(gated, activation):
    torch.manual_seed(0)
    experts = MoELinear(E, D, H, activation=activation, gated=gated)
    counts = [3, 0, 5, 2]  # an empty expert included
    x_AD = torch.randn(sum(counts), D, requires_grad=True)
    offsets_E = torch.tensor(counts).cumsum(0).to(torch.int32)
    y = experts.grouped(x_AD, offsets_E)
    ref = torch.cat(
        [expert_ref(experts, e, x_AD[s:t], ACTS[activation]) for e, (s, t) in enumerate(zip([0, 3, 3, 8], [3, 3, 8, 10]))]
    )
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    params = (x_AD, experts.gate_up_proj, experts.down_proj)
    for a, b in zip(grads(y, params), grads(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The empty expert gets an exactly-zero weight gradient.
    g_gu, g_down = grads(y, params[1:])
    assert g_gu[1].abs().max() == 0 and g_down[1].abs().max() == 0


def test_moelinear_layout_and_shapes():
    gated = MoELinear(E, D, H)
    assert gated.gate_up_proj.shape == (E, 2 * H, D) and gated.down_proj.shape == (E, D, H)
    ungated = MoELinear(E, D, H, gated=False)
    assert ungated.gate_up_proj.shape == (E, H, D)


def test_moelinear_rows_past_last_offset_do_not_touch_weight_grads():
    """Rows after offsets_E[-1] are not computed: even NaN there leaves the weight gradients exact."""
    torch.manual_seed(0)
    experts = MoELinear(E, D, H)
    x_AD = torch.randn(9, D)
    x_AD[7:] = float("nan")
    offsets_E = torch.tensor([2, 4, 6, 7], dtype=torch.int32)
    y = experts.grouped(x_AD, offsets_E)
    g = torch.randn(9, D)
    g[7:] = 0
    (y[:7] * g[:7]).sum().backward()
    got = [p.grad.clone() for p in (experts.gate_up_proj, experts.down_proj)]
    experts.zero_grad()
    (experts.grouped(x_AD[:7], offsets_E)[:7] * g[:7]).sum().backward()
    for a, p in zip(got, (experts.gate_up_proj, experts.down_proj)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("kind", ["token_choice", "expert_choice", "causal_expert_choice"])
@pytest.mark.parametrize("gated", [True, False])
def test_dispatch_combine_equals_loop(kind, gated):
    torch.manual_seed(0)
    T = 20
    router = make_router(kind, T)
    experts = MoELinear(E, D, H, gated=gated)
    x_TD = torch.randn(T, D, requires_grad=True)
    routing = router(x_TD)
    if kind == "causal_expert_choice":
        dropped = (routing.expert_ids_A == E).sum().item()
        assert routing.may_drop and 0 < dropped < routing.expert_ids_A.numel()
    out, counts_E = dispatch_combine(x_TD, routing, experts)
    ref = combine_ref(x_TD, routing, experts, F.silu)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    valid = routing.expert_ids_A[routing.expert_ids_A < E]
    assert counts_E.tolist() == torch.bincount(valid, minlength=E).tolist()
    params = (x_TD, experts.gate_up_proj, experts.down_proj, router.gate.weight)
    for a, b in zip(grads(out, params), grads(ref, params)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


_real_grouped_mm = F.grouped_mm


def _poison_rows(t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return t.index_fill(0, torch.arange(int(offs[-1]), t.shape[0]), float("nan"))


class _PoisonedGroupedMM(torch.autograd.Function):
    """torch's grouped_mm, except that the rows it does not compute (past offs[-1]) are NaN instead of
    whatever the allocator left there, in the output and in the gradient of the input."""

    @staticmethod
    def forward(ctx, a, b, offs):
        ctx.save_for_backward(a, b, offs)
        out = _real_grouped_mm(a, b, offs=offs)
        return _poison_rows(out, offs) if a.dim() == 2 and b.dim() == 3 else out

    @staticmethod
    def backward(ctx, grad):
        a, b, offs = ctx.saved_tensors
        with torch.enable_grad():
            a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
            grad_a, grad_b = torch.autograd.grad(_real_grouped_mm(a_, b_, offs=offs), (a_, b_), grad)
        if a.dim() == 2 and b.dim() == 3:
            grad_a = _poison_rows(grad_a, offs)
        return grad_a, grad_b, None


@pytest.fixture
def poisoned_grouped_mm(monkeypatch):
    """Makes every F.grouped_mm call (forward and backward) leave NaN in the rows it does not compute."""
    calls = []

    def grouped_mm(a, b, *, offs=None, **kwargs):
        calls.append(1)
        return _PoisonedGroupedMM.apply(a, b, offs)

    monkeypatch.setattr(F, "grouped_mm", grouped_mm)
    return calls


def test_dropped_slots_leak_no_garbage(poisoned_grouped_mm):
    torch.manual_seed(0)
    T = 20
    router = make_router("causal_expert_choice", T)
    experts = MoELinear(E, D, H)
    x_TD = torch.randn(T, D, requires_grad=True)
    routing = router(x_TD)
    assert (routing.expert_ids_A == E).any()
    out, _ = dispatch_combine(x_TD, routing, experts)
    params = (x_TD, experts.gate_up_proj, experts.down_proj, router.gate.weight)
    got = grads(out, params)
    assert poisoned_grouped_mm, "the experts no longer call F.grouped_mm: poison the grouped GEMM they use"
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in got)
    ref = combine_ref(x_TD, routing, experts, F.silu)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, grads(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_all_slots_dropped(poisoned_grouped_mm):
    """A batch where no token passes any threshold: output zero, gradients zero and finite."""
    torch.manual_seed(0)
    router = CausalExpertChoiceRouter(D, E, 2)
    router.thresholds.fill_(2.0)  # softmax scores never reach 2
    router.num_updates.fill_(1)
    experts = MoELinear(E, D, H)
    x_TD = torch.randn(6, D, requires_grad=True)
    out, counts_E = dispatch_combine(x_TD, router(x_TD), experts)
    assert counts_E.sum() == 0 and out.abs().max() == 0
    for g in grads(out, (x_TD, experts.gate_up_proj, experts.down_proj, router.gate.weight)):
        assert torch.isfinite(g).all() and g.abs().max() == 0


@pytest.mark.parametrize("name,value", [("dim", 12), ("hidden_dim", 20), ("dim", 0), ("num_experts", 0)])
def test_moelinear_bad_sizes(name, value):
    kwargs = {"num_experts": E, "dim": D, "hidden_dim": H, name: value}
    with pytest.raises(ValueError, match=name):
        MoELinear(**kwargs)


def test_moelinear_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        MoELinear(E, D, H, activation="tanh")


@pytest.mark.parametrize("kind", ["token_choice", "causal_expert_choice"])
def test_combine_by_segments_equals_combine_by_slots(kind):
    """The same routing without its token-major slot layout (as a user's router may return it, dropped slots
    included) combines through the per-token segments: same output and gradients as the slot gather-sum."""
    import dataclasses

    torch.manual_seed(0)
    T = 20
    router = make_router(kind, T)
    experts = MoELinear(E, D, H)
    x_TD = torch.randn(T, D, requires_grad=True)
    routing = router(x_TD)
    assert routing.slots_per_token is not None
    out, _ = dispatch_combine(x_TD, routing, experts)
    out_seg, _ = dispatch_combine(x_TD, dataclasses.replace(routing, slots_per_token=None), experts)
    torch.testing.assert_close(out_seg, out, rtol=1e-6, atol=1e-6)
    params = (x_TD, experts.gate_up_proj, experts.down_proj, router.gate.weight)
    for a, b in zip(grads(out_seg, params), grads(out, params)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bias_grad_leaves_out_dropped_rows():
    """Rows at or past num_valid are dropped slots, which the Triton SwiGLU backward leaves unwritten (garbage):
    the per-expert bias gradient must not sum them into the last expert (it did before num_valid was passed)."""
    from torchtune_moe.modules._kernels import row_experts
    from torchtune_moe.modules.moe_linear import _bias_grad

    torch.manual_seed(0)
    offsets_E = torch.tensor([3, 5, 8], dtype=torch.int32)
    grad_h_AF = torch.randn(11, 4)
    grad_h_AF[8:] = 1e6  # unwritten rows
    expert_A = row_experts(offsets_E, 11)
    got = _bias_grad(grad_h_AF, expert_A, torch.Size((3, 4)), torch.float32, offsets_E[-1:])
    want = torch.stack([grad_h_AF[0:3].sum(0), grad_h_AF[3:5].sum(0), grad_h_AF[5:8].sum(0)])
    torch.testing.assert_close(got, want)
    # without num_valid (routings that drop nothing) every row counts
    full = _bias_grad(grad_h_AF[:8], expert_A[:8], torch.Size((3, 4)), torch.float32)
    torch.testing.assert_close(full, want)


def test_grouped_gemm_choice(monkeypatch):
    """The routed GEMMs: torch's off Hopper or in fp32; the environment variable checked by name."""
    from torchtune_moe.modules import _cute_gemm
    from torchtune_moe.modules._grouped_gemm import BF16

    x = torch.zeros(4, D, dtype=torch.bfloat16)
    monkeypatch.delenv(_cute_gemm.ENV_VAR, raising=False)
    assert _cute_gemm.bf16_gemm(x, 8, H) is BF16  # CPU tokens
    monkeypatch.setenv(_cute_gemm.ENV_VAR, "torch")
    assert _cute_gemm.bf16_gemm(x, 8, H) is BF16
    monkeypatch.setenv(_cute_gemm.ENV_VAR, "quack")
    with pytest.raises(ValueError, match="TORCHTUNE_MOE_GROUPED_GEMM must be one of auto, torch, cute; got 'quack'"):
        _cute_gemm.bf16_gemm(x, 8, H)
    monkeypatch.setenv(_cute_gemm.ENV_VAR, "cute")
    with pytest.raises(RuntimeError, match="TORCHTUNE_MOE_GROUPED_GEMM=cute"):
        _cute_gemm.bf16_gemm(x, 8, H)  # no quack here, or CPU tokens: refused by name either way
    # The layer reads it on each call: a bad value stops the forward before any GEMM runs.
    experts = MoELinear(E, D, H)
    monkeypatch.setenv(_cute_gemm.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="TORCHTUNE_MOE_GROUPED_GEMM"):
        experts.routed(torch.randn(3, D), torch.tensor([0, 1, 2]), torch.ones(3), torch.tensor([1, 2, 3, 3], dtype=torch.int32))


def test_quack_gemms_give_torchs_shapes_and_layouts():
    """quack's three GEMM kinds (through the custom op's fake, on meta tensors: no quack or GPU needed) return
    what torch's do for the same operands, gathered (Rows) or not: shapes, and contiguous outputs."""
    from torchtune_moe.modules._cute_gemm import CUTE
    from torchtune_moe.modules._grouped_gemm import BF16, Rows

    T, A = 32, 64

    def m(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

    offsets_E = torch.empty(E, device="meta", dtype=torch.int32)
    cu_E1, idx_A = CUTE.prepare(offsets_E, torch.empty(A, device="meta", dtype=torch.long))
    assert cu_E1.shape == (E + 1,) and cu_E1.dtype == idx_A.dtype == torch.int32

    def rows(width):
        return Rows(m(T, width), idx_A, offsets_E[-1:], False)

    w_up, w_down = m(E, 2 * H, D), m(E, D, H)
    pairs = [
        (CUTE.forward(rows(D), w_up, cu_E1)[0], BF16.forward(m(A, D), w_up, offsets_E)[0]),
        (CUTE.forward(m(A, H), w_down, cu_E1)[0], BF16.forward(m(A, H), w_down, offsets_E)[0]),
        (CUTE.input_grad(rows(D), w_down, cu_E1), BF16.input_grad(m(A, D), w_down, offsets_E)),
        (CUTE.input_grad(m(A, 2 * H), w_up, cu_E1), BF16.input_grad(m(A, 2 * H), w_up, offsets_E)),
        (CUTE.weight_grad(rows(D), m(A, H), cu_E1), BF16.weight_grad(m(A, D), m(A, H), offsets_E)),
        (CUTE.weight_grad(m(A, 2 * H), rows(D), cu_E1), BF16.weight_grad(m(A, 2 * H), m(A, D), offsets_E)),
        (CUTE.weight_grad(m(A, 2 * H), m(A, D), cu_E1), BF16.weight_grad(m(A, 2 * H), m(A, D), offsets_E)),
    ]
    # the SwiGLU-epilogue GEMMs (CUTE.fuses_swiglu) against GroupedGemm's torch code for them
    w_A = torch.empty(A, device="meta")
    fwd, bwd = CUTE.swiglu_forward(rows(D), w_up, cu_E1), CUTE.swiglu_backward(rows(D), w_down, m(A, 2 * H), w_A, cu_E1)
    pairs += [
        *zip(fwd, BF16.swiglu_forward(m(A, D), w_up, offsets_E)),
        *zip(bwd, BF16.swiglu_backward(m(A, D), w_down, m(A, 2 * H), w_A, offsets_E)),
        (CUTE.swiglu_input_grad(m(A, 2 * H), w_up, cu_E1), BF16.swiglu_input_grad(m(A, 2 * H), w_up, offsets_E)),
        (
            CUTE.swiglu_weight_grad(m(A, 2 * H), rows(D), cu_E1),
            BF16.swiglu_weight_grad(m(A, 2 * H), m(A, D), offsets_E),
        ),
    ]
    assert CUTE.fuses_swiglu and not BF16.fuses_swiglu and bwd[2].dtype == torch.float32
    for got, want in pairs:
        assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous(), (got.shape, want.shape)
    with pytest.raises(ValueError, match="int32 index"):  # an index not made by CuteGroupedGemm.prepare
        CUTE.forward(Rows(m(T, D), torch.empty(A, device="meta", dtype=torch.long), offsets_E[-1:], False), w_up, cu_E1)


@pytest.mark.parametrize("fuses_swiglu", [False, True])
@pytest.mark.parametrize("router_kind", ["token_choice", "causal_expert_choice", "expert_choice"])
@pytest.mark.parametrize("kind", ["moe_linear", "lora"])
def test_gemms_that_load_rows_by_index(monkeypatch, kind, router_kind, fuses_swiglu):
    """The routed experts (and the LoRA experts' frozen base) with GEMMs that read the routed rows by index, as
    quack's do (stood in for by torch code here): the segments and index are prepared once per step, no gathered
    copy of x or of the output gradient is asked for, and output and every gradient equal torch's GEMMs', with
    dropped slots too (causal expert choice) and with any number of rows per token (expert choice: the segment
    combine). With ``fuses_swiglu`` (quack's SwiGLU epilogues, stood in for by GroupedGemm's torch code for them)
    the routed experts run SwiGLU inside the GEMMs and weight the combine instead, with the same results; the LoRA
    experts do not use it."""
    from torchtune_moe.modules import (
        CausalExpertChoiceRouter, ExpertChoiceTopKRouter, TokenChoiceTopKRouter, dispatch_combine,
    )
    from torchtune_moe.modules import moe_linear as moe_linear_module
    from torchtune_moe.modules._grouped_gemm import GroupedGemm, Rows
    from torchtune_moe.modules.peft import LoRAMoELinear
    from torchtune_moe.modules.peft import lora_experts

    prepared, asked = [], []

    def rows(a):
        if isinstance(a, Rows):
            asked.append(a._gathered is None and a.index_A.dtype == torch.int32)
            return a.src_TK[a.index_A]
        return a

    class LoadsRows(GroupedGemm):
        loads_rows = True

        @staticmethod
        def prepare(offsets_E, rows_A):
            prepared.append(1)
            return offsets_E, rows_A.to(torch.int32)

        @staticmethod
        def forward(a_AK, w_ENK, offsets_E):
            return F.grouped_mm(rows(a_AK), w_ENK.transpose(-2, -1), offs=offsets_E), None

        @staticmethod
        def input_grad(g_AN, w_ENK, offsets_E, w_state=None):
            return F.grouped_mm(rows(g_AN), w_ENK, offs=offsets_E)

        @staticmethod
        def weight_grad(g_AN, a_AK, offsets_E):
            return F.grouped_mm(rows(g_AN).t(), rows(a_AK), offs=offsets_E)

    fused_calls = []

    class FusesSwiGLU(LoadsRows):
        fuses_swiglu = True

        @staticmethod
        def swiglu_forward(x_AD, w_EFD, offsets_E):
            fused_calls.append("forward")
            return GroupedGemm.swiglu_forward(rows(x_AD), w_EFD, offsets_E)

        @staticmethod
        def swiglu_backward(g_AD, w_EDH, h_AF, weights_A, offsets_E):
            fused_calls.append("backward")
            return GroupedGemm.swiglu_backward(rows(g_AD), w_EDH, h_AF, weights_A, offsets_E)

        @staticmethod
        def swiglu_weight_grad(grad_h_AF, x_AD, offsets_E):
            return GroupedGemm.swiglu_weight_grad(grad_h_AF, rows(x_AD), offsets_E)

    stand_in_class = FusesSwiGLU if fuses_swiglu else LoadsRows
    torch.manual_seed(0)
    T = 16
    drop = router_kind == "causal_expert_choice"
    if drop:  # a capacity router that drops slots
        router = CausalExpertChoiceRouter(D, E, 2, capacity_factor=0.5).train()
    elif router_kind == "expert_choice":  # tokens get any number of rows: the combine sums segments
        router = ExpertChoiceTopKRouter(D, E, 2)
    else:
        router = TokenChoiceTopKRouter(D, E, 2)
    x = torch.randn(T, D)
    with torch.no_grad():
        routing = router(x)
    assert (routing.expert_ids_A == E).any() == drop
    assert (routing.slots_per_token is None) == (router_kind == "expert_choice")

    def experts():
        torch.manual_seed(1)
        if kind == "moe_linear":
            return MoELinear(E, D, H)
        mod = LoRAMoELinear(E, D, H, rank=8, alpha=16.0)
        with torch.no_grad():  # non-zero B so that the adapters contribute
            mod.lora_gate_up_b.normal_(0, 0.1)
            mod.lora_down_b.normal_(0, 0.1)
        for p in (mod.gate_up_proj, mod.down_proj):
            p.requires_grad_(True)
        return mod

    results = []
    for stand_in in (False, True):
        if stand_in:
            module = moe_linear_module if kind == "moe_linear" else lora_experts
            monkeypatch.setattr(module, "bf16_gemm", lambda *a: stand_in_class())
        mod = experts()
        xi = x.clone().requires_grad_(True)
        out, _ = dispatch_combine(xi, routing, mod)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        results.append([out, xi.grad] + [p.grad for p in mod.parameters() if p.grad is not None])
    assert prepared == [1]  # once, in the forward: the backward reuses what it made
    assert asked == [True] * 4  # x (forward), the output gradient (two GEMMs), x (gate/up weight gradient)
    assert fused_calls == (["forward", "backward"] if fuses_swiglu and kind == "moe_linear" else [])
    assert len(results[1]) == len(results[0]) == 2 + (2 if kind == "moe_linear" else 6)
    tol = 1e-4 if fused_calls else 1e-5  # the routing weight multiplies at another step: other fp32 roundings
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_quack_entry_points_get_each_ops_arguments(monkeypatch):
    """With a stand-in quack (no GPU needed): each of the three ops calls its own quack entry point with the config
    of its tile and its operand layout, and under ``cute`` a failure inside quack is re-raised saying how to run
    without it."""
    import types

    from torchtune_moe.modules import _cute_gemm

    calls = []

    def entry(name):
        def fn(*args, **kwargs):
            if name == "gemm" and args[0].shape[0] == 0:
                raise ValueError("JIT failed")
            calls.append((name, kwargs["config"].kw, kwargs.get("concat_layout")))
            return torch.zeros(args[2].shape[0]) if name == "dgated" else None

        return types.SimpleNamespace(fn=fn)

    _stand_in_quack(monkeypatch, entry)
    try:
        A, T = 12, 6
        cu_E1, idx_A = torch.tensor([0, 5, A], dtype=torch.int32), torch.randint(0, T, (A,), dtype=torch.int32)
        x_TD, w_EDF, w_EDH = torch.randn(T, D), torch.randn(2, D, 2 * H), torch.randn(2, D, H)
        h_AF, a_AH = _cute_gemm._cute_swiglu_mm.fn(x_TD, w_EDF, cu_E1, idx_A, [128, 256, 1, 0])
        assert h_AF.shape == (A, 2 * H) and a_AH.shape == (A, H)
        grad_h, scaled, reduced = _cute_gemm._cute_dswiglu_mm.fn(
            x_TD, w_EDH, h_AF, torch.rand(A), cu_E1, idx_A, [128, 192, 2, 1]
        )
        assert grad_h.shape == h_AF.shape and scaled.shape == (A, H) and reduced.shape == (A,)
        grad_h_AF, w_EFD = torch.randn(A, 2 * H), w_EDF.transpose(-2, -1)  # swiglu_input_grad's operands
        out = _cute_gemm._cute_grouped_mm.fn(grad_h_AF, w_EFD, cu_E1, None, False, False, [128, 256, 1, 0], "B")
        assert out.shape == (A, D)
        tile = dict(tile_m=128, tile_n=256, cluster_m=1, cluster_n=1, pingpong=False, is_dynamic_persistent=False)
        assert calls == [
            ("gated", tile, ("B",)),
            ("dgated", dict(tile, tile_n=192, cluster_m=2, pingpong=True), None),
            ("gemm", tile, ("B",)),
        ]
        monkeypatch.setenv(_cute_gemm.ENV_VAR, "cute")  # under auto a failure falls back (the test below)
        with pytest.raises(RuntimeError, match="TORCHTUNE_MOE_GROUPED_GEMM=torch runs torch's grouped GEMM instead"):
            _cute_gemm._cute_grouped_mm.fn(x_TD[:0], w_EDH, cu_E1, None, False, False, [128, 256, 1, 0], "")
    finally:
        _cute_gemm._quack_gemm.cache_clear()
        _cute_gemm._config.cache_clear()


def _stand_in_quack(monkeypatch, entry):
    """Installs a stand-in quack package whose three GEMM entry points are ``entry(name)``."""
    import sys
    import types

    from torchtune_moe.modules import _cute_gemm

    interface = types.ModuleType("quack.gemm_interface")
    interface.gemm_tuned, interface.gemm_gated_tuned, interface.gemm_dgated_tuned = map(
        entry, ("gemm", "gated", "dgated")
    )
    config = types.ModuleType("quack.gemm_config")
    config.GemmConfig = type("GemmConfig", (), {"__init__": lambda self, **kw: setattr(self, "kw", kw)})
    for name, module in (("quack", types.ModuleType("quack")), ("quack.gemm_interface", interface),
                         ("quack.gemm_config", config)):
        monkeypatch.setitem(sys.modules, name, module)
    _cute_gemm._quack_gemm.cache_clear()
    _cute_gemm._config.cache_clear()


def test_dense_mm_through_quack_and_its_fallbacks(monkeypatch):
    """``dense_mm`` (the loss's logits GEMM): quack's plain GEMM with the tile's config, the weight read as its
    transpose in place; torch's ``mm`` for an output quack cannot store (rows not 16-byte aligned) or nothing to
    compute, and after a failure (one warning) for that call and every later one."""
    import types

    from torchtune_moe.modules import _cute_gemm

    calls = []
    fail = []

    def entry(name):
        def fn(A, B, out, **kwargs):
            if fail:
                raise OSError("libcuda: no such symbol")
            calls.append((A.data_ptr(), B.mT.data_ptr(), B.mT.is_contiguous(), kwargs["config"].kw))
            out.copy_(A @ B)

        return types.SimpleNamespace(fn=fn)

    _stand_in_quack(monkeypatch, entry)
    monkeypatch.setattr(_cute_gemm, "_failed", [])
    monkeypatch.delenv(_cute_gemm.ENV_VAR, raising=False)
    try:
        torch.manual_seed(0)
        h, w = torch.randn(6, 16, dtype=torch.bfloat16), torch.randn(40, 16, dtype=torch.bfloat16)
        got = _cute_gemm.dense_mm(h, w.t(), [128, 192, 2, 1])
        torch.testing.assert_close(got, h @ w.t(), rtol=0, atol=0)
        tile = dict(tile_m=128, tile_n=192, cluster_m=2, cluster_n=1, pingpong=True, is_dynamic_persistent=False)
        assert calls == [(h.data_ptr(), w.data_ptr(), True, tile)]  # no copies of either operand
        for a, b in ((h, w[:37].t()), (h[:0], w.t()), (h[:, :0], w[:, :0].t())):  # vocab 37, no rows, K = 0
            torch.testing.assert_close(_cute_gemm.dense_mm(a, b, [128, 192, 2, 1]), a @ b, rtol=0, atol=0)
        assert len(calls) == 1
        fail.append(1)
        with pytest.warns(UserWarning, match="quack's grouped GEMM failed .OSError: libcuda"):
            got = _cute_gemm.dense_mm(h, w.t(), [128, 192, 2, 1])
        torch.testing.assert_close(got, h @ w.t(), rtol=0, atol=0)
        assert _cute_gemm._failed and len(calls) == 1
    finally:
        _cute_gemm._quack_gemm.cache_clear()
        _cute_gemm._config.cache_clear()


@pytest.mark.parametrize("router_kind", ["token_choice", "causal_expert_choice"])
def test_quack_failing_here_falls_back_to_torchs_gemms(monkeypatch, router_kind):
    """Under ``TORCHTUNE_MOE_GROUPED_GEMM=auto`` (the default; quack installs with the package), a quack GEMM
    that fails here (its JIT on this driver, say) costs a warning, not the run: that call and every later one
    computes with torch's GEMMs what quack's would (each op's fallback, with its operand layouts: gathered rows,
    the reduction-axis GEMMs, the interleaved SwiGLU halves), so the routed experts' output and gradients equal
    torch's path, dropped slots included; the choice for new layers turns to torch's. Under ``cute`` quack is
    tried again and its failure raised."""
    import types

    from torchtune_moe.modules import _cute_gemm
    from torchtune_moe.modules import moe_linear as moe_linear_module

    def entry(name):
        def fn(*args, **kwargs):
            raise OSError("libcuda: no such symbol")

        return types.SimpleNamespace(fn=fn)

    _stand_in_quack(monkeypatch, entry)
    monkeypatch.setattr(_cute_gemm, "_failed", [])
    monkeypatch.delenv(_cute_gemm.ENV_VAR, raising=False)
    torch.manual_seed(0)
    T = 16
    if router_kind == "causal_expert_choice":  # drops slots
        router = CausalExpertChoiceRouter(D, E, 2, capacity_factor=0.5).train()
    else:
        router = TokenChoiceTopKRouter(D, E, 2)
    x = torch.randn(T, D)
    with torch.no_grad():
        routing = router(x)
    results = []
    try:
        for quack in (False, True):
            if quack:
                monkeypatch.setattr(moe_linear_module, "bf16_gemm", lambda *a: _cute_gemm.CUTE)
            torch.manual_seed(1)
            mod = MoELinear(E, D, H)
            xi = x.clone().requires_grad_(True)
            if quack:
                with pytest.warns(UserWarning, match="quack's grouped GEMM failed .OSError: libcuda: no such "
                                  "symbol.; the MoE layers use torch's grouped GEMMs from now on"):
                    out, _ = dispatch_combine(xi, routing, mod)
            else:
                out, _ = dispatch_combine(xi, routing, mod)
            out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
            results.append([out, xi.grad, mod.gate_up_proj.grad, mod.down_proj.grad])
        assert len(_cute_gemm._failed) == 1  # warned once: the other GEMMs went straight to torch's
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # the routing weight enters at another step
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
        assert not _cute_gemm._choice("cuda", 0, torch.bfloat16, H)  # new layers and traces take torch's
        monkeypatch.setenv(_cute_gemm.ENV_VAR, "cute")  # asked for quack: tried again, its failure raised
        assert _cute_gemm._choice("cuda", 0, torch.bfloat16, H)
        with pytest.raises(RuntimeError, match="OSError: libcuda: no such symbol.; TORCHTUNE_MOE_GROUPED_GEMM=torch"):
            dispatch_combine(x, routing, MoELinear(E, D, H))
    finally:
        _cute_gemm._quack_gemm.cache_clear()
        _cute_gemm._config.cache_clear()


def test_quack_fallbacks_pass_torchs_cuda_grouped_gemm_checks(monkeypatch):
    """The fallbacks hand torch's grouped GEMM operands its CUDA kernel accepts (bf16, 16-byte aligned strides),
    for every GEMM of the routed experts, with A = 13 routed rows (not a multiple of 8, as causal expert choice's
    kept slots often are). Run on meta tensors, whose grouped GEMM makes the CUDA kernel's checks, so no GPU is
    needed (a [D, A] copy of gathered columns failed them, as it failed on the GPU)."""
    from torchtune_moe.modules import _custom_op, _cute_gemm
    from torchtune_moe.modules._grouped_gemm import Rows

    monkeypatch.setattr(_cute_gemm, "_failed", ["a failure before"])  # every op takes its fallback
    monkeypatch.delenv(_cute_gemm.ENV_VAR, raising=False)
    monkeypatch.setattr(_custom_op, "_direct", lambda args: True)  # the ops' functions, not their fakes
    A, T, Hd = 13, 6, 32
    m = dict(device="meta", dtype=torch.bfloat16)
    cute = _cute_gemm.CUTE
    cu_E1, idx_A = cute.prepare(torch.empty(E, dtype=torch.int32, device="meta"),
                                torch.empty(A, dtype=torch.int64, device="meta"))
    num_valid = torch.empty(1, dtype=torch.int32, device="meta")

    def rows(src):
        return Rows(src, idx_A, num_valid, may_drop=True)

    x_TD, gy_TD = torch.empty(T, D, **m), torch.empty(T, D, **m)
    w_EFD, w_EDH = torch.empty(E, 2 * Hd, D, **m), torch.empty(E, D, Hd, **m)
    h_AF, a_AH, g_AH = torch.empty(A, 2 * Hd, **m), torch.empty(A, Hd, **m), torch.empty(A, Hd, **m)
    assert cute.forward(rows(x_TD), w_EFD, cu_E1)[0].shape == (A, 2 * Hd)
    assert cute.input_grad(rows(gy_TD), w_EDH, cu_E1).shape == (A, Hd)
    assert cute.weight_grad(g_AH, rows(x_TD), cu_E1).shape == (E, Hd, D)
    assert cute.weight_grad(rows(gy_TD), a_AH, cu_E1).shape == (E, D, Hd)
    h, act = cute.swiglu_forward(rows(x_TD), w_EFD, cu_E1)
    assert h.shape == (A, 2 * Hd) and act.shape == (A, Hd)
    grad_h, scaled, grad_w = cute.swiglu_backward(
        rows(gy_TD), w_EDH, h_AF, torch.empty(A, device="meta"), cu_E1
    )
    assert grad_h.shape == (A, 2 * Hd) and scaled.shape == (A, Hd) and grad_w.shape == (A,)
    assert cute.swiglu_input_grad(h_AF, w_EFD, cu_E1).shape == (A, D)
    assert cute.swiglu_weight_grad(h_AF, rows(x_TD), cu_E1).shape == (E, 2 * Hd, D)

def test_quack_operands_are_copied_when_tma_cannot_load_them():
    """What quack's GEMMs get: a 16-byte aligned row-major tensor as it is, else an aligned copy (a view starting
    off alignment included: .contiguous() would hand it back unchanged)."""
    from torchtune_moe.modules._cute_gemm import _operand

    base = torch.randn(4 * 64 + 1, dtype=torch.bfloat16)
    good = base[: 4 * 64].view(4, 64)
    assert _operand(good) is good
    assert _operand(good[:, :60]).data_ptr() == good.data_ptr()  # row stride 64: loadable as it is
    for bad in (base[1:].view(4, 64), base[: 4 * 63].view(4, 63), good.t()):  # start, row stride, column-major
        got = _operand(bad)
        assert got.is_contiguous() and got.storage_offset() == 0 and torch.equal(got, bad)
