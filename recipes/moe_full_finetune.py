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
- optional routing replay from a dataset column (``replay_routing_column``);
- a sample of greedy completions at the end.

Every config key is documented in docs/recipe.md and in the packaged configs' comments.
"""

import contextlib
import gc
import json
import random
import shutil
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.distributed import destroy_process_group, init_device_mesh, init_process_group
from torch.distributed.tensor import DTensor
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
from torchtune_moe.config import Key, boolean, component, integer, number, one_of, section, string
from torchtune_moe.modules import (
    Router,
    RoutingRecord,
    collect_aux_loss,
    moe_layers,
    replay_routing,
    update_routers,
)
from torchtune_moe.training import (
    MODEL_KEY,
    RECIPE_STATE_FILENAME,
    ExpertLoadTracker,
    append_expert_load,
    atomic_directory,
    checkpoint_dir_name,
    clean_module_name,
    find_latest_checkpoint,
    list_checkpoints,
    peak_memory_stats,
    remove_stale_temporaries,
    truncate_expert_load,
)

log = utils.get_logger("INFO")
# torchdata's StatefulDataLoader calls a deprecated torch API on every iterator; nothing for users to act on.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

# ---------------------------------------------------------------------------------------------------------------
# The config keys this recipe knows. Anything else is refused before any work (a misspelt key would otherwise be
# silently ignored). Documented in docs/recipe.md.
CONFIG_SPEC: dict[str, Key] = {
    "output_dir": Key(string(), required=True, doc="directory for checkpoints and logs"),
    "model": Key(component(), required=True, doc="the model builder"),
    "tokenizer": Key(component(), required=True, doc="the tokenizer builder"),
    "dataset": Key(component(allow_list=True), required=True, doc="dataset builder(s)"),
    "checkpointer": Key(component(), required=True, doc="checkpointer (torchtune_moe.training.MoECheckpointer)"),
    "optimizer": Key(component(), required=True, doc="optimizer, e.g. torch.optim.AdamW"),
    "loss": Key(component(), required=True, doc="token loss, e.g. torch.nn.CrossEntropyLoss"),
    "batch_size": Key(integer(1), required=True, doc="micro-batch size per device"),
    "epochs": Key(integer(1), required=True, doc="number of epochs"),
    "lr_scheduler": Key(component(), nullable=True, recipe_kwargs=("num_training_steps", "last_epoch")),
    "metric_logger": Key(component(), nullable=True),
    "collate_fn": Key(string()),
    "seed": Key(integer(0), nullable=True),
    "shuffle": Key(boolean()),
    "device": Key(one_of("cpu", "cuda", "xpu", "npu", "mps")),
    "dtype": Key(one_of("fp32", "bf16")),
    "gradient_accumulation_steps": Key(integer(1)),
    "max_steps_per_epoch": Key(integer(1), nullable=True),
    "clip_grad_norm": Key(number(0, strict=True), nullable=True),
    "enable_activation_checkpointing": Key(boolean()),
    "compile": Key(boolean()),
    "freeze_router": Key(boolean()),
    "fsdp_reshard_after_forward": Key(boolean()),
    "custom_sharded_layers": Key(lambda v: None if isinstance(v, list) else "a list of module names", nullable=True),
    "log_every_n_steps": Key(integer(1)),
    "log_expert_load": Key(one_of("brief", "detailed")),
    "log_peak_memory_stats": Key(boolean()),
    "save_every_n_steps": Key(integer(1), nullable=True),
    "keep_last_n_checkpoints": Key(integer(1), nullable=True),
    "resume_from_checkpoint": Key(boolean()),
    "replay_routing_column": Key(string(), nullable=True),
    "samples": Key(
        section(),
        nullable=True,
        children={
            "prompts": Key(component(), required=True, doc="builder returning the prompts"),
            "max_new_tokens": Key(integer(1)),
        },
    ),
}

# Console lines show every MoE layer's expert load up to this many layers (beyond: a one-line summary).
_MAX_CONSOLE_LAYERS = 8


def _collate_with_routing(batch: list[dict], *, collate_fn, column: str) -> dict:
    """Collates a batch whose samples carry per-token routing ``[S_b, L, K]`` in ``column`` (nested lists, an
    array, or their JSON string); the routing is checked against each sample's token count, padded to the
    batch's padded length and returned as ``[B, S, L, K]`` under the same key."""
    routing = [sample.pop(column) for sample in batch]
    routing = [json.loads(r) if isinstance(r, str) else r for r in routing]
    lengths = [len(sample["tokens"]) for sample in batch]
    out = collate_fn(batch)
    B, S = out["tokens"].shape
    arr_TLK = RoutingRecord.from_batch(routing, seq_len=S, lengths=lengths).to_array()
    out[column] = arr_TLK.view(B, S, *arr_TLK.shape[1:])
    return out


