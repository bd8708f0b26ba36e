"""The step's gradient finish (``torchtune_moe.training._grads``): one pass that scales and clips gives what
torchtune's ``scale_grads`` followed by torch's ``clip_grad_norm_`` gives, group factors (expert parallelism's
1 / P) included; a non-finite norm leaves the gradients alone; a compiled AdamW step takes the factors instead."""

import copy
import math
from unittest import mock

import pytest
import torch
from torch import nn
from torchtune import training as tt_training

from torchtune_moe.models import moe
from torchtune_moe.modules import moe_layers
from torchtune_moe.training import GradGroup, grad_norms, gradient_groups, scale_and_clip_grads


def _model_with_grads(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16, bias=False)).to(dtype)
    model[0].weight.requires_grad_(False)  # frozen: no gradient, in no group
    for p in model.parameters():
        if p.requires_grad:
            p.grad = (torch.randn(p.shape) * 300).to(dtype)  # sums over ~thousands of tokens, before the scale
    return model


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy with the gradients (``copy.deepcopy`` leaves them out)."""
    ref = copy.deepcopy(model)
    for p, r in zip(model.parameters(), ref.parameters()):
        r.grad = None if p.grad is None else p.grad.clone()
    return ref


def _finish(model: nn.Module, scale: float, max_norm, degree: int = 1, optimizer=None) -> float:
    groups = gradient_groups(model, degree)
    return scale_and_clip_grads(groups, grad_norms(groups, torch.device("cpu")).tolist(), scale, max_norm, optimizer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_norm", [None, 1.0, 1e9])
def test_one_pass_matches_scale_grads_then_clip(dtype, max_norm):
    model = _model_with_grads(dtype)
    ref = _copy(model)
    scale = 2 / 8188  # world size over label tokens
    tt_training.scale_grads(ref, torch.tensor(scale))
    params = [p for p in ref.parameters() if p.grad is not None]
    ref_norm = (torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm is not None
                else torch.nn.utils.get_total_norm([p.grad for p in params]))
    norm = _finish(model, scale, max_norm)
    # bf16: torch rounds each gradient's norm to bf16 (ours stays fp32), so the norms and clip coefficients differ by
    # up to 2^-8, and torch's two multiplies round twice
    tol = dict(rtol=1e-5, atol=0) if dtype == torch.float32 else dict(rtol=2**-6, atol=0)
    assert norm == pytest.approx(float(ref_norm), rel=tol["rtol"])
    if max_norm == 1.0:
        assert norm > 2.0  # the clip binds: the scaled gradients' norm is above 1
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        if r.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, r.grad, **tol, msg=name)
    if max_norm == 1.0:
        clipped = torch.nn.utils.get_total_norm([p.grad.float() for p in model.parameters() if p.grad is not None])
        assert float(clipped) == pytest.approx(1.0, rel=1e-2)


def test_norms_are_fp32_accurate_for_bf16_gradients():
    """Each group's norm is accumulated and kept in fp32: torch's get_total_norm rounds each bf16 gradient's norm
    to bf16 (three significant digits), which the recipe logged as grad_norm."""
    model = _model_with_grads(torch.bfloat16, seed=3)
    groups = gradient_groups(model)
    got = grad_norms(groups, torch.device("cpu"))
    assert got.dtype == torch.float32
    want = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))
    assert float(got[0]) == pytest.approx(want, rel=1e-6)
    bf16_rounded = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    assert abs(bf16_rounded - want) / want > 1e-5  # the rounding this avoids is visible at this size


def test_a_factor_of_one_makes_no_pass():
    model = _model_with_grads(torch.float32)
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    with mock.patch.object(torch, "_foreach_mul_") as mul:
        norm = _finish(model, 1.0, None)
        mul.assert_not_called()
    expected = torch.nn.utils.get_total_norm(before)
    assert norm == pytest.approx(float(expected), rel=1e-6)
    with mock.patch.object(torch, "_foreach_mul_", wraps=torch._foreach_mul_) as mul:
        _finish(model, 0.5, None)
        assert mul.call_count == 1  # one multi-tensor call for the group's fp32 gradients, with a Python number
        assert isinstance(mul.call_args.args[1], float)


def test_nonfinite_norm_leaves_gradients_alone():
    model = _model_with_grads(torch.float32)
    next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert math.isnan(_finish(model, 1 / 100, 1.0))
    after = [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_expert_groups_get_their_factor():
    """Under expert parallelism (degree P) the routed experts' gradients are divided by P once more, in the same
    pass, and the clip sees the total norm of the scaled gradients of both kinds."""
    torch.manual_seed(0)
    model = moe(vocab_size=64, num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=16, head_dim=8,
                max_seq_len=16, num_experts=4, experts_per_token=2, moe_hidden_dim=8, dense_hidden_dim=32)
    for p in model.parameters():
        p.grad = torch.randn(p.shape) * 50
    groups = gradient_groups(model, 2)
    experts = {id(p) for _, layer in moe_layers(model) for p in layer.experts.parameters()}
    assert sorted(g.factor for g in groups) == [0.5, 1.0]
    assert {id(p) for g in groups if g.factor == 0.5 for p in g.params} == experts
    assert sum(len(g.params) for g in groups) == len(list(model.parameters()))
    ref = _copy(model)
    scale = 1 / 300
    for name, p in ref.named_parameters():
        p.grad *= scale * (0.5 if ".experts." in name else 1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
    norm = scale_and_clip_grads(groups, grad_norms(groups, torch.device("cpu")).tolist(), scale, 1.0)
    assert norm == pytest.approx(float(ref_norm), rel=1e-5)
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-8, msg=name)
    assert [g.factor for g in gradient_groups(model)] == [1.0]  # without expert parallelism: one group


def test_norm_count_must_match_groups():
    model = _model_with_grads(torch.float32)
    groups = gradient_groups(model)
    with pytest.raises(ValueError, match="1 norms for 2 groups"):
        scale_and_clip_grads(groups + [GradGroup([], 1.0)], [1.0], 1.0, None)
    assert grad_norms([], torch.device("cpu")) is None


def test_a_compiled_adam_step_takes_the_factors_instead_of_a_pass():
    """With the compiled AdamW step the scale and clip go to its next update: no multiply pass, the gradients left
    as they are, and the update equals an eager step on the scaled and clipped gradients."""
    from torchtune_moe.training import compile_optimizer_step

    torch._dynamo.reset()
    model = _model_with_grads(torch.float32)
    ref = _copy(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=True)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, foreach=True)
    compile_optimizer_step(opt)
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    with mock.patch.object(torch, "_foreach_mul_") as mul:
        norm = _finish(model, 1 / 300, 1.0, optimizer=opt)
        mul.assert_not_called()
    for p, b in zip([p for p in model.parameters() if p.grad is not None], before):
        assert torch.equal(p.grad, b)
    assert _finish(ref, 1 / 300, 1.0) == pytest.approx(norm)  # an eager optimizer: the pass
    opt.step()
    ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
