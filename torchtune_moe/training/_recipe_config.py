"""The config keys of the MoE training recipes and their validation, shared by ``moe_full_finetune`` and the
recipes built on it (a LoRA recipe extends :data:`FULL_FINETUNE_CONFIG_SPEC` with its own keys).

Everything here runs before any work: nothing is written and no model is built. Checks that need the model
(its ``max_seq_len``, its MoE layers) run in the recipe right after the model is built (:func:`check_model`),
still before any checkpoint is read.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import torch
from omegaconf import DictConfig
from torchtune import config, utils

from torchtune_moe.config import Key, boolean, component, integer, number, one_of, section, string, validate_config
from torchtune_moe.modules import moe_layers
from torchtune_moe.modules._cute_gemm import check_grouped_gemm_env
from torchtune_moe.modules.expert_parallel import check_expert_parallel_degree
from torchtune_moe.training._fp8 import DEFAULT_FP8_RECIPE, FP8_RECIPES

__all__ = [
    "COMPILE_PARTS",
    "CompilePlan",
    "check_cuda_graphs_world",
    "FULL_FINETUNE_CONFIG_SPEC",
    "LORA_FINETUNE_CONFIG_SPEC",
    "instantiate",
    "validate_recipe_config",
    "check_model",
    "compile_plan",
    "recipe_device",
]

#: What ``compile`` can compile, named as torchtune's recipes name them: each decoder layer, the loss, and the
#: optimizer step. ``compile: true`` is all three (the step where it can be compiled, :func:`compile_plan`); a
#: mapping picks them (``model`` and ``loss`` default to true, ``optimizer_step`` to false).
COMPILE_PARTS = ("model", "loss", "optimizer_step")


def _compile_value(value: Any) -> Optional[str]:
    if isinstance(value, bool) or section()(value) is None:
        return None
    return "true, false, or a mapping of " + ", ".join(COMPILE_PARTS + ("cuda_graphs",)) + " (each true or false)"


#: The config keys of ``moe_full_finetune`` (documented in docs/recipe.md). Anything else is refused before any
#: work: a misspelt key would otherwise be silently ignored.
FULL_FINETUNE_CONFIG_SPEC: dict[str, Key] = {
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
    "max_skipped_nonfinite_steps": Key(integer(0)),
    "enable_activation_checkpointing": Key(boolean()),
    "compile": Key(
        _compile_value,
        children={
            **{part: Key(boolean()) for part in COMPILE_PARTS},
            "cuda_graphs": Key(boolean(), doc="replay the compiled decoder layers as CUDA graphs (one GPU)"),
        },
        doc="torch.compile the decoder layers, the loss and the optimizer step",
    ),
    "enable_fp8_training": Key(boolean(), doc="the dense linear layers in fp8 (torchao's Float8Linear)"),
    "fp8_recipe_name": Key(
        one_of(*FP8_RECIPES), nullable=True, doc=f"torchao's fp8 recipe (null: {DEFAULT_FP8_RECIPE})"
    ),
    "freeze_router": Key(boolean()),
    "fsdp_reshard_after_forward": Key(boolean()),
    "expert_parallel_degree": Key(integer(1), doc="ranks each MoE layer's routed experts are split over (1 = off)"),
    "fsdp_cpu_offload": Key(boolean()),
    "custom_sharded_layers": Key(lambda v: None if isinstance(v, list) else "a list of module names", nullable=True),
    "process_group_timeout_s": Key(number(0, strict=True, allow_inf=False), nullable=True),
    "log_every_n_steps": Key(integer(1)),
    "log_expert_load": Key(one_of("brief", "detailed")),
    "log_peak_memory_stats": Key(boolean()),
    "save_every_n_steps": Key(integer(1), nullable=True),
    "keep_last_n_checkpoints": Key(integer(1), nullable=True),
    "resume_from_checkpoint": Key(boolean()),
    "overwrite_output_dir": Key(boolean()),
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



def _lora_model(value: Any) -> Optional[str]:
    """The LoRA recipe's ``model``: a component; ``torchtune_moe.models.lora_model`` needs its ``base``."""
    problem = component()(value)
    if problem is None and str(value["_component_"]).rsplit(".", 1)[-1] == "lora_model" and "base" not in value:
        problem = "a lora_model with base: the dotted path of a model builder (e.g. torchtune_moe.models.moe)"
    return problem


