"""LoRA components: per-expert adapters in the fused grouped path (values and gradients against a plain autograd
reference and against the merged weights), the generic builder, QLoRA (NF4) and merging."""

import pytest
import torch
from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params

from torchtune_moe.models import lora_model, moe
from torchtune_moe.modules import MoELinear, dispatch_combine
from torchtune_moe.modules.peft import LoRAMoELinear, lora_modules, merged_state_dict

E, D, H, R = 4, 32, 16, 8


def _routing(T=12, K=2, seed=0, drop=False):
    """Token-choice routing through a real router (for dispatch_combine)."""
    from torchtune_moe.modules import TokenChoiceTopKRouter

    torch.manual_seed(seed)
    router = TokenChoiceTopKRouter(D, E, K)
    x = torch.randn(T, D)
    with torch.no_grad():
        routing = router(x)
    return x, routing


def _lora_experts(gated=True, seed=0):
    torch.manual_seed(seed)
    lora = LoRAMoELinear(E, D, H, rank=R, alpha=16.0, gated=gated)
    with torch.no_grad():  # non-zero B so that the adapter contributes
        lora.lora_gate_up_b.normal_(0, 0.1)
        lora.lora_down_b.normal_(0, 0.1)
    return lora


@pytest.mark.parametrize("gated", [True, False])
def test_routed_matches_reference_and_merged(gated):
    lora = _lora_experts(gated)
    x, routing = _routing()
    x.requires_grad_(True)
    out, _ = dispatch_combine(x, routing, lora)

    # Reference: the same adapters through the unfused plain-autograd forward.
    ref_mod = _lora_experts(gated)
    x_ref = x.detach().clone().requires_grad_(True)
    order = torch.argsort(routing.expert_ids_A, stable=True)
    counts = torch.bincount(routing.expert_ids_A, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    rows = routing.token_ids_A[order]
    y = ref_mod.grouped(x_ref[rows], offs) * routing.weights_A[order].unsqueeze(-1)
    ref = torch.zeros_like(x_ref).index_add(0, rows, y)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    for name in lora.adapter_params():
        torch.testing.assert_close(getattr(lora, name).grad, getattr(ref_mod, name).grad, atol=1e-5, rtol=1e-5)

    # Merged: a plain MoELinear holding W + scale * B @ A computes the same.
    base = MoELinear(E, D, H, gated=gated)
    with torch.no_grad():
        base.gate_up_proj.copy_(lora.merged_weight("gate_up_proj"))
        base.down_proj.copy_(lora.merged_weight("down_proj"))
    merged, _ = dispatch_combine(x.detach(), routing, base)
    torch.testing.assert_close(out.detach(), merged, atol=1e-5, rtol=1e-5)


def test_adapter_starts_at_zero_and_only_adapters_train():
    torch.manual_seed(0)
    base = MoELinear(E, D, H)
    lora = LoRAMoELinear.from_moe_linear(base, rank=R, alpha=8.0)
    x, routing = _routing()
    torch.testing.assert_close(dispatch_combine(x, routing, lora)[0], dispatch_combine(x, routing, base)[0])
    set_trainable_params(lora, get_adapter_params(lora))
    out, _ = dispatch_combine(x, routing, lora)
    out.sum().backward()
    assert lora.gate_up_proj.grad is None and lora.down_proj.grad is None
    assert lora.lora_gate_up_a.grad is not None and lora.lora_down_b.grad.abs().sum() > 0


def test_rank_must_be_multiple_of_8():
    with pytest.raises(ValueError, match="lora_rank"):
        LoRAMoELinear(E, D, H, rank=4, alpha=8.0)


def _tiny(**lora):
    torch.manual_seed(0)
    return lora_model(
        moe, vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=32,
        num_experts=4, experts_per_token=2, moe_hidden_dim=16, moe_layer_ids=[1], dense_hidden_dim=32,
        shared_expert_hidden_dim=16, qk_norm="head", **lora,
    )


def test_lora_model_targets_and_merge():
    model = _tiny(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, apply_lora_to_output=True,
                  lora_rank=8, lora_alpha=16)
    names = {n for n, _ in lora_modules(model)}
    assert "layers.0.attn.q_proj.proj" in names  # inside the q-norm wrapper
    assert "layers.0.attn.v_proj" in names and "layers.0.attn.k_proj" not in names
    assert "layers.0.mlp.w1" in names  # dense layer
    assert {"layers.1.mlp.experts", "layers.1.mlp.shared_expert.w2", "output"} <= names
    assert isinstance(model.layers[1].mlp.experts, LoRAMoELinear)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for p in get_adapter_params(m).values():
                p.normal_(0, 0.05)
    tokens = torch.randint(0, 64, (2, 10))
    model.eval()
    with torch.no_grad():
        out = model(tokens)
    # The merged state dict loads into the plain base model and computes the same.
    torch.manual_seed(1)
    base = moe(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=32,
               num_experts=4, experts_per_token=2, moe_hidden_dim=16, moe_layer_ids=[1], dense_hidden_dim=32,
               shared_expert_hidden_dim=16, qk_norm="head")
    base.load_state_dict(merged_state_dict(model), strict=True)
    base.eval()
    with torch.no_grad():
        torch.testing.assert_close(base(tokens), out, atol=1e-5, rtol=1e-5)


def test_lora_model_bad_options():
    with pytest.raises(ValueError, match="lora_attn_modules"):
        _tiny(lora_attn_modules=["qkv"])
    with pytest.raises(ValueError, match="nothing to adapt"):
        _tiny(lora_attn_modules=[], apply_lora_to_experts=False)
    with pytest.raises(ValueError, match="base"):
        lora_model("torchtune_moe.models.no_such_builder")


def test_qlora_quantizes_base_and_trains():
    from torchao.dtypes.nf4tensor import NF4Tensor

    with pytest.raises(ValueError, match="quantize_base: .*elements"):
        _tiny(lora_attn_modules=["q_proj"], quantize_base=True)  # 32 x 32 weights: too small for NF4 blocks
    torch.manual_seed(0)
    model = lora_model(
        moe, vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=128, max_seq_len=32,
        num_experts=4, experts_per_token=2, moe_hidden_dim=64, qk_norm="head",
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], quantize_base=True,
    )
    experts = model.layers[1].mlp.experts
    assert isinstance(experts.gate_up_proj, NF4Tensor) and isinstance(model.layers[0].attn.v_proj.weight, NF4Tensor)
    assert isinstance(model.layers[0].attn.q_proj.proj, LoRALinear)
    set_trainable_params(model, get_adapter_params(model))
    tokens = torch.randint(0, 64, (2, 10))
    model(tokens).sum().backward()
    assert experts.lora_gate_up_a.grad is not None and experts.lora_down_b.grad is not None
    # Merged weights come out dense, in the base layout.
    sd = merged_state_dict(model)
    assert sd["layers.1.mlp.experts.gate_up_proj"].shape == (4, 128, 128)
    assert not any("lora" in k for k in sd)


