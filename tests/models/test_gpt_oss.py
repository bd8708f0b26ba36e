"""GPT-OSS against transformers: logits (attention sinks, sliding window shorter than the sequence, attention,
router and expert biases, clamped SwiGLU with the clamp active, YaRN RoPE), both conversion directions, the
checkpointer round trip, MXFP4 dequantisation, published sizes on the meta device, config checks, tokenizer."""

import json

import pytest
import torch

from hf_testing import checkpointer_round_trip, compare, describe, load_and_compare, param_counts, save_tiny_hf

transformers = pytest.importorskip("transformers")

from torchtune_moe.models import build_from_hf_config  # noqa: E402
from torchtune_moe.models.gpt_oss import (  # noqa: E402
    GPT_OSS_20B,
    GPT_OSS_120B,
    dequantize_mxfp4,
    gpt_oss_20b,
    gpt_oss_120b,
    gpt_oss_hf_config_to_kwargs,
    gpt_oss_hf_to_tune,
    gpt_oss_tune_to_hf,
)
from torchtune_moe.modules import moe_layers  # noqa: E402
from torchtune_moe.training import from_hf_pretrained  # noqa: E402

# Sequences of 16 tokens: a window of 5 cuts every sliding layer's attention.
BASE = dict(intermediate_size=16, num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
            sliding_window=5)

VARIANTS = {
    # GPT-OSS's defaults (YaRN factor 32, alternating sliding/full), a low clamp so that it cuts
    "yarn_alternating_clamped": dict(swiglu_limit=0.5),
    # other layer pattern, other alpha, plain RoPE, tied embeddings
    "full_first_plain_rope": dict(
        layer_types=["full_attention", "sliding_attention", "sliding_attention"], swiglu_alpha=1.1, swiglu_limit=1.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
    ),
}


def _save(path, seed=0, **kw):
    """A tiny model with non-zero sinks, router and expert biases and large expert weights (the clamp cuts)."""
    hf, path = save_tiny_hf(transformers.GptOssConfig, transformers.GptOssForCausalLM, path, seed=seed, **kw)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
            layer.mlp.router.bias.normal_(0.0, 0.5)
            layer.mlp.experts.gate_up_proj.normal_(0.0, 0.5)
            layer.mlp.experts.gate_up_proj_bias.normal_(0.0, 0.5)
            layer.mlp.experts.down_proj.normal_(0.0, 0.3)
            layer.mlp.experts.down_proj_bias.normal_(0.0, 0.5)
    hf.save_pretrained(path)
    return hf, path


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_transformers_and_round_trips(tmp_path, variant):
    hf, path = _save(tmp_path / "hf", **{**BASE, **VARIANTS[variant]})
    ours = load_and_compare(hf, path)
    windows = [layer.attn.sliding_window for layer in ours.layers]
    assert windows == [5 if t == "sliding_attention" else None for t in hf.config.layer_types]
    checkpointer_round_trip(hf, path, tmp_path / "out")


def test_clamp_is_active_and_each_option_matters(tmp_path):
    """The comparison would fail without the sinks, the window, the biases or the clamp."""
    hf, path = _save(tmp_path, **BASE, swiglu_limit=0.5)
    gate_up = hf.model.layers[0].mlp.experts.gate_up_proj
    x = torch.randn(64, gate_up.shape[1])
    assert (x @ gate_up[0]).abs().max() > 0.5  # the clamp cuts some values
    tokens = torch.randint(0, 96, (2, 16))
    changes = {
        "sinks": lambda m: [layer.attn.sinks.zero_() for layer in m.layers],
        "window": lambda m: [setattr(layer.attn, "sliding_window", None) for layer in m.layers],
        "router_bias": lambda m: [layer.router.gate.bias.zero_() for _, layer in moe_layers(m)],
        "expert_bias": lambda m: [layer.experts.down_proj_bias.zero_() for _, layer in moe_layers(m)],
        "clamp": lambda m: [setattr(layer.experts.act, "limit", 1e9) for _, layer in moe_layers(m)],
    }
    for name, change in changes.items():
        ours = from_hf_pretrained(path)
        with torch.no_grad():
            change(ours)
            diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
        assert diff > 2e-4, (name, diff)  # the comparison allows 1e-4


