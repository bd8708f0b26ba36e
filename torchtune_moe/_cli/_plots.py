"""Read a training run's disk logs and draw them as PNG figures (used by ``tune-moe plot``).

Two inputs, both written by the ``moe_full_finetune`` recipe into its ``output_dir``:

- ``logs/*.txt``: torchtune's ``DiskLogger`` lines, ``Step {step} | key:value key:value ...``
  (``log_dict``) or ``Step {step} | key:value`` (``log``). A resumed run appends a new file; for a step
  logged twice the later file wins.
- ``expert_load.jsonl``: one JSON object per log step,
  ``{"step": int, "layers": {"layers.0.mlp": [tokens per expert over the logging window, ...], ...}}``.

Matplotlib is an optional dependency (extra ``plot``) and is imported only when drawing. The figures use
``matplotlib.figure.Figure`` directly (no pyplot), so no GUI backend or global state is involved.
"""

import json
import math
import re
from pathlib import Path

import numpy as np

LOGS_DIRNAME = "logs"
# Same name as torchtune_moe.training's EXPERT_LOAD_FILENAME (not imported: that would load torch and make
# every tune-moe command take seconds to start).
EXPERT_LOAD_FILENAME = "expert_load.jsonl"

# `Step 12 | loss:1.5 lr:0.001 ` -> step, payload. Values may be tensors printed by str(): `tensor(1.5)` or
# `tensor(1.5, device='cuda:0')`; the pair regex keeps those whole.
_LINE_RE = re.compile(r"^Step (\d+) \| (.*)$")
_PAIR_RE = re.compile(r"([^\s:]+):(tensor\([^)]*\)|\S+)")
_TENSOR_RE = re.compile(r"^tensor\(\s*([^,)\s]+)")
# Metric keys that belong to one layer (e.g. `expert_load/layers.3.mlp/max_over_mean`) are summarised by the expert-load
# figures and left out of the scalar figures, which would otherwise get one panel per layer.
_PER_LAYER_RE = re.compile(r"(^|[^A-Za-z])layers?[._/]\d+")
_AUX_NAMES = ("load_balancing", "z_loss", "seq_balance")
_NUM_RE = re.compile(r"^(.*?)(\d+)(\D.*)?$")

Series = tuple[np.ndarray, np.ndarray]  # (steps [N], values [N])

MAX_LAYERS_PER_PAGE = 16
MAX_HEATMAP_COLUMNS = 250  # longer runs merge consecutive logging windows (see merge_windows)


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _parse_value(text: str) -> float | None:
    m = _TENSOR_RE.match(text)
    if m:
        text = m.group(1)
    try:
        return float(text)
    except ValueError:
        return None


