"""DeepSeek-V3 against transformers: logits (multi-head latent attention with and without a query latent,
interleaved and rotate-half RoPE, YaRN RoPE with its mscale softmax scale, sigmoid group-limited routing with the
checkpoint's ``e_score_correction_bias``, routed scaling factor, shared experts, first-k dense layers), both
conversion directions, the checkpointer round trip, the 671B model on the meta device, config checks, tokenizer."""

import json

import pytest
import torch

from hf_testing import checkpointer_round_trip, compare, describe, load_and_compare, param_counts, save_tiny_hf

transformers = pytest.importorskip("transformers")

from torchtune_moe.models import build_from_hf_config  # noqa: E402
from torchtune_moe.models.deepseek_v3 import (  # noqa: E402
    DEEPSEEK_V3,
    MOONLIGHT_16B_A3B,
    deepseek_v3_671b,
    deepseek_v3_hf_config_to_kwargs,
    deepseek_v3_hf_to_tune,
    deepseek_v3_tune_to_hf,
    moonlight_16b_a3b,
)
from torchtune_moe.modules import moe_layers  # noqa: E402
from torchtune_moe.modules.attention import MultiHeadLatentAttention  # noqa: E402
from torchtune_moe.training import from_hf_pretrained  # noqa: E402

BASE = dict(
    intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
    num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
    first_k_dense_replace=1, n_group=4, topk_group=2,
)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 0.7,
        "beta_fast": 32, "beta_slow": 1}

VARIANTS = {
    # DeepSeek-V3's shape: query latent, YaRN (cos/sin scaled by mscale/mscale_all_dim, softmax by mscale_all_dim^2),
    # interleaved RoPE, 4 groups of 2 experts (best 2), 2 shared experts, routed scale 2.5
    "v3_q_latent_yarn_groups": dict(q_lora_rank=24, n_shared_experts=2, routed_scaling_factor=2.5, rope_scaling=YARN),
    # Moonlight's shape: no query latent, no group limit; plus rotate-half RoPE, biases, no renormalisation, no
    # dense layer, tied embeddings
    "direct_q_rotate_half_bias": dict(
        q_lora_rank=None, rope_interleave=False, attention_bias=True, n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.7, first_k_dense_replace=0, tie_word_embeddings=True, rope_theta=50000.0,
    ),
}


def _save_with_bias(path, **kw):
    """A tiny model whose routers have a non-zero ``e_score_correction_bias`` (zeros would not test it)."""
    hf, path = save_tiny_hf(transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, path, **kw)
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
    assert all(isinstance(layer.attn, MultiHeadLatentAttention) for layer in ours.layers)
    assert all(m.router.expert_bias.abs().sum() > 0 for _, m in moe_layers(ours))
    checkpointer_round_trip(hf, path, tmp_path / "out")


def test_bias_route_scale_and_yarn_matter(tmp_path):
    """The comparison would fail without the bias, the routed scaling factor or YaRN's scales."""
    hf, path = _save_with_bias(tmp_path, **BASE, q_lora_rank=24, routed_scaling_factor=2.5, rope_scaling=YARN)
    tokens = torch.randint(0, 96, (2, 16))
    for change in ("expert_bias", "route_scale", "softmax_scale"):
        ours = from_hf_pretrained(path)
        with torch.no_grad():
            for _, layer in moe_layers(ours):
                if change == "expert_bias":
                    layer.router.expert_bias.zero_()
                elif change == "route_scale":
                    layer.router.route_scale = 1.0
            if change == "softmax_scale":
                for layer in ours.layers:
                    layer.attn.softmax_scale = layer.attn.qk_head_dim**-0.5
            diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
        assert diff > 2e-4, (change, diff)  # the comparison allows 1e-4


def test_in_memory_conversion_round_trip(tmp_path):
    hf, path = _save_with_bias(tmp_path, **BASE, q_lora_rank=24)
    config = json.loads((path / "config.json").read_text())
    from safetensors.torch import load_file

    hf_sd = load_file(str(path / "model.safetensors"))
    ours = deepseek_v3_hf_to_tune(hf_sd, config)
    torch.testing.assert_close(ours["layers.1.attn.kv_a_proj.weight"], hf_sd["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"])
    torch.testing.assert_close(ours["layers.2.mlp.router.expert_bias"], hf_sd["model.layers.2.mlp.gate.e_score_correction_bias"])
    back = deepseek_v3_tune_to_hf(ours, config)
    assert set(back) == set(hf_sd)
    for k, v in hf_sd.items():
        torch.testing.assert_close(back[k], v)
    model = build_from_hf_config(config, device="cpu")
    model.load_state_dict(ours, strict=True)
    compare(hf, model.eval())


