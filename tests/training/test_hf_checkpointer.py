"""HFMoECheckpointer and from_hf_pretrained on bad checkpoints, sharding, dtypes and router extra state."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_testing import compare, save_tiny_hf

transformers = pytest.importorskip("transformers")

from torchtune_moe.training import from_hf_pretrained  # noqa: E402
from torchtune_moe.models import build_from_hf_config  # noqa: E402
from torchtune_moe.training._hf_files import EXTRA_STATE_FILE  # noqa: E402
from torchtune_moe.training._hf_checkpointer import HFMoECheckpointer, is_extra_state_key  # noqa: E402

QWEN2_MOE = dict(
    intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_hidden_layers=2,
    num_experts=4, num_experts_per_tok=2,
)


@pytest.fixture
def hf_dir(tmp_path):
    """A tiny Qwen2-MoE checkpoint saved by transformers (one model.safetensors)."""
    hf, path = save_tiny_hf(transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, tmp_path / "hf", **QWEN2_MOE)
    return hf, path


def _edit_weights(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, listed",
    [
        (lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"), "missing (1): model.layers.1.mlp.experts.3.up_proj.weight"),
        (lambda t: t.update({"model.layers.1.mlp.experts.4.up_proj.weight": torch.zeros(16, 32)}), "unexpected (1): model.layers.1.mlp.experts.4.up_proj.weight"),
        (lambda t: t.update({"model.layers.0.mlp.gate.weight": torch.zeros(5, 32)}), "wrong shape (1): model.layers.0.mlp.gate.weight [5, 32] (expected [4, 32])"),
    ],
    ids=["missing_expert", "extra_key", "wrong_shape"],
)
def test_bad_checkpoint_stops_with_listing(hf_dir, tmp_path, edit, listed):
    _, path = hf_dir
    _edit_weights(path, edit)
    model = build_from_hf_config(json.loads((path / "config.json").read_text()))  # meta: names and shapes
    with pytest.raises(ValueError, match="does not match its config.json") as err:
        HFMoECheckpointer(str(path)).load_checkpoint(model)
    assert listed in str(err.value)
    with pytest.raises(ValueError, match="does not match its config.json") as err:
        from_hf_pretrained(path)
    assert listed in str(err.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"),
        lambda t: t.update({"model.layers.1.mlp.experts.4.up_proj.weight": torch.zeros(16, 32)}),
        lambda t: t.update({"model.layers.1.mlp.mystery.weight": torch.zeros(1)}),
        lambda t: [t.pop(k) for k in list(t) if ".experts.3." in k],  # 3 experts where config.json says 4
    ],
    ids=["missing_expert", "extra_expert", "unknown_key", "too_few_experts"],
)
def test_checkpointer_without_a_model_checks_the_key_map_and_config(hf_dir, edit):
    """Without the model the checkpointer still refuses, from the headers, what its key map cannot place or
    what contradicts config.json's expert count; the model's strict load catches the rest."""
    _, path = hf_dir
    _edit_weights(path, edit)
    with pytest.raises(ValueError, match="does not match its config.json.*\\n  unexpected"):
        HFMoECheckpointer(str(path)).load_checkpoint()


def test_constructor_validates_config_without_building_a_model(hf_dir, monkeypatch):
    _, path = hf_dir
    from torchtune_moe.models import _hf_families

    def no_build(**kwargs):
        raise AssertionError("the checkpointer built the model")

    family = _hf_families.HF_FAMILIES["qwen2_moe"]
    monkeypatch.setitem(_hf_families.HF_FAMILIES, "qwen2_moe", type(family)(**{**family.__dict__, "builder": no_build}))
    ckpt = HFMoECheckpointer(str(path))
    assert set(ckpt.load_checkpoint()["model"]) >= {"layers.0.mlp.experts.gate_up_proj", "tok_embeddings.weight"}
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "some_new_option": 1}))
    with pytest.raises(ValueError, match="some_new_option"):
        HFMoECheckpointer(str(path))


@pytest.mark.parametrize("text", ['{"model_type": "qwen2_moe",', "[1, 2]", "\udcff"], ids=["truncated", "list", "binary"])
def test_broken_config_json_names_the_file(hf_dir, tmp_path, text):
    _, path = hf_dir
    (path / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    for load in (lambda: from_hf_pretrained(path), lambda: HFMoECheckpointer(str(path))):
        with pytest.raises(ValueError, match=str(path / "config.json")):
            load()


def test_many_missing_experts_are_counted(hf_dir, tmp_path):
    _, path = hf_dir
    _edit_weights(path, lambda t: [t.pop(k) for k in list(t) if ".experts." in k])
    with pytest.raises(ValueError, match=r"missing \(24\)"):
        from_hf_pretrained(path)


def test_unsupported_architecture_names_the_supported_ones(hf_dir, tmp_path):
    _, path = hf_dir
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")
    (path / "config.json").write_text(json.dumps(config))
    for load in (lambda: from_hf_pretrained(path), lambda: HFMoECheckpointer(str(path))):
        with pytest.raises(ValueError, match="DeepseekV3ForCausalLM.*not supported.*MixtralForCausalLM.*Qwen2MoeForCausalLM.*Qwen3MoeForCausalLM.*OlmoeForCausalLM"):
            load()


def test_model_type_mismatch_and_missing_dir(hf_dir, tmp_path):
    _, path = hf_dir
    with pytest.raises(ValueError, match="'qwen3_moe' but .* is a 'qwen2_moe' checkpoint"):
        HFMoECheckpointer(str(path), model_type="qwen3_moe")
    with pytest.raises(ValueError, match="config.json not found"):
        HFMoECheckpointer(str(tmp_path / "nowhere"))
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors"):
        from_hf_pretrained(path)


def test_save_shards_by_size_and_reloads_bit_exact_in_bf16(hf_dir, tmp_path):
    _, path = hf_dir
    model = from_hf_pretrained(path, dtype=torch.bfloat16)
    state = model.state_dict()
    ckpt = HFMoECheckpointer(str(path), max_shard_size=4096)
    out = tmp_path / "step_1"
    out.mkdir()
    ckpt.save_checkpoint(state, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 5
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            nbytes = sum(2 * torch.Size(s).numel() for s in sizes)
            assert nbytes <= 4096 or len(sizes) == 1  # a tensor larger than the limit gets its own shard
            assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in state.values())
    reloaded = HFMoECheckpointer(str(out)).load_checkpoint()["model"]
    assert set(reloaded) == set(state)
    for k, v in state.items():
        assert reloaded[k].dtype == torch.bfloat16 and torch.equal(reloaded[k], v), k


def test_save_refuses_mismatched_state_dict(hf_dir, tmp_path):
    _, path = hf_dir
    state = from_hf_pretrained(path).state_dict()
    ckpt = HFMoECheckpointer(str(path))
    bad = dict(state)
    bad.pop("layers.1.mlp.experts.down_proj")
    bad["layers.0.mlp.experts.gate_up_proj"] = bad["layers.0.mlp.experts.gate_up_proj"][:3]
    bad["layers.0.surprise"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        ckpt.save_checkpoint(bad, tmp_path)
    msg = str(err.value)
    assert "missing (1): layers.1.mlp.experts.down_proj" in msg
    assert "unexpected (1): layers.0.surprise" in msg
    assert "layers.0.mlp.experts.gate_up_proj [3, 32, 32] (expected [4, 32, 32])" in msg


def test_router_extra_state_is_saved_beside_and_loaded_back(hf_dir, tmp_path, caplog):
    hf, path = hf_dir
    config = json.loads((path / "config.json").read_text())
    model = build_from_hf_config(config, device="cpu", expert_bias_update_rate=0.01)
    ckpt = HFMoECheckpointer(str(path))
    state = ckpt.load_checkpoint()["model"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert sorted(missing) == ["layers.0.mlp.router.expert_bias", "layers.1.mlp.router.expert_bias"]
    assert all(is_extra_state_key(k) for k in missing) and not unexpected
    bias = torch.tensor([0.5, -0.5, 0.25, 0.0])
    model.layers[1].mlp.router.expert_bias.copy_(bias)
    out = tmp_path / "step_1"
    out.mkdir()
    ckpt.save_checkpoint(model.state_dict(), out)
    assert "no slot in the Hugging Face format" in caplog.text
    assert sorted(load_file(str(out / EXTRA_STATE_FILE))) == sorted(missing)
    # transformers loads the directory unchanged (it does not know the extra file)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # the checkpointer and from_hf_pretrained pick the bias back up
    assert torch.equal(HFMoECheckpointer(str(out)).load_checkpoint()["model"]["layers.1.mlp.router.expert_bias"], bias)
    ours = from_hf_pretrained(out, expert_bias_update_rate=0.01)
    assert torch.equal(ours.layers[1].mlp.router.expert_bias, bias)
    with pytest.raises(ValueError, match="expert_bias_update_rate"):
        from_hf_pretrained(out)  # the bias changes routing: refusing beats silently dropping it


def test_overrides_cannot_change_the_architecture(hf_dir):
    _, path = hf_dir
    with pytest.raises(ValueError, match=r"\['num_layers'\] cannot be overridden"):
        from_hf_pretrained(path, num_layers=3)
    model = from_hf_pretrained(path, aux_loss_coeff=0.5, z_loss_coeff=0.1, max_seq_len=32)
    assert model.layers[0].mlp.aux_loss_coeff == 0.5 and model.max_seq_len == 32


def test_sharded_index_checkpoint_loads(hf_dir, tmp_path):
    """A checkpoint transformers saved in several shards (index json) loads the same."""
    hf, _ = hf_dir
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    compare(hf, from_hf_pretrained(sharded))


def _recipe_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "recipes" / "moe_full_finetune.py"
    spec = importlib.util.spec_from_file_location("moe_full_finetune_for_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HF_CONFIGS = {
    "mixtral/8x7b_full": (0.02, 2, 32),
    "mixtral/8x22b_full": (0.001, 2, 56),
    "qwen2_moe/a2_7b_full": (0.001, 4, 24),
    "qwen2_moe/57b_a14b_full": (0.001, 8, 28),
    "qwen3_moe/30b_a3b_full": (0.001, 8, 48),
    "qwen3_moe/235b_a22b_full": (0.001, 8, 94),
    "olmoe/1b_7b_full": (0.01, 8, 16),
}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_packaged_family_configs_validate(name):
    """Every key known to the recipe, the model builds (meta), and the aux-loss coefficient is the published
    router_aux_loss_coef in effect (coef * top-k / MoE layers)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from torchtune_moe.modules import moe_layers

    path = Path(__file__).resolve().parents[2] / "torchtune_moe" / "configs" / f"{name}.yaml"
    cfg = OmegaConf.load(path)
    from torchtune_moe.training import validate_recipe_config

    validate_recipe_config(cfg)
    assert cfg.checkpointer._component_ == "torchtune_moe.training.HFMoECheckpointer"
    assert str(cfg.tokenizer.path).startswith(str(cfg.checkpointer.checkpoint_dir))
    coef, top_k, layers = HF_CONFIGS[name]
    assert "aux_loss_coeff" not in cfg.model  # the builder's default: a config names only what the user changes
    assert "output_dir" not in cfg.checkpointer
    from torchtune import config as tt_config

    with torch.device("meta"):
        model = tt_config.instantiate(cfg.model)
    assert len(list(moe_layers(model))) == layers
    assert [layer.aux_loss_coeff for _, layer in moe_layers(model)] == pytest.approx([coef * top_k / layers] * layers)