@pytest.mark.parametrize("router_name", ["expert_choice", "causal_expert_choice"])
def test_routed_with_other_routers_matches_merged(router_name):
    """Routers with any number of rows per token (combined per token segment) and dropped slots: output and input gradient
    equal the merged-weight base experts'; adapter gradients are finite and non-zero."""
    from torchtune_moe.modules import ExpertChoiceTopKRouter, CausalExpertChoiceRouter

    torch.manual_seed(0)
    cls = ExpertChoiceTopKRouter if router_name == "expert_choice" else CausalExpertChoiceRouter
    router = cls(D, E, 2, capacity_factor=0.5)
    x = torch.randn(16, D)
    router.train()
    with torch.no_grad():
        routing = router(x)
    lora = _lora_experts()
    base = MoELinear(E, D, H)
    with torch.no_grad():
        base.gate_up_proj.copy_(lora.merged_weight("gate_up_proj"))
        base.down_proj.copy_(lora.merged_weight("down_proj"))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_a, _ = dispatch_combine(xa, routing, lora)
    out_b, _ = dispatch_combine(xb, routing, base)
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out_a)
    out_a.backward(g)
    out_b.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    for name in lora.adapter_params():
        grad = getattr(lora, name).grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_router_lora_trains_and_merges():
    from torchtune_moe.modules.peft import LoRAGate

    model = _tiny(lora_attn_modules=[], apply_lora_to_experts=False, apply_lora_to_router=True, lora_rank=8)
    gate = model.layers[1].mlp.router.gate
    assert isinstance(gate, LoRAGate)
    assert "layers.1.mlp.router.gate.weight" in model.state_dict()  # the base key is unchanged
    with torch.no_grad():
        gate.lora_b.weight.normal_(0, 0.1)
    set_trainable_params(model, get_adapter_params(model))
    tokens = torch.randint(0, 64, (2, 10))
    model.train()
    model(tokens).sum().backward()
    assert gate.lora_a.weight.grad.abs().sum() > 0 and gate._parameters["weight"].grad is None
    model.eval()
    with torch.no_grad():
        out = model(tokens)
    torch.manual_seed(1)
    base = moe(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=32,
               num_experts=4, experts_per_token=2, moe_hidden_dim=16, moe_layer_ids=[1], dense_hidden_dim=32,
               shared_expert_hidden_dim=16, qk_norm="head")
    base.load_state_dict(merged_state_dict(model), strict=True)
    base.eval()
    with torch.no_grad():
        torch.testing.assert_close(base(tokens), out, atol=1e-5, rtol=1e-5)


def test_docs_lora_python_runs():
    """The Python cells of docs/lora.md run (the docs stay true)."""
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "lora.md"
    cells = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert cells
    namespace: dict = {}
    for cell in cells:
        exec(compile(cell, str(doc), "exec"), namespace)
    assert isinstance(namespace["model"].layers[0].mlp.experts, LoRAMoELinear)
