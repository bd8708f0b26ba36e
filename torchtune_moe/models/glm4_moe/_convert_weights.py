"""GLM-4.5 Hub weights <-> torchtune_moe: the key map.

Per layer i: attention with biases on q, k, v (``attention_bias``) and, with ``use_qk_norm``, a per-head q/k
RMSNorm (ours: ``NormedProjection`` wrapping the linear, hence ``.proj``); ``mlp.{gate,up,down}_proj`` the FFN
of the first ``first_k_dense_replace`` layers; in MoE layers ``mlp.gate`` the router with its
``e_score_correction_bias`` (ours: the router's ``expert_bias`` buffer), ``mlp.shared_experts`` the shared
FFN, ``mlp.experts.N.{gate,up,down}_proj`` the routed experts. The checkpoints' multi-token-prediction layer
(``model.layers.{num_hidden_layers}``) is ignored on load, as transformers does.
"""

from torchtune_moe.models._hf_config import HFFamily
from torchtune_moe.models.glm4_moe._component_builders import glm4_moe
from torchtune_moe.models.glm4_moe._hf_config import glm4_moe_hf_config_to_kwargs

__all__ = ["glm4_moe_hf_to_tune", "glm4_moe_tune_to_hf", "HF_FAMILY"]

_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v_proj.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.mlp.gate.weight": "layers.{}.mlp.router.gate.weight",
    "model.layers.{}.mlp.gate.e_score_correction_bias": "layers.{}.mlp.router.expert_bias",
    "model.layers.{}.mlp.shared_experts.gate_proj.weight": "layers.{}.mlp.shared_expert.w1.weight",
    "model.layers.{}.mlp.shared_experts.down_proj.weight": "layers.{}.mlp.shared_expert.w2.weight",
    "model.layers.{}.mlp.shared_experts.up_proj.weight": "layers.{}.mlp.shared_expert.w3.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
}
# With use_qk_norm, q and k are wrapped with their per-head norm.
_FROM_HF_QK_NORM = {
    **_FROM_HF,
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q_proj.proj.bias",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.proj.weight",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k_proj.proj.bias",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_proj.norm.scale",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_proj.norm.scale",
}
_EXPERTS = (
    "model.layers.{}.mlp.experts.{}.gate_proj.weight",
    "model.layers.{}.mlp.experts.{}.up_proj.weight",
    "model.layers.{}.mlp.experts.{}.down_proj.weight",
)


def _from_hf_for(kwargs: dict) -> dict[str, str]:
    return _FROM_HF_QK_NORM if kwargs.get("qk_norm") else _FROM_HF


HF_FAMILY = HFFamily(
    model_type="glm4_moe",
    architectures=("Glm4MoeForCausalLM",),
    builder=glm4_moe,
    config_to_kwargs=glm4_moe_hf_config_to_kwargs,
    from_hf=_FROM_HF,
    experts=_EXPERTS,
    from_hf_for=_from_hf_for,
    mtp_layers=True,
)

#: Hub state dict -> ours, and back (``(state_dict, config) -> state_dict``; see :class:`HFFamily`).
glm4_moe_hf_to_tune = HF_FAMILY.hf_to_tune
glm4_moe_tune_to_hf = HF_FAMILY.tune_to_hf
