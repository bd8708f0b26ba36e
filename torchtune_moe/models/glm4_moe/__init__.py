"""GLM-4.5 (355B-A32B) and GLM-4.5-Air (106B-A12B)."""

from torchtune_moe.models.glm4_moe._component_builders import glm4_moe
from torchtune_moe.models.glm4_moe._convert_weights import glm4_moe_hf_to_tune, glm4_moe_tune_to_hf
from torchtune_moe.models.glm4_moe._hf_config import glm4_moe_hf_config_to_kwargs
from torchtune_moe.models.glm4_moe._model_builders import (
    GLM4_5,
    GLM4_5_AIR,
    glm4_5_355b_a32b,
    glm4_5_air_106b_a12b,
    glm4_moe_tokenizer,
)

__all__ = [
    "glm4_moe",
    "glm4_5_355b_a32b",
    "glm4_5_air_106b_a12b",
    "glm4_moe_tokenizer",
    "glm4_moe_hf_config_to_kwargs",
    "glm4_moe_hf_to_tune",
    "glm4_moe_tune_to_hf",
    "GLM4_5",
    "GLM4_5_AIR",
]
