"""The device meshes of a run and what is sharded over which: FSDP2 over all ranks, and with expert parallelism
(``expert_parallel_degree`` P > 1) the routed experts sharded by expert over P ranks and by FSDP2 over the rest.

Mesh layout for W processes and degree P: a 2-D mesh ``("expert_dp", "ep")`` of shape ``(W / P, P)``, rank
``r = i * P + j``. The ``ep`` groups are P consecutive ranks (on one node when P divides the GPUs per node, so
the all-to-alls stay on NVLink); ``expert_dp`` joins the ranks that hold the same experts. Everything but the
routed experts is FSDP2-sharded over a 1-D mesh ``("dp",)`` of all W ranks, as without expert parallelism.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn, Optional, Union

import torch
import torch.distributed as dist
from torch.distributed import init_device_mesh
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from torchtune_moe.modules import moe_layers
from torchtune_moe.modules.expert_parallel import apply_expert_parallel

__all__ = ["init_meshes", "shard_experts", "end_distributed_process"]


def init_meshes(device_type: str, world_size: int, expert_parallel_degree: int) -> tuple[DeviceMesh, Optional[DeviceMesh]]:
    """``(dp_mesh, expert_mesh)``: the 1-D ``("dp",)`` mesh of all ranks, and for a degree P > 1 the 2-D
    ``("expert_dp", "ep")`` mesh of shape ``(W / P, P)`` (None when P is 1). The degree must be checked first
    (:func:`~torchtune_moe.modules.expert_parallel.check_expert_parallel_degree`)."""
    dp_mesh = init_device_mesh(device_type, mesh_shape=(world_size,), mesh_dim_names=("dp",))
    if expert_parallel_degree == 1:
        return dp_mesh, None
    P = expert_parallel_degree
    expert_mesh = init_device_mesh(device_type, mesh_shape=(world_size // P, P), mesh_dim_names=("expert_dp", "ep"))
    return dp_mesh, expert_mesh


def shard_experts(model: torch.nn.Module, expert_mesh: DeviceMesh, reshard_after_forward: bool) -> None:
    """Expert parallelism for every MoE layer of ``model``: the routed experts are sharded by expert over
    ``expert_mesh["ep"]`` (DTensor ``Shard(0)``, all-to-all dispatch:
    :func:`~torchtune_moe.modules.expert_parallel.apply_expert_parallel`), then FSDP2-sharded over
    ``expert_mesh["expert_dp"]`` as their own FSDP unit. Call it before sharding the rest of the model (FSDP2 then
    leaves the experts to their unit).

    Gradients: an expert's gradient on its rank already sums the rows of all P ranks of its group, and FSDP2
    averages it over the W / P ranks of ``expert_dp``, so it comes out P times the average over all W ranks that
    every other gradient is: their factor ``1 / P`` in :func:`~torchtune_moe.training.gradient_groups` makes them
    alike.
    """
    apply_expert_parallel(model, expert_mesh["ep"])
    for _, layer in moe_layers(model):
        fully_shard(layer.experts, mesh=expert_mesh["expert_dp"], reshard_after_forward=reshard_after_forward)


def end_distributed_process(status: Union[int, str] = 0) -> NoReturn:
    """Ends a process of a multi-process run, after ``destroy_process_group``: prints ``status`` to stderr if it is a
    message (exit status 1, as ``sys.exit`` does), flushes the output streams and the logging handlers, then leaves
    with ``os._exit``, skipping the interpreter's teardown.

    Why not a plain return: with torch 2.13 and gloo, a rank intermittently aborts *after* ``destroy_process_group``
    has returned, while the interpreter tears down ("terminate called without an active exception", SIGABRT in the
    main thread with no Python frame, about 1 run in 40 of two ranks on a loaded 2-core machine). torchrun then
    reports the whole job as failed although every output was written and closed. Nothing is left to do at this
    point that teardown would do for us: checkpoints are written atomically and the metric loggers are closed.
    """
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("end_distributed_process: destroy the process group first")
    code = 0
    if isinstance(status, str):
        print(status, file=sys.stderr)
        code = 1
    elif status:
        code = int(status)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)
