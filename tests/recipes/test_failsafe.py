"""Fail-safe runs of ``moe_full_finetune`` (issue 16): nothing a bad run or bad input does may lose or replace a
good checkpoint, and every refusal names what is wrong before any work. Tiny config, 1-6 steps each."""

import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _recipe_helpers import FAST, losses, make_recipe, read_metrics, run_recipe

from torchtune_moe.config import load_config
from torchtune_moe.training import (
    DCP_DIRNAME,
    RECIPE_STATE_FILENAME,
    MoECheckpointer,
    TrainingStopped,
    checkpoint_problems,
    list_checkpoints,
)

SHORT = ["batch_size=8", "dataset.num_samples=200"]


def _all_finite(step_dir: Path) -> bool:
    """Every tensor of the checkpoint's sharded training state (model and optimizer) is finite."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(step_dir / DCP_DIRNAME, step_dir.parent / "state.pt")
    state = torch.load(step_dir.parent / "state.pt", weights_only=False)
    tensors = [v for v in _leaves(state) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return len(tensors) > 0 and all(torch.isfinite(t).all() for t in tensors)


def _leaves(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    else:
        yield x


# ----------------------------------------------------------------------------------------------- non-finite loss


def test_nonfinite_loss_stops_before_the_step_and_keeps_the_good_checkpoint(tmp_path):
    """optimizer.lr=1e6: the loss blows up at step 3. The run stops there naming the step and step_2, and
    keep_last_n_checkpoints=1 never rotates step_2 out for a NaN checkpoint."""
    overrides = [*SHORT, "optimizer.lr=1e6", "clip_grad_norm=null", "max_steps_per_epoch=6", "save_every_n_steps=2",
                 "keep_last_n_checkpoints=1"]
    with pytest.raises(TrainingStopped, match=r"step 3: non-finite .*step_2 \(step 2\)"):
        run_recipe(tmp_path, overrides=overrides)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert _all_finite(tmp_path / "step_2")


def test_skip_mode_skips_a_rare_nonfinite_step(tmp_path, monkeypatch):
    """max_skipped_nonfinite_steps=1: one NaN step (injected at step 2) is skipped: no optimizer update, training
    goes on, and the final checkpoint is finite; a second one would stop the run."""
    from moe_full_finetune import MoEFullFinetuneRecipe

    real = MoEFullFinetuneRecipe._finish_accumulation

    def nan_at_step_2(self):
        out, grad_norm = real(self)
        if self.global_step == 1:
            out["loss"] = float("nan")
        return out, grad_norm

    monkeypatch.setattr(MoEFullFinetuneRecipe, "_finish_accumulation", nan_at_step_2)
    recipe = make_recipe(tmp_path, overrides=[*SHORT, "max_steps_per_epoch=3", "max_skipped_nonfinite_steps=1"])
    steps = []
    real_step = recipe._optimizer.step
    recipe._optimizer.step = lambda *a, **k: (steps.append(recipe.global_step + 1), real_step(*a, **k))
    routed = {}  # step -> tokens routed by the first MoE layer in that step's forwards
    real_update = recipe._expert_load.update

    def count_tokens():
        first = recipe._expert_load.layers[0]
        step = recipe.global_step + 1
        routed[step] = routed.get(step, 0) + first.last_routing.probs_TE.shape[0]
        real_update()

    recipe._expert_load.update = count_tokens
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    assert recipe.skipped_steps == 1 and recipe.global_step == 3
    assert steps == [1, 3]  # step 2 did not update the model
    assert [s for s, _ in losses(tmp_path)] == [1, 3]  # the skipped step is not logged as a loss
    assert _all_finite(tmp_path / "step_3")
    # Nor is its routing counted in the expert load: step 3's record holds step 3's tokens only (top-2: 2 each).
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "expert_load.jsonl").read_text().splitlines())}
    assert sorted(records) == [1, 3] and routed[2] > 0
    for step in (1, 3):
        assert sum(records[step]["layers"]["layers.0.mlp"]) == 2 * routed[step], step


# ----------------------------------------------------------------------------------------------- output_dir


def test_second_run_into_a_used_output_dir_is_refused(tmp_path):
    run_recipe(tmp_path, overrides=[*SHORT, "max_steps_per_epoch=1"])
    before = sorted(p.name for p in (tmp_path / "logs").iterdir())
    with pytest.raises(ValueError, match=r"output_dir: .* already holds a run \(checkpoints step_1\)\. Continue it "
                                         r"with resume_from_checkpoint=true.*overwrite_output_dir=true"):
        make_recipe(tmp_path, overrides=[*SHORT, "max_steps_per_epoch=2"])
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == before  # no new (empty) log file

    run_recipe(tmp_path, overrides=[*SHORT, "max_steps_per_epoch=2", "overwrite_output_dir=true"])
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]  # the old run's step_1 is gone
    assert len(list((tmp_path / "logs").iterdir())) == 1 and [s for s, _ in losses(tmp_path)] == [1, 2]


# ----------------------------------------------------------------------------------------------- resume


def test_changed_lr_on_resume_is_applied(tmp_path):
    """optimizer.lr doubled on resume: the restored optimizer uses the new value (scaled by the warmup schedule,
    lambda(step) = step / 20), instead of silently keeping the checkpoint's."""
    overrides = [*FAST, *SHORT, "max_steps_per_epoch=3", "save_every_n_steps=2"]
    run_recipe(tmp_path, overrides=overrides, fast=())
    (tmp_path / "step_3").rename(tmp_path / "old_step_3")
    run_recipe(tmp_path, overrides=[*overrides, "optimizer.lr=6e-3", "resume_from_checkpoint=true"], fast=())
    lr = {s: m["lr"] for s, m in read_metrics(tmp_path).items()}
    assert lr[2] == pytest.approx(3e-3 * 2 / 20) and lr[3] == pytest.approx(6e-3 * 3 / 20)


