"""Config names, overrides and validation (torchtune_moe.config)."""

import re
import sys

import pytest
from omegaconf import OmegaConf

from torchtune_moe import config as moe_config
from torchtune_moe.config import Key, integer, load_config, one_of, resolve_config, validate_config


def test_packaged_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("tiny/full", "tiny/full.yaml", "tiny/full_causal_ec", "small/full"):
        path = resolve_config(name)
        assert path.is_file() and path.suffix == ".yaml"
    # A file path works too, and wins over a packaged name.
    own = tmp_path / "tiny" / "full.yaml"
    own.parent.mkdir()
    own.write_text("batch_size: 3\n")
    assert resolve_config("tiny/full.yaml") == own.relative_to(tmp_path)


def test_unknown_config_name_lists_packaged_ones():
    with pytest.raises(ValueError, match=r"--config tiny/fulll: .*tiny/full"):
        resolve_config("tiny/fulll")


def test_overrides_as_in_torchtune():
    cfg = load_config("tiny/full", ["batch_size=3", "optimizer.lr=0.1", "~samples", "output_dir=/x"])
    assert cfg.batch_size == 3 and cfg.optimizer.lr == 0.1 and "samples" not in cfg
    assert cfg.metric_logger.log_dir == "/x/logs"  # interpolations follow the override
    # Replacing a component by name keeps its arguments (torchtune's rule).
    cfg = load_config("tiny/full", ["optimizer=torch.optim.SGD"])
    assert cfg.optimizer._component_ == "torch.optim.SGD" and cfg.optimizer.lr == 0.003