def test_recipe_fine_tunes_a_hub_checkpoint_into_a_hub_directory(tmp_path):
    """tune run moe_full_finetune on a tiny Qwen3-MoE Hub directory: the saved step_N/ loads in transformers,
    holds trained weights, and matches our model of the same directory."""
    import subprocess
    import sys
    from pathlib import Path

    from tokenizer_files import write_qwen_tokenizer

    repo = Path(__file__).resolve().parents[2]
    hf_dir = tmp_path / "hub"
    files = write_qwen_tokenizer(hf_dir, extra_special=["<think>", "</think>"])
    vocab = max(files["special"].values()) + 1
    arch = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[0], max_position_embeddings=128,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**arch))
    hf.save_pretrained(hf_dir)
    cfg = f"""
output_dir: {tmp_path / 'out'}
model:
  _component_: torchtune_moe.models.qwen3_moe.qwen3_moe
  vocab_size: {vocab}
  num_layers: 2
  num_heads: 4
  num_kv_heads: 2
  embed_dim: 32
  head_dim: 16
  intermediate_dim: 48
  moe_intermediate_dim: 16
  num_experts: 4
  experts_per_token: 2
  max_seq_len: 128
  mlp_only_layers: [0]
  aux_loss_coeff: 0.01
tokenizer:
  _component_: torchtune_moe.models.qwen3_moe.qwen3_moe_tokenizer
  path: ${{checkpointer.checkpoint_dir}}/vocab.json
  merges_file: ${{checkpointer.checkpoint_dir}}/merges.txt
  special_tokens_path: ${{checkpointer.checkpoint_dir}}/tokenizer.json
  max_seq_len: 64
dataset:
  _component_: torchtune_moe.data.synthetic_tasks
  num_samples: 64
checkpointer:
  _component_: torchtune_moe.training.HFMoECheckpointer
  checkpoint_dir: {hf_dir}
  output_dir: ${{output_dir}}
  model_type: qwen3_moe
  max_shard_size: 20000
batch_size: 8
epochs: 1
max_steps_per_epoch: 3
optimizer:
  _component_: torch.optim.AdamW
  lr: 0.01
loss:
  _component_: torch.nn.CrossEntropyLoss
device: cpu
dtype: fp32
log_every_n_steps: 1
"""
    (tmp_path / "cfg.yaml").write_text(cfg)
    env = {**__import__("os").environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run(
        [sys.executable, str(repo / "recipes" / "moe_full_finetune.py"), "--config", str(tmp_path / "cfg.yaml")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    step_dirs = sorted((tmp_path / "out").glob("step_*"))
    assert step_dirs, list((tmp_path / "out").iterdir())
    saved = step_dirs[-1]
    assert (saved / "vocab.json").exists() and (saved / "tokenizer.json").exists()
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    before = hf.state_dict()["model.layers.1.mlp.experts.gate_up_proj"]
    after = reloaded.state_dict()["model.layers.1.mlp.experts.gate_up_proj"]
    assert not torch.equal(before, after)  # trained
    compare(reloaded.eval(), from_hf_pretrained(saved))


def test_fused_expert_format_is_refused_with_a_hint(hf_dir, tmp_path):
    hf, _ = hf_dir
    hf.save_pretrained(tmp_path / "fused", save_original_format=False)
    with pytest.raises(ValueError, match="save_original_format=False"):
        from_hf_pretrained(tmp_path / "fused")


def test_from_hf_pretrained_old_import_path_still_works(hf_dir):
    import torchtune_moe.models as models
    from torchtune_moe.training import from_hf_pretrained as new

    with pytest.warns(FutureWarning, match="moved to torchtune_moe.training.from_hf_pretrained"):
        old = models.from_hf_pretrained
    assert old is new


def test_truncated_safetensors_file_is_named(hf_dir):
    _, path = hf_dir
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for load in (lambda: from_hf_pretrained(path), lambda: HFMoECheckpointer(str(path)).load_checkpoint()):
        with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file"):
            load()


def test_expert_down_projection_of_another_shape_is_refused(hf_dir):
    _, path = hf_dir
    _edit_weights(path, lambda t: t.update({"model.layers.1.mlp.experts.2.down_proj.weight": torch.zeros(32, 8)}))
    with pytest.raises(ValueError, match=r"unexpected \(12\): model.layers.1.mlp.experts.0.down_proj.weight"):
        HFMoECheckpointer(str(path)).load_checkpoint()  # uneven shapes: the layer's experts cannot be stacked
    _edit_weights(path, lambda t: t.update({f"model.layers.1.mlp.experts.{e}.down_proj.weight": torch.zeros(32, 8) for e in range(4)}))
    with pytest.raises(ValueError, match=r"unexpected \(4\): model.layers.1.mlp.experts.0.down_proj.weight"):
        HFMoECheckpointer(str(path)).load_checkpoint()  # even, but down [D, H'] does not fit gate/up [H, D]
