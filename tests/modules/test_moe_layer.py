"""The MoE layer: composition, user routers, load statistics, no host-device sync, activation checkpointing."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch._library.custom_ops import OPDEFS  # the custom ops by name, with their Python code
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.training import set_activation_checkpointing

from torchtune_moe.models import moe, moe_layer
from torchtune_moe.modules import (
    MoE,
    MoELinear,
    RouterOutput,
    TokenChoiceTopKRouter,
    collect_aux_loss,
    dispatch_combine,
    moe_layers,
    update_routers,
)

D, H, E = 16, 16, 4
ROUTERS = ["token_choice", "expert_choice", "causal_expert_choice"]


def test_shapes_and_shared_expert_with_gate():
    torch.manual_seed(0)
    layer = moe_layer(
        dim=D, hidden_dim=H, num_experts=E, experts_per_token=2, shared_expert_hidden_dim=24, shared_expert_gate=True
    )
    x = torch.randn(2, 5, D)
    out = layer(x)
    assert out.shape == x.shape
    x_TD = x.view(-1, D)
    routed, _ = dispatch_combine(x_TD, layer.router(x_TD), layer.experts)
    shared = layer.shared_expert(x_TD) * torch.sigmoid(layer.shared_expert_gate(x_TD))
    torch.testing.assert_close(out.view(-1, D), routed + shared)
    assert layer.shared_expert.w1.out_features == 24


def test_shared_expert_without_gate():
    torch.manual_seed(0)
    layer = moe_layer(dim=D, hidden_dim=H, num_experts=E, experts_per_token=2, shared_expert_hidden_dim=8)
    x = torch.randn(2, 5, D)
    x_TD = x.view(-1, D)
    routed, _ = dispatch_combine(x_TD, layer.router(x_TD), layer.experts)
    torch.testing.assert_close(layer(x).view(-1, D), routed + layer.shared_expert(x_TD))
    assert layer.shared_expert_gate is None


class HashRouter(nn.Module):
    """A user's router: fixed pseudo-random experts per token (from its hidden state), uniform weights, with
    a learned gate only for the logits the aux losses use."""

    def __init__(self, dim: int, num_experts: int, k: int):
        super().__init__()
        self.num_experts, self.k = num_experts, k
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        h_T = (x_TD.detach() * 1000).sum(-1).long().abs()
        experts_TK = (h_T.unsqueeze(-1) + torch.arange(self.k)) % self.num_experts
        logits_TE = self.gate(x_TD).float()
        weights_TK = torch.full(experts_TK.shape, 1.0 / self.k)
        return RouterOutput.from_topk(experts_TK, weights_TK, logits_TE, logits_TE.softmax(-1))


def test_custom_router_module():
    torch.manual_seed(0)
    router = HashRouter(D, E, 2)
    layer = moe_layer(dim=D, hidden_dim=H, num_experts=E, experts_per_token=2, router=router, aux_loss_coeff=0.1)
    assert layer.router is router
    x = torch.randn(2, 5, D, requires_grad=True)
    out = layer(x)
    x_TD = x.view(-1, D)
    h = (x_TD.detach() * 1000).sum(-1).long().abs()
    ref = sum(
        0.5 * torch.stack([_expert(layer.experts, int(e), x_TD[t]) for t, e in enumerate((h + j) % E)])
        for j in range(2)
    )
    torch.testing.assert_close(out.view(-1, D), ref, rtol=1e-5, atol=1e-5)
    (out.sum() + collect_aux_loss(layer)).backward()
    assert router.gate.weight.grad.abs().sum() > 0  # through the aux loss
    assert x.grad is not None
    update_routers(layer)  # not a Router subclass: left alone


def _expert(experts: MoELinear, e: int, x_D: torch.Tensor) -> torch.Tensor:
    gate_up = experts.gate_up_proj[e] @ x_D
    return experts.down_proj[e] @ (F.silu(gate_up[:H]) * gate_up[H:])


def test_custom_router_with_moe_builder():
    model = moe(
        vocab_size=32, num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=D, max_seq_len=16,
        num_experts=E, experts_per_token=2, moe_hidden_dim=H, moe_layers=[1], dense_hidden_dim=16,
        router=HashRouter(D, E, 2),
    )
    assert isinstance(model.layers[1].mlp.router, HashRouter)
    model(torch.randint(0, 32, (2, 8))).sum().backward()


@pytest.mark.parametrize("router", ROUTERS)
def test_expert_load_after_forward(router):
    torch.manual_seed(0)
    layer = moe_layer(dim=D, hidden_dim=H, num_experts=E, experts_per_token=2, router=router)
    B, S = 3, 8
    for mode in (True, False):
        layer.train(mode)
        layer(torch.randn(B, S, D))
        load = layer.tokens_per_expert
        assert load.shape == (E,) and load.dtype == torch.long and not load.requires_grad
        r = layer.last_routing
        valid = r.expert_ids_A[r.expert_ids_A < E]
        assert load.tolist() == torch.bincount(valid, minlength=E).tolist()
        if router == "expert_choice":
            assert load.tolist() == [layer.router.capacity(B * S)] * E
        else:  # token choice, or threshold routing before its first update (top-K warm start)
            assert load.sum() == B * S * 2
        stats = layer.routing_stats()
        assert stats["tokens_per_expert"] is load
        routed = torch.zeros(B * S).index_add_(0, r.token_ids_A, (r.expert_ids_A < E).float())
        assert stats["dropped_tokens"] == (routed == 0).sum()
        assert 0 < stats["router_entropy"] <= torch.log(torch.tensor(float(E))) + 1e-6


def test_routing_stats_counts_dropped_tokens():
    layer = moe_layer(dim=D, hidden_dim=H, num_experts=E, experts_per_token=2, router="causal_expert_choice")
    layer.router.thresholds.fill_(2.0)  # nothing passes
    layer.router.num_updates.fill_(1)
    layer(torch.randn(2, 3, D))
    assert layer.routing_stats()["dropped_tokens"] == 6 and layer.tokens_per_expert.sum() == 0
    with pytest.raises(RuntimeError, match="forward"):
        moe_layer(dim=D, hidden_dim=H, num_experts=E, experts_per_token=2).routing_stats()


@pytest.mark.parametrize("router", ROUTERS)
def test_bf16_layer(router):
    """fp32 router weights with bf16 experts: bf16 out, close to the fp32 layer, gradients in param dtypes."""
    torch.manual_seed(0)
    layer = moe_layer(dim=D, hidden_dim=H, num_experts=E, experts_per_token=2, router=router, aux_loss_coeff=0.1)
    layer_bf16 = copy.deepcopy(layer).to(torch.bfloat16)
    x = torch.randn(2, 8, D)
    ref = layer(x)
    out = layer_bf16(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert layer_bf16.last_routing.weights_A.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    (out.float().sum() + collect_aux_loss(layer_bf16)).backward()
    for p in layer_bf16.parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()


class _RecordOps(TorchDispatchMode):
    """Records every op called, and inside our custom ops the ops their Python code calls (as ``"op > inner"``),
    so that none hides a sync."""

    def __init__(self):
        super().__init__()
        self.ops = set()
        self.calls: list[str] = []
        self._caller = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops.add(name)
        self.calls.append(self._caller + name)
        opdef = OPDEFS.get(func._schema.name)
        if opdef is not None:
            caller, self._caller = self._caller, f"{name} > "
            try:
                with self:
                    return opdef._init_fn(*args, **(kwargs or {}))
            finally:
                self._caller = caller
        return func(*args, **(kwargs or {}))


# Ops that copy a device value to the host (or need its value to size their output).
_SYNC_OPS = {
    "aten._local_scalar_dense",  # .item(), bool(tensor), int(tensor)
    "aten.item",  # the same, as seen inside a custom op's Python code
    "aten.is_nonzero",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.masked_select",
    "aten.unique",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.bincount",
    "aten.repeat_interleave",  # with tensor repeats
    "aten.equal",
    "aten.allclose",
}


@pytest.mark.parametrize("router", ROUTERS + ["token_choice_bias"])
def test_no_host_device_sync(router):
    """Forward (train and eval), backward and update_routers call no op that syncs device to host; except
    the one read of the kept-slot count in each forward of a routing that drops slots (causal expert
    choice: dispatch_combine sizes the expert buffers by it), inside its custom op ``kept_prefix`` (on CUDA
    the count was copied without blocking and that op waits for the copy alone). The ops called inside our
    custom ops (the threshold statistic, the host copy) are recorded too."""
    torch.manual_seed(0)
    extra = {"expert_bias_update_rate": 0.01, "num_expert_groups": 2, "num_limited_groups": 1} if router == "token_choice_bias" else {}
    layer = moe_layer(
        dim=D, hidden_dim=H, num_experts=E, experts_per_token=2, router=router.replace("_bias", ""),
        aux_loss_coeff=0.1, z_loss_coeff=0.01, seq_aux_loss_coeff=0.1, shared_expert_hidden_dim=8,
        shared_expert_gate=True, **extra,
    )
    x = torch.randn(2, 8, D, requires_grad=True)
    update_routers(layer)  # thresholds on (the first update) after one forward
    layer(x)
    update_routers(layer)
    forwards = 0
    rec = _RecordOps()
    with rec:
        layer.train()
        out = layer(x)
        forwards += 1
        (out.sum() + collect_aux_loss(layer)).backward()
        update_routers(layer)
        layer.eval()
        layer(x)
        forwards += 1
        layer.routing_stats()
    assert "aten._grouped_mm" in rec.ops  # the recorder sees the layer's ops
    if router == "causal_expert_choice":  # ... and those inside our custom ops
        assert "torchtune_moe.accumulate_batch_thresholds > aten.topk" in rec.calls
    syncs = [op for op in rec.calls if op.split(" > ")[-1] in _SYNC_OPS]
    if router == "causal_expert_choice":
        assert syncs == ["torchtune_moe.kept_prefix > aten.item"] * forwards, syncs
        assert layer.router.thresholds.gt(0).all()  # the thresholds were on: slots were dropped
    else:
        assert not syncs, syncs


def _ac_model(router: str, **kwargs):
    return moe(
        vocab_size=32, num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=D, max_seq_len=16,
        num_experts=E, experts_per_token=2, moe_hidden_dim=H, router=router,
        aux_loss_coeff=0.1, z_loss_coeff=0.01, seq_aux_loss_coeff=0.1, **kwargs,
    )


@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize(
    "router,kwargs",
    [("token_choice", {"expert_bias_update_rate": 0.01}), ("causal_expert_choice", {}), ("expert_choice", {})],
)
def test_activation_checkpointing_same_losses_grads_and_router_stats(router, kwargs, early_stop):
    """torchtune's activation checkpointing (non-reentrant) recomputes each layer in backward: losses,
    gradients, the router statistics accumulated for update_routers and the layer's logged state must be
    those of the same model without checkpointing. With early stop off, the recompute runs the whole layer."""
    torch.manual_seed(0)
    plain = _ac_model(router, **kwargs).train()
    ac = copy.deepcopy(plain)
    set_activation_checkpointing(ac, auto_wrap_policy={TransformerSelfAttentionLayer})
    assert any("_checkpoint_wrapped_module" in n for n, _ in ac.named_modules())
    tokens = torch.randint(0, 32, (2, 8))
    labels = torch.randint(0, 32, (2, 8))
    for step in range(3):  # step 0 routes with the warm start, later steps with thresholds / biases
        results = []
        for model in (plain, ac):
            model.zero_grad()
            with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
                logits = model(tokens)
            aux = collect_aux_loss(model)
            state = [(l.aux_loss, l.tokens_per_expert, l.last_routing) for _, l in moe_layers(model)]
            loss = F.cross_entropy(logits.view(-1, 32), labels.view(-1))
            (loss + aux).backward()
            # The recompute inside backward must not replace what the layers hold from the real forward.
            assert all(
                l.aux_loss is a and l.tokens_per_expert is t and l.last_routing is r
                for (_, l), (a, t, r) in zip(moe_layers(model), state)
            )
            buffers = {n.replace("_checkpoint_wrapped_module.", ""): b.clone() for n, b in model.named_buffers()}
            grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
            results.append((loss.detach(), aux.detach(), buffers, grads))
            update_routers(model)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
        (l0, a0, b0, g0), (l1, a1, b1, g1) = results
        torch.testing.assert_close(l0, l1)
        torch.testing.assert_close(a0, a1)
        assert b0.keys() == b1.keys() and g0.keys() == g1.keys()
        for n in b0:  # router statistics (_load_accum, _thr_sum, _thr_count), thresholds, biases: not doubled
            torch.testing.assert_close(b0[n], b1[n], msg=n)
        for n in g0:
            torch.testing.assert_close(g0[n], g1[n], msg=n)
    for (_, l0), (_, l1) in zip(moe_layers(plain), moe_layers(ac)):
        for n, b in l0.router.named_buffers():
            torch.testing.assert_close(b, dict(l1.router.named_buffers())[n])
        if router == "causal_expert_choice":
            assert l0.router.num_updates == 3


def test_moe_layers_and_update_routers_walk_the_model():
    model = _ac_model("causal_expert_choice", moe_layers=[1], dense_hidden_dim=16).train()
    names = [n for n, _ in moe_layers(model)]
    assert names == ["layers.1.mlp"]
    model(torch.randint(0, 32, (2, 8)))
    update_routers(model)
    assert model.layers[1].mlp.router.num_updates == 1


def test_moe_rejects_bad_coefficients():
    experts = MoELinear(E, D, H)
    for name in ("aux_loss_coeff", "z_loss_coeff", "seq_aux_loss_coeff"):
        with pytest.raises(ValueError, match=name):
            MoE(experts=experts, router=TokenChoiceTopKRouter(D, E, 2), **{name: -0.1})


def test_deepcopy_and_save_after_a_training_forward():
    """The layer holds the latest aux losses (with their graph); copies and pickles must still work."""
    import io

    layer = moe_layer(dim=D, hidden_dim=H, num_experts=E, experts_per_token=2, aux_loss_coeff=0.1).train()
    layer(torch.randn(2, 4, D))
    assert layer.aux_loss is not None and layer.aux_loss.grad_fn is not None
    clone = copy.deepcopy(layer)
    assert clone.aux_loss is None and clone.aux_losses == {}
    assert layer.aux_loss is not None  # the original keeps them for collect_aux_loss
    torch.testing.assert_close(clone.tokens_per_expert, layer.tokens_per_expert)
    torch.save(layer, io.BytesIO())
    x = torch.randn(2, 4, D)
    torch.testing.assert_close(clone(x), layer(x))


_FSDP_FREE_SCRIPT = """
import gc, sys, weakref
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torchtune_moe.models import moe
from torchtune_moe.modules import collect_aux_loss, moe_layers
from torchtune_moe.training import end_distributed_process

