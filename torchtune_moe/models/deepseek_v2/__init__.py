"""DeepSeek-V2-Lite: DeepSeek-V3's network (:mod:`torchtune_moe.models.deepseek_v3`) with softmax routing.
Tokenizer: :func:`~torchtune_moe.models.deepseek_v3.deepseek_v3_tokenizer` (same ``tokenizer.json`` format)."""

from torchtune_moe.models.deepseek_v2._convert_weights import deepseek_v2_hf_to_tune, deepseek_v2_tune_to_hf
from torchtune_moe.models.deepseek_v2._model_builders import DEEPSEEK_V2_LITE, deepseek_v2_lite
from torchtune_moe.models.deepseek_v3._hf_config import deepseek_v2_hf_config_to_kwargs

__all__ = [
    "deepseek_v2_lite",
    "deepseek_v2_hf_config_to_kwargs",
    "deepseek_v2_hf_to_tune",
    "deepseek_v2_tune_to_hf",
    "DEEPSEEK_V2_LITE",
]
