"""Qwen3-MoE: Qwen3-30B-A3B and Qwen3-235B-A22B."""

from torchtune_moe.models.qwen3_moe._component_builders import qwen3_moe
from torchtune_moe.models.qwen3_moe._convert_weights import qwen3_moe_hf_to_tune, qwen3_moe_tune_to_hf
from torchtune_moe.models.qwen3_moe._hf_config import qwen3_moe_hf_config_to_kwargs
from torchtune_moe.models.qwen3_moe._model_builders import (
    QWEN3_MOE_30B_A3B,
    QWEN3_MOE_235B_A22B,
    qwen3_moe_235b_a22b,
    qwen3_moe_30b_a3b,
    qwen3_moe_tokenizer,
)

__all__ = [
    "qwen3_moe",
    "qwen3_moe_30b_a3b",
    "qwen3_moe_235b_a22b",
    "qwen3_moe_tokenizer",
    "qwen3_moe_hf_config_to_kwargs",
    "qwen3_moe_hf_to_tune",
    "qwen3_moe_tune_to_hf",
    "QWEN3_MOE_30B_A3B",
    "QWEN3_MOE_235B_A22B",
]
