"""Sharded checkpoints (``step_N/distcp``, torch.distributed.checkpoint): a run resumes under another world size
(2 -> 1 and 1 -> 2 processes, gloo), router state round-trips, the integrity checks and the fail-safe cover the
shards, and FSDP2 CPU offload is refused where it cannot work."""

import shutil
import subprocess

import pytest
import torch
from _recipe_helpers import FAST, losses, make_recipe, run_recipe

from torchtune_moe.training import DCP_DIRNAME, checkpoint_problems, list_checkpoints

# Two epochs of two steps, router state (aux-loss-free expert_bias) included; B samples per process.
COMMON = ["max_steps_per_epoch=2", "model.expert_bias_update_rate=0.01"]


def _tune_run_2(output_dir, *overrides):
    cmd = ["tune", "run", "--nproc_per_node", "2", "moe_full_finetune", "--config", "tiny/full",
           f"output_dir={output_dir}", *FAST, *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def test_resume_under_another_world_size(tmp_path):
    """Epoch 1 on 2 processes (batch 8 each), epoch 2 resumed on 1 process (batch 16), and the reverse, give the
    loss curve of 1 process running both epochs (2 x 8 samples per rank = 16 per step: the same data). That needs
    the weights, the Adam moments and step counts, the router expert_bias and the lr schedule position to
    carry over between the shardings."""
    ref, two_one, one_two = tmp_path / "ref", tmp_path / "two_one", tmp_path / "one_two"
    run_recipe(ref, overrides=[*COMMON, "batch_size=16", "epochs=2"])
    expected = losses(ref, "ce_loss")
    assert [s for s, _ in expected] == [1, 2, 3, 4]

    _tune_run_2(two_one, *COMMON, "batch_size=8", "epochs=1")
    assert [s for s, _ in list_checkpoints(two_one)] == [2]
    assert sorted(p.name for p in (two_one / "step_2" / DCP_DIRNAME).iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shards
    shutil.rmtree(two_one / "logs")
    recipe = run_recipe(two_one, overrides=[*COMMON, "batch_size=16", "epochs=2", "resume_from_checkpoint=true"])
    assert recipe.global_step == 4

    run_recipe(one_two, overrides=[*COMMON, "batch_size=16", "epochs=1"])
    shutil.rmtree(one_two / "logs")
    res = _tune_run_2(one_two, *COMMON, "batch_size=8", "epochs=2", "resume_from_checkpoint=true")
    assert "RNG states were saved by 1 ranks, now 2" in res.stdout + res.stderr  # said, not silently dropped

    for out in (two_one, one_two):
        got = losses(out, "ce_loss")
        assert [s for s, _ in got] == [3, 4]
        for (step, want), (_, value) in zip(expected[2:], got):
            # Not bit-identical across world sizes (per-rank aux losses, reduction order); a lost optimizer
            # state or expert_bias shows as > 0.01.
            assert value == pytest.approx(want, abs=3e-3), (out.name, step, value, want)


def test_damaged_shard_is_named(tmp_path):
    run_recipe(tmp_path, overrides=["max_steps_per_epoch=2", "save_every_n_steps=1", "batch_size=8"])
    shard = tmp_path / "step_2" / DCP_DIRNAME / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert checkpoint_problems(tmp_path / "step_1") == []
    assert any(str(shard) in p and "truncated" in p for p in checkpoint_problems(tmp_path / "step_2"))
    with pytest.raises(ValueError) as info:
        make_recipe(tmp_path, overrides=["max_steps_per_epoch=2", "save_every_n_steps=1", "batch_size=8",
                                         "resume_from_checkpoint=true"])
    message = str(info.value)
    assert "checkpoint of step 2 is damaged" in message and str(shard) in message
    assert f"the earlier checkpoint {tmp_path / 'step_1'} (step 1) is intact" in message


def test_mid_epoch_checkpoints_hold_only_the_sharded_state(tmp_path):
    """save_every_n_steps checkpoints are distcp/ + recipe_state.pt; the epoch end also exports the model files."""
    run_recipe(tmp_path, overrides=["max_steps_per_epoch=2", "save_every_n_steps=1", "batch_size=8"])
    assert sorted(p.name for p in (tmp_path / "step_1").iterdir()) == [DCP_DIRNAME, "recipe_state.pt"]
    assert sorted(p.name for p in (tmp_path / "step_2").iterdir()) == [
        DCP_DIRNAME, "model.safetensors", "model_config.json", "recipe_state.pt"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["fsdp_cpu_offload=true"], r"fsdp_cpu_offload: true moves parameters.*with device: cpu"),
        (["fsdp_cpu_offload=true", "device=cuda", "optimizer.fused=true"],
         r"optimizer\.fused: true steps on the GPU, but fsdp_cpu_offload: true"),
        (["fsdp_cpu_offload=true", "device=cuda", "optimizer.fused=false", "expert_parallel_degree=2"],
         r"fsdp_cpu_offload: true does not combine with expert_parallel_degree: 2"),
    ],
    ids=["cpu_device", "fused_optimizer", "expert_parallel"],
)
def test_cpu_offload_is_refused_where_it_cannot_work(tmp_path, overrides, message):
    from moe_full_finetune import MoEFullFinetuneRecipe

    from torchtune_moe.config import load_config

    cfg = load_config("tiny/full", [f"output_dir={tmp_path}", *overrides])
    with pytest.raises(ValueError, match=message):
        MoEFullFinetuneRecipe(cfg)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_router_state_round_trips(tmp_path):
    """Expert Threshold state (thresholds and their update count: router buffers no Hub format has) comes back
    from distcp/ exactly."""
    overrides = ["max_steps_per_epoch=2", "batch_size=8"]
    trained = run_recipe(tmp_path, "tiny/full_causal_ec", overrides=overrides)
    resumed = make_recipe(tmp_path, "tiny/full_causal_ec", overrides=[*overrides, "epochs=2",
                                                                      "resume_from_checkpoint=true"])
    try:
        saved = {k: v for k, v in trained._model.state_dict().items()
                 if k.endswith(("router.thresholds", "router.num_updates"))}
        loaded = resumed._model.state_dict()
        assert saved and any(v.abs().sum() > 0 for v in saved.values())
        assert all(torch.equal(v, loaded[k]) for k, v in saved.items())
        assert resumed.global_step == 2 and resumed.epochs_run == 1
    finally:
        resumed.cleanup()


