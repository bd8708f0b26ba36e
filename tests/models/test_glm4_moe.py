"""GLM-4.5 against transformers: logits (partial RoPE, q/k norm, sigmoid routing with the checkpoint's
``e_score_correction_bias``, group limit, routed scaling factor, shared and first-k dense layers), both
conversion directions, the checkpointer round trip, published sizes on the meta device, config checks,
tokenizer."""

import json

import pytest
import torch

from hf_testing import checkpointer_round_trip, compare, describe, load_and_compare, param_counts, save_tiny_hf

transformers = pytest.importorskip("transformers")

from torchtune_moe.models import build_from_hf_config  # noqa: E402
from torchtune_moe.models.glm4_moe import (  # noqa: E402
    GLM4_5,
    GLM4_5_AIR,
    glm4_5_355b_a32b,
    glm4_5_air_106b_a12b,
    glm4_moe_hf_config_to_kwargs,
    glm4_moe_hf_to_tune,
    glm4_moe_tune_to_hf,
)
from torchtune_moe.modules import moe_layers  # noqa: E402
from torchtune_moe.training import from_hf_pretrained  # noqa: E402

BASE = dict(
    intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
    head_dim=16,
)

VARIANTS = {
    # GLM-4.5's options: q/k norm, q/k/v biases, 2 shared experts, first layer dense, routed scale 2.5, half RoPE
    "qk_norm_bias_shared_scaled": dict(
        use_qk_norm=True, attention_bias=True, n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
    ),
    # group-limited routing (4 groups of 2, best 2), no renormalisation, a quarter of each head rotated, no dense
    # layer, other rope base
    "groups_no_norm_quarter_rope": dict(
        n_group=4, topk_group=2, norm_topk_prob=False, first_k_dense_replace=0, partial_rotary_factor=0.25,
        rope_theta=1e6, tie_word_embeddings=True,
    ),
}


def _save_with_bias(path, **kw):
    """A tiny model whose routers have a non-zero ``e_score_correction_bias`` (zeros would not test it)."""
    hf, path = save_tiny_hf(transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM, path, **kw)
    with torch.no_grad():
        for layer in hf.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.5)
    hf.save_pretrained(path)
    return hf, path


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_transformers_and_round_trips(tmp_path, variant):
    hf, path = _save_with_bias(tmp_path / "hf", **{**BASE, **VARIANTS[variant]})
    ours = load_and_compare(hf, path)
    layers = [layer for _, layer in moe_layers(ours)]
    assert all(m.router.score_func == "sigmoid" and m.router.expert_bias.abs().sum() > 0 for m in layers)
    checkpointer_round_trip(hf, path, tmp_path / "out")


def test_bias_and_route_scale_matter(tmp_path):
    """The comparison would fail without the bias or the routed scaling factor."""
    hf, path = _save_with_bias(tmp_path, **BASE, routed_scaling_factor=2.5, n_shared_experts=1)
    tokens = torch.randint(0, 96, (2, 16))
    for change in ("expert_bias", "route_scale"):
        ours = from_hf_pretrained(path)
        with torch.no_grad():
            for _, layer in moe_layers(ours):
                if change == "expert_bias":
                    layer.router.expert_bias.zero_()
                else:
                    layer.router.route_scale = 1.0
            diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
        assert diff > 2e-4, (change, diff)  # the comparison allows 1e-4


@pytest.mark.parametrize("rate", [0.0, 0.01])
def test_bias_stays_fixed_or_is_trained_and_saved_to_the_hub_key(tmp_path, rate):
    """By default a training step leaves the published bias as it is (transformers never updates it); with
    ``expert_bias_update_rate`` it moves and is exported as ``e_score_correction_bias``."""
    from torchtune_moe.modules import update_routers

    hf, path = _save_with_bias(tmp_path, **BASE)
    config = json.loads((path / "config.json").read_text())
    ours = from_hf_pretrained(path, expert_bias_update_rate=rate).train()
    before = ours.layers[1].mlp.router.expert_bias.clone()
    ours(torch.randint(0, 96, (2, 16))).sum().backward()
    assert ours.layers[1].mlp.router.gate.weight.grad is not None
    update_routers(ours)
    after = ours.layers[1].mlp.router.expert_bias
    assert torch.equal(after, before) == (rate == 0.0)
    exported = glm4_moe_tune_to_hf(ours.state_dict(), config)["model.layers.1.mlp.gate.e_score_correction_bias"]
    torch.testing.assert_close(exported, after)


def test_in_memory_conversion_round_trip(tmp_path):
    hf, path = _save_with_bias(tmp_path, **BASE, use_qk_norm=True, attention_bias=True)
    config = json.loads((path / "config.json").read_text())
    from safetensors.torch import load_file

    hf_sd = load_file(str(path / "model.safetensors"))
    ours = glm4_moe_hf_to_tune(hf_sd, config)
    torch.testing.assert_close(ours["layers.1.mlp.router.expert_bias"], hf_sd["model.layers.1.mlp.gate.e_score_correction_bias"])
    back = glm4_moe_tune_to_hf(ours, config)
    assert set(back) == set(hf_sd)
    for k, v in hf_sd.items():
        torch.testing.assert_close(back[k], v)
    model = build_from_hf_config(config, device="cpu")
    model.load_state_dict(ours, strict=True)
    compare(hf, model.eval())


