"""Mixtral Hub weights <-> torchtune_moe: the key map.

Per layer i: attention without biases, ``block_sparse_moe.gate`` the router, ``block_sparse_moe.experts.N.w1``
(gate), ``.w3`` (up), ``.w2`` (down) the experts; every layer is MoE.
"""

from torchtune_moe.models._hf_config import HFFamily
from torchtune_moe.models.mixtral._component_builders import mixtral
from torchtune_moe.models.mixtral._hf_config import mixtral_hf_config_to_kwargs

__all__ = ["mixtral_hf_to_tune", "mixtral_tune_to_hf", "HF_FAMILY"]

_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.block_sparse_moe.gate.weight": "layers.{}.mlp.router.gate.weight",
}
_EXPERTS = (
    "model.layers.{}.block_sparse_moe.experts.{}.w1.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w3.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w2.weight",
)


HF_FAMILY = HFFamily(
    model_type="mixtral",
    architectures=("MixtralForCausalLM",),
    builder=mixtral,
    config_to_kwargs=mixtral_hf_config_to_kwargs,
    from_hf=_FROM_HF,
    experts=_EXPERTS,
)

#: Hub state dict -> ours, and back (``(state_dict, config) -> state_dict``; see :class:`HFFamily`).
mixtral_hf_to_tune = HF_FAMILY.hf_to_tune
mixtral_tune_to_hf = HF_FAMILY.tune_to_hf
