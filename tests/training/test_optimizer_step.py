"""``compile_optimizer_step`` (the recipe's ``compile.optimizer_step``): the compiled multi-tensor AdamW step
updates as the eager one from a warm-up at lr 0 (torch's compiled single-tensor step writes NaN there), compiles
once under a changing learning rate, compiles one graph for any number of identical layers, keeps the step's hooks
and the lr scheduler's bookkeeping, saves plain param groups that an eager optimizer loads, compiles other
optimizers' whole step, and runs on FSDP2 shards (2 processes, gloo). On the CPU, with ``foreach=True`` as the
recipe requires there."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from torchtune_moe.training import compile_optimizer_step, defer_grad_scaling


def _params(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape, dtype=dtype)) for shape in ((16, 8), (4, 16, 8), (8,))]


def _grads(step: int, params):
    g = torch.Generator().manual_seed(step)
    out = []
    for p in params:
        grad = torch.randn(p.shape, generator=g).to(p.dtype)
        grad[..., ::2] = 0  # rows a step does not touch (an embedding's unused tokens): 0/0 there is the NaN risk
        out.append(grad)
    return out


def _optimizer(params):
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / 3)  # lr 0 at the first step, as warm-up starts
    return opt, sched


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_compiled_step_matches_eager_from_lr_zero_and_compiles_once(dtype, tol):
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _params(dtype), _params(dtype)
    opt_e, sched_e = _optimizer(eager)
    opt_c, sched_c = _optimizer(compiled)
    compile_optimizer_step(opt_c)
    for step in range(5):
        for ps in (eager, compiled):
            for p, g in zip(ps, _grads(step, ps)):
                p.grad = g
        opt_e.step()
        sched_e.step()
        opt_c.step()
        sched_c.step()
        for a, b in zip(eager, compiled):
            assert torch.isfinite(b).all()
            torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    assert counters["stats"]["unique_graphs"] == 1  # five learning rates, one compiled step
    assert float(opt_c.param_groups[0]["lr"]) == pytest.approx(opt_e.param_groups[0]["lr"])


def test_saved_groups_are_plain_and_load_into_eager_and_compiled_optimizers():
    torch._dynamo.reset()
    params = _params()
    opt, sched = _optimizer(params)
    compile_optimizer_step(opt)
    for step in range(2):
        for p, g in zip(params, _grads(step, params)):
            p.grad = g
        opt.step()
        sched.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # live: a tensor the scheduler fills
    saved = opt.state_dict()
    assert isinstance(saved["param_groups"][0]["lr"], float)
    assert saved["param_groups"][0]["capturable"] is False

    # An eager run resumes from it (a tensor lr with foreach and capturable=False would be refused at the step).
    eager = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_e = torch.optim.AdamW(eager, lr=1e-2, foreach=True)
    opt_e.load_state_dict(copy.deepcopy(saved))  # loading aliases the saved tensors, which the step mutates
    for p, g in zip(eager, _grads(2, eager)):
        p.grad = g
    opt_e.step()
    assert all(torch.isfinite(p).all() for p in eager)

    # A compiled one loads it too: the load hook makes the learning rate a tensor again.
    again = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_a = torch.optim.AdamW(again, lr=1e-2, foreach=True)
    compile_optimizer_step(opt_a)
    opt_a.load_state_dict(copy.deepcopy(saved))
    assert isinstance(opt_a.param_groups[0]["lr"], torch.Tensor) and opt_a.param_groups[0]["capturable"]
    for p, g in zip(again, _grads(2, again)):
        p.grad = g
    opt_a.step()
    for a, b in zip(eager, again):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def _layered_model(num_layers: int):
    """``num_layers`` identical layers (a weight, a bias and a norm weight each) between an embedding and an
    output: the layout of a decoder, whose layers the bucketed step compiles once."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.tok_embeddings = torch.nn.Embedding(12, 8)
    model.layers = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)) for _ in range(num_layers))
    model.output = torch.nn.Linear(8, 12, bias=False)
    return model


