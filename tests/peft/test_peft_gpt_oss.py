"""GPT-OSS LoRA adapters against transformers + PEFT: the routed experts are stacked parameters on the Hub
(``mlp.experts.gate_up_proj`` [E, D, 2I] with gate and up interleaved, ``down_proj`` [E, I, D]), so their
adapters are written as PEFT's LoRA on parameters (``target_parameters``), one pair per expert on the whole fused
``gate_up_proj`` and one on ``down_proj``. A tiny random transformers GPT-OSS (expert biases, clamp active):

- the adapter ``save_peft_adapter`` writes, loaded by ``peft.PeftModel.from_pretrained``, gives our logits
  (<= 1e-4, fp32), with attention adapters and with expert adapters alone;
- ``load_peft_adapter`` reads it back exactly;
- the merged weights saved through HFMoECheckpointer reload in transformers with the same logits;
- moe_lora_finetune trains the expert adapters (biases frozen) and writes both.
"""

import json

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_testing import ATOL, compare, save_tiny_hf  # noqa: E402

from torchtune_moe.modules.peft import (  # noqa: E402
    LoRAMoELinear,
    adapter_state_dict,
    apply_lora,
    lora_modules,
    merged_state_dict,
)
from torchtune_moe.training import from_hf_pretrained, load_peft_adapter, save_peft_adapter  # noqa: E402
from torchtune_moe.training._hf_checkpointer import HFMoECheckpointer  # noqa: E402

TINY_GPT_OSS = dict(intermediate_size=16, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                    head_dim=16, sliding_window=5, swiglu_limit=0.5)


