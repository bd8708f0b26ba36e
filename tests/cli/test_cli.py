"""`tune-moe ls`, `cp` and `plot` (the CLI in torchtune_moe/_cli)."""

import json
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from torchtune_moe._packaged_configs import packaged_configs
from torchtune_moe._cli._plots import load_ratio, merge_windows, read_disk_logs, read_expert_load, split_metrics
from torchtune_moe._cli.main import main

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "torchtune_moe" / "configs"


def run_cli(capsys, *argv):
    """Run `tune-moe *argv` in process; returns (exit code, stdout, stderr)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def write_fake_run(
    root: Path, num_layers: int = 3, num_experts: int = 8, num_steps: int = 30, log_every: int = 2, seed: int = 0
) -> Path:
    """A run directory as the recipe writes it: torchtune DiskLogger lines in logs/*.txt (two files, as after a
    resume) and expert_load.jsonl. Loads start skewed and even out; expert 1 of the last layer is dead."""
    rng = np.random.default_rng(seed)
    (root / "logs").mkdir(parents=True)
    steps = list(range(log_every, num_steps * log_every + 1, log_every))
    lines = []
    for i, step in enumerate(steps):
        t = i / len(steps)
        ce = 4.0 * math.exp(-3 * t) + 0.3 + 0.05 * rng.standard_normal()
        lb, z = 1.0 + 0.3 * math.exp(-4 * t), 0.02 * math.exp(-t)
        payload = {
            "loss": ce + 0.01 * lb + 0.001 * z,
            "ce_loss": ce,
            "aux/load_balancing": lb,
            "aux/z_loss": z,
            "lr": 3e-3 * min(1.0, (i + 1) / 5),
            "tokens_per_second_per_gpu": 5000 + 100 * rng.standard_normal(),
            "peak_memory_alloc": 0.5,
            # as torchtune_moe.training's ExpertLoadWindow.metrics(): per layer (left out of the scalar figures)
            # and over all layers
            **{f"expert_load/layers.{l}.mlp/max_over_mean": 1.5 for l in range(num_layers)},
            "expert_load/max_over_mean": 1.5,
        }
        # torchtune DiskLogger.log_dict: "Step {step} | " + "{name}:{data} " per item + "\n"
        lines.append(f"Step {step} | " + "".join(f"{k}:{v} " for k, v in payload.items()) + "\n")
    half = len(lines) // 2
    (root / "logs" / "log_1700000000.txt").write_text("".join(lines[: half + 1]))
    # resumed run: a second file repeating the last step of the first, plus DiskLogger.log lines
    (root / "logs" / "log_1700000999.txt").write_text(
        "".join(lines[half:])
        + f"Step {steps[-2]} | grad_norm:tensor(0.2500)\n"
        + f"Step {steps[-1]} | grad_norm:tensor(0.5000, device='cuda:0') note:text\n"
    )
    with open(root / "expert_load.jsonl", "w") as f:
        for i, step in enumerate(steps):
            skew = 3.0 * (1 - i / len(steps)) + 0.2
            layers = {}
            for l in range(num_layers):
                w = np.exp(-skew * np.arange(num_experts) / num_experts * (1 + l % 2)) + 0.05 * rng.random(num_experts)
                tokens = rng.multinomial(4096, w / w.sum())
                if l == num_layers - 1:
                    tokens[1] = 0
                layers[f"layers.{l}.mlp"] = tokens.tolist()
            f.write(json.dumps({"step": step, "layers": layers}) + "\n")
    return root


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails if the file is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ------------------------------------------------------------------------------------------------ ls / cp


def test_ls_lists_packaged_configs_with_recipe(capsys):
    on_disk = sorted(
        str(p.relative_to(CONFIGS_DIR).with_suffix("")) for p in CONFIGS_DIR.rglob("*.yaml")
    )
    assert "tiny/full" in on_disk
    assert list(packaged_configs()) == on_disk
    code, out, _ = run_cli(capsys, "ls")
    assert code == 0
    rows = [line.split() for line in out.strip().splitlines()]
    assert rows[0] == ["RECIPE", "CONFIG"]
    from torchtune_moe._packaged_configs import recipe_of

    expected = sorted(on_disk, key=lambda n: (recipe_of(n), n))  # grouped by recipe, as `tune ls`
    assert rows[1] == ["moe_full_finetune", expected[0]]
    assert [r[-1] for r in rows[1:]] == expected
    assert ["moe_lora_finetune", min(n for n in on_disk if n.endswith("lora"))] in rows  # group header row


@pytest.mark.parametrize("name", ["tiny/full", "tiny/full.yaml"])
def test_cp_to_file_and_dir(tmp_path, capsys, name):
    src = (CONFIGS_DIR / "tiny" / "full.yaml").read_bytes()
    code, out, _ = run_cli(capsys, "cp", name, str(tmp_path / "mine.yaml"))
    assert code == 0 and (tmp_path / "mine.yaml").read_bytes() == src
    assert str(tmp_path / "mine.yaml") in out
    # into an existing directory: keeps the file name
    code, _, _ = run_cli(capsys, "cp", name, str(tmp_path))
    assert code == 0 and (tmp_path / "full.yaml").read_bytes() == src
    # a name without .yaml gets it
    code, _, _ = run_cli(capsys, "cp", name, str(tmp_path / "other"))
    assert code == 0 and (tmp_path / "other.yaml").read_bytes() == src


def test_cp_refuses_to_overwrite_without_force(tmp_path, capsys):
    dest = tmp_path / "mine.yaml"
    dest.write_text("my edits\n")
    code, _, err = run_cli(capsys, "cp", "tiny/full", str(dest))
    assert code == 2
    assert "already exists" in err and "--force" in err
    assert dest.read_text() == "my edits\n"
    code, _, _ = run_cli(capsys, "cp", "tiny/full", str(dest), "--force")
    assert code == 0 and dest.read_bytes() == (CONFIGS_DIR / "tiny" / "full.yaml").read_bytes()


def test_cp_unknown_config_lists_available(tmp_path, capsys):
    code, _, err = run_cli(capsys, "cp", "tiny/fulll", str(tmp_path / "x.yaml"))
    assert code == 2
    assert "tiny/fulll" in err
    for name in packaged_configs():
        assert name in err
    assert not (tmp_path / "x.yaml").exists()


def test_cp_missing_parent_needs_make_parents(tmp_path, capsys):
    dest = tmp_path / "a" / "b" / "c.yaml"
    code, _, err = run_cli(capsys, "cp", "tiny/full", str(dest))
    assert code == 2 and "--make-parents" in err and not dest.exists()
    code, _, _ = run_cli(capsys, "cp", "tiny/full", str(dest), "--make-parents")
    assert code == 0 and dest.is_file()


def test_console_script_entry_point(tmp_path):
    """`python -m torchtune_moe._cli.main` (what the tune-moe script calls) works in a fresh process."""
    res = subprocess.run(
        [sys.executable, "-m", "torchtune_moe._cli.main", "ls"], capture_output=True, text=True, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert "tiny/full" in res.stdout


# ------------------------------------------------------------------------------------------------ plot


def test_read_disk_logs_format(tmp_path):
    run = write_fake_run(tmp_path / "run", num_steps=10)
    metrics = read_disk_logs(sorted((run / "logs").glob("*.txt")))
    steps, loss = metrics["loss"]
    assert steps.tolist() == list(range(2, 21, 2))  # the step repeated across the two files appears once
    assert np.all(np.isfinite(loss))
    # DiskLogger.log lines with tensors printed by str(); non-numeric values are skipped
    assert metrics["grad_norm"][0].tolist() == [18, 20]
    assert metrics["grad_norm"][1].tolist() == [0.25, 0.5]
    assert "note" not in metrics
    losses, other = split_metrics(metrics)
    assert losses == ["loss", "ce_loss", "aux/load_balancing", "aux/z_loss", "lr"]
    assert other == ["expert_load/max_over_mean", "grad_norm", "peak_memory_alloc", "tokens_per_second_per_gpu"]


def test_read_expert_load(tmp_path):
    run = write_fake_run(tmp_path / "run", num_layers=12, num_experts=8, num_steps=5)
    steps, loads = read_expert_load(run / "expert_load.jsonl")
    assert steps.tolist() == [2, 4, 6, 8, 10]
    assert list(loads)[:3] == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]  # natural order
    assert list(loads)[-1] == "layers.11.mlp"
    assert loads["layers.0.mlp"].shape == (5, 8)
    assert np.all(loads["layers.0.mlp"].sum(axis=1) == 4096)


def test_merge_windows_and_load_ratio():
    steps = np.arange(1, 8)
    tokens = np.arange(7 * 2, dtype=np.float64).reshape(7, 2)
    tokens[4] = np.nan  # a window not logged for this layer
    merged_steps, merged, k = merge_windows(steps, {"a": tokens}, max_windows=3)
    assert k == 3
    assert merged_steps.tolist() == [3, 6, 7]  # last step of each group
    np.testing.assert_array_equal(merged["a"], [[6, 9], [6 + 10, 7 + 11], [12, 13]])
    assert merge_windows(steps, {"a": tokens}, max_windows=7)[2] == 1
    ratio = load_ratio(np.array([[3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    np.testing.assert_array_equal(ratio[0], [3.0, 1.0, 0.0, 0.0])  # 4 tokens over 4 experts: ideal 1
    assert np.isnan(ratio[1]).all()


@pytest.mark.parametrize("layers,experts,pages", [(2, 8, 1), (20, 64, 2)])
def test_plot_writes_pngs(tmp_path, capsys, layers, experts, pages):
    run = write_fake_run(tmp_path / "run", num_layers=layers, num_experts=experts)
    code, out, err = run_cli(capsys, "plot", str(run))
    assert code == 0, err
    printed = [Path(p) for p in out.split()]
    names = sorted(p.name for p in printed)
    heatmaps = ["expert_load_over_steps.png"] if pages == 1 else [f"expert_load_over_steps_{i:02d}.png" for i in (1, 2)]
    assert names == sorted(["losses.png", "metrics.png", "expert_load_summary.png", *heatmaps])
    for p in printed:
        assert p.parent == run / "plots" and p.is_file()
        w, h = png_size(p)
        assert 400 <= w <= 4000 and 300 <= h <= 4000, (p.name, w, h)


def test_plot_out_dir(tmp_path, capsys):
    run = write_fake_run(tmp_path / "run")
    code, out, _ = run_cli(capsys, "plot", str(run), "--out", str(tmp_path / "pics"))
    assert code == 0
    assert all(Path(p).parent == tmp_path / "pics" for p in out.split())
    assert not (run / "plots").exists()


@pytest.mark.parametrize("missing", ["expert_load.jsonl", "logs"])
def test_plot_missing_input_names_path(tmp_path, capsys, missing):
    run = write_fake_run(tmp_path / "run")
    target = run / missing
    if target.is_dir():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    else:
        target.unlink()
    code, _, err = run_cli(capsys, "plot", str(run))
    assert code == 2
    assert str(target) in err
    assert not (run / "plots").exists()


def test_plot_malformed_expert_load_names_line(tmp_path, capsys):
    run = write_fake_run(tmp_path / "run", num_steps=3)
    with open(run / "expert_load.jsonl", "a") as f:
        f.write('{"step": 99, "layers": {"layers.0.mlp": "oops"}}\n')
    code, _, err = run_cli(capsys, "plot", str(run))
    assert code == 2
    assert re.search(r"expert_load\.jsonl:4\b", err) and "layers.0.mlp" in err


def test_plot_without_matplotlib_says_how_to_install(tmp_path, capsys, monkeypatch):
    run = write_fake_run(tmp_path / "run", num_steps=3)
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    code, _, err = run_cli(capsys, "plot", str(run))
    assert code == 2
    assert "pip install 'torchtune-moe[plot]'" in err
