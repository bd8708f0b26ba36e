"""Every router option, checked against the formula it documents."""

import math

import pytest
import torch

from torchtune_moe.modules import (
    ExpertChoiceTopKRouter,
    CausalExpertChoiceRouter,
    Router,
    RouterOutput,
    TokenChoiceTopKRouter,
)

D, E, T = 8, 8, 32


def tokens(n=T, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def logits_of(router, x_TD):
    return x_TD @ router.gate.weight.t()


# --- token choice --------------------------------------------------------------------------------------


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("route_scale", [1.0, 2.5])
def test_token_choice_weights(score_func, norm_topk_prob, route_scale):
    torch.manual_seed(0)
    K = 3
    router = TokenChoiceTopKRouter(D, E, K, score_func=score_func, norm_topk_prob=norm_topk_prob, route_scale=route_scale)
    x = tokens()
    out = router(x)
    logits = logits_of(router, x)
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    top, experts = scores.topk(K, dim=-1)
    w = top / top.sum(-1, keepdim=True) if norm_topk_prob else top
    w = w * route_scale
    assert out.experts_TK.tolist() == experts.tolist()
    torch.testing.assert_close(out.weights_A.view(T, K), w)
    torch.testing.assert_close(out.logits_TE, logits)
    torch.testing.assert_close(out.probs_TE, scores / scores.sum(-1, keepdim=True))
    assert out.weights_A.dtype == torch.float32 and not out.may_drop
    assert out.token_ids_A.tolist() == [t for t in range(T) for _ in range(K)]
    assert out.expert_ids_A.tolist() == experts.reshape(-1).tolist()


def test_token_choice_norm_with_one_expert_gives_weight_one():
    """As Hugging Face (Qwen-MoE, DeepSeek-V3): norm_topk_prob renormalises also for K = 1."""
    router = TokenChoiceTopKRouter(D, E, 1, norm_topk_prob=True)
    torch.testing.assert_close(router(tokens()).weights_A, torch.ones(T))
    router = TokenChoiceTopKRouter(D, E, 1, norm_topk_prob=False)
    assert router(tokens()).weights_A.max() < 1


def test_token_choice_scores_in_fp32_for_bf16_input():
    router = TokenChoiceTopKRouter(D, E, 2).to(torch.bfloat16)
    out = router(tokens().bfloat16())
    assert out.logits_TE.dtype == out.probs_TE.dtype == out.weights_A.dtype == torch.float32


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_group_limited_routing_picks_only_from_best_groups(score_func):
    torch.manual_seed(0)
    G, L, K = 4, 2, 3
    router = TokenChoiceTopKRouter(D, E, K, score_func=score_func, num_expert_groups=G, num_limited_groups=L)
    x = tokens(256)
    experts_TK = router(x).experts_TK
    logits = logits_of(router, x)
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    group_scores = scores.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1)  # top-2 sum per group
    best = group_scores.topk(L, dim=-1).indices
    allowed = torch.zeros(x.shape[0], E, dtype=torch.bool)
    for g in range(L):
        for j in range(E // G):
            allowed.scatter_(1, (best[:, g] * (E // G) + j).unsqueeze(1), True)
    assert allowed.gather(1, experts_TK).all()
    # ... and they are the top-K inside the allowed experts.
    expected = scores.masked_fill(~allowed, -1.0).topk(K, dim=-1).indices
    assert experts_TK.sort(-1).values.tolist() == expected.sort(-1).values.tolist()
    # The restriction matters: plain top-K would leave the best groups for some tokens.
    plain = scores.topk(K, dim=-1).indices
    assert not allowed.gather(1, plain).all()


def test_group_limited_routing_with_all_groups_is_plain_topk():
    torch.manual_seed(0)
    a = TokenChoiceTopKRouter(D, E, 2, num_expert_groups=4, num_limited_groups=4)
    b = TokenChoiceTopKRouter(D, E, 2)
    b.load_state_dict(a.state_dict())
    assert a(tokens()).experts_TK.tolist() == b(tokens()).experts_TK.tolist()


def test_expert_bias_changes_selection_not_weights():
    torch.manual_seed(0)
    router = TokenChoiceTopKRouter(D, E, 2, norm_topk_prob=False, expert_bias_update_rate=0.01)
    x = tokens()
    router.expert_bias[5] = 10.0  # expert 5 wins every selection
    out = router(x)
    assert (out.experts_TK == 5).any(-1).all()
    scores = logits_of(router, x).softmax(-1)
    torch.testing.assert_close(out.weights_A.view(T, 2), scores.gather(1, out.experts_TK))
    assert out.weights_A.max() < 1  # the bias (10) is not in the weights


def test_expert_bias_update_moves_toward_balance():
    torch.manual_seed(0)
    rate = 0.01
    router = TokenChoiceTopKRouter(D, E, 2, expert_bias_update_rate=rate).train()
    with torch.no_grad():
        router.gate.weight[0] += 0.5  # expert 0 favoured by every (positive) token
    g = torch.Generator().manual_seed(0)
    batch = lambda: torch.randn(256, D, generator=g).abs()
    load0 = torch.bincount(router(batch()).expert_ids_A, minlength=E).float()
    assert load0[0] == 256  # every token picks expert 0
    router.update()
    torch.testing.assert_close(router.expert_bias, rate * torch.sign(load0.mean() - load0))
    assert router._load_accum.abs().sum() == 0  # accumulator reset
    imbalance = []
    for _ in range(50):
        load = torch.bincount(router(batch()).expert_ids_A, minlength=E).float()
        router.update()
        imbalance.append((load.max() / load.mean()).item())
    assert sum(imbalance[-10:]) / 10 < 0.75 * (load0.max() / load0.mean()).item()
    assert router.expert_bias[0] < 0 < router.expert_bias[1:].max()


def test_expert_bias_not_accumulated_in_eval_or_without_update_rate():
    router = TokenChoiceTopKRouter(D, E, 2, expert_bias_update_rate=0.1).eval()
    router(tokens())
    router.update()
    assert router.expert_bias.abs().sum() == 0
    plain = TokenChoiceTopKRouter(D, E, 2)
    assert plain.expert_bias is None and "expert_bias" not in plain.state_dict()
    plain.update()  # no-op


def test_expert_bias_update_sums_micro_batches():
    router = TokenChoiceTopKRouter(D, E, 2, expert_bias_update_rate=0.1).train()
    for s in range(3):
        router(tokens(seed=s))
    assert router._load_accum.sum() == 3 * T * 2


def test_forced_experts_replay_keeps_router_gradient():
    router = TokenChoiceTopKRouter(D, E, 2)
    forced = torch.tensor([[1, 3]] * T)
    out = router(tokens(), forced_experts_TK=forced)
    assert out.experts_TK.tolist() == forced.tolist()
    out.weights_A.sum().backward()
    assert router.gate.weight.grad.abs().sum() > 0


# --- expert choice -------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity_factor,K", [(1.0, 2), (1.5, 2), (0.3, 1), (100.0, 2)])
def test_expert_choice_capacity_and_selection(capacity_factor, K):
    torch.manual_seed(0)
    router = ExpertChoiceTopKRouter(D, E, K, capacity_factor=capacity_factor)
    C = max(1, min(T, math.ceil(capacity_factor * T * K / E)))
    assert router.capacity(T) == C
    x = tokens()
    out = router(x)
    assert out.expert_ids_A.numel() == E * C
    assert torch.bincount(out.expert_ids_A, minlength=E).tolist() == [C] * E
    scores = logits_of(router, x).softmax(-1)
    for e in range(E):
        mine = out.token_ids_A[out.expert_ids_A == e]
        assert sorted(mine.tolist()) == sorted(scores[:, e].topk(C).indices.tolist())
        torch.testing.assert_close(out.weights_A[out.expert_ids_A == e], scores[mine, e])
    assert out.experts_TK is None and not out.may_drop


def test_expert_choice_cannot_replay():
    with pytest.raises(ValueError, match="forced_experts_TK"):
        ExpertChoiceTopKRouter(D, E, 2)(tokens(), forced_experts_TK=torch.zeros(T, 2, dtype=torch.long))


def test_causal_expert_choice_names():
    """One class under its name; the earlier name stays importable as the same class."""
    from torchtune_moe.models import moe_layer
    from torchtune_moe.modules import ExpertThresholdRouter

    assert ExpertThresholdRouter is CausalExpertChoiceRouter
    layer = moe_layer(dim=D, hidden_dim=8, num_experts=E, experts_per_token=2, router="causal_expert_choice")
    assert type(layer.router) is CausalExpertChoiceRouter


# --- causal expert choice (Expert Threshold routing) -----------------------------------------------------------


def kept(out: RouterOutput, n_tokens: int, K_max: int) -> torch.Tensor:
    """[T, K_max] experts of each slot, E where dropped."""
    return out.expert_ids_A.view(n_tokens, K_max)


def test_threshold_warm_start_is_token_choice_topk():
    torch.manual_seed(0)
    router = CausalExpertChoiceRouter(D, E, 2, max_experts_per_token=4)
    tc = TokenChoiceTopKRouter(D, E, 2, norm_topk_prob=False)
    tc.gate.load_state_dict(router.gate.state_dict())
    x = tokens()
    for mode in (True, False):
        router.train(mode)
        out, ref = router(x), tc(x)
        slots = kept(out, T, 4)
        assert (slots[:, 2:] == E).all()  # slots past K are dropped
        assert slots[:, :2].tolist() == ref.experts_TK.tolist()
        torch.testing.assert_close(out.weights_A.view(T, 4)[:, :2], ref.weights_A.view(T, 2))
        assert out.weights_A.view(T, 4)[:, 2:].abs().max() == 0


def test_threshold_update_sets_then_averages_capacity_thresholds():
    torch.manual_seed(0)
    decay = 0.9
    router = CausalExpertChoiceRouter(D, E, 2, capacity_factor=1.0, threshold_ema_decay=decay).train()
    C = router.capacity(T)
    batch_thr = []
    for s in range(3):  # three micro-batches, then one update
        x = tokens(seed=s)
        router(x)
        batch_thr.append(logits_of(router, x).softmax(-1).topk(C, dim=0).values[C - 1])
    assert router.num_updates == 0 and router.thresholds.abs().sum() == 0  # forwards never move thresholds
    router.update()
    first = torch.stack(batch_thr).mean(0)
    torch.testing.assert_close(router.thresholds, first)  # the first update sets tau directly
    assert router.num_updates == 1
    x = tokens(seed=7)
    router(x)
    router.update()
    new = logits_of(router, x).softmax(-1).topk(C, dim=0).values[C - 1]
    torch.testing.assert_close(router.thresholds, decay * first + (1 - decay) * new)
    assert router.num_updates == 2
    before = router.thresholds.clone()
    router.update()  # nothing seen since: nothing changes
    assert router.num_updates == 2 and torch.equal(router.thresholds, before)
    router.eval()
    router(x)
    router.update()  # eval forwards are not accumulated
    assert router.num_updates == 2 and torch.equal(router.thresholds, before)


def test_threshold_routing_after_update():
    """With thresholds set from a batch (decay 0), routing is score >= tau, and on that batch each expert gets
    exactly its expert-choice capacity when the per-token cap does not bind."""
    torch.manual_seed(0)
    router = CausalExpertChoiceRouter(D, E, 2, max_experts_per_token=E, threshold_ema_decay=0.0).train()
    x = tokens(64)
    router(x)
    router.update()
    out = router(x)
    scores = logits_of(router, x).softmax(-1)
    passes = scores >= router.thresholds
    slots = kept(out, 64, E)
    routed = torch.zeros(64, E + 1, dtype=torch.bool).scatter_(1, slots, True)[:, :E]
    assert routed.tolist() == passes.tolist()
    assert torch.bincount(slots.reshape(-1), minlength=E + 1)[:E].tolist() == [router.capacity(64)] * E
    w = out.weights_A.view(64, E)
    valid = slots < E
    torch.testing.assert_close(w[valid], scores.gather(1, slots.clamp(max=E - 1))[valid])
    assert w[~valid].abs().max() == 0
    # Tokens get a variable number of experts (dynamic computation), possibly none.
    assert len(set(routed.sum(-1).tolist())) > 1


def test_threshold_max_experts_per_token_caps_to_best():
    torch.manual_seed(0)
    router = CausalExpertChoiceRouter(D, E, 2, max_experts_per_token=3)
    router.thresholds.fill_(-1.0)  # every expert passes
    router.num_updates.fill_(1)
    x = tokens()
    slots = kept(router(x), T, 3)
    assert (slots < E).all()
    assert slots.tolist() == logits_of(router, x).softmax(-1).topk(3, dim=-1).indices.tolist()
    assert CausalExpertChoiceRouter(D, E, 3).max_experts_per_token == 6  # default min(E, 2K)


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("training_mode", [True, False])
def test_threshold_routing_of_a_token_ignores_the_batch(trained, training_mode):
    torch.manual_seed(0)
    router = CausalExpertChoiceRouter(D, E, 2).train()
    if trained:
        router(tokens(seed=3))
        router.update()
    router.train(training_mode)
    x = tokens()
    full = kept(router(x), T, router.max_experts_per_token)
    alone = kept(router(x[:5]), 5, router.max_experts_per_token)
    assert full[:5].tolist() == alone.tolist()


def test_threshold_router_checkpoint_state():
    router = CausalExpertChoiceRouter(D, E, 2)
    assert set(router.state_dict()) == {"gate.weight", "thresholds", "num_updates"}


# --- bad options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,kwargs,name",
    [
        (TokenChoiceTopKRouter, {"num_experts": 0}, "num_experts"),
        (TokenChoiceTopKRouter, {"experts_per_token": 9}, "experts_per_token"),
        (TokenChoiceTopKRouter, {"experts_per_token": 0}, "experts_per_token"),
        (TokenChoiceTopKRouter, {"score_func": "relu"}, "score_func"),
        (TokenChoiceTopKRouter, {"route_scale": 0.0}, "route_scale"),
        (TokenChoiceTopKRouter, {"expert_bias_update_rate": -1.0}, "expert_bias_update_rate"),
        (TokenChoiceTopKRouter, {"num_expert_groups": 3, "num_limited_groups": 1}, "num_expert_groups"),
        (TokenChoiceTopKRouter, {"num_expert_groups": 4}, "num_limited_groups"),
        (TokenChoiceTopKRouter, {"num_expert_groups": 4, "num_limited_groups": 5}, "num_limited_groups"),
        (TokenChoiceTopKRouter, {"num_expert_groups": 4, "num_limited_groups": 1, "experts_per_token": 3}, "num_limited_groups"),
        (ExpertChoiceTopKRouter, {"capacity_factor": 0.0}, "capacity_factor"),
        (ExpertChoiceTopKRouter, {"capacity_factor": -1.0}, "capacity_factor"),
        (CausalExpertChoiceRouter, {"capacity_factor": 0.0}, "capacity_factor"),
        (CausalExpertChoiceRouter, {"max_experts_per_token": 1}, "max_experts_per_token"),
        (CausalExpertChoiceRouter, {"max_experts_per_token": 9}, "max_experts_per_token"),
        (CausalExpertChoiceRouter, {"threshold_ema_decay": 1.0}, "threshold_ema_decay"),
        (CausalExpertChoiceRouter, {"threshold_ema_decay": -0.1}, "threshold_ema_decay"),
    ],
)
def test_bad_router_options(cls, kwargs, name):
    args = {"dim": D, "num_experts": E, "experts_per_token": 2}
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(ValueError, match=name):
        cls(args["dim"], args["num_experts"], args["experts_per_token"], **kwargs)


def test_routers_share_the_base_class():
    for cls in (TokenChoiceTopKRouter, ExpertChoiceTopKRouter, CausalExpertChoiceRouter):
        assert issubclass(cls, Router)


@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_router_logits_match_the_fp32_path(compiled):
    """router_logits on bf16 tokens/weights (the tensor-core Function on CUDA, upcast products on CPU) gives
    the fp32 path's logits and, through its hi/lo split of the logit gradient, its gradients — also under
    torch.compile. (Dropping the split, lo = 0, fails the eager case: ~1.4x the error. The compiled case on
    CUDA, where Inductor once folded the split away, is checked by tests/modules/test_kernels_gpu.py.)"""
    from torchtune_moe.modules.routers import router_logits

    torch.manual_seed(0)
    x = torch.randn(512, 256).to(torch.bfloat16)
    w = (torch.randn(32, 256) * 0.05).to(torch.bfloat16)
    g = torch.randn(512, 32)

    def grads(fn, x, w):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(x, w)
        out.backward(g)
        return out.detach(), x.grad.float(), w.grad.float()

    fp32_path = lambda x, w: torch.nn.functional.linear(x.float(), w.float())  # noqa: E731
    fn = torch.compile(router_logits, fullgraph=True, backend="inductor") if compiled else router_logits
    out, gx, gw = grads(fn, x, w)
    ref_out, ref_gx, ref_gw = grads(fp32_path, x, w)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-4)
    exact_gx = (g.double() @ w.double()).float()
    exact_gw = (g.double().t() @ x.double()).float()
    for got, ref, exact in ((gx, ref_gx, exact_gx), (gw, ref_gw, exact_gw)):
        err = (got - exact).norm() / exact.norm()
        ref_err = (ref - exact).norm() / exact.norm()
        assert err <= 1.05 * ref_err, (err, ref_err)
