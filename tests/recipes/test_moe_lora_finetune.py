"""The ``moe_lora_finetune`` recipe on CPU: only adapters train, intermediate checkpoints hold the adapter and
optimizer state only and resume exactly, the final checkpoint holds the merged model; on a Hub checkpoint the
adapter is a PEFT directory transformers+PEFT loads with our logits, and the merged model reloads in transformers."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _recipe_helpers import FAST, losses, run_recipe

from torchtune_moe.config import load_config
from torchtune_moe.training import list_checkpoints


def _run(output_dir: Path, config="tiny/lora", overrides=(), fast=FAST):
    from moe_lora_finetune import MoELoRAFinetuneRecipe

    cfg = load_config(config, [f"output_dir={output_dir}", *fast, *overrides])
    recipe = MoELoRAFinetuneRecipe(cfg)
    recipe.setup(cfg)
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


def test_tiny_lora_adapter_checkpoints_resume_exactly_and_merge_at_the_end(tmp_path):
    overrides = ["max_steps_per_epoch=6", "save_every_n_steps=3", "batch_size=8", "gradient_accumulation_steps=2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    recipe = _run(full, overrides=overrides)
    trainable = {n for n, p in recipe._model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    assert [s for s, _ in list_checkpoints(full)] == [3, 6]
    # Intermediate: adapter + recipe state only. Final: also the merged model.
    assert sorted(p.name for p in (full / "step_3").iterdir()) == ["adapter", "recipe_state.pt"]
    assert (full / "step_6" / "model.safetensors").is_file()
    adapter = load_file(full / "step_3" / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora" in k for k in adapter)
    opt = torch.load(full / "step_3" / "recipe_state.pt", weights_only=True)["optimizer"]
    assert len(opt["state"]) == len(adapter)  # optimizer state of the adapters only

    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "step_6")
    shutil.rmtree(resumed / "logs")
    recipe = _run(resumed, overrides=overrides + ["resume_from_checkpoint=true"])
    assert recipe.global_step == 6
    assert losses(resumed) == losses(full)[3:]  # bit-identical
    a, b = load_file(full / "step_6" / "model.safetensors"), load_file(resumed / "step_6" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("lora" in k for k in a)

    # The merged checkpoint rebuilds from its model_config.json (the base builder) and computes what the adapted
    # model computes.
    import json

    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    merged = tt_config.instantiate(OmegaConf.create(json.loads((full / "step_6" / "model_config.json").read_text())))
    merged.load_state_dict(a)
    tokens = torch.randint(0, 101, (2, 12))
    recipe._model.eval()
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), recipe._model(tokens), atol=1e-5, rtol=1e-5)


def test_lora_recipe_refuses_a_model_without_adapters(tmp_path):
    from moe_lora_finetune import MoELoRAFinetuneRecipe

    cfg = load_config("tiny/full", [f"output_dir={tmp_path}", *FAST])
    with pytest.raises(ValueError, match="no LoRA adapter"):
        MoELoRAFinetuneRecipe(cfg)


def test_lora_recipe_refuses_linear_cross_entropy_with_an_adapted_output(tmp_path):
    from moe_lora_finetune import MoELoRAFinetuneRecipe

    cfg = load_config("tiny/lora", [f"output_dir={tmp_path / 'out'}", *FAST, "model.apply_lora_to_output=true",
                                    "loss._component_=torchtune_moe.modules.LinearCrossEntropyLoss"])
    recipe = MoELoRAFinetuneRecipe(cfg)
    with pytest.raises(ValueError, match="got LoRALinear .*with apply_lora_to_output use torchtune.modules.loss.CEWith"):
        recipe.setup(cfg)
    assert not (tmp_path / "out").exists()


def test_lora_recipe_on_a_hub_checkpoint_writes_a_peft_adapter_and_merged_hub_weights(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import peft.tuners.lora.torchao
    import peft.utils.quantization_utils

    for module in (peft.tuners.lora.torchao, peft.utils.quantization_utils):  # see test_peft_adapter.py
        monkeypatch.setattr(module, "is_torchao_available", lambda: False)

    hf_dir = tmp_path / "hub"
    arch = dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=128, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**arch)).save_pretrained(hf_dir)
    import json

    from torchtune_moe.models.qwen3_moe import qwen3_moe_hf_config_to_kwargs

    # The base builder's arguments are those config.json gives (tiny/lora's moe() arguments removed).
    kwargs = qwen3_moe_hf_config_to_kwargs(json.loads((hf_dir / "config.json").read_text()), max_seq_len=128)
    tiny_args = ["vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "max_seq_len", "num_experts",
                 "experts_per_token", "moe_hidden_dim", "router", "norm_topk_prob", "aux_loss_coeff", "z_loss_coeff"]
    overrides = [f"~model.{k}" for k in tiny_args] + [
        f"model.{k}={json.dumps(v)}" for k, v in kwargs.items()
    ] + [
        "model.base=torchtune_moe.models.qwen3_moe.qwen3_moe", "model.lora_rank=8", "model.lora_alpha=16",
        "checkpointer._component_=torchtune_moe.training.HFMoECheckpointer", f"checkpointer.checkpoint_dir={hf_dir}",
        "~checkpointer.model_config", "checkpointer.max_shard_size=20000", "max_steps_per_epoch=3", "batch_size=8",
    ]
    recipe = _run(tmp_path / "out", overrides=overrides)
    final = tmp_path / "out" / "step_3"
    adapter_dir = final / "adapter"
    keys = load_file(adapter_dir / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_B.weight" in keys

    tokens = torch.randint(0, 128, (2, 12))
    recipe._model.eval()
    with torch.no_grad():
        ours = recipe._model(tokens)
        base = transformers.Qwen3MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
        assert (with_adapter(tokens).logits - ours).abs().max().item() <= 1e-4
        merged = transformers.Qwen3MoeForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
        assert (merged(tokens).logits - ours).abs().max().item() <= 1e-4


def test_every_packaged_lora_config_builds_a_lora_model():
    from torchtune import config as tt_config

    from torchtune_moe._packaged_configs import packaged_configs
    from torchtune_moe.modules.peft import LoRAMoELinear, lora_modules

    names = [n for n in packaged_configs() if n.endswith("lora")]
    families = {n.split("/")[0] for n in names}
    assert families == {
        "tiny", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "glm4_moe", "deepseek_v3", "deepseek_v2", "gpt_oss",
        "qwen3_5_moe",
    }
    full = {n.removesuffix("_full") for n in packaged_configs() if n.endswith("_full") and not n.startswith(("tiny", "small"))}
    assert full <= {n.removesuffix("_lora") for n in names}  # a LoRA config for every size
    for name in names:
        with torch.device("meta"):
            model = tt_config.instantiate(load_config(name).model)
        assert any(isinstance(m, LoRAMoELinear) for _, m in lora_modules(model)), name


def test_two_processes_fsdp2_lora(tmp_path):
    """`tune run --nproc_per_node 2 moe_lora_finetune --config tiny/lora` (gloo, FSDP2): trains, writes adapter-only
    intermediate checkpoints and a merged final one; its losses match one process with the same global batch.
    The two processes use LinearCrossEntropyLoss (the shipped configs' loss; here with a frozen output weight),
    the one process torch's CrossEntropyLoss."""
    import subprocess

    common = ["max_steps_per_epoch=4", "save_every_n_steps=2", *FAST]
    one, two = tmp_path / "one", tmp_path / "two"
    _run(one, overrides=["batch_size=16", *common[:2]])
    cmd = ["tune", "run", "--nproc_per_node", "2", "moe_lora_finetune", "--config", "tiny/lora",
           f"output_dir={two}", "batch_size=8", *common, "loss._component_=torchtune_moe.modules.LinearCrossEntropyLoss"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert sorted(p.name for p in (two / "step_2").iterdir()) == ["adapter", "recipe_state.pt"]
    for (s1, v1), (s2, v2) in zip(losses(one, "ce_loss"), losses(two, "ce_loss")):
        assert v1 == pytest.approx(v2, abs=2e-3), (s1, v1, v2)
    a, b = load_file(one / "step_4" / "model.safetensors"), load_file(two / "step_4" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=2e-3) for k in a if "expert_bias" not in k)


def test_tiny_qlora_trains_resumes_and_merges(tmp_path):
    from torchao.dtypes.nf4tensor import NF4Tensor

    overrides = ["model.quantize_base=true", "max_steps_per_epoch=4", "save_every_n_steps=2", "batch_size=8"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    recipe = _run(full, overrides=overrides)
    assert isinstance(recipe._model.layers[0].mlp.experts.gate_up_proj, NF4Tensor)
    assert isinstance(recipe._model.layers[0].attn.q_proj.weight, NF4Tensor)
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "step_4")
    shutil.rmtree(resumed / "logs")
    _run(resumed, overrides=overrides + ["resume_from_checkpoint=true"])
    assert losses(resumed) == losses(full)[2:]
    merged = load_file(full / "step_4" / "model.safetensors")
    assert merged["layers.0.mlp.experts.gate_up_proj"].shape == (8, 256, 128)  # dense again


def test_benchmark_dry_run(tmp_path):
    """benchmarks/lora.py --dry-run (tiny shapes on CPU) runs every part, the comparison with transformers + PEFT
    included: the GPU script's code stays working."""
    import subprocess
    import sys

    pytest.importorskip("peft")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "lora.py"
    res = subprocess.run([sys.executable, str(script), "--dry-run", "--parts", "layer", "model", "hf", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    out = json.loads((tmp_path / "lora.json").read_text())
    assert set(out["layer"]["ms"]) == {"frozen", "lora", "lora_torch", "qlora", "full"}
    assert len(out["layer"]["lora_kernels_rel_err"]) == 6  # output, grad x, four adapter factors
    assert [m["variant"] for m in out["model"]] == ["lora", "qlora"]
    (hf,) = out["hf"]
    ours, peft_side = hf["ours"], hf["hf_peft"]
    # Both sides trained (losses move), every layer checkpointed, the same frozen base; PEFT put the expert
    # adapters on the fused parameters (gate_up at rank 2r): more trainable parameters by 2I x r x E per layer.
    for side in (ours, peft_side):
        assert side["checkpointed_layers"] == hf["layers"] == 2
        assert side["losses"][-1] < side["losses"][0]
    assert ours["total_params"] - ours["trainable_params"] == peft_side["total_params"] - peft_side["trainable_params"]
    assert peft_side["peft_target_parameters"] == ["down_proj", "gate_up_proj"]
    assert peft_side["trainable_expert_params"] - ours["trainable_expert_params"] == 2 * (2 * 128 * 16 * 8)
    assert "| transformers + PEFT |" in (tmp_path / "lora_vs_peft.md").read_text()


# ------------------------------------------------------------------------- the full recipe's fail-safe checks

_SHORT = ["batch_size=8", "dataset.num_samples=200"]


def test_lora_nonfinite_loss_stops_and_keeps_the_good_adapter(tmp_path, monkeypatch):
    """A NaN loss at step 2 stops the LoRA run before the optimizer step, naming step_1, whose adapter stays."""
    from moe_lora_finetune import MoELoRAFinetuneRecipe

    from torchtune_moe.training import TrainingStopped

    real = MoELoRAFinetuneRecipe._finish_accumulation

    def nan_at_step_2(self):
        out, grad_norm = real(self)
        if self.global_step == 1:
            out["loss"] = float("nan")
        return out, grad_norm

    monkeypatch.setattr(MoELoRAFinetuneRecipe, "_finish_accumulation", nan_at_step_2)
    with pytest.raises(TrainingStopped, match=r"step 2: non-finite .*step_1 \(step 1\)"):
        _run(tmp_path, overrides=[*_SHORT, "max_steps_per_epoch=3", "save_every_n_steps=1"])
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    adapter = load_file(tmp_path / "step_1" / "adapter" / "adapter_model.safetensors")
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())


def test_lora_second_run_into_a_used_output_dir_is_refused(tmp_path):
    _run(tmp_path, overrides=[*_SHORT, "max_steps_per_epoch=1"])
    with pytest.raises(ValueError, match=r"output_dir: .* already holds a run \(checkpoints step_1\)"):
        _run(tmp_path, overrides=[*_SHORT, "max_steps_per_epoch=2"])


def test_lora_resume_names_a_damaged_adapter_and_reports_a_changed_base(tmp_path, caplog):
    """A damaged step_N/adapter is named with the intact earlier checkpoint; the base's checkpoint_dir is part of
    the run on resume (the base is read from it), so a change is reported instead of ignored."""
    from torchtune_moe.training import checkpoint_problems

    overrides = [*_SHORT, "max_steps_per_epoch=4", "save_every_n_steps=2"]
    run_recipe(tmp_path / "base", overrides=[*_SHORT, "max_steps_per_epoch=1"])  # the full recipe: a base
    base = tmp_path / "base" / "step_1"
    run = tmp_path / "run"
    _run(run, overrides=[*overrides, f"checkpointer.checkpoint_dir={base}"])
    adapter = run / "step_4" / "adapter" / "adapter_model.safetensors"
    good = adapter.read_bytes()
    adapter.write_bytes(good[:100])
    assert checkpoint_problems(run / "step_4")
    with pytest.raises(ValueError) as info:
        _run(run, overrides=[*overrides, f"checkpointer.checkpoint_dir={base}", "resume_from_checkpoint=true"])
    assert "checkpoint of step 4 is damaged" in str(info.value) and str(adapter) in str(info.value)
    assert f"the earlier checkpoint {run / 'step_2'} (step 2) is intact" in str(info.value)

    adapter.write_bytes(good)
    shutil.rmtree(run / "step_4")
    other = tmp_path / "other_base"
    shutil.copytree(base, other)
    with caplog.at_level("INFO"):
        recipe = _run(run, overrides=[*overrides, f"checkpointer.checkpoint_dir={other}", "resume_from_checkpoint=true"])
    assert recipe.global_step == 4
    assert "checkpointer.checkpoint_dir" in caplog.text


@pytest.mark.parametrize("with_base", [False, True])
def test_lora_resume_with_another_rank_is_refused_naming_the_changed_option(tmp_path, with_base):
    """Adapters saved at rank 16 do not fit a rank-8 model: the resume is refused with the changed model option
    named (it crashed with load_state_dict's size-mismatch traceback before), and the checkpoint is left as it was."""
    overrides = [*_SHORT, "max_steps_per_epoch=2", "save_every_n_steps=2"]
    if with_base:
        run_recipe(tmp_path / "base", overrides=[*_SHORT, "max_steps_per_epoch=1"])  # the full recipe: a base
        overrides.append(f"checkpointer.checkpoint_dir={tmp_path / 'base' / 'step_1'}")
    run = tmp_path / "run"
    _run(run, overrides=overrides)
    before = sorted(p.relative_to(run) for p in (run / "step_2").rglob("*"))
    with pytest.raises(ValueError) as info:
        _run(run, overrides=[*overrides, "model.lora_rank=8", "resume_from_checkpoint=true"])
    message = str(info.value)
    assert "resume_from_checkpoint" in message and "does not" in message, message
    assert "model.lora_rank: 16 -> 8" in message, message
    assert sorted(p.relative_to(run) for p in (run / "step_2").rglob("*")) == before
