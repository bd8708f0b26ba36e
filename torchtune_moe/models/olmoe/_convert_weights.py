"""OLMoE Hub weights <-> torchtune_moe: the key map.

Per layer i: q and k RMSNorm over the whole projection (ours: ``NormedProjection`` wrapping the linear, hence
``.proj``; v is wrapped too when ``clip_qkv`` clamps it), biases with ``attention_bias``, ``mlp.gate`` the
router, ``mlp.experts.N.{gate,up,down}_proj`` the experts; every layer is MoE.
"""

from torchtune_moe.models._hf_config import HFFamily
from torchtune_moe.models.olmoe._component_builders import olmoe
from torchtune_moe.models.olmoe._hf_config import olmoe_hf_config_to_kwargs

__all__ = ["olmoe_hf_to_tune", "olmoe_tune_to_hf", "HF_FAMILY"]

_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q_proj.proj.bias",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.proj.weight",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k_proj.proj.bias",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v_proj.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attn.output_proj.bias",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_proj.norm.scale",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_proj.norm.scale",
    "model.layers.{}.mlp.gate.weight": "layers.{}.mlp.router.gate.weight",
}
# With clip_qkv, v is clamped too: ours wraps its linear like q and k.
_FROM_HF_CLIPPED = {
    **_FROM_HF,
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.proj.weight",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v_proj.proj.bias",
}
_EXPERTS = (
    "model.layers.{}.mlp.experts.{}.gate_proj.weight",
    "model.layers.{}.mlp.experts.{}.up_proj.weight",
    "model.layers.{}.mlp.experts.{}.down_proj.weight",
)


def _from_hf_for(kwargs: dict) -> dict[str, str]:
    return _FROM_HF_CLIPPED if kwargs.get("clip_qkv") is not None else _FROM_HF


HF_FAMILY = HFFamily(
    model_type="olmoe",
    architectures=("OlmoeForCausalLM",),
    builder=olmoe,
    config_to_kwargs=olmoe_hf_config_to_kwargs,
    from_hf=_FROM_HF,
    experts=_EXPERTS,
    from_hf_for=_from_hf_for,
)

#: Hub state dict -> ours, and back (``(state_dict, config) -> state_dict``; see :class:`HFFamily`).
olmoe_hf_to_tune = HF_FAMILY.hf_to_tune
olmoe_tune_to_hf = HF_FAMILY.tune_to_hf