@pytest.mark.parametrize("num_layers", [2, 6])
def test_layer_buckets_match_eager_and_compile_one_graph_for_any_depth(num_layers):
    """One graph for the layers (whatever their number) and one for the rest; the updates are the eager step's,
    with weight decay, from lr 0, and a parameter without a gradient is left alone (as Adam leaves it)."""
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _layered_model(num_layers), _layered_model(num_layers)
    opt_e, sched_e = _optimizer(list(eager.parameters()))
    opt_c, sched_c = _optimizer(list(compiled.parameters()))
    compile_optimizer_step(opt_c, compiled.layers)
    for step in range(4):
        for model in (eager, compiled):
            ps = list(model.parameters())
            for p, g in zip(ps, _grads(step, ps)):
                p.grad = g
            model.layers[0][1].bias.grad = None  # a parameter without a gradient this step
        opt_e.step()
        sched_e.step()
        opt_c.step()
        sched_c.step()
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert compiled.layers[0][1].bias not in opt_c.state  # never stepped: no state made for it
    # The layers with a gradient-less bias (layer 0), the full layers, the embedding + output: three graphs.
    assert counters["stats"]["unique_graphs"] == 3


def test_bucketed_step_keeps_hooks_and_the_schedulers_bookkeeping():
    """The replaced step runs the optimizer's step hooks, and the lr scheduler neither warns of an overridden step
    nor of being stepped first."""
    torch._dynamo.reset()
    model = _layered_model(2)
    opt, sched = _optimizer(list(model.parameters()))
    compile_optimizer_step(opt, model.layers)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scheduler's warnings are UserWarnings
        for step in range(2):
            ps = list(model.parameters())
            for p, g in zip(ps, _grads(step, ps)):
                p.grad = g
            opt.step()
            sched.step()
    assert calls == ["pre", "post", "pre", "post"]
    with pytest.raises(ValueError, match="takes no closure"):
        opt.step(lambda: 0.0)


def test_deferred_grad_factors_match_multiplied_gradients_and_are_used_once():
    """``defer_grad_scaling``: the compiled step multiplies each gradient by its handed factor as it reads it (the
    gradients stay as they are), factors that change every step compile nothing new, a step without factors takes
    the gradients as they are, and an optimizer whose step cannot take factors says so (the caller multiplies)."""
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _layered_model(3), _layered_model(3)
    opt_e, sched_e = _optimizer(list(eager.parameters()))
    opt_c, sched_c = _optimizer(list(compiled.parameters()))
    assert not defer_grad_scaling(opt_c, [(list(compiled.parameters()), 0.5)])  # not compiled yet: eager step
    compile_optimizer_step(opt_c, compiled.layers)
    for step in range(4):
        # Step 2 hands no factors: the gradients as they are.
        factors = {} if step == 2 else {0: 1 / (step + 3), 1: 0.25 * (step + 1)}  # layer 0, the rest
        for model in (eager, compiled):
            ps = list(model.parameters())
            for p, g in zip(ps, _grads(step, ps)):
                p.grad = g
        layer0 = {id(p) for p in compiled.layers[0].parameters()}
        if factors:
            groups = [([p for p in compiled.parameters() if id(p) in layer0], factors[0]),
                      ([p for p in compiled.parameters() if id(p) not in layer0], factors[1])]
            assert defer_grad_scaling(opt_c, groups)
            before = [p.grad.clone() for p in compiled.parameters()]
            for (name, p) in eager.named_parameters():
                p.grad *= factors[0] if name.startswith("layers.0.") else factors[1]
        opt_e.step()
        sched_e.step()
        opt_c.step()
        sched_c.step()
        if factors:
            for p, b in zip(compiled.parameters(), before):
                assert torch.equal(p.grad, b)  # left as they were
        for a, b in zip(eager.parameters(), compiled.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert opt_c._grad_factors is None  # used by the step that followed
    # The layers and the rest, with a factor and (step 2) without: no graph per factor value.
    assert counters["stats"]["unique_graphs"] == 4
    sgd = torch.optim.SGD(_params(), lr=0.1, foreach=True)
    compile_optimizer_step(sgd)
    assert not defer_grad_scaling(sgd, [(sgd.param_groups[0]["params"], 0.5)])  # whole-step compile: no factors


@pytest.mark.parametrize("layers", [5, [torch.nn.Linear(2, 2), "layer"], _params()])
def test_layers_that_are_not_modules_are_refused_by_name(layers):
    opt, _ = _optimizer(_params())
    with pytest.raises(TypeError, match=r"compile_optimizer_step: layers must be modules .*model\.layers"):
        compile_optimizer_step(opt, layers)
    assert not isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # refused before the optimizer was changed


def test_other_optimizers_compile_their_whole_step():
    """SGD (not bucketed): its whole step compiled, updating as the eager one under a changing lr."""
    torch._dynamo.reset()
    eager, compiled = _params(), _params()
    opts = [torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=True) for ps in (eager, compiled)]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: (s + 1) / 3) for o in opts]
    compile_optimizer_step(opts[1])
    for step in range(3):
        for ps in (eager, compiled):
            for p, g in zip(ps, _grads(step, ps)):
                p.grad = g
        for o, s in zip(opts, scheds):
            o.step()
            s.step()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


