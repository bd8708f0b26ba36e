"""DeepSeek-V2 Hub weights <-> torchtune_moe: DeepSeek-V3's key map without the routers'
``e_score_correction_bias`` (V2 routes with softmax scores and no selection bias)."""

from torchtune_moe.models._hf_config import HFFamily
from torchtune_moe.models.deepseek_v3._component_builders import deepseek_v3
from torchtune_moe.models.deepseek_v3._convert_weights import _EXPERTS
from torchtune_moe.models.deepseek_v3._convert_weights import _FROM_HF as _FROM_HF_V3
from torchtune_moe.models.deepseek_v3._hf_config import deepseek_v2_hf_config_to_kwargs

__all__ = ["deepseek_v2_hf_to_tune", "deepseek_v2_tune_to_hf", "HF_FAMILY"]

_FROM_HF = {k: v for k, v in _FROM_HF_V3.items() if not k.endswith("e_score_correction_bias")}

HF_FAMILY = HFFamily(
    model_type="deepseek_v2",
    architectures=("DeepseekV2ForCausalLM",),
    builder=deepseek_v3,
    config_to_kwargs=deepseek_v2_hf_config_to_kwargs,
    from_hf=_FROM_HF,
    experts=_EXPERTS,
)

#: Hub state dict -> ours, and back (``(state_dict, config) -> state_dict``; see :class:`HFFamily`).
deepseek_v2_hf_to_tune = HF_FAMILY.hf_to_tune
deepseek_v2_tune_to_hf = HF_FAMILY.tune_to_hf