def test_mla_packed_mask_equals_separate_sequences():
    """A block-causal boolean mask with per-sample positions (packed samples) gives each sample the output it has
    alone: MLA takes torchtune's masks and ``input_pos`` as MultiHeadAttention does."""
    torch.manual_seed(0)
    model = build_from_hf_config(
        {"architectures": ["DeepseekV3ForCausalLM"], **{k: v for k, v in BASE.items()}, "q_lora_rank": 24,
         "vocab_size": 96, "hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 64},
        device="cpu",
    )
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model.eval()
    a, b = torch.randint(0, 96, (1, 5)), torch.randint(0, 96, (1, 7))
    packed = torch.cat([a, b], dim=1)
    mask = torch.zeros(1, 12, 12, dtype=torch.bool)
    mask[0, :5, :5] = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    mask[0, 5:, 5:] = torch.tril(torch.ones(7, 7, dtype=torch.bool))
    pos = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        out = model(packed, mask=mask, input_pos=pos)
        torch.testing.assert_close(out[:, :5], model(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 5:], model(b), atol=1e-5, rtol=0)


# config.json of deepseek-ai/DeepSeek-V3 (bf16 conversion: the Hub files are FP8) and moonshotai/Moonlight-16B-A3B.
HUB_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
    "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}, "rope_theta": 10000,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
HUB_MOONLIGHT = {
    **HUB_DEEPSEEK_V3, "vocab_size": 163840, "hidden_size": 2048, "intermediate_size": 11264,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 2.446, "q_lora_rank": None, "n_group": 1,
    "topk_group": 1, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05, "bos_token_id": 163584, "eos_token_id": 163585, "rope_theta": 50000.0,
    "rope_scaling": None, "transformers_version": "4.47.0",
}
del HUB_MOONLIGHT["num_nextn_predict_layers"]


@pytest.mark.parametrize(
    "builder, hub, published, total_b, active_b",
    [
        # 671B and 37B as published (the multi-token-prediction layer, 14B more, is not part of that figure)
        (deepseek_v3_671b, HUB_DEEPSEEK_V3, DEEPSEEK_V3, 671.0, 37.6),
        (moonlight_16b_a3b, HUB_MOONLIGHT, MOONLIGHT_16B_A3B, 16.0, 2.9),
    ],
)
def test_published_sizes_build_on_meta_and_match_hub_configs(builder, hub, published, total_b, active_b):
    """The 671B model needs far more memory than any machine here: built on the meta device, checked against the
    Hub config and the published parameter counts."""
    assert {k: v for k, v in hub.items() if k in published} == published
    with torch.device("meta"):
        model = builder()
    assert describe_mla(model) == describe_mla(build_from_hf_config(hub))
    total, active = param_counts(model)
    assert total / 1e9 == pytest.approx(total_b, abs=0.05) and active / 1e9 == pytest.approx(active_b, abs=0.05)
    assert not hasattr(model.layers[hub["first_k_dense_replace"] - 1].mlp, "router")


def describe_mla(model) -> dict:
    attn = model.layers[0].attn
    return {
        "shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()},
        "softmax_scale": attn.softmax_scale,
        "rope": (type(attn.pos_embeddings).__name__, attn.pos_embeddings.base, getattr(attn.pos_embeddings, "factor", None)),
        "route_scale": {m.router.route_scale for _, m in moe_layers(model)},
        "groups": {(m.router.num_expert_groups, m.router.num_limited_groups) for _, m in moe_layers(model)},
        "max_seq_len": model.max_seq_len,
    }


def test_v3_softmax_scale_has_yarn_mscale():
    kwargs = deepseek_v3_hf_config_to_kwargs(HUB_DEEPSEEK_V3, max_seq_len=256)
    assert kwargs["yarn"]["factor"] == 40 and kwargs["yarn"]["original_max_seq_len"] == 4096
    with torch.device("meta"):
        model = deepseek_v3_671b(max_seq_len=256)
    mscale = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert model.layers[0].attn.softmax_scale == pytest.approx(192**-0.5 * mscale**2)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"type": "dynamic", "factor": 4.0}}, "rope_parameters"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"topk_method": "greedy"}, "topk_method"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
        ({"num_key_value_heads": 8}, "num_key_value_heads"),
        ({"first_k_dense_replace": 61}, "first_k_dense_replace"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ({"some_new_option": 1}, "some_new_option"),
    ],
)
def test_unsupported_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        deepseek_v3_hf_config_to_kwargs({**HUB_DEEPSEEK_V3, **change})