_FSDP_SCRIPT = r"""
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate
from torchtune_moe.training import compile_optimizer_step, defer_grad_scaling, end_distributed_process

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
ref = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
ref.load_state_dict(model.state_dict())
fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, foreach=True)
ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / 4)
ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: s / 4)
compile_optimizer_step(opt, [model[1], model[2]])  # two identical buckets of DTensor shards
worst = 0.0
for step in range(4):
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(10 * step + dist.get_rank()))
    xs = [torch.empty_like(x) for _ in range(2)]
    dist.all_gather(xs, x)
    model(x).pow(2).mean().backward()
    ref(torch.cat(xs)).pow(2).mean().backward()
    if step == 0:  # a gradient sharded otherwise than its parameter: refused (the caller multiplies)
        p0 = next(model.parameters())
        sharded = p0.grad
        p0.grad = sharded.redistribute(sharded.device_mesh, [Replicate()])
        assert not defer_grad_scaling(opt, [(list(model.parameters()), 2.0)])
        p0.grad = sharded
    factor = 0.5 + step  # handed to the compiled step, which updates the local shards; multiplied here for ref
    assert defer_grad_scaling(opt, [(list(model.parameters()), factor)])
    for p in ref.parameters():
        p.grad *= factor
    for o, s in ((opt, sched), (ref_opt, ref_sched)):
        o.step()
        s.step()
        o.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        worst = max(worst, float((a.full_tensor() - b).abs().max()))
if dist.get_rank() == 0:
    print(f"worst {worst:.3e}")
dist.destroy_process_group()
end_distributed_process(0)
"""


def test_compiled_step_on_fsdp2_shards_matches_one_process(tmp_path):
    script = tmp_path / "fsdp_step.py"
    script.write_text(_FSDP_SCRIPT)
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    worst = float(res.stdout.split("worst ")[1].split()[0])
    assert worst < 1e-5


@pytest.mark.gpu
def test_compiled_step_on_cuda_matches_the_fused_step():
    """On a GPU (foreach by default, capturable): bf16 parameters as the recipe trains them, bucketed by layer,
    against torch's fused step, from lr 0."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch._dynamo.reset()
    counters.clear()
    models = [_layered_model(3).to("cuda", torch.bfloat16) for _ in range(2)]
    fused, compiled = (list(m.parameters()) for m in models)
    opt_f = torch.optim.AdamW(fused, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    opt_c = torch.optim.AdamW(compiled, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: s / 3) for o in (opt_f, opt_c)]
    compile_optimizer_step(opt_c, models[1].layers)
    for step in range(5):
        for ps in (fused, compiled):
            for p, g in zip(ps, _grads(step, ps)):
                p.grad = g.cuda()
        for o, s in zip((opt_f, opt_c), scheds):
            o.step()
            s.step()
        for a, b in zip(fused, compiled):
            assert torch.isfinite(b).all()
            torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-2)
    assert counters["stats"]["unique_graphs"] == 2  # the layers' graph and the rest's