#: The config keys of ``moe_lora_finetune`` (docs/lora.md): the full recipe's, with ``model`` a LoRA builder
#: (its LoRA arguments, ``lora_rank``, ``lora_alpha``, ..., are checked against ``lora_model``'s signature).
LORA_FINETUNE_CONFIG_SPEC: dict[str, Key] = {
    **FULL_FINETUNE_CONFIG_SPEC,
    "model": Key(_lora_model, required=True, doc="the model builder with adapters (torchtune_moe.models.lora_model)"),
    # The expert adapters ([E, r, in] per layer) are not split over an expert-parallel mesh yet.
    "expert_parallel_degree": Key(one_of(1), doc="1: the LoRA recipe does not split experts over ranks yet"),
}


def instantiate(key: str, node: DictConfig, *args: Any, **kwargs: Any) -> Any:
    """``torchtune.config.instantiate`` whose ValueError/TypeError names the config ``key``."""
    try:
        return config.instantiate(node, *args, **kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{key}: {e}") from e


def validate_recipe_config(cfg: DictConfig, spec: Mapping[str, Key] = FULL_FINETUNE_CONFIG_SPEC) -> None:
    """Checks a recipe config before any work: known keys, value types and ranges (nested sections included),
    components and their arguments (``validate_config``); then the cross-key rules (``compile`` needs bf16,
    ``fsdp_cpu_offload`` needs a GPU and an unfused optimizer, ``model.expert_fp8`` an sm90+ GPU and no LoRA,
    ``enable_fp8_training`` an sm89+ GPU, bf16 and no LoRA,
    ``tokenizer.max_seq_len`` within ``model.max_seq_len``), and builds the optimizer and lr scheduler on a
    dummy parameter so that their arguments (``optimizer.lr=abc``) are refused with the key named. A nullable
    section whose ``_component_`` is null (``lr_scheduler=null`` on the command line, which torchtune's CLI writes
    into the component) is set to null first.

    The model is not built here: the recipe builds it once and calls :func:`check_model`.

    Raises:
        ValueError: naming the key (and the bad value).
    """
    for name, key in spec.items():
        node = cfg.get(name, None)
        if key.nullable and isinstance(node, DictConfig) and "_component_" in node and node._component_ is None:
            # `lr_scheduler=null` on the command line: torchtune's CLI writes it into lr_scheduler._component_ (a
            # section with a component takes a bare value as its component), leaving the section's other keys. A
            # null component can only mean no component: the key is null, as in a YAML file.
            cfg[name] = None
    validate_config(cfg, spec)
    if compile_plan(cfg).model and cfg.get("dtype", "fp32") != "bf16":
        # torch.compile traces torch's grouped GEMM (the experts) with its meta kernel, which takes bf16 only.
        value = cfg.get("compile")
        key = "compile: true" if isinstance(value, bool) else "compile.model: true"
        if not isinstance(value, bool) and "model" not in value:
            key += " (a compile mapping's default)"
        raise ValueError(f"{key} needs dtype: bf16 (torch.compile of the grouped-GEMM experts is bf16-only)")
    _check_cuda_graphs(cfg)
    _check_cpu_offload(cfg)
    _check_expert_fp8(cfg)
    _check_fp8_training(cfg)
    device = utils.get_device(device=cfg.get("device", None))
    # The environment's choice of the experts' grouped GEMMs (TORCHTUNE_MOE_GROUPED_GEMM, modules/_cute_gemm.py).
    check_grouped_gemm_env(device, torch.bfloat16 if cfg.get("dtype", "fp32") == "bf16" else torch.float32)
    tok_len = cfg.tokenizer.get("max_seq_len", None)
    model_len = cfg.model.get("max_seq_len", None)
    if isinstance(tok_len, int) and isinstance(model_len, int) and tok_len > model_len:
        raise ValueError(_seq_len_message(tok_len, model_len))
    dummy = [torch.nn.Parameter(torch.zeros(1, device=device))]
    optimizer = instantiate("optimizer", cfg.optimizer, dummy)
    if cfg.get("lr_scheduler", None) is not None:
        instantiate("lr_scheduler", cfg.lr_scheduler, optimizer, num_training_steps=1, last_epoch=-1)


class CompilePlan(NamedTuple):
    """What the recipe compiles (:data:`COMPILE_PARTS`), and why ``compile: true`` left the optimizer step eager
    (empty when it did not)."""

    model: bool
    loss: bool
    optimizer_step: bool
    eager_step_note: str = ""
    cuda_graphs: bool = False  # the compiled decoder layers replayed as CUDA graphs (compile.cuda_graphs)


def compile_plan(cfg: DictConfig) -> CompilePlan:
    """The parts ``cfg``'s ``compile`` asks for, as torchtune's recipes read it: ``true`` is all three; a mapping
    picks them (``model`` and ``loss`` default to true, ``optimizer_step`` to false).

    ``compile: true`` compiles the optimizer step where it can be compiled (a ``torch.optim`` optimizer on its
    multi-tensor path) and otherwise leaves it eager, saying why in ``eager_step_note``; an explicit
    ``compile.optimizer_step: true`` for such a step is refused.

    Raises:
        ValueError: ``compile.optimizer_step: true`` for a step that cannot be compiled, naming why.
    """
    value = cfg.get("compile", False)
    if isinstance(value, Mapping):
        model, loss, step = (bool(value.get(p, p != "optimizer_step")) for p in COMPILE_PARTS)
        note = _uncompilable_step(cfg) if step else ""
        if note:
            raise ValueError(f"compile.optimizer_step: true, but {note} (or compile.optimizer_step=false)")
        return CompilePlan(model, loss, step, cuda_graphs=bool(value.get("cuda_graphs", False)))
    if not value:
        return CompilePlan(False, False, False)
    note = _uncompilable_step(cfg)
    return CompilePlan(True, True, not note, note)


def _check_cuda_graphs(cfg: DictConfig) -> None:
    """``compile.cuda_graphs`` (torch.compile's ``mode="reduce-overhead"`` for the decoder layers) needs the layers
    compiled, a CUDA device, and none of the features whose work a replayed graph would skip or break: activation
    checkpointing (the recompute inside the backward), CPU offload, gradient accumulation (its ``.grad`` buffers
    would live in the graphs' memory) and routing replay (routes fed from the host per batch).
    The one-process rule is the recipe's (:func:`check_cuda_graphs_world`), which knows the world size."""
    plan = compile_plan(cfg)
    if not plan.cuda_graphs:
        return
    why = None
    if not plan.model:
        why = "compile.model: true (the graphs are the compiled layers')"
    elif _device_type(cfg) != "cuda":
        why = f"device: cuda (this config runs on {_device_type(cfg)})"
    elif cfg.get("enable_activation_checkpointing", False):
        why = "enable_activation_checkpointing: false (a checkpointed layer reruns its forward inside the backward)"
    elif cfg.get("fsdp_cpu_offload", False):
        why = "fsdp_cpu_offload: false (FSDP2's hooks move each layer's weights around it)"
    elif cfg.get("gradient_accumulation_steps", 1) > 1:
        # The layers' weight gradients come out of their backward graphs' memory: accumulating over micro-batches
        # needs .grad buffers kept outside it (torch's advice), which the recipe does not set up yet.
        why = "gradient_accumulation_steps: 1 (accumulation into .grad is not set up for the graphs yet)"
    elif cfg.get("replay_routing_column", None) is not None:
        why = "replay_routing_column: null (replayed routes come with each batch from the host)"
    if why:
        raise ValueError(f"compile.cuda_graphs: true needs {why}; or compile.cuda_graphs=false")


def check_cuda_graphs_world(plan: CompilePlan, world_size: int) -> None:
    """Refuses ``compile.cuda_graphs`` on more than one process: FSDP2 gathers and frees each layer's weights in
    hooks around it, with collectives on their own streams, which a replayed graph would not redo.

    Raises:
        ValueError: naming ``compile.cuda_graphs`` and the world size.
    """
    if plan.cuda_graphs and world_size > 1:
        raise ValueError(
            f"compile.cuda_graphs: true runs on one process (this run has {world_size}: FSDP2's hooks and "
            "collectives around each layer are not replayed by a graph); or compile.cuda_graphs=false"
        )


def _uncompilable_step(cfg: DictConfig) -> str:
    """Why the configured optimizer's step cannot be compiled and what would let it, or an empty string."""
    optimizer = cfg.get("optimizer", None) or {}
    path = str(optimizer.get("_component_", ""))
    if not path.startswith("torch.optim."):
        return (
            f"optimizer._component_ is {path}: only torch.optim optimizers' steps are compiled (torchao's "
            "compile their own)"
        )
    if optimizer.get("fused", False):
        return (
            "optimizer.fused: true runs torch's fused kernel, which torch.compile leaves as it is; set "
            "optimizer.fused=false"
        )
    degree = cfg.get("expert_parallel_degree", 1)
    if path not in ("torch.optim.Adam", "torch.optim.AdamW") and isinstance(degree, int) and degree > 1:
        return (
            f"optimizer._component_ is {path}: with expert_parallel_degree: {degree} the experts' parameters live on "
            "a device mesh of their own, and only Adam's and AdamW's steps are compiled per mesh (a compiled "
            "foreach op takes one mesh)"
        )
    if cfg.get("fsdp_cpu_offload", False):
        return "fsdp_cpu_offload: true steps the optimizer on the CPU"
    # torch takes the multi-tensor (foreach) step by default on a GPU only. Its single-tensor step, compiled,
    # divides by the learning rate and writes NaN at lr 0 (the first warm-up step; pytorch/pytorch#126514).
    foreach = optimizer.get("foreach", None)
    if foreach is False or (foreach is None and _device_type(cfg) == "cpu"):
        return (
            "the single-tensor step (optimizer.foreach: false, or unset on the CPU) writes NaN at lr 0 when "
            "compiled; set optimizer.foreach=true"
        )
    return ""


def recipe_device(cfg: DictConfig) -> torch.device:
    """The device a recipe runs on (torchtune's ``get_device``), refusing a configured ``device`` this machine
    lacks. :func:`validate_recipe_config` leaves that to the recipe, so that a GPU config validates on any machine.

    Raises:
        ValueError: naming ``device``: torchtune hands back the CPU for ``cuda`` on a machine without one, and the
            run would train there unawares (nor would ``compile.optimizer_step``'s GPU default hold).
    """
    device = utils.get_device(device=cfg.get("device", None))
    asked = cfg.get("device", None)
    if asked is not None and torch.device(asked).type != device.type:
        raise ValueError(f"device: {asked}, but this machine has no {asked} device (allowed here: {device.type})")
    return device


def _check_cpu_offload(cfg: DictConfig) -> None:
    """``fsdp_cpu_offload`` keeps parameters, gradients and optimizer states on the CPU (FSDP2's
    ``CPUOffloadPolicy``): it needs an accelerator to offload from and an optimizer that steps on the CPU."""
    if not cfg.get("fsdp_cpu_offload", False):
        return
    if _device_type(cfg) == "cpu":
        raise ValueError(
            "fsdp_cpu_offload: true moves parameters, gradients and optimizer states from the GPU to the CPU; with "
            "device: cpu they are there already (allowed: false, or a GPU device)"
        )
    degree = cfg.get("expert_parallel_degree", 1)
    if isinstance(degree, int) and degree > 1:
        # shard_experts makes the experts FSDP2 units of their own, without the offload policy.
        raise ValueError(
            f"fsdp_cpu_offload: true does not combine with expert_parallel_degree: {degree} (the split experts are "
            "not offloaded); allowed: fsdp_cpu_offload=false, or expert_parallel_degree=1"
        )
    if cfg.optimizer.get("fused", False):
        raise ValueError(
            "optimizer.fused: true steps on the GPU, but fsdp_cpu_offload: true keeps the parameters and optimizer "
            "states on the CPU (allowed with offload: optimizer.fused=false)"
        )


def _check_expert_fp8(cfg: DictConfig) -> None:
    """``model.expert_fp8: true`` (the routed experts' grouped GEMMs in rowwise fp8, ``torch._scaled_grouped_mm``)
    needs a CUDA GPU of compute capability 9.0+, ``dtype: bf16``, model dims that are multiples of 16, and the full
    recipe."""
    if cfg.model.get("expert_fp8", False) is not True:
        return
    _check_fp8_option(
        cfg, "model.expert_fp8", (9, 0), "H100, H200: torch._scaled_grouped_mm",
        lora_why="the adapted experts run their own fused node, in bf16",
    )
    for key in ("embed_dim", "moe_hidden_dim"):
        value = cfg.model.get(key, None)
        if isinstance(value, int) and value % 16:
            raise ValueError(
                f"model.expert_fp8: true needs model.{key} a multiple of 16 (fp8 grouped GEMM rows are 16-byte "
                f"aligned), got {value}"
            )


def _check_fp8_training(cfg: DictConfig) -> None:
    """``enable_fp8_training: true`` (the dense linear layers through torchao's ``Float8Linear``,
    :func:`~torchtune_moe.training.convert_to_float8_training`) needs a CUDA GPU of compute capability 8.9+
    (``torch._scaled_mm``), ``dtype: bf16`` and the full recipe."""
    if cfg.get("enable_fp8_training", False) is not True:
        name = cfg.get("fp8_recipe_name", None)
        if name is not None:  # set alone it would be ignored: the run would train in bf16 unawares
            raise ValueError(
                f"fp8_recipe_name: {name} is set but enable_fp8_training is false, so it would have no effect; "
                f"set enable_fp8_training=true to train the dense layers in fp8, or fp8_recipe_name=null"
            )
        return
    _check_fp8_option(
        cfg, "enable_fp8_training", (8, 9), "H100, H200, L40S: torch._scaled_mm",
        lora_why="the adapted layers are LoRA modules, the frozen base is not trained",
    )


def _check_fp8_option(cfg: DictConfig, key: str, minimum: tuple[int, int], gpus: str, lora_why: str) -> None:
    """What both fp8 options need: the full recipe, a CUDA GPU of compute capability ``minimum`` or above (``gpus``
    names some and the op), ``dtype: bf16``."""
    if _is_lora(cfg):
        raise ValueError(f"{key}: true is not supported with LoRA ({lora_why}); allowed: {key}=false")
    got = _below_capability(cfg, minimum)
    if got is not None:
        raise ValueError(
            f"{key}: true needs a CUDA GPU of compute capability {minimum[0]}.{minimum[1]}+ ({gpus}), got {got}; "
            f"allowed here: {key}=false"
        )
    if cfg.get("dtype", "fp32") != "bf16":
        raise ValueError(
            f"{key}: true needs dtype: bf16 (the fp8 GEMMs take and give bf16), got dtype: {cfg.get('dtype', 'fp32')}"
        )


def _device_type(cfg: DictConfig) -> str:
    """The configured ``device``, or the type of the one torchtune would pick."""
    return cfg.get("device", None) or utils.get_device(None).type


def _is_lora(cfg: DictConfig) -> bool:
    return str(cfg.model.get("_component_", "")).rsplit(".", 1)[-1] == "lora_model"


def _below_capability(cfg: DictConfig, minimum: tuple[int, int]) -> Optional[str]:
    """What the config's device is when it is not a CUDA GPU of compute capability ``minimum`` or above (None
    when it is)."""
    device = utils.get_device(device=cfg.get("device", None))
    if device.type != "cuda":
        return f"device {device.type}"
    if torch.cuda.get_device_capability(device) < minimum:
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return None


def _seq_len_message(tok_len: int, model_len: int) -> str:
    return (
        f"tokenizer.max_seq_len: got {tok_len}, longer than the model's max_seq_len {model_len} (its RoPE table); "
        f"allowed: at most {model_len}"
    )


def check_model(model: torch.nn.Module, cfg: DictConfig, moe_layer_count: int, world_size: int = 1) -> None:
    """Checks that need the built model (on any device, meta included): ``tokenizer.max_seq_len`` within the
    model's ``max_seq_len``, routing replay needs an MoE layer, and ``expert_parallel_degree`` divides the number
    of processes (``world_size``) and every MoE layer's expert count.

    Raises:
        ValueError: naming the key.
    """
    tok_len: Optional[int] = cfg.tokenizer.get("max_seq_len", None)
    model_len = getattr(model, "max_seq_len", None)
    if isinstance(tok_len, int) and isinstance(model_len, int) and tok_len > model_len:
        raise ValueError(_seq_len_message(tok_len, model_len))
    if cfg.get("replay_routing_column", None) is not None and moe_layer_count == 0:
        raise ValueError("replay_routing_column: the model has no MoE layer to replay routing into")
    check_expert_parallel_degree(
        cfg.get("expert_parallel_degree", 1), world_size, [layer.num_experts for _, layer in moe_layers(model)]
    )
