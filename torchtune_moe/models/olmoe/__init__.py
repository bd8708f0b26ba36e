"""OLMoE: OLMoE-1B-7B."""

from torchtune_moe.models.olmoe._component_builders import olmoe
from torchtune_moe.models.olmoe._convert_weights import olmoe_hf_to_tune, olmoe_tune_to_hf
from torchtune_moe.models.olmoe._hf_config import olmoe_hf_config_to_kwargs
from torchtune_moe.models.olmoe._model_builders import OLMOE_1B_7B, olmoe_1b_7b, olmoe_tokenizer
from torchtune_moe.models.olmoe._tokenizer import OlmoeTokenizer

__all__ = [
    "olmoe",
    "olmoe_1b_7b",
    "olmoe_tokenizer",
    "OlmoeTokenizer",
    "olmoe_hf_config_to_kwargs",
    "olmoe_hf_to_tune",
    "olmoe_tune_to_hf",
    "OLMOE_1B_7B",
]
