"""Qwen3.5-MoE (35B-A3B, 122B-A10B, 397B-A17B), text model: Gated DeltaNet linear attention interleaved with
gated full attention, every layer MoE with a gated shared expert."""

from torchtune_moe.models.qwen3_5_moe._component_builders import qwen3_5_moe
from torchtune_moe.models.qwen3_5_moe._convert_weights import qwen3_5_moe_hf_to_tune, qwen3_5_moe_tune_to_hf
from torchtune_moe.models.qwen3_5_moe._hf_config import qwen3_5_moe_hf_config_to_kwargs
from torchtune_moe.models.qwen3_5_moe._model_builders import (
    QWEN3_5_MOE_35B_A3B,
    QWEN3_5_MOE_122B_A10B,
    QWEN3_5_MOE_397B_A17B,
    qwen3_5_moe_35b_a3b,
    qwen3_5_moe_122b_a10b,
    qwen3_5_moe_397b_a17b,
    qwen3_5_moe_tokenizer,
)

__all__ = [
    "qwen3_5_moe",
    "qwen3_5_moe_35b_a3b",
    "qwen3_5_moe_122b_a10b",
    "qwen3_5_moe_397b_a17b",
    "qwen3_5_moe_tokenizer",
    "qwen3_5_moe_hf_config_to_kwargs",
    "qwen3_5_moe_hf_to_tune",
    "qwen3_5_moe_tune_to_hf",
    "QWEN3_5_MOE_35B_A3B",
    "QWEN3_5_MOE_122B_A10B",
    "QWEN3_5_MOE_397B_A17B",
]
