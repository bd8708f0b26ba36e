"""Hub checkpoints under FSDP2 without a full copy in any process: 2 gloo ranks read only their safetensors
slices (``HFMoECheckpointer.load_sharded``) and get the same weights as one process; the Hub export streams from
the shards one tensor at a time (``GatheredStateDict``) and writes the same files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hf_testing import save_tiny_hf

transformers = pytest.importorskip("transformers")

from torchtune_moe.training import HFMoECheckpointer, from_hf_pretrained  # noqa: E402

# Runs under torchrun: shards the tiny model over the ranks, loads it slice-wise, exports it, reports.
_SCRIPT = r"""
import json, sys
from functools import partial
from pathlib import Path
import torch, torch.distributed as dist
from torch.distributed import init_device_mesh
from torchtune import training
from torchtune_moe.models._hf_families import hf_config_to_kwargs
from torchtune_moe.training import GatheredStateDict, HFMoECheckpointer, end_distributed_process, materialize_model

hf_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ckpt = HFMoECheckpointer(str(hf_dir), max_shard_size=20000)
family, kwargs = hf_config_to_kwargs(ckpt.config)
with torch.device("meta"):
    model = family.builder(**kwargs)
if world > 1:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    training.shard_model(model, [partial(training.get_shard_conditions, names_to_match=None)], cpu_offload=False,
                         dp_mesh=mesh["dp"])
materialize_model(model, torch.device("cpu"), torch.device("cpu"))
read = ckpt.load_sharded(model)
total = sum(v.numel() for v in model.state_dict().values())
largest = max(v.numel() for v in model.state_dict().values())
sd = GatheredStateDict(model)
if rank == 0:
    (out / "export").mkdir(parents=True)
    try:
        torch.save({k: sd[k].clone() for k in sd}, out / "full.pt")  # for the comparison only
        ckpt.save_checkpoint(sd, out / "export")
    finally:
        sd.close()
else:
    sd.serve()
(out / f"rank{rank}.json").write_text(json.dumps(dict(read=read, total=total, largest=largest,
                                                       held=sd.largest_values)))
dist.destroy_process_group()
end_distributed_process(0)
"""


def _run(script: Path, nproc: int, hf_dir: Path, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), str(hf_dir), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_two_ranks_read_their_slices_and_export_the_same_hub_files(tmp_path):
    hf, hf_dir = save_tiny_hf(
        transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, tmp_path / "hf",
        intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True,
    )
    script = tmp_path / "load.py"
    script.write_text(_SCRIPT)
    one, two = _run(script, 1, hf_dir, tmp_path / "one"), _run(script, 2, hf_dir, tmp_path / "two")

    # Same weights from 2 ranks' slices as from one process, and as from_hf_pretrained's full read.
    a, b = torch.load(tmp_path / "one" / "full.pt"), torch.load(tmp_path / "two" / "full.pt")
    ref = from_hf_pretrained(hf_dir).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], ref[k]) for k in a)

    # Instrumentation: one process reads everything once; each of 2 ranks about half, never a full copy.
    total = one[0]["total"]
    assert one[0]["read"] == total
    for r in two:
        assert r["total"] == total and 0.3 * total < r["read"] < 0.7 * total, r
    assert sum(r["read"] for r in two) < 1.1 * total  # only the (replicated) norms and router buffers twice

    # The export held one full tensor at a time (the bound docs/distributed.md states), and wrote the Hub files
    # of the original checkpoint, bit for bit, with the sharded writer's index.
    assert two[0]["held"] == two[0]["largest"] < 0.25 * total
    export = tmp_path / "two" / "export"
    index = json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1  # sharded by max_shard_size
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert sorted(names) == sorted(index)
        for name in names:
            with safe_open(str(export / index[name]), "pt") as g:
                assert torch.equal(f.get_tensor(name), g.get_tensor(name)), name
    assert (export / "tokenizer_config.json").is_file()
    HFMoECheckpointer(str(export))  # and it reads back as a checkpoint
