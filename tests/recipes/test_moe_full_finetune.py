"""The ``moe_full_finetune`` recipe on the tiny configs (CPU): learning, exact resume, FSDP2 with 2 processes,
fail-fast validation, aux-loss scaling under gradient accumulation, logging outputs, routing replay."""

import copy
import json
import shutil
import subprocess
import sys
import types
from itertools import islice
from pathlib import Path

import pytest
import torch
from _recipe_helpers import FAST, losses, make_recipe, read_metrics, run_recipe
from safetensors.torch import load_file

from torchtune_moe.config import load_config
from torchtune_moe.modules import collect_aux_loss, moe_layers
from torchtune_moe.training import EXPERT_LOAD_FILENAME, list_checkpoints


# ----------------------------------------------------------------------------------------------- learning


@pytest.mark.parametrize("config", ["tiny/full", "tiny/full_causal_ec"])
def test_loss_falls(tmp_path, config):
    """40 steps of 32 samples: the loss falls from ~4.7 (about log 101, a fresh model) to below 2.0 (mean of
    steps 31-40; measured 1.74 for both configs, deterministic on CPU). A model that does not learn stays > 3."""
    run_recipe(tmp_path, config, ["max_steps_per_epoch=40", "batch_size=32"])
    curve = losses(tmp_path)
    assert [s for s, _ in curve] == list(range(1, 41))
    assert curve[0][1] > 4.0
    last = [v for _, v in curve[-10:]]
    assert sum(last) / len(last) < 2.0
    # Everything the recipe promises to log is there.
    metrics = read_metrics(tmp_path)[40]
    for key in ("loss", "ce_loss", "aux_loss", "aux/z_loss", "lr", "tokens_per_second_per_gpu", "peak_memory_rss",
                "grad_norm", "expert_load/max_over_mean", "expert_load/dead_experts",
                "expert_load/layers.0.mlp/router_entropy", "expert_load/layers.3.mlp/dropped_token_frac"):
        assert key in metrics, key
    assert metrics["loss"] == pytest.approx(metrics["ce_loss"] + metrics["aux_loss"])
    # A checkpoint at the epoch end.
    assert [s for s, _ in list_checkpoints(tmp_path)] == [40]