def test_parse_resolves_the_config_name(monkeypatch):
    seen = {}

    @moe_config.parse
    def main(cfg):
        seen["cfg"] = cfg
        return 0

    monkeypatch.setattr(sys, "argv", ["moe_full_finetune", "--config", "tiny/full", "batch_size=5"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0 and seen["cfg"].batch_size == 5 and seen["cfg"].model.num_experts == 8


def test_every_packaged_config_passes_the_recipe_validation():
    """Each packaged config against the keys of its recipe (``tune-moe ls``): the LoRA configs against the LoRA
    recipe's spec, which is the full recipe's with ``model`` a LoRA builder."""
    from moe_full_finetune import MoEFullFinetuneRecipe
    from moe_lora_finetune import MoELoRAFinetuneRecipe

    from torchtune_moe._packaged_configs import LORA_RECIPE, packaged_configs, recipe_of

    names = list(packaged_configs())
    assert {"tiny/full", "tiny/full_causal_ec", "small/full", "tiny/lora"} <= set(names)
    for name in names:
        recipe = MoELoRAFinetuneRecipe if recipe_of(name) == LORA_RECIPE else MoEFullFinetuneRecipe
        validate_config(load_config(name), recipe.config_spec)


def test_compiled_gpu_configs_compile_the_optimizer_step():
    """``compile: true`` compiles the optimizer step too (torchtune's reading): every packaged config that compiles
    steps with a compilable optimizer (no ``fused: true``), so the whole step is compiled as shipped."""
    from torchtune_moe._packaged_configs import packaged_configs
    from torchtune_moe.training import compile_plan

    compiled = [name for name in packaged_configs() if load_config(name).get("compile") is True]
    assert "small/full" in compiled and "qwen3_moe/30b_a3b_full" in compiled
    for name in compiled:
        plan = compile_plan(load_config(name))
        assert plan.optimizer_step and not plan.eager_step_note, (name, plan)


@pytest.mark.parametrize(
    "overrides, step, note",
    [
        (["compile=true", "optimizer.foreach=true"], True, ""),
        (["compile=true"], False, r"single-tensor step .* set optimizer\.foreach=true"),  # foreach unset, CPU
        (["compile=true", "optimizer.fused=true"], False, r"optimizer\.fused: true .* set optimizer\.fused=false"),
        (["compile=true", "optimizer._component_=torchao.optim.AdamW8bit", "~optimizer.fused"], False,
         r"torchao\.optim\.AdamW8bit: only torch\.optim"),
        (["compile=true", "optimizer=torch.optim.SGD", "~optimizer.betas", "optimizer.foreach=true",
          "expert_parallel_degree=2"], False, r"SGD: with expert_parallel_degree: 2 .* only Adam's and AdamW's"),
        (["compile=true", "optimizer.foreach=true", "expert_parallel_degree=2"], True, ""),
        (["compile=false", "optimizer.foreach=true"], False, ""),
        (["compile={loss: false}", "optimizer.foreach=true"], False, ""),  # a mapping's default: no step
    ],
)
def test_compile_true_compiles_the_step_where_it_can(overrides, step, note):
    """``compile: true`` takes the step when it can be compiled and otherwise says why it stays eager (an explicit
    ``compile.optimizer_step: true`` is refused instead: tests/recipes/test_moe_full_finetune.py)."""
    from torchtune_moe.training import compile_plan

    plan = compile_plan(load_config("tiny/full", overrides))
    assert plan.optimizer_step is step
    if note:
        assert re.search(note, plan.eager_step_note), plan.eager_step_note
    else:
        assert plan.eager_step_note == ""


def test_lora_spec_extends_the_full_spec():
    """One spec built from the full one: every full-recipe key is known to the LoRA recipe, ``model`` is checked
    as a LoRA builder, and a LoRA config's bad values are refused naming the key."""
    from torchtune_moe.training import FULL_FINETUNE_CONFIG_SPEC, LORA_FINETUNE_CONFIG_SPEC, validate_recipe_config

    assert set(LORA_FINETUNE_CONFIG_SPEC) == set(FULL_FINETUNE_CONFIG_SPEC)
    own = ("model", "expert_parallel_degree")  # the LoRA recipe's adapters are not split over ranks yet
    assert all(LORA_FINETUNE_CONFIG_SPEC[k] is v for k, v in FULL_FINETUNE_CONFIG_SPEC.items() if k not in own)
    with pytest.raises(ValueError, match=r"expert_parallel_degree"):
        validate_recipe_config(load_config("tiny/lora", ["+expert_parallel_degree=2"]), LORA_FINETUNE_CONFIG_SPEC)
    validate_recipe_config(load_config("tiny/lora"), LORA_FINETUNE_CONFIG_SPEC)
    with pytest.raises(ValueError, match=r"model\.lora_rank: got 'abc'"):
        validate_recipe_config(load_config("tiny/lora", ["model.lora_rank=abc"]), LORA_FINETUNE_CONFIG_SPEC)
    with pytest.raises(ValueError, match=r"model: got .*allowed: a lora_model with base"):
        validate_recipe_config(load_config("tiny/lora", ["~model.base"]), LORA_FINETUNE_CONFIG_SPEC)
    with pytest.raises(ValueError, match=r"lora_rnak: unknown config key"):
        validate_recipe_config(load_config("tiny/lora", ["+lora_rnak=8"]), LORA_FINETUNE_CONFIG_SPEC)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"a": 1, "b": "x", "c": 1}, r"c: unknown config key"),
        ({"b": "x"}, r"a: missing required config key"),
        ({"a": True, "b": "x"}, r"a: got True; allowed: an integer >= 1"),
        ({"a": 1, "b": None}, r"b: must not be null"),
        ({"a": 1, "b": "x", "n": {"_component_": "torch.nn.Linear", "in_feature": 2}},
         r"n\.in_feature: 'torch\.nn\.Linear' has no argument 'in_feature'\. Did you mean 'in_features'\?"),
        ({"a": 1, "b": "x", "n": {"_component_": "torchtune_moe.models.moe", "router": {"_component_": "no.such"}}},
         r"n\.router\._component_: cannot import 'no\.such'"),
        ({"a": 1, "b": "x", "m": {"_component_": "torch.nn.Linear"}},
         r"m\._component_: 'torch\.nn\.Linear' must accept the argument 'device_map'"),
    ],
)
def test_validate_config_names_the_key(values, message):
    spec = {
        "a": Key(integer(1), required=True),
        "b": Key(one_of("x", "y")),
        "n": Key(lambda v: None),
        "m": Key(lambda v: None, recipe_kwargs=("device_map",)),
    }
    with pytest.raises(ValueError, match=message):
        validate_config(OmegaConf.create(values), spec)


