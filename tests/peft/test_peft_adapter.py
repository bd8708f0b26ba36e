"""LoRA adapters and merged weights against transformers + PEFT, for every Hugging Face family.

For each family a tiny random transformers model is saved offline (tests/hf_testing.py); our model loads it,
gets adapters on every attention projection, dense / shared MLP, routed expert, router gate and the output,
with random (non-zero) A and B. Then:
- the adapter written by ``save_peft_adapter`` (per-expert Hub layout), loaded by PEFT onto transformers' model,
  gives the same logits as ours (<= 1e-4, fp32). PEFT 0.21 converts per-expert adapters to transformers 5's
  fused experts (and router adapters to its router parameter) for Qwen3-MoE, Mixtral and OLMoE, not for
  Qwen2-MoE (it drops expert adapters and refuses router ones): there the PEFT check runs without expert and
  router adapters, and those are checked through the merged export;
- ``load_peft_adapter`` reads it back exactly;
- the merged weights saved through HFMoECheckpointer reload in transformers with the same logits.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_testing import ATOL, save_tiny_hf  # noqa: E402

from torchtune_moe.training import from_hf_pretrained, load_peft_adapter, save_peft_adapter  # noqa: E402
from torchtune_moe.modules.peft import LoRAMoELinear, apply_lora, lora_modules, merged_state_dict  # noqa: E402
from torchtune_moe.training._hf_checkpointer import HFMoECheckpointer  # noqa: E402



@pytest.fixture(autouse=True)
def _peft_without_torchao(monkeypatch):
    """PEFT 0.21 refuses torchao < 0.16 as soon as it looks for torchao-quantized layers, and torchtune 0.6.1 needs
    torchao < 0.16: these models have no torchao layers, so PEFT is told torchao is absent."""
    import peft.tuners.lora.torchao
    import peft.utils.quantization_utils

    for module in (peft.tuners.lora.torchao, peft.utils.quantization_utils):
        if hasattr(module, "is_torchao_available"):
            monkeypatch.setattr(module, "is_torchao_available", lambda: False)


FAMILIES = {
    "qwen3_moe": (
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
        # All layers MoE, as the published Qwen3-MoE models (PEFT cannot tell dense gate_proj from the experts').
        dict(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_experts=4,
             num_experts_per_tok=2, tie_word_embeddings=False),
        "model.layers.1.mlp.experts.3.gate_proj",
        True,
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
             num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
        "model.layers.1.mlp.shared_expert.up_proj",
        False,
    ),
    "mixtral": (
        "MixtralConfig", "MixtralForCausalLM",
        dict(intermediate_size=16, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
             tie_word_embeddings=False),
        "model.layers.1.block_sparse_moe.experts.3.w3",
        True,
    ),
    "olmoe": (
        "OlmoeConfig", "OlmoeForCausalLM",
        dict(intermediate_size=16, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, eos_token_id=95,
             clip_qkv=0.5, tie_word_embeddings=False),
        "model.layers.0.mlp.experts.2.down_proj",
        True,
    ),
}


def _tokens(vocab):
    torch.manual_seed(1)
    return torch.randint(0, vocab, (2, 16))


def _adapted(path, experts=True, router=True):
    """Our model from the checkpoint, adapters everywhere, random non-zero A and B."""
    ours = from_hf_pretrained(path, dtype=torch.float32)
    apply_lora(
        ours, lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
        apply_lora_to_experts=experts, apply_lora_to_output=True, apply_lora_to_router=router, lora_rank=8,
        lora_alpha=16,
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for _, m in lora_modules(ours):
            for name in m.adapter_params():
                m.get_parameter(name).normal_(0, 0.1)
    return ours.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_peft_adapter_and_merged_export_match_transformers(family, tmp_path):
    config_cls, model_cls, kw, sample_module, peft_reads_experts = FAMILIES[family]
    _, path = save_tiny_hf(getattr(transformers, config_cls), getattr(transformers, model_cls), tmp_path / "hf", **kw)
    config = json.loads((path / "config.json").read_text())
    ours = _adapted(path)
    assert any(isinstance(m, LoRAMoELinear) for _, m in lora_modules(ours))
    tokens = _tokens(config["vocab_size"])
    with torch.no_grad():
        logits = ours(tokens)

    # 1. PEFT adapter (per-expert Hub names) on transformers' base model.
    adapter_dir = tmp_path / "adapter"
    save_peft_adapter(ours, config, adapter_dir, lora_dropout=0.0)
    peft_ours, peft_logits, peft_dir = ours, logits, adapter_dir
    if not peft_reads_experts:
        peft_ours, peft_dir = _adapted(path, experts=False, router=False), tmp_path / "adapter_no_experts"
        save_peft_adapter(peft_ours, config, peft_dir)
        with torch.no_grad():
            peft_logits = peft_ours(tokens)
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert f"base_model.model.{sample_module}.lora_A.weight" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys
    assert any(k.endswith(".gate.lora_A.weight") for k in keys)  # the routers' gates
    hf_base = model_cls_from(model_cls).from_pretrained(path, dtype=torch.float32)
    hf_lora = peft.PeftModel.from_pretrained(hf_base, peft_dir).eval()
    with torch.no_grad():
        hf_logits = hf_lora(tokens).logits
    diff = (hf_logits - peft_logits).abs().max().item()
    assert diff <= ATOL, f"{family}: transformers+PEFT vs ours, max abs logit difference {diff}"

    # 2. Reading the adapter back gives our adapter exactly.
    loaded = load_peft_adapter(ours, config, adapter_dir)
    for key, value in loaded.items():
        torch.testing.assert_close(value, ours.get_parameter(key).detach(), atol=0, rtol=0)

    # 3. Merged weights through the HF checkpointer reload in transformers with the same logits.
    ckpt = HFMoECheckpointer(str(path))
    save_dir = tmp_path / "out" / "merged"
    save_dir.mkdir(parents=True)
    ckpt.save_checkpoint(merged_state_dict(ours), save_dir)
    merged = model_cls_from(model_cls).from_pretrained(save_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (merged(tokens).logits - logits).abs().max().item()
    assert diff <= ATOL, f"{family}: merged export in transformers vs ours, max abs logit difference {diff}"


def model_cls_from(name):
    return getattr(transformers, name)


def test_adapter_rank_mismatch_is_refused(tmp_path):
    config_cls, model_cls, kw, _, _ = FAMILIES["qwen3_moe"]
    _, path = save_tiny_hf(getattr(transformers, config_cls), getattr(transformers, model_cls), tmp_path / "hf", **kw)
    config = json.loads((path / "config.json").read_text())
    ours = _adapted(path)
    save_peft_adapter(ours, config, tmp_path / "adapter")
    other = from_hf_pretrained(path, dtype=torch.float32)
    apply_lora(other, lora_attn_modules=["q_proj"], lora_rank=16, lora_alpha=16)
    with pytest.raises(ValueError, match="r=8"):
        load_peft_adapter(other, config, tmp_path / "adapter")
