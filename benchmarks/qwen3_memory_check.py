"""Peak GPU memory and speed of full fine-tuning Qwen3-MoE with FSDP2 (and expert parallelism), on random
copies at full or reduced depth.

No weights are downloaded (the GPU machines have no network): the model is a published Qwen3-MoE size's exact
layer (``--size``: 30b_a3b, default, or 235b_a22b; the numbers come from torchtune_moe.models.qwen3_moe) at the
depth given (``--layers``), randomly initialised, with real (unforced) routing. It builds the model on the meta
device, shards every decoder layer and the root with FSDP2 (torchtune's ``training.shard_model``, as the recipe
does; with ``--expert-parallel-degree`` the experts first, by expert), initialises the local shards, and runs
training steps (bf16, activation checkpointing, the output cross-entropy of ``--loss``: ``linear``,
LinearCrossEntropyLoss with 8 chunks, as configs/qwen3_moe/30b_a3b_full.yaml, or ``chunked``, torchtune's
CEWithChunkedOutputLoss with 8 chunks, the configs' loss before 2026-11-29 and of the figures recorded before then):
``--warmup-steps`` unmeasured ones first (kernel selection, compilation, allocator growth, the optimizer states'
creation), then ``--steps`` measured ones, for which it reports the peak allocated and reserved memory per GPU,
the time per step, tokens/s/GPU, model TFLOP/s/GPU (:func:`flop_per_token`) and MFU against the 989 TFLOP/s
dense bf16 peak. ``params`` is the model's parameter count (a DTensor's ``numel()`` is its global size, so it is
not multiplied by the number of GPUs). ``--optimizer adamw8bit`` uses torchao's AdamW8bit instead of torch AdamW
with bf16 states; ``--compile`` compiles as ``compile: true`` does (each layer, the loss's per-chunk softmax, and
the AdamW step per layer instead of the fused one); ``--cpu-offload`` shards with FSDP2's
``CPUOffloadPolicy`` (parameters, gradients and AdamW states in host memory; unfused AdamW steps on the CPU), as
``fsdp_cpu_offload: true`` in the recipe; ``--ac-every n`` checkpoints only every n-th layer's activations (0: none;
the configs checkpoint every layer), trading memory for the recompute (about a quarter of a checkpointed layer's
time), which the recipe does not offer yet: this measures what it would buy.

The peak is split into the sharded states (parameters x bytes per parameter / GPUs: 8 with AdamW, 6 with
AdamW8bit, 0 on the GPU with ``--cpu-offload``) and the rest (``transient_gib``: FSDP2's gathered layers and
unsharded gradients, activations, logits, all-to-all buffers), which does not grow with depth (2 x H200: Qwen3-30B-A3B
5.5 GiB at 2 layers, 6.5 at 48; Qwen3-235B-A22B at 1 x 2048 tokens 16.9 GiB at 4 and 8 layers). The full-depth
prediction is the full model's states plus this run's rest. One depth a run, in a fresh process: the old two-depth
runs measured the second depth with the first model still allocated (its MoE layers kept their last forward's aux
losses, whose FSDP2 hooks hold the model: ``MoE.clear_aux_losses``), and their slope, 3.5 GiB per layer, predicted
174 GiB at 48 layers against 120 GiB measured.

    torchrun --nproc_per_node 2 benchmarks/qwen3_memory_check.py --layers 48 --compile
    torchrun --nproc_per_node 4 benchmarks/qwen3_memory_check.py --layers 48 --compile --expert-parallel-degree 4
    torchrun --nproc_per_node 4 benchmarks/qwen3_memory_check.py --size 235b_a22b --layers 4 --batch-size 1 --expert-parallel-degree 4

CPU smoke test of the script itself (tiny dims, gloo): ``torchrun --nproc_per_node 2
benchmarks/qwen3_memory_check.py --device cpu --tiny --layers 2``.
"""

import argparse
import json
import os
import time
from functools import partial

import torch
import torch.distributed as dist
from torchtune import training
from torchtune.modules.loss import CEWithChunkedOutputLoss