def check_run_dir(output_dir: Path) -> tuple[list[Path], Path]:
    """The disk-log files and expert-load file of a run directory.

    Raises:
        FileNotFoundError: naming the first missing path.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"Run directory not found: {output_dir}")
    logs_dir = output_dir / LOGS_DIRNAME
    if not logs_dir.is_dir():
        raise FileNotFoundError(f"Disk-log directory not found: {logs_dir} (expected torchtune DiskLogger *.txt files)")
    log_files = sorted(logs_dir.glob("*.txt"), key=lambda p: _natural_key(p.name))
    if not log_files:
        raise FileNotFoundError(f"No disk-log files found: {logs_dir / '*.txt'}")
    expert_load = output_dir / EXPERT_LOAD_FILENAME
    if not expert_load.is_file():
        raise FileNotFoundError(f"Expert-load log not found: {expert_load}")
    return log_files, expert_load


def read_disk_logs(log_files: list[Path]) -> dict[str, Series]:
    """Parse torchtune ``DiskLogger`` files into ``{key: (steps [N], values [N])}``, steps ascending.

    Non-numeric values are skipped; a step logged in several files keeps the value of the later file.

    Raises:
        ValueError: no ``Step N | key:value`` line in any of the files.
    """
    by_key: dict[str, dict[int, float]] = {}
    for path in log_files:
        with open(path) as f:
            for line in f:
                m = _LINE_RE.match(line.rstrip("\n"))
                if m is None:
                    continue
                step = int(m.group(1))
                for key, raw in _PAIR_RE.findall(m.group(2)):
                    value = _parse_value(raw)
                    if value is not None:
                        by_key.setdefault(key, {})[step] = value
    if not by_key:
        raise ValueError(
            "No 'Step N | key:value' lines found in " + ", ".join(str(p) for p in log_files)
        )
    out = {}
    for key, points in by_key.items():
        steps = np.array(sorted(points), dtype=np.int64)
        out[key] = (steps, np.array([points[s] for s in steps], dtype=np.float64))
    return out


def read_expert_load(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Parse ``expert_load.jsonl`` into ``(steps [N], {layer name: tokens per expert [N, E]})``.

    Layers are in natural order (``layers.2`` before ``layers.10``); a layer missing at a step gets NaN
    there; a step written twice (resumed run) keeps the later record.

    Raises:
        ValueError: a malformed line (named with its line number), a layer whose expert count changes,
            or a file with no records.
    """
    records: dict[int, dict[str, list]] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            ok = isinstance(rec, dict) and isinstance(rec.get("step"), int) and isinstance(rec.get("layers"), dict)
            if not ok:
                raise ValueError(f'{where}: expected {{"step": int, "layers": {{name: [tokens per expert, ...]}}}}')
            for name, loads in rec["layers"].items():
                if not isinstance(loads, list) or not loads or not all(isinstance(v, (int, float)) for v in loads):
                    raise ValueError(f"{where}: layers[{name!r}] must be a non-empty list of numbers")
            records[rec["step"]] = rec["layers"]
    if not records:
        raise ValueError(f"{path}: no expert-load records")
    steps = np.array(sorted(records), dtype=np.int64)
    names = sorted({n for layers in records.values() for n in layers}, key=_natural_key)
    loads: dict[str, np.ndarray] = {}
    for name in names:
        widths = {len(records[s][name]) for s in steps if name in records[s]}
        if len(widths) != 1:
            raise ValueError(f"{path}: layer {name!r} has a varying number of experts {sorted(widths)}")
        arr = np.full((len(steps), widths.pop()), np.nan)
        for i, s in enumerate(steps):
            if name in records[s]:
                arr[i] = records[s][name]
        loads[name] = arr
    return steps, loads


