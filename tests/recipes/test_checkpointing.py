"""Atomic checkpoint directories and the native checkpointer (torchtune_moe.training)."""

import subprocess
import sys
import textwrap

import pytest
import torch

from torchtune_moe.training import (
    RECIPE_STATE_FILENAME,
    Checkpointer,
    MoECheckpointer,
    atomic_directory,
    find_latest_checkpoint,
    list_checkpoints,
    remove_stale_temporaries,
)


def _write_checkpoint(root, step, value):
    with atomic_directory(root / f"step_{step}") as tmp:
        (tmp / "model.bin").write_bytes(bytes([value]) * 1000)
        torch.save({"global_step": step}, tmp / RECIPE_STATE_FILENAME)


def _kill_mid_save(root, step, replace_existing=False):
    """In a child process: start saving step_{step} and die (os._exit: no cleanup runs) half-way through."""
    code = textwrap.dedent(
        f"""
        import os, torch
        from pathlib import Path
        from torchtune_moe.training import atomic_directory, RECIPE_STATE_FILENAME
        root = Path({str(root)!r})
        with atomic_directory(root / "step_{step}") as tmp:
            (tmp / "model.bin").write_bytes(b"half")
            os._exit(9)  # killed: the context manager never finishes
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 9, res.stderr


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    _write_checkpoint(tmp_path, 1, 1)
    _kill_mid_save(tmp_path, 2)
    # The previous checkpoint is untouched; the interrupted one does not exist under its name.
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_1"
    assert (tmp_path / "step_1" / "model.bin").read_bytes() == bytes([1]) * 1000
    assert not (tmp_path / "step_2").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".step_2")]
    assert leftovers  # the hidden temporary directory of the killed save
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]
    # Saving again works.
    _write_checkpoint(tmp_path, 2, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]


def test_kill_while_replacing_a_checkpoint_keeps_it(tmp_path):
    _write_checkpoint(tmp_path, 5, 5)
    _kill_mid_save(tmp_path, 5)  # rewriting step_5 (e.g. after a resume) and killed before the rename
    assert (tmp_path / "step_5" / "model.bin").read_bytes() == bytes([5]) * 1000


def test_exception_during_save_removes_temporary(tmp_path):
    _write_checkpoint(tmp_path, 1, 1)
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "step_2") as tmp:
            (tmp / "model.bin").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]


def test_replacing_an_existing_checkpoint(tmp_path):
    _write_checkpoint(tmp_path, 3, 1)
    _write_checkpoint(tmp_path, 3, 2)
    assert (tmp_path / "step_3" / "model.bin").read_bytes() == bytes([2]) * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3"]


def test_incomplete_directories_are_not_checkpoints(tmp_path):
    (tmp_path / "step_9").mkdir()  # no recipe_state.pt: e.g. written by hand or by another tool
    (tmp_path / "step_x").mkdir()
    _write_checkpoint(tmp_path, 4, 4)
    _write_checkpoint(tmp_path, 10, 10)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 10]  # numeric order, not lexicographic
    assert find_latest_checkpoint(tmp_path / "missing") is None


def test_moe_checkpointer_round_trip(tmp_path):
    from torchtune_moe.models import moe

    cfg = dict(vocab_size=32, num_layers=2, num_heads=2, num_kv_heads=2, embed_dim=16, max_seq_len=8,
               num_experts=4, experts_per_token=2, moe_hidden_dim=8, router="causal_expert_choice")
    model = moe(**cfg)
    ckpt = MoECheckpointer(checkpoint_dir=None, output_dir=str(tmp_path), model_config={"_component_": "x", **cfg})
    assert isinstance(ckpt, Checkpointer)
    assert ckpt.load_checkpoint() == {"model": None}
    save_dir = tmp_path / "save"
    save_dir.mkdir()
    ckpt.save_checkpoint(model.state_dict(), save_dir)
    assert sorted(p.name for p in save_dir.iterdir()) == ["model.safetensors", "model_config.json"]
    loaded = MoECheckpointer(checkpoint_dir=str(save_dir), output_dir=str(tmp_path)).load_checkpoint()["model"]
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()  # router buffers (thresholds) included
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    with pytest.raises(FileNotFoundError, match="checkpointer.checkpoint_dir"):
        MoECheckpointer(checkpoint_dir=str(tmp_path / "nothing"), output_dir=str(tmp_path)).load_checkpoint()
