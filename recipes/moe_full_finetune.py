"""Full fine-tuning (or training from scratch) of Mixture-of-Experts decoders, on one device or many (FSDP2).

Run it with torchtune's launcher, from any directory::

    tune run moe_full_finetune --config tiny/full                       # one device (CPU or one GPU)
    tune run --nproc_per_node 8 moe_full_finetune --config qwen3_moe/30b_a3b_full   # FSDP2 over 8 GPUs
    tune run moe_full_finetune --config my.yaml batch_size=8 optimizer.lr=1e-5     # a file + overrides

Modelled on torchtune 0.6.1's ``recipes/full_finetune_distributed.py`` and built from its pieces (config parsing
and instantiation, FSDP2 sharding, activation checkpointing, full-state-dict gathering, gradient scaling,
metric loggers, ``padded_collate_sft``, ``StatefulDistributedSampler``). What it adds for MoE:

- loss = token cross-entropy + the MoE layers' auxiliary losses (``collect_aux_loss``), each logged;
- router statistics (aux-loss-free expert bias, expert thresholds) applied once per optimizer step
  (``update_routers``, all-reduced over ranks); ``freeze_router`` keeps router weights fixed;
- expert-load metrics per MoE layer (balance, dropped tokens, router entropy, utilisation, dead experts),
  reduced across ranks, and ``{output_dir}/expert_load.jsonl`` for ``tune-moe plot``;
- atomic checkpoints (``{output_dir}/step_{N}``) every epoch and every ``save_every_n_steps``, with everything
  needed to resume to the identical loss curve (``resume_from_checkpoint: true``);
- fail-safe runs: a used ``output_dir``, a damaged checkpoint, a non-finite loss or a full disk stop the run with
  the last good checkpoint named, and never replace a good checkpoint;
- optional routing replay from a dataset column (``replay_routing_column``);
- a sample of greedy completions at the end.

The helpers (config schema, state-dict plumbing, RNG, console output, data adapters, safety checks) live in
``torchtune_moe.training`` and ``torchtune_moe.data``; this file orchestrates. Every config key is documented in
docs/recipe.md.
"""

import contextlib
import gc
import shutil
import sys
import time
import warnings
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.distributed import destroy_process_group, init_process_group
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.data import Message, padded_collate_packed
from torchtune.datasets import ConcatDataset
from torchtune.generation import generate
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training.lr_schedulers import get_lr
from torchtune.training.metric_logging import DiskLogger
from tqdm import tqdm

from torchtune_moe import config as moe_config
from torchtune_moe.data import RawColumn, RowErrors, build_dataset, check_dataset, collate_with_routing, load_raw_rows
from torchtune_moe.modules import Router, RoutingRecord, collect_aux_loss, moe_layers, replay_routing, update_routers
from torchtune_moe.training import (
    DCP_DIRNAME,
    DEFAULT_FP8_RECIPE,
    FULL_FINETUNE_CONFIG_SPEC,
    MODEL_KEY,
    RECIPE_STATE_FILENAME,
    UNSET,
    ExpertLoadTracker,
    GatheredStateDict,
    LogWindow,
    TrainingStopped,
    all_finite,
    append_expert_load,
    atomic_directory,
    check_model,
    check_output_dir,
    check_cuda_graphs_world,
    check_state_dict,
    checkpoint_dir_name,
    checkpoint_problems,
    clear_previous_run,
    compile_model,
    compile_optimizer_step,
    compile_plan,
    config_changes,
    convert_to_float8_training,
    end_distributed_process,
    find_latest_checkpoint,
    format_rate,
    grad_norms,
    gradient_groups,
    init_meshes,
    instantiate,
    is_out_of_space,
    last_good_checkpoint_note,
    latest_intact_checkpoint,
    list_checkpoints,
    load_buffers,
    load_training_state,
    local_nonfinite_key,
    materialize_meta_buffers,
    materialize_model,
    peak_memory_stats,
    prompt_and_expected,
    recipe_device,
    remove_stale_temporaries,
    restore_rng_state,
    rng_state,
    samples_table,
    save_training_state,
    scale_and_clip_grads,
    shard_experts,
    truncate_expert_load,
    validate_recipe_config,
)

log = utils.get_logger("INFO")
# torchdata's StatefulDataLoader calls a deprecated torch API on every iterator; nothing for users to act on.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

#: The config keys this recipe knows (documented in docs/recipe.md).
CONFIG_SPEC = FULL_FINETUNE_CONFIG_SPEC


# Console lines show every MoE layer's expert load up to this many layers (beyond: a one-line summary).
_MAX_CONSOLE_LAYERS = 8
# Keys whose change on resume is expected and says nothing about the run (and checkpointer.checkpoint_dir, when
# the resumed model is read from the step directory).
_RESUME_IGNORED_KEYS = ("resume_from_checkpoint", "overwrite_output_dir")


