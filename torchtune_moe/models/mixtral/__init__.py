"""Mixtral: Mixtral-8x7B and Mixtral-8x22B."""

from torchtune_moe.models.mixtral._component_builders import mixtral
from torchtune_moe.models.mixtral._convert_weights import mixtral_hf_to_tune, mixtral_tune_to_hf
from torchtune_moe.models.mixtral._hf_config import mixtral_hf_config_to_kwargs
from torchtune_moe.models.mixtral._model_builders import (
    MIXTRAL_8X7B,
    MIXTRAL_8X22B,
    MixtralTokenizer,
    mixtral_8x22b,
    mixtral_8x7b,
    mixtral_tokenizer,
)

__all__ = [
    "mixtral",
    "mixtral_8x7b",
    "mixtral_8x22b",
    "mixtral_tokenizer",
    "MixtralTokenizer",
    "mixtral_hf_config_to_kwargs",
    "mixtral_hf_to_tune",
    "mixtral_tune_to_hf",
    "MIXTRAL_8X7B",
    "MIXTRAL_8X22B",
]