from torchtune_moe.models._hf_config import published_kwargs
from torchtune_moe.models.qwen3_moe import QWEN3_MOE_30B_A3B, QWEN3_MOE_235B_A22B, qwen3_moe
from torchtune_moe.models.qwen3_moe._hf_config import qwen3_moe_hf_config_to_kwargs
from torchtune_moe.modules import LinearCrossEntropyLoss, Router, collect_aux_loss, update_routers
from torchtune_moe.modules.expert_parallel import check_expert_parallel_degree
from torchtune_moe.training import (
    compile_model,
    compile_optimizer_step,
    end_distributed_process,
    grad_norms,
    gradient_groups,
    init_meshes,
    scale_and_clip_grads,
    shard_experts,
)

#: The published sizes (their config.json numbers live once, in torchtune_moe/models/qwen3_moe/_model_builders.py).
SIZES = {"30b_a3b": QWEN3_MOE_30B_A3B, "235b_a22b": QWEN3_MOE_235B_A22B}
#: Tiny dims (builder kwargs) for the CPU smoke test of the script.
TINY = dict(
    vocab_size=512, num_heads=4, num_kv_heads=2, embed_dim=64, head_dim=16, dense_hidden_dim=128, moe_hidden_dim=32,
    num_experts=8, experts_per_token=2, rope_base=1e6, norm_eps=1e-6, norm_topk_prob=True, aux_loss_coeff=1e-3,
)
#: Bytes per parameter of the states kept on each GPU (bf16 weights and gradients, then the two AdamW moments).
STATE_BYTES = {"adamw": 2 + 2 + 2 + 2, "adamw8bit": 2 + 2 + 1 + 1}
#: Dense bf16 peak of one H200 (and H100) SXM, for the MFU column.
PEAK_BF16_TFLOPS = 989.0
GIB = 1024**3


def build_sharded(
    dims: dict,
    num_layers: int,
    max_seq_len: int,
    device: torch.device,
    mesh,
    expert_mesh=None,
    cpu_offload: bool = False,
    compile: bool = False,
    ac_every: int = 1,
) -> torch.nn.Module:
    """Meta-device build, FSDP2 sharding of each layer and the root (with ``expert_mesh``: the experts split by
    expert first, as the recipe's ``expert_parallel_degree``), random init of the local shards (on the CPU under
    ``cpu_offload``)."""
    with training.set_default_dtype(torch.bfloat16), torch.device("meta"):
        model = qwen3_moe(num_layers=num_layers, max_seq_len=max_seq_len, **dims)
    if compile:  # as the recipe with compile: true (per-layer torch.compile, before activation checkpointing)
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        compile_model(model, verbose=False)  # the decoder layers and the final norm
    # Activation checkpointing of every ``ac_every``-th decoder layer (layers 0, n, 2n, ...; 1: all, 0: none), as
    # torchtune's experimental ``ac_mode: selective`` with ``ac_option: n``.
    checkpointed = {id(layer) for i, layer in enumerate(model.layers) if ac_every and i % ac_every == 0}
    if checkpointed:
        training.set_activation_checkpointing(
            model, auto_wrap_policy=lambda module, recurse, **_: recurse or id(module) in checkpointed
        )
    if expert_mesh is not None:
        shard_experts(model, expert_mesh, reshard_after_forward=True)
    training.shard_model(
        model=model,
        shard_conditions=[partial(training.get_shard_conditions, names_to_match=None)],
        cpu_offload=cpu_offload,
        reshard_after_forward=True,
        dp_mesh=mesh,
    )
    model.to_empty(device="cpu" if cpu_offload else device)
    torch.manual_seed(0)
    with torch.no_grad(), torch.device(device):
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.fill_(1.0) if name.endswith("scale") else local.normal_(0.0, 0.02)
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
            elif isinstance(m, Router):
                for name, b in list(m.named_buffers(recurse=False)):
                    setattr(m, name, torch.zeros(b.shape, dtype=b.dtype, device=device))
    return model


