"""Run by tests/modules/test_expert_parallel.py under torchrun (2 processes, gloo): one MoE layer per router kind,
expert-parallel over both ranks against the same layer run locally on each rank's tokens. Exits non-zero (with
the mismatch) on any difference beyond float rounding."""

import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed import init_device_mesh

from torchtune_moe.models.moe import moe_layer
from torchtune_moe.modules import RoutingRecord, capture_routing, replay_routing, update_routers
from torchtune_moe.modules.expert_parallel import AllToAllDispatcher, apply_expert_parallel
from torchtune_moe.modules._grouped_gemm import BF16
from torchtune_moe.modules.moe_linear import ClampedSwiGLU
from torchtune_moe.training import end_distributed_process

E, D, H, K, B, S = 8, 16, 24, 2, 2, 6

ROUTERS = {
    "token_choice": dict(router="token_choice", num_expert_groups=4, num_limited_groups=2, expert_bias_update_rate=0.1),
    "expert_choice": dict(router="expert_choice", capacity_factor=1.0),
    "causal_expert_choice": dict(router="causal_expert_choice", capacity_factor=1.0),
    # GPT-OSS's experts: biases (sharded by expert like the weights), the clamped SwiGLU, a router gate bias
    "token_choice_biased_experts": dict(router="token_choice", gate_bias=True, expert_linear_bias=True,
                                        activation=ClampedSwiGLU(alpha=1.702, limit=0.5)),
    # expert_fp8's padding of each expert's rows to 16 (run with the plain GEMMs: exact) on the EP side only
    "token_choice_fp8_padding": dict(router="token_choice"),
}


def _plain_gemm(x_TD):
    return BF16


def check(name, got, want, atol=1e-5):
    if not torch.allclose(got, want, atol=atol, rtol=1e-5):
        sys.exit(f"rank {dist.get_rank()}: {name}: max abs diff {(got - want).abs().max():.3g}")


def run(kind: str, mesh) -> None:
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same layer on both ranks
    ref = moe_layer(dim=D, moe_hidden_dim=H, num_experts=E, experts_per_token=K, aux_loss_coeff=0.01,
                    z_loss_coeff=0.001, **ROUTERS[kind])
    biased = ref.experts.gate_up_proj_bias is not None
    if biased:  # non-zero biases, large enough that the clamp cuts
        with torch.no_grad():
            ref.experts.gate_up_proj.mul_(3.0)
            ref.experts.gate_up_proj_bias.normal_(0.0, 0.5)
            ref.experts.down_proj_bias.normal_(0.0, 0.5)
    ep = copy.deepcopy(ref)
    if kind.endswith("_fp8_padding"):
        ep.experts.expert_fp8, ep.experts._fp8_gemm = True, _plain_gemm
    apply_expert_parallel(ep, mesh)
    assert isinstance(ep.experts.dispatcher, AllToAllDispatcher)
    assert ep.experts.gate_up_proj.to_local().shape[0] == E // 2
    pnames = ("gate_up_proj", "down_proj") + (("gate_up_proj_bias", "down_proj_bias") if biased else ())
    for pname in pnames[2:]:  # each rank holds its experts' biases
        local = getattr(ep.experts, pname).to_local()
        assert torch.equal(local, getattr(ref.experts, pname).detach().chunk(2)[rank]), pname
    torch.manual_seed(1 + rank)  # different tokens on each rank
    dropped = 0
    for step in range(2):  # step 2 of causal expert choice routes by thresholds (dropped slots)
        x = torch.randn(B, S, D)
        x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(B, S, D)
        out_ref, out_ep = ref(x_ref), ep(x_ep)
        check(f"{kind} out", out_ep, out_ref)
        dropped += int((ep.last_routing.expert_ids_A == E).sum())
        check(f"{kind} aux_loss", ep.aux_loss, ref.aux_loss)
        assert torch.equal(ep.tokens_per_expert, ref.tokens_per_expert), kind
        ((out_ref * g).sum() + ref.aux_loss).backward()
        ((out_ep * g).sum() + ep.aux_loss).backward()
        check(f"{kind} x grad", x_ep.grad, x_ref.grad)
        check(f"{kind} router grad", ep.router.gate.weight.grad, ref.router.gate.weight.grad)
        for pname in pnames:
            # An expert's gradient on its EP rank holds every rank's tokens: the sum of the local gradients.
            want = getattr(ref.experts, pname).grad.clone()
            dist.all_reduce(want)
            got = getattr(ep.experts, pname).grad.full_tensor()
            check(f"{kind} {pname} grad", got, want, atol=1e-4)
        for m in (ref, ep):
            m.zero_grad()
        update_routers(ref)
        update_routers(ep)
        for (n, a), (_, b) in zip(ref.router.named_buffers(), ep.router.named_buffers()):
            check(f"{kind} router buffer {n}", b, a)
    assert (dropped > 0) == (kind == "causal_expert_choice"), (kind, dropped)
    if biased:  # the biases matter: without them the output differs
        with torch.no_grad():
            x = torch.randn(B, S, D)
            unbiased = copy.deepcopy(ref)
            unbiased.experts.down_proj_bias.zero_()
            assert (unbiased(x) - ref(x)).abs().max() > 1e-2
    ep.eval()  # eval forwards (generation) run the collectives too
    with torch.no_grad():
        x = torch.randn(1, 3 + rank, D)  # a different number of tokens on each rank
        ref.eval()
        check(f"{kind} eval out", ep(x), ref(x))
    if kind in ("token_choice", "token_choice_fp8_padding"):  # routing capture and replay
        ep.train(), ref.train()
        x = torch.randn(B, S, D)
        with capture_routing(ep) as record:
            ep(x)
        with capture_routing(ref) as record_ref:
            ref(x)
        assert torch.equal(record.to_array(), record_ref.to_array())
        forced = RoutingRecord.from_array(torch.stack([torch.randperm(E)[:K] for _ in range(B * S)]).unsqueeze(1))
        with replay_routing(ep, forced):
            out_ep = ep(x)
        with replay_routing(ref, forced):
            out_ref = ref(x)
        check("replay out", out_ep, out_ref)
        # Every token to experts 0 and 1 (EP rank 0): rank 1's experts receive no row, their gradients are zero.
        x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
        lopsided = RoutingRecord.from_array(torch.tensor([[[0, 1]]]).expand(B * S, 1, K))
        with replay_routing(ep, lopsided):
            out_ep = ep(x_ep)
        with replay_routing(ref, lopsided):
            out_ref = ref(x_ref)
        check("lopsided out", out_ep, out_ref)
        out_ep.sum().backward()
        out_ref.sum().backward()
        check("lopsided x grad", x_ep.grad, x_ref.grad)
        want = ref.experts.down_proj.grad.clone()
        dist.all_reduce(want)
        check("lopsided down_proj grad", ep.experts.down_proj.grad.full_tensor(), want, atol=1e-4)
        assert want[E // 2 :].abs().sum() == 0


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("ep",))
    for kind in ROUTERS:
        run(kind, mesh)
    if dist.get_rank() == 0:
        print("EP layer checks passed")
    dist.destroy_process_group()
    end_distributed_process(0)


if __name__ == "__main__":
    main()