def test_gradients_match_transformers(tmp_path):
    """The fused expert path with biases and the clamped SwiGLU backpropagates as transformers' loop."""
    hf, path = _save(tmp_path, **BASE, swiglu_limit=0.5)
    ours = from_hf_pretrained(path).train()
    hf.train()
    tokens = torch.randint(0, 96, (2, 16))
    hf(tokens, labels=tokens).loss.backward()
    logits = ours(tokens)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), tokens[:, 1:].reshape(-1)).backward()
    hf_layer, our_layer = hf.model.layers[1], ours.layers[1]
    pairs = {
        "sinks": (hf_layer.self_attn.sinks, our_layer.attn.sinks),
        "router.bias": (hf_layer.mlp.router.bias, our_layer.mlp.router.gate.bias),
        "gate_up_proj": (hf_layer.mlp.experts.gate_up_proj, our_layer.mlp.experts.gate_up_proj),
        "gate_up_proj_bias": (hf_layer.mlp.experts.gate_up_proj_bias, our_layer.mlp.experts.gate_up_proj_bias),
        "down_proj": (hf_layer.mlp.experts.down_proj, our_layer.mlp.experts.down_proj),
        "down_proj_bias": (hf_layer.mlp.experts.down_proj_bias, our_layer.mlp.experts.down_proj_bias),
    }
    for name, (theirs, mine) in pairs.items():
        g = mine.grad.transpose(-2, -1) if name in ("gate_up_proj", "down_proj") else mine.grad
        torch.testing.assert_close(g, theirs.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("router", ["expert_choice", "causal_expert_choice"])
def test_another_router_keeps_the_router_bias(tmp_path, router):
    """Switching the router (model.router=...) keeps the checkpoint's router bias: gate_bias is an option of every
    router, not of token choice only."""
    from torchtune_moe.training import from_hf_pretrained

    hf, path = _save(tmp_path / "hf", **BASE)
    ours = from_hf_pretrained(path, router=router)
    for i, (_, layer) in enumerate(moe_layers(ours)):
        assert torch.equal(layer.router.gate.bias, hf.model.layers[i].mlp.router.bias)


def test_in_memory_conversion_round_trip(tmp_path):
    hf, path = _save(tmp_path, **BASE)
    config = json.loads((path / "config.json").read_text())
    from safetensors.torch import load_file

    hf_sd = load_file(str(path / "model.safetensors"))
    ours = gpt_oss_hf_to_tune(hf_sd, config)
    back = gpt_oss_tune_to_hf(ours, config)
    assert set(back) == set(hf_sd)
    for k, v in hf_sd.items():
        assert torch.equal(back[k], v), k
    model = build_from_hf_config(config, device="cpu")
    model.load_state_dict(ours, strict=True)
    compare(hf, model.eval())


def _quantize_mxfp4(w):
    """A tiny MXFP4 tensor made by hand (E2M1 codes, low nibble first, an E8M0 exponent per 32 values) and its
    exact value: [E, rows, cols] codes -> (blocks, scales, dequantised)."""
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    *prefix, cols = w.shape
    codes = torch.randint(0, 16, (*prefix, cols), dtype=torch.uint8)
    exps = torch.randint(120, 131, (*prefix, cols // 32), dtype=torch.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).reshape(*prefix, cols // 32, 16)
    exact = values[codes.long()] * torch.pow(2.0, exps.float() - 127).repeat_interleave(32, dim=-1)
    return blocks, exps, exact


def test_mxfp4_dequantisation():
    """torchao's routine on a hand-made MXFP4 tensor: the exact values, and transformers' own dequantiser's."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    blocks, scales, exact = _quantize_mxfp4(torch.empty(3, 8, 64))
    ours = dequantize_mxfp4(blocks, scales, torch.float32)
    assert torch.equal(ours, exact)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, cols, rows]: the Hub layout
    assert torch.equal(ours.transpose(-2, -1), theirs)
    with pytest.raises(ValueError, match="MXFP4"):
        dequantize_mxfp4(blocks.float(), scales)


def test_mxfp4_checkpoint_loads_as_transformers_dequantises_it(tmp_path):
    """A Hub state dict with MXFP4 experts (``*_blocks``, ``*_scales``) converts to the model transformers
    runs on the dequantised weights; exported back it is bf16/fp32 ``gate_up_proj``/``down_proj``."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    from safetensors.torch import load_file

    hf, path = _save(tmp_path, **{**BASE, "intermediate_size": 32, "hidden_size": 64})
    config = json.loads((path / "config.json").read_text())
    sd = load_file(str(path / "model.safetensors"))
    quantised = dict(sd)
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            for name in ("gate_up_proj", "down_proj"):
                key = f"model.layers.{i}.mlp.experts.{name}"
                blocks, scales, _ = _quantize_mxfp4(sd[key].transpose(-2, -1))
                del quantised[key]
                quantised[key + "_blocks"], quantised[key + "_scales"] = blocks, scales
                getattr(layer.mlp.experts, name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    model = build_from_hf_config(config, device="cpu")
    model.load_state_dict(gpt_oss_hf_to_tune(quantised, {**config, "quantization_config": {"quant_method": "mxfp4"}}))
    compare(hf, model.eval())
    assert set(gpt_oss_tune_to_hf(model.state_dict(), config)) == set(sd)


# config.json of openai/gpt-oss-120b as published on the Hub (layer_types: 18 x [sliding, full]).
HUB_120B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 18, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "num_local_experts": 128, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}
HUB_20B = {**HUB_120B, "num_hidden_layers": 24, "num_local_experts": 32,
           "layer_types": ["sliding_attention", "full_attention"] * 12}


@pytest.mark.parametrize(
    "builder, hub, published, total_b, active_b",
    [(gpt_oss_20b, HUB_20B, GPT_OSS_20B, 20.91, 3.61), (gpt_oss_120b, HUB_120B, GPT_OSS_120B, 116.83, 5.13)],
)
def test_published_sizes_build_on_meta_and_match_hub_configs(builder, hub, published, total_b, active_b):
    """Too big for any machine here: built on the meta device, checked against the Hub config and the
    published parameter counts."""
    assert {k: v for k, v in hub.items() if k in published} == published
    with torch.device("meta"):
        model = builder()
    assert describe(model) == describe(build_from_hf_config(hub))
    total, active = param_counts(model, count_input_embedding=False)
    assert total / 1e9 == pytest.approx(total_b, abs=0.01) and active / 1e9 == pytest.approx(active_b, abs=0.01)
    assert [layer.attn.sliding_window for layer in model.layers[:2]] == [128, None]
    rope = model.layers[0].attn.pos_embeddings
    assert (rope.factor, rope.original_max_seq_len, rope.truncate) == (32.0, 4096, False)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "rope_parameters"),
        ({"layer_types": ["full_attention"] * 3}, "layer_types"),
        ({"layer_types": ["chunked_attention", "full_attention"] * 18}, "layer_types"),
        ({"some_new_option": 1}, "some_new_option"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ({"experts_per_token": 2}, "experts_per_token"),
        ({"sliding_window": None}, "sliding_window"),
    ],
)
def test_unsupported_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        gpt_oss_hf_config_to_kwargs({**HUB_120B, **change})


def _save_mxfp4(tmp_path, **kw):
    """A tiny Hub directory as OpenAI publishes it: MXFP4 experts and a quantization_config; and the transformers
    model running on what transformers' dequantiser makes of them."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf, path = _save(tmp_path, **{**BASE, "intermediate_size": 32, "hidden_size": 64, **kw})
    sd = load_file(str(path / "model.safetensors"))
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            for name in ("gate_up_proj", "down_proj"):
                key = f"model.layers.{i}.mlp.experts.{name}"
                blocks, scales, _ = _quantize_mxfp4(sd.pop(key).transpose(-2, -1))
                sd[key + "_blocks"], sd[key + "_scales"] = blocks, scales
                getattr(layer.mlp.experts, name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (path / "config.json").write_text(json.dumps(config))
    return hf, path


def test_mxfp4_hub_directory_loads_and_saves_unquantised(tmp_path):
    """from_hf_pretrained, the checkpointer's whole and sliced loads read the MXFP4 pairs dequantised; the saved
    directory holds the unquantised Hub tensors, a config.json without quantization_config, and loads in
    transformers."""
    from torchtune_moe.training import HFMoECheckpointer

    hf, path = _save_mxfp4(tmp_path / "hf")
    ours = load_and_compare(hf, path)
    ckpt = HFMoECheckpointer(str(path), max_shard_size=10_000)
    model = build_from_hf_config(json.loads((path / "config.json").read_text()), device="cpu")
    model.load_state_dict(ckpt.load_checkpoint(model)["model"])
    compare(hf, model.eval())
    sliced = build_from_hf_config(json.loads((path / "config.json").read_text()), device="cpu")
    ckpt.load_sharded(sliced)
    for k, v in ours.state_dict().items():
        assert torch.equal(sliced.state_dict()[k], v), k
    save_dir = tmp_path / "out"
    save_dir.mkdir()
    ckpt.save_checkpoint(model.state_dict(), save_dir)
    assert "quantization_config" not in json.loads((save_dir / "config.json").read_text())
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    compare(reloaded.eval(), model)


def test_full_recipe_fine_tunes_an_mxfp4_hub_directory(tmp_path):
    """moe_full_finetune on a tiny GPT-OSS Hub directory with MXFP4 experts: the loss falls, gradients reach the
    sinks and every bias, and the saved step loads in transformers with our logits."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    from _recipe_helpers import losses, run_recipe

    hf, path = _save_mxfp4(tmp_path / "hub", vocab_size=101)  # the tiny config's CharTokenizer
    config = json.loads((path / "config.json").read_text())
    kwargs = gpt_oss_hf_config_to_kwargs(config, max_seq_len=64)
    tiny_args = ["vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "max_seq_len", "num_experts",
                 "experts_per_token", "moe_hidden_dim", "router", "aux_loss_coeff", "z_loss_coeff"]
    overrides = [f"~model.{k}" for k in tiny_args] + [f"model.{k}={json.dumps(v)}" for k, v in kwargs.items()] + [
        "model._component_=torchtune_moe.models.gpt_oss.gpt_oss",
        "checkpointer._component_=torchtune_moe.training.HFMoECheckpointer", f"checkpointer.checkpoint_dir={path}",
        "~checkpointer.model_config", "~checkpointer.output_dir", "checkpointer.max_shard_size=20000",
        "max_steps_per_epoch=6", "batch_size=8", "optimizer.lr=3e-3",
    ]
    out = tmp_path / "out"
    recipe = run_recipe(out, overrides=overrides)
    ce = [v for _, v in losses(out)]
    assert ce[-1] < ce[0], ce
    trained, loaded = recipe._model.state_dict(), from_hf_pretrained(path).state_dict()
    for name in ("attn.sinks", "mlp.router.gate.bias", "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj_bias"):
        assert not torch.equal(trained[f"layers.0.{name}"], loaded[f"layers.0.{name}"]), name  # it was trained
    step = sorted(out.glob("step_*"))[-1]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(step, dtype=torch.float32).eval()
    compare(reloaded, recipe._model.eval())


def test_tokenizer_round_trip(tmp_path):
    from tokenizer_files import write_qwen_tokenizer

    from torchtune.data import Message
    from torchtune_moe.models.gpt_oss import gpt_oss_tokenizer

    files = write_qwen_tokenizer(tmp_path, extra_special=["<|start|>", "<|message|>", "<|end|>", "<|return|>"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|return|>", "pad_token": "<|endoftext|>"}))
    tok = gpt_oss_tokenizer(
        str(files["tokenizer_json"]), tokenizer_config_path=str(tmp_path / "tokenizer_config.json"), max_seq_len=64
    )
    eos = files["special"]["<|return|>"]
    assert tok.bos_id is None and tok.eos_id == eos
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(files["tokenizer_json"]))
    text = "hello world, the tokens"
    assert tok.encode(text, add_bos=True, add_eos=False) == hf.encode(text, add_special_tokens=False)
    assert tok.encode("<|start|>hi", add_bos=False, add_eos=False)[0] == files["special"]["<|start|>"]
    tokens, mask = tok.tokenize_messages(
        [Message(role="user", content="hello", masked=True), Message(role="assistant", content="world")]
    )
    assert tokens[-1] == eos and mask[0] and not mask[-2]


@pytest.mark.parametrize("name, total_b", [("gpt_oss/20b_full", 20.91), ("gpt_oss/120b_full", 116.83),
                                           ("gpt_oss/120b_lora", 116.83)])
def test_packaged_config_validates_and_builds_on_meta(name, total_b):
    """The packaged config passes the recipe's validation and its model builds on the meta device (the 120b needs
    more GPUs than any machine here) with the published parameter count."""
    from moe_full_finetune import CONFIG_SPEC
    from torchtune import config as tt_config

    from torchtune_moe.config import load_config, validate_config

    cfg = load_config(name)
    if name.endswith("_full"):
        validate_config(cfg, CONFIG_SPEC)
    with torch.device("meta"):
        model = tt_config.instantiate(cfg.model)
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert base / 1e9 == pytest.approx(total_b, abs=0.01)


@pytest.mark.parametrize("name, adapter_m", [("gpt_oss/20b_lora", 184.91), ("gpt_oss/120b_lora", 1073.63)])
def test_lora_configs_adapt_the_experts(name, adapter_m):
    """The packaged LoRA configs put a pair per expert on the fused gate_up_proj and on down_proj of every layer
    (experts with biases: tests/peft/test_lora_biased_experts.py, tests/peft/test_peft_gpt_oss.py), with the
    adapter count the configs' memory notes quote."""
    from torchtune import config as tt_config

    from torchtune_moe.config import load_config
    from torchtune_moe.modules.peft import LoRAMoELinear

    cfg = load_config(name)
    assert cfg.model.apply_lora_to_experts is True
    with torch.device("meta"):
        model = tt_config.instantiate(cfg.model)
    for _, layer in moe_layers(model):
        experts = layer.experts
        assert isinstance(experts, LoRAMoELinear) and experts.parts == 1 and experts.down_proj_bias is not None
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert adapters / 1e6 == pytest.approx(adapter_m, abs=0.01)


def test_peft_adapter_on_attention_matches_transformers_and_peft(tmp_path, monkeypatch):
    """Attention and output adapters (the _lora configs' choice) export as a PEFT adapter that PEFT applies to
    transformers' GPT-OSS with our logits; the merged export reloads in transformers with them too."""
    peft = pytest.importorskip("peft")
    import peft.tuners.lora.torchao
    import peft.utils.quantization_utils

    for module in (peft.tuners.lora.torchao, peft.utils.quantization_utils):  # see tests/peft/test_peft_adapter.py
        if hasattr(module, "is_torchao_available"):
            monkeypatch.setattr(module, "is_torchao_available", lambda: False)
    from torchtune_moe.modules.peft import apply_lora, lora_modules, merged_state_dict
    from torchtune_moe.training import HFMoECheckpointer, save_peft_adapter

    hf, path = _save(tmp_path / "hf", **BASE)
    config = json.loads((path / "config.json").read_text())
    ours = from_hf_pretrained(path)
    apply_lora(ours, lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_experts=False,
               apply_lora_to_output=True, lora_rank=8, lora_alpha=16)
    torch.manual_seed(3)
    with torch.no_grad():
        for _, m in lora_modules(ours):
            for name in m.adapter_params():
                m.get_parameter(name).normal_(0, 0.1)
    ours.eval()
    save_peft_adapter(ours, config, tmp_path / "adapter")
    with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    compare(with_adapter, ours)
    save_dir = tmp_path / "merged"
    save_dir.mkdir()
    HFMoECheckpointer(str(path)).save_checkpoint(merged_state_dict(ours), save_dir)
    compare(transformers.AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32).eval(), ours)