class MoEFullFinetuneRecipe(FTRecipeInterface):
    """Full fine-tuning recipe for MoE decoders (``torchtune_moe`` builders), single device or FSDP2.

    Features (config keys in parentheses; all documented in docs/recipe.md):

    - **FSDP2** over all ranks when launched with ``tune run --nproc_per_node N`` / torchrun (nccl on GPU,
      gloo on CPU), each decoder layer sharded separately (``fsdp_reshard_after_forward``,
      ``custom_sharded_layers``); one process without a launcher.
    - **Loss** = cross-entropy over label tokens + ``collect_aux_loss(model)``. Under gradient accumulation both
      are weighted by the micro-batch's label tokens and the gradients divided by the step's total label tokens
      (torchtune's scheme), so the step optimizes ``CE(all tokens) + sum_mb (n_mb / N) * aux_mb``: with one
      micro-batch, exactly ``CE + aux``.
    - **Routers**: ``update_routers`` once per optimizer step on every rank; ``freeze_router``.
    - **Precision** fp32 or bf16 (``dtype``), **gradient accumulation**, **clipping** (``clip_grad_norm``),
      **activation checkpointing**, **torch.compile** (``compile``: each decoder layer, the loss and, where it can
      be compiled, the optimizer step, one graph shared by the layers; or a mapping of those parts).
    - **Logging** every ``log_every_n_steps`` and at the end: loss, ce_loss, aux_loss, ``aux/<name>``, lr,
      tokens/s, peak memory, grad norm, and expert load (``log_expert_load: brief|detailed``) to the metric logger
      plus always a torchtune ``DiskLogger`` in ``{output_dir}/logs`` and ``{output_dir}/expert_load.jsonl``.
    - **Checkpoints** ``{output_dir}/step_{N}`` written atomically at each epoch end and every
      ``save_every_n_steps``; ``resume_from_checkpoint`` continues from the latest one.
    - **Fail-safe**: a non-finite loss or gradient norm stops before the optimizer step
      (``max_skipped_nonfinite_steps`` skips a few instead); a used ``output_dir`` is refused unless resuming
      or ``overwrite_output_dir``; collectives time out after ``process_group_timeout_s``.

    Args:
        cfg (DictConfig): the parsed config.

    Raises:
        ValueError: a bad config (naming the key), before any work: the constructor validates the config and
            builds the model (on the meta device when weights will be loaded); ``setup`` refuses a used
            ``output_dir``, a damaged checkpoint or bad data before writing anything.
    """

    #: The config keys this recipe knows (documented in docs/recipe.md); a recipe built on this one extends it.
    config_spec = FULL_FINETUNE_CONFIG_SPEC
    #: On resume the model and optimizer state are read from the step directory's ``distcp/`` shards. False: the
    #: model is loaded from the configured ``checkpointer.checkpoint_dir`` as on a first run, the optimizer state
    #: from ``recipe_state.pt``'s ``"optimizer"`` (the LoRA recipe: the frozen base is not in the step directory,
    #: only the adapters are, which it loads itself).
    resume_model_from_step_dir = True

    def __init__(self, cfg: DictConfig) -> None:
        validate_recipe_config(cfg, self.config_spec)
        self._device = recipe_device(cfg)
        self._dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=self._device)

        self._distributed = dist.is_available() and dist.is_torchelastic_launched()
        if self._distributed and not dist.is_initialized():
            backend = training.get_distributed_backend(
                self._device.type, offload_ops_to_cpu=self._device.type != "cpu"
            )
            timeout_s = cfg.get("process_group_timeout_s", None)
            kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=float(timeout_s))}
            init_process_group(backend, **kwargs)
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0

        self._output_dir = Path(cfg.output_dir).absolute()
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._log_expert_load = cfg.get("log_expert_load", "brief")
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", True)
        self._save_every_n_steps = cfg.get("save_every_n_steps", None)
        self._keep_last_n_checkpoints = cfg.get("keep_last_n_checkpoints", None)
        self._resume_from_checkpoint = cfg.get("resume_from_checkpoint", False)
        self._overwrite_output_dir = cfg.get("overwrite_output_dir", False)
        self._gradient_accumulation_steps = cfg.get("gradient_accumulation_steps", 1)
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._max_skipped_nonfinite = cfg.get("max_skipped_nonfinite_steps", 0)
        self._enable_activation_checkpointing = cfg.get("enable_activation_checkpointing", False)
        self._compile = compile_plan(cfg)  # which of the layers, loss and optimizer step torch.compile
        check_cuda_graphs_world(self._compile, self.world_size)
        self._enable_fp8_training = cfg.get("enable_fp8_training", False)
        self._fp8_recipe_name = cfg.get("fp8_recipe_name", None)
        self._freeze_router = cfg.get("freeze_router", False)
        self._fsdp_cpu_offload = cfg.get("fsdp_cpu_offload", False)
        if self._fsdp_cpu_offload and not self._distributed:
            raise ValueError(
                "fsdp_cpu_offload: true needs FSDP2, which the recipe uses when launched by torchrun: run it with "
                "`tune run --nproc_per_node N moe_full_finetune ...` (N = 1 works)"
            )
        # FSDP2 shards over all ranks; with CPU offload also a single rank (a mesh of one).
        self._sharded = self._distributed and (self.world_size > 1 or self._fsdp_cpu_offload)
        self._replay_column = cfg.get("replay_routing_column", None)
        self._expert_parallel_degree = cfg.get("expert_parallel_degree", 1)
        self._metric_loggers: list = []
        self._last_checkpoint: Optional[Path] = None
        self._train_time = 0.0

        # Public state, restored from recipe_state.pt on resume.
        self.seed = training.set_seed(seed=cfg.get("seed", None))
        self.epochs_run = 0
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self.global_step = 0
        self.steps_run_in_epoch = 0
        self.skipped_steps = 0  # non-finite steps skipped (max_skipped_nonfinite_steps)
        self.loss_history: list[tuple[int, float]] = []  # (step, loss) of every optimizer step, for the summary

        # The model is built once, here, so that a bad builder argument is refused with the config errors.
        self._from_scratch = cfg.checkpointer.get("checkpoint_dir") is None and not (
            self._resume_from_checkpoint and self.resume_model_from_step_dir
        )
        self._model = self._build_model(cfg, self._from_scratch)

    # ----------------------------------------------------------------------------------------------- setup

    def setup(self, cfg: DictConfig) -> None:
        """Builds everything but the model (built by the constructor). First what can refuse the run, before
        anything is written or loaded: the output directory (or, on resume, the latest checkpoint's integrity and
        config changes), tokenizer, loss and data. Then the output directory, loggers and the logged config; then
        the weights, sharding, optimizer, lr scheduler and the resumed state."""
        # 1. Checks: nothing is written or loaded until they pass.
        recipe_state, previous_run = None, []
        if self._resume_from_checkpoint:
            self._resume_dir, recipe_state = self._read_resume_state()
            optimizer_changes = self._check_config_changes(cfg, recipe_state.get("config"))
        else:
            previous_run = self._on_rank_zero(lambda: check_output_dir(self._output_dir, self._overwrite_output_dir))
            optimizer_changes = []
        self._tokenizer = instantiate("tokenizer", cfg.tokenizer)
        self._loss_fn = instantiate("loss", cfg.loss)
        if not hasattr(self._loss_fn, "ignore_index"):
            raise ValueError(f"loss: {type(self._loss_fn).__name__} has no ignore_index (use a cross-entropy loss)")
        if hasattr(self._loss_fn, "set_model_output"):  # LinearCrossEntropyLoss: the loss owns the output projection
            self._loss_fn.set_model_output(self._model)  # refuses an output it cannot take (LoRA-adapted, biased)
            tied = not isinstance(self._model.output, torch.nn.Module)  # torchtune's TiedLinear is no module
            named = {"tok_embeddings" if tied else "output"} & set(cfg.get("custom_sharded_layers") or [])
            if named:
                raise ValueError(
                    f"custom_sharded_layers: {sorted(named)} cannot be an FSDP unit of its own with loss "
                    f"{type(self._loss_fn).__name__} (the loss applies the output projection outside the model's "
                    f"forward); remove it, or use torchtune.modules.loss.CEWithChunkedOutputLoss"
                )
        self._sampler, self._dataloader = self._setup_data(
            cfg_dataset=cfg.dataset,
            shuffle=cfg.get("shuffle", True),
            batch_size=cfg.batch_size,
            collate_fn=cfg.get("collate_fn", "torchtune.data.padded_collate_sft"),
        )
        self._batch_size = cfg.batch_size
        self._steps_per_epoch = len(self._dataloader) // self._gradient_accumulation_steps
        if self._steps_per_epoch == 0:
            raise ValueError(
                f"batch_size: the dataset has {len(self._dataloader.dataset)} samples, fewer than one optimizer "
                f"step needs (batch_size {cfg.batch_size} x gradient_accumulation_steps "
                f"{self._gradient_accumulation_steps} x {self.world_size} ranks)"
            )
        if self.max_steps_per_epoch is not None:
            self._steps_per_epoch = min(self._steps_per_epoch, self.max_steps_per_epoch)
        if recipe_state is not None:
            self._check_resume_layout(recipe_state)
        # On resume too the checkpointer keeps the configured checkpoint_dir: the weights come from the
        # checkpoint's distcp/ shards, and a Hub export copies that directory's config and tokenizer files.
        self._checkpointer = instantiate("checkpointer", cfg.checkpointer)

        # 2. The output directory, loggers and the config, once every check has passed.
        if self._is_rank_zero:
            clear_previous_run(previous_run)  # only with overwrite_output_dir: true
            self._output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self._output_dir)
            self._metric_loggers = self._setup_metric_loggers(cfg)
            config.log_config(recipe_name=type(self).__name__, cfg=cfg)
            for logger in self._metric_loggers:
                logger.log_config(cfg)

        # 3. Weights, sharding, optimizer, schedule, resumed state.
        model_state_dict = self._load_model_state_dict()
        self._model = self._setup_model(
            self._model,
            model_state_dict=model_state_dict,
            reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
            custom_sharded_layers=cfg.get("custom_sharded_layers", None),
        )
        del model_state_dict
        if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)
        if self._compile.loss:  # as torchtune's recipes: LinearCrossEntropyLoss compiles its per-chunk softmax
            if hasattr(self._loss_fn, "apply_compile_strategy"):
                self._loss_fn = self._loss_fn.apply_compile_strategy()
            else:
                self._loss_fn = training.compile_loss(self._loss_fn, verbose=self._is_rank_zero)
        # recipe_state.pt holds the optimizer state only when resume_model_from_step_dir is False.
        self._optimizer = self._setup_optimizer(cfg.optimizer, recipe_state.get("optimizer") if recipe_state else None)
        if recipe_state is not None and self.resume_model_from_step_dir:
            self._load_sharded_state()
        if optimizer_changes:
            self._apply_optimizer_changes(optimizer_changes)

        if recipe_state is not None:
            self._load_recipe_state(recipe_state)

        self._lr_scheduler = None
        if cfg.get("lr_scheduler", None) is not None:
            self._lr_scheduler = instantiate(
                "lr_scheduler",
                cfg.lr_scheduler,
                self._optimizer,
                num_training_steps=self.total_epochs * self._steps_per_epoch,
                last_epoch=self.global_step - 1,
            )
        if self._compile.optimizer_step:  # after the scheduler (compile_optimizer_step says why)
            compile_optimizer_step(self._optimizer, getattr(self._model, "layers", None))  # a graph shared by the layers
        elif self._compile.eager_step_note:
            utils.log_rank_zero(log, f"compile: true leaves the optimizer step eager: {self._compile.eager_step_note}")

        self._samples_cfg = cfg.get("samples", None)
        self._config_container = OmegaConf.to_container(cfg, resolve=True)
        self._expert_load = ExpertLoadTracker(self._moe_layers, self._device)
        # Used to ignore the label of the last position (labels are shifted by one).
        self._ignore_labels_cache = torch.full(
            (cfg.batch_size, 1), self._loss_fn.ignore_index, device=self._device
        )
        self._aux_names: Optional[list[str]] = None
        self._step_acc: Optional[torch.Tensor] = None

        if recipe_state is not None:
            if self._is_rank_zero:
                truncate_expert_load(self._output_dir, self.global_step)
            warning = restore_rng_state(recipe_state.get("rng"), self.rank, self.world_size, self._device)
            if warning:
                log.warning(warning)
            utils.log_rank_zero(log, f"Resumed from {self._resume_dir} (step {self.global_step}).")

    def _on_rank_zero(self, fn):
        """Runs ``fn`` on rank 0 and gives every rank its result, or its ValueError (so that all ranks stop
        together instead of the others waiting in the next collective)."""
        result = [None, None]
        if self._is_rank_zero:
            try:
                result = [fn(), None]
            except ValueError as e:
                result = [None, str(e)]
        if self._distributed:
            dist.broadcast_object_list(result, src=0)
        if result[1] is not None:
            raise ValueError(result[1])
        return result[0]

    def _read_resume_state(self) -> tuple[Path, dict]:
        """The latest complete checkpoint and its ``recipe_state.pt``, after checking its files; a damaged file
        is named with the step and the newest earlier checkpoint that is intact."""

        def find() -> tuple[str, int]:
            latest = find_latest_checkpoint(self._output_dir)
            if latest is None:
                raise ValueError(
                    f"resume_from_checkpoint: true, but {self._output_dir} holds no complete checkpoint "
                    f"(a step_N directory with {RECIPE_STATE_FILENAME}); set resume_from_checkpoint=false to start "
                    f"anew"
                )
            step = int(latest.name.split("_")[1])
            problems = checkpoint_problems(latest)
            if problems:
                raise ValueError(self._damaged_checkpoint_message(latest, step, "; ".join(problems)))
            if self.resume_model_from_step_dir and not (latest / DCP_DIRNAME).is_dir():
                raise ValueError(
                    f"resume_from_checkpoint: {latest} has no {DCP_DIRNAME}/ (the sharded model and optimizer "
                    f"state), so it was written by an older torchtune-moe; start a new run from its weights with "
                    f"checkpointer.checkpoint_dir={latest} in another output_dir"
                )
            return str(latest), step

        latest, step = self._on_rank_zero(find)
        ckpt_dir = Path(latest)
        try:
            recipe_state = torch.load(ckpt_dir / RECIPE_STATE_FILENAME, map_location="cpu", weights_only=True)
        except Exception as e:  # torch's message would advise weights_only=False: never do that for a damaged file
            raise ValueError(
                self._damaged_checkpoint_message(
                    ckpt_dir, step, f"{ckpt_dir / RECIPE_STATE_FILENAME} cannot be read ({type(e).__name__})"
                )
            ) from None
        return ckpt_dir, recipe_state

    def _damaged_checkpoint_message(self, ckpt_dir: Path, step: int, what: str) -> str:
        intact = latest_intact_checkpoint(self._output_dir, before_step=step)
        if intact is None:
            advice = "no earlier checkpoint is intact; start anew in another output_dir"
        else:
            advice = (
                f"the earlier checkpoint {intact[1]} (step {intact[0]}) is intact: move {ckpt_dir} aside "
                f"(e.g. `mv {ckpt_dir} {ckpt_dir}.damaged`) and resume again to continue from it"
            )
        return f"resume_from_checkpoint: the checkpoint of step {step} is damaged: {what}. {advice}"

    def _check_config_changes(self, cfg: DictConfig, saved: Optional[dict]) -> list[tuple[str, Any, Any]]:
        """Says which config values differ from the checkpoint's run and what happens to each: new values are
        applied (optimizer hyperparameters are written into the restored optimizer state), except ``seed`` (the
        checkpoint's is kept) and a different ``optimizer._component_`` (refused: its state cannot be loaded).
        Returns the optimizer changes to apply."""
        if saved is None:  # a checkpoint from before configs were saved in recipe_state.pt
            return []
        ignore = _RESUME_IGNORED_KEYS + (("checkpointer.checkpoint_dir",) if self.resume_model_from_step_dir else ())
        changes = config_changes(saved, OmegaConf.to_container(cfg, resolve=True), ignore=ignore)
        self._resume_model_changes = [f"{k}: {o!r} -> {n!r}" for k, o, n in changes if k.startswith("model.")]
        if not changes:
            return []
        for key, old, new in changes:
            if key == "optimizer._component_":
                raise ValueError(
                    f"optimizer._component_: the checkpoint's optimizer state is for {old}, not {new}; resume with "
                    f"the same optimizer, or start a new run in another output_dir"
                )
        lines = []
        for key, old, new in changes:
            if key == "seed":
                what = "kept the checkpoint's: the data order and random streams continue"
            elif key == "expert_parallel_degree":  # absent: the default, 1
                old, new = old or 1, new or 1
                if old == new:
                    continue
                what = "applied: the experts' weights and optimizer state are resharded to it"
            elif key.startswith("optimizer.") and new is UNSET:
                what = "removed from the config: the checkpoint's value is kept"
            else:
                what = "applied: the new value is used from here on"
            lines.append(f"  {key}: {old!r} -> {new!r} ({what})")
        if lines:
            utils.log_rank_zero(
                log, "resume_from_checkpoint: the config differs from the checkpoint's run:\n" + "\n".join(lines)
            )
        return [(k, o, n) for k, o, n in changes if k.startswith("optimizer.") and n is not UNSET]

    def _apply_optimizer_changes(self, changes: list[tuple[str, Any, Any]]) -> None:
        """Writes changed optimizer hyperparameters into the restored param groups (``initial_lr`` too, so that
        an lr schedule scales the new learning rate)."""
        for key, _, new in changes:
            name = key.split(".", 1)[1]
            for group in self._optimizer.param_groups:
                if name in group:
                    group[name] = tuple(new) if isinstance(group[name], tuple) and new is not None else new
                    if name == "lr" and "initial_lr" in group:
                        group["initial_lr"] = new

    def _check_resume_layout(self, state: dict) -> None:
        """Refuses a resume whose data layout differs from the checkpoint's where the position cannot carry over."""
        if state["steps_per_epoch"] != self._steps_per_epoch:
            raise ValueError(
                f"resume_from_checkpoint: the checkpoint ran {state['steps_per_epoch']} steps per epoch, this config "
                f"{self._steps_per_epoch}; keep max_steps_per_epoch, batch_size, gradient_accumulation_steps, the "
                f"dataset and the number of ranks as they were to resume"
            )
        if state.get("dataloader") is not None:
            layout = (self.world_size, self._batch_size, self._gradient_accumulation_steps)
            if tuple(state["data_layout"]) != layout:
                raise ValueError(
                    f"resume_from_checkpoint: the checkpoint was taken mid-epoch with (ranks, batch_size, "
                    f"gradient_accumulation_steps) = {tuple(state['data_layout'])}, now {layout}; keep them to resume"
                )

    def _setup_metric_loggers(self, cfg: DictConfig) -> list:
        """The configured metric logger, plus a DiskLogger in ``{output_dir}/logs`` unless it is one already
        (``tune-moe plot`` reads those files)."""
        logs_dir = self._output_dir / "logs"
        loggers = []
        if cfg.get("metric_logger", None) is not None:
            loggers.append(instantiate("metric_logger", cfg.metric_logger))
        if not any(isinstance(lg, DiskLogger) and Path(lg.log_dir).absolute() == logs_dir for lg in loggers):
            loggers.append(DiskLogger(log_dir=str(logs_dir)))
        return loggers

    def _build_model(self, cfg: DictConfig, from_scratch: bool) -> torch.nn.Module:
        """Builds the model once: from scratch on the device with ``torch.manual_seed(seed)`` (the same on every
        rank, so one process and N processes start from the same weights), else on the meta device (weights are
        loaded later). A bad builder argument stops here, before any checkpoint is read."""
        if from_scratch:
            devices = [self._device] if self._device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                with training.set_default_dtype(self._dtype), self._device:
                    model = instantiate("model", cfg.model)
        else:
            with training.set_default_dtype(self._dtype), torch.device("meta"):
                model = instantiate("model", cfg.model)
        self._moe_layers = list(moe_layers(model))  # names before any wrapping
        check_model(model, cfg, len(self._moe_layers), self.world_size)
        return model

    def _load_model_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """The checkpoint's full model state dict, only for a checkpointer that cannot read slices; else None.

        None when training from scratch, when resuming (the weights come from the checkpoint's ``distcp/``
        shards, :meth:`_load_sharded_state`), and for checkpointers with ``load_sharded(model)``
        (``MoECheckpointer``, ``HFMoECheckpointer``): :meth:`_setup_model` then has every rank read only the
        slices it owns, after sharding. For another checkpointer only rank 0 reads the checkpoint; the other ranks
        get placeholders of the same keys, shapes and dtypes (``torch.empty``: no resident host memory), and
        loading distributes each tensor from rank 0.
        """
        resuming_from_shards = self._resume_from_checkpoint and self.resume_model_from_step_dir
        if self._from_scratch or resuming_from_shards or hasattr(self._checkpointer, "load_sharded"):
            return None
        state_dict = self._read_checkpoint() if self._is_rank_zero else None
        if self.world_size == 1:
            return self._no_weights_check(state_dict)
        layout = [None if state_dict is None else {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()}]
        dist.broadcast_object_list(layout, src=0)
        if layout[0] is None or self._is_rank_zero:
            return self._no_weights_check(state_dict)
        return {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in layout[0].items()}

    @staticmethod
    def _no_weights_check(state_dict: Optional[dict]) -> Optional[dict]:
        if state_dict is None:
            raise ValueError(
                "checkpointer: checkpoint_dir is set but the checkpointer returned no weights "
                "(Checkpointer.load_checkpoint must return {'model': state_dict})"
            )
        return state_dict

    def _read_checkpoint(self) -> Optional[dict[str, torch.Tensor]]:
        return self._checkpointer.load_checkpoint().get(MODEL_KEY)

    def _resume_mismatch_message(self, what: Path, error: BaseException) -> str:
        """Why a resumed checkpoint ``what`` (which passed the integrity checks) does not load into this model:
        the loader's last line, and the ``model.*`` config values changed since the run that saved it."""
        detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        changed = getattr(self, "_resume_model_changes", [])
        since = f"; model options changed since that run: {', '.join(changed)}" if changed else ""
        return (
            f"resume_from_checkpoint: {what} does not fit this model and optimizer ({detail}){since}; resume with "
            f"the model and optimizer options of the run that saved it"
        )

    def _load_sharded_state(self) -> None:
        """Resume: every rank reads its shards of the model (router state included) and of the optimizer state
        from ``{resume_dir}/distcp`` (DCP reshards when the world size or the mesh changed)."""
        t0 = time.perf_counter()
        try:
            load_training_state(self._model, self._optimizer, self._resume_dir / DCP_DIRNAME)
        except ValueError:  # load_training_state's own message, complete
            raise
        except Exception as e:  # its files passed checkpoint_problems: the model or optimizer differ
            raise ValueError(self._resume_mismatch_message(self._resume_dir / DCP_DIRNAME, e)) from e
        utils.log_rank_zero(log, f"Loaded the sharded training state in {time.perf_counter() - t0:.1f}s")

    def _setup_model(
        self,
        model: torch.nn.Module,
        model_state_dict: Optional[dict[str, torch.Tensor]],
        reshard_after_forward: bool,
        custom_sharded_layers: Optional[list[str]],
    ) -> torch.nn.Module:
        """Applies freezing, compile, activation checkpointing and FSDP2 (with ``fsdp_cpu_offload``, FSDP2's
        ``CPUOffloadPolicy``) to the built model, and loads the weights into the meta-device model after sharding:
        with ``model_state_dict`` (a checkpointer without ``load_sharded``) the full state dict goes into the
        shards, as torchtune does; else the model is allocated (parameters on the CPU under offload) and, unless
        resuming (:meth:`_load_sharded_state` follows), every rank reads its slices (``checkpointer.load_sharded``).
        """
        t0 = time.perf_counter()
        if model_state_dict is not None:
            try:
                check_state_dict(model, model_state_dict)
            except ValueError as e:
                changed = getattr(self, "_resume_model_changes", [])  # set on resume only
                if not changed:
                    raise
                raise ValueError(
                    f"{e}\n  resume_from_checkpoint: model options changed since the checkpoint's run: "
                    f"{', '.join(changed)}; resume with the model options of the run that saved it"
                ) from e
        if not self._moe_layers:
            log.warning("model: the model has no MoE layer; training it as a dense model")
        if self._freeze_router:
            for module in model.modules():
                if isinstance(module, Router):
                    module.requires_grad_(False)

        if self._enable_fp8_training:  # before compile and FSDP2, as torchao requires
            converted = convert_to_float8_training(model, self._fp8_recipe_name)
            recipe = self._fp8_recipe_name or DEFAULT_FP8_RECIPE
            utils.log_rank_zero(log, f"enable_fp8_training: {converted} dense linear layers in fp8 ({recipe})")
        if self._compile.model:
            # Lets dynamo trace ops whose output size depends on data, as causal expert choice's kept rows
            # (torchtune_moe.modules.dispatch_combine): each layer then stays one graph instead of breaking there.
            torch._dynamo.config.capture_dynamic_output_shape_ops = True
            # the decoder layers and the final norm; with compile.cuda_graphs the layers replay as CUDA graphs
            compile_model(model, verbose=self._is_rank_zero, cuda_graphs=self._compile.cuda_graphs)
        if self._enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        if self._sharded:
            dp_mesh, expert_mesh = init_meshes(self._device.type, self.world_size, self._expert_parallel_degree)
            if expert_mesh is not None:  # expert parallelism: the experts first, as FSDP2 units of their own
                shard_experts(model, expert_mesh, reshard_after_forward)
            training.shard_model(
                model=model,
                shard_conditions=[partial(training.get_shard_conditions, names_to_match=custom_sharded_layers)],
                cpu_offload=self._fsdp_cpu_offload,
                reshard_after_forward=reshard_after_forward,
                dp_mesh=dp_mesh,
            )
            if hasattr(self._loss_fn, "set_model_output"):
                # LinearCrossEntropyLoss applies the output projection after the model's forward: the root unit
                # (embeddings, final norm, output) keeps its gathered weights until the backward, which needs them
                # at once anyway (FSDP2's own default for the root, which torchtune's explicit flag overrides).
                model.set_reshard_after_forward(False, recurse=False)

        if model_state_dict is not None:
            with training.set_default_dtype(self._dtype), self._device:
                for m in model.modules():
                    if hasattr(m, "rope_init"):  # RoPE caches are not in the state dict
                        m.rope_init()
            params_sd = load_buffers(model, model_state_dict, self._device)
            # strict=False: check_state_dict has already refused any mismatch but absent router buffers.
            training.load_from_full_model_state_dict(
                model, params_sd, self._device, strict=False, cpu_offload=self._fsdp_cpu_offload
            )
            materialize_meta_buffers(model, self._device)
            if self.world_size > 1:  # the other ranks hold placeholders (_load_model_state_dict): rank 0's buffers
                for buf in model.buffers():
                    dist.broadcast(buf, src=0)
        elif not self._from_scratch:
            param_device = torch.device("cpu") if self._fsdp_cpu_offload else self._device
            with training.set_default_dtype(self._dtype):
                materialize_model(model, param_device, self._device)
            if not (self._resume_from_checkpoint and self.resume_model_from_step_dir):
                read = self._checkpointer.load_sharded(model)
                total = sum(v.numel() for v in model.state_dict().values())
                log.info(f"rank {self.rank}: read {read:,} of the model's {total:,} values from the checkpoint")
        training.validate_no_params_on_meta_device(model)

        utils.log_rank_zero(
            log,
            f"Model: {sum(p.numel() for p in model.parameters()):,} parameters, "  # DTensor.numel() is the global size
            f"{len(self._moe_layers)} MoE layers, dtype {self._dtype}, "
            f"{'FSDP2 over ' + str(self.world_size) + ' ranks' if self._sharded else str(self._device)}"
            f"{', experts split over ' + str(self._expert_parallel_degree) + ' ranks (expert parallelism)' if self._expert_parallel_degree > 1 else ''}"
            f"{', parameters, gradients and optimizer states offloaded to the CPU' if self._fsdp_cpu_offload else ''}; "
            f"set up in {time.perf_counter() - t0:.1f}s",
        )
        if self._is_rank_zero and self._device.type == "cuda":
            training.log_memory_stats(training.get_memory_stats(device=self._device))
        if self._distributed:
            dist.barrier()
        return model

    def _setup_optimizer(self, cfg_optimizer: DictConfig, opt_state_dict: Optional[dict]) -> torch.optim.Optimizer:
        params = [p for p in self._model.parameters() if p.requires_grad]
        optimizer = instantiate("optimizer", cfg_optimizer, params)
        if opt_state_dict:
            training.load_from_full_optimizer_state_dict(self._model, optimizer, opt_state_dict, self._device)
        return optimizer

    def _setup_data(self, cfg_dataset, shuffle: bool, batch_size: int, collate_fn: str):
        """The dataset (checked now: a missing column, a null field or a bad data file stops setup naming it),
        its sampler and dataloader, with routing replay's column when configured."""
        nodes = list(cfg_dataset) if isinstance(cfg_dataset, ListConfig) else [cfg_dataset]
        keys = [f"dataset[{i}]" for i in range(len(nodes))] if isinstance(cfg_dataset, ListConfig) else ["dataset"]
        parts = []
        for key, node in zip(keys, nodes):
            ds = build_dataset(key, node, self._tokenizer)
            packed = node.get("packed", False)
            rows = None if packed else load_raw_rows(node)
            check_dataset(key, ds, rows)
            if self._replay_column is not None:
                if packed:
                    raise ValueError("replay_routing_column: routing replay does not support packed datasets")
                if self._replay_column not in ds[0]:
                    source_rows = rows if rows is not None else getattr(ds, "rows", None)
                    columns = getattr(source_rows, "column_names", None) or (
                        sorted(source_rows[0]) if source_rows else []
                    )
                    if self._replay_column not in columns:
                        raise ValueError(
                            f"replay_routing_column: {key} has no column {self._replay_column!r} "
                            f"(sample keys: {sorted(ds[0])}; raw columns: {list(columns)})"
                        )
                    ds = RawColumn(ds, source_rows, self._replay_column)
            parts.append(RowErrors(ds, key))
        packed = [bool(node.get("packed", False)) for node in nodes]
        if any(packed) and not all(packed):
            raise ValueError("dataset: packed and unpacked datasets cannot be mixed (set packed the same in all)")
        packed = packed[0]
        if self._compile.cuda_graphs and not packed:
            utils.log_rank_zero(
                log,
                "compile.cuda_graphs: true with an unpacked dataset records new graphs for each batch length (padded "
                "per batch); dataset.packed: true gives every batch one shape",
            )
        ds = parts[0] if len(parts) == 1 else ConcatDataset(datasets=parts)
        if "left_pad_sequence" in collate_fn:
            raise ValueError("collate_fn: left_pad_sequence is for inference only")
        collate = (
            padded_collate_packed
            if packed
            else partial(
                _get_component_from_path(collate_fn),
                padding_idx=self._tokenizer.pad_id,
                ignore_idx=self._loss_fn.ignore_index,
            )
        )
        if self._replay_column is not None:
            collate = partial(collate_with_routing, collate_fn=collate, column=self._replay_column)
        sampler = StatefulDistributedSampler(
            ds, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=self.seed
        )
        dataloader = StatefulDataLoader(
            dataset=ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=True
        )
        return sampler, dataloader

    def _load_recipe_state(self, state: dict) -> None:
        """Restores progress and the dataloader position from ``recipe_state.pt`` (layout checked before)."""
        self.global_step = state["global_step"]
        self.epochs_run = state["epochs_run"]
        self.steps_run_in_epoch = state["steps_run_in_epoch"]
        self.skipped_steps = state.get("skipped_steps", 0)
        if self.seed != state["seed"]:
            log.warning(f"seed: the checkpoint used seed {state['seed']}; using it instead of {self.seed}")
            self.seed = state["seed"]
            self._sampler.seed = self.seed
        if state.get("dataloader") is not None:
            self._dataloader.load_state_dict(state["dataloader"])

    # ----------------------------------------------------------------------------------------------- training

    def _forward_backward(self, batch: dict[str, torch.Tensor]) -> None:
        """One micro-batch: forward (under routing replay if configured), loss, backward with the loss weighted
        by the micro-batch's label tokens; accumulates the step's statistics in ``self._step_acc``."""
        utils.batch_to_device(batch, self._device)
        routing_BSLK = batch.pop(self._replay_column) if self._replay_column is not None else None
        labels = batch.pop("labels")
        # Shift labels: position s predicts token s + 1; the last position predicts nothing.
        labels = torch.hstack((labels[..., 1:], self._ignore_labels_cache[: labels.shape[0]]))
        num_tokens = (labels != self._loss_fn.ignore_index).sum()
        num_inputs = (batch["tokens"] != self._tokenizer.pad_id).sum()

        if self._compile.cuda_graphs:
            # A new training pass for the layers' CUDA graphs: their outputs of the previous pass may be overwritten
            # from here on (everything kept from them is a copy: the statistics below, the aux losses' values).
            torch.compiler.cudagraph_mark_step_begin()
        replay = contextlib.nullcontext()
        if routing_BSLK is not None:
            replay = replay_routing(self._model, RoutingRecord.from_array(routing_BSLK.flatten(0, 1)))
        with replay:
            outputs = self._model(**batch)  # logits, their chunks, or hidden states (LinearCrossEntropyLoss)
        if not isinstance(outputs, list):  # CEWithChunkedOutputLoss takes the list of chunks
            outputs = outputs.reshape(-1, outputs.size(-1))
            labels = labels.reshape(-1)
        ce_loss = self._loss_fn(outputs, labels)
        del outputs
        aux_loss = collect_aux_loss(self._model).to(ce_loss.dtype)
        # Both terms weighted by this micro-batch's label tokens; _finish_accumulation divides the gradients by
        # the step's total, as torchtune does for the cross-entropy.
        ((ce_loss + aux_loss) * num_tokens).backward()

        self._expert_load.update()
        named = self._named_aux_losses()
        stats = torch.stack(
            [
                ce_loss.detach().double() * num_tokens,
                aux_loss.detach().double() * num_tokens,
                num_tokens.double(),
                num_inputs.double(),
                *[v.double() * num_tokens for v in named],
            ]
        )
        self._step_acc = stats if self._step_acc is None else self._step_acc + stats

    def _named_aux_losses(self) -> list[torch.Tensor]:
        """Per aux-loss name (sorted; fixed at the first forward), the mean unweighted value over MoE layers."""
        by_name: dict[str, list[torch.Tensor]] = {}
        for _, layer in self._moe_layers:
            for name, value in layer.aux_losses.items():
                by_name.setdefault(name, []).append(value.detach().double())
        if self._aux_names is None:
            self._aux_names = sorted(by_name)
        zero = torch.zeros((), dtype=torch.float64, device=self._device)
        return [torch.stack(by_name[n]).mean() if n in by_name else zero for n in self._aux_names]

    def _finish_accumulation(self) -> tuple[dict[str, float], Optional[float]]:
        """Ends a step's accumulation: sums the statistics over ranks, takes the gradients' norm, divides the
        gradients by the step's label tokens (times the world size: FSDP2 averages gradients over ranks; the routed
        experts' by the expert-parallel degree too) and clips them to ``clip_grad_norm``, in one pass or in the
        compiled optimizer step's update (:func:`~torchtune_moe.training.scale_and_clip_grads`). Returns the step's
        losses and the total gradient norm before clipping (None: no gradients)."""
        stats = self._step_acc
        self._step_acc = None
        if self._distributed:
            dist.all_reduce(stats)
        groups = gradient_groups(self._model, self._expert_parallel_degree)
        norms = grad_norms(groups, stats.device)
        values = (stats if norms is None else torch.cat([stats, norms.to(stats.dtype)])).tolist()  # the host waits
        n = max(values[2], 1.0)
        grad_norm = None
        if groups:
            grad_norm = scale_and_clip_grads(
                groups, values[stats.numel():], self.world_size / n, self._clip_grad_norm, self._optimizer
            )
        out = {
            "loss": (values[0] + values[1]) / n,
            "ce_loss": values[0] / n,
            "aux_loss": values[1] / n,
            "num_tokens": values[2],
            "num_inputs": values[3],
        }
        for name, v in zip(self._aux_names or [], values[4 : stats.numel()]):
            out[f"aux/{name}"] = v / n
        return out, grad_norm

    def train(self) -> None:
        """The training loop. Each optimizer step checks the loss and gradient norm before stepping: a non-finite
        value stops the run (or skips the step, up to ``max_skipped_nonfinite_steps``), so no update and no
        checkpoint ever comes from it."""
        if self._device.type == "cuda":
            training.cleanup_before_training()
        else:
            gc.collect()
        self._optimizer.zero_grad(set_to_none=True)
        self._train_start = time.perf_counter()
        self._window = LogWindow()
        try:
            self._train_epochs()
        except TrainingStopped:
            if self._window.steps:  # show the steps that led there (every rank stops at the same step)
                self._log_window(self._window)
            raise
        self._train_time = time.perf_counter() - self._train_start

    def _train_epochs(self) -> None:
        """The epochs and steps of :meth:`train`; the current logging window is ``self._window``."""
        window = self._window
        for curr_epoch in range(self.epochs_run, self.total_epochs):
            self._sampler.set_epoch(curr_epoch)
            pbar = tqdm(
                total=self._steps_per_epoch,
                initial=self.steps_run_in_epoch,
                disable=not self._is_rank_zero,
                dynamic_ncols=True,
                leave=False,
            )
            for idx, batch in enumerate(self._dataloader):
                self._forward_backward(batch)
                if (idx + 1) % self._gradient_accumulation_steps != 0:
                    continue
                step, grad_norm = self._finish_accumulation()
                finite = all_finite([step["loss"], grad_norm])
                if finite:
                    self._optimizer.step()
                else:
                    self._skip_nonfinite_step(step["loss"], grad_norm)
                self._expert_load.end_step(keep=finite)  # a skipped step's routing is not in the expert load
                self._optimizer.zero_grad(set_to_none=True)
                update_routers(self._model)  # every rank: all-reduces the routers' accumulated load statistics
                if self._lr_scheduler is not None:
                    self._lr_scheduler.step()
                self.global_step += 1
                self.steps_run_in_epoch += 1
                if finite:
                    self.loss_history.append((self.global_step, step["loss"]))
                    window.add(step, grad_norm)

                pbar.update(1)
                pbar.set_description(f"{curr_epoch + 1}|{self.global_step}|Loss: {step['loss']:.4f}")
                if self.global_step % self._log_every_n_steps == 0 and window.steps:
                    self._log_window(window)
                    window = self._window = LogWindow()

                epoch_done = self.steps_run_in_epoch == self._steps_per_epoch
                if epoch_done:
                    break
                if self._save_every_n_steps and self.global_step % self._save_every_n_steps == 0:
                    self.save_checkpoint(epoch_done=False)
            pbar.close()
            self.epochs_run += 1
            self.steps_run_in_epoch = 0
            if window.steps:  # the last, partial logging window: logged before the save, which may fail
                self._log_window(window)
                window = self._window = LogWindow()
            self.save_checkpoint(epoch_done=True)

    def _skip_nonfinite_step(self, loss: float, grad_norm: Optional[float]) -> None:
        """A step whose loss or gradient norm is not finite: its gradients and router statistics are dropped and
        the optimizer does not step; past ``max_skipped_nonfinite_steps`` such steps, the run stops."""
        step = self.global_step + 1
        what = f"loss {loss}" + ("" if grad_norm is None else f", gradient norm {grad_norm}")
        self.skipped_steps += 1
        if self.skipped_steps > self._max_skipped_nonfinite:
            allowed = self._max_skipped_nonfinite
            raise TrainingStopped(
                f"step {step}: non-finite {what}; stopped before the optimizer step, so the model and the "
                f"checkpoints are not touched"
                + (f" ({allowed} non-finite steps were already skipped)" if allowed else "")
                + f"; {last_good_checkpoint_note(self._output_dir)}. Lower optimizer.lr, set clip_grad_norm, or "
                f"allow rare spikes with max_skipped_nonfinite_steps"
            )
        for module in self._model.modules():  # the step's router statistics are as bad as its loss
            if isinstance(module, Router):
                for name, buf in module.named_buffers(recurse=False):
                    if name in module._non_persistent_buffers_set:
                        buf.zero_()
        utils.log_rank_zero(
            log,
            f"step {step}: non-finite {what}; step skipped ({self.skipped_steps} of "
            f"max_skipped_nonfinite_steps={self._max_skipped_nonfinite})",
        )

    def _log_window(self, window: LogWindow) -> None:
        """Logs the steps since the previous log (all ranks take part: the expert load is all-reduced)."""
        load = self._expert_load.window()
        if not self._is_rank_zero:
            return
        metrics = window.metrics(self.world_size)
        metrics["lr"] = float(get_lr(self._optimizer))  # a 0-dim tensor under compile_optimizer_step
        if self._log_peak_memory_stats:
            metrics.update(peak_memory_stats(self._device))
        metrics.update(load.metrics(detailed=self._log_expert_load == "detailed"))
        for logger in self._metric_loggers:
            logger.log_dict(metrics, step=self.global_step)
        append_expert_load(self._output_dir, load.record(self.global_step))

        aux = f" (ce {metrics['ce_loss']:.4f} + aux {metrics['aux_loss']:.4f})" if metrics["aux_loss"] else ""
        mem = ""
        if "peak_memory_alloc" in metrics:
            mem = f"  peak mem {metrics['peak_memory_alloc']:.2f} GiB"
        elif "peak_memory_rss" in metrics:
            mem = f"  peak RSS {metrics['peak_memory_rss']:.2f} GiB"
        total = self.total_epochs * self._steps_per_epoch
        lines = [
            f"step {self.global_step:>{len(str(total))}}/{total}  loss {metrics['loss']:.4f}{aux}  "
            f"lr {metrics['lr']:.2e}  {format_rate(metrics['tokens_per_second_per_gpu'])} tok/s/device{mem}"
        ]
        if load.names and len(load.names) <= _MAX_CONSOLE_LAYERS or self._log_expert_load == "detailed":
            lines += load.console_lines()
        elif load.names:
            lines.append(
                f"  expert load over {len(load.names)} MoE layers: worst max/mean "
                f"{metrics['expert_load/max_over_mean']:.2f}, dead experts {metrics['expert_load/dead_experts']}, "
                f"mean router entropy {metrics['expert_load/router_entropy']:.2f}"
            )
        tqdm.write("\n".join(lines))

    # ----------------------------------------------------------------------------------------------- saving

    def save_checkpoint(self, epoch_done: bool) -> None:
        """Saves ``{output_dir}/step_{global_step}`` atomically; all ranks take part and none gathers the model:

        - ``distcp/``: the model (router state included) and optimizer state, each rank writing its own shards
          (``torch.distributed.checkpoint``); what resuming reads, under any world size;
        - at epoch ends, the model files of the checkpointer (``model.safetensors``, or the Hub format),
          streamed by rank 0 one tensor at a time from the shards (:class:`GatheredStateDict`);
        - ``recipe_state.pt`` (rank 0): progress, the dataloader position, every rank's RNG states, the config.

        A model with a non-finite value is never saved, a full disk leaves the earlier checkpoints as they were,
        and older checkpoints are deleted (``keep_last_n_checkpoints``) only after the new one is in place."""
        t0 = time.perf_counter()
        bad = [local_nonfinite_key(self._model)]
        if self._distributed:
            every = [None] * self.world_size
            dist.all_gather_object(every, bad[0])
            bad = [next((k for k in every if k is not None), None)]
        if bad[0] is not None:
            raise TrainingStopped(
                f"step {self.global_step}: the weight {bad[0]} is not finite; no checkpoint written, none deleted; "
                f"{last_good_checkpoint_note(self._output_dir)}"
            )
        rng = rng_state()
        if self._distributed:
            gathered = [None] * self.world_size if self._is_rank_zero else None
            dist.gather_object(rng, gathered, dst=0)
            rng = gathered
        else:
            rng = [rng]
        final_dir = self._output_dir / checkpoint_dir_name(self.global_step)
        failure: Optional[BaseException] = None
        try:
            self._write_checkpoint(final_dir, rng, epoch_done)
        except Exception as e:
            failure = e
        # Every rank learns how the save went (a rank that failed may be the only one that knows).
        outcome = [(is_out_of_space(failure), f"{type(failure).__name__}: {failure}")] if failure else [None]
        if self._distributed:
            every = [None] * self.world_size
            dist.all_gather_object(every, outcome[0])
            outcome = [next((o for o in every if o is not None), None)]
        if outcome[0] is not None:
            out_of_space, what = outcome[0]
            if out_of_space:
                raise TrainingStopped(
                    f"step {self.global_step}: out of disk space while saving {final_dir}; nothing was replaced "
                    f"(the partial files were deleted); {last_good_checkpoint_note(self._output_dir)}. Free space "
                    f"(or lower keep_last_n_checkpoints) and resume"
                )
            if failure is not None:
                raise failure
            raise TrainingStopped(
                f"step {self.global_step}: another rank failed while saving {final_dir} ({what}); nothing was "
                f"replaced; {last_good_checkpoint_note(self._output_dir)}"
            )
        if self._is_rank_zero:
            self._last_checkpoint = final_dir
            if self._keep_last_n_checkpoints:
                for _, old in list_checkpoints(self._output_dir)[: -self._keep_last_n_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
            tqdm.write(f"Saved checkpoint {final_dir} ({time.perf_counter() - t0:.1f}s)")

    def _recipe_state(self, rng: list, epoch_done: bool) -> dict[str, Any]:
        """What ``recipe_state.pt`` holds: progress, the dataloader position, every rank's RNG states, the config."""
        return {
            "global_step": self.global_step,
            "epochs_run": self.epochs_run,
            "steps_run_in_epoch": self.steps_run_in_epoch,
            "total_epochs": self.total_epochs,
            "steps_per_epoch": self._steps_per_epoch,
            "seed": self.seed,
            "skipped_steps": self.skipped_steps,
            # At an epoch end the next epoch starts afresh; mid-epoch the position within the epoch is kept.
            "dataloader": None if epoch_done else self._dataloader.state_dict(),
            "data_layout": [self.world_size, self._batch_size, self._gradient_accumulation_steps],
            "rng": rng,
            "config": self._config_container,  # compared on resume: changed keys are reported
        }

    def _write_checkpoint(self, final_dir: Path, rng: list, epoch_done: bool) -> None:
        """All ranks: the sharded state, the export (epoch ends) and ``recipe_state.pt`` into a temporary directory
        that rank 0 renames into place once all of it is written (:func:`atomic_directory`)."""
        state = self._recipe_state(rng, epoch_done)
        with contextlib.ExitStack() as stack:
            tmp = [None]
            if self._is_rank_zero:
                try:
                    tmp = [str(stack.enter_context(atomic_directory(final_dir)))]
                except Exception:
                    if self._distributed:  # the other ranks wait for the directory's name
                        dist.broadcast_object_list([None], src=0)
                    raise
            if self._distributed:
                dist.broadcast_object_list(tmp, src=0)
            if tmp[0] is None:
                raise RuntimeError(f"rank 0 could not create the temporary directory for {final_dir}")
            tmp = Path(tmp[0])
            # A collective: a rank that fails makes it raise on every rank.
            save_training_state(self._model, self._optimizer, tmp / DCP_DIRNAME)
            if epoch_done:
                model_sd = self._full_model_state_dict()
                if self._is_rank_zero:
                    try:
                        self._checkpointer.save_checkpoint(model_sd, tmp)
                    finally:
                        model_sd.close()
                else:
                    model_sd.serve()
            if self._is_rank_zero:
                torch.save(state, tmp / RECIPE_STATE_FILENAME)

    def _full_model_state_dict(self) -> GatheredStateDict:
        """The model's state dict as full CPU tensors gathered one key at a time when rank 0 reads it (the other
        ranks serve the gathers): what the checkpointer exports. Rank 0 must ``close()`` it, the others
        ``serve()``."""
        return GatheredStateDict(self._model)

    # ----------------------------------------------------------------------------------------------- the end

    @torch.no_grad()
    def print_samples(self) -> None:
        """Greedy completions of the configured sample prompts, printed as prompt / model answer / expected
        (all ranks run the generation: the model may be sharded)."""
        if self._samples_cfg is None:
            return
        prompts = instantiate("samples.prompts", self._samples_cfg.prompts)
        max_new_tokens = self._samples_cfg.get("max_new_tokens", 32)
        self._model.eval()
        # Generation needs plain logits, not the chunked loss's list of chunks nor the hidden states.
        chunks, skip = self._model.num_output_chunks, getattr(self._model, "skip_output_layer", False)
        self._model.set_num_output_chunks(0)
        self._model.skip_output_layer = False
        rng = torch.Generator(device=self._device).manual_seed(0)
        stops = set(self._tokenizer.stop_tokens)
        # With compile.cuda_graphs the compiled layers would record a graph per decoding shape: generate eagerly.
        stance = torch.compiler.set_stance("force_eager") if self._compile.cuda_graphs else contextlib.nullcontext()
        with stance:
            rows = self._generate_samples(prompts, max_new_tokens, rng, stops)
        self._model.train()
        self._model.set_num_output_chunks(chunks)
        self._model.skip_output_layer = skip
        if self._is_rank_zero:
            print(samples_table(rows), flush=True)

    def _generate_samples(self, prompts, max_new_tokens: int, rng: torch.Generator, stops: set) -> list:
        """(prompt, greedy completion, expected answer) per sample prompt (:meth:`print_samples`)."""
        rows = []
        for item in prompts:
            prompt, expected = prompt_and_expected(item)
            messages = [Message(role="user", content=prompt, masked=True), Message(role="assistant", content="")]
            prompt_ids = self._tokenizer({"messages": messages}, inference=True)["tokens"]
            out, _ = generate(
                self._model,
                torch.tensor(prompt_ids, device=self._device),
                max_generated_tokens=max_new_tokens,
                pad_id=self._tokenizer.pad_id,
                temperature=1.0,
                top_k=1,  # greedy
                stop_tokens=self._tokenizer.stop_tokens,
                rng=rng,
            )
            new_ids = out[0, len(prompt_ids) :].tolist()
            cut = next((i for i, t in enumerate(new_ids) if t in stops), len(new_ids))
            rows.append((prompt, self._tokenizer.decode(new_ids[:cut]), expected))
        return rows

    def print_summary(self) -> None:
        """Where the checkpoints and logs went, and what the loss did."""
        if not self._is_rank_zero:
            return
        lines = [""]
        if self.loss_history:
            first, last = self.loss_history[0][1], self.loss_history[-1][1]
            k = max(1, len(self.loss_history) // 20)
            lines.append(
                f"Trained {len(self.loss_history)} steps in {self._train_time:.0f}s: loss {first:.3f} -> "
                f"{sum(l for _, l in self.loss_history[-k:]) / k:.3f} (mean of the last {k} steps; last {last:.3f})"
            )
        if self.skipped_steps:
            lines.append(f"Skipped {self.skipped_steps} steps with a non-finite loss or gradient norm")
        logger_files = [
            str(Path(lg.path_to_log_file()).absolute()) for lg in self._metric_loggers if isinstance(lg, DiskLogger)
        ]
        if self._last_checkpoint:
            lines.append(f"Checkpoint:  {self._last_checkpoint}")
        lines.append(f"Metric logs: {', '.join(logger_files)}")
        lines.append(f"Expert load: {self._output_dir / 'expert_load.jsonl'}")
        lines.append(f"Plot them:   tune-moe plot {self._output_dir}")
        print("\n".join(lines), flush=True)

    def cleanup(self, wait_for_ranks: bool = True) -> None:
        """Closes the loggers and the process group; with ``wait_for_ranks``, after every rank got here (a rank
        tearing the group down while another still finishes its last collective can abort the other)."""
        for logger in self._metric_loggers:
            logger.close()
        self._metric_loggers = []
        if self._distributed and dist.is_initialized():
            if wait_for_ranks:
                dist.barrier()
            destroy_process_group()


def _is_timeout(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return "timed out" in text or "timeout" in text


def run(recipe_cls: type, cfg: DictConfig, name: str) -> None:
    """Runs a recipe class (this one or one built on it) start to end, turning a refused config, a stopped run or a
    timed-out collective into a message and exit status 1 (``name`` prefixes the message)."""
    try:
        recipe = recipe_cls(cfg=cfg)  # validates the config first, before any work
    except ValueError as e:
        sys.exit(f"{name}: bad config: {e}")
    try:
        recipe.setup(cfg=cfg)
        recipe.train()
        recipe.print_samples()
        recipe.print_summary()
    except (ValueError, TrainingStopped) as e:
        recipe.cleanup(wait_for_ranks=False)  # some ranks may not have got this far
        if recipe._distributed:
            end_distributed_process(f"{name}: {e}")
        sys.exit(f"{name}: {e}")
    except (RuntimeError, dist.DistError) as e:
        if not (recipe._distributed and _is_timeout(e)):
            raise
        timeout = cfg.get("process_group_timeout_s", None)
        within = "torch's default timeout" if timeout is None else f"process_group_timeout_s={timeout:g}s"
        # No cleanup: destroying the process group would wait on the stalled rank.
        sys.exit(
            f"{name}: rank {recipe.rank}: a collective did not complete within {within}, so another "
            f"rank stalled or died (its own output says why); "
            f"{last_good_checkpoint_note(recipe._output_dir)}. ({type(e).__name__}: {str(e).splitlines()[0]})"
        )
    recipe.cleanup()
    if recipe._distributed:
        end_distributed_process(0)  # not the interpreter's teardown: see its docstring


@moe_config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of the recipe.

    Configurable parameters are read in the following order:
        - Parameters specified in config (see available configs through ``tune-moe ls``)
        - Overwritten by arguments from the command-line

    A bad config, a refused resume or output directory, a damaged checkpoint, a non-finite loss, a full disk or a
    collective that times out (``process_group_timeout_s``) ends the process with a message and exit status 1.
    """
    run(MoEFullFinetuneRecipe, cfg, "moe_full_finetune")

if __name__ == "__main__":
    sys.exit(recipe_main())
