"""Helpers for the recipe tests: run ``moe_full_finetune`` in process on the tiny configs, read its disk logs."""

import re
from pathlib import Path
from typing import Sequence

from torchtune_moe.config import load_config

# Small, fast runs: fewer samples to build, a short epoch, a log line per step, no sample generation at the end.
FAST = ("dataset.num_samples=2000", "log_every_n_steps=1", "samples=null")

_LINE_RE = re.compile(r"^Step (\d+) \| (.*)$")
_PAIR_RE = re.compile(r"([^\s:]+):(\S+)")


def read_metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    """``{step: {key: value}}`` from the DiskLogger files in ``output_dir/logs`` (later files win)."""
    out: dict[int, dict[str, float]] = {}
    for path in sorted((Path(output_dir) / "logs").glob("*.txt")):
        for line in path.read_text().splitlines():
            m = _LINE_RE.match(line)
            if m:
                out.setdefault(int(m.group(1)), {}).update(
                    {k: float(v) for k, v in _PAIR_RE.findall(m.group(2))}
                )
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

