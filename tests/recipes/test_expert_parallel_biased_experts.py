"""Expert parallelism through the recipe for experts with biases (GPT-OSS's experts): 2 processes (gloo),
``expert_parallel_degree=2`` against expert parallelism off (FSDP2 only), the tiny model with expert biases."""

import subprocess

import pytest
import torch
from safetensors.torch import load_file

from _recipe_helpers import FAST, read_metrics


def _tune_run_2(output_dir, *overrides):
    cmd = ["tune", "run", "--nproc_per_node", "2", "moe_full_finetune", "--config", "tiny/full",
           f"output_dir={output_dir}", *FAST, "max_steps_per_epoch=2", "batch_size=4", "model.expert_linear_bias=true",
           *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


@pytest.mark.slow
def test_biased_experts_under_expert_parallelism_equal_fsdp_only(tmp_path):
    """Losses, gradient norms and the saved weights (expert biases included, gathered from their expert shards
    into the checkpoint) of EP=2 equal the FSDP2-only run's. Slow (two 2-process runs, ~40 s): the layer-level
    check, tests/modules/test_expert_parallel_layer.py, runs in CI."""
    off, ep = tmp_path / "off", tmp_path / "ep"
    _tune_run_2(off)
    res = _tune_run_2(ep, "expert_parallel_degree=2")
    assert "experts split over 2 ranks (expert parallelism)" in res.stdout + res.stderr
    m_off, m_ep = read_metrics(off), read_metrics(ep)
    assert sorted(m_ep) == [1, 2]
    for step in (1, 2):
        for key in ("loss", "grad_norm"):
            assert m_ep[step][key] == pytest.approx(m_off[step][key], rel=1e-5), (step, key)
    a, b = load_file(off / "step_2" / "model.safetensors"), load_file(ep / "step_2" / "model.safetensors")
    assert a.keys() == b.keys()
    biases = [k for k in a if k.endswith(("gate_up_proj_bias", "down_proj_bias"))]
    assert biases
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), (k, (a[k] - b[k]).abs().max())