def merge_windows(
    steps: np.ndarray, loads: dict[str, np.ndarray], max_windows: int
) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Merge consecutive logging windows into groups of ``k`` (summing tokens) so at most ``max_windows``
    remain, keeping heatmaps readable and fast for long runs. Returns ``(steps [M] (each group's last step),
    {layer: tokens [M, E]}, k)``; ``k == 1`` returns the inputs unchanged."""
    k = math.ceil(len(steps) / max_windows)
    if k <= 1:
        return steps, loads, 1
    idx = np.arange(0, len(steps), k)
    merged = {}
    for name, tokens_NE in loads.items():
        seen_N = np.isfinite(tokens_NE).all(axis=1)
        sums = np.add.reduceat(np.where(np.isfinite(tokens_NE), tokens_NE, 0.0), idx, axis=0)
        sums[np.add.reduceat(seen_N.astype(np.int64), idx) == 0] = np.nan  # no window of the group logged
        merged[name] = sums
    return steps[np.minimum(idx + k, len(steps)) - 1], merged, k


def load_ratio(tokens_NE: np.ndarray) -> np.ndarray:
    """Load / ideal load per expert: ``tokens * E / tokens.sum()`` per step ([N, E]); 1 = perfectly
    balanced, 0 = dead (no tokens), NaN where a step routed no tokens or was not logged."""
    total_N1 = tokens_NE.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total_N1 > 0, tokens_NE * tokens_NE.shape[1] / total_N1, np.nan)


# ------------------------------------------------------------------------------------------------ drawing


def _import_matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise ModuleNotFoundError(
            "tune-moe plot needs matplotlib, which is not installed. Install it with: "
            "pip install 'torchtune-moe[plot]'"
        ) from None
    return Figure


def _is_noisy(values: np.ndarray) -> bool:
    """Worth a smoothed line: many points whose direction flips often (not a schedule or a constant)."""
    d = np.diff(values[np.isfinite(values)])
    d = d[d != 0]
    return len(values) >= 20 and len(d) > 1 and np.mean(np.sign(d[1:]) != np.sign(d[:-1])) > 0.2


def _smooth(values: np.ndarray) -> np.ndarray:
    """Centred moving average over ~5% of the points (no lag, unlike an EMA); NaNs are skipped."""
    half = max(1, len(values) // 40)
    ok = np.isfinite(values)
    kernel = np.ones(2 * half + 1)
    total = np.convolve(np.where(ok, values, 0.0), kernel, mode="same")
    count = np.convolve(ok.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def _is_lr(key: str) -> bool:
    return bool(re.search(r"(^|[/_.])lr($|[/_.])", key)) or "learning_rate" in key


def _is_loss(key: str) -> bool:
    low = key.lower()
    return "loss" in low or "aux" in low or low.rsplit("/", 1)[-1] in _AUX_NAMES


def _loss_order(key: str) -> tuple:
    low = key.lower()
    if low == "loss":
        rank = 0
    elif "ce" in re.split(r"[^a-z]+", low) or "cross_entropy" in low:
        rank = 1
    elif low in ("aux_loss", "aux", "aux/total", "aux_loss/total"):
        rank = 2
    else:
        rank = 3
    return (rank, _natural_key(key))


def split_metrics(metrics: dict[str, Series]) -> tuple[list[str], list[str]]:
    """Scalar keys for the loss figure (total loss, CE loss, aux losses, then lr) and for the other-metrics
    figure (throughput, memory, grad norm, ...); per-layer keys go in neither."""
    keys = [k for k in metrics if not _PER_LAYER_RE.search(k)]
    lrs = sorted((k for k in keys if _is_lr(k)), key=_natural_key)
    losses = sorted((k for k in keys if _is_loss(k) and k not in lrs), key=_loss_order)
    other = sorted((k for k in keys if k not in lrs and k not in losses), key=_natural_key)
    return losses + lrs, other


def plot_scalars(metrics: dict[str, Series], keys: list[str], title: str, path: Path) -> Path:
    """One subplot per key (value over steps; a smoothed line over the raw one when there are many
    points), saved as PNG at ``path``."""
    Figure = _import_matplotlib()
    n = len(keys)
    ncols = 1 if n == 1 else 2 if n <= 6 else 3
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(5.2 * ncols, 2.9 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_visible(False)
            continue
        key = keys[i]
        steps, values = metrics[key]
        if _is_noisy(values):
            ax.plot(steps, values, color="C0", alpha=0.3, linewidth=1, label="logged")
            ax.plot(steps, _smooth(values), color="C0", linewidth=1.8, label="moving average")
            ax.legend(fontsize=8, loc="best")
        else:
            ax.plot(steps, values, color="C0", linewidth=1.6, marker="o" if len(values) < 20 else None, markersize=3)
        ax.set_title(f"{key}   (last: {values[-1]:.4g})", fontsize=11)
        ax.set_ylabel("learning rate" if _is_lr(key) else key.rsplit("/", 1)[-1])
        if _is_lr(key):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.grid(alpha=0.3)
        # x label under the lowest panel of each column
        if i + ncols >= n:
            ax.set_xlabel("step")
            ax.xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(title, fontsize=13)
    fig.savefig(path, dpi=100)
    return path


def _edges(centers: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres (for pcolormesh with irregular step spacing)."""
    c = centers.astype(np.float64)
    if len(c) == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[1:] + c[:-1]) / 2
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def _layer_labels(names: list[str]) -> tuple[list[str], str]:
    """Short tick labels for layer names plus an axis label: ``layers.N.mlp`` -> ``N`` and
    ``layer (layers.N.mlp)`` when all names share that pattern, else the names themselves."""
    parts = [_NUM_RE.match(n) for n in names]
    if all(parts) and len({(p.group(1), p.group(3)) for p in parts}) == 1:
        pre, post = parts[0].group(1), parts[0].group(3) or ""
        return [p.group(2) for p in parts], f"layer  ({pre}N{post})"
    return list(names), "layer"


