"""GPT-OSS (gpt-oss-20b, gpt-oss-120b)."""

from torchtune_moe.models.gpt_oss._component_builders import gpt_oss
from torchtune_moe.models.gpt_oss._convert_weights import (
    dequantize_mxfp4,
    dequantize_mxfp4_state_dict,
    gpt_oss_hf_to_tune,
    gpt_oss_tune_to_hf,
)
from torchtune_moe.models.gpt_oss._hf_config import gpt_oss_hf_config_to_kwargs
from torchtune_moe.models.gpt_oss._model_builders import (
    GPT_OSS_20B,
    GPT_OSS_120B,
    gpt_oss_20b,
    gpt_oss_120b,
    gpt_oss_tokenizer,
)

__all__ = [
    "gpt_oss",
    "gpt_oss_20b",
    "gpt_oss_120b",
    "gpt_oss_tokenizer",
    "gpt_oss_hf_config_to_kwargs",
    "gpt_oss_hf_to_tune",
    "gpt_oss_tune_to_hf",
    "dequantize_mxfp4",
    "dequantize_mxfp4_state_dict",
    "GPT_OSS_20B",
    "GPT_OSS_120B",
]
