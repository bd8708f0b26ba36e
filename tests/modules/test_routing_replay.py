"""Tests for routing capture and replay (torchtune_moe.modules.routing_replay)."""

import copy
import json

import pytest
import torch
from torchtune import training
from torchtune.modules import TransformerSelfAttentionLayer

from torchtune_moe.models.moe import moe
from torchtune_moe.modules import RoutingRecord, capture_routing, moe_layers, replay_routing

VOCAB, E, K, B, S = 32, 4, 2, 2, 6


def tiny_model(seed: int = 0, **kwargs) -> torch.nn.Module:
    """3 decoder layers, MoE in layers 0 and 2 (the record has 2 layers), dense layer 1."""
    torch.manual_seed(seed)
    args = dict(
        vocab_size=VOCAB, num_layers=3, num_heads=2, num_kv_heads=1, embed_dim=16, max_seq_len=32,
        num_experts=E, experts_per_token=K, moe_hidden_dim=8, moe_layers=[0, 2], dense_hidden_dim=16,
    )
    args.update(kwargs)
    return moe(**args)


def tokens(batch: int = B, seq: int = S, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def random_record(num_tokens: int, num_layers: int = 2, seed: int = 2) -> RoutingRecord:
    """Valid routing (K distinct experts per token) drawn at random: unlike what the router picks."""
    g = torch.Generator().manual_seed(seed)
    return RoutingRecord([torch.rand(num_tokens, E, generator=g).argsort(-1)[:, :K] for _ in range(num_layers)])


def assert_records_equal(a: RoutingRecord, b: RoutingRecord) -> None:
    assert a.num_layers == b.num_layers
    for ea, eb in zip(a.experts, b.experts):
        assert torch.equal(ea, eb)


def test_capture_layout_and_latest_forward_wins():
    model = tiny_model().eval()
    x = tokens()
    with capture_routing(model, with_weights=True) as record:
        model(x)
    assert (record.num_layers, record.num_tokens, record.top_k) == (2, B * S, K)
    for l, (_, layer) in enumerate(moe_layers(model)):
        assert torch.equal(record.experts[l], layer.last_routing.experts_TK)
        assert torch.equal(record.weights[l], layer.last_routing.weights_A.view(B * S, K))
        assert torch.allclose(record.weights[l].sum(-1), torch.ones(B * S))  # norm_topk_prob
    # Tokens are the batch flattened row-major: sample 1 alone routes like rows S..2S of the batch.
    with capture_routing(model) as single:
        model(x[1:2])
    for l in range(2):
        assert torch.equal(single.experts[l], record.experts[l][S : 2 * S])
    assert single.weights is None
    # Several forwards inside one capture: the latest one wins.
    with capture_routing(model) as both:
        model(x)
        model(x[1:2])
    assert_records_equal(both, single)
    # The hooks are gone afterwards.
    assert all(layer._routing_hook is None for _, layer in moe_layers(model))


def test_capture_then_replay_in_eval_gives_identical_outputs():
    model = tiny_model().eval()
    x = tokens()
    with capture_routing(model) as record:
        out = model(x)
    with replay_routing(model, record):
        replayed = model(x)
    assert torch.equal(out, replayed)
    # Replaying other routing does change the outputs (replay is not a no-op).
    with replay_routing(model, random_record(B * S)):
        assert not torch.allclose(model(x), out)


def test_capture_inside_replay_records_the_forced_experts():
    model = tiny_model().eval()
    x = tokens()
    forced = random_record(B * S)
    with capture_routing(model) as free:
        model(x)
    with replay_routing(model, forced):
        with capture_routing(model) as inside:
            model(x)
    assert_records_equal(inside, forced)
    assert any(not torch.equal(a, b) for a, b in zip(free.experts, forced.experts))


def test_replay_keeps_recorded_experts_after_an_optimizer_step():
    model = tiny_model().train()
    x = tokens()
    routers = [layer.router for _, layer in moe_layers(model)]
    outputs = []
    hooks = [r.register_forward_hook(lambda m, inp, out: outputs.append(out)) for r in routers]
    with capture_routing(model) as before:
        model(x)
    for h in hooks:
        h.remove()
    # A step that lowers the scores of the experts each token chose, so fresh routing must change.
    opt = torch.optim.SGD([r.gate.weight for r in routers], lr=50.0)
    sum(o.probs_TE.gather(1, o.experts_TK).sum() for o in outputs).backward()
    opt.step()

    with capture_routing(model) as after:
        model(x)
    assert any(not torch.equal(a, b) for a, b in zip(after.experts, before.experts)), "routing did not change"
    with replay_routing(model, before), capture_routing(model) as replayed:
        model(x)
    assert_records_equal(replayed, before)


def test_gradients_reach_the_router_under_replay():
    x = tokens()
    model = tiny_model().train()
    with capture_routing(model) as own:
        model(x)

    def gate_grads(record):
        model.zero_grad()
        if record is None:
            model(x).pow(2).mean().backward()
        else:
            with replay_routing(model, record):
                model(x).pow(2).mean().backward()
        return [layer.router.gate.weight.grad.clone() for _, layer in moe_layers(model)]

    free = gate_grads(None)
    replaying_own = gate_grads(own)
    replaying_other = gate_grads(random_record(B * S))
    for f, o, r in zip(free, replaying_own, replaying_other):
        assert f.abs().sum() > 0 and r.abs().sum() > 0
        # Forcing the router's own choice is the same computation as routing freely, gradients included.
        assert torch.allclose(f, o, atol=1e-6)
        assert not torch.allclose(f, r)


def test_wrong_sizes_raise_naming_both_sizes():
    model = tiny_model().eval()
    x = tokens()
    with pytest.raises(ValueError, match=r"3 MoE layers.*2 MoE layers"):
        with replay_routing(model, random_record(B * S, num_layers=3)):
            pass
    with pytest.raises(ValueError, match=rf"{B * S} tokens.*{B * (S + 1)} tokens"):
        with replay_routing(model, random_record(B * S)):
            model(tokens(seq=S + 1))
    one_expert = RoutingRecord([torch.zeros(B * S, 1, dtype=torch.long)] * 2)
    with pytest.raises(ValueError, match=r"top_k=1.*top_k=2"):
        with replay_routing(model, one_expert):
            pass
    out_of_range = RoutingRecord([torch.full((B * S, K), E), torch.zeros(B * S, K, dtype=torch.long)])
    with pytest.raises(ValueError, match=rf"outside 0\.\.{E - 1}"):
        with replay_routing(model, out_of_range):
            pass
    repeated = RoutingRecord([torch.zeros(B * S, K, dtype=torch.long)] * 2)
    with pytest.raises(ValueError, match="same expert twice"):
        with replay_routing(model, repeated):
            pass
    with pytest.raises(RuntimeError, match="no routing for MoE layers"):
        with capture_routing(model) as empty:
            pass
        with replay_routing(model, empty):
            pass
    # A failed replay leaves no hook behind.
    assert all(layer._routing_hook is None for _, layer in moe_layers(model))
    model(x)


@pytest.mark.parametrize("router", ["expert_choice", "causal_expert_choice"])
def test_routers_without_k_experts_per_token_raise(router):
    model = tiny_model(router=router)
    with pytest.raises(ValueError, match="cannot capture or replay"):
        with capture_routing(model):
            pass
    with pytest.raises(ValueError, match="cannot capture or replay"):
        with replay_routing(model, random_record(B * S)):
            pass


def test_array_interchange():
    model = tiny_model().eval()
    x = tokens()
    with capture_routing(model) as record:
        model(x)
    arr = record.to_array()
    assert arr.shape == (B * S, 2, K)
    assert torch.equal(arr[:, 1], record.experts[1])
    assert_records_equal(RoutingRecord.from_array(arr), record)
    # Per-sample arrays through a JSON dataset column and back, as a padded batch.
    column = [json.dumps(a.tolist()) for a in arr.view(B, S, 2, K)]
    rebuilt = RoutingRecord.from_batch([json.loads(c) for c in column])
    assert_records_equal(rebuilt, record)
    with replay_routing(model, rebuilt):
        model(x)
    # Ragged samples are padded to seq_len; padding and negative markers get experts 0..K-1.
    short = arr.view(B, S, 2, K)[0, : S - 2].clone()
    short[0, 1] = -1
    padded = RoutingRecord.from_batch([short, arr.view(B, S, 2, K)[1]], seq_len=S + 1)
    assert padded.num_tokens == B * (S + 1)
    pad = torch.arange(K)
    got = padded.to_array().view(B, S + 1, 2, K)
    assert torch.equal(got[0, 1 : S - 2], short[1:])
    assert torch.equal(got[0, 0, 1], pad) and torch.equal(got[0, 0, 0], short[0, 0])
    assert (got[0, S - 2 :] == pad).all() and (got[1, S:] == pad).all()
    assert torch.equal(got[1, :S], arr.view(B, S, 2, K)[1])
    # One [B, S, L, K] array works too, and bad input raises naming the sizes.
    assert_records_equal(RoutingRecord.from_batch(arr.view(B, S, 2, K).numpy()), record)
    with pytest.raises(ValueError, match=rf"{S} tokens, more than seq_len={S - 1}"):
        RoutingRecord.from_batch(arr.view(B, S, 2, K), seq_len=S - 1)
    # lengths checks each sample against its token count (all tokens, or all but the last).
    RoutingRecord.from_batch([short, arr.view(B, S, 2, K)[1]], seq_len=S + 1, lengths=[S - 1, S])
    with pytest.raises(ValueError, match=rf"sample 0 has routing for {S - 2} tokens but {S} tokens"):
        RoutingRecord.from_batch([short, arr.view(B, S, 2, K)[1]], lengths=[S, S])
    with pytest.raises(ValueError, match="one L and K"):
        RoutingRecord.from_batch([arr[:S], arr[:S, :1]])
    with pytest.raises(ValueError, match="integer"):
        RoutingRecord.from_array(arr.float())
    with pytest.raises(ValueError, match=r"\[num_tokens, num_layers >= 1, top_k\]"):
        RoutingRecord.from_array(arr[0])


def _set_ac(model):
    training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    return model


@pytest.mark.parametrize("backward_inside", [True, False])
def test_replay_with_activation_checkpointing(backward_inside):
    x = tokens()
    forced = random_record(B * S)
    ref = tiny_model().train()
    ac = _set_ac(copy.deepcopy(ref))
    assert any("checkpoint" in type(m).__name__.lower() for m in ac.modules())
    with replay_routing(ref, forced):
        ref(x).pow(2).mean().backward()
    with replay_routing(ac, forced):
        loss = ac(x).pow(2).mean()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        # The recompute in backward still replays the routing of the forward.
        loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ac.named_parameters():
        r = ref_grads[name.replace("._checkpoint_wrapped_module", "")]
        assert torch.allclose(p.grad, r.grad, atol=1e-6), name
    # The next forward routes freely again and drops the hooks.
    with capture_routing(ac) as free:
        ac(x)
    assert any(not torch.equal(a, b) for a, b in zip(free.experts, forced.experts))
    assert all(layer._routing_hook is None for _, layer in moe_layers(ac))


def test_capture_with_activation_checkpointing_ignores_the_recompute():
    x = tokens()
    model = _set_ac(tiny_model()).train()
    with capture_routing(model) as record:
        loss = model(x).pow(2).mean()
        first = [e.clone() for e in record.experts]
        # Change the routers before backward: the recompute routes differently, and must not be recorded.
        with torch.no_grad():
            for _, layer in moe_layers(model):
                layer.router.gate.weight.mul_(-1)
        loss.backward()
    for a, b in zip(record.experts, first):
        assert torch.equal(a, b)


def _fsdp_worker(rank: int, world_size: int, init_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = _set_ac(tiny_model()).train()
        training.shard_model(
            model, [lambda name, m: isinstance(m, TransformerSelfAttentionLayer)], cpu_offload=False, reshard_after_forward=True
        )
        x = tokens(seed=10 + rank)
        with torch.no_grad(), capture_routing(model) as record:
            out = model(x)
        forced = random_record(B * S, seed=20 + rank)
        with replay_routing(model, forced):
            with capture_routing(model) as inside:
                loss = model(x).pow(2).mean()
            loss.backward()
        assert_records_equal(inside, forced)
        for _, layer in moe_layers(model):
            grad = layer.router.gate.weight.grad
            assert grad is not None and grad.full_tensor().abs().sum() > 0
        with torch.no_grad(), replay_routing(model, record):
            assert torch.equal(model(x), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_capture_and_replay_under_fsdp2_two_processes(tmp_path):
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


def test_record_captured_under_inference_mode_replays_with_grad():
    model = tiny_model().train()
    x = tokens()
    with torch.inference_mode(), capture_routing(model) as record:
        model(x)
    with replay_routing(model, record):
        model(x).pow(2).mean().backward()
    assert all(layer.router.gate.weight.grad is not None for _, layer in moe_layers(model))
