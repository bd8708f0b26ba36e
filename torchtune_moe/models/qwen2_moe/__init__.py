"""Qwen2-MoE: Qwen1.5-MoE-A2.7B and Qwen2-57B-A14B."""

from torchtune_moe.models.qwen2_moe._component_builders import qwen2_moe
from torchtune_moe.models.qwen2_moe._convert_weights import qwen2_moe_hf_to_tune, qwen2_moe_tune_to_hf
from torchtune_moe.models.qwen2_moe._hf_config import qwen2_moe_hf_config_to_kwargs
from torchtune_moe.models.qwen2_moe._model_builders import (
    QWEN1_5_MOE_A2_7B,
    QWEN2_MOE_57B_A14B,
    qwen1_5_moe_a2_7b,
    qwen2_moe_57b_a14b,
    qwen2_moe_tokenizer,
)

__all__ = [
    "qwen2_moe",
    "qwen1_5_moe_a2_7b",
    "qwen2_moe_57b_a14b",
    "qwen2_moe_tokenizer",
    "qwen2_moe_hf_config_to_kwargs",
    "qwen2_moe_hf_to_tune",
    "qwen2_moe_tune_to_hf",
    "QWEN1_5_MOE_A2_7B",
    "QWEN2_MOE_57B_A14B",
]
