"""Qwen3.5-MoE against transformers: logits of the text model (Gated DeltaNet linear attention chunked over a
sequence longer than a chunk, gated full attention with partial RoPE and per-head norms, softmax routing, gated
shared expert, zero-centred norms), the text-only and the multimodal checkpoint layouts, both conversion
directions, the checkpointer round trip, published sizes on the meta device, config checks, tokenizer."""

import json

import pytest
import torch

from hf_testing import checkpointer_round_trip, compare, load_and_compare, param_counts, save_tiny_hf

transformers = pytest.importorskip("transformers")

from torchtune_moe.models import build_from_hf_config  # noqa: E402
from torchtune_moe.models.qwen3_5_moe import (  # noqa: E402
    QWEN3_5_MOE_35B_A3B,
    QWEN3_5_MOE_122B_A10B,
    QWEN3_5_MOE_397B_A17B,
    qwen3_5_moe_35b_a3b,
    qwen3_5_moe_122b_a10b,
    qwen3_5_moe_397b_a17b,
    qwen3_5_moe_hf_config_to_kwargs,
    qwen3_5_moe_hf_to_tune,
    qwen3_5_moe_tune_to_hf,
)
from torchtune_moe.modules import moe_layers  # noqa: E402
from torchtune_moe.modules.gated_attention import GatedMultiHeadAttention  # noqa: E402
from torchtune_moe.modules.linear_attention import GatedDeltaNet  # noqa: E402

CHUNK = 8  # our linear attention's chunk; the compared sequences are longer (24 tokens: 3 chunks)
SEQ = 24

BASE = dict(
    num_hidden_layers=4, head_dim=16, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
    num_experts_per_tok=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
    linear_value_head_dim=16, linear_conv_kernel_dim=4,
)
VARIANTS = {
    # the published pattern (every 4th layer full), quarter RoPE, default rope base
    "interval_quarter_rope": dict(full_attention_interval=2),
    # explicit layer_types, attention biases, half RoPE, other base, other conv width, tied embeddings, equal
    # key/value heads
    "layer_types_bias_half_rope_tied": dict(
        layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
        attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
        linear_conv_kernel_dim=3, tie_word_embeddings=True, linear_num_value_heads=2,
    ),
}


