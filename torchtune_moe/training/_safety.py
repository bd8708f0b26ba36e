"""What keeps a run from losing or mixing up work: a used output directory is refused, config changes on resume
are listed (applied or refused), non-finite losses and full disks stop the run with the last good checkpoint
named.

A recipe raises :class:`TrainingStopped` for a condition found during training (the message says what happened
and what is intact); configuration problems stay ``ValueError``.
"""

from __future__ import annotations

import errno
import math
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from torchtune_moe.training._checkpointing import latest_intact_checkpoint, list_checkpoints

__all__ = [
    "TrainingStopped",
    "CONFIG_FILENAME",
    "previous_run_files",
    "check_output_dir",
    "clear_previous_run",
    "UNSET",
    "config_changes",
    "is_out_of_space",
    "last_good_checkpoint_note",
    "all_finite",
    "first_nonfinite",
]

#: torchtune's metric loggers write the resolved config here (``{output_dir}/torchtune_config.yaml``).
CONFIG_FILENAME = "torchtune_config.yaml"
# Everything a run of the recipe writes into its output directory (step_N/ directories besides).
_RUN_FILES = ("logs", "expert_load.jsonl", CONFIG_FILENAME)


class TrainingStopped(RuntimeError):
    """A run stopped on purpose (non-finite loss, full disk, ...); the message says why and what is intact."""


def previous_run_files(output_dir: str | Path) -> list[Path]:
    """What an earlier run left in ``output_dir``: ``step_N`` directories (complete or not), ``logs/``,
    ``expert_load.jsonl``, ``torchtune_config.yaml``."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in sorted(root.iterdir()) if p.name.startswith("step_") and p.is_dir()]
    found += [root / name for name in _RUN_FILES if (root / name).exists()]
    return found


def check_output_dir(output_dir: str | Path, overwrite: bool) -> list[Path]:
    """Refuses to start a new run (no ``resume_from_checkpoint``) in a directory an earlier run wrote to, unless
    ``overwrite``; returns what :func:`clear_previous_run` will delete (empty when the directory is unused).

    Raises:
        ValueError: naming the directory, its checkpoints, and the two ways on.
    """
    found = previous_run_files(output_dir)
    if not found or overwrite:
        return found
    checkpoints = [f"step_{s}" for s, _ in list_checkpoints(output_dir)]
    what = f"checkpoints {', '.join(checkpoints)}" if checkpoints else f"{', '.join(p.name for p in found)}"
    raise ValueError(
        f"output_dir: {output_dir} already holds a run ({what}). Continue it with resume_from_checkpoint=true, "
        f"choose another output_dir, or set overwrite_output_dir=true to delete it and start anew"
    )


def clear_previous_run(paths: Iterable[Path]) -> None:
    """Deletes what :func:`check_output_dir` found (``overwrite_output_dir: true``)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


class _Unset:
    """A config key absent on one side of :func:`config_changes` (falsy; shown as ``(unset)``)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "(unset)"


#: The value :func:`config_changes` gives a key that one of the two configs does not have.
UNSET = _Unset()


def config_changes(saved: dict, current: dict, ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """``(key, value in the checkpoint's run, value now)`` for every leaf key that differs between two resolved
    configs (dotted keys; a key one side lacks has :data:`UNSET` there, unlike an explicit ``null``), keys under
    ``ignore`` prefixes left out."""
    a, b = _flatten(saved), _flatten(current)
    # A key that is a value on one side and a section on the other (``compile: true`` -> ``compile: {...}``) is one
    # change, shown whole, rather than the value unset and each sub-key set.
    whole = {k for k in a if isinstance(_lookup(current, k), dict)}
    whole |= {k for k in b if isinstance(_lookup(saved, k), dict)}
    a = {k: v for k, v in a.items() if not any(k.startswith(w + ".") for w in whole)}
    b = {k: v for k, v in b.items() if not any(k.startswith(w + ".") for w in whole)}
    for w in whole:
        a[w], b[w] = _lookup(saved, w), _lookup(current, w)
    ignore = tuple(ignore)
    changes = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p + ".") for p in ignore):
            continue
        old, new = a.get(key, UNSET), b.get(key, UNSET)
        if old is UNSET or new is UNSET or old != new:
            changes.append((key, old, new))
    return changes


def _lookup(d: Any, dotted: str) -> Any:
    """The value at a dotted key of nested dicts, or :data:`UNSET`."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return UNSET
        d = d[part]
    return d


def is_out_of_space(exc: BaseException) -> bool:
    """True if ``exc`` or any exception it was raised from is a full disk or quota (ENOSPC, EDQUOT)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def last_good_checkpoint_note(output_dir: str | Path) -> str:
    """``the last good checkpoint is .../step_N`` or ``there is no checkpoint yet``, checked file by file."""
    found = latest_intact_checkpoint(output_dir)
    if found is None:
        return f"there is no complete checkpoint in {output_dir} yet"
    return f"the last good checkpoint is {found[1]} (step {found[0]}); resume_from_checkpoint=true continues from it"


def all_finite(values: Iterable[Optional[float]]) -> bool:
    """True if every value that is not None is finite."""
    return all(v is None or math.isfinite(v) for v in values)


def first_nonfinite(state_dict: Mapping[str, Any], prefix: str = "") -> Optional[str]:
    """The key of the first floating-point tensor with a non-finite value in ``state_dict`` (nested mappings are
    searched too, their keys joined by dots; None values skipped), or None."""
    for key, value in state_dict.items():
        if isinstance(value, Mapping):
            found = first_nonfinite(value, f"{prefix}{key}.")
            if found is not None:
                return found
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return f"{prefix}{key}"
    return None
