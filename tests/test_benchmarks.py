"""benchmarks/train_step.py --dry-run --profile (tiny shapes on CPU) runs: the GPU script's code stays working.
(benchmarks/lora.py's dry run: tests/recipes/test_moe_lora_finetune.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def test_train_step_dry_run_with_profile(tmp_path):
    pytest.importorskip("transformers")
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--profile", "--profile-steps", "1", "--warmup", "1", "--shapes",
         "qwen3", "--variants", "hf", "ours", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "train_step.json").read_text())["results"]["qwen3"]
    assert set(results) == {"hf", "ours"} and not any("error" in r for r in results.values()), results
    for variant in ("hf", "ours"):
        table = (tmp_path / f"profile_qwen3_{variant}.txt").read_text().splitlines()
        assert table[0].startswith(f"qwen3 {variant}: 4 layers")
        assert "top 25 CPU operators" in table[1]  # on a GPU: the top 25 GPU kernels
        assert len(table) == 3 + 25 and "aten::" in "".join(table[3:])
