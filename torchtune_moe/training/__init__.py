"""Training utilities for the MoE recipes: checkpointing (interface, native checkpointer, Hugging Face checkpoints
and ``from_hf_pretrained``, atomic saves, integrity checks), expert-load metrics, the recipes' config schema and
validation, the compiled model and optimizer step, fp8 training of the dense layers, state-dict plumbing, RNG
save/restore, console output, and the safety checks that keep a run from losing work. Sharded checkpoints
(``torch.distributed.checkpoint``), slice-wise loading and the layer-by-layer export: ``_sharded_checkpoint``."""

from torchtune_moe.training._checkpointing import (
    MODEL_KEY,
    RECIPE_STATE_FILENAME,
    Checkpointer,
    MoECheckpointer,
    atomic_directory,
    checkpoint_dir_name,
    checkpoint_problems,
    find_latest_checkpoint,
    latest_intact_checkpoint,
    list_checkpoints,
    remove_stale_temporaries,
)
from torchtune_moe.training._compile import compile_model
from torchtune_moe.training._console import LogWindow, format_rate, prompt_and_expected, samples_table
from torchtune_moe.training._fp8 import DEFAULT_FP8_RECIPE, FP8_RECIPES, convert_to_float8_training
from torchtune_moe.training._grads import GradGroup, grad_norms, gradient_groups, scale_and_clip_grads
from torchtune_moe.training._hf_checkpointer import HFMoECheckpointer, from_hf_pretrained
from torchtune_moe.training._metrics import (
    EXPERT_LOAD_FILENAME,
    ExpertLoadTracker,
    ExpertLoadWindow,
    append_expert_load,
    clean_module_name,
    peak_memory_stats,
    truncate_expert_load,
)
from torchtune_moe.training._optimizer_step import compile_optimizer_step
from torchtune_moe.training._peft_files import (
    load_native_adapter,
    load_peft_adapter,
    save_native_adapter,
    save_peft_adapter,
)
from torchtune_moe.training._parallel import end_distributed_process, init_meshes, shard_experts
from torchtune_moe.training._recipe_config import (
    COMPILE_PARTS,
    FULL_FINETUNE_CONFIG_SPEC,
    LORA_FINETUNE_CONFIG_SPEC,
    CompilePlan,
    check_model,
    compile_plan,
    instantiate,
    recipe_device,
    validate_recipe_config,
)
from torchtune_moe.training._rng import restore_rng_state, rng_state
from torchtune_moe.training._sharded_checkpoint import (
    DCP_DIRNAME,
    GatheredStateDict,
    dcp_problems,
    load_training_state,
    local_nonfinite_key,
    read_slices_into,
    save_training_state,
    tensor_meta,
)
from torchtune_moe.training._safety import (
    CONFIG_FILENAME,
    UNSET,
    TrainingStopped,
    all_finite,
    check_output_dir,
    clear_previous_run,
    config_changes,
    first_nonfinite,
    is_out_of_space,
    last_good_checkpoint_note,
    previous_run_files,
)
from torchtune_moe.training._state_dict import check_state_dict, load_buffers, materialize_meta_buffers, materialize_model

__all__ = [
    "end_distributed_process",
    "DEFAULT_FP8_RECIPE",
    "FP8_RECIPES",
    "convert_to_float8_training",
    "Checkpointer",
    "MoECheckpointer",
    "HFMoECheckpointer",
    "from_hf_pretrained",
    "save_peft_adapter",
    "load_peft_adapter",
    "save_native_adapter",
    "load_native_adapter",
    "MODEL_KEY",
    "RECIPE_STATE_FILENAME",
    "atomic_directory",
    "checkpoint_dir_name",
    "checkpoint_problems",
    "find_latest_checkpoint",
    "latest_intact_checkpoint",
    "list_checkpoints",
    "remove_stale_temporaries",
    "EXPERT_LOAD_FILENAME",
    "ExpertLoadTracker",
    "ExpertLoadWindow",
    "append_expert_load",
    "clean_module_name",
    "peak_memory_stats",
    "truncate_expert_load",
    "COMPILE_PARTS",
    "CompilePlan",
    "FULL_FINETUNE_CONFIG_SPEC",
    "LORA_FINETUNE_CONFIG_SPEC",
    "check_model",
    "compile_model",
    "compile_optimizer_step",
    "compile_plan",
    "instantiate",
    "recipe_device",
    "validate_recipe_config",
    "init_meshes",
    "shard_experts",
    "GradGroup",
    "gradient_groups",
    "grad_norms",
    "scale_and_clip_grads",
    "check_state_dict",
    "load_buffers",
    "materialize_meta_buffers",
    "materialize_model",
    "rng_state",
    "restore_rng_state",
    "DCP_DIRNAME",
    "GatheredStateDict",
    "dcp_problems",
    "load_training_state",
    "local_nonfinite_key",
    "read_slices_into",
    "save_training_state",
    "tensor_meta",
    "LogWindow",
    "format_rate",
    "prompt_and_expected",
    "samples_table",
    "CONFIG_FILENAME",
    "TrainingStopped",
    "all_finite",
    "first_nonfinite",
    "check_output_dir",
    "clear_previous_run",
    "UNSET",
    "config_changes",
    "is_out_of_space",
    "last_good_checkpoint_note",
    "previous_run_files",
]