dist.init_process_group("gloo")
freed = []
for clear in (False, True):
    model = moe(vocab_size=32, num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=16, max_seq_len=8,
                num_experts=4, experts_per_token=2, moe_hidden_dim=8, aux_loss_coeff=0.01)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    (model(torch.randint(0, 32, (2, 8))).sum() + collect_aux_loss(model)).backward()
    if clear:
        for _, layer in moe_layers(model):
            layer.clear_aux_losses()
    del layer
    alive = weakref.ref(model)
    del model
    gc.collect()
    freed.append(alive() is None)
print("freed", freed)
dist.destroy_process_group()
end_distributed_process(0)
"""


def test_clear_aux_losses_frees_an_fsdp2_model(tmp_path):
    """A training forward's aux losses keep their graph, whose FSDP2 hooks hold the model where the garbage
    collector cannot reach: the model is freed only once every layer's aux losses are cleared."""
    script = tmp_path / "free.py"
    script.write_text(_FSDP_FREE_SCRIPT)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "freed [False, True]" in res.stdout
    layer = moe_layer(dim=D, hidden_dim=H, num_experts=E, experts_per_token=2, aux_loss_coeff=0.1).train()
    layer(torch.randn(2, 4, D))
    layer.clear_aux_losses()
    assert layer.aux_loss is None and layer.aux_losses == {} and layer.balance_stats is None