@pytest.fixture(autouse=True)
def _peft_without_torchao(monkeypatch):
    """As tests/peft/test_peft_adapter.py: PEFT 0.21 refuses torchao < 0.16 (torchtune 0.6.1 needs it); these
    models have no torchao layers, so PEFT is told torchao is absent."""
    import peft.tuners.lora.torchao
    import peft.utils.quantization_utils

    for module in (peft.tuners.lora.torchao, peft.utils.quantization_utils):
        if hasattr(module, "is_torchao_available"):
            monkeypatch.setattr(module, "is_torchao_available", lambda: False)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A tiny GPT-OSS Hub directory with non-zero sinks and biases and expert weights large enough to clamp."""
    path = tmp_path_factory.mktemp("gpt_oss") / "hf"
    hf, path = save_tiny_hf(transformers.GptOssConfig, transformers.GptOssForCausalLM, path, **TINY_GPT_OSS)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
            layer.mlp.experts.gate_up_proj.normal_(0.0, 0.5)
            layer.mlp.experts.down_proj.normal_(0.0, 0.3)
    hf.save_pretrained(path)
    return path, json.loads((path / "config.json").read_text())


def _adapted(path, attention=True):
    ours = from_hf_pretrained(path, dtype=torch.float32)
    apply_lora(ours, lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"] if attention else [],
               apply_lora_to_experts=True, apply_lora_to_output=attention, lora_rank=8, lora_alpha=16)
    torch.manual_seed(3)
    with torch.no_grad():
        for _, m in lora_modules(ours):
            for name in m.adapter_params():
                m.get_parameter(name).normal_(0, 0.1)
    return ours.eval()


def _hf(path):
    return transformers.GptOssForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("attention", [True, False], ids=["attention_and_experts", "experts_only"])
def test_peft_adapter_matches_transformers_and_peft(hub, tmp_path, attention):
    path, config = hub
    ours = _adapted(path, attention)
    experts = ours.layers[0].mlp.experts
    assert isinstance(experts, LoRAMoELinear) and experts.parts == 1  # one pair on the fused gate_up_proj
    save_peft_adapter(ours, config, tmp_path / "adapter")

    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    attention_targets = ["k_proj", "lm_head", "o_proj", "q_proj", "v_proj"]
    assert adapter_config["target_modules"] == (attention_targets if attention else [])
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    E, D, I, r = 4, 32, 16, 8
    # PEFT nests the ParamWrapper of gate_up_proj (registered first) inside the one of down_proj.
    prefix = "base_model.model.model.layers.1.mlp.experts."
    assert shapes[prefix + "base_layer.lora_A.weight"] == (E * r, D)
    assert shapes[prefix + "base_layer.lora_B.weight"] == (2 * I, r * E)
    assert shapes[prefix + "lora_A.weight"] == (E * r, I)
    assert shapes[prefix + "lora_B.weight"] == (D, r * E)

    hf = _hf(path)
    with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    compare(with_adapter, ours)
    # The expert adapters are what PEFT applied: without them the logits move far beyond the tolerance.
    torch.manual_seed(1)
    tokens = torch.randint(0, config["vocab_size"], (2, 16))
    with torch.no_grad(), with_adapter.disable_adapter():
        assert (with_adapter(tokens).logits - ours(tokens)).abs().max() > 100 * ATOL

    loaded = load_peft_adapter(ours, config, tmp_path / "adapter")
    want = adapter_state_dict(ours)
    assert loaded.keys() == want.keys()
    for k in want:
        assert torch.equal(loaded[k], want[k]), k


def test_merged_export_reloads_in_transformers(hub, tmp_path):
    path, _ = hub
    ours = _adapted(path)
    save_dir = tmp_path / "merged"
    save_dir.mkdir()
    HFMoECheckpointer(str(path)).save_checkpoint(merged_state_dict(ours), save_dir)
    compare(_hf(save_dir), ours)


def test_a_mismatched_adapter_is_refused_by_name(hub, tmp_path):
    path, config = hub
    ours = _adapted(path, attention=False)
    save_peft_adapter(ours, config, tmp_path / "adapter")
    from safetensors.torch import load_file, save_file

    f = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = "base_model.model.model.layers.0.mlp.experts.lora_B.weight"
    tensors[key] = tensors[key][:, :8].contiguous()
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match=r"experts\.lora_B\.weight has shape \(32, 8\); the model needs \(32, 32\)"):
        load_peft_adapter(ours, config, tmp_path / "adapter")
    del tensors[key]
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match=r"missing \['base_model\.model\.model\.layers\.0\.mlp\.experts\.lora_B"):
        load_peft_adapter(ours, config, tmp_path / "adapter")


def test_lora_recipe_trains_expert_adapters_and_writes_what_transformers_loads(tmp_path):
    """moe_lora_finetune on the tiny GPT-OSS Hub directory with attention and expert adapters (the gpt_oss _lora
    configs' choice): the loss falls, the expert adapters train while the expert biases stay frozen, the PEFT
    adapter loads onto transformers with our logits and the merged step reloads in transformers with them too."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    from _recipe_helpers import FAST, losses
    from moe_lora_finetune import MoELoRAFinetuneRecipe

    from torchtune_moe.config import load_config
    from torchtune_moe.models.gpt_oss import gpt_oss_hf_config_to_kwargs

    # The tiny config's CharTokenizer needs a vocabulary of 101.
    _, path = save_tiny_hf(transformers.GptOssConfig, transformers.GptOssForCausalLM, tmp_path / "hub",
                           vocab_size=101, **TINY_GPT_OSS)
    config = json.loads((path / "config.json").read_text())
    kwargs = gpt_oss_hf_config_to_kwargs(config, max_seq_len=64)
    tiny_args = ["vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "max_seq_len", "num_experts",
                 "experts_per_token", "moe_hidden_dim", "router", "aux_loss_coeff", "z_loss_coeff"]
    overrides = [f"~model.{k}" for k in tiny_args] + [f"model.{k}={json.dumps(v)}" for k, v in kwargs.items()] + [
        "model.base=torchtune_moe.models.gpt_oss.gpt_oss", "model.lora_rank=8", "model.lora_alpha=16",
        "checkpointer._component_=torchtune_moe.training.HFMoECheckpointer", f"checkpointer.checkpoint_dir={path}",
        "~checkpointer.model_config", "checkpointer.max_shard_size=20000", "max_steps_per_epoch=4", "batch_size=8",
        "optimizer.lr=3e-3",
    ]
    out = tmp_path / "out"
    cfg = load_config("tiny/lora", [f"output_dir={out}", *FAST, *overrides])
    recipe = MoELoRAFinetuneRecipe(cfg)
    recipe.setup(cfg)
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    ce = [v for _, v in losses(out)]
    assert ce[-1] < ce[0], ce
    model = recipe._model.eval()
    experts = model.layers[0].mlp.experts
    assert isinstance(experts, LoRAMoELinear) and experts.lora_gate_up_b.abs().sum() > 0
    loaded = from_hf_pretrained(path, dtype=torch.float32).layers[0].mlp.experts
    assert torch.equal(experts.gate_up_proj_bias, loaded.gate_up_proj_bias)  # frozen
    assert torch.equal(experts.down_proj_bias, loaded.down_proj_bias)

    final = sorted(out.glob("step_*"))[-1]
    with_adapter = peft.PeftModel.from_pretrained(_hf(path), final / "adapter").eval()
    compare(with_adapter, model)
    compare(_hf(final), model)


def test_router_adapters_are_beyond_peft(hub, tmp_path):
    """What docs/lora.md says of GPT-OSS router adapters: written under target_modules [router], which PEFT 0.21
    refuses (transformers' GptOssTopKRouter is not an nn.Linear); the merged checkpoint carries them."""
    path, config = hub
    ours = from_hf_pretrained(path, dtype=torch.float32)
    apply_lora(ours, lora_attn_modules=[], apply_lora_to_experts=False, apply_lora_to_router=True, lora_rank=8,
               lora_alpha=16)
    torch.manual_seed(3)
    with torch.no_grad():
        for _, m in lora_modules(ours):
            for name in m.adapter_params():
                m.get_parameter(name).normal_(0, 0.1)
    ours.eval()
    save_peft_adapter(ours, config, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] == ["router"]
    with pytest.raises(ValueError, match="GptOssTopKRouter"):
        peft.PeftModel.from_pretrained(_hf(path), tmp_path / "adapter")
    save_dir = tmp_path / "merged"
    save_dir.mkdir()
    HFMoECheckpointer(str(path)).save_checkpoint(merged_state_dict(ours), save_dir)
    compare(_hf(save_dir), ours)
