"""Console output of the MoE recipes: the logging window (losses averaged between two log steps), the log line,
and the table of sample completions printed after training."""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf

from torchtune_moe.data import answer_matches

__all__ = ["LogWindow", "format_rate", "prompt_and_expected", "samples_table"]


class LogWindow:
    """Sums of the per-step values between two log steps."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.sums: dict[str, float] = {}
        self.grad_norm: Optional[float] = None

    def add(self, step: dict[str, float], grad_norm: Optional[torch.Tensor]) -> None:
        """Adds one optimizer step's values (``num_tokens``/``num_inputs`` are summed, the rest averaged)."""
        self.steps += 1
        for k, v in step.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if grad_norm is not None:
            self.grad_norm = float(grad_norm)

    def metrics(self, world_size: int) -> dict[str, float]:
        """Mean losses over the window's steps, tokens/s per device (non-padding input tokens), last grad norm."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {k: v / self.steps for k, v in self.sums.items() if k not in ("num_tokens", "num_inputs")}
        out["tokens_per_second_per_gpu"] = self.sums.get("num_inputs", 0.0) / elapsed / world_size
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        return out


def format_rate(x: float) -> str:
    """``12345.6`` -> ``12.3k``; below 1000, a whole number."""
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def prompt_and_expected(item: Any) -> tuple[str, Optional[str]]:
    """A sample prompt given as an object with ``.prompt``/``.answer`` (``TaskExample``), a mapping with
    ``prompt``/``answer`` keys, or a plain string (no expected answer)."""
    if isinstance(item, str):
        return item, None
    if isinstance(item, dict) or OmegaConf.is_dict(item):
        return str(item["prompt"]), item.get("answer")
    return str(item.prompt), getattr(item, "answer", None)


def samples_table(rows: Sequence[tuple[str, str, Optional[Any]]]) -> str:
    """The printed table of ``(prompt, model answer, expected answer or None)`` rows, with ``right``/``wrong``
    marks and the count of exactly right answers (:func:`torchtune_moe.data.answer_matches`)."""
    shown = [(p, repr(a)[1:-1], "" if e is None else str(e)) for p, a, e in rows]  # escapes newlines
    w_p = max(len("prompt"), *(len(r[0]) for r in shown))
    w_a = max(len("model answer"), *(len(r[1]) for r in shown))
    w_e = max(len("expected"), *(len(r[2]) for r in shown))
    lines = ["", "What the model learned (greedy decoding of held-out prompts):", ""]
    lines.append(f"  {'prompt':<{w_p}}  {'model answer':<{w_a}}  {'expected':<{w_e}}")
    correct = 0
    for (prompt, answer, expected), (_, a, e) in zip(rows, shown):
        mark = ""
        if expected is not None:
            ok = answer_matches(answer, expected)
            correct += ok
            mark = "  right" if ok else "  wrong"
        lines.append(f"  {prompt:<{w_p}}  {a:<{w_a}}  {e:<{w_e}}{mark}")
    if any(r[2] is not None for r in rows):
        lines.append(f"  {correct}/{sum(r[2] is not None for r in rows)} answers exactly right")
    return "\n".join(lines)