class _WithColumn(torch.utils.data.Dataset):
    """Adds a raw column of a torchtune SFT-style dataset (which keeps its rows in ``_data``) to each sample:
    their transforms keep only ``tokens``/``mask``/``labels``."""

    def __init__(self, ds, column: str):
        self.ds, self.column = ds, column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: int) -> dict:
        sample = dict(self.ds[idx])
        sample[self.column] = self.ds._data[idx][self.column]
        return sample


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
      **activation checkpointing**, per-layer **torch.compile** (``compile``).
    - **Logging** every ``log_every_n_steps``: loss, ce_loss, aux_loss, ``aux/<name>``, lr, tokens/s, peak
      memory, grad norm, and expert load (``log_expert_load: brief|detailed``) to the metric logger plus always
      a torchtune ``DiskLogger`` in ``{output_dir}/logs`` and ``{output_dir}/expert_load.jsonl``.
    - **Checkpoints** ``{output_dir}/step_{N}`` written atomically at each epoch end and every
      ``save_every_n_steps``; ``resume_from_checkpoint`` continues from the latest one.

    Args:
        cfg (DictConfig): the parsed config.

    Raises:
        ValueError: a bad config (naming the key), before any work.
    """

    def __init__(self, cfg: DictConfig) -> None:
        validate(cfg)
        self._device = utils.get_device(device=cfg.get("device", None))
        self._dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=self._device)

        self._distributed = dist.is_available() and dist.is_torchelastic_launched()
        if self._distributed and not dist.is_initialized():
            backend = training.get_distributed_backend(
                self._device.type, offload_ops_to_cpu=self._device.type != "cpu"
            )
            init_process_group(backend)
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0

        self._output_dir = Path(cfg.output_dir).absolute()
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._log_expert_load = cfg.get("log_expert_load", "brief")
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", True)
        self._save_every_n_steps = cfg.get("save_every_n_steps", None)
        self._keep_last_n_checkpoints = cfg.get("keep_last_n_checkpoints", None)
        self._resume_from_checkpoint = cfg.get("resume_from_checkpoint", False)
        self._gradient_accumulation_steps = cfg.get("gradient_accumulation_steps", 1)
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._enable_activation_checkpointing = cfg.get("enable_activation_checkpointing", False)
        self._compile = cfg.get("compile", False)
        self._freeze_router = cfg.get("freeze_router", False)
        self._replay_column = cfg.get("replay_routing_column", None)

        # Public state, restored from recipe_state.pt on resume.
        self.seed = training.set_seed(seed=cfg.get("seed", None))
        self.epochs_run = 0
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self.global_step = 0
        self.steps_run_in_epoch = 0
        self.loss_history: list[tuple[int, float]] = []  # (step, loss) of every optimizer step, for the summary

    # ----------------------------------------------------------------------------------------------- setup

    def setup(self, cfg: DictConfig) -> None:
        """Builds everything: loggers, checkpointer, model (+ weights), tokenizer, optimizer, loss, data, lr
        scheduler; on resume restores the recipe state from the latest checkpoint."""
        recipe_state = None
        checkpointer_kwargs = {}
        if self._resume_from_checkpoint:
            ckpt_dir = self._find_resume_checkpoint()
            checkpointer_kwargs = self._resume_checkpointer_kwargs(ckpt_dir)
            recipe_state = torch.load(ckpt_dir / RECIPE_STATE_FILENAME, map_location="cpu", weights_only=True)
            self._resume_dir = ckpt_dir

        if self._is_rank_zero:
            self._output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self._output_dir)
            self._metric_loggers = self._setup_metric_loggers(cfg)
            for logger in self._metric_loggers:
                logger.log_config(cfg)

        self._checkpointer = _instantiate("checkpointer", cfg.checkpointer, **checkpointer_kwargs)
        model_state_dict = self._load_model_state_dict()

        self._model = self._setup_model(
            cfg_model=cfg.model,
            model_state_dict=model_state_dict,
            reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
            custom_sharded_layers=cfg.get("custom_sharded_layers", None),
        )
        self._tokenizer = _instantiate("tokenizer", cfg.tokenizer)
        self._optimizer = self._setup_optimizer(cfg.optimizer, recipe_state["optimizer"] if recipe_state else None)

        self._loss_fn = _instantiate("loss", cfg.loss)
        if not hasattr(self._loss_fn, "ignore_index"):
            raise ValueError(f"loss: {type(self._loss_fn).__name__} has no ignore_index (use a cross-entropy loss)")
        if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)

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
            self._load_recipe_state(recipe_state)

        self._lr_scheduler = None
        if cfg.get("lr_scheduler", None) is not None:
            self._lr_scheduler = _instantiate(
                "lr_scheduler",
                cfg.lr_scheduler,
                self._optimizer,
                num_training_steps=self.total_epochs * self._steps_per_epoch,
                last_epoch=self.global_step - 1,
            )

        self._samples_cfg = cfg.get("samples", None)
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
            self._restore_rng(recipe_state.get("rng"))
            utils.log_rank_zero(log, f"Resumed from {self._resume_dir} (step {self.global_step}).")

    def _resume_checkpointer_kwargs(self, ckpt_dir: Path) -> dict[str, Any]:
        """Checkpointer overrides on resume: read the model from the step directory (the LoRA recipe keeps the
        configured base instead)."""
        return {"checkpoint_dir": str(ckpt_dir)}

    def _find_resume_checkpoint(self) -> Path:
        found = [str(find_latest_checkpoint(self._output_dir) or "")] if self._is_rank_zero else [None]
        if self._distributed:
            dist.broadcast_object_list(found, src=0)
        if not found[0]:
            raise ValueError(
                f"resume_from_checkpoint: true, but {self._output_dir} holds no complete checkpoint "
                f"(a step_N directory with {RECIPE_STATE_FILENAME}); set resume_from_checkpoint=false to start anew"
            )
        return Path(found[0])

    def _setup_metric_loggers(self, cfg: DictConfig) -> list:
        """The configured metric logger, plus a DiskLogger in ``{output_dir}/logs`` unless it is one already
        (``tune-moe plot`` reads those files)."""
        logs_dir = self._output_dir / "logs"
        loggers = []
        if cfg.get("metric_logger", None) is not None:
            loggers.append(_instantiate("metric_logger", cfg.metric_logger))
        if not any(isinstance(lg, DiskLogger) and Path(lg.log_dir).absolute() == logs_dir for lg in loggers):
            loggers.append(DiskLogger(log_dir=str(logs_dir)))
        return loggers

    def _load_model_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """The checkpoint's full model state dict, or None when training from scratch.

        Under FSDP2 only rank 0 reads the checkpoint; the other ranks get placeholders of the same keys, shapes
        and dtypes (``torch.empty``: no resident host memory until written). Loading then distributes each
        tensor from rank 0 (``distribute_tensor`` scatters from ``src_data_rank=0``; buffers are broadcast),
        so a node holds one host copy of the model instead of one per rank (~57 GiB each for Qwen3-30B-A3B).
        """
        if self.world_size == 1:
            return self._checkpointer.load_checkpoint().get(MODEL_KEY)
        state_dict = self._checkpointer.load_checkpoint().get(MODEL_KEY) if self._is_rank_zero else None
        layout = [None if state_dict is None else {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()}]
        dist.broadcast_object_list(layout, src=0)
        if layout[0] is None or self._is_rank_zero:
            return state_dict
        return {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in layout[0].items()}

    def _setup_model(
        self,
        cfg_model: DictConfig,
        model_state_dict: Optional[dict[str, torch.Tensor]],
        reshard_after_forward: bool,
        custom_sharded_layers: Optional[list[str]],
    ) -> torch.nn.Module:
        """Builds the model, applies freezing, compile, activation checkpointing and FSDP2, and loads weights.

        From scratch (no state dict) every rank builds the same random init on its device (seeded with
        ``seed``, independent of the rank) before sharding; with a state dict the model is built on the meta
        device and the full state dict is loaded into the (sharded) parameters, as torchtune does.
        """
        t0 = time.perf_counter()
        if model_state_dict is None:
            devices = [self._device] if self._device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                with training.set_default_dtype(self._dtype), self._device:
                    model = _instantiate("model", cfg_model)
        else:
            with training.set_default_dtype(self._dtype), torch.device("meta"):
                model = _instantiate("model", cfg_model)
            _check_state_dict(model, model_state_dict)

        self._moe_layers = list(moe_layers(model))  # names before any wrapping
        if not self._moe_layers:
            log.warning("model: the model has no MoE layer; training it as a dense model")
        if self._freeze_router:
            for module in model.modules():
                if isinstance(module, Router):
                    module.requires_grad_(False)

        if self._compile:
            training.compile_model(model, verbose=self._is_rank_zero)
        if self._enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        if self.world_size > 1:
            mesh = init_device_mesh(self._device.type, mesh_shape=(self.world_size,), mesh_dim_names=("dp",))
            training.shard_model(
                model=model,
                shard_conditions=[partial(training.get_shard_conditions, names_to_match=custom_sharded_layers)],
                cpu_offload=False,
                reshard_after_forward=reshard_after_forward,
                dp_mesh=mesh["dp"],
            )

        if model_state_dict is not None:
            with training.set_default_dtype(self._dtype), self._device:
                for m in model.modules():
                    if hasattr(m, "rope_init"):  # RoPE caches are not in the state dict
                        m.rope_init()
            # Buffers (router state) are set directly: torchtune's loader would turn them into parameters.
            params_sd = _load_buffers(model, model_state_dict, self._device)
            # strict=False: _check_state_dict has already refused any mismatch but absent router buffers.
            training.load_from_full_model_state_dict(model, params_sd, self._device, strict=False)
            _materialize_meta_buffers(model, self._device)
            if self.world_size > 1:  # the other ranks hold placeholders (_load_model_state_dict): rank 0's buffers
                for buf in model.buffers():
                    dist.broadcast(buf, src=0)
        training.validate_no_params_on_meta_device(model)

        utils.log_rank_zero(
            log,
            f"Model: {sum(p.numel() for p in model.parameters()):,} parameters, "  # DTensor.numel() is the global size
            f"{len(self._moe_layers)} MoE layers, dtype {self._dtype}, "
            f"{'FSDP2 over ' + str(self.world_size) + ' ranks' if self.world_size > 1 else str(self._device)}; "
            f"built in {time.perf_counter() - t0:.1f}s",
        )
        if self._is_rank_zero and self._device.type == "cuda":
            training.log_memory_stats(training.get_memory_stats(device=self._device))
        if self._distributed:
            dist.barrier()
        return model

    def _setup_optimizer(self, cfg_optimizer: DictConfig, opt_state_dict: Optional[dict]) -> torch.optim.Optimizer:
        params = [p for p in self._model.parameters() if p.requires_grad]
        optimizer = _instantiate("optimizer", cfg_optimizer, params)
        if opt_state_dict:
            training.load_from_full_optimizer_state_dict(self._model, optimizer, opt_state_dict, self._device)
        return optimizer

    def _setup_data(self, cfg_dataset, shuffle: bool, batch_size: int, collate_fn: str):
        if isinstance(cfg_dataset, ListConfig):
            ds = ConcatDataset(
                datasets=[_instantiate(f"dataset[{i}]", c, self._tokenizer) for i, c in enumerate(cfg_dataset)]
            )
            packed = getattr(ds, "packed", False)
        else:
            ds = _instantiate("dataset", cfg_dataset, self._tokenizer)
            packed = cfg_dataset.get("packed", False)
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
            if packed:
                raise ValueError("replay_routing_column: routing replay does not support packed datasets")
            if self._replay_column not in ds[0]:
                if self._replay_column in getattr(getattr(ds, "_data", None), "column_names", ()):
                    ds = _WithColumn(ds, self._replay_column)
                else:
                    raise ValueError(
                        f"replay_routing_column: dataset samples have no column {self._replay_column!r} "
                        f"(sample keys: {sorted(ds[0])})"
                    )
            collate = partial(_collate_with_routing, collate_fn=collate, column=self._replay_column)
        sampler = StatefulDistributedSampler(
            ds, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=self.seed
        )
        dataloader = StatefulDataLoader(
            dataset=ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=True
        )
        return sampler, dataloader

    def _load_recipe_state(self, state: dict) -> None:
        """Restores progress and the dataloader position from ``recipe_state.pt``."""
        self.global_step = state["global_step"]
        self.epochs_run = state["epochs_run"]
        self.steps_run_in_epoch = state["steps_run_in_epoch"]
        if self.seed != state["seed"]:
            log.warning(f"seed: the checkpoint used seed {state['seed']}; using it instead of {self.seed}")
            self.seed = state["seed"]
            self._sampler.seed = self.seed
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

        replay = contextlib.nullcontext()
        if routing_BSLK is not None:
            replay = replay_routing(self._model, RoutingRecord.from_array(routing_BSLK.flatten(0, 1)))
        with replay:
            logits = self._model(**batch)
        if not isinstance(logits, list):  # CEWithChunkedOutputLoss takes the list of chunks
            logits = logits.reshape(-1, logits.size(-1))
            labels = labels.reshape(-1)
        ce_loss = self._loss_fn(logits, labels)
        del logits
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

    def _finish_accumulation(self) -> dict[str, float]:
        """Ends a step's accumulation: sums the statistics over ranks and divides the gradients by the step's
        label tokens (times the world size: FSDP2 averages gradients over ranks). Returns the step's losses."""
        stats = self._step_acc
        self._step_acc = None
        if self._distributed:
            dist.all_reduce(stats)
        num_tokens = stats[2]
        training.scale_grads(self._model, self.world_size / num_tokens.clamp(min=1))
        values = stats.tolist()
        n = max(values[2], 1.0)
        out = {
            "loss": (values[0] + values[1]) / n,
            "ce_loss": values[0] / n,
            "aux_loss": values[1] / n,
            "num_tokens": values[2],
            "num_inputs": values[3],
        }
        for name, v in zip(self._aux_names or [], values[4:]):
            out[f"aux/{name}"] = v / n
        return out

    def train(self) -> None:
        """The training loop."""
        if self._device.type == "cuda":
            training.cleanup_before_training()
        else:
            gc.collect()
        self._optimizer.zero_grad(set_to_none=True)
        self._train_start = time.perf_counter()
        window = _Window()

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
                step = self._finish_accumulation()
                grad_norm = None
                if self._clip_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        [p for p in self._model.parameters() if p.requires_grad], max_norm=float(self._clip_grad_norm)
                    )
                    if isinstance(grad_norm, DTensor):
                        grad_norm = grad_norm.full_tensor()
                self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
                update_routers(self._model)  # every rank: all-reduces the routers' accumulated load statistics
                if self._lr_scheduler is not None:
                    self._lr_scheduler.step()
                self.global_step += 1
                self.steps_run_in_epoch += 1
                self.loss_history.append((self.global_step, step["loss"]))
                window.add(step, grad_norm)

                pbar.update(1)
                pbar.set_description(f"{curr_epoch + 1}|{self.global_step}|Loss: {step['loss']:.4f}")
                if self.global_step % self._log_every_n_steps == 0:
                    self._log_window(window)
                    window = _Window()

                epoch_done = self.steps_run_in_epoch == self._steps_per_epoch
                if epoch_done:
                    break
                if self._save_every_n_steps and self.global_step % self._save_every_n_steps == 0:
                    self.save_checkpoint(epoch_done=False)
            pbar.close()
            self.epochs_run += 1
            self.steps_run_in_epoch = 0
            self.save_checkpoint(epoch_done=True)
        self._train_time = time.perf_counter() - self._train_start

    def _log_window(self, window: "_Window") -> None:
        """Logs the steps since the previous log (all ranks take part: the expert load is all-reduced)."""
        load = self._expert_load.window()
        if not self._is_rank_zero:
            return
        metrics = window.metrics(self.world_size)
        metrics["lr"] = get_lr(self._optimizer)
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
            f"lr {metrics['lr']:.2e}  {_fmt_rate(metrics['tokens_per_second_per_gpu'])} tok/s/device{mem}"
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
        """Saves ``{output_dir}/step_{global_step}`` atomically: the model files (by the checkpointer) and
        ``recipe_state.pt``. All ranks take part (gathering the sharded state); rank 0 writes."""
        t0 = time.perf_counter()
        model_sd = self._full_model_state_dict()
        optim_sd = training.get_full_optimizer_state_dict(
            self._model, self._optimizer, self._is_rank_zero, device=self._device
        )
        rng = _rng_state()
        if self._distributed:
            gathered = [None] * self.world_size if self._is_rank_zero else None
            dist.gather_object(rng, gathered, dst=0)
            rng = gathered
        else:
            rng = [rng]
        if self._is_rank_zero:
            state = {
                "optimizer": optim_sd,
                "global_step": self.global_step,
                "epochs_run": self.epochs_run,
                "steps_run_in_epoch": self.steps_run_in_epoch,
                "total_epochs": self.total_epochs,
                "steps_per_epoch": self._steps_per_epoch,
                "seed": self.seed,
                # At an epoch end the next epoch starts afresh; mid-epoch the position within the epoch is kept.
                "dataloader": None if epoch_done else self._dataloader.state_dict(),
                "data_layout": [self.world_size, self._batch_size, self._gradient_accumulation_steps],
                "rng": rng,
            }
            final_dir = self._output_dir / checkpoint_dir_name(self.global_step)
            with atomic_directory(final_dir) as tmp:
                self._checkpointer.save_checkpoint(model_sd, tmp)
                torch.save(state, tmp / RECIPE_STATE_FILENAME)
            if self._keep_last_n_checkpoints:
                for _, old in list_checkpoints(self._output_dir)[: -self._keep_last_n_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
            self._last_checkpoint = final_dir
            tqdm.write(f"Saved checkpoint {final_dir} ({time.perf_counter() - t0:.1f}s)")
        if self._distributed:
            dist.barrier()

    def _full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model state dict on CPU (on rank 0; empty on other ranks when sharded)."""
        if self.world_size > 1:
            return training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
        return {k: v.detach().cpu() for k, v in self._model.state_dict().items()}

    def _restore_rng(self, states: Optional[list]) -> None:
        if not states:
            return
        if len(states) != self.world_size:
            log.warning(
                f"resume_from_checkpoint: RNG states were saved by {len(states)} ranks, now {self.world_size}; "
                f"random streams are not restored"
            )
            return
        s = states[self.rank]
        torch.set_rng_state(s["torch"])
        if s.get("cuda") is not None and self._device.type == "cuda":
            torch.cuda.set_rng_state(s["cuda"], device=self._device)
        random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
        name, keys, pos, has_gauss, cached = s["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))

    # ----------------------------------------------------------------------------------------------- the end

    @torch.no_grad()
    def print_samples(self) -> None:
        """Greedy completions of the configured sample prompts, printed as prompt / model answer / expected
        (all ranks run the generation: the model may be sharded)."""
        if self._samples_cfg is None:
            return
        prompts = _instantiate("samples.prompts", self._samples_cfg.prompts)
        max_new_tokens = self._samples_cfg.get("max_new_tokens", 32)
        self._model.eval()
        chunked = hasattr(self._loss_fn, "num_output_chunks")
        if chunked:  # generation needs plain logits, not the chunked loss's list of chunks
            self._model.set_num_output_chunks(0)
        rows = []
        rng = torch.Generator(device=self._device).manual_seed(0)
        for item in prompts:
            prompt, expected = _prompt_and_expected(item)
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
            stops = set(self._tokenizer.stop_tokens)
            cut = next((i for i, t in enumerate(new_ids) if t in stops), len(new_ids))
            rows.append((prompt, self._tokenizer.decode(new_ids[:cut]), expected))
        self._model.train()
        if chunked:
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)
        if not self._is_rank_zero:
            return
        shown = [(p, repr(a)[1:-1], "" if e is None else str(e)) for p, a, e in rows]  # escapes newlines
        w_p = max(len("prompt"), *(len(r[0]) for r in shown))
        w_a = max(len("model answer"), *(len(r[1]) for r in shown))
        w_e = max(len("expected"), *(len(r[2]) for r in shown))
        lines = ["", "What the model learned (greedy decoding of held-out prompts):", ""]
        lines.append(f"  {'prompt':<{w_p}}  {'model answer':<{w_a}}  {'expected':<{w_e}}")
        correct = 0
        for (prompt, answer, expected), (_, a, e) in zip(rows, shown):
            mark = ""
            if expected is not None:
                ok = answer.strip() == str(expected).strip()
                correct += ok
                mark = "  right" if ok else "  wrong"
            lines.append(f"  {prompt:<{w_p}}  {a:<{w_a}}  {e:<{w_e}}{mark}")
        if any(r[2] is not None for r in rows):
            lines.append(f"  {correct}/{sum(r[2] is not None for r in rows)} answers exactly right")
        print("\n".join(lines), flush=True)

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
        logger_files = [
            str(Path(lg.path_to_log_file()).absolute()) for lg in self._metric_loggers if isinstance(lg, DiskLogger)
        ]
        if getattr(self, "_last_checkpoint", None):
            lines.append(f"Checkpoint:  {self._last_checkpoint}")
        lines.append(f"Metric logs: {', '.join(logger_files)}")
        lines.append(f"Expert load: {self._output_dir / 'expert_load.jsonl'}")
        lines.append(f"Plot them:   tune-moe plot {self._output_dir}")
        print("\n".join(lines), flush=True)

    def cleanup(self) -> None:
        if self._is_rank_zero:
            for logger in self._metric_loggers:
                logger.close()
        if self._distributed and dist.is_initialized():
            destroy_process_group()


class _Window:
    """Sums of the per-step values between two log steps."""

    def __init__(self):
        self.start = time.perf_counter()
        self.steps = 0
        self.sums: dict[str, float] = {}
        self.grad_norm: Optional[float] = None

    def add(self, step: dict[str, float], grad_norm: Optional[torch.Tensor]) -> None:
        self.steps += 1
        for k, v in step.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if grad_norm is not None:
            self.grad_norm = float(grad_norm)

    def metrics(self, world_size: int) -> dict[str, float]:
        """Mean losses over the window's steps, tokens/s per device (non-padding input tokens), last grad norm."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {k: v / self.steps for k, v in self.sums.items() if k not in ("num_tokens", "num_inputs")}
        out["tokens_per_second_per_gpu"] = self.sums.get("num_inputs", 0.0) / elapsed / world_size
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        return out


def _fmt_rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def _prompt_and_expected(item: Any) -> tuple[str, Optional[str]]:
    """A sample prompt given as an object with ``.prompt``/``.answer`` (``TaskExample``), a mapping with
    ``prompt``/``answer`` keys, or a plain string (no expected answer)."""
    if isinstance(item, str):
        return item, None
    if isinstance(item, dict) or OmegaConf.is_dict(item):
        return str(item["prompt"]), item.get("answer")
    return str(item.prompt), getattr(item, "answer", None)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _instantiate(key: str, node: DictConfig, *args: Any, **kwargs: Any) -> Any:
    """``torchtune.config.instantiate`` whose ValueError/TypeError names the config key."""
    try:
        return config.instantiate(node, *args, **kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{key}: {e}") from e


def _check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raises ValueError listing missing, unexpected and mis-shaped keys (before any weight is loaded).

    Router buffers (aux-loss-free ``expert_bias``, Expert Threshold ``thresholds``) may be missing: a Hugging Face
    checkpoint has no slot for them, and they keep their initial values (zeros).
    """
    expected = model.state_dict()
    router_buffers = {
        f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, Router) for b, _ in m.named_buffers()
    }
    absent_buffers = sorted(set(expected) & router_buffers - set(state_dict))
    if absent_buffers:
        utils.log_rank_zero(log, f"checkpointer: router state not in the checkpoint, starting from zeros: {absent_buffers}")
    missing = sorted(set(expected) - set(state_dict) - router_buffers)
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or misshaped:
        raise ValueError(
            "checkpointer: the checkpoint does not match the model.\n"
            f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n  mis-shaped: {misshaped}"
        )


def _load_buffers(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Sets the model's persistent buffers (the same full tensor on every rank: FSDP2 does not shard buffers)
    from ``state_dict``; returns the remaining (parameter) entries."""
    buffers = {}
    for prefix, module in model.named_modules():
        for name in module._buffers:
            if name not in module._non_persistent_buffers_set:
                key = clean_module_name(f"{prefix}.{name}" if prefix else name)
                buffers[key] = (module, name)
    rest = {}
    for key, value in state_dict.items():
        if key in buffers:
            module, name = buffers[key]
            module._buffers[name] = value.to(device)
        else:
            rest[key] = value
    return rest


def _materialize_meta_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Replaces buffers still on the meta device after loading by zeros on ``device``: the routers' buffers
    that state dicts lack (non-persistent load accumulators; router state a Hub checkpoint has no slot for),
    all zero-initialised by the routers. RoPE caches are rebuilt by ``rope_init`` before."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)


def validate(cfg: DictConfig) -> None:
    """Checks the config before any work: known keys, values, components (see ``CONFIG_SPEC``), then builds the
    model on the meta device and the optimizer / lr scheduler on a dummy parameter on the configured device, so
    that a bad builder argument stops here with the key named.

    Raises:
        ValueError: naming the key.
    """
    moe_config.validate_config(cfg, CONFIG_SPEC)
    if cfg.get("compile", False) and cfg.get("dtype", "fp32") != "bf16":
        # torch.compile traces torch's grouped GEMM (the experts) with its meta kernel, which takes bf16 only.
        raise ValueError("compile: true needs dtype: bf16 (torch.compile of the grouped-GEMM experts is bf16-only)")
    with torch.device("meta"):
        model = _instantiate("model", cfg.model)
    if cfg.get("replay_routing_column", None) is not None and not any(True for _ in moe_layers(model)):
        raise ValueError("replay_routing_column: the model has no MoE layer to replay routing into")
    del model
    device = utils.get_device(device=cfg.get("device", None))
    dummy = [torch.nn.Parameter(torch.zeros(1, device=device))]
    optimizer = _instantiate("optimizer", cfg.optimizer, dummy)
    if cfg.get("lr_scheduler", None) is not None:
        _instantiate("lr_scheduler", cfg.lr_scheduler, optimizer, num_training_steps=1, last_epoch=-1)


@moe_config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of the recipe.

    Configurable parameters are read in the following order:
        - Parameters specified in config (see available configs through ``tune-moe ls``)
        - Overwritten by arguments from the command-line
    """
    try:
        recipe = MoEFullFinetuneRecipe(cfg=cfg)  # validates the config first, before any work
    except ValueError as e:
        sys.exit(f"moe_full_finetune: bad config: {e}")
    config.log_config(recipe_name="MoEFullFinetuneRecipe", cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.print_samples()
    recipe.print_summary()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
