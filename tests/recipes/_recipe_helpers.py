"""Helpers for the recipe tests: run ``moe_full_finetune`` in process on the tiny configs, read its disk logs."""

from pathlib import Path
from typing import Sequence

from torchtune_moe._cli._plots import read_disk_logs
from torchtune_moe.config import load_config

# Small, fast runs: fewer samples to build, a short epoch, a log line per step, no sample generation at the end.
FAST = ("dataset.num_samples=2000", "log_every_n_steps=1", "samples=null")


def read_metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    """``{step: {key: value}}`` from the DiskLogger files in ``output_dir/logs`` (later files win), parsed by
    ``tune-moe plot``'s reader; ``{}`` when nothing was logged."""
    files = sorted((Path(output_dir) / "logs").glob("*.txt"))
    try:
        series = read_disk_logs(files) if files else {}
    except ValueError:  # no `Step N | ...` line in any file
        series = {}
    out: dict[int, dict[str, float]] = {}
    for key, (steps, values) in series.items():
        for step, value in zip(steps.tolist(), values.tolist()):
            out.setdefault(int(step), {})[key] = float(value)
    return out


def losses(output_dir: Path, key: str = "loss") -> list[tuple[int, float]]:
    """``[(step, value)]`` of one logged metric, by step."""
    return [(s, m[key]) for s, m in sorted(read_metrics(output_dir).items()) if key in m]


def make_recipe(output_dir: Path, config: str = "tiny/full", overrides: Sequence[str] = (), fast: Sequence[str] = FAST):
    """A set-up recipe (in process) with ``output_dir`` and the ``fast`` overrides, then ``overrides``."""
    from moe_full_finetune import MoEFullFinetuneRecipe

    cfg = load_config(config, [f"output_dir={output_dir}", *fast, *overrides])
    recipe = MoEFullFinetuneRecipe(cfg)
    recipe.setup(cfg)
    return recipe


def run_recipe(output_dir: Path, config: str = "tiny/full", overrides: Sequence[str] = (), fast: Sequence[str] = FAST):
    """Runs the recipe in process (setup, train, cleanup); returns the recipe."""
    recipe = make_recipe(output_dir, config, overrides, fast)
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe

