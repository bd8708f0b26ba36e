"""expert_fp8: the fp8 grouped-GEMM seam (emulated on CPU), the padding of expert rows to 16, and the refusals.

The GPU path (torch._scaled_grouped_mm, torchao's Triton quantizers) is checked against the emulation in
tests/modules/test_fp8_gpu.py."""

import copy

import pytest
import torch

from torchtune_moe.models import moe
from torchtune_moe.models.moe import moe_layer
from torchtune_moe.modules import (
    CausalExpertChoiceRouter,
    ExpertChoiceTopKRouter,
    MoELinear,
    TokenChoiceTopKRouter,
)
from torchtune_moe.modules import _grouped_gemm as gg
from torchtune_moe.modules.moe_linear import ClampedSwiGLU

FP8_MAX = 448.0
D, H, E, T = 32, 48, 4, 40


def hand_scale(t: torch.Tensor, dim: int) -> torch.Tensor:
    """One fp8 scale per slice along ``dim`` (kept as size 1): 2^floor(log2(448 / amax)), written out."""
    amax = t.float().abs().amax(dim=dim, keepdim=True).clamp(min=1e-12)
    return torch.exp2(torch.floor(torch.log2(FP8_MAX / amax)))


def hand_quantize(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Dequantized fp8 of ``t`` with one scale per slice along ``dim`` (:func:`hand_scale`), written out."""
    scale = hand_scale(t, dim)
    return (t.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() / scale


def groups(offsets_E):
    starts = [0] + offsets_E[:-1].tolist()
    return list(zip(starts, offsets_E.tolist()))


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantizers_match_a_hand_reference():
    torch.manual_seed(0)
    x = torch.randn(37, 32) * torch.logspace(-3, 2, 37).unsqueeze(-1)  # rows of very different sizes
    q, scale = gg.rowwise_fp8(x, dim=-1)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (37, 1)
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())  # powers of 2
    torch.testing.assert_close(q.float() / scale, hand_quantize(x, -1), rtol=0, atol=0)
    # Per expert and column (the weight gradients' operands), empty expert included.
    offsets_E = torch.tensor([5, 5, 21, 37], dtype=torch.int32)
    q, scales = gg.per_group_colwise_fp8(x, offsets_E)
    for e, (s, t) in enumerate(groups(offsets_E)):
        if t > s:
            got = q[s:t].float() / scales.view(4, -1)[e]
            torch.testing.assert_close(got, hand_quantize(x[s:t], 0), rtol=0, atol=0)
    # The weights: w^T [E, K, N] per (expert, n), the amax over k (forward); w [E, N, K] per (expert, k), the
    # amax over n (input gradient).
    w = torch.randn(4, 16, 32)
    q, scale_EN = gg.transpose_rhs_fp8(w)
    assert q.shape == (4, 32, 16) and scale_EN.shape == (4, 16)
    torch.testing.assert_close(q.float() / scale_EN.unsqueeze(1), hand_quantize(w.transpose(-2, -1), -2), rtol=0, atol=0)
    q, scale_EK = gg.transpose_rhs_fp8(w.transpose(-2, -1))
    assert q.shape == (4, 16, 32) and scale_EK.shape == (4, 32)
    torch.testing.assert_close(q.float() / scale_EK.unsqueeze(1), hand_quantize(w, -2), rtol=0, atol=0)


@pytest.mark.parametrize("op", ["forward", "input_grad", "weight_grad"])
def test_fp8_seam_is_the_hand_quantized_product(op):
    """Each emulated fp8 GEMM equals the product of hand-quantized operands (a wrong scale or axis fails), and is
    within fp8 error of the exact product."""
    torch.manual_seed(0)
    offsets_E = torch.tensor([16, 16, 48, 64], dtype=torch.int32)
    fp8 = gg.Fp8GroupedGemm(emulate=True)
    if op == "forward":  # a [A, K] @ w[e]^T, w [E, N, K]
        a, w = torch.randn(64, 32), torch.randn(4, 48, 32)
        (got, w_scale_EN), exact = fp8.forward(a, w, offsets_E), gg.BF16.forward(a, w, offsets_E)[0]
        ref = torch.cat([hand_quantize(a[s:t], -1) @ hand_quantize(w[e], -1).t() for e, (s, t) in enumerate(groups(offsets_E))])
        torch.testing.assert_close(w_scale_EN, hand_scale(w, -1).squeeze(-1), rtol=0, atol=0)  # for the backward
    elif op == "input_grad":  # g [A, N] @ w[e], w [E, N, K]; w quantized as in forward (per row n), 1 / s on g
        g, w = torch.randn(64, 48), torch.randn(4, 48, 32) * torch.logspace(-2, 1, 48).unsqueeze(-1)
        got, exact = fp8.input_grad(g, w, offsets_E), gg.BF16.input_grad(g, w, offsets_E)
        assert torch.equal(got, fp8.input_grad(g, w, offsets_E, fp8.forward(torch.randn(64, 32), w, offsets_E)[1]))
        ref = []
        for e, (s, t) in enumerate(groups(offsets_E)):
            s_N = hand_scale(w[e], -1).squeeze(-1)
            u = g[s:t] * (s_N.min() / s_N)  # exact: powers of 2
            w8 = (w[e] * s_N.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
            ref.append(hand_quantize(u, -1) @ w8 / s_N.min())
        ref = torch.cat(ref)
    else:  # g[rows of e]^T @ a[rows of e] -> [E, N, K]
        g, a = torch.randn(64, 48), torch.randn(64, 32)
        got, exact = fp8.weight_grad(g, a, offsets_E), gg.BF16.weight_grad(g, a, offsets_E)
        ref = torch.stack([
            hand_quantize(g[s:t], 0).t() @ hand_quantize(a[s:t], 0) if t > s else torch.zeros(48, 32)
            for s, t in groups(offsets_E)
        ])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert rel_err(got, exact) < 0.06


def test_pad_offsets():
    offsets_E = torch.tensor([3, 3, 20, 36], dtype=torch.int32)  # counts 3, 0, 17, 16
    padded_E, shift_G = gg.pad_offsets(offsets_E, 96)
    assert padded_E.tolist() == [16, 16, 48, 96]  # padded counts 16, 0, 32, 16; the last expert runs to 96
    assert shift_G.tolist() == [0, 13, 13, 28, 28]  # padded start - start per expert, then dropped rows (64 - 36)


def _fp8(layer: MoELinear) -> MoELinear:
    out = copy.deepcopy(layer)
    out.expert_fp8, out._fp8_emulate = True, True
    return out


def _causal_ec() -> CausalExpertChoiceRouter:
    router = CausalExpertChoiceRouter(D, E, 2, max_experts_per_token=3)
    with torch.no_grad():  # active thresholds: about half the slots dropped
        _, scores_TE, _ = router.scores(torch.randn(T, D))
        router.thresholds.copy_(scores_TE.median(dim=0).values)
        router.num_updates.fill_(1)
    return router


ROUTERS = {
    "token_choice": lambda: TokenChoiceTopKRouter(D, E, 2),
    "expert_choice": lambda: ExpertChoiceTopKRouter(D, E, 2, capacity_factor=1.5),
    "causal_expert_choice": _causal_ec,
}


def _run(layer, router, x):
    out, _ = layer(x, router(x))
    params = [x, layer.gate_up_proj, layer.down_proj, router.gate.weight]
    if layer.gate_up_proj_bias is not None:
        params += [layer.gate_up_proj_bias, layer.down_proj_bias]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return [out, *torch.autograd.grad((out * g).sum(), params)]


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("bias", [False, True])
def test_padding_is_exact(router, bias, monkeypatch):
    """expert_fp8's padded layout run with the plain GEMMs equals the unpadded layer exactly: segments not a
    multiple of 16, empty experts, dropped slots, biases; pad rows add nothing anywhere."""
    torch.manual_seed(0)
    base = MoELinear(E, D, H, bias=bias, activation=ClampedSwiGLU() if bias else "silu")
    padded = _fp8(base)
    monkeypatch.setattr(padded, "_fp8_gemm", lambda x: gg.BF16)
    r = ROUTERS[router]()
    x = torch.randn(T, D, requires_grad=True)
    for a, b in zip(_run(padded, r, x), _run(base, r, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_padding_with_an_empty_expert_and_a_lone_dropped_row(monkeypatch):
    """The expert-parallel dispatcher's corner: no row for this rank's experts, one masked row (may_drop)."""
    torch.manual_seed(0)
    layer = _fp8(MoELinear(E, D, H))
    out = layer.routed(
        torch.randn(1, D), torch.zeros(1, dtype=torch.long), torch.zeros(1), torch.zeros(E, dtype=torch.int32),
        torch.zeros(1, 1, dtype=torch.long), may_drop=True,
    )
    assert out.shape == (1, D) and out.abs().max() == 0


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_layer_is_close_to_the_fp32_layer(router, bias):
    """Outputs and every gradient (tokens, weights, router, biases) within fp8 error of the fp32 layer."""
    torch.manual_seed(0)
    base = MoELinear(E, D, H, bias=bias, activation=ClampedSwiGLU() if bias else "silu")
    r = ROUTERS[router]()
    x = torch.randn(T, D, requires_grad=True)
    got, ref = _run(_fp8(base), r, x), _run(base, r, x)
    assert rel_err(got[0], ref[0]) > 0  # fp8 did run (the down bias's gradient needs no GEMM: exact)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 0.12


def test_fp8_layer_in_bf16_is_close():
    torch.manual_seed(0)
    base = MoELinear(E, D, H).to(torch.bfloat16)
    r = TokenChoiceTopKRouter(D, E, 2).to(torch.bfloat16)
    x = torch.randn(T, D, dtype=torch.bfloat16, requires_grad=True)
    got, ref = _run(_fp8(base), r, x), _run(base, r, x)
    assert all(a.dtype == b.dtype for a, b in zip(got, ref))
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 0.12


def test_expert_fp8_refusals():
    with pytest.raises(ValueError, match=r"expert_fp8=True needs dim and hidden_dim multiples of 16.*'dim': 24"):
        MoELinear(E, 24, H, expert_fp8=True)
    with pytest.raises(ValueError, match=r"expert_fp8 must be true or false, got 'yes'"):
        MoELinear(E, D, H, expert_fp8="yes")
    layer = MoELinear(E, D, H, expert_fp8=True)
    x = torch.randn(T, D)
    with pytest.raises(RuntimeError, match=r"expert_fp8=True .*compute capability 9\.0\+.*got tokens on cpu"):
        layer(x, TokenChoiceTopKRouter(D, E, 2)(x))
    from torchtune_moe.modules.peft.lora_experts import LoRAMoELinear

    with pytest.raises(ValueError, match=r"expert_fp8=True is not supported with LoRA"):
        LoRAMoELinear.from_moe_linear(layer, rank=8, alpha=16.0)


def test_expert_fp8_reaches_every_moe_layer():
    model = moe(vocab_size=64, num_layers=2, num_heads=2, num_kv_heads=2, embed_dim=32, max_seq_len=16,
                num_experts=4, experts_per_token=2, moe_hidden_dim=16, expert_fp8=True)
    flags = [m.expert_fp8 for m in model.modules() if isinstance(m, MoELinear)]
    assert flags == [True, True]
    assert not moe_layer(dim=32, moe_hidden_dim=16, num_experts=4, experts_per_token=2).experts.expert_fp8
    from torchtune_moe.models.mixtral import mixtral

    model = mixtral(vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=32, moe_hidden_dim=16,
                    num_experts=4, experts_per_token=2, max_seq_len=16, expert_fp8=True)
    assert [m.expert_fp8 for m in model.modules() if isinstance(m, MoELinear)] == [True]


@pytest.mark.parametrize(
    "config, overrides, message",
    [
        ("tiny/full", ["model.expert_fp8=true"], r"model\.expert_fp8: true needs a CUDA GPU of compute capability "
                                                 r"9\.0\+ .*got device cpu"),
        ("tiny/lora", ["model.expert_fp8=true"], r"model\.expert_fp8: true is not supported with LoRA"),
        # the dense layers' option (tests/training/test_fp8_training.py)
        ("tiny/full", ["enable_fp8_training=true"], r"enable_fp8_training: true needs a CUDA GPU of compute capability "
                                                     r"8\.9\+ .*got device cpu; allowed here: enable_fp8_training=false"),
        ("tiny/full", ["enable_fp8_training=yes"], r"enable_fp8_training"),
        ("tiny/full", ["fp8_recipe_name=blockwise"], r"fp8_recipe_name.*tensorwise.*rowwise.*rowwise_with_gw_hp"),
        ("tiny/full", ["fp8_recipe_name=rowwise"], r"fp8_recipe_name: rowwise is set but enable_fp8_training is "
                                                   r"false, so it would have no effect"),
        ("tiny/lora", ["enable_fp8_training=true"], r"enable_fp8_training: true is not supported with LoRA"),
    ],
)
def test_recipe_refuses_fp8_options_by_name(config, overrides, message):
    """``model.expert_fp8`` and ``enable_fp8_training``, before any work: on a CPU, a non-boolean, an unknown fp8
    recipe name, a recipe name without ``enable_fp8_training`` (it would be ignored), with LoRA."""
    from torchtune_moe.config import load_config
    from torchtune_moe.training import FULL_FINETUNE_CONFIG_SPEC, LORA_FINETUNE_CONFIG_SPEC, validate_recipe_config

    spec = LORA_FINETUNE_CONFIG_SPEC if "lora" in config else FULL_FINETUNE_CONFIG_SPEC
    with pytest.raises(ValueError, match=message):
        validate_recipe_config(load_config(config, ["device=cpu", *overrides]), spec)


def test_recipe_checks_dtype_and_dims_on_an_sm90_gpu(monkeypatch):
    """On an sm90 GPU (faked here) dtype and dims are checked next, naming the key."""
    from torchtune_moe.config import load_config
    from torchtune_moe.training import _recipe_config

    monkeypatch.setattr(_recipe_config.utils, "get_device", lambda device=None: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cfg = load_config("tiny/full", ["model.expert_fp8=true", "dtype=fp32"])
    with pytest.raises(ValueError, match=r"model\.expert_fp8: true needs dtype: bf16 .*got dtype: fp32"):
        _recipe_config._check_expert_fp8(cfg)
    cfg = load_config("tiny/full", ["model.expert_fp8=true", "dtype=bf16", "model.moe_hidden_dim=136"])
    with pytest.raises(ValueError, match=r"model\.expert_fp8: true needs model\.moe_hidden_dim a multiple of 16 .*got 136"):
        _recipe_config._check_expert_fp8(cfg)
    _recipe_config._check_expert_fp8(load_config("tiny/full", ["model.expert_fp8=true", "dtype=bf16"]))  # allowed


@pytest.mark.parametrize("op", ["forward", "input_grad", "weight_grad"])
def test_gpu_path_operands_pass_scaled_grouped_mm_checks(op):
    """The real path (torchao's quantizers, torch._scaled_grouped_mm) traced with fake tensors: operand layouts
    (row-major left, column-major right, 16-byte strides) and scale shapes pass torch's checks, output bf16."""
    pytest.importorskip("triton")  # torchao's quantizer kernels import it
    from torch._subclasses.fake_tensor import FakeTensorMode

    P, N, K = 256, 48, 32
    with FakeTensorMode():
        offsets_E = torch.tensor([64, 64, 192, 256], dtype=torch.int32)
        a, g = torch.randn(P, K, dtype=torch.bfloat16), torch.randn(P, N, dtype=torch.bfloat16)
        w = torch.randn(4, N, K, dtype=torch.bfloat16)
        args = {"forward": (a, w), "input_grad": (g, w), "weight_grad": (g, a)}[op]
        out = getattr(gg.Fp8GroupedGemm(), op)(*args, offsets_E)
        want = getattr(gg.BF16, op)(*args, offsets_E)
        if op == "forward":  # (product, the weight's row scales for input_grad)
            (out, w_scale_EN), want = out, want[0]
            assert w_scale_EN.shape == (4, N) and w_scale_EN.dtype == torch.float32
    assert out.shape == want.shape and out.dtype == torch.bfloat16


def test_per_group_colwise_kernel_fake_matches_torchao_layout():
    """The fake of our weight-gradient quantizer (what torch.compile traces) has torchao's layout: fp8 column-major
    [A, N] and expert-major scales [E * N]. Its values are checked against torchao's kernel in test_fp8_gpu.py."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torchtune_moe.modules import _kernels

    with FakeTensorMode():
        t = torch.randn(96, 48, dtype=torch.bfloat16)
        q, s = _kernels.per_group_colwise_fp8(t, torch.tensor([16, 16, 64, 80], dtype=torch.int32))
    assert q.shape == (96, 48) and q.stride() == (1, 96) and q.dtype == torch.float8_e4m3fn
    assert s.shape == (4 * 48,) and s.dtype == torch.float32


def test_fp8_layer_with_no_tokens():
    """An empty batch (or an expert-parallel rank that receives no rows) runs through an expert_fp8 layer as through
    a bf16 one: empty output, no error (it failed in the padding, which gathers token 0)."""
    from torchtune_moe.models import moe_layer

    layer = moe_layer(dim=32, moe_hidden_dim=32, num_experts=4, experts_per_token=2, expert_fp8=True)
    layer.experts._fp8_emulate = True
    x = torch.randn(1, 0, 32, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (1, 0, 32) and x.grad.shape == (1, 0, 32)
