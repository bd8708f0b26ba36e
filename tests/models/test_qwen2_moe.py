"""Qwen2-MoE against transformers: logits, loss, aux loss, checkpointer round trip, config options, tokenizer."""

import pytest
import torch

from hf_testing import checkpointer_round_trip, describe, load_and_compare, save_tiny_hf, single_moe_layer_aux_loss

transformers = pytest.importorskip("transformers")

from torchtune_moe.training import from_hf_pretrained  # noqa: E402
from torchtune_moe.models import build_from_hf_config  # noqa: E402
from torchtune_moe.models.qwen2_moe import (  # noqa: E402
    qwen1_5_moe_a2_7b,
    qwen2_moe_57b_a14b,
    qwen2_moe_hf_config_to_kwargs,
)

BASE = dict(
    intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_hidden_layers=3,
    num_experts=8, num_experts_per_tok=2,
)

VARIANTS = {
    # mlp_only_layers and decoder_sparse_step 2 together: layers 1 and 3 are MoE, 3 is made dense -> only 1
    "dense_layers_norm_topk": dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True),
    # published defaults: q/k/v biases, no renormalisation, MHA
    "defaults_mha": dict(num_key_value_heads=4, norm_topk_prob=False),
    # no q/k/v bias, tied embeddings, GQA, sliding window that covers the whole sequence
    "no_bias_tied_window": dict(qkv_bias=False, tie_word_embeddings=True, use_sliding_window=True, sliding_window=64),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_transformers_and_round_trips(tmp_path, variant):
    kw = {**BASE, **VARIANTS[variant]}
    hf, path = save_tiny_hf(transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, tmp_path / "hf", **kw)
    ours = load_and_compare(hf, path)
    if variant == "dense_layers_norm_topk":
        assert [i for i, layer in enumerate(ours.layers) if hasattr(layer.mlp, "router")] == [1]
    checkpointer_round_trip(hf, path, tmp_path / "out")


def test_aux_loss_reproduces_router_aux_loss_coef(tmp_path):
    hf, path = save_tiny_hf(
        transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, tmp_path,
        **{**BASE, "num_hidden_layers": 2, "decoder_sparse_step": 2, "router_aux_loss_coef": 0.2},
    )
    single_moe_layer_aux_loss(hf, from_hf_pretrained(tmp_path))


def test_sliding_window_shorter_than_sequences_is_refused(tmp_path):
    hf, path = save_tiny_hf(
        transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, tmp_path,
        **{**BASE, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 3},
    )
    with pytest.raises(ValueError, match="max_seq_len <= 16"):
        from_hf_pretrained(path)
    # Exact for sequences up to the window (the comparison uses 16 tokens).
    load_and_compare(hf, path, max_seq_len=16)


# config.json of Qwen/Qwen1.5-MoE-A2.7B and Qwen/Qwen2-57B-A14B as published on the Hub.
QWEN1_5_MOE_A2_7B = {
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 5632, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2_moe",
    "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False, "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}
QWEN2_57B_A14B = {
    **QWEN1_5_MOE_A2_7B, "hidden_size": 3584, "intermediate_size": 18944, "max_position_embeddings": 131072,
    "max_window_layers": 28, "moe_intermediate_size": 2560, "num_attention_heads": 28, "num_experts": 64,
    "num_experts_per_tok": 8, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "shared_expert_intermediate_size": 20480, "sliding_window": 131072,
}


@pytest.mark.parametrize("builder, config", [(qwen1_5_moe_a2_7b, QWEN1_5_MOE_A2_7B), (qwen2_moe_57b_a14b, QWEN2_57B_A14B)])
def test_published_sizes_match_hub_configs(builder, config):
    with torch.device("meta"):
        published = builder()
    assert describe(published) == describe(build_from_hf_config(config))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
        ({"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size"),
        ({"num_experts": 0}, "num_experts"),
        ({"use_mrope": True}, "use_mrope"),
        ({"layer_types": ["sliding_attention"] * 24}, "layer_types"),
        ({"mlp_only_layers": [30]}, "mlp_only_layers"),
    ],
)
def test_unsupported_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        qwen2_moe_hf_config_to_kwargs({**QWEN1_5_MOE_A2_7B, **change})


def test_tokenizer_round_trip(tmp_path):
    from tokenizer_files import write_qwen_tokenizer

    from torchtune.data import Message
    from torchtune_moe.models.qwen2_moe import qwen2_moe_tokenizer

    files = write_qwen_tokenizer(tmp_path)
    tok = qwen2_moe_tokenizer(str(files["vocab"]), str(files["merges"]), special_tokens_path=str(files["tokenizer_json"]))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(files["tokenizer_json"]))
    text = "the quick brown fox, 1234 tokens\n\n  and spaces"
    ids = tok.encode(text, add_bos=False, add_eos=False)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    tokens, mask = tok.tokenize_messages([Message(role="user", content="hi", masked=True), Message(role="assistant", content="yo")])
    assert tok.decode(tokens) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>"
    assert mask[:3] == [True] * 3 and mask[-1] is False


TINY_QWEN2 = dict(
    vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, num_experts=4, experts_per_token=2,
    max_seq_len=16, mlp_only_layers=[0],
)


def test_old_hidden_size_names_still_build_with_a_warning():
    from torchtune_moe.models.qwen2_moe import qwen2_moe

    new = qwen2_moe(**TINY_QWEN2, dense_hidden_dim=48, moe_hidden_dim=16, shared_expert_hidden_dim=24)
    with pytest.warns(FutureWarning, match="'shared_expert_intermediate_dim' is deprecated, use 'shared_expert_hidden_dim'"):
        old = qwen2_moe(**TINY_QWEN2, intermediate_dim=48, moe_intermediate_dim=16, shared_expert_intermediate_dim=24)
    assert {k: v.shape for k, v in old.state_dict().items()} == {k: v.shape for k, v in new.state_dict().items()}


def test_family_model_refuses_forward_misuse():
    from torchtune_moe.models.qwen2_moe import qwen2_moe

    model = qwen2_moe(**TINY_QWEN2, dense_hidden_dim=48, moe_hidden_dim=16, shared_expert_hidden_dim=24)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\).*from 0 to 64"):
        model(torch.tensor([[0, 64]]))
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"empty: shape \[1, 0\]"):
        model(torch.zeros(1, 0, dtype=torch.long))
    assert model(torch.tensor([[0, 63]])).shape == (1, 2, 64)
