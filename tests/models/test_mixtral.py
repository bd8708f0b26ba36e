"""Mixtral against transformers: logits, loss, aux loss, checkpointer round trip, config options, tokenizer."""

import pytest
import torch

from hf_testing import checkpointer_round_trip, describe, load_and_compare, save_tiny_hf, single_moe_layer_aux_loss

transformers = pytest.importorskip("transformers")

from torchtune_moe.training import from_hf_pretrained  # noqa: E402
from torchtune_moe.models import build_from_hf_config  # noqa: E402
from torchtune_moe.models.mixtral import mixtral_8x22b, mixtral_8x7b, mixtral_hf_config_to_kwargs  # noqa: E402

BASE = dict(intermediate_size=16, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)

VARIANTS = {
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    # explicit head_dim != hidden / heads (as Mistral-NeMo style configs have), top-1 (weight 1), other rope base
    "head_dim_top1": dict(head_dim=16, num_experts_per_tok=1, rope_theta=10000.0),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_transformers_and_round_trips(tmp_path, variant):
    hf, path = save_tiny_hf(
        transformers.MixtralConfig, transformers.MixtralForCausalLM, tmp_path / "hf", **{**BASE, **VARIANTS[variant]}
    )
    load_and_compare(hf, path)
    saved = checkpointer_round_trip(hf, path, tmp_path / "out")
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in (saved / "model.safetensors.index.json").read_text()


def test_aux_loss_reproduces_router_aux_loss_coef(tmp_path):
    hf, path = save_tiny_hf(
        transformers.MixtralConfig, transformers.MixtralForCausalLM, tmp_path,
        **{**BASE, "num_hidden_layers": 1, "router_aux_loss_coef": 0.02},
    )
    single_moe_layer_aux_loss(hf, from_hf_pretrained(tmp_path))


def test_sliding_window(tmp_path):
    hf, path = save_tiny_hf(
        transformers.MixtralConfig, transformers.MixtralForCausalLM, tmp_path, **{**BASE, "sliding_window": 16}
    )
    with pytest.raises(ValueError, match="sliding-window attention"):
        from_hf_pretrained(path)
    load_and_compare(hf, path, max_seq_len=16)


# config.json of mistralai/Mixtral-8x7B-v0.1 and mistralai/Mixtral-8x22B-v0.1 as published on the Hub.
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
    "use_cache": True, "vocab_size": 32000,
}
MIXTRAL_8X22B = {
    **MIXTRAL_8X7B, "hidden_size": 6144, "intermediate_size": 16384, "max_position_embeddings": 65536,
    "num_attention_heads": 48, "num_hidden_layers": 56, "router_aux_loss_coef": 0.001,
}


@pytest.mark.parametrize("builder, config", [(mixtral_8x7b, MIXTRAL_8X7B), (mixtral_8x22b, MIXTRAL_8X22B)])
def test_published_sizes_match_hub_configs(builder, config):
    with torch.device("meta"):
        published = builder()
    assert describe(published) == describe(build_from_hf_config(config))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"router_jitter_noise": 0.1}, "router_jitter_noise"),
        ({"sliding_window": 4096}, "max_seq_len <= 4096"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope type 'llama3'"),
        ({"hidden_act": "gelu_fast"}, "hidden_act"),
        ({"num_key_value_heads": 5}, "num_kv_heads"),
    ],
)
def test_unsupported_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        build_from_hf_config({**MIXTRAL_8X7B, **change})


def test_tokenizer_round_trip(tmp_path):
    from tokenizer_files import write_sentencepiece_model

    from torchtune.data import Message
    from torchtune_moe.models.mixtral import mixtral_tokenizer

    path = write_sentencepiece_model(tmp_path)
    tok = mixtral_tokenizer(str(path), max_seq_len=12)
    text = "the quick brown fox jumps"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == text
    messages = [Message(role="user", content="hello world", masked=True), Message(role="assistant", content="the lazy dog " * 4)]
    tokens, mask = mixtral_tokenizer(str(path))(dict(messages=messages)).values()
    assert "[INST]" in tok.decode(tokens) and tokens[-1] == 2 and len(tokens) == len(mask) > 12
    short, short_mask = tok.tokenize_messages(messages)
    assert len(short) == len(short_mask) == 12 and short[-1] == 2  # truncated to max_seq_len, EOS kept


def test_num_experts_alias():
    """transformers maps config.json's num_experts to num_local_experts (attribute_map); so do we."""
    config = {k: v for k, v in MIXTRAL_8X7B.items() if k != "num_local_experts"}
    assert mixtral_hf_config_to_kwargs({**config, "num_experts": 4})["num_experts"] == 4
    with pytest.raises(ValueError, match="both num_local_experts=8 and num_experts=4"):
        mixtral_hf_config_to_kwargs({**MIXTRAL_8X7B, "num_experts": 4})