class _RatioScale:
    """Shared colour scale for load / ideal load: log2-symmetric around 1 (white), blue = underloaded,
    red = overloaded, black = dead expert (0 tokens), grey = not logged."""

    def __init__(self, ratios: list[np.ndarray]):
        from matplotlib import colormaps
        from matplotlib.colors import LogNorm

        vals = np.concatenate([r[np.isfinite(r) & (r > 0)].ravel() for r in ratios] or [np.ones(1)])
        spread = np.nanpercentile(np.abs(np.log2(vals)), 99) if vals.size else 1.0
        self.r = 2.0 ** int(np.clip(math.ceil(spread), 1, 4))  # 2, 4, 8 or 16
        self.norm = LogNorm(vmin=1 / self.r, vmax=self.r)
        self.cmap = colormaps["RdBu_r"].with_extremes(under="black", bad="0.8")

    def prepare(self, ratio: np.ndarray) -> np.ndarray:
        """Clip live experts into the colour range and push dead ones below it (drawn black)."""
        out = np.clip(ratio, self.norm.vmin * 1.0001, self.norm.vmax)
        out[ratio == 0] = self.norm.vmin / 4
        return np.ma.masked_invalid(out)

    def colorbar(self, fig, mappable, ax, **kw):
        cb = fig.colorbar(mappable, ax=ax, extend="min", extendfrac=0.04, **kw)
        exps = range(-int(math.log2(self.r)), int(math.log2(self.r)) + 1)
        ticks = [2.0**e for e in exps]
        cb.set_ticks(ticks, labels=[f"{v:g}×" if v >= 1 else f"1/{1 / v:g}×" for v in ticks])
        cb.minorticks_off()
        cb.set_label("load / ideal load  (black = dead expert)")
        return cb


def _step_axis(ax, steps: np.ndarray) -> None:
    """Integer step ticks; with few logged steps, one tick at each cell's centre."""
    from matplotlib.ticker import MaxNLocator

    if len(steps) <= 12:
        ax.set_xticks(steps)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")


