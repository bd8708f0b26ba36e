"""Expert parallelism at the layer level: 2 processes (gloo) under torchrun run tests/modules/_ep_worker.py, which
compares an expert-parallel MoE layer with the same layer run locally, for every router kind."""

import subprocess
import sys
from pathlib import Path

import pytest

from torchtune_moe.modules.expert_parallel import check_expert_parallel_degree


def test_expert_parallel_layer_equals_local_layer_on_two_processes():
    """Outputs, aux losses, expert loads, gradients (tokens, router, experts), router statistics after
    update_routers, eval forwards with unequal token counts, routing capture and replay, and an EP rank whose
    experts get no row: all equal the local layer's (token choice with group-limited routing and the aux-loss-free
    bias; expert choice; causal expert choice with dropped slots; GPT-OSS's biased experts with the clamped SwiGLU,
    whose biases are sharded by expert and get the same gradients; expert_fp8's padding of expert rows)."""
    worker = Path(__file__).with_name("_ep_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "EP layer checks passed" in res.stdout


@pytest.mark.parametrize(
    "degree, world, experts, message",
    [
        (3, 4, [8], r"expert_parallel_degree: got 3; it must divide the number of processes \(4\) and the experts "
                    r"per MoE layer \(8\); allowed: 1, 2, 4"),
        (4, 4, [6], r"expert_parallel_degree: got 4; .* \(6\); allowed: 1, 2"),
        (0, 2, [8], r"expert_parallel_degree: got 0; allowed: an integer >= 1 \(1 = off\)"),
        (2, 2, [], r"expert_parallel_degree: got 2, but the model has no MoE layer; allowed: 1"),
    ],
)
def test_a_bad_expert_parallel_degree_is_refused_by_name(degree, world, experts, message):
    with pytest.raises(ValueError, match=message):
        check_expert_parallel_degree(degree, world, experts)


def test_a_good_degree_passes():
    check_expert_parallel_degree(1, 1, [8])
    check_expert_parallel_degree(2, 4, [8, 8])
