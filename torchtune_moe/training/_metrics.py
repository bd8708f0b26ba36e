"""Expert-load metrics for training: accumulate each MoE layer's routing over a logging window, reduce across
ranks, and turn it into metric-logger scalars, ``expert_load.jsonl`` records and readable console lines.

Written here rather than reused: torchtune has no MoE and hence no expert-load metrics.
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torchtune import training

from torchtune_moe.modules._utils import clean_module_name

__all__ = [
    "EXPERT_LOAD_FILENAME",
    "ExpertLoadTracker",
    "ExpertLoadWindow",
    "append_expert_load",
    "clean_module_name",
    "peak_memory_stats",
    "truncate_expert_load",
]

#: File in ``output_dir`` that gets one JSON line per log step:
#: ``{"step": int, "layers": {"<layer module name>": [tokens per expert over the window, ...], ...}}``.
EXPERT_LOAD_FILENAME = "expert_load.jsonl"

_BARS = "▁▂▃▄▅▆▇█"


@dataclass
class ExpertLoadWindow:
    """Routing of every MoE layer over one logging window, summed over micro-batches and ranks.

    Attributes:
        names (list[str]): MoE layer module names (``layers.0.mlp``).
        loads (list[torch.Tensor]): per layer, [E] assignments per expert (float64, CPU).
        dropped (list[float]): per layer, tokens no routed expert computed (capacity/threshold routers).
        tokens (list[float]): per layer, tokens routed.
        entropy (list[float]): per layer, mean router entropy (nats) over the window's tokens.
    """

    names: list[str]
    loads: list[torch.Tensor]
    dropped: list[float]
    tokens: list[float]
    entropy: list[float]

    def utilisation(self, i: int) -> torch.Tensor:
        """[E] load / ideal load of layer i (ideal: the layer's assignments spread evenly over its experts)."""
        load_E = self.loads[i]
        mean = load_E.mean()
        return load_E / mean if mean > 0 else torch.zeros_like(load_E)

    def dead_experts(self, i: int) -> int:
        """Experts of layer i that got no token in the window."""
        return int((self.loads[i] == 0).sum())

    def metrics(self, detailed: bool = False) -> dict[str, float]:
        """Scalars for the metric loggers.

        Per layer ``expert_load/{name}/...``: ``max_over_mean`` (busiest expert's load / mean load; 1 is
        perfect balance), ``dead_experts``, ``dropped_token_frac`` (tokens no routed expert computed / tokens),
        ``router_entropy``; ``detailed`` adds ``util_e{i}`` (load / ideal load) for every expert. Over all
        layers: ``expert_load/max_over_mean`` (worst layer), ``expert_load/dead_experts`` (sum),
        ``expert_load/dropped_token_frac``, ``expert_load/router_entropy`` (mean).
        """
        out: dict[str, float] = {}
        worst, dead, dropped, tokens, entropy = 0.0, 0, 0.0, 0.0, 0.0
        for i, name in enumerate(self.names):
            util_E = self.utilisation(i)
            max_over_mean = float(util_E.max()) if len(util_E) else 0.0
            prefix = f"expert_load/{name}"
            out[f"{prefix}/max_over_mean"] = max_over_mean
            out[f"{prefix}/dead_experts"] = self.dead_experts(i)
            out[f"{prefix}/dropped_token_frac"] = self.dropped[i] / self.tokens[i] if self.tokens[i] else 0.0
            out[f"{prefix}/router_entropy"] = self.entropy[i]
            if detailed:
                for e, u in enumerate(util_E.tolist()):
                    out[f"{prefix}/util_e{e}"] = u
            worst = max(worst, max_over_mean)
            dead += self.dead_experts(i)
            dropped += self.dropped[i]
            tokens += self.tokens[i]
            entropy += self.entropy[i]
        if self.names:
            out["expert_load/max_over_mean"] = worst
            out["expert_load/dead_experts"] = dead
            out["expert_load/dropped_token_frac"] = dropped / tokens if tokens else 0.0
            out["expert_load/router_entropy"] = entropy / len(self.names)
        return out

    def record(self, step: int) -> dict:
        """The ``expert_load.jsonl`` record of this window."""
        return {
            "step": int(step),
            "layers": {name: [int(round(x)) for x in load.tolist()] for name, load in zip(self.names, self.loads)},
        }

    def console_lines(self) -> list[str]:
        """One readable line per layer: a bar per expert (height = utilisation, ``·`` = dead), then the balance."""
        width = max((len(n) for n in self.names), default=0)
        lines = []
        for i, name in enumerate(self.names):
            util_E = self.utilisation(i).tolist()
            bars = "".join(
                "·" if self.loads[i][e] == 0 else _BARS[min(len(_BARS) - 1, int(u / 2 * len(_BARS)))]
                for e, u in enumerate(util_E)
            )
            line = (
                f"  {name:<{width}}  {bars}  max/mean {max(util_E, default=0):4.2f}"
                f"  dead {self.dead_experts(i)}"
                f"  entropy {self.entropy[i]:.2f}"
            )
            if self.dropped[i]:
                line += f"  dropped {100 * self.dropped[i] / self.tokens[i]:.1f}%"
            lines.append(line)
        return lines


class ExpertLoadTracker:
    """Accumulates, per MoE layer, the routing statistics of every training forward of a logging window.

    Call :meth:`update` after each micro-batch forward (it reads :meth:`MoE.routing_stats` and stays on the
    device: no host sync), :meth:`end_step` after each optimizer step (a skipped, non-finite step's routing is
    dropped, not counted in the window), and :meth:`window` once per log step on every rank (one all-reduce).

    Args:
        layers (Sequence[tuple[str, nn.Module]]): ``(name, MoE layer)`` pairs, e.g. ``list(moe_layers(model))``.
        device (torch.device): where the accumulators live (the model's device).
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], device: torch.device):
        self.names = [clean_module_name(n) for n, _ in layers]
        self.layers = [m for _, m in layers]
        self.device = device
        self._sizes = [m.num_experts for m in self.layers]
        self.reset()

    def reset(self) -> None:
        """Starts a new window."""
        n = len(self.layers)
        # On the device: [loads of every layer..., dropped[n], entropy * tokens[n]]; on the host: tokens[n]
        # (token counts are shapes, known without a sync).
        self._acc = torch.zeros(sum(self._sizes) + 2 * n, dtype=torch.float64, device=self.device)
        self._tokens = [0.0] * n
        self._step_acc = torch.zeros_like(self._acc)  # the current optimizer step's micro-batches
        self._step_tokens = [0.0] * n

    @torch.no_grad()
    def update(self) -> None:
        """Adds the routing of each layer's latest forward to the window (no host-device sync)."""
        if not self.layers:
            return
        parts, dropped, entropy = [], [], []
        for i, layer in enumerate(self.layers):
            stats = layer.routing_stats()
            T = layer.last_routing.probs_TE.shape[0]
            parts.append(stats["tokens_per_expert"].to(torch.float64))
            dropped.append(stats["dropped_tokens"].to(torch.float64))
            entropy.append(stats["router_entropy"].to(torch.float64) * T)
            self._step_tokens[i] += T
        self._step_acc += torch.cat([*parts, torch.stack(dropped), torch.stack(entropy)])

    @torch.no_grad()
    def end_step(self, keep: bool = True) -> None:
        """Ends an optimizer step: its micro-batches' routing joins the window, or with ``keep=False`` (a skipped
        non-finite step, whose routing may hold NaN) is dropped."""
        if keep:
            self._acc += self._step_acc
            self._tokens = [a + b for a, b in zip(self._tokens, self._step_tokens)]
        self._step_acc.zero_()
        self._step_tokens = [0.0] * len(self.layers)

    @torch.no_grad()
    def window(self, process_group: Optional[dist.ProcessGroup] = None) -> ExpertLoadWindow:
        """The window so far (the steps ended with :meth:`end_step`), summed over the ranks of ``process_group``
        when distributed (call on every rank); then starts a new window."""
        n, total_E = len(self.layers), sum(self._sizes)
        tokens = torch.tensor(self._tokens, dtype=torch.float64, device=self.device)
        acc = torch.cat([self._acc, tokens])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(acc, group=process_group)
        acc = acc.cpu()
        self.reset()
        loads = list(torch.split(acc[:total_E], self._sizes))
        dropped = acc[total_E : total_E + n].tolist()
        entropy_sum = acc[total_E + n : total_E + 2 * n].tolist()
        tokens = acc[total_E + 2 * n :].tolist()
        entropy = [s / t if t else 0.0 for s, t in zip(entropy_sum, tokens)]
        return ExpertLoadWindow(self.names, loads, dropped, tokens, entropy)


def append_expert_load(output_dir: str | Path, record: dict) -> None:
    """Appends one record (see :meth:`ExpertLoadWindow.record`) to ``{output_dir}/expert_load.jsonl``."""
    path = Path(output_dir) / EXPERT_LOAD_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_expert_load(output_dir: str | Path, last_step: int) -> None:
    """Drops the records after ``last_step`` from ``{output_dir}/expert_load.jsonl`` (on resume, the steps
    after the checkpoint are trained and logged again)."""
    path = Path(output_dir) / EXPERT_LOAD_FILENAME
    if not path.is_file():
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def peak_memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB: torchtune's ``training.get_memory_stats`` on accelerators (``peak_memory_active``,
    ``peak_memory_alloc``, ``peak_memory_reserved``; resets the peaks), the process's peak resident set size
    (``peak_memory_rss``; never reset) on CPU."""
    if device.type != "cpu":
        return training.get_memory_stats(device=device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return {"peak_memory_rss": rss_bytes / 1024**3}