def _expert_axis(ax, num_experts: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_ylim(num_experts - 0.5, -0.5)  # expert 0 at the top, like a matrix
    if num_experts <= 16:
        ax.set_yticks(range(num_experts))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.set_ylabel("expert")


def plot_expert_load_over_steps(
    steps: np.ndarray, loads: dict[str, np.ndarray], out_dir: Path, stem: str = "expert_load_over_steps",
    note: str = "",
) -> list[Path]:
    """One heatmap per layer (step on x, expert on y, colour = load / ideal load), up to
    ``MAX_LAYERS_PER_PAGE`` layers per PNG; returns the written paths."""
    Figure = _import_matplotlib()
    names = list(loads)
    ratios = {n: load_ratio(loads[n]) for n in names}
    scale = _RatioScale(list(ratios.values()))
    x_edges = _edges(steps)
    pages = [names[i : i + MAX_LAYERS_PER_PAGE] for i in range(0, len(names), MAX_LAYERS_PER_PAGE)]
    for stale in [out_dir / f"{stem}.png", *out_dir.glob(f"{stem}_[0-9][0-9].png")]:
        stale.unlink(missing_ok=True)  # pages of an earlier plot of a run with more layers
    paths = []
    for page_idx, page in enumerate(pages):
        n = len(page)
        nrows = math.ceil(n / 4)
        ncols = math.ceil(n / nrows)  # 6 layers -> 2 x 3, not 4 + 2
        max_e = max(loads[name].shape[1] for name in page)
        panel_h = 2.4 + min(max_e, 64) * 0.016
        fig = Figure(figsize=(4.0 * ncols + 1.5, panel_h * nrows + 1.0), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
        mesh = None
        for i, ax in enumerate(axes.flat):
            if i >= n:
                ax.set_visible(False)
                continue
            name = page[i]
            ratio_NE = ratios[name]
            E = ratio_NE.shape[1]
            mesh = ax.pcolormesh(x_edges, np.arange(E + 1) - 0.5, scale.prepare(ratio_NE.T), cmap=scale.cmap,
                                 norm=scale.norm, shading="flat")
            _expert_axis(ax, E)
            dead_now = int(np.sum(loads[name][-1] == 0)) if np.isfinite(loads[name][-1]).all() else 0
            ax.set_title(f"{name}  ({E} experts" + (f", {dead_now} dead at end)" if dead_now else ")"), fontsize=10)
            _step_axis(ax, steps)
            if i + ncols < n:  # a panel below shows the step axis
                ax.set_xlabel("")
            else:
                ax.xaxis.set_tick_params(labelbottom=True)
            if i % ncols:
                ax.set_ylabel("")
        scale.colorbar(fig, mesh, ax=axes, aspect=15 + 5 * nrows)
        span = f"{page[0]} … {page[-1]}" if n > 1 else page[0]
        part = f"  (page {page_idx + 1}/{len(pages)})" if len(pages) > 1 else ""
        fig.suptitle(f"Expert load over training: {span}{part}\n"
                     "tokens per expert / ideal (tokens / experts) in each logging window"
                     + (f"  ({note})" if note else ""), fontsize=12)
        path = out_dir / (f"{stem}.png" if len(pages) == 1 else f"{stem}_{page_idx + 1:02d}.png")
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


def plot_expert_load_summary(steps: np.ndarray, loads: dict[str, np.ndarray], path: Path, note: str = "") -> Path:
    """All layers at a glance, layers on y in every panel: (1) load / ideal per expert in the last logged
    window, (2) the busiest expert's load / ideal per layer over steps, (3) dead experts per layer over
    steps. Saved as PNG at ``path``."""
    Figure = _import_matplotlib()
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm
    from matplotlib.ticker import MaxNLocator

    names = list(loads)
    L = len(names)
    max_e = max(a.shape[1] for a in loads.values())
    ratios = [load_ratio(loads[n]) for n in names]

    # last window that was logged for each layer
    last_LE = np.full((L, max_e), np.nan)
    last_steps = set()
    for li, r in enumerate(ratios):
        ok = np.flatnonzero(np.isfinite(r).all(axis=1))
        if len(ok):
            last_LE[li, : r.shape[1]] = r[ok[-1]]
            last_steps.add(int(steps[ok[-1]]))
    with np.errstate(all="ignore"):
        max_LN = np.stack([np.nanmax(np.where(np.isfinite(r), r, -np.inf), axis=1) for r in ratios])
        max_LN[~np.isfinite(max_LN)] = np.nan
        dead_LN = np.stack([np.where(np.isfinite(loads[n]).all(axis=1), (loads[n] == 0).sum(axis=1), np.nan)
                            for n in names])

    scale = _RatioScale([last_LE])
    labels, layer_axis = _layer_labels(names)
    height = float(np.clip(1.9 + 0.2 * L, 3.6, 14))
    w_experts = float(np.clip(0.07 * max_e, 3.5, 9))
    fig = Figure(figsize=(w_experts + 10.5, height), layout="constrained")
    ax_last, ax_max, ax_dead = fig.subplots(1, 3, sharey=True, width_ratios=[w_experts, 4.2, 4.2])
    y_edges = np.arange(L + 1) - 0.5
    x_edges = _edges(steps)

    m = ax_last.pcolormesh(np.arange(max_e + 1) - 0.5, y_edges, scale.prepare(last_LE), cmap=scale.cmap,
                           norm=scale.norm)
    scale.colorbar(fig, m, ax=ax_last, location="bottom", shrink=0.9, aspect=35, pad=0.01)
    at = f"step {max(last_steps)}" if len(last_steps) == 1 else "last logged step"
    ax_last.set_title(f"Load / ideal per expert, {at}", fontsize=11)
    ax_last.set_xlabel("expert")
    if max_e <= 16:
        ax_last.set_xticks(range(max_e))
    else:
        ax_last.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))

    vmax = max(2.0, float(np.nanmax(max_LN)) if np.isfinite(max_LN).any() else 2.0)
    m = ax_max.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(np.clip(max_LN, 1.0, None)),
                          cmap=colormaps["YlOrRd"].with_extremes(bad="0.8"), norm=LogNorm(vmin=1.0, vmax=vmax))
    cb = fig.colorbar(m, ax=ax_max, location="bottom", shrink=0.9, aspect=25, pad=0.01)
    ticks = [t for t in (1, 1.5, 2, 3, 4, 6, 8, 16, 32, 64, 128) if t <= vmax]
    cb.set_ticks(ticks, labels=[f"{t:g}×" for t in ticks])
    cb.minorticks_off()
    cb.set_label("busiest expert's load / ideal  (1× = balanced)")
    ax_max.set_title("Imbalance over training", fontsize=11)
    _step_axis(ax_max, steps)

    # discrete colours: white = none dead, then purples (grey stays "not logged")
    dmax = int(np.nanmax(dead_LN)) if np.isfinite(dead_LN).any() else 0
    nb = min(dmax, 12)
    bounds = np.concatenate([[-0.5], np.linspace(0.5, dmax + 0.5, nb + 1)])
    shades = np.linspace(max(0.35, 0.8 - 0.1 * (nb - 1)), 1.0, nb)
    dead_cmap = ListedColormap(["white"] + [colormaps["Purples"](x) for x in shades])
    m = ax_dead.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(dead_LN),
                           cmap=dead_cmap.with_extremes(bad="0.8"), norm=BoundaryNorm(bounds, dead_cmap.N))
    cb = fig.colorbar(m, ax=ax_dead, location="bottom", shrink=0.9, aspect=25, pad=0.01)
    cb.set_label("dead experts (0 tokens in the window)")
    cb.set_ticks(range(0, dmax + 1) if nb == dmax else MaxNLocator(integer=True).tick_values(0, dmax))
    cb.minorticks_off()
    ax_dead.set_title("Dead experts over training" + ("" if dmax else "  (none)"), fontsize=11)
    _step_axis(ax_dead, steps)

    ax_last.set_ylim(L - 0.5, -0.5)  # first layer at the top
    every = max(1, math.ceil(L / 32))
    ax_last.set_yticks(range(0, L, every), labels[::every], fontsize=9 if L <= 24 else 7)
    ax_last.set_ylabel(layer_axis)
    span = f"steps {int(steps[0])}–{int(steps[-1])}" if len(steps) > 1 else f"step {int(steps[0])}"
    fig.suptitle(f"Expert load summary: {L} MoE layer{'s' if L != 1 else ''}, up to {max_e} experts, {span}"
                 + (f"\n({note})" if note else ""), fontsize=13)
    fig.savefig(path, dpi=100)
    return path