def test_tokenizer_round_trip(tmp_path):
    from tokenizer_files import write_qwen_tokenizer

    from torchtune.data import Message
    from torchtune_moe.models.deepseek_v3 import deepseek_v3_tokenizer

    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    files = write_qwen_tokenizer(tmp_path, extra_special=[bos, eos, "<｜User｜>", "<｜Assistant｜>"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos}))
    tok = deepseek_v3_tokenizer(
        str(files["tokenizer_json"]), tokenizer_config_path=str(tmp_path / "tokenizer_config.json"), max_seq_len=64
    )
    assert tok.bos_id == files["special"][bos] and tok.eos_id == files["special"][eos]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(files["tokenizer_json"]))
    text = "hello world, the tokens"
    assert tok.encode(text, add_bos=True, add_eos=True) == [tok.bos_id] + hf.encode(text, add_special_tokens=False) + [tok.eos_id]
    tokens, mask = tok.tokenize_messages(
        [Message(role="user", content="hello", masked=True), Message(role="assistant", content="world")]
    )
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id and mask[0] and not mask[-2]


@pytest.mark.parametrize(
    "name, total_b",
    [("deepseek_v3/671b_full", 671.0), ("deepseek_v3/moonlight_16b_a3b_full", 16.0), ("deepseek_v2/lite_16b_full", 15.7)],
)
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


# DeepSeek-V2 (model_type deepseek_v2): the same network with softmax routing and no selection bias.
V2_YARN = {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}


@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (2, 1)])
def test_deepseek_v2_matches_transformers_and_round_trips(tmp_path, n_group, topk_group):
    """topk_method greedy (transformers' default for V2) takes the top-k of all experts: n_group / topk_group
    other than 1 must not limit the routing."""
    hf, path = save_tiny_hf(
        transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, tmp_path / "hf",
        **{**BASE, "n_group": n_group, "topk_group": topk_group, "q_lora_rank": None, "routed_scaling_factor": 1.5,
           "rope_scaling": V2_YARN},
    )
    ours = load_and_compare(hf, path)
    assert {(m.router.score_func, m.router.expert_bias) for _, m in moe_layers(ours)} == {("softmax", None)}
    checkpointer_round_trip(hf, path, tmp_path / "out")


HUB_DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "ep_size": 1, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
    "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


def test_deepseek_v2_lite_builds_on_meta_and_matches_hub_config():
    from torchtune_moe.models.deepseek_v2 import DEEPSEEK_V2_LITE, deepseek_v2_lite

    assert {k: v for k, v in HUB_DEEPSEEK_V2_LITE.items() if k in DEEPSEEK_V2_LITE} == DEEPSEEK_V2_LITE
    with torch.device("meta"):
        model = deepseek_v2_lite()
    assert describe_mla(model) == describe_mla(build_from_hf_config(HUB_DEEPSEEK_V2_LITE))
    total, active = param_counts(model)
    assert total / 1e9 == pytest.approx(15.7, abs=0.05) and active / 1e9 == pytest.approx(2.66, abs=0.05)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3}, "topk_method"),
        ({"norm_topk_prob": True}, "norm_topk_prob"),
        ({"scoring_func": "sigmoid"}, "scoring_func"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_deepseek_v2_unsupported_options_are_refused(change, message):
    from torchtune_moe.models.deepseek_v2 import deepseek_v2_hf_config_to_kwargs

    with pytest.raises(ValueError, match=message):
        deepseek_v2_hf_config_to_kwargs({**HUB_DEEPSEEK_V2_LITE, **change})
