"""OLMoE against transformers: logits, loss, aux loss, checkpointer round trip, config options, tokenizer."""

import pytest
import torch

from hf_testing import checkpointer_round_trip, describe, load_and_compare, save_tiny_hf, single_moe_layer_aux_loss

transformers = pytest.importorskip("transformers")

from torchtune_moe.training import from_hf_pretrained  # noqa: E402
from torchtune_moe.models import build_from_hf_config  # noqa: E402
from torchtune_moe.models.olmoe import olmoe_1b_7b, olmoe_hf_config_to_kwargs  # noqa: E402

BASE = dict(intermediate_size=16, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, eos_token_id=95)

VARIANTS = {
    # clip_qkv small enough to clamp many values, renormalised top-k, GQA
    "clip_norm_topk": dict(clip_qkv=0.5, norm_topk_prob=True),
    # published defaults (no clip, no renormalisation), MHA
    "defaults_mha": dict(num_key_value_heads=4),
    # biases on q, k, v and output projection, tied embeddings
    "bias_tied": dict(attention_bias=True, tie_word_embeddings=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_transformers_and_round_trips(tmp_path, variant):
    hf, path = save_tiny_hf(
        transformers.OlmoeConfig, transformers.OlmoeForCausalLM, tmp_path / "hf", **{**BASE, **VARIANTS[variant]}
    )
    ours = load_and_compare(hf, path)
    assert ours.tok_embeddings.padding_idx == 1  # OLMoE's pad_token_id: no gradient for that row, as in HF
    checkpointer_round_trip(hf, path, tmp_path / "out")


def test_aux_loss_reproduces_router_aux_loss_coef(tmp_path):
    hf, path = save_tiny_hf(
        transformers.OlmoeConfig, transformers.OlmoeForCausalLM, tmp_path, **{**BASE, "num_hidden_layers": 1}
    )
    single_moe_layer_aux_loss(hf, from_hf_pretrained(tmp_path))


# config.json of allenai/OLMoE-1B-7B-0924 as published on the Hub.
OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
    "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 50304,
}


def test_published_size_matches_hub_config():
    with torch.device("meta"):
        published = olmoe_1b_7b()
    assert describe(published) == describe(build_from_hf_config(OLMOE_1B_7B))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"head_dim": 64}, "head_dim"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear'"),
        ({"sliding_window": 1024}, "sliding_window"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        olmoe_hf_config_to_kwargs({**OLMOE_1B_7B, **change})


def test_tokenizer_round_trip(tmp_path):
    from tokenizer_files import write_olmoe_tokenizer

    from torchtune.data import Message
    from torchtune_moe.models.olmoe import olmoe_tokenizer

    files = write_olmoe_tokenizer(tmp_path)
    tok = olmoe_tokenizer(
        str(files["tokenizer_json"]), tokenizer_config_path=str(files["tokenizer_config"]),
        generation_config_path=str(files["generation_config"]), max_seq_len=10,
    )
    assert tok.bos_id is None and tok.eos_id == files["eos"] and tok.pad_id == files["pad"]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(files["tokenizer_json"]))
    text = "hello world, the quick brown fox"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids == hf.encode(text, add_special_tokens=False) + [files["eos"]]  # no BOS: OLMo has none
    assert tok.decode(ids[:-1]) == text
    messages = [Message(role="user", content="hello ", masked=True), Message(role="assistant", content="the lazy dog " * 3)]
    tokens, mask = tok.tokenize_messages(messages)
    assert len(tokens) == len(mask) == 10 and tokens[-1] == files["eos"] and mask[0] and not mask[-2]
