"""moe() / moe_layer(): the causal test, options, and bad input."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchtune.models.qwen2 import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import FeedForward, TiedLinear, TransformerDecoder

from torchtune_moe.models import moe, moe_layer
from torchtune_moe.modules import (
    MoE,
    ExpertChoiceTopKRouter,
    CausalExpertChoiceRouter,
    TokenChoiceTopKRouter,
    collect_aux_loss,
    moe_layers,
    update_routers,
)
from torchtune_moe.modules.attention_utils import NormedProjection

V = 32
SMALL = dict(
    vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=32,
    num_experts=4, experts_per_token=2, moe_hidden_dim=16,
)


def small(**kwargs) -> TransformerDecoder:
    args = dict(SMALL)
    args.update(kwargs)
    return moe(**args)


def test_notebook_example_forward_backward():
    from torchtune_moe.models import moe as moe_from_models

    torch.manual_seed(0)
    model = moe_from_models(**SMALL, aux_loss_coeff=0.01, z_loss_coeff=0.001)
    assert isinstance(model, TransformerDecoder)
    tokens = torch.randint(0, V, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, V)
    loss = F.cross_entropy(logits.view(-1, V), tokens.view(-1)) + collect_aux_loss(model)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# --- the causal test -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _trained(router: str) -> TransformerDecoder:
    """A small model after a few optimizer steps (weights off their init), update_routers after each."""
    torch.manual_seed(0)
    model = small(router=router, aux_loss_coeff=0.01).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(4):
        tokens = torch.randint(0, V, (4, 16))
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1)) + collect_aux_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        update_routers(model)
    return model


def model_for(router: str, state: str) -> TransformerDecoder:
    if state == "trained":
        return copy.deepcopy(_trained(router))
    torch.manual_seed(0)
    return small(router=router)


def perturbed_batches(t: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, 16), generator=g)
    future = x.clone()  # every token after position t replaced by a different one
    future[:, t + 1 :] = (x[:, t + 1 :] + torch.randint(1, V, x[:, t + 1 :].shape, generator=g)) % V
    others = x.clone()  # sequences 1 and 2 replaced
    others[1:] = torch.randint(0, V, (2, 16), generator=g)
    return x, future, others


def forward(model, x, mode):
    model.train(mode == "train")
    return model(x).detach()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("state", ["init", "trained"])
def test_causal_expert_choice_is_causal(mode, state):
    """The output at position <= t depends on nothing after t, nor on other sequences of the batch."""
    model = model_for("causal_expert_choice", state)
    routers = [layer.router for _, layer in moe_layers(model)]
    assert len(routers) == 2 and all(isinstance(r, CausalExpertChoiceRouter) for r in routers)
    if state == "trained":  # thresholds in use, not the warm start
        assert all(r.num_updates == 4 and (r.thresholds > 0).all() for r in routers)
    t = 6
    x, future, others = perturbed_batches(t)
    out = forward(model, x, mode)
    out_future = forward(model, future, mode)
    out_others = forward(model, others, mode)
    torch.testing.assert_close(out_future[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out_others[0], out[0], rtol=0, atol=1e-6)
    assert (out_future[:, t + 1 :] - out[:, t + 1 :]).abs().max() > 1e-2  # the change did reach the model
    if state == "trained":
        # Threshold routing gives tokens a varying number of experts (the warm start gives each exactly K).
        layer = next(layer for _, layer in moe_layers(model))
        r = layer.last_routing
        per_token = torch.zeros(3 * 16).index_add_(0, r.token_ids_A, (r.expert_ids_A < 4).float())
        assert len(set(per_token.tolist())) > 1


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("state", ["init", "trained"])
def test_expert_choice_leaks_the_future(mode, state):
    """The same test on expert choice: outputs at positions <= t change with later tokens and other sequences."""
    model = model_for("expert_choice", state)
    assert isinstance(model.layers[0].mlp.router, ExpertChoiceTopKRouter)
    t = 6
    x, future, others = perturbed_batches(t)
    out = forward(model, x, mode)
    assert (forward(model, future, mode)[:, : t + 1] - out[:, : t + 1]).abs().max() > 1e-3
    assert (forward(model, others, mode)[0] - out[0]).abs().max() > 1e-3


def _decode_step_by_step(model, x):
    B, S = x.shape
    model.eval()
    model.setup_caches(batch_size=B, dtype=torch.float32, decoder_max_seq_len=S)
    causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
    steps = []
    with torch.no_grad():
        for i in range(S):
            mask = causal[i : i + 1].expand(B, 1, S)
            pos = torch.full((B, 1), i)
            steps.append(model(x[:, i : i + 1], mask=mask, input_pos=pos))
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("router,same", [("causal_expert_choice", True), ("expert_choice", False)])
def test_generation_routes_like_training(router, same):
    """Token-by-token decoding with a KV cache gives the full-sequence logits for the causal router; expert
    choice cannot (its capacity and ranking depend on the tokens present)."""
    model = model_for(router, "trained")
    x, _, _ = perturbed_batches(6)
    model.eval()
    with torch.no_grad():
        full = model(x)
    steps = _decode_step_by_step(model, x)
    if same:
        torch.testing.assert_close(steps, full, rtol=0, atol=1e-5)
    else:
        assert (steps - full).abs().max() > 1e-3


# --- options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "moe_layers_arg,expected", [("all", [0, 1, 2, 3]), (2, [1, 3]), (1, [0, 1, 2, 3]), ([0, 2], [0, 2]), ((3,), [3])]
)
def test_moe_layers_option(moe_layers_arg, expected):
    model = small(num_layers=4, moe_layers=moe_layers_arg, dense_hidden_dim=24)
    for i, layer in enumerate(model.layers):
        if i in expected:
            assert isinstance(layer.mlp, MoE)
        else:
            assert isinstance(layer.mlp, FeedForward) and layer.mlp.w1.out_features == 24
    assert [n for n, _ in moe_layers(model)] == [f"layers.{i}.mlp" for i in expected]
    model(torch.randint(0, V, (1, 8))).sum().backward()


def test_each_layer_has_its_own_router_and_experts():
    model = small(num_layers=3)
    routers = [layer.mlp.router for layer in model.layers]
    assert len({id(r) for r in routers}) == 3
    assert len({id(layer.mlp.experts) for layer in model.layers}) == 3


def test_tied_and_untied_output():
    tied = small(tie_word_embeddings=True)
    untied = small()
    assert isinstance(tied.output, TiedLinear) and tied.output.tied_module is tied.tok_embeddings
    assert isinstance(untied.output, nn.Linear)
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(untied) - n(tied) == V * SMALL["embed_dim"]
    assert tied(torch.randint(0, V, (1, 4))).shape == (1, 4, V)


def test_attention_options():
    model = small(qk_norm="head", attn_bias=True, head_dim=16)
    attn = model.layers[0].attn
    assert isinstance(attn.q_proj, NormedProjection) and attn.q_proj.head_dim == 16
    assert attn.q_proj.proj.bias is not None and attn.q_proj.proj.out_features == 4 * 16
    assert isinstance(attn.v_proj, nn.Linear)  # no norm on values
    assert isinstance(attn.pos_embeddings, Qwen2RotaryPositionalEmbeddings)
    full = small(qk_norm="full", clip_qkv=8.0)
    attn = full.layers[0].attn
    assert attn.k_proj.head_dim is None and attn.k_proj.norm.scale.shape == (2 * 8,)
    assert isinstance(attn.v_proj, NormedProjection) and attn.v_proj.norm is None and attn.v_proj.clip == 8.0
    for m in (model, full):
        assert m(torch.randint(0, V, (2, 8))).shape == (2, 8, V)


def test_router_options_reach_the_router():
    tc = small(score_func="sigmoid", norm_topk_prob=False, route_scale=2.5, num_expert_groups=2,
               num_limited_groups=1, expert_bias_update_rate=0.001, shared_expert_hidden_dim=8,
               shared_expert_gate=True).layers[0].mlp
    r = tc.router
    assert isinstance(r, TokenChoiceTopKRouter)
    assert (r.score_func, r.norm_topk_prob, r.route_scale, r.num_expert_groups, r.num_limited_groups) == (
        "sigmoid", False, 2.5, 2, 1)
    assert r.expert_bias_update_rate == 0.001 and tc.shared_expert is not None and tc.shared_expert_gate is not None
    et = small(router="causal_expert_choice", capacity_factor=1.5, max_experts_per_token=3,
               threshold_ema_decay=0.9).layers[1].mlp.router
    assert isinstance(et, CausalExpertChoiceRouter)
    assert (et.capacity_factor, et.max_experts_per_token, et.threshold_ema_decay) == (1.5, 3, 0.9)
    ec = small(router="expert_choice", capacity_factor=2.0, score_func="sigmoid").layers[0].mlp.router
    assert isinstance(ec, ExpertChoiceTopKRouter) and ec.capacity_factor == 2.0 and ec.score_func == "sigmoid"
    layer = small(aux_loss_coeff=0.1, z_loss_coeff=0.2, seq_aux_loss_coeff=0.3, activation="gelu",
                  gated=False).layers[0].mlp
    assert (layer.aux_loss_coeff, layer.z_loss_coeff, layer.seq_aux_loss_coeff) == (0.1, 0.2, 0.3)
    assert not layer.experts.gated


def test_moe_layer_builder():
    layer = moe_layer(dim=16, moe_hidden_dim=8, num_experts=4, experts_per_token=1, router="causal_expert_choice")
    assert isinstance(layer, MoE) and isinstance(layer.router, CausalExpertChoiceRouter)
    assert layer(torch.randn(2, 3, 16)).shape == (2, 3, 16)


# --- bad input -----------------------------------------------------------------------------------------


class _Router(nn.Module):
    num_experts = 8


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"experts_per_token": 5}, "experts_per_token"),
        ({"experts_per_token": 0}, "experts_per_token"),
        ({"num_experts": 0}, "num_experts"),
        ({"router": "expert_choice", "capacity_factor": 0.0}, "capacity_factor"),
        ({"router": "causal_expert_choice", "capacity_factor": -1.0}, "capacity_factor"),
        ({"num_expert_groups": 3, "num_limited_groups": 1}, "num_expert_groups"),
        ({"num_expert_groups": 2, "num_limited_groups": 3}, "num_limited_groups"),
        ({"router": "switch"}, "router"),
        ({"router": None}, "router"),
        ({"router": "causal_expert_choice", "max_experts_per_token": 1}, "max_experts_per_token"),
        ({"router": "causal_expert_choice", "threshold_ema_decay": 1.0}, "threshold_ema_decay"),
        ({"router": _Router(), "num_layers": 1}, "num_experts"),
        ({"router": TokenChoiceTopKRouter(32, 4, 2)}, "router"),  # a module for two MoE layers
        ({"router": TokenChoiceTopKRouter(32, 4, 2), "num_layers": 1, "score_func": "sigmoid"}, "score_func"),
        ({"score_func": "relu"}, "score_func"),
        ({"route_scale": 0.0}, "route_scale"),
        ({"expert_bias_update_rate": -0.1}, "expert_bias_update_rate"),
        ({"moe_layer_ids": 3}, "moe_layer_ids"),  # every 3rd of 2 layers: none
        ({"moe_layer_ids": 0}, "moe_layer_ids"),
        ({"moe_layer_ids": [2], "dense_hidden_dim": 16}, "moe_layer_ids"),
        ({"moe_layer_ids": [-1], "dense_hidden_dim": 16}, "moe_layer_ids"),
        ({"moe_layer_ids": [], "dense_hidden_dim": 16}, "moe_layer_ids"),
        ({"moe_layer_ids": [0.5], "dense_hidden_dim": 16}, "moe_layer_ids"),
        ({"moe_layer_ids": "some"}, "moe_layer_ids"),
        ({"moe_layer_ids": [0]}, "dense_hidden_dim"),
        ({"embed_dim": 36, "num_heads": 2, "num_kv_heads": 1}, "embed_dim"),
        ({"moe_hidden_dim": 12}, "moe_hidden_dim"),
        ({"moe_hidden_dim": 0}, "moe_hidden_dim"),
        ({"embed_dim": 30}, "embed_dim"),  # not divisible by num_heads
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"head_dim": 7}, "head_dim"),
        ({"qk_norm": "both"}, "qk_norm"),
        ({"clip_qkv": 0.0}, "clip_qkv"),
        ({"rope_base": 0.0}, "rope_base"),
        ({"norm_eps": -1.0}, "norm_eps"),
        ({"num_layers": 0}, "num_layers"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"aux_loss_coeff": -0.01}, "aux_loss_coeff"),
        ({"z_loss_coeff": -0.01}, "z_loss_coeff"),
        ({"seq_aux_loss_coeff": -0.01}, "seq_aux_loss_coeff"),
        ({"shared_expert_gate": True}, "shared_expert_gate"),
        ({"shared_expert_hidden_dim": -1}, "shared_expert_hidden_dim"),
        ({"activation": "tanh"}, "activation"),
        ({"num_expertz": 4}, "num_expertz"),  # a typo is an unknown argument
        ({"aux_loss_pooled": "abc"}, "aux_loss_pooled"),  # reaches moe_layer through **kwargs: typed there
        ({"gated": "no"}, "gated"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        small(**kwargs)


def test_moe_layer_bad_dims():
    for name, value in (("dim", 12), ("moe_hidden_dim", 4)):
        args = dict(dim=16, moe_hidden_dim=16, num_experts=4, experts_per_token=2)
        args[name] = value
        with pytest.raises(ValueError, match=name):
            moe_layer(**args)


def test_docs_builders_notebook_runs():
    """The code cells of docs/builders.md run, in order, in one namespace (the docs stay true)."""
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "builders.md"
    cells = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(cells) >= 5
    namespace: dict = {}
    for cell in cells:
        exec(compile(cell, str(doc), "exec"), namespace)


@pytest.mark.parametrize(
    "router, options",
    [
        ("token_choice", {"capacity_factor": 1.0}),
        ("expert_choice", {"norm_topk_prob": True, "expert_bias_update_rate": 0.1, "threshold_ema_decay": 0.9}),
        ("causal_expert_choice", {"norm_topk_prob": True, "route_scale": 2.0}),
    ],
)
def test_options_of_another_router_are_dropped_with_a_note(router, options, caplog):
    """Switching the router is one override: options meant for another router are ignored and logged."""
    import logging

    with caplog.at_level(logging.INFO):
        model = small(router=router, **options)
    cls = {"token_choice": TokenChoiceTopKRouter, "expert_choice": ExpertChoiceTopKRouter,
           "causal_expert_choice": CausalExpertChoiceRouter}[router]
    assert all(isinstance(layer.router, cls) for _, layer in moe_layers(model))
    notes = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert len(notes) == 1 and all(k in notes[0] for k in options), notes  # once per model, naming each option


def test_renamed_arguments_still_work_with_a_warning():
    with pytest.warns(FutureWarning, match="'moe_layers' is deprecated, use 'moe_layer_ids'"):
        old = small(moe_layers=[1], dense_hidden_dim=16)
    assert [n for n, _ in moe_layers(old)] == ["layers.1.mlp"]
    with pytest.warns(FutureWarning, match="'hidden_dim' is deprecated, use 'moe_hidden_dim'"):
        layer = moe_layer(dim=16, hidden_dim=8, num_experts=4, experts_per_token=1)
    assert layer.experts.hidden_dim == 8
    with pytest.raises(ValueError, match="both 'moe_layers'"):
        small(moe_layers=[1], moe_layer_ids=[1], dense_hidden_dim=16)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (torch.zeros(16, dtype=torch.long), r"\[batch, seq_len\].*shape \[16\]"),
        (torch.zeros(1, 2, 3, dtype=torch.long), r"shape \[1, 2, 3\]"),
        (torch.zeros(2, 0, dtype=torch.long), r"empty: shape \[2, 0\]"),
        (torch.zeros(0, 4, dtype=torch.long), r"empty: shape \[0, 4\]"),
        (torch.full((2, 4), V), rf"\[0, {V}\).*from {V} to {V}"),
        (torch.full((2, 4), -1), rf"\[0, {V}\).*from -1"),
        (torch.zeros(2, 4), "integer token ids"),
    ],
)
def test_forward_misuse_is_a_value_error(tokens, message):
    model = small()
    with pytest.raises(ValueError, match=message):
        model(tokens)


@pytest.mark.parametrize("overrides", [["model.router=causal_expert_choice", "~model.aux_loss_coeff"],
                                       ["model.router=expert_choice"],
                                       ["model.router=causal_expert_choice", "model.max_experts_per_token=4"]])
@pytest.mark.parametrize("config_name", ["tiny/full", "small/full"])
def test_switching_the_router_is_one_override_of_a_packaged_config(config_name, overrides):
    """docs/quickstart.md's ``tune run moe_full_finetune --config tiny/full model.router=... ~model.aux_loss_coeff``:
    the config (with the overrides applied as the CLI applies them) validates and builds the chosen router."""
    import pathlib

    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    from torchtune_moe.training import validate_recipe_config

    root = pathlib.Path(__file__).resolve().parents[2]
    cfg = OmegaConf.load(root / "torchtune_moe" / "configs" / f"{config_name}.yaml")
    for override in overrides:
        if override.startswith("~"):
            OmegaConf.update(cfg, override[1:], None)
            del cfg.model[override[1:].split(".", 1)[1]]
        else:
            key, value = override.split("=", 1)
            OmegaConf.update(cfg, key, OmegaConf.create({"v": value}).v if not value.isdigit() else int(value))
    validate_recipe_config(cfg)
    with torch.device("meta"):
        model = tt_config.instantiate(cfg.model)
    cls = {"expert_choice": ExpertChoiceTopKRouter, "causal_expert_choice": CausalExpertChoiceRouter}[cfg.model.router]
    assert all(isinstance(layer.router, cls) for _, layer in moe_layers(model))


@pytest.mark.parametrize(
    "name", ["gated", "shared_expert_gate", "aux_loss_pooled", "expert_linear_bias", "gate_bias", "expert_fp8"]
)
def test_boolean_options_refuse_other_values(name):
    """moe() passes these through to moe_layer as **kwargs, out of the config check's reach: a string from a
    command line (model.gate_bias=abc) must be refused by name, not read as true."""
    with pytest.raises(ValueError, match=rf"{name} must be true or false, got 'abc'"):
        moe_layer(dim=32, moe_hidden_dim=16, num_experts=4, experts_per_token=2, **{name: "abc"})