def param_count(dims: dict, num_layers: int, max_seq_len: int) -> int:
    """Parameters of the model at ``num_layers`` (built on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in qwen3_moe(num_layers=num_layers, max_seq_len=max_seq_len, **dims).parameters())


def flop_per_token(dims: dict, num_layers: int, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward, activation recompute not counted): 6 x the matmul
    parameters a token passes through (attention projections, the router, its ``experts_per_token`` experts, the
    output projection; not the embedding lookup) plus causal attention's scores and values, 6 x seq_len x heads x
    head_dim per layer (forward 2 x 2 x seq_len / 2 x heads x head_dim, backward twice that)."""
    d, h, kv, hd = dims["embed_dim"], dims["num_heads"], dims["num_kv_heads"], dims["head_dim"]
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    moe = dims["experts_per_token"] * 3 * d * dims["moe_hidden_dim"] + d * dims["num_experts"]
    matmul_params = num_layers * (attn + moe) + dims["vocab_size"] * d
    return 6 * matmul_params + 6 * num_layers * seq_len * h * hd


def measure(dims: dict, num_layers: int, args, device: torch.device, mesh, expert_mesh=None) -> dict:
    """Runs ``args.warmup_steps`` unmeasured then ``args.steps`` measured optimizer steps; returns this rank's
    peak memory over the measured steps (GiB) and their mean time."""
    model = build_sharded(dims, num_layers, args.seq_len, device, mesh, expert_mesh, cpu_offload=args.cpu_offload,
                          compile=args.compile, ac_every=args.ac_every)
    if args.loss == "linear":  # as the recipe: the loss owns the projection, the root stays gathered until backward
        loss_fn = LinearCrossEntropyLoss(num_output_chunks=8)
        loss_fn.set_model_output(model)
        model.set_reshard_after_forward(False, recurse=False)
    else:
        loss_fn = CEWithChunkedOutputLoss(num_output_chunks=8)
        model.set_num_output_chunks(loss_fn.num_output_chunks)
    if args.compile and args.loss == "linear":  # as the recipe with compile: true: the per-chunk softmax compiled
        loss_fn.apply_compile_strategy()
    # As the recipe with compile: true, the AdamW step compiled per decoder layer (the configs' fused: false); else
    # torch's fused step. Offloaded states step on the CPU (unfused).
    compiled_step = args.compile and not args.cpu_offload
    fused = device.type == "cuda" and not args.cpu_offload and not compiled_step
    if args.optimizer == "adamw8bit":
        from torchao.optim import AdamW8bit

        optimizer = AdamW8bit(model.parameters(), lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused, foreach=compiled_step or None)
        if compiled_step:
            compile_optimizer_step(optimizer, model.layers)
    model.train()
    gen = torch.Generator().manual_seed(dist.get_rank())

    def step():
        tokens = torch.randint(0, dims["vocab_size"], (args.batch_size, args.seq_len + 1), generator=gen).to(device)
        logits = model(tokens[:, :-1])
        loss = loss_fn(logits, tokens[:, 1:]) + collect_aux_loss(model)
        loss.backward()
        # As the recipe (clip_grad_norm: 1.0): the norm, then one pass that clips, and under expert parallelism
        # divides the experts' gradients by the degree (they sum over their EP group). The loss is a mean: scale 1.
        groups = gradient_groups(model, 1 if expert_mesh is None else expert_mesh["ep"].size())
        scale_and_clip_grads(groups, grad_norms(groups, device).tolist(), 1.0, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_routers(model)

    for _ in range(args.warmup_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak_alloc = torch.cuda.max_memory_allocated(device) / GIB
        peak_reserved = torch.cuda.max_memory_reserved(device) / GIB
    else:
        peak_alloc = peak_reserved = float("nan")
    result = dict(
        layers=num_layers,
        params=sum(p.numel() for p in model.parameters()),
        peak_allocated_gib=peak_alloc,
        peak_reserved_gib=peak_reserved,
        seconds_per_step=(time.perf_counter() - t0) / args.steps,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (one depth a run)")
    parser.add_argument("--batch-size", type=int, default=4, help="micro-batch per GPU")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3, help="measured steps")
    parser.add_argument("--warmup-steps", type=int, default=1, help="unmeasured steps before them (>= 1)")
    parser.add_argument("--cpu-offload", action="store_true", help="FSDP2 CPUOffloadPolicy (fsdp_cpu_offload)")
    parser.add_argument("--ac-every", type=int, default=1,
                        help="activation checkpointing of every n-th decoder layer (1: all, the configs'; 0: none)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="30b_a3b", help="published Qwen3-MoE size")
    parser.add_argument("--tiny", action="store_true", help="tiny dims (smoke test of the script)")
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw",
                        help="torch AdamW (bf16 states) or torchao.optim.AdamW8bit")
    parser.add_argument("--compile", action="store_true",
                        help="the recipe's compile: true (per-layer torch.compile, the loss, the AdamW step per layer)")
    parser.add_argument("--expert-parallel-degree", type=int, default=1, help="split experts over this many ranks")
    parser.add_argument("--loss", choices=["linear", "chunked"], default="linear",
                        help="linear: LinearCrossEntropyLoss (the configs'); chunked: CEWithChunkedOutputLoss")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args()
    if args.ac_every < 0:
        parser.error(f"--ac-every: got {args.ac_every}; 0 (no layer), 1 (every layer) or n (every n-th layer)")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        parser.error(f"--out: {args.out}: its directory does not exist")
    if args.layers < 1:
        parser.error(f"--layers: got {args.layers}; at least 1 decoder layer")
    if args.warmup_steps < 1:
        parser.error("--warmup-steps: at least 1 (the first step creates the optimizer states and picks kernels)")
    if args.cpu_offload and args.expert_parallel_degree > 1:
        parser.error("--cpu-offload: not with --expert-parallel-degree > 1 (the recipe refuses it too)")
    if args.cpu_offload and args.device == "cpu":
        parser.error("--cpu-offload: needs --device cuda (there is nothing to offload from on the CPU)")

    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if args.tiny:
        dims, full_depth = TINY, 2
    else:
        dims = published_kwargs(qwen3_moe_hf_config_to_kwargs, SIZES[args.size], args.seq_len, {})
        full_depth = dims.pop("num_layers")
        dims.pop("max_seq_len")
    check_expert_parallel_degree(args.expert_parallel_degree, world, [dims["num_experts"]])
    mesh, expert_mesh = init_meshes(args.device, world, args.expert_parallel_degree)

    num_layers = args.layers
    mine = measure(dims, num_layers, args, device, mesh, expert_mesh)
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    seconds = max(r["seconds_per_step"] for r in everyone)
    peak = max(r["peak_allocated_gib"] for r in everyone)
    state_bytes = 0 if args.cpu_offload else STATE_BYTES[args.optimizer]
    states = mine["params"] * state_bytes / world / GIB  # DTensor.numel() is the global size
    full_params = param_count(dims, full_depth, args.seq_len)
    full_states = full_params * state_bytes / world / GIB
    row = dict(
        layers=num_layers,
        gpus=world,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        params=mine["params"],
        cpu_offload=args.cpu_offload,
        expert_parallel_degree=args.expert_parallel_degree,
        optimizer=args.optimizer,
        compile=args.compile,
        ac_every=args.ac_every,
        loss=args.loss,
        peak_allocated_gib_per_rank=[round(r["peak_allocated_gib"], 2) for r in everyone],
        peak_reserved_gib_per_rank=[round(r["peak_reserved_gib"], 2) for r in everyone],
        states_gib_per_gpu=round(states, 2),
        transient_gib=round(peak - states, 2),
        seconds_per_step=round(seconds, 3),
        tokens_per_second_per_gpu=round(args.batch_size * args.seq_len / seconds),
        gflop_per_token=round(flop_per_token(dims, num_layers, args.seq_len) / 1e9, 2),
    )
    row["model_tflops_per_gpu"] = round(row["tokens_per_second_per_gpu"] * row["gflop_per_token"] / 1e3, 1)
    row["mfu"] = round(row["model_tflops_per_gpu"] / PEAK_BF16_TFLOPS, 3)
    row["full_depth"] = full_depth
    row["states_gib_per_gpu_at_full_depth"] = round(full_states, 1)
    row["predicted_peak_allocated_gib_at_full_depth"] = round(full_states + peak - states, 1)
    row["note"] = f"random Qwen3-MoE {'tiny' if args.tiny else args.size}; no weights downloaded"
    if rank == 0:
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(row, f, indent=2)
    dist.destroy_process_group()
    end_distributed_process(0)


if __name__ == "__main__":
    main()
