"""Expert parallelism through the recipe: 2 processes (gloo) with ``expert_parallel_degree=2`` against the same run
with expert parallelism off (FSDP2 only), a checkpoint resumed under the other degree (2 -> 1, 1 -> 2) and in one
process, the compiled optimizer step on the experts' mesh, and a bad degree refused by name (the degree arithmetic
for other world sizes: tests/modules/test_expert_parallel_layer.py)."""

import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from _recipe_helpers import FAST, make_recipe, read_metrics
from torchtune_moe.config import load_config


def _tune_run_2(output_dir, *overrides):
    cmd = ["tune", "run", "--nproc_per_node", "2", "moe_full_finetune", "--config", "tiny/full",
           f"output_dir={output_dir}", *FAST, *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def test_expert_parallel_equals_fsdp_only_and_resumes(tmp_path):
    """EP=2 gives the EP=1 run's losses, gradient norms (clipped at 1.0: the norm spans the expert mesh and the
    dp mesh), global expert loads and aux-loss-free biases (router statistics all-reduced), and weights; its
    sharded checkpoint resumes with expert parallelism off, and the FSDP2-only run's with EP=2 (DCP reshards the
    experts between the expert mesh and the dp mesh), to the same step 3, and both epoch-end checkpoints load in one
    process to the same weights and Adam state. The EP run also checkpoints activations (recomputing the forward's
    all-to-alls in backward). Both train with LinearCrossEntropyLoss, the model configs' loss (the output
    projection applied by the loss, after the sharded model's forward)."""
    common = ["max_steps_per_epoch=3", "save_every_n_steps=2", "batch_size=4", "model.expert_bias_update_rate=0.01",
              "loss._component_=torchtune_moe.modules.LinearCrossEntropyLoss"]
    off, ep = tmp_path / "off", tmp_path / "ep"
    _tune_run_2(off, *common)
    # EP with activation checkpointing: the recompute in backward runs the dispatch's collectives again.
    res = _tune_run_2(ep, *common, "expert_parallel_degree=2", "enable_activation_checkpointing=true")
    assert "experts split over 2 ranks (expert parallelism)" in res.stdout + res.stderr
    m_off, m_ep = read_metrics(off), read_metrics(ep)
    assert sorted(m_ep) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "ce_loss", "aux_loss", "grad_norm", "expert_load/max_over_mean"):
            assert m_ep[step][key] == pytest.approx(m_off[step][key], rel=1e-5), (step, key)
    assert (off / "expert_load.jsonl").read_text() == (ep / "expert_load.jsonl").read_text()
    a, b = load_file(off / "step_3" / "model.safetensors"), load_file(ep / "step_3" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(b[k].abs().sum() > 0 for k in b if k.endswith("expert_bias"))

    # Resume from step 2 under another expert-parallel degree (2 processes both ways): EP=2's checkpoint with
    # FSDP2 only, and the FSDP2-only checkpoint with EP=2. Step 3's loss and gradient norm need the weights and
    # the router expert_bias after step 2; its weights (after the step-3 update) need the Adam moments and step
    # counts and the lr schedule position too: a lost optimizer state moves them by 5e-4 (measured), far above 1e-6.
    ep_to_off, off_to_ep = tmp_path / "ep_to_off", tmp_path / "off_to_ep"
    for src, dst in ((ep, ep_to_off), (off, off_to_ep)):
        shutil.copytree(src, dst)
        shutil.rmtree(dst / "step_3")
        shutil.rmtree(dst / "logs")
    res = _tune_run_2(ep_to_off, *common, "resume_from_checkpoint=true")
    assert "expert_parallel_degree: 2 -> 1" in res.stdout + res.stderr  # said, not silent
    res = _tune_run_2(off_to_ep, *common, "expert_parallel_degree=2", "enable_activation_checkpointing=true",
                      "resume_from_checkpoint=true")
    assert "expert_parallel_degree: 1 -> 2" in res.stdout + res.stderr
    for resumed in (ep_to_off, off_to_ep):
        m_resumed = read_metrics(resumed)
        assert sorted(m_resumed) == [3], resumed.name
        for key in ("loss", "ce_loss", "aux_loss", "grad_norm", "expert_load/max_over_mean"):
            assert m_resumed[3][key] == pytest.approx(m_off[3][key], rel=1e-5), (resumed.name, key)
        c = load_file(resumed / "step_3" / "model.safetensors")
        assert c.keys() == a.keys()
        for k in a:
            assert torch.allclose(a[k], c[k], rtol=0, atol=1e-6), (resumed.name, k, (a[k] - c[k]).abs().max())

    # The epoch-end checkpoints in one process (world size and degree changed together): EP=2's expert-sharded
    # state and the FSDP2-only run's load to the same plain weights and Adam state (set up only, not trained).
    loaded = []
    for src in (ep, off):
        recipe = make_recipe(src, overrides=[*common, "batch_size=8", "epochs=2", "resume_from_checkpoint=true"])
        try:
            assert recipe.global_step == 3
            loaded.append((recipe._model.state_dict(), recipe._optimizer.state_dict()["state"]))
        finally:
            recipe.cleanup()
    (model_ep, optim_ep), (model_off, optim_off) = loaded
    assert all(torch.allclose(model_ep[k], b[k], rtol=0, atol=0) for k in b)  # EP=2's own export, exactly
    assert all(torch.allclose(model_off[k], model_ep[k], rtol=0, atol=1e-6) for k in model_ep)
    assert optim_ep.keys() == optim_off.keys() and len(optim_ep) == len(list(recipe._model.parameters()))
    for i, state in optim_ep.items():
        assert float(state["step"]) == 3
        for name in ("exp_avg", "exp_avg_sq"):
            assert state[name].abs().sum() > 0
            assert torch.allclose(state[name], optim_off[i][name], rtol=1e-4, atol=1e-9), (i, name)


def test_compiled_optimizer_step_under_expert_parallelism(tmp_path):
    """The compiled step with the experts on their own mesh (a compiled foreach op takes DTensors of one mesh: the
    step is bucketed by mesh too) trains as the eager multi-tensor step, to the same weights."""
    common = ["max_steps_per_epoch=3", "batch_size=4", "expert_parallel_degree=2", "optimizer.foreach=true"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    _tune_run_2(eager, *common)
    _tune_run_2(compiled, *common, "compile={model: false, loss: false, optimizer_step: true}")
    m_eager, m_compiled = read_metrics(eager), read_metrics(compiled)
    assert sorted(m_compiled) == [1, 2, 3]
    for step in (1, 2, 3):
        assert m_compiled[step]["loss"] == pytest.approx(m_eager[step]["loss"], rel=1e-5), step
    a, b = load_file(eager / "step_3" / "model.safetensors"), load_file(compiled / "step_3" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_compiled_layers_under_expert_parallelism(tmp_path):
    """``compile`` with EP=2 (and activation checkpointing: the recompute runs the dispatch again) trains as with EP=1
    and prints the samples after training: the dispatch runs outside the compiled graph. Traced, its autograd
    Functions gave wrong gradients on torch 2.11 (grad norm 2% off at step 1 on 2 H200s), and on torch 2.13 the
    samples' generation (no grad: the Function's forward traced as plain code) failed on the process group kept in
    ``ctx``, after the checkpoint was saved."""
    samples = "samples={prompts: {_component_: torchtune_moe.data.sample_prompts, n: 2}, max_new_tokens: 3}"
    common = ["max_steps_per_epoch=3", "batch_size=4", "dtype=bf16", "enable_activation_checkpointing=true",
              "compile={model: true, loss: false, optimizer_step: false}", samples]
    ep1, ep2 = tmp_path / "ep1", tmp_path / "ep2"
    _tune_run_2(ep1, *common)
    res = _tune_run_2(ep2, *common, "expert_parallel_degree=2")
    assert "What the model learned" in res.stdout
    m1, m2 = read_metrics(ep1), read_metrics(ep2)
    assert sorted(m2) == [1, 2, 3]
    for step in (1, 2, 3):
        # bf16 gradients, summed in other orders under EP=2 (both norms are accumulated in fp32)
        assert m2[step]["grad_norm"] == pytest.approx(m1[step]["grad_norm"], rel=5e-3), step
        assert m2[step]["loss"] == pytest.approx(m1[step]["loss"], rel=1e-3), step


@pytest.mark.parametrize(
    "override, message",
    [
        ("expert_parallel_degree=2", r"expert_parallel_degree: got 2; it must divide the number of processes \(1\) "
                                     r"and the experts per MoE layer \(8\); allowed: 1"),
        ("expert_parallel_degree=0", r"expert_parallel_degree: got 0; allowed: an integer >= 1"),
    ],
)
def test_a_bad_expert_parallel_degree_stops_before_any_work(tmp_path, override, message):
    from moe_full_finetune import MoEFullFinetuneRecipe

    out = tmp_path / "out"
    cfg = load_config("tiny/full", [f"output_dir={out}", override])
    with pytest.raises(ValueError, match=message):
        MoEFullFinetuneRecipe(cfg)
    assert not out.exists()
