"""LoRA and QLoRA fine-tuning of Mixture-of-Experts decoders, on one device or many (FSDP2).

Run it with torchtune's launcher, from any directory::

    tune run moe_lora_finetune --config tiny/lora                                # one device (CPU or one GPU)
    tune run moe_lora_finetune --config qwen3_moe/30b_a3b_lora checkpointer.checkpoint_dir=/path/Qwen3-30B-A3B
    tune run moe_lora_finetune --config qwen3_moe/30b_a3b_qlora ...              # QLoRA: NF4 base, one GPU
    tune run --nproc_per_node 8 moe_lora_finetune --config qwen3_moe/235b_a22b_lora ...   # FSDP2

The model is any builder wrapped by :func:`torchtune_moe.models.lora_model` (``lora_attn_modules``,
``apply_lora_to_mlp``, ``apply_lora_to_experts``, ``apply_lora_to_output``, ``lora_rank``, ``lora_alpha``,
``lora_dropout``, ``quantize_base``): the base weights are frozen, only the adapters train.

Everything else is :mod:`moe_full_finetune`'s recipe (this class subclasses it: config keys and validation, data,
loss with the MoE aux losses, logging, expert-load metrics, resume and its checks, the fail-safe stops), with three
differences:

- base weights come from ``checkpointer`` (Hub directory or native checkpoint) plus fresh adapters, or on resume
  the adapters of the latest ``{output_dir}/step_N/adapter``; the base is always read from the configured
  ``checkpoint_dir``, never from a step directory;
- intermediate checkpoints ``{output_dir}/step_N`` hold the adapter (``adapter/``) and ``recipe_state.pt``
  (optimizer state of the adapters, progress, RNG) only: small, and resuming continues the identical run. They are
  gathered to rank 0 and written by it (the full recipe's ``distcp/`` sharded state is not used: the adapters and
  their optimizer state are small); the save keeps the full recipe's checks (non-finite weights refused, atomic
  directory, a full disk or a failing rank reported with the last good checkpoint);
- the final checkpoint (end of the last epoch) also holds the base weights with the adapters merged in, written
  by the checkpointer (Hub format with ``HFMoECheckpointer``): the merge happens once, there.

The adapter is a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``, per-expert Hub names)
when the checkpointer is ``HFMoECheckpointer``; with ``MoECheckpointer`` it holds torchtune-moe key names.
Documented in docs/lora.md.
"""

import sys
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from torchtune import training, utils
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from moe_full_finetune import MoEFullFinetuneRecipe, run
from torchtune_moe import config as moe_config
from torchtune_moe.models._lora import base_model_config
from torchtune_moe.modules.peft import adapter_state_dict, lora_modules, merged_state_dict, quantize_base_weights
from torchtune_moe.training import (
    LORA_FINETUNE_CONFIG_SPEC,
    MODEL_KEY,
    RECIPE_STATE_FILENAME,
    TrainingStopped,
    atomic_directory,
    first_nonfinite,
    instantiate,
    last_good_checkpoint_note,
    load_native_adapter,
    load_peft_adapter,
    save_native_adapter,
    save_peft_adapter,
)

log = utils.get_logger("INFO")

ADAPTER_DIR = "adapter"  # in each step_N/