def test_resume_with_another_router_state_is_refused_by_name(tmp_path):
    """A resumed model with router state the checkpoint lacks (expert_bias switched on) is refused, naming it."""
    run_recipe(tmp_path, overrides=["max_steps_per_epoch=1", "batch_size=8"])
    with pytest.raises(ValueError, match=r"resume_from_checkpoint: .*distcp does not fit this model and optimizer "
                                         r"\(.*expert_bias.*\); model options changed since that run: "
                                         r"model\.expert_bias_update_rate: \(unset\) -> 0\.01; resume with the model "
                                         r"and optimizer options"):
        make_recipe(tmp_path, overrides=["max_steps_per_epoch=1", "batch_size=8", "epochs=2",
                                         "model.expert_bias_update_rate=0.01", "resume_from_checkpoint=true"])


def test_resume_that_would_drop_trained_weights_is_refused_by_name(tmp_path):
    """The reverse: the checkpoint holds tensors the resumed model lacks (model.gate_bias switched off). DCP
    would skip them silently (the router biases lost); the resume is refused, naming them."""
    run_recipe(tmp_path, overrides=["max_steps_per_epoch=1", "batch_size=8", "model.gate_bias=true"])
    with pytest.raises(ValueError, match=r"resume_from_checkpoint: .*distcp holds 4 model tensors this model does "
                                         r"not have \(layers\.0\.mlp\.router\.gate\.bias, .*\): the model config "
                                         r"changed since the save"):
        make_recipe(tmp_path, overrides=["max_steps_per_epoch=1", "batch_size=8", "epochs=2",
                                         "resume_from_checkpoint=true"])


def test_full_disk_while_writing_shards_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """ENOSPC inside torch.distributed.checkpoint's writer at step 2: the run stops saying so, step_1 stays."""
    import errno

    from torch.distributed.checkpoint import filesystem

    from torchtune_moe.training import TrainingStopped

    real = filesystem._write_item

    def full_disk(transforms, stream, *args, **kwargs):  # stream: the open shard file of the temporary directory
        if ".step_2" in str(getattr(stream, "name", "")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(transforms, stream, *args, **kwargs)

    monkeypatch.setattr(filesystem, "_write_item", full_disk)
    with pytest.raises(TrainingStopped, match=r"step 2: out of disk space while saving .*step_2; nothing was "
                                              r"replaced.*step_1 \(step 1\)"):
        run_recipe(tmp_path, overrides=["max_steps_per_epoch=2", "save_every_n_steps=1", "batch_size=8"])
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
