"""Where a profiled step's GPU time goes, read from a timeline that ``train_step.py --profile --trace`` wrote
(or any ``torch.profiler`` chrome trace).

    python benchmarks/trace_report.py OUT/trace_qwen3_ours_compiled_step.json.gz [--steps 3] [--rows 40] [--gaps 10]

Prints, in ms per profiled step (``--steps``: how many steps the trace holds):

- kernel time by the outermost operator that launched it (the layers' compiled forward, their backward, the loss,
  the optimizer step, ...);
- the top ``--rows`` kernels, each with the innermost operator around its launch;
- the idle GPU in the second half of the timeline (its steady state: the first profiled step starts on an idle
  GPU, and its forward shows gaps that later steps do not): gaps of more than 5 us between kernels, the ``--gaps``
  largest with the kernels before and after each.

It reads the JSON only, so it runs anywhere. Kernels are matched to operators through the CUDA runtime call that
launched them (the trace's ``correlation`` ids).
"""

import argparse
import bisect
import collections
import gzip
import json

_GPU_CATEGORIES = ("kernel", "gpu_memset", "gpu_memcpy")
_IDLE_US = 5.0


def load(path: str) -> list:
    """The trace's events (a ``.json`` or ``.json.gz`` chrome trace).

    Raises:
        ValueError: the file cannot be read, is not JSON (gzipped for ``.gz``) or has no ``traceEvents`` list.
    """
    try:
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            events = json.load(f).get("traceEvents")
    except (OSError, EOFError, ValueError, AttributeError) as e:  # gzip's BadGzipFile is an OSError
        raise ValueError(f"{path}: not a readable chrome trace ({type(e).__name__}: {e})") from e
    if not isinstance(events, list):
        raise ValueError(f"{path}: no traceEvents list (a torch.profiler chrome trace has one)")
    return events


def launching_ops(events: list) -> dict:
    """correlation id -> the CPU operators around the runtime call that launched it, outermost first (profiler
    step markers left out)."""
    ops_by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation") and e.get("ph") == "X" and not e["name"].startswith(
            "ProfilerStep"
        ):
            ops_by_thread[e["tid"]].append(e)
    starts = {}
    for tid, ops in ops_by_thread.items():
        ops.sort(key=lambda o: o["ts"])
        starts[tid] = [o["ts"] for o in ops]
    out = {}
    for e in events:
        corr = e.get("args", {}).get("correlation")
        if e.get("cat") not in ("cuda_runtime", "cuda_driver") or corr is None:
            continue
        ops = ops_by_thread.get(e["tid"], [])
        end = bisect.bisect_right(starts.get(e["tid"], []), e["ts"])
        t_end = e["ts"] + e.get("dur", 0)
        out[corr] = [o["name"] for o in ops[:end] if o["ts"] + o["dur"] >= t_end]
    return out


def report(events: list, steps: int = 1, rows: int = 40, gaps: int = 10) -> str:
    """The three tables described in the module doc, as text."""
    kernels = sorted((e for e in events if e.get("cat") in _GPU_CATEGORIES), key=lambda e: e["ts"])
    if not kernels:
        return "no GPU kernels in this trace (a CPU run?)"
    ops = launching_ops(events)
    by_outer, by_kernel, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for k in kernels:
        stack = ops.get(k.get("args", {}).get("correlation"), [])
        outer, inner = (stack[0], stack[-1]) if stack else ("?", "?")
        by_outer[outer] += k["dur"]
        by_kernel[(k["name"], inner)] += k["dur"]
        calls[(k["name"], inner)] += 1
    per_step = 1000.0 * steps
    lines = [f"GPU time per step: {sum(by_outer.values()) / per_step:.3f} ms, {len(kernels) / steps:.0f} kernels",
             "", "by the outermost operator:"]
    lines += [f"  {us / per_step:8.3f} ms  {name[:90]}" for name, us in by_outer.most_common()]
    lines += ["", f"top {rows} kernels (ms per step, calls per step, launched under):"]
    for (name, inner), us in by_kernel.most_common(rows):
        lines.append(f"  {us / per_step:8.3f} {calls[(name, inner)] / steps:6.1f}  {name[:70]:70s}  {inner[:50]}")
    t0, t1 = kernels[0]["ts"], max(k["ts"] + k["dur"] for k in kernels)
    half = t0 + (t1 - t0) / 2
    idle, end, before = [], kernels[0]["ts"] + kernels[0]["dur"], kernels[0]
    for k in kernels[1:]:
        if k["ts"] > end + _IDLE_US and k["ts"] > half:
            idle.append((k["ts"] - end, end - t0, before["name"], k["name"]))
        if k["ts"] + k["dur"] > end:
            end, before = k["ts"] + k["dur"], k
    lines += ["", f"idle GPU in the second half of the timeline: {sum(g[0] for g in idle) / 1000:.3f} ms in "
              f"{len(idle)} gaps over {_IDLE_US:.0f} us"]
    for us, at, a, b in sorted(idle, reverse=True)[:gaps]:
        lines.append(f"  {us / 1000:7.3f} ms at {at / 1000:8.2f} ms: after {a[:50]}  before {b[:50]}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="a chrome trace (.json or .json.gz), e.g. train_step.py --trace's")
    p.add_argument("--steps", type=int, default=3, help="profiled steps in the trace (train_step.py's --profile-steps)")
    p.add_argument("--rows", type=int, default=40, help="kernels listed")
    p.add_argument("--gaps", type=int, default=10, help="largest idle gaps listed")
    args = p.parse_args()
    for name in ("steps", "rows", "gaps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    try:
        events = load(args.trace)
        text = report(events, args.steps, args.rows, args.gaps)
    except ValueError as e:
        p.error(f"trace: {e}")
    except (KeyError, TypeError) as e:  # an event without the fields a profiler writes (ts, dur, name, ...)
        p.error(f"trace: {args.trace}: a malformed event ({type(e).__name__}: {e})")
    print(text)


if __name__ == "__main__":
    main()