class _AdapterCheckpointer:
    """Wraps the configured checkpointer: loads the base weights plus the adapters (fresh or resumed), saves the
    adapters into ``save_dir/adapter`` and, at the end, the merged model through the wrapped checkpointer.

    Args:
        inner: the configured checkpointer (``HFMoECheckpointer`` or ``MoECheckpointer``).
        meta_model: the LoRA model on the meta device (names, shapes, ranks).
        resume_dir (Optional[Path]): step directory to take the adapters from.
        seed (int): seeds fresh adapters (A as ``nn.Linear``'s default init, B zero).
        lora_dropout (float): recorded in adapter_config.json.
    """

    def __init__(self, inner, meta_model: torch.nn.Module, resume_dir: Optional[Path], seed: int, lora_dropout: float):
        self.inner = inner
        self.meta_model = meta_model
        self.resume_dir = resume_dir
        self.seed = seed
        self.lora_dropout = lora_dropout
        self.hf_config = getattr(inner, "config", None)  # HFMoECheckpointer: the base config.json
        if getattr(inner, "model_config", None) is not None:
            inner.model_config = base_model_config(inner.model_config)  # merged weights load into the base model

    def load_adapter(self) -> Optional[dict[str, torch.Tensor]]:
        """The adapters of ``resume_dir`` (None when not resuming)."""
        if self.resume_dir is None:
            return None
        d = self.resume_dir / ADAPTER_DIR
        if self.hf_config is not None:
            return load_peft_adapter(self.meta_model, self.hf_config, d)
        return load_native_adapter(d)

    def fresh_adapter(self) -> dict[str, torch.Tensor]:
        """New adapters, seeded: A uniform in ``±1/sqrt(fan_in)`` (``nn.Linear``'s init, as torchtune's LoRA), B 0."""
        gen = torch.Generator().manual_seed(self.seed)
        out = {}
        for key, meta in adapter_state_dict(self.meta_model).items():
            t = torch.zeros(meta.shape, dtype=meta.dtype)
            if key.endswith(("lora_a.weight", "_a")):
                bound = meta.shape[-1] ** -0.5
                t = (torch.rand(meta.shape, generator=gen) * 2 - 1).mul_(bound).to(meta.dtype)
            out[key] = t
        return out

    def load_checkpoint(self) -> dict[str, Any]:
        base = self.inner.load_checkpoint().get(MODEL_KEY)
        if base is None:
            return {MODEL_KEY: None}
        adapter = self.load_adapter()
        return {MODEL_KEY: {**base, **(adapter if adapter is not None else self.fresh_adapter())}}

    def save_checkpoint(self, payload: dict[str, Any], save_dir: Path) -> None:
        """``payload``: ``{"adapter": adapter state dict, "merged": merged base state dict or None}``."""
        save_dir = Path(save_dir)
        adapter_dir = save_dir / ADAPTER_DIR
        if self.hf_config is not None:
            save_peft_adapter(
                self.meta_model, self.hf_config, adapter_dir, adapter_state=payload["adapter"],
                base_model_name_or_path=str(self.inner.checkpoint_dir), lora_dropout=self.lora_dropout,
            )
        else:
            save_native_adapter(payload["adapter"], adapter_dir)
        if payload["merged"] is not None:
            self.inner.save_checkpoint(payload["merged"], save_dir)