def test_multi_token_prediction_layer_is_ignored(tmp_path):
    """Hub checkpoints carry the MTP module as layer num_hidden_layers: loading skips it, as transformers does."""
    from safetensors.torch import load_file, save_file

    hf, path = _save_with_bias(tmp_path, **BASE)
    sd = load_file(str(path / "model.safetensors"))
    sd["model.layers.3.eh_proj.weight"] = torch.randn(32, 64)
    sd["model.layers.3.mlp.experts.0.gate_proj.weight"] = torch.randn(16, 32)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    load_and_compare(hf, path)


# config.json of zai-org/GLM-4.5 and zai-org/GLM-4.5-Air as published on the Hub.
HUB_GLM4_5 = {
    "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "pad_token_id": 151329,
    "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": 12288,
    "max_position_embeddings": 131072, "model_type": "glm4_moe", "moe_intermediate_size": 1536,
    "norm_topk_prob": True, "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 160,
    "n_shared_experts": 1, "routed_scaling_factor": 2.5, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "num_hidden_layers": 92, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 1000000, "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0", "use_cache": True, "use_qk_norm": True, "vocab_size": 151552,
}
HUB_GLM4_5_AIR = {
    **HUB_GLM4_5, "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "n_routed_experts": 128, "routed_scaling_factor": 1.0, "first_k_dense_replace": 1, "num_hidden_layers": 46,
    "use_qk_norm": False,
}


@pytest.mark.parametrize(
    "builder, hub, published, total_b, active_b",
    [
        # 352.8B without the multi-token-prediction layer (the published 355B counts it); 33.6B active with
        # both embedding tables (the published 32B leaves the input embedding out).
        (glm4_5_355b_a32b, HUB_GLM4_5, GLM4_5, 352.8, 33.6),
        (glm4_5_air_106b_a12b, HUB_GLM4_5_AIR, GLM4_5_AIR, 106.9, 13.4),
    ],
)
def test_published_sizes_build_on_meta_and_match_hub_configs(builder, hub, published, total_b, active_b):
    """Too big for any machine here: built on the meta device, checked against the Hub config and the
    published parameter counts."""
    assert {k: v for k, v in hub.items() if k in published} == published
    with torch.device("meta"):
        model = builder()
    assert describe(model) == describe(build_from_hf_config(hub))
    total, active = param_counts(model)
    assert total / 1e9 == pytest.approx(total_b, abs=0.05) and active / 1e9 == pytest.approx(active_b, abs=0.05)
    first = model.layers[0]
    assert first.attn.pos_embeddings.rotary_dim == 64 and not hasattr(first.mlp, "router")
    assert {layer.router.route_scale for _, layer in moe_layers(model)} == {hub["routed_scaling_factor"]}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
        ({"first_k_dense_replace": 92}, "first_k_dense_replace"),
        ({"n_group": 3}, "n_group"),
        ({"some_new_option": 1}, "some_new_option"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        glm4_moe_hf_config_to_kwargs({**HUB_GLM4_5, **change})


def test_tokenizer_round_trip(tmp_path):
    from tokenizer_files import write_qwen_tokenizer

    from torchtune.data import Message
    from torchtune_moe.models.glm4_moe import glm4_moe_tokenizer

    files = write_qwen_tokenizer(tmp_path, extra_special=["[gMASK]", "<sop>", "<|user|>", "<|assistant|>"])
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    )
    tok = glm4_moe_tokenizer(
        str(files["tokenizer_json"]), tokenizer_config_path=str(tmp_path / "tokenizer_config.json"), max_seq_len=64
    )
    eos = files["special"]["<|endoftext|>"]
    assert tok.bos_id is None and tok.eos_id == eos and tok.pad_id == eos
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(files["tokenizer_json"]))
    text = "hello world, the tokens"
    assert tok.encode(text, add_bos=True, add_eos=False) == hf.encode(text, add_special_tokens=False)
    assert tok.encode("<|user|>hi", add_bos=False, add_eos=False)[0] == files["special"]["<|user|>"]
    tokens, mask = tok.tokenize_messages(
        [Message(role="user", content="hello", masked=True), Message(role="assistant", content="world")]
    )
    assert tokens[-1] == eos and mask[0] and not mask[-2]


@pytest.mark.parametrize("name, total_b", [("glm4_moe/355b_a32b_full", 352.8), ("glm4_moe/air_106b_a12b_full", 106.9)])
def test_packaged_config_validates_and_builds_on_meta(name, total_b):
    """The packaged config passes the recipe's validation and its model builds on the meta device (no machine here
    holds it) with the published parameter count."""
    from moe_full_finetune import CONFIG_SPEC
    from torchtune import config as tt_config

    from torchtune_moe.config import load_config, validate_config

    cfg = load_config(name)
    validate_config(cfg, CONFIG_SPEC)
    with torch.device("meta"):
        model = tt_config.instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(total_b, abs=0.05)