def plot_run(output_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Draw every figure for the run in ``output_dir`` into ``out_dir`` (default ``output_dir/plots``):
    ``losses.png``, ``metrics.png`` (other scalars, when logged), ``expert_load_summary.png`` and
    ``expert_load_over_steps*.png``. Inputs are checked before anything is drawn.

    Raises:
        FileNotFoundError: a missing run directory, ``logs/*.txt`` or ``expert_load.jsonl`` (named).
        ValueError: unreadable logs.
        ModuleNotFoundError: matplotlib is not installed.
    """
    output_dir = Path(output_dir)
    log_files, expert_load = check_run_dir(output_dir)
    _import_matplotlib()
    metrics = read_disk_logs(log_files)
    steps, loads = read_expert_load(expert_load)
    steps, loads, merged = merge_windows(steps, loads, MAX_HEATMAP_COLUMNS)
    out_dir = Path(out_dir) if out_dir is not None else output_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)

    loss_keys, other_keys = split_metrics(metrics)
    paths = []
    if loss_keys:
        paths.append(plot_scalars(metrics, loss_keys, f"Training losses and learning rate: {output_dir.name}",
                                  out_dir / "losses.png"))
    if other_keys:
        paths.append(plot_scalars(metrics, other_keys, f"Other logged metrics: {output_dir.name}",
                                  out_dir / "metrics.png"))
    note = f"{merged} consecutive logging windows merged per column" if merged > 1 else ""
    paths.append(plot_expert_load_summary(steps, loads, out_dir / "expert_load_summary.png", note=note))
    paths.extend(plot_expert_load_over_steps(steps, loads, out_dir, note=note))
    return paths
