"""DeepSeek-V3 (671B; also V3.1, R1) and Moonlight-16B-A3B: multi-head latent attention and sigmoid routing."""

from torchtune_moe.models.deepseek_v3._component_builders import deepseek_v3
from torchtune_moe.models.deepseek_v3._convert_weights import deepseek_v3_hf_to_tune, deepseek_v3_tune_to_hf
from torchtune_moe.models.deepseek_v3._hf_config import deepseek_v3_hf_config_to_kwargs
from torchtune_moe.models.deepseek_v3._model_builders import (
    DEEPSEEK_V3,
    MOONLIGHT_16B_A3B,
    deepseek_v3_671b,
    deepseek_v3_tokenizer,
    moonlight_16b_a3b,
)

__all__ = [
    "deepseek_v3",
    "deepseek_v3_671b",
    "moonlight_16b_a3b",
    "deepseek_v3_tokenizer",
    "deepseek_v3_hf_config_to_kwargs",
    "deepseek_v3_hf_to_tune",
    "deepseek_v3_tune_to_hf",
    "DEEPSEEK_V3",
    "MOONLIGHT_16B_A3B",
]
