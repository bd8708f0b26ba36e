"""Training utilities for the MoE recipe: checkpointing (interface, native checkpointer, Hugging Face
checkpoints and ``from_hf_pretrained``, atomic saves) and expert-load metrics."""

from torchtune_moe.training._checkpointing import (
    MODEL_KEY,
    RECIPE_STATE_FILENAME,
    Checkpointer,
    MoECheckpointer,
    atomic_directory,
    checkpoint_dir_name,
    find_latest_checkpoint,
    list_checkpoints,
    remove_stale_temporaries,
)
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

__all__ = [
    "Checkpointer",
    "MoECheckpointer",
    "HFMoECheckpointer",
    "from_hf_pretrained",
    "MODEL_KEY",
    "RECIPE_STATE_FILENAME",
    "atomic_directory",
    "checkpoint_dir_name",
    "find_latest_checkpoint",
    "list_checkpoints",
    "remove_stale_temporaries",
    "EXPERT_LOAD_FILENAME",
    "ExpertLoadTracker",
    "ExpertLoadWindow",
    "append_expert_load",
    "clean_module_name",
    "peak_memory_stats",
    "truncate_expert_load",
]
