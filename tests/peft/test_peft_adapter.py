"""LoRA adapters and merged weights against transformers + PEFT, for every Hugging Face family.

For each family a tiny random transformers model is saved offline (tests/hf_testing.py); our model loads it,
gets adapters on every attention projection (multi-head latent attention's included), dense / shared MLP, routed
expert, router gate and the output, with random (non-zero) A and B. Then:
- the adapter written by ``save_peft_adapter`` (per-expert Hub layout), loaded by PEFT onto transformers' model,
  gives the same logits as ours (<= 1e-4, fp32). PEFT 0.21 converts per-expert adapters to transformers 5's
  fused experts (and router adapters to its router parameter) for Qwen3-MoE, Mixtral, OLMoE, GLM-4.5 and
  DeepSeek-V2/V3, not for Qwen2-MoE (it drops expert adapters and refuses router ones). For the families it
  converts, it maps every gate_proj/up_proj/down_proj target to the fused experts, so the MLP adapters of the
  dense layers (first_k_dense_replace) and shared experts of GLM-4.5 and DeepSeek are dropped (checked). The
  PEFT check runs without the parts PEFT does not load; those are checked through the merged export;
- ``load_peft_adapter`` reads it back exactly;
- the merged weights saved through HFMoECheckpointer reload in transformers with the same logits.
Also: LoRA / QLoRA on multi-head latent attention, its refusals, and the packaged configs' attention adapters.
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


MHA = ["q_proj", "k_proj", "v_proj", "output_proj"]
# Multi-head latent attention: every projection (with a query latent q_a_proj / q_b_proj, else q_proj).
MLA_Q_LATENT = ["q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "output_proj"]
MLA_DIRECT_Q = ["q_proj", "kv_a_proj", "kv_b_proj", "output_proj"]
_MLA_SHAPE = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
# DeepSeek / GLM-4.5 layout: the first layer dense (first_k_dense_replace), then MoE layers with a shared expert.
_DEEPSEEK_LIKE = dict(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, n_routed_experts=4,
                      num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, tie_word_embeddings=False)

# family -> (config class, model class, config kwargs, attention projections, Hub modules the adapter must name,
# what PEFT 0.21 does not load: "experts" / "router" / "mlp" (dense layers and shared experts)).
FAMILIES = {
    "qwen3_moe": (
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
        # All layers MoE, as the published Qwen3-MoE models (PEFT cannot tell dense gate_proj from the experts').
        dict(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_experts=4,
             num_experts_per_tok=2, tie_word_embeddings=False),
        MHA, ["model.layers.1.mlp.experts.3.gate_proj"], (),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
             num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
        MHA, ["model.layers.1.mlp.shared_expert.up_proj", "model.layers.1.mlp.experts.3.gate_proj"],
        ("experts", "router"),
    ),
    "mixtral": (
        "MixtralConfig", "MixtralForCausalLM",
        dict(intermediate_size=16, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
             tie_word_embeddings=False),
        MHA, ["model.layers.1.block_sparse_moe.experts.3.w3"], (),
    ),
    "olmoe": (
        "OlmoeConfig", "OlmoeForCausalLM",
        dict(intermediate_size=16, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, eos_token_id=95,
             clip_qkv=0.5, tie_word_embeddings=False),
        MHA, ["model.layers.0.mlp.experts.2.down_proj"], (),
    ),
    # GLM-4.5: GQA with q/k norm, q/k/v biases and partial RoPE (torchtune's MultiHeadAttention projections).
    "glm4_moe": (
        "Glm4MoeConfig", "Glm4MoeForCausalLM",
        dict(_DEEPSEEK_LIKE, head_dim=16, use_qk_norm=True, attention_bias=True, routed_scaling_factor=2.5),
        MHA,
        ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.shared_experts.down_proj",
         "model.layers.1.mlp.experts.3.up_proj"],
        ("mlp",),
    ),
    # DeepSeek-V3's shape: query latent, 2 groups of 2 experts (best group).
    "deepseek_v3": (
        "DeepseekV3Config", "DeepseekV3ForCausalLM",
        dict(_DEEPSEEK_LIKE, **_MLA_SHAPE, q_lora_rank=24, n_group=2, topk_group=1, routed_scaling_factor=2.5),
        MLA_Q_LATENT,
        ["model.layers.0.self_attn.q_a_proj", "model.layers.1.self_attn.q_b_proj",
         "model.layers.1.self_attn.kv_a_proj_with_mqa", "model.layers.1.self_attn.kv_b_proj",
         "model.layers.1.self_attn.o_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.shared_experts.gate_proj",
         "model.layers.1.mlp.experts.3.down_proj"],
        ("mlp",),
    ),
    # Moonlight's shape (model_type deepseek_v3): no query latent, no group limit; plus rotate-half RoPE and
    # attention biases (adapted projections with a bias).
    "deepseek_v3_moonlight": (
        "DeepseekV3Config", "DeepseekV3ForCausalLM",
        dict(_DEEPSEEK_LIKE, **_MLA_SHAPE, q_lora_rank=None, n_group=1, topk_group=1, rope_interleave=False,
             attention_bias=True),
        MLA_DIRECT_Q, ["model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.kv_a_proj_with_mqa"], ("mlp",),
    ),
    # DeepSeek-V2-Lite's shape: no query latent, softmax routing.
    "deepseek_v2": (
        "DeepseekV2Config", "DeepseekV2ForCausalLM",
        dict(_DEEPSEEK_LIKE, **_MLA_SHAPE, q_lora_rank=None, n_group=1, topk_group=1),
        MLA_DIRECT_Q,
        ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.kv_b_proj", "model.layers.0.mlp.down_proj",
         "model.layers.1.mlp.shared_experts.up_proj", "model.layers.1.mlp.experts.0.gate_proj"],
        ("mlp",),
    ),
}
# PEFT 0.21's behaviour for the families with a fused-experts conversion (transformers maps glm4_moe,
# deepseek_v2/v3, qwen3_moe, olmoe to qwen2_moe's): every gate_proj/up_proj/down_proj target becomes the fused
# experts' parameters, so the dense layers' and shared experts' MLP adapters are dropped (silently: those
# modules stay nn.Linear). Checked below, so that the docs' statement fails here if PEFT changes.
DROPPED_BY_PEFT = {"mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "shared_experts.gate_proj",
                           "shared_experts.up_proj", "shared_experts.down_proj")}


def _tokens(vocab):
    torch.manual_seed(1)
    return torch.randint(0, vocab, (2, 16))


def _adapted(path, attn, mlp=True, experts=True, router=True):
    """Our model from the checkpoint, adapters on ``attn`` and everywhere else asked, random non-zero A and B."""
    ours = from_hf_pretrained(path, dtype=torch.float32)
    apply_lora(
        ours, lora_attn_modules=attn, apply_lora_to_mlp=mlp, apply_lora_to_experts=experts, apply_lora_to_output=True,
        apply_lora_to_router=router, lora_rank=8, lora_alpha=16,
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for _, m in lora_modules(ours):
            for name in m.adapter_params():
                m.get_parameter(name).normal_(0, 0.1)
    return ours.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_peft_adapter_and_merged_export_match_transformers(family, tmp_path):
    config_cls, model_cls, kw, attn, sample_modules, peft_drops = FAMILIES[family]
    _, path = save_tiny_hf(getattr(transformers, config_cls), getattr(transformers, model_cls), tmp_path / "hf", **kw)
    config = json.loads((path / "config.json").read_text())
    ours = _adapted(path, attn)
    assert any(isinstance(m, LoRAMoELinear) for _, m in lora_modules(ours))
    tokens = _tokens(config["vocab_size"])
    with torch.no_grad():
        logits = ours(tokens)

    # 1. PEFT adapter (per-expert Hub names) on transformers' base model; where PEFT drops or refuses a part,
    # without that part (the whole is checked through the merged export, 3.).
    adapter_dir = tmp_path / "adapter"
    save_peft_adapter(ours, config, adapter_dir, lora_dropout=0.0)
    peft_ours, peft_logits, peft_dir = ours, logits, adapter_dir
    if peft_drops:
        peft_ours = _adapted(path, attn, **{part: False for part in peft_drops})
        peft_dir = tmp_path / "adapter_peft_loads"
        save_peft_adapter(peft_ours, config, peft_dir)
        with torch.no_grad():
            peft_logits = peft_ours(tokens)
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    for module in sample_modules:
        assert f"base_model.model.{module}.lora_A.weight" in keys, module
    assert "base_model.model.lm_head.lora_B.weight" in keys
    assert any(k.endswith(".gate.lora_A.weight") for k in keys)  # the routers' gates
    hf_base = model_cls_from(model_cls).from_pretrained(path, dtype=torch.float32)
    hf_lora = peft.PeftModel.from_pretrained(hf_base, peft_dir).eval()
    with torch.no_grad():
        hf_logits = hf_lora(tokens).logits
    diff = (hf_logits - peft_logits).abs().max().item()
    assert diff <= ATOL, f"{family}: transformers+PEFT vs ours, max abs logit difference {diff}"
    lora_layers = {name for name, m in hf_lora.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    for module in sample_modules:  # every attention projection PEFT adapts, MLA's included
        if ".self_attn." in module:
            assert f"base_model.model.{module}" in lora_layers, module

    if "mlp" in peft_drops:  # what PEFT 0.21 does with the whole adapter: the MLP adapters are not loaded
        hf_all = peft.PeftModel.from_pretrained(
            model_cls_from(model_cls).from_pretrained(path, dtype=torch.float32), adapter_dir
        ).eval()
        mlp_linears = [n for n, m in hf_all.named_modules() if n.endswith(DROPPED_BY_PEFT["mlp"])]
        assert mlp_linears and all(type(hf_all.get_submodule(n)) is torch.nn.Linear for n in mlp_linears)
        with torch.no_grad():
            assert (hf_all(tokens).logits - logits).abs().max().item() > 1e-2

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
    config_cls, model_cls, kw, attn, _, _ = FAMILIES["qwen3_moe"]
    _, path = save_tiny_hf(getattr(transformers, config_cls), getattr(transformers, model_cls), tmp_path / "hf", **kw)
    config = json.loads((path / "config.json").read_text())
    ours = _adapted(path, attn)
    save_peft_adapter(ours, config, tmp_path / "adapter")
    other = from_hf_pretrained(path, dtype=torch.float32)
    apply_lora(other, lora_attn_modules=["q_proj"], lora_rank=16, lora_alpha=16)
    with pytest.raises(ValueError, match="r=8"):
        load_peft_adapter(other, config, tmp_path / "adapter")


def _mla_model(q_lora_rank, lora_attn_modules, quantize_base=False):
    """A tiny DeepSeek-V3 with LoRA on its multi-head latent attention (dims NF4 can quantize: every projection
    a multiple of 16384 elements)."""
    from torchtune_moe.models import lora_model
    from torchtune_moe.models.deepseek_v3 import deepseek_v3

    torch.manual_seed(0)
    return lora_model(
        deepseek_v3, vocab_size=64, num_layers=2, num_heads=4, embed_dim=512, dense_hidden_dim=64, moe_hidden_dim=32,
        num_experts=4, experts_per_token=2, max_seq_len=32, kv_lora_rank=128, q_lora_rank=q_lora_rank,
        qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32, lora_attn_modules=lora_attn_modules,
        apply_lora_to_experts=False, quantize_base=quantize_base,
    )


@pytest.mark.parametrize("q_lora_rank,modules", [(None, MLA_DIRECT_Q), (128, MLA_Q_LATENT)])
def test_mla_projections_take_lora_and_qlora(q_lora_rank, modules):
    from torchao.dtypes.nf4tensor import NF4Tensor
    from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params

    from torchtune_moe.models.deepseek_v3 import deepseek_v3

    for quantize_base in (False, True) if q_lora_rank else (False,):  # QLoRA: every MLA projection kind once
        model = _mla_model(q_lora_rank, modules, quantize_base=quantize_base)
        for layer in model.layers:
            for name in modules:
                proj = getattr(layer.attn, name)
                assert isinstance(proj, LoRALinear), name
                assert isinstance(proj.weight, NF4Tensor) == quantize_base, name
        with torch.no_grad():
            for _, m in lora_modules(model):
                m.lora_b.weight.normal_(0, 0.1)
        set_trainable_params(model, get_adapter_params(model))
        tokens = torch.randint(0, 64, (2, 10))
        model(tokens).sum().backward()
        assert all(getattr(model.layers[1].attn, n).lora_a.weight.grad.abs().sum() > 0 for n in modules)
    # The merged weights load into the plain model and compute what the adapted model computes.
    model = _mla_model(q_lora_rank, modules).eval()
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_b.weight.normal_(0, 0.1)
    plain = deepseek_v3(
        vocab_size=64, num_layers=2, num_heads=4, embed_dim=512, dense_hidden_dim=64, moe_hidden_dim=32, num_experts=4,
        experts_per_token=2, max_seq_len=32, kv_lora_rank=128, q_lora_rank=q_lora_rank, qk_nope_head_dim=32,
        qk_rope_head_dim=64, v_head_dim=32,
    ).eval()
    plain.load_state_dict(merged_state_dict(model))
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), model(tokens), atol=1e-4, rtol=1e-4)


def test_mla_lora_refuses_projections_it_does_not_have():
    with pytest.raises(ValueError, match=r"\['k_proj', 'v_proj'\] not in the attention of layer 0 \(MultiHeadLatentAttention\); "
                                         r"choose from \['q_proj', 'kv_a_proj', 'kv_b_proj', 'output_proj'\]"):
        _mla_model(None, ["q_proj", "k_proj", "v_proj", "output_proj"])
    with pytest.raises(ValueError, match=r"\['q_proj'\] not in .* choose from \['q_a_proj', 'q_b_proj', 'kv_a_proj'"):
        _mla_model(128, ["q_proj"])
    with pytest.raises(ValueError, match="kv_a_proj_with_mqa"):  # the Hub's name is not ours
        _mla_model(128, ["kv_a_proj_with_mqa"])
    with pytest.raises(ValueError, match="a list of projection names"):
        _mla_model(128, "q_a_proj")


@pytest.mark.parametrize("name,modules", [
    ("deepseek_v3/671b_lora", MLA_Q_LATENT),
    ("deepseek_v3/moonlight_16b_a3b_lora", MLA_DIRECT_Q),
    ("deepseek_v2/lite_16b_lora", MLA_DIRECT_Q),
    ("glm4_moe/air_106b_a12b_lora", MHA),
])
def test_packaged_lora_configs_adapt_every_attention_projection(name, modules):
    from torchtune import config as tt_config
    from torchtune.modules.peft import LoRALinear

    from torchtune_moe.config import load_config

    cfg = load_config(name).model
    assert list(cfg.lora_attn_modules) == modules
    with torch.device("meta"):
        model = tt_config.instantiate(cfg)
    attn = model.layers[-1].attn
    for n in modules:
        proj = getattr(attn, n)
        assert isinstance(getattr(proj, "proj", proj), LoRALinear), (name, n)
