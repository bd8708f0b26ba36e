"""``end_distributed_process``: a multi-process run's last step leaves with ``os._exit`` after flushing (the
interpreter teardown of torch 2.13 + gloo can abort a rank after ``destroy_process_group``)."""

import subprocess
import sys

import pytest

_SCRIPT = """
import logging, sys
from torchtune_moe.training import end_distributed_process
logging.basicConfig(stream=sys.stdout, level=logging.INFO)
print("buffered line", end="")  # no newline: only an explicit flush writes it
logging.getLogger("x").info("logged line")
end_distributed_process({status!r})
print("never")
"""


@pytest.mark.parametrize("status, code", [(0, 0), (3, 3), ("recipe: stopped at step 2", 1)])
def test_flushes_and_exits_with_the_status(status, code):
    res = subprocess.run([sys.executable, "-c", _SCRIPT.format(status=status)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == code
    assert "buffered line" in res.stdout and "logged line" in res.stdout and "never" not in res.stdout
    if isinstance(status, str):
        assert res.stderr.strip().endswith(status)


def test_refuses_while_the_process_group_is_up(tmp_path):
    script = (
        "import torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'init'}', rank=0, world_size=1)\n"
        "from torchtune_moe.training import end_distributed_process\n"
        "try:\n    end_distributed_process(0)\nexcept RuntimeError as e:\n    print(e)\n"
        "dist.destroy_process_group()\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "destroy the process group first" in res.stdout
