"""LoRA on experts with biases and the clamped SwiGLU (GPT-OSS): the fused grouped path against a plain-autograd
reference (values and every gradient: input, routing weights, adapters, biases) and against the merged weights,
with token choice and with dropped slots (causal expert choice)."""

import pytest
import torch
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from torchtune_moe.modules import CausalExpertChoiceRouter, MoELinear, TokenChoiceTopKRouter, dispatch_combine
from torchtune_moe.modules.moe_linear import ClampedSwiGLU
from torchtune_moe.modules.peft import LoRAMoELinear

E, D, H, R = 4, 32, 16, 8


def _experts(seed=0):
    """Biased GPT-OSS-style experts with a clamp low enough to cut, and non-zero adapters."""
    torch.manual_seed(seed)
    base = MoELinear(E, D, H, activation=ClampedSwiGLU(alpha=1.702, limit=0.3), bias=True)
    with torch.no_grad():
        base.gate_up_proj.mul_(3.0)
        base.gate_up_proj_bias.normal_(0, 0.5)
        base.down_proj_bias.normal_(0, 0.5)
    lora = LoRAMoELinear.from_moe_linear(base, rank=R, alpha=16.0)
    with torch.no_grad():
        lora.lora_gate_up_b.normal_(0, 0.2)
        lora.lora_down_b.normal_(0, 0.2)
    return base, lora


def _routing(router_name, seed=1):
    torch.manual_seed(seed)
    if router_name == "token_choice":
        router = TokenChoiceTopKRouter(D, E, 2)
    else:
        router = CausalExpertChoiceRouter(D, E, 2, capacity_factor=0.5)
    x = torch.randn(16, D)
    router.train()
    with torch.no_grad():
        routing = router(x)
    return x, routing


def test_one_pair_on_the_interleaved_gate_up_and_shared_biases():
    base, lora = _experts()
    assert lora.parts == 1  # one pair over the fused, interleaved gate_up_proj (as the Hub and PEFT hold it)
    assert lora.lora_gate_up_a.shape == (E, R, D) and lora.lora_gate_up_b.shape == (E, 2 * H, R)
    assert lora.gate_up_proj_bias is base.gate_up_proj_bias and lora.down_proj_bias is base.down_proj_bias
    assert "gate_up_proj_bias" in dict(lora.named_parameters())
    assert LoRAMoELinear(E, D, H, rank=R, alpha=8.0).parts == 2  # other gated experts: gate and up apart


@pytest.mark.parametrize("router_name", ["token_choice", "causal_expert_choice"])
def test_routed_matches_reference_and_merged(router_name):
    _, lora = _experts()
    _, ref = _experts()
    for m in (lora, ref):  # biases trainable too, to check their gradients
        for p in m.parameters():
            p.requires_grad_(True)
    x, routing = _routing(router_name)
    x.requires_grad_(True)
    w = routing.weights_A.detach().clone().requires_grad_(True)
    routing.weights_A = w
    out, _ = dispatch_combine(x, routing, lora)

    # Reference: the unfused plain-autograd grouped path on the kept rows, weighted and summed per token.
    keep = routing.expert_ids_A < E
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = w.detach().clone().requires_grad_(True)
    ids, toks = routing.expert_ids_A[keep], routing.token_ids_A[keep]
    order = torch.argsort(ids, stable=True)
    offs = torch.bincount(ids, minlength=E).cumsum(0).to(torch.int32)
    rows = toks[order]
    y = ref.grouped(x_ref[rows], offs) * w_ref[keep][order].unsqueeze(-1)
    want = torch.zeros_like(x_ref).index_add(0, rows, y)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    if router_name == "causal_expert_choice":
        assert not keep.all()  # dropped slots exercised

    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad[keep], w_ref.grad[keep], atol=1e-5, rtol=1e-5)
    for name, p in lora.named_parameters():
        p_ref = ref.get_parameter(name)
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        assert p.grad.abs().sum() > 0, name

    # Merged: plain biased experts holding W + scale * B @ A (same biases) compute the same.
    merged = MoELinear(E, D, H, activation=lora.act, bias=True)
    with torch.no_grad():
        merged.gate_up_proj.copy_(lora.merged_weight("gate_up_proj"))
        merged.down_proj.copy_(lora.merged_weight("down_proj"))
        merged.gate_up_proj_bias.copy_(lora.gate_up_proj_bias)
        merged.down_proj_bias.copy_(lora.down_proj_bias)
        torch.testing.assert_close(dispatch_combine(x, routing, merged)[0], out, atol=1e-5, rtol=1e-5)


def test_adapter_starts_at_zero_and_only_adapters_train():
    torch.manual_seed(0)
    base = MoELinear(E, D, H, activation=ClampedSwiGLU(), bias=True)
    lora = LoRAMoELinear.from_moe_linear(base, rank=R, alpha=8.0)
    x, routing = _routing("token_choice")
    torch.testing.assert_close(dispatch_combine(x, routing, lora)[0], dispatch_combine(x, routing, base)[0])
    set_trainable_params(lora, get_adapter_params(lora))
    dispatch_combine(x, routing, lora)[0].sum().backward()
    assert lora.gate_up_proj_bias.grad is None and lora.down_proj_bias.grad is None and lora.gate_up_proj.grad is None
    assert lora.lora_gate_up_a.grad is not None and lora.lora_down_b.grad.abs().sum() > 0


def test_qlora_with_biases_equals_lora_on_the_dequantized_base():
    """NF4 base weights (QLoRA) with the biases kept dense: the same output and adapter gradients as LoRA on the
    dequantized weights."""
    from torchao.dtypes.nf4tensor import NF4Tensor

    from torchtune_moe.modules.peft import dequantize

    Eq, Dq, Hq = 4, 64, 64  # NF4 needs tensors of a multiple of 16384 elements
    torch.manual_seed(0)
    base = MoELinear(Eq, Dq, Hq, activation=ClampedSwiGLU(limit=0.5), bias=True)
    with torch.no_grad():
        base.gate_up_proj_bias.normal_(0, 0.5)
        base.down_proj_bias.normal_(0, 0.5)
    q = LoRAMoELinear.from_moe_linear(base, rank=R, alpha=16.0, quantize_base=True)
    q.quantize_base_weights()
    assert isinstance(q.gate_up_proj, NF4Tensor) and not isinstance(q.gate_up_proj_bias, NF4Tensor)
    dense = LoRAMoELinear(Eq, Dq, Hq, rank=R, alpha=16.0, activation=q.act, bias=True)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            getattr(dense, name).copy_(dequantize(getattr(q, name), q.base_shapes[name]))
        for name in ("gate_up_proj_bias", "down_proj_bias", *q.adapter_params()):
            getattr(dense, name).copy_(getattr(q, name))
        for m in (q, dense):
            m.lora_gate_up_b.fill_(0.05)
            m.lora_down_b.fill_(0.05)
    set_trainable_params(q, get_adapter_params(q))
    set_trainable_params(dense, get_adapter_params(dense))
    torch.manual_seed(1)
    x = torch.randn(16, Dq)
    routing = TokenChoiceTopKRouter(Dq, Eq, 2)(x)
    routing.weights_A = routing.weights_A.detach()
    out_q, out_d = dispatch_combine(x, routing, q)[0], dispatch_combine(x, routing, dense)[0]
    torch.testing.assert_close(out_q, out_d, atol=1e-5, rtol=1e-5)
    out_q.sum().backward()
    out_d.sum().backward()
    for name in q.adapter_params():
        torch.testing.assert_close(getattr(q, name).grad, getattr(dense, name).grad, atol=1e-5, rtol=1e-5)
