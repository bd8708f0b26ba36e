"""benchmarks/train_step.py --dry-run --profile, moe_layer.py, swiglu_lora_tiles.py, gather_tiles.py,
fp8_quantizers.py and optimizer_step.py --dry-run (tiny shapes on CPU) and qwen3_memory_check.py --tiny on 2
CPU processes run: the GPU scripts' code stays working. trace_report.py reads a made-up timeline.
(benchmarks/lora.py's dry run: tests/recipes/test_moe_lora_finetune.py.)"""

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def test_train_step_dry_run_with_profile(tmp_path):
    pytest.importorskip("transformers")
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--profile", "--profile-steps", "1", "--profile-rows", "12",
         "--trace", "--warmup", "1", "--shapes", "qwen3", "--variants", "hf", "ours", "ours_linear_ce",
         "ours_fp8_dense", "ours_compiled_step", "ours_torch_softmax", "--prompt-frac", "0.25", "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "train_step.json").read_text())["results"]["qwen3"]
    assert set(results) == {"hf", "ours", "ours_linear_ce", "ours_fp8_dense", "ours_compiled_step",
                            "ours_torch_softmax"}
    assert not any("error" in r for r in results.values())
    # The same labels (a quarter of each sample masked) and the same init: the same loss, whichever the loss path;
    # fp8 dense layers (emulated here) round the GEMMs' operands.
    for variant in ("ours_linear_ce", "ours_compiled_step", "ours_torch_softmax"):
        assert results[variant]["loss"] == pytest.approx(results["ours"]["loss"], rel=1e-4)
    assert results["ours_fp8_dense"]["loss"] == pytest.approx(results["ours"]["loss"], rel=2e-2)
    for variant in ("hf", "ours", "ours_linear_ce"):
        table = (tmp_path / f"profile_qwen3_{variant}.txt").read_text().splitlines()
        assert table[0].startswith(f"qwen3 {variant}: 4 layers")
        assert "top 12 CPU operators" in table[1]  # on a GPU: the top 12 GPU kernels
        assert len(table) == 3 + 12 and "aten::" in "".join(table[3:])
        with gzip.open(tmp_path / f"trace_qwen3_{variant}.json.gz", "rt") as f:
            assert json.load(f)["traceEvents"]  # the timeline of the profiled step


TILES = Path(__file__).resolve().parents[1] / "benchmarks" / "swiglu_lora_tiles.py"
LAYER = Path(__file__).resolve().parents[1] / "benchmarks" / "moe_layer.py"


def test_moe_layer_dry_run_with_the_separate_swiglu_variant(tmp_path):
    """The layer benchmark's dry run with the A/B of quack's SwiGLU epilogues (on CPU both rows are torch's path):
    both timed and checked against the fp32 loop."""
    pytest.importorskip("transformers")
    r = _dry_run(LAYER, tmp_path, "--shapes", "olmoe", "--variants", "dense", "ours", "ours_sep_swiglu")
    rows = r["results"]["olmoe"]["rows"]
    assert {"dense", "ours", "ours_sep_swiglu"} <= set(rows) and not any("error" in v for v in rows.values())
    for variant in ("ours", "ours_sep_swiglu"):
        assert rows[variant]["ms"] > 0 and 0 < max(rows[variant]["errs"].values()) < 1e-2


def test_moe_layer_dry_run_host_variant(tmp_path):
    """The host-time variant runs and reports a positive host time per pass (no GPU busy time on CPU); host_fp8 and
    ours_graph (CUDA graphs) are skipped on CPU with their reasons; ours_compile_graphs (mode="reduce-overhead")
    compiles and runs there without graphs, checked against the fp32 loop."""
    pytest.importorskip("transformers")
    r = _dry_run(
        LAYER, tmp_path, "--shapes", "olmoe", "--variants", "host", "host_fp8", "ours_graph", "ours_compile_graphs"
    )
    rows = r["results"]["olmoe"]["rows"]
    assert rows["host"]["host_ms"] > 0 and math.isnan(rows["host"]["gpu_busy_ms"])
    assert "host_fp8" not in rows and "ours_graph" not in rows
    assert rows["ours_compile_graphs"]["ms"] > 0 and 0 < rows["ours_compile_graphs"]["errs"]["out"] < 1e-2
    assert "| olmoe | host |" in (tmp_path / "moe_layer.md").read_text()