def _randomise_linear_attention(model) -> None:
    """A_log and dt_bias spread so that decays differ per head (the defaults would hide a swapped head)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(-2.0, 1.0)
            elif name.endswith("dt_bias"):
                p.normal_(0.0, 1.0)


def _save_text(path, **kw):
    hf, path = save_tiny_hf(transformers.Qwen3_5MoeTextConfig, transformers.Qwen3_5MoeForCausalLM, path, **{**BASE, **kw})
    _randomise_linear_attention(hf)
    hf.save_pretrained(path)
    return hf.eval(), path


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_transformers_and_round_trips(tmp_path, variant):
    hf, path = _save_text(tmp_path / "hf", **VARIANTS[variant])
    ours = load_and_compare(hf, path)
    kinds = [type(layer.attn) for layer in ours.layers]
    assert GatedDeltaNet in kinds and GatedMultiHeadAttention in kinds
    for layer in ours.layers:
        if isinstance(layer.attn, GatedDeltaNet):
            layer.attn.chunk_size = CHUNK
    compare(hf, ours, seq_len=SEQ)  # 3 chunks: the state crosses chunk boundaries
    assert all(m.shared_expert_gate is not None for _, m in moe_layers(ours))
    checkpointer_round_trip(hf, path, tmp_path / "out")


def test_in_memory_conversion_round_trip(tmp_path):
    hf, path = _save_text(tmp_path, attention_bias=True)
    config = json.loads((path / "config.json").read_text())
    from safetensors.torch import load_file

    hf_sd = load_file(str(path / "model.safetensors"))
    ours = qwen3_5_moe_hf_to_tune(hf_sd, config)
    back = qwen3_5_moe_tune_to_hf(ours, config)
    assert set(back) == set(hf_sd)
    for k, v in hf_sd.items():
        assert torch.equal(back[k], v), k
    model = build_from_hf_config(config, device="cpu")
    model.load_state_dict(ours, strict=True)
    compare(hf, model.eval(), seq_len=SEQ)


def test_multimodal_checkpoint_loads_the_text_model(tmp_path):
    """The published layout: ``Qwen3_5MoeForConditionalGeneration`` (text under ``model.language_model.``, a
    vision tower, an ``mtp.`` module): the text model loads, the rest is ignored, logits match transformers'
    on text input, and our state dict converts back to the same text keys."""
    from safetensors.torch import load_file, save_file

    from torchtune_moe.training import from_hf_pretrained

    torch.manual_seed(0)
    text = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, **BASE)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4)
    cfg = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision)
    hf = transformers.Qwen3_5MoeForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    _randomise_linear_attention(hf)
    hf.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("model.visual.") for k in sd) and any(k.startswith("model.language_model.") for k in sd)
    sd["mtp.fc.weight"] = torch.randn(32, 64)  # the published checkpoints' MTP module
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = from_hf_pretrained(tmp_path, dtype=torch.float32)
    torch.manual_seed(1)
    tokens = torch.randint(0, 96, (2, SEQ))
    with torch.no_grad():
        diff = (hf.eval()(tokens).logits - ours(tokens)).abs().max().item()
    assert diff <= 1e-4, diff
    config = json.loads((tmp_path / "config.json").read_text())
    back = qwen3_5_moe_tune_to_hf(ours.state_dict(), config)
    text_keys = {k for k in sd if not k.startswith(("model.visual.", "mtp."))}
    assert set(back) == text_keys
    assert all(torch.equal(back[k], sd[k]) for k in text_keys)
    # The checkpointer saves the text model under the published names; transformers' text model loads it.
    from torchtune_moe.training._hf_checkpointer import HFMoECheckpointer

    save_dir = tmp_path / "out" / "step_1"
    save_dir.mkdir(parents=True)
    HFMoECheckpointer(str(tmp_path)).save_checkpoint(ours.state_dict(), save_dir)
    reloaded, info = transformers.Qwen3_5MoeForCausalLM.from_pretrained(
        save_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    compare(reloaded.eval(), ours, seq_len=SEQ)


@pytest.mark.parametrize(
    "builder, published, total_b, active_b",
    [
        # Text model without the vision tower and the MTP module: a little under the published 35B / 122B /
        # 397B; active counts both embedding tables.
        (qwen3_5_moe_35b_a3b, QWEN3_5_MOE_35B_A3B, 34.66, 3.45),
        (qwen3_5_moe_122b_a10b, QWEN3_5_MOE_122B_A10B, 122.11, 9.77),
        (qwen3_5_moe_397b_a17b, QWEN3_5_MOE_397B_A17B, 396.35, 17.35),
    ],
)
def test_published_sizes_build_on_meta(builder, published, total_b, active_b):
    with torch.device("meta"):
        model = builder()
    total, active = param_counts(model)
    assert total / 1e9 == pytest.approx(total_b, abs=0.01) and active / 1e9 == pytest.approx(active_b, abs=0.01)
    kinds = [isinstance(layer.attn, GatedMultiHeadAttention) for layer in model.layers]
    assert kinds == [(i + 1) % 4 == 0 for i in range(published["num_hidden_layers"])]
    full = model.layers[3].attn
    assert full.pos_embeddings.rotary_dim == 64 and full.pos_embeddings.base == 10_000_000
    # The multimodal config.json wrapping the same text_config builds the same model.
    hub = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
           "text_config": {**published, "model_type": "qwen3_5_moe_text"}, "vision_config": {"depth": 27},
           "image_token_id": 248056, "tie_word_embeddings": False}
    other = build_from_hf_config(hub)
    assert {k: v.shape for k, v in other.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e7}}, "rope_parameters"),
        ({"layer_types": ["full_attention"] * 3}, "layer_types"),
        ({"linear_num_value_heads": 24}, "linear_num_value_heads"),
        ({"norm_topk_prob": False}, "norm_topk_prob"),
        ({"attn_output_gate": False}, "attn_output_gate"),
        ({"some_new_option": 1}, "some_new_option"),
    ],
)
def test_unsupported_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        qwen3_5_moe_hf_config_to_kwargs({**QWEN3_5_MOE_35B_A3B, **change})


def test_multimodal_config_checks():
    base = {"model_type": "qwen3_5_moe", "text_config": dict(QWEN3_5_MOE_35B_A3B), "vision_config": {}}
    kwargs = qwen3_5_moe_hf_config_to_kwargs(base)
    assert kwargs == qwen3_5_moe_hf_config_to_kwargs(QWEN3_5_MOE_35B_A3B)
    with pytest.raises(ValueError, match="audio_config"):
        qwen3_5_moe_hf_config_to_kwargs({**base, "audio_config": {}})
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        qwen3_5_moe_hf_config_to_kwargs({**base, "tie_word_embeddings": True})


def test_a_mask_without_positions_is_refused():
    model = build_from_hf_config({**QWEN3_5_MOE_35B_A3B, "model_type": "qwen3_5_moe_text", "num_hidden_layers": 1, "hidden_size": 64,
                                  "vocab_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
                                  "linear_num_key_heads": 1, "linear_num_value_heads": 1,
                                  "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                                  "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16}, device="cpu")
    mask = torch.ones(1, 4, 4, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="packed samples need their positions"):
        model(torch.zeros(1, 4, dtype=torch.long), mask=mask)


def test_packed_samples_equal_separate_samples(tmp_path):
    """Samples packed into rows (torchtune's block-causal mask and restarting positions) give each sample's own
    logits: the linear-attention layers restart their state and convolution per sample, the full-attention
    layers mask across samples. Samples longer than a chunk, a row holding three."""
    from torchtune.modules.attention_utils import packed_block_causal_mask

    from torchtune_moe.training import from_hf_pretrained

    _, path = _save_text(tmp_path)
    model = from_hf_pretrained(path).eval()
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    rows = [[11, 9, 4], [20, 4]]  # sample lengths per packed row
    samples = [[torch.randint(0, vocab, (1, n)) for n in row] for row in rows]
    S = max(sum(row) for row in rows)
    tokens = torch.zeros(len(rows), S, dtype=torch.long)
    input_pos = torch.zeros(len(rows), S, dtype=torch.long)
    seq_lens = []
    for b, row in enumerate(rows):
        tokens[b, : sum(row)] = torch.cat([t[0] for t in samples[b]])
        input_pos[b, : sum(row)] = torch.cat([torch.arange(n) for n in row])
        pad = S - sum(row)
        seq_lens.append(torch.tensor(row + ([pad] if pad else [])))
        if pad:  # the row's padding, a sample of its own as torchtune packs it
            input_pos[b, sum(row):] = torch.arange(pad)
    mask = packed_block_causal_mask(seq_lens)
    with torch.no_grad():
        packed = model(tokens, mask=mask, input_pos=input_pos)
        for b, row in enumerate(rows):
            offset = 0
            for n, sample in zip(row, samples[b]):
                torch.testing.assert_close(packed[b, offset : offset + n], model(sample)[0], atol=1e-4, rtol=0)
                offset += n


def test_tokenizer_round_trip(tmp_path):
    from tokenizer_files import write_qwen_tokenizer

    from torchtune.data import Message
    from torchtune_moe.models.qwen3_5_moe import qwen3_5_moe_tokenizer

    files = write_qwen_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    tok = qwen3_5_moe_tokenizer(str(files["tokenizer_json"]), tokenizer_config_path=str(tmp_path / "tokenizer_config.json"))
    eos = files["special"]["<|im_end|>"]
    assert tok.bos_id is None and tok.eos_id == eos and tok.pad_id == files["special"]["<|endoftext|>"]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(files["tokenizer_json"]))
    text = "hello world, the tokens"
    assert tok.encode(text, add_bos=True, add_eos=False) == hf.encode(text, add_special_tokens=False)
    tokens, mask = tok.tokenize_messages(
        [Message(role="user", content="hello", masked=True), Message(role="assistant", content="world")]
    )
    start = files["special"]["<|im_start|>"]
    assert tokens[0] == start and tokens.count(start) == 2 and tokens[-1] == eos and mask[0] and not mask[-2]


@pytest.mark.parametrize(
    "name, total_b",
    [("qwen3_5_moe/35b_a3b_full", 34.66), ("qwen3_5_moe/122b_a10b_full", 122.11), ("qwen3_5_moe/397b_a17b_full", 396.35)],
)
def test_packaged_config_validates_and_builds_on_meta(name, total_b):
    """The packaged full and LoRA configs pass the recipes' validation and build on the meta device (no machine
    here holds them) with the published parameter count; LoRA adapts the routed and shared experts and both attention kinds."""
    from moe_full_finetune import CONFIG_SPEC
    from moe_lora_finetune import LORA_FINETUNE_CONFIG_SPEC as LORA_SPEC
    from torchtune import config as tt_config

    from torchtune_moe.config import load_config, validate_config
    from torchtune_moe.modules.peft import LoRAMoELinear, lora_modules

    for config_name, spec in ((name, CONFIG_SPEC), (name.replace("_full", "_lora"), LORA_SPEC)):
        cfg = load_config(config_name)
        validate_config(cfg, spec)
        assert cfg.checkpointer.model_type == "qwen3_5_moe" and cfg.dataset.packed is False
        with torch.device("meta"):
            model = tt_config.instantiate(cfg.model)
        if spec is CONFIG_SPEC:
            assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(total_b, abs=0.01)
        else:
            adapted = [n for n, _ in lora_modules(model)]
            assert any(isinstance(m, LoRAMoELinear) for _, m in lora_modules(model))
            assert any(".mlp.shared_expert." in n for n in adapted)
            assert any(n.endswith(".attn.q_proj") for n in adapted) and any(n.endswith(".attn.in_proj_qkv") for n in adapted)


def test_peft_adapter_names(tmp_path):
    """LoRA on the routed and shared experts saves under the published per-expert Hub names and loads back."""
    from torchtune_moe.models._peft import adapter_state_from_peft, peft_adapter_tensors
    from torchtune_moe.modules.peft import adapter_state_dict, apply_lora
    from torchtune_moe.training import from_hf_pretrained

    hf, path = _save_text(tmp_path)
    config = json.loads((path / "config.json").read_text())
    model = apply_lora(from_hf_pretrained(path), lora_attn_modules=[], apply_lora_to_mlp=True, lora_rank=8)
    with torch.no_grad():
        for k, v in adapter_state_dict(model).items():
            v.normal_()
    tensors, adapter_config = peft_adapter_tensors(model, config)
    assert "base_model.model.model.layers.0.mlp.experts.7.down_proj.lora_B.weight" in tensors
    assert "base_model.model.model.layers.3.mlp.shared_expert.gate_proj.lora_A.weight" in tensors
    back = adapter_state_from_peft(model, config, tensors, adapter_config)
    assert all(torch.equal(back[k], v) for k, v in adapter_state_dict(model).items())


ATTN_LORA = ["q_proj", "k_proj", "v_proj", "output_proj", "in_proj_qkv", "in_proj_z", "out_proj"]


def test_lora_on_both_attention_kinds_merges_and_names_hub_modules(tmp_path):
    """A hybrid model adapts, in each layer, the named projections its attention has: q/k/v/output in the
    gated full-attention layers, the Gated DeltaNet projections in the linear-attention ones; the merged weights
    give the adapted model's logits in the plain model, and the adapter uses the Hub's module names."""
    from torchtune.modules.peft import LoRALinear

    from torchtune_moe.models._peft import adapter_state_from_peft, peft_adapter_tensors
    from torchtune_moe.modules.peft import adapter_state_dict, apply_lora, merged_state_dict
    from torchtune_moe.training import from_hf_pretrained

    hf, path = _save_text(tmp_path)
    config = json.loads((path / "config.json").read_text())
    model = apply_lora(from_hf_pretrained(path), lora_attn_modules=ATTN_LORA, apply_lora_to_experts=True,
                       lora_rank=8)
    kinds = {type(layer.attn) for layer in model.layers}
    assert kinds == {GatedMultiHeadAttention, GatedDeltaNet}
    for layer in model.layers:
        names = ATTN_LORA[:4] if isinstance(layer.attn, GatedMultiHeadAttention) else ATTN_LORA[4:]
        assert all(isinstance(getattr(layer.attn, n), LoRALinear) for n in names)
    torch.manual_seed(0)
    with torch.no_grad():
        for v in adapter_state_dict(model).values():
            v.normal_(0.0, 0.05)
    tokens = torch.randint(0, config["vocab_size"], (2, SEQ))
    with torch.no_grad():
        adapted = model.eval()(tokens)
        plain = from_hf_pretrained(path)
        plain.load_state_dict(merged_state_dict(model), strict=True)
        torch.testing.assert_close(plain.eval()(tokens), adapted, atol=1e-4, rtol=0)

    tensors, adapter_config = peft_adapter_tensors(model, config)
    full = next(i for i, layer in enumerate(model.layers) if isinstance(layer.attn, GatedMultiHeadAttention))
    linear = next(i for i, layer in enumerate(model.layers) if isinstance(layer.attn, GatedDeltaNet))
    assert f"base_model.model.model.layers.{full}.self_attn.o_proj.lora_A.weight" in tensors
    assert f"base_model.model.model.layers.{linear}.linear_attn.in_proj_qkv.lora_B.weight" in tensors
    back = adapter_state_from_peft(model, config, tensors, adapter_config)
    assert all(torch.equal(back[k], v) for k, v in adapter_state_dict(model).items())


def test_lora_name_in_no_layer_is_refused_with_each_kind(tmp_path):
    from torchtune_moe.modules.peft import apply_lora
    from torchtune_moe.training import from_hf_pretrained

    _, path = _save_text(tmp_path)
    with pytest.raises(ValueError, match=r"lora_attn_modules: \['kv_a_proj'\] not in the attention of any layer; "
                                         r"choose from .*GatedDeltaNet.*'in_proj_qkv'.*GatedMultiHeadAttention"):
        apply_lora(from_hf_pretrained(path), lora_attn_modules=["q_proj", "kv_a_proj"], lora_rank=8)