def test_optimizer_key_removed_on_resume_keeps_the_checkpoints_value(tmp_path, caplog):
    """~optimizer.weight_decay on resume (the key gone from the config): the restored optimizer keeps the
    checkpoint's value and the notice says so, instead of writing None into its param groups (the next step
    crashed on it)."""
    overrides = [*FAST, *SHORT, "max_steps_per_epoch=3", "save_every_n_steps=2"]
    run_recipe(tmp_path, overrides=overrides, fast=())
    (tmp_path / "step_3").rename(tmp_path / "old_step_3")
    with caplog.at_level("INFO"):
        recipe = run_recipe(tmp_path, overrides=[*overrides, "~optimizer.weight_decay", "resume_from_checkpoint=true"],
                            fast=())
    assert recipe.global_step == 3
    assert {g["weight_decay"] for g in recipe._optimizer.param_groups} == {0.01}
    assert "optimizer.weight_decay: 0.01 -> (unset) (removed from the config: the checkpoint's value is kept)" in caplog.text


def test_config_changes_show_a_value_turned_section_whole():
    """``compile: false`` -> ``compile: {optimizer_step: true}`` on resume is one change shown whole, not the value
    unset and each sub-key set; nested leaf changes stay dotted."""
    from torchtune_moe.training import UNSET, config_changes

    saved = {"compile": False, "optimizer": {"lr": 1e-3}, "samples": {"max_new_tokens": 4}}
    current = {"compile": {"optimizer_step": True}, "optimizer": {"lr": 2e-3}, "samples": None}
    assert config_changes(saved, current) == [
        ("compile", False, {"optimizer_step": True}),
        ("optimizer.lr", 1e-3, 2e-3),
        ("samples", {"max_new_tokens": 4}, None),
    ]
    assert config_changes({"compile": {"model": True}}, {}) == [("compile.model", True, UNSET)]


def test_refused_resume_leaves_the_config_and_logs_alone(tmp_path):
    overrides = [*FAST, *SHORT, "max_steps_per_epoch=2"]
    run_recipe(tmp_path, overrides=overrides, fast=())
    config_text = (tmp_path / "torchtune_config.yaml").read_text()
    logs = sorted((tmp_path / "logs").iterdir())
    with pytest.raises(ValueError, match=r"optimizer\._component_: the checkpoint's optimizer state is for "
                                         r"torch\.optim\.AdamW, not torch\.optim\.Adam"):
        make_recipe(tmp_path, overrides=[*overrides, "optimizer._component_=torch.optim.Adam",
                                         "resume_from_checkpoint=true"], fast=())
    assert (tmp_path / "torchtune_config.yaml").read_text() == config_text
    assert sorted((tmp_path / "logs").iterdir()) == logs


@pytest.mark.parametrize("damage", ["truncate_model", "garbage_model", "garbage_state"])
def test_damaged_checkpoint_names_the_file_and_the_intact_one(tmp_path, damage):
    run_recipe(tmp_path, overrides=[*SHORT, "max_steps_per_epoch=4", "save_every_n_steps=2"])
    model, state = tmp_path / "step_4" / "model.safetensors", tmp_path / "step_4" / RECIPE_STATE_FILENAME
    if damage == "truncate_model":
        model.write_bytes(model.read_bytes()[:1000])
    elif damage == "garbage_model":
        model.write_bytes(b"\x00garbage" * 100)
    else:
        state.write_bytes(b"garbage")
    bad = model if "model" in damage else state
    assert checkpoint_problems(tmp_path / "step_2") == [] and checkpoint_problems(tmp_path / "step_4")
    with pytest.raises(ValueError) as info:
        make_recipe(tmp_path, overrides=[*SHORT, "max_steps_per_epoch=4", "save_every_n_steps=2",
                                         "resume_from_checkpoint=true"])
    message = str(info.value)
    assert "checkpoint of step 4 is damaged" in message and str(bad) in message
    assert f"the earlier checkpoint {tmp_path / 'step_2'} (step 2) is intact" in message
    assert "weights_only" not in message


def test_damaged_start_checkpoint_names_the_file(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"w/model\.safetensors: not a readable safetensors file"):
        make_recipe(tmp_path / "out", overrides=[*SHORT, f"checkpointer.checkpoint_dir={tmp_path / 'w'}"])


