"""Qwen3-MoE against transformers: logits, loss, aux loss, checkpointer round trip, config options, tokenizer."""

import json

import pytest
import torch

from hf_testing import (
    checkpointer_round_trip,
    compare,
    describe,
    load_and_compare,
    save_tiny_hf,
    single_moe_layer_aux_loss,
)

transformers = pytest.importorskip("transformers")

from torchtune_moe.training import from_hf_pretrained  # noqa: E402
from torchtune_moe.models import build_from_hf_config  # noqa: E402
from torchtune_moe.models.qwen3_moe import (  # noqa: E402
    qwen3_moe_235b_a22b,
    qwen3_moe_30b_a3b,
    qwen3_moe_hf_config_to_kwargs,
    qwen3_moe_hf_to_tune,
    qwen3_moe_tune_to_hf,
)

BASE = dict(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2)

VARIANTS = {
    # head_dim 16 != hidden 32 / 4 heads, first layer dense, renormalised top-k
    "head_dim_dense_first_norm_topk": dict(head_dim=16, mlp_only_layers=[0], norm_topk_prob=True),
    # decoder_sparse_step 2 (layers 1 and 3 MoE), no renormalisation, biases on q/k/v/o, tied embeddings
    "sparse_step_bias_tied": dict(
        num_hidden_layers=4, decoder_sparse_step=2, norm_topk_prob=False, attention_bias=True, tie_word_embeddings=True
    ),
    # multi-head (no GQA), top-1 with renormalisation (weight 1), another rope base
    "mha_top1": dict(num_key_value_heads=4, num_experts_per_tok=1, norm_topk_prob=True, rope_theta=1e6),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_transformers_and_round_trips(tmp_path, variant):
    kw = {**BASE, **VARIANTS[variant]}
    hf, path = save_tiny_hf(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, tmp_path / "hf", **kw)
    load_and_compare(hf, path)
    checkpointer_round_trip(hf, path, tmp_path / "out")


def test_aux_loss_reproduces_router_aux_loss_coef(tmp_path):
    hf, path = save_tiny_hf(
        transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, tmp_path,
        **{**BASE, "num_hidden_layers": 2, "mlp_only_layers": [0], "router_aux_loss_coef": 0.3},
    )
    single_moe_layer_aux_loss(hf, from_hf_pretrained(tmp_path))


def test_in_memory_conversion_round_trip(tmp_path):
    hf, path = save_tiny_hf(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, tmp_path, **BASE)
    config = json.loads((path / "config.json").read_text())
    # transformers 5 fuses the experts in memory: the published per-expert form is the one in the file
    from safetensors.torch import load_file

    hf_sd = load_file(str(path / "model.safetensors"))
    ours = qwen3_moe_hf_to_tune(hf_sd, config)
    assert ours["layers.1.mlp.experts.gate_up_proj"].shape == (8, 32, 32)
    torch.testing.assert_close(ours["layers.1.mlp.experts.gate_up_proj"][3, :16], hf_sd["model.layers.1.mlp.experts.3.gate_proj.weight"])
    torch.testing.assert_close(ours["layers.1.mlp.experts.gate_up_proj"][3, 16:], hf_sd["model.layers.1.mlp.experts.3.up_proj.weight"])
    back = qwen3_moe_tune_to_hf(ours, config)
    assert set(back) == set(hf_sd)
    for k, v in hf_sd.items():
        torch.testing.assert_close(back[k], v)
    model = build_from_hf_config(config, device="cpu")
    model.load_state_dict(ours, strict=True)
    compare(hf, model.eval())


# config.json of Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B as published on the Hub.
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_235B_A22B = {
    **QWEN3_30B_A3B, "hidden_size": 4096, "intermediate_size": 12288, "max_window_layers": 94,
    "moe_intermediate_size": 1536, "num_attention_heads": 64, "num_hidden_layers": 94,
}


@pytest.mark.parametrize("builder, config", [(qwen3_moe_30b_a3b, QWEN3_30B_A3B), (qwen3_moe_235b_a22b, QWEN3_235B_A22B)])
def test_published_sizes_match_hub_configs(builder, config):
    with torch.device("meta"):
        published = builder()
    assert describe(published) == describe(build_from_hf_config(config))
    assert qwen3_moe_hf_config_to_kwargs(config)["aux_loss_coeff"] == pytest.approx(0.001 * 8 / config["num_hidden_layers"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        ({"use_sliding_window": True, "sliding_window": 4096}, "max_seq_len <= 4096"),
        ({"hidden_act": "tanh"}, "hidden_act"),
        ({"mlp_only_layers": list(range(48))}, "no MoE layer"),
        ({"some_new_option": 1}, "some_new_option"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ({"num_experts": "128"}, "num_experts"),
    ],
)
def test_unsupported_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        qwen3_moe_hf_config_to_kwargs({**QWEN3_30B_A3B, **change})


def test_sliding_window_accepted_when_max_seq_len_fits():
    kwargs = qwen3_moe_hf_config_to_kwargs({**QWEN3_30B_A3B, "use_sliding_window": True, "sliding_window": 4096}, max_seq_len=4096)
    assert kwargs["max_seq_len"] == 4096


def test_tokenizer_round_trip(tmp_path):
    from tokenizer_files import write_qwen_tokenizer

    from torchtune.data import Message
    from torchtune_moe.models.qwen3_moe import qwen3_moe_tokenizer

    files = write_qwen_tokenizer(tmp_path, extra_special=["<think>", "</think>"])
    tok = qwen3_moe_tokenizer(str(files["vocab"]), str(files["merges"]), special_tokens_path=str(files["tokenizer_json"]), max_seq_len=64)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(files["tokenizer_json"]))
    for text in ["hello world, the tokens", "  spaces\tand\nnewlines 123"]:
        ids = tok.encode(text, add_bos=False, add_eos=False)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    think = files["special"]["<think>"]
    assert tok.encode("<think>hi</think>", add_bos=False, add_eos=False)[0] == think
    tokens, mask = tok.tokenize_messages(
        [Message(role="user", content="hello", masked=True), Message(role="assistant", content="world")]
    )
    assert tokens[0] == files["special"]["<|im_start|>"] and tokens[-1] == files["special"]["<|im_end|>"]
    assert mask[0] and not mask[-2]
    assert tok.decode(tokens) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nworld<|im_end|>"


def test_pooled_aux_loss_matches_transformers_with_several_moe_layers(tmp_path):
    """``aux_loss_pooled=True`` reproduces transformers' ``load_balancing_loss_func`` (pooled over layers) on a
    model with 4 MoE layers and sharpened routers; the default per-layer loss differs there by design
    (docs/routers_and_losses.md)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from torchtune_moe.modules import collect_aux_loss

    hf, path = save_tiny_hf(
        transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, tmp_path,
        **{**BASE, "num_hidden_layers": 4, "router_aux_loss_coef": 0.3, "norm_topk_prob": True},
    )
    with torch.no_grad():  # sharpen the routers: opposite imbalances in different layers
        for layer in hf.model.layers:
            layer.mlp.gate.weight.mul_(8.0)
    hf.save_pretrained(path)
    torch.manual_seed(2)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 16))
    out = hf.train()(tokens, output_router_logits=True)
    expected = 0.3 * load_balancing_loss_func(out.router_logits, 8, 2)
    torch.testing.assert_close(0.3 * out.aux_loss, expected)
    pooled = from_hf_pretrained(path, aux_loss_pooled=True).train()
    pooled(tokens)
    torch.testing.assert_close(collect_aux_loss(pooled), expected)
    per_layer = from_hf_pretrained(path).train()
    per_layer(tokens)
    assert abs(collect_aux_loss(per_layer).item() / expected.item() - 1) > 0.02  # pooling cancels imbalances
    collect_aux_loss(pooled).backward()  # the pooled form backpropagates into every router
    assert all(layer.mlp.router.gate.weight.grad is not None for layer in pooled.layers)