class MoELoRAFinetuneRecipe(MoEFullFinetuneRecipe):
    """LoRA / QLoRA fine-tuning recipe for MoE decoders: :class:`MoEFullFinetuneRecipe` with frozen base weights,
    adapter-only intermediate checkpoints and a merged final checkpoint (see the module docstring).

    Raises:
        ValueError: a bad config (naming the key), before any work: besides the full recipe's checks, a model
            without adapters, or QLoRA on more than one process.
    """

    config_spec = LORA_FINETUNE_CONFIG_SPEC
    # The base always comes from checkpointer.checkpoint_dir (or the seed), the adapters from step_N/adapter and
    # their optimizer state from recipe_state.pt: no distcp/ shards (see _write_checkpoint).
    resume_model_from_step_dir = False

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)  # validates the config and builds the model
        if not any(True for _ in lora_modules(self._model)):
            raise ValueError(
                "model: the model has no LoRA adapter; build it with torchtune_moe.models.lora_model (or use "
                "moe_full_finetune for a full fine-tune)"
            )
        self._quantized = any(getattr(m, "_quantize_base", False) for _, m in lora_modules(self._model))
        if self._quantized and self._sharded:
            raise ValueError(
                "model.quantize_base: QLoRA (NF4 base weights) runs on one device without FSDP2 (one process, "
                "fsdp_cpu_offload: false); use LoRA with FSDP2"
            )
        self._lora_dropout = float(cfg.model.get("lora_dropout", 0.0))
        # A meta-device copy (no memory) names and shapes the adapters in checkpoints: the trained model's module
        # names and shapes change with activation checkpointing, FSDP2 and NF4.
        with torch.device("meta"):
            self._meta_model = instantiate("model", cfg.model)

    def _load_model_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Base weights (from the configured checkpointer, also when resuming) + adapters (fresh or resumed)."""
        self._checkpointer = _AdapterCheckpointer(
            self._checkpointer, self._meta_model, getattr(self, "_resume_dir", None), self.seed, self._lora_dropout
        )
        # _AdapterCheckpointer has no load_sharded: the full recipe's full-state-dict path (rank 0 reads).
        return super()._load_model_state_dict()

    def _read_checkpoint(self) -> Optional[dict[str, torch.Tensor]]:
        try:
            return super()._read_checkpoint()
        except Exception as e:  # the resumed adapter passed checkpoint_problems but does not load
            if not self._resume_from_checkpoint:
                raise
            step = int(self._resume_dir.name.split("_")[1])
            raise ValueError(self._damaged_checkpoint_message(self._resume_dir, step, str(e))) from e

    def _setup_model(self, model, model_state_dict, reshard_after_forward, custom_sharded_layers):
        model = super()._setup_model(model, model_state_dict, reshard_after_forward, custom_sharded_layers)
        if model_state_dict is None and getattr(self, "_resume_dir", None) is not None:
            # Random base (no checkpoint_dir, rebuilt identically from the seed): the adapters from the step dir.
            try:
                adapter = self._checkpointer.load_adapter()
            except Exception as e:
                step = int(self._resume_dir.name.split("_")[1])
                raise ValueError(self._damaged_checkpoint_message(self._resume_dir, step, str(e))) from e
            try:
                if not self._sharded:
                    model.load_state_dict(adapter, strict=False)
                else:
                    training.load_from_full_model_state_dict(model, adapter, self._device, strict=False)
            except RuntimeError as e:  # intact files, another shape (e.g. a changed model.lora_rank)
                raise ValueError(self._resume_mismatch_message(self._resume_dir, e)) from e
        quantize_base_weights(model)  # QLoRA: NF4 once the base weights hold their values
        set_trainable_params(model, get_adapter_params(model))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        utils.log_rank_zero(
            log,
            f"LoRA: {trainable:,} trainable adapter parameters in {sum(1 for _ in lora_modules(model))} modules"
            + (" (base weights in NF4)" if self._quantized else ""),
        )
        if self._is_rank_zero and self._device.type == "cuda":
            training.log_memory_stats(training.get_memory_stats(device=self._device))
        return model

    def save_checkpoint(self, epoch_done: bool) -> None:
        # The merge happens once, in the final checkpoint (end of the last epoch).
        self._save_merged = epoch_done and self.epochs_run == self.total_epochs
        super().save_checkpoint(epoch_done)

    def _write_checkpoint(self, final_dir: Path, rng: list, epoch_done: bool) -> None:
        """All ranks gather the adapters, their optimizer state and at the end the merged weights; rank 0 writes
        them with ``recipe_state.pt`` into a temporary directory renamed into place (:func:`atomic_directory`).
        Replaces the full recipe's sharded ``distcp/`` save; its ``save_checkpoint`` keeps the checks around it."""
        payload = self._full_model_state_dict()
        optim_sd = training.get_full_optimizer_state_dict(
            self._model, self._optimizer, self._is_rank_zero, device=self._device
        )
        if not self._is_rank_zero:
            return
        bad = first_nonfinite(payload) or first_nonfinite(optim_sd, "optimizer.")
        if bad is not None:
            raise TrainingStopped(
                f"step {self.global_step}: {bad} is not finite; no checkpoint written, none deleted; "
                f"{last_good_checkpoint_note(self._output_dir)}"
            )
        state = {"optimizer": optim_sd, **self._recipe_state(rng, epoch_done)}
        with atomic_directory(final_dir) as tmp:
            self._checkpointer.save_checkpoint(payload, tmp)
            torch.save(state, tmp / RECIPE_STATE_FILENAME)

    def _full_model_state_dict(self) -> dict[str, Any]:
        """What :class:`_AdapterCheckpointer` writes: the adapters, and at the end the merged base weights
        (gathered on rank 0 when sharded; all ranks take part). Full CPU tensors, not the full recipe's streamed
        :class:`GatheredStateDict`: the merge needs each base weight with its adapters."""
        merged = None
        if self._sharded:
            if self._save_merged:
                full = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
                adapter = {k: v for k, v in full.items() if "lora" in k}
                merged = merged_state_dict(self._model, full) if self._is_rank_zero else None
            else:
                adapter = training.gather_cpu_state_dict(
                    self._model, self._is_rank_zero, device=self._device, adapter_weights_only=True
                )
        else:
            adapter = {k: v.cpu() for k, v in adapter_state_dict(self._model).items()}
            if self._save_merged:
                merged = merged_state_dict(self._model)
        return {"adapter": adapter, "merged": merged}


@moe_config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of the recipe.

    Configurable parameters are read in the following order:
        - Parameters specified in config (see available configs through ``tune-moe ls``)
        - Overwritten by arguments from the command-line

    Stops as the full recipe does (a message and exit status 1): a bad config, a refused resume or output
    directory, a damaged checkpoint, a non-finite loss, a full disk, a collective that times out.
    """
    run(MoELoRAFinetuneRecipe, cfg, "moe_lora_finetune")

if __name__ == "__main__":
    sys.exit(recipe_main())