# ----------------------------------------------------------------------------------------------- data


def _json_dataset(path: Path, text: str) -> list[str]:
    path.write_text(text)
    return ["dataset._component_=torchtune.datasets.instruct_dataset", "~dataset.num_samples", "~dataset.seed",
            "dataset.source=json", f"dataset.data_files={path}"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", r"dataset: cannot build the dataset from data_files '.*data\.json' \(is the file empty\?\)"),
        ('{"input": "a", "output": "b"}\n{"input": "a", "outp', r"dataset: cannot build the dataset from "
                                                                 r"data_files '.*data\.json'.*DatasetGenerationError"),
        ('{"question": "a", "answer": "b"}\n', r"dataset: row 0 has no column 'input' .*columns found: "
                                               r"\['question', 'answer'\]"),
        ('{"input": "a", "output": "b"}\n{"input": "c", "output": null}\n', r"dataset: row 1 has a null 'output'"),
    ],
    ids=["empty", "malformed", "missing_column", "null_field"],
)
def test_bad_data_file_is_refused_at_setup(tmp_path, text, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        make_recipe(out, overrides=[*_json_dataset(tmp_path / "data.json", text), "batch_size=1"],
                    fast=["samples=null"])
    assert not out.exists()  # refused before anything was written


def test_tokenizer_longer_than_the_model_is_refused_in_validation(tmp_path):
    from moe_full_finetune import MoEFullFinetuneRecipe

    cfg = load_config("tiny/full", [f"output_dir={tmp_path}", "tokenizer.max_seq_len=128"])
    with pytest.raises(ValueError, match=r"tokenizer\.max_seq_len: got 128, longer than the model's max_seq_len 64"):
        MoEFullFinetuneRecipe(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=abc", r"optimizer\.lr: got 'abc'; allowed: a number"),
        ("optimizer.weight_decay=true", r"optimizer\.weight_decay: got True; allowed: a number"),
        ("model.num_experts=eight", r"model\.num_experts: got 'eight'; allowed: an integer"),
        ("lr_scheduler.num_warmup_steps=ten", r"lr_scheduler\.num_warmup_steps: got 'ten'; allowed: an integer"),
    ],
)
def test_wrong_type_in_a_nested_section_names_key_and_value(tmp_path, override, message):
    from moe_full_finetune import MoEFullFinetuneRecipe

    cfg = load_config("tiny/full", [f"output_dir={tmp_path / 'out'}", override])
    with pytest.raises(ValueError, match=message):
        MoEFullFinetuneRecipe(cfg)


# ----------------------------------------------------------------------------------------------- full disk


def test_full_disk_during_a_save_says_so_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real_save = MoECheckpointer.save_checkpoint

    def full_disk(self, model_state_dict, save_dir):
        real_save(self, model_state_dict, save_dir)
        if Path(save_dir).name.startswith(".step_4"):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MoECheckpointer, "save_checkpoint", full_disk)
    with pytest.raises(TrainingStopped, match=r"step 4: out of disk space while saving .*step_4; nothing was "
                                              r"replaced.*the last good checkpoint is .*step_2 \(step 2\)"):
        run_recipe(tmp_path, overrides=[*SHORT, "max_steps_per_epoch=4", "save_every_n_steps=2"])
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the partial save was deleted


# ----------------------------------------------------------------------------------------------- logging


@pytest.mark.parametrize("steps, every, logged", [(3, 2, [2, 3]), (2, 25, [2])])
def test_last_partial_logging_window_is_logged(tmp_path, steps, every, logged):
    run_recipe(tmp_path, overrides=[*SHORT, f"max_steps_per_epoch={steps}", f"log_every_n_steps={every}"], fast=())
    assert [s for s, _ in losses(tmp_path)] == logged
    records = [json.loads(line)["step"] for line in (tmp_path / "expert_load.jsonl").read_text().splitlines()]
    assert records == logged


# ----------------------------------------------------------------------------------------------- distributed

_STALL = """
import sys, time
import moe_full_finetune as recipe

real = recipe.MoEFullFinetuneRecipe._forward_backward

def stall(self, batch):
    if self.rank == 1 and self.global_step == 1:
        time.sleep(300)  # a stalled rank (a hung device, a deadlock, a stuck filesystem)
    return real(self, batch)

recipe.MoEFullFinetuneRecipe._forward_backward = stall
sys.exit(recipe.recipe_main())
"""


def test_a_stalled_rank_ends_the_job_within_the_process_group_timeout(tmp_path):
    """2 processes (gloo), rank 1 stalls at step 2: rank 0's next collective times out after
    process_group_timeout_s=5 and the job ends with a message naming the setting, instead of hanging."""
    script = tmp_path / "stall.py"
    script.write_text(_STALL)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "--config", "tiny/full", f"output_dir={tmp_path / 'out'}", *FAST, *SHORT, "max_steps_per_epoch=4",
           "process_group_timeout_s=5"]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode != 0
    assert "rank 0: a collective did not complete within process_group_timeout_s=5s" in res.stderr, res.stderr[-3000:]
    assert time.monotonic() - t0 < 120