def test_moe_layer_refuses_no_tokens_by_name(tmp_path):
    res = subprocess.run(
        [sys.executable, str(LAYER), "--dry-run", "--tokens", "0", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2 and "--tokens must be at least 1, got 0" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def _dry_run(script: Path, out: Path, *args: str) -> dict:
    """Runs ``script --dry-run --out out *args`` (CPU, tiny shapes) and returns the JSON it wrote there."""
    res = subprocess.run(
        [sys.executable, str(script), "--dry-run", "--out", str(out), *args], capture_output=True, text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / f"{script.stem}.json").read_text())


def test_swiglu_lora_tiles_dry_run(tmp_path):
    """The SwiGLU-LoRA tile sweep's dry run (CPU, tiny shapes, the torch code): every configuration timed and
    checked, then the layer timed under the default, the previous default and the best."""
    r = _dry_run(TILES, tmp_path, "--layer", "--layer-repeats", "1")
    assert r["device"] == "cpu" and r["shape"]["A"] == 512
    assert len(r["forward"]) == 8 and len(r["backward"]) == 9
    assert all(c["err"] < 1e-6 and c["ms"] > 0 for c in r["forward"] + r["backward"])
    medians = r["layer"]["median_ms"]
    assert {"frozen", "default", "previous (64-row tiles)"} <= set(medians) and all(v > 0 for v in medians.values())


GATHER = Path(__file__).resolve().parents[1] / "benchmarks" / "gather_tiles.py"


def test_gather_tiles_dry_run(tmp_path):
    """The row-gather / gather-sum tile sweep's dry run (CPU, tiny shapes, the torch code): every configuration timed
    and compared with the default's output, then the layer at both shapes under the default and the best."""
    r = _dry_run(GATHER, tmp_path, "--layer", "--layer-repeats", "1")
    assert r["device"] == "cpu" and r["shape"]["A"] == 128
    assert len(r["gather_rows"]) == 13 and len(r["gather_sum"]) == 8
    assert all(c["equal"] and c["ms"] > 0 for c in r["gather_rows"] + r["gather_sum"])
    assert set(r["layer_ms"]) == {"qwen3", "olmoe"}
    assert all(set(v) == {"default", "best"} and min(v.values()) > 0 for v in r["layer_ms"].values())


FP8Q = Path(__file__).resolve().parents[1] / "benchmarks" / "fp8_quantizers.py"


def test_fp8_quantizers_dry_run(tmp_path):
    """The fp8 quantizer timings' dry run (CPU, tiny shapes, the torch code): the three row widths and both weights."""
    r = _dry_run(FP8Q, tmp_path)
    assert r["device"] == "cpu" and [row["K"] for row in r["rowwise"]] == [64, 96, 192]
    assert [row["weight"] for row in r["weights"]] == ["gate_up_proj", "down_proj"]
    assert all(row["torch_code_ms"] > 0 for row in r["rowwise"] + r["weights"])


@pytest.mark.parametrize(
    "script", ["moe_layer", "train_step", "lora", "swiglu_lora_tiles", "gather_tiles", "fp8_quantizers"]
)
def test_out_that_is_a_file_is_refused_before_any_work(script, tmp_path):
    """A benchmark writes its results at the end: an ``--out`` it cannot write to is refused by name up front."""
    a_file = tmp_path / "results.json"
    a_file.write_text("{}")
    res = subprocess.run(
        [sys.executable, str(SCRIPT.parent / f"{script}.py"), "--dry-run", "--out", str(a_file)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"--out {a_file}: not a directory the results can be written to" in res.stderr
    assert a_file.read_text() == "{}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
@pytest.mark.parametrize(
    "script",
    [
        "moe_layer", "train_step", "lora", "swiglu_lora_tiles", "gather_tiles", "fp8_quantizers", "optimizer_step",
        "fp8_gemms",
    ],
)
def test_no_gpu_is_refused_before_the_out_directory_is_made(script, tmp_path):
    """Without a GPU (and without --dry-run) a benchmark stops by saying so, and leaves no empty --out behind."""
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, str(SCRIPT.parent / f"{script}.py"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode != 0 and "needs a CUDA GPU" in res.stderr, res.stderr[-2000:]
    assert not out.exists()


OPT_STEP = Path(__file__).resolve().parents[1] / "benchmarks" / "optimizer_step.py"


def test_optimizer_step_dry_run(tmp_path):
    """Every variant runs, with each way to finish the gradients; the bucketed step compiles two graphs (the
    layers', shared, and the rest's) at any depth, the whole step one; handing it the gradients' factors compiles
    nothing more."""
    r = _dry_run(OPT_STEP, tmp_path, "--shapes", "qwen3", "--layers", "3", "--variants", *("fused", "compiled",
                 "compiled_whole"), "--steps", "2", "--finish", "none", "torchtune", "ours")
    rows = r["results"]
    for finish in ("", "_torchtune", "_ours"):
        assert rows[f"qwen3_3_compiled{finish}"]["unique_graphs"] == 2
        assert rows[f"qwen3_3_compiled_whole{finish}"]["unique_graphs"] == 1
    assert all(v["step_ms"] > 0 for v in rows.values())
    assert (tmp_path / "optimizer_step.md").read_text().count("| qwen3 (tiny) | 3 |") == 9


def test_optimizer_step_refuses_a_depth_per_shape_mismatch(tmp_path):
    res = subprocess.run([sys.executable, str(OPT_STEP), "--dry-run", "--shapes", "qwen3", "olmoe", "--layers", "4"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--layers takes one depth >= 1 per shape (2), got [4]" in res.stderr, res.stderr


def test_qwen3_memory_check_tiny_on_two_processes(tmp_path):
    """The multi-GPU memory script's own CPU smoke run (gloo, tiny dims) with expert parallelism and activation
    checkpointing of every other layer: it reports one depth, the model's parameter count (not times the world
    size), the states per GPU and the full-depth prediction."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "qwen3_memory_check.py"
    out = tmp_path / "qwen3.json"
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         "--device", "cpu", "--tiny", "--layers", "3", "--ac-every", "2", "--expert-parallel-degree", "2",
         "--steps", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    row = json.loads(out.read_text())
    assert (row["layers"], row["gpus"], row["expert_parallel_degree"], row["ac_every"]) == (3, 2, 2, 2)
    sys.path.insert(0, str(script.parent))
    try:
        from qwen3_memory_check import STATE_BYTES, TINY, param_count
    finally:
        sys.path.pop(0)
    assert row["params"] == param_count(TINY, 3, 2048)
    assert row["states_gib_per_gpu"] == round(row["params"] * STATE_BYTES["adamw"] / 2 / 1024**3, 2)
    assert row["full_depth"] == 2 and row["tokens_per_second_per_gpu"] > 0


@pytest.mark.parametrize("args, named", [(["--trace"], "--trace"), (["--profile", "--profile-rows", "0"],
                                                                       "--profile-rows")])
def test_train_step_refuses_bad_profile_options_by_name(args, named, tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and named in res.stderr.splitlines()[-1], res.stderr[-1000:]
    assert not (tmp_path / "train_step.json").exists()


def test_trace_report_attributes_kernels_and_finds_idle_gaps(tmp_path):
    """trace_report.py on a made-up timeline: two kernels launched under an operator (one inside an inner op),
    70 us idle between them in the second half of the timeline."""
    events = [
        {"cat": "cpu_op", "ph": "X", "name": "Outer", "tid": 1, "ts": 0, "dur": 100},
        {"cat": "cpu_op", "ph": "X", "name": "aten::mm", "tid": 1, "ts": 10, "dur": 10},
        {"cat": "cuda_runtime", "ph": "X", "name": "cudaLaunchKernel", "tid": 1, "ts": 15, "dur": 2,
         "args": {"correlation": 1}},
        {"cat": "cuda_runtime", "ph": "X", "name": "cudaLaunchKernel", "tid": 1, "ts": 50, "dur": 2,
         "args": {"correlation": 2}},
        {"cat": "kernel", "ph": "X", "name": "gemm_kernel", "tid": 7, "ts": 200, "dur": 30, "args": {"correlation": 1}},
        {"cat": "kernel", "ph": "X", "name": "add_kernel", "tid": 7, "ts": 300, "dur": 50, "args": {"correlation": 2}},
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "trace_report.py"
    res = subprocess.run([sys.executable, str(script), str(path), "--steps", "1"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "GPU time per step: 0.080 ms, 2 kernels" in out
    assert "0.080 ms  Outer" in out
    assert any("gemm_kernel" in line and line.rstrip().endswith("aten::mm") for line in out.splitlines())
    assert any("add_kernel" in line and line.rstrip().endswith("Outer") for line in out.splitlines())
    assert "0.070 ms in 1 gaps" in out and "after gemm_kernel  before add_kernel" in out
    res = subprocess.run([sys.executable, str(script), str(path), "--rows", "0"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0 and "--rows must be >= 1, got 0" in res.stderr
    # Missing, not JSON, not gzipped, no traceEvents, an event without its fields: refused by name, no traceback.
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "fake.json.gz").write_text("not gzip")
    (tmp_path / "nokey.json").write_text('{"x": 1}')
    (tmp_path / "bad_event.json").write_text('{"traceEvents": [{"cat": "kernel", "name": "k"}]}')
    for name, why in (("missing.json", "not a readable chrome trace"), ("text.json", "not a readable chrome trace"),
                      ("fake.json.gz", "not a readable chrome trace"), ("nokey.json", "no traceEvents list"),
                      ("bad_event.json", "a malformed event")):
        res = subprocess.run([sys.executable, str(script), str(tmp_path / name)], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode != 0 and why in res.stderr and "Traceback" not in res.stderr, (name, res.stderr)