def test_grouped_gemm_environment_is_checked_with_the_config(monkeypatch):
    """TORCHTUNE_MOE_GROUPED_GEMM (the experts' grouped GEMMs) is refused by name before any work."""
    from torchtune_moe.training import validate_recipe_config

    cfg = load_config("tiny/full")
    for ok in ("auto", "torch", "Torch", ""):
        monkeypatch.setenv("TORCHTUNE_MOE_GROUPED_GEMM", ok)
        validate_recipe_config(cfg)
    monkeypatch.setenv("TORCHTUNE_MOE_GROUPED_GEMM", "fast")
    with pytest.raises(ValueError, match="must be one of auto, torch, cute; got 'fast'"):
        validate_recipe_config(cfg)
    monkeypatch.setenv("TORCHTUNE_MOE_GROUPED_GEMM", "cute")  # no quack or no Hopper GPU in the CPU tests
    with pytest.raises(ValueError, match="TORCHTUNE_MOE_GROUPED_GEMM=cute"):
        validate_recipe_config(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["compile={model: false, cuda_graphs: true}"], r"needs compile\.model: true"),
        (["compile={cuda_graphs: true}", "device=cpu"], r"needs device: cuda \(this config runs on cpu\)"),
        (["compile={cuda_graphs: true}", "device=cuda", "enable_activation_checkpointing=true"],
         r"needs enable_activation_checkpointing: false"),
        (["compile={cuda_graphs: true}", "device=cuda", "fsdp_cpu_offload=true"], r"needs fsdp_cpu_offload: false"),
        (["compile={cuda_graphs: true}", "device=cuda", "gradient_accumulation_steps=2"],
         r"needs gradient_accumulation_steps: 1"),
        (["compile={cuda_graphs: true}", "device=cuda", "replay_routing_column=routes"],
         r"needs replay_routing_column: null"),
        (["compile={cuda_graphs: maybe}"], r"compile\.cuda_graphs: got 'maybe'"),
    ],
)
def test_cuda_graphs_refused_where_a_replay_cannot_stand_for_the_pass(overrides, message):
    """``compile.cuda_graphs`` is refused by name, before any work, with what it needs: compiled layers on a CUDA
    device, and none of activation checkpointing, CPU offload, gradient accumulation or routing replay (validation
    does not need the
    device itself: a GPU config validates on any machine)."""
    from torchtune_moe.training import validate_recipe_config

    cfg = load_config("tiny/full", ["dtype=bf16", *overrides])
    with pytest.raises(ValueError, match=message):
        validate_recipe_config(cfg)


def test_cuda_graphs_plan_and_the_one_process_rule():
    from torchtune_moe.training import check_cuda_graphs_world, compile_plan

    assert compile_plan(load_config("tiny/full", ["compile={cuda_graphs: true}"])).cuda_graphs
    assert not compile_plan(load_config("tiny/full", ["compile=true"])).cuda_graphs
    plan = compile_plan(load_config("tiny/full", ["compile={cuda_graphs: true}"]))
    check_cuda_graphs_world(plan, 1)
    with pytest.raises(ValueError, match=r"compile\.cuda_graphs: true runs on one process \(this run has 2"):
        check_cuda_graphs_world(plan, 2)
    check_cuda_graphs_world(compile_plan(load_config("tiny/full", ["compile=true"])), 2)