def test_expert_load_jsonl_and_detailed_metrics(tmp_path):
    run_recipe(tmp_path, overrides=["max_steps_per_epoch=4", "batch_size=8", "log_every_n_steps=2",
                                    "log_expert_load=detailed"])
    records = [json.loads(line) for line in (tmp_path / EXPERT_LOAD_FILENAME).read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert sorted(r["layers"]) == [f"layers.{i}.mlp" for i in range(4)]
        for load in r["layers"].values():
            assert len(load) == 8 and all(isinstance(x, int) and x >= 0 for x in load)
            # Token choice, top-2: every token of the 2 steps x 8 samples goes to exactly 2 experts.
            assert sum(load) % 2 == 0 and sum(load) > 0
    metrics = read_metrics(tmp_path)[4]
    util = [metrics[f"expert_load/layers.1.mlp/util_e{e}"] for e in range(8)]
    assert sum(util) == pytest.approx(8.0)  # load / mean load
    assert max(util) == pytest.approx(metrics["expert_load/layers.1.mlp/max_over_mean"])


# ----------------------------------------------------------------------------------------------- resume


def test_resume_gives_identical_losses(tmp_path):
    """N steps, kill, resume N steps == 2N steps uninterrupted (mid-epoch, with gradient accumulation)."""
    overrides = ["max_steps_per_epoch=6", "save_every_n_steps=3", "batch_size=8", "gradient_accumulation_steps=2",
                 "model.expert_bias_update_rate=0.01"]  # router state (expert_bias) must survive the resume too
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_recipe(full, overrides=overrides)
    assert [s for s, _ in list_checkpoints(full)] == [3, 6]

    # The resumed run starts from the state the full run had after step 3 (as if killed after saving step_3).
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "step_6")
    shutil.rmtree(resumed / "logs")
    recipe = run_recipe(resumed, overrides=overrides + ["resume_from_checkpoint=true"])
    assert recipe.global_step == 6

    expected = losses(full)
    assert losses(resumed) == expected[3:]  # bit-identical: same data order, optimizer state, lr, routing
    a, b = load_file(full / "step_6" / "model.safetensors"), load_file(resumed / "step_6" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # expert_load.jsonl was cut back to step 3 on resume, then continued.
    steps = [json.loads(line)["step"] for line in (resumed / EXPERT_LOAD_FILENAME).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_compiled_optimizer_step_trains_as_the_eager_step_and_resumes_eagerly(tmp_path):
    """compile.optimizer_step: the same losses as the eager multi-tensor step from the warm-up's lr 0 (torch's
    compiled single-tensor step would write NaN there); its checkpoint resumes without compiling the step."""
    overrides = ["max_steps_per_epoch=4", "save_every_n_steps=2", "batch_size=8", "optimizer.foreach=true",
                 "lr_scheduler.num_warmup_steps=2"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_recipe(eager, overrides=overrides)
    recipe = run_recipe(compiled, overrides=overrides + ["compile={model: false, loss: false, optimizer_step: true}"])
    assert isinstance(recipe._optimizer.param_groups[0]["lr"], torch.Tensor)  # the compiled step's tensor lr
    assert [s for s, _ in losses(compiled)] == [1, 2, 3, 4]
    assert [v for _, v in losses(compiled)] == pytest.approx([v for _, v in losses(eager)], abs=1e-5)
    assert read_metrics(compiled)[4]["lr"] == pytest.approx(read_metrics(eager)[4]["lr"])

    shutil.rmtree(compiled / "step_4")
    shutil.rmtree(compiled / "logs")
    resumed = run_recipe(compiled, overrides=overrides + ["resume_from_checkpoint=true"])
    assert isinstance(resumed._optimizer.param_groups[0]["lr"], float)
    assert [v for _, v in losses(compiled)] == pytest.approx([v for _, v in losses(eager)][2:], abs=1e-5)


def test_resume_without_checkpoint_fails(tmp_path):
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        make_recipe(tmp_path, overrides=["resume_from_checkpoint=true"])


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A failure half-way through writing step_4 leaves step_2 intact and no step_4; resuming uses step_2."""
    from torchtune_moe.training import MoECheckpointer

    overrides = ["max_steps_per_epoch=4", "save_every_n_steps=2", "batch_size=8"]
    real_save = MoECheckpointer.save_checkpoint

    def crashing_save(self, model_state_dict, save_dir):
        real_save(self, model_state_dict, save_dir)
        if "step_4" in str(save_dir) or Path(save_dir).name.startswith(".step_4"):
            (Path(save_dir) / "model.safetensors").write_bytes(b"truncated")  # half-written
            raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(MoECheckpointer, "save_checkpoint", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(tmp_path, overrides=overrides)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert not (tmp_path / "step_4").exists()
    monkeypatch.setattr(MoECheckpointer, "save_checkpoint", real_save)
    recipe = run_recipe(tmp_path, overrides=overrides + ["resume_from_checkpoint=true"])
    assert recipe.global_step == 4 and [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]


# ----------------------------------------------------------------------------------------------- distributed


def _tune_run_2(output_dir, *overrides):
    cmd = ["tune", "run", "--nproc_per_node", "2", "moe_full_finetune", "--config", "tiny/full",
           f"output_dir={output_dir}", *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


LCE = "loss._component_=torchtune_moe.modules.LinearCrossEntropyLoss"


def test_two_processes_fsdp2_match_one_process_and_resume(tmp_path):
    """`tune run --nproc_per_node 2` (gloo, FSDP2) with batch_size B per rank == one process with 2B; and a
    2-process resume (weights loaded into the sharded model from the meta device) continues exactly. The two
    processes train with LinearCrossEntropyLoss (the shipped configs' loss: the output projection applied by the
    loss, outside the sharded model's forward), the one process with torch's CrossEntropyLoss."""
    common = ["max_steps_per_epoch=5", "save_every_n_steps=3", "model.expert_bias_update_rate=0.01"]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    run_recipe(one, overrides=["batch_size=16", *common])
    common.append(LCE)
    _tune_run_2(two, "batch_size=8", *FAST, *common)
    l1, l2 = losses(one, "ce_loss"), losses(two, "ce_loss")
    assert [s for s, _ in l2] == [1, 2, 3, 4, 5]
    # Same data, same init, same updates. Not bit-identical: the aux losses are computed per rank (on half the
    # batch) and sums run in another order; a wrong gradient scale or data split would differ by > 0.01.
    for (s1, v1), (s2, v2) in zip(l1, l2):
        assert v1 == pytest.approx(v2, abs=2e-3), (s1, v1, v2)
    # Checkpoints gathered from the sharded model hold the same weights. The router expert_bias is saved too,
    # but may differ by a sign step: padding differs between the two layouts and counts in the expert loads.
    a, b = load_file(one / "step_5" / "model.safetensors"), load_file(two / "step_5" / "model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("router.expert_bias") for k in a)
    assert all(torch.allclose(a[k], b[k], atol=2e-3) for k in a if not k.endswith("expert_bias"))
    assert any(b[k].abs().sum() > 0 for k in b if k.endswith("expert_bias"))  # updated on every rank
    assert len(torch.load(two / "step_3" / "recipe_state.pt", weights_only=True)["rng"]) == 2  # one per rank

    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "step_5")
    shutil.rmtree(resumed / "logs")
    _tune_run_2(resumed, "batch_size=8", *FAST, *common, "resume_from_checkpoint=true")
    assert losses(resumed) == losses(two)[3:]
    c = load_file(resumed / "step_5" / "model.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_linear_cross_entropy_trains_as_cross_entropy(tmp_path):
    """tiny/full (fp32) with LinearCrossEntropyLoss: the loss curve of torch's CrossEntropyLoss to fp32 noise,
    and the greedy samples at the end (generation switches the model back to logits, then back again)."""
    common = ["max_steps_per_epoch=4", "batch_size=8"]
    run_recipe(tmp_path / "ce", overrides=common)
    recipe = run_recipe(tmp_path / "lce", overrides=[*common, LCE], fast=[f for f in FAST if f != "samples=null"])
    assert recipe._model.skip_output_layer and recipe._model.num_output_chunks == 0
    ce, lce = losses(tmp_path / "ce", "ce_loss"), losses(tmp_path / "lce", "ce_loss")
    assert [s for s, _ in lce] == [1, 2, 3, 4]
    assert [v for _, v in lce] == pytest.approx([v for _, v in ce], rel=1e-5)


def test_linear_cross_entropy_refuses_an_output_sharded_on_its_own(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"custom_sharded_layers: \['output'\] cannot be an FSDP unit of its own "
                                         r"with loss LinearCrossEntropyLoss"):
        make_recipe(out, overrides=[LCE, "custom_sharded_layers=[output]"])
    assert not out.exists()


def test_activation_checkpointing_changes_nothing(tmp_path):
    overrides = ["max_steps_per_epoch=3", "batch_size=8", "model.expert_bias_update_rate=0.01"]
    run_recipe(tmp_path / "plain", overrides=overrides)
    run_recipe(tmp_path / "ac", overrides=overrides + ["enable_activation_checkpointing=true"])
    plain, ac = losses(tmp_path / "plain"), losses(tmp_path / "ac")
    assert [s for s, _ in ac] == [1, 2, 3]
    assert [v for _, v in ac] == pytest.approx([v for _, v in plain], abs=1e-6)


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_sise=4", r"batch_sise: unknown config key\. Did you mean 'batch_size'\?"),
        ("optimizer.lrr=0.1", r"optimizer\.lrr: 'torch\.optim\.AdamW' has no argument 'lrr'\. Did you mean 'lr'\?"),
        ("samples.max_new_token=4", r"samples\.max_new_token: unknown config key\. Did you mean 'max_new_tokens'"),
        ("model.num_expert=4", r"model: .*num_expert"),
        ("optimizer._component_=torch.optim.AdamWW", r"optimizer\._component_: cannot import 'torch\.optim\.AdamWW'"),
        ("dataset._component_=torchtune_moe.data.no_such_dataset", r"dataset\._component_: cannot import"),
        ("batch_size=0", r"batch_size: got 0; allowed: an integer >= 1"),
        ("log_expert_load=verbose", r"log_expert_load: got 'verbose'; allowed: one of 'brief', 'detailed'"),
        ("dtype=fp16", r"dtype: got 'fp16'; allowed: one of 'fp32', 'bf16'"),
        ("clip_grad_norm=-1", r"clip_grad_norm: got -1; allowed: a number > 0"),
        ("model.experts_per_token=9", r"model: experts_per_token must be between 1 and num_experts \(8\), got 9"),
        ("optimizer.lr=-1", r"optimizer: Invalid learning rate: -1"),
        ("compile=true", r"compile: true needs dtype: bf16"),
        pytest.param("device=cuda", r"device: cuda, but this machine has no cuda device \(allowed here: cpu\)",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")),
        ("compile={loss: false}", r"compile\.model: true \(a compile mapping's default\) needs dtype: bf16"),
        ("compile={model: true}", r"compile\.model: true needs dtype: bf16"),
        ("compile={modle: false}", r"compile\.modle: unknown config key\. Did you mean 'model'\?"),
        ("compile=fast", r"compile: got 'fast'; allowed: true, false, or a mapping of model, loss, optimizer_step"),
        ("compile={model: false, optimizer_step: true}",
         r"compile\.optimizer_step: true, but the single-tensor step .* set optimizer\.foreach=true"),
        ("lr_scheduler.num_warmup_step=3", r"lr_scheduler\.num_warmup_step: .* Did you mean 'num_warmup_steps'"),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, override, message):
    from moe_full_finetune import MoEFullFinetuneRecipe

    out = tmp_path / "out"
    cfg = load_config("tiny/full", [f"output_dir={out}", override])
    with pytest.raises(ValueError, match=message):
        MoEFullFinetuneRecipe(cfg)
    assert not out.exists()  # nothing was written: the check came first


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.foreach=true", "optimizer.fused=true"],
         r"compile\.optimizer_step: true, but optimizer\.fused: true .* set optimizer\.fused=false"),
        (["optimizer._component_=torchao.optim.AdamW8bit", "~optimizer.fused"],
         r"compile\.optimizer_step: true, but optimizer\._component_ is torchao\.optim\.AdamW8bit: only torch\.optim"),
    ],
)
def test_uncompilable_optimizer_step_is_refused_by_name(tmp_path, overrides, message):
    from moe_full_finetune import MoEFullFinetuneRecipe

    out = tmp_path / "out"
    step = "compile={model: false, optimizer_step: true}"
    cfg = load_config("tiny/full", [f"output_dir={out}", step, *overrides])
    with pytest.raises(ValueError, match=message):
        MoEFullFinetuneRecipe(cfg)
    assert not out.exists()


def test_null_scheduler_from_the_command_line_trains_at_a_constant_lr(tmp_path):
    """`lr_scheduler=null`: torchtune's CLI puts it into lr_scheduler._component_ (the section's other keys stay);
    the recipe reads that as no scheduler, as `lr_scheduler: null` in a YAML file."""
    cfg = load_config("tiny/full", ["lr_scheduler=null"])
    assert cfg.lr_scheduler._component_ is None and "num_warmup_steps" in cfg.lr_scheduler
    run_recipe(tmp_path, overrides=["lr_scheduler=null", "max_steps_per_epoch=3", "batch_size=8"])
    assert [m["lr"] for m in read_metrics(tmp_path).values()] == pytest.approx([3e-3] * 3)
    assert "lr_scheduler: null" in (tmp_path / "torchtune_config.yaml").read_text()


def test_bad_key_from_the_command_line(tmp_path):
    """What a user sees: `tune run ... batch_sise=4` exits with the key named, before training."""
    res = subprocess.run(
        ["tune", "run", "moe_full_finetune", "--config", "tiny/full", f"output_dir={tmp_path / 'out'}", "batch_sise=4"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert res.returncode != 0
    assert "batch_sise: unknown config key. Did you mean 'batch_size'?" in res.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- loss scaling


def test_aux_loss_added_once_per_micro_batch_and_scaled_like_ce(tmp_path):
    """The gradient of one optimizer step with 3 micro-batches is that of
    sum_mb n_mb * (CE_mb + aux_mb) / sum_mb n_mb, n_mb = label tokens of micro-batch mb, clipped as torch's
    ``clip_grad_norm_`` clips it (the same pass), with the same norm reported."""
    recipe = make_recipe(tmp_path, overrides=["batch_size=4", "gradient_accumulation_steps=3",
                                              "model.aux_loss_coeff=0.5", "model.z_loss_coeff=0.01"])
    model = recipe._model
    reference = copy.deepcopy(model)
    batches = list(islice(iter(recipe._dataloader), 3))
    ref_batches = copy.deepcopy(batches)

    for batch in batches:
        recipe._forward_backward(batch)
    step, grad_norm = recipe._finish_accumulation()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    # By hand on the copy.
    ignore = recipe._loss_fn.ignore_index
    terms, aux_terms, total = [], [], 0
    for batch in ref_batches:
        labels = torch.cat([batch["labels"][:, 1:], torch.full((batch["labels"].shape[0], 1), ignore)], dim=1)
        n = int((labels != ignore).sum())
        logits = reference(batch["tokens"])
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=ignore)
        aux = collect_aux_loss(reference)
        assert aux.item() > 0
        terms.append(n * (ce + aux))
        aux_terms.append(n * aux)
        total += n
    (sum(terms) / total).backward()
    router = next(layer for _, layer in moe_layers(reference)).router.gate.weight
    with_aux = router.grad.clone()
    # The recipe clips in the same pass (tiny/full: clip_grad_norm 1.0, which binds here).
    ref_norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), recipe._clip_grad_norm)
    assert grad_norm == pytest.approx(float(ref_norm), rel=1e-5) and grad_norm > recipe._clip_grad_norm
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert step["num_tokens"] == total
    assert step["aux_loss"] == pytest.approx((sum(aux_terms) / total).item(), rel=1e-5)

    # The aux loss matters for the router gradients (the comparison above would catch it missing or doubled).
    reference.zero_grad()
    ce_only = 0
    for batch in ref_batches:
        labels = torch.cat([batch["labels"][:, 1:], torch.full((batch["labels"].shape[0], 1), ignore)], dim=1)
        logits = reference(batch["tokens"])
        ce_only = ce_only + (labels != ignore).sum() * torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore)
    (ce_only / total).backward()
    assert (with_aux - router.grad).abs().max() > 1e-4


def test_freeze_router_keeps_router_weights(tmp_path):
    recipe = run_recipe(tmp_path, overrides=["max_steps_per_epoch=3", "batch_size=8", "freeze_router=true"])
    start = load_config("tiny/full")  # same seed: rebuild the initial weights to compare
    torch.manual_seed(recipe.seed)
    from torchtune import config as tt_config

    initial = tt_config.instantiate(start.model)
    trained = load_file(tmp_path / "step_3" / "model.safetensors")
    for name, value in initial.state_dict().items():
        if name.endswith("router.gate.weight"):
            assert torch.equal(trained[name], value), name
        elif name.endswith("experts.down_proj"):
            assert not torch.equal(trained[name], value), name


def test_torchao_low_bit_adamw_trains_and_resumes(tmp_path):
    """optimizer._component_=torchao.optim.AdamW8bit: the loss moves, its quantized state saves and resumes."""
    opt = ["optimizer._component_=torchao.optim.AdamW8bit", "~optimizer.fused", "batch_size=8"]
    recipe = run_recipe(tmp_path, overrides=[*opt, "max_steps_per_epoch=2", "save_every_n_steps=1"])
    assert type(recipe._optimizer).__name__ == "AdamW8bit"
    first = losses(tmp_path)
    assert len(first) == 2 and first[1][1] < first[0][1]
    resumed = run_recipe(tmp_path, overrides=[*opt, "max_steps_per_epoch=2", "epochs=2", "resume_from_checkpoint=true"])
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4]
    assert type(resumed._optimizer).__name__ == "AdamW8bit"


# ----------------------------------------------------------------------------------------------- loggers


def test_wandb_logger_offline_config_path(tmp_path, monkeypatch):
    """metric_logger=WandBLogger with mode=offline: the recipe logs to it, and still writes the disk logs."""
    calls = []
    fake = types.ModuleType("wandb")
    fake.run = None

    def init(**kwargs):
        calls.append(("init", kwargs))
        fake.run = types.SimpleNamespace(_label=lambda **kw: None)
        return fake.run

    fake.init = init
    fake.define_metric = lambda *a, **k: None
    fake.config = types.SimpleNamespace(update=lambda *a, **k: calls.append(("config", a)))
    fake.save = lambda *a, **k: None
    fake.log = lambda payload: calls.append(("log", payload))
    fake.finish = lambda: calls.append(("finish", None))
    monkeypatch.setitem(sys.modules, "wandb", fake)

    run_recipe(tmp_path, overrides=[
        "max_steps_per_epoch=2", "batch_size=8",
        "metric_logger._component_=torchtune.training.metric_logging.WandBLogger",
        "~metric_logger.log_dir", "metric_logger.project=tiny", "metric_logger.mode=offline",
        f"metric_logger.dir={tmp_path / 'wandb'}",
    ])
    assert calls[0][0] == "init" and calls[0][1]["mode"] == "offline" and calls[0][1]["project"] == "tiny"
    logged = [payload for kind, payload in calls if kind == "log"]
    assert [p["global_step"] for p in logged] == [1, 2] and "expert_load/max_over_mean" in logged[0]
    assert ("finish", None) in calls
    assert [s for s, _ in losses(tmp_path)] == [1, 2]  # the DiskLogger in output_dir/logs is always there


# ----------------------------------------------------------------------------------------------- replay


def test_replay_routing_from_a_dataset_column(tmp_path):
    """Every token of every sample is routed to experts (6, 1) in all 4 layers by the dataset's column. Padding
    positions get the filler experts (0, 1) (RoutingRecord.from_batch): so expert 6 counts the real tokens, expert
    0 the padding, expert 1 both, and no other expert gets anything."""
    from torchtune_moe.data import generate_examples

    rows = []
    for ex in generate_examples(64, seed=3):
        seq_len = len(ex.prompt) + len(ex.answer) + 2  # BOS, characters, EOS
        routing = [[[6, 1]] * 4] * seq_len  # [S, L, K], stored as a JSON string (nested lists work too)
        rows.append({"input": ex.prompt, "output": ex.answer, "routed_experts": json.dumps(routing)})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cfg_overrides = [
        "dataset._component_=torchtune.datasets.instruct_dataset", "~dataset.num_samples", "~dataset.seed",
        "dataset.source=json", f"dataset.data_files={data}",
        "replay_routing_column=routed_experts", "max_steps_per_epoch=2", "batch_size=8",
    ]
    run_recipe(out, overrides=cfg_overrides, fast=["log_every_n_steps=1", "samples=null"])
    for line in (out / EXPERT_LOAD_FILENAME).read_text().splitlines():
        for load in json.loads(line)["layers"].values():
            assert {e for e, n in enumerate(load) if n} <= {0, 1, 6}
            assert load[6] > 0 and load[1] == load[0] + load[6]
