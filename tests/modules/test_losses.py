"""Auxiliary losses on hand-computed cases, and how the MoE layer and collect_aux_loss use them."""

import math

import pytest
import torch

from torchtune_moe.models import moe, moe_layer
from torchtune_moe.modules import (
    collect_aux_loss,
    load_balancing_loss,
    moe_layers,
    router_z_loss,
    sequence_balance_loss,
)

# --- the functions -------------------------------------------------------------------------------------


def test_load_balancing_uniform_is_one():
    E = 8
    probs = torch.full((10, E), 1 / E)
    assert load_balancing_loss(probs, torch.tensor([3, 0, 9, 1, 0, 2, 5, 0])).item() == pytest.approx(1.0, abs=1e-6)
    # Uniform load with any probabilities: E * sum_i (1/E) P_i = sum_i P_i = 1.
    probs = torch.randn(10, E).softmax(-1)
    assert load_balancing_loss(probs, torch.full((E,), 5)).item() == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_by_hand():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    # f = [1, 0], P = [0.7, 0.3]: 2 * 0.7
    assert load_balancing_loss(probs, torch.tensor([2, 0])).item() == pytest.approx(1.4)
    # f = [0.25, 0.75]: 2 * (0.25 * 0.7 + 0.75 * 0.3)
    assert load_balancing_loss(probs, torch.tensor([1, 3])).item() == pytest.approx(0.8)
    # Collapsed routing with confident probs is the worst case: E.
    assert load_balancing_loss(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([1, 0, 0])).item() == pytest.approx(3.0)


def test_load_balancing_gradient_only_through_probs():
    logits = torch.randn(6, 4, requires_grad=True)
    counts = torch.tensor([4.0, 1.0, 1.0, 0.0], requires_grad=True)
    load_balancing_loss(logits.softmax(-1), counts).backward()
    assert logits.grad.abs().sum() > 0 and counts.grad is None


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = [math.log(2.0), math.log(math.e + math.e**2)]
    expected = (lse[0] ** 2 + lse[1] ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    assert router_z_loss(torch.tensor([[0.0, 0.0, 0.0, 0.0]])).item() == pytest.approx(math.log(4.0) ** 2, rel=1e-6)


def test_sequence_balance_by_hand():
    # B=2 sequences of S=2 tokens, E=2, K=1. Dropped slots (expert id E) are ignored.
    probs = torch.tensor([[[0.9, 0.1], [0.7, 0.3]], [[0.5, 0.5], [0.5, 0.5]]])
    token_ids = torch.tensor([0, 1, 2, 3, 3])
    expert_ids = torch.tensor([0, 0, 0, 1, 2])
    # seq 0: n = [2, 0] -> f = [2, 0], P = [0.8, 0.2] -> 1.6 ; seq 1: f = [1, 1], P = [0.5, 0.5] -> 1.0
    assert sequence_balance_loss(probs, token_ids, expert_ids).item() == pytest.approx((1.6 + 1.0) / 2)


def test_sequence_balance_uniform_is_one():
    B, S, E, K = 3, 5, 4, 2
    probs = torch.full((B, S, E), 1 / E)
    token_ids = torch.arange(B * S).repeat_interleave(K)
    expert_ids = torch.randint(0, E, (B * S * K,))
    assert sequence_balance_loss(probs, token_ids, expert_ids).item() == pytest.approx(1.0, abs=1e-6)


def test_sequence_balance_differs_from_batch_balance():
    """Each sequence on its own expert: balanced over the batch (1.0), maximally unbalanced per sequence (E)."""
    E = 2
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    token_ids, expert_ids = torch.tensor([0, 1]), torch.tensor([0, 1])
    assert load_balancing_loss(probs.view(2, E), torch.tensor([1, 1])).item() == pytest.approx(1.0)
    assert sequence_balance_loss(probs, token_ids, expert_ids).item() == pytest.approx(2.0)


# --- in the MoE layer ----------------------------------------------------------------------------------


def small_layer(**kwargs):
    args = dict(dim=16, moe_hidden_dim=16, num_experts=4, experts_per_token=2)
    args.update(kwargs)
    return moe_layer(**args)


@pytest.mark.parametrize("router", ["token_choice", "expert_choice", "causal_expert_choice"])
def test_uniform_router_gives_exactly_one(router):
    """A zero gate makes every router probability 1/E: load balancing and sequence balance are exactly 1
    (whatever the counts, as long as each sequence has some routed token: with all scores tied, expert choice
    needs the capacity of all tokens for that)."""
    options = {"capacity_factor": 2.0} if router == "expert_choice" else {}
    layer = small_layer(router=router, aux_loss_coeff=1.0, seq_aux_loss_coeff=1.0, z_loss_coeff=1.0, **options)
    layer.train()
    torch.nn.init.zeros_(layer.router.gate.weight)
    layer(torch.randn(3, 5, 16))
    assert layer.aux_losses["load_balancing"].item() == pytest.approx(1.0, abs=1e-6)
    assert layer.aux_losses["seq_balance"].item() == pytest.approx(1.0, abs=1e-6)
    assert layer.aux_losses["z_loss"].item() == pytest.approx(math.log(4.0) ** 2, rel=1e-6)


def test_layer_aux_losses_match_the_functions():
    torch.manual_seed(0)
    layer = small_layer(aux_loss_coeff=0.1, z_loss_coeff=0.01, seq_aux_loss_coeff=0.5).train()
    layer(torch.randn(2, 6, 16))
    r = layer.last_routing
    lb = load_balancing_loss(r.probs_TE, layer.tokens_per_expert)
    z = router_z_loss(r.logits_TE)
    seq = sequence_balance_loss(r.probs_TE.view(2, 6, -1), r.token_ids_A, r.expert_ids_A)
    torch.testing.assert_close(layer.aux_losses["load_balancing"], lb)
    torch.testing.assert_close(layer.aux_losses["z_loss"], z)
    torch.testing.assert_close(layer.aux_losses["seq_balance"], seq)
    torch.testing.assert_close(layer.aux_loss, 0.1 * lb + 0.01 * z + 0.5 * seq)


def test_zero_coefficient_turns_a_loss_off():
    layer = small_layer(aux_loss_coeff=0.1).train()
    layer(torch.randn(2, 6, 16))
    assert set(layer.aux_losses) == {"load_balancing"}
    layer = small_layer().train()
    layer(torch.randn(2, 6, 16))
    assert layer.aux_losses == {} and layer.aux_loss is None


def tiny_model(**kwargs):
    args = dict(
        vocab_size=32, num_layers=3, num_heads=2, num_kv_heads=1, embed_dim=16, max_seq_len=16,
        num_experts=4, experts_per_token=2, moe_hidden_dim=16, moe_layers=[0, 2], dense_hidden_dim=16,
        aux_loss_coeff=0.1, z_loss_coeff=0.01, seq_aux_loss_coeff=0.3,
    )
    args.update(kwargs)
    return moe(**args)


def test_collect_aux_loss_is_the_weighted_sum_over_layers():
    torch.manual_seed(0)
    model = tiny_model().train()
    model(torch.randint(0, 32, (2, 8)))
    layers = [layer for _, layer in moe_layers(model)]
    assert len(layers) == 2
    expected = sum(
        0.1 * l.aux_losses["load_balancing"] + 0.01 * l.aux_losses["z_loss"] + 0.3 * l.aux_losses["seq_balance"]
        for l in layers
    )
    total = collect_aux_loss(model)
    assert total.dim() == 0
    torch.testing.assert_close(total, expected)


def test_collect_aux_loss_backpropagates_into_every_router():
    torch.manual_seed(0)
    model = tiny_model().train()
    model(torch.randint(0, 32, (2, 8)))
    collect_aux_loss(model).backward()
    layers = [layer for _, layer in moe_layers(model)]
    for layer in layers:
        g = layer.router.gate.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # The last MoE layer's aux losses depend on its router, not on its own experts.
    assert layers[-1].experts.gate_up_proj.grad is None


def test_collect_aux_loss_is_zero_in_eval_and_without_grad():
    model = tiny_model()
    x = torch.randint(0, 32, (2, 8))
    model.eval()
    model(x)
    assert collect_aux_loss(model).item() == 0.0
    model.train()
    with torch.no_grad():
        model(x)
    assert collect_aux_loss(model).item() == 0.0
    model(x)
    assert collect_aux_loss(model).item() > 0.0


def test_collect_aux_loss_without_moe_layers():
    assert collect_aux_loss(torch.nn.Linear(2, 2)).item() == 0.0


def test_pooled_load_balancing_equals_transformers_load_balancing_loss_func():
    """``aux_loss_pooled=True``: collect_aux_loss is transformers' pooled loss (its value is K at uniform routing,
    ours 1 per layer), times the summed coefficients: ``coeff * L / K * load_balancing_loss_func(...)``."""
    transformers_moe = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    from torchtune_moe.models import moe
    from torchtune_moe.modules import collect_aux_loss, moe_layers

    torch.manual_seed(0)
    E, K, L, coeff = 8, 2, 3, 0.05
    model = moe(vocab_size=64, num_layers=L, num_heads=2, num_kv_heads=2, embed_dim=32, max_seq_len=16,
                num_experts=E, experts_per_token=K, moe_hidden_dim=16, aux_loss_coeff=coeff, aux_loss_pooled=True)
    with torch.no_grad():
        for _, layer in moe_layers(model):
            layer.router.gate.weight.mul_(20.0)  # sharp routers: imbalanced, differently per layer
    model.train()(torch.randint(0, 64, (2, 12)))
    logits = tuple(layer.last_routing.logits_TE for _, layer in moe_layers(model))
    expected = coeff * L / K * transformers_moe.load_balancing_loss_func(logits, E, K)
    pooled = collect_aux_loss(model)
    torch.testing.assert_close(pooled, expected.float())
    per_layer = sum(coeff * layer.aux_losses["load_balancing"] for _, layer in moe_layers(model))
    assert abs(per_layer.item() / pooled.item() - 1) > 0.01  # a different loss, not a rounding difference
    pooled.backward()
    assert all(layer.router.gate.weight.grad.abs().sum() > 0 for _, layer in moe_layers(model))
