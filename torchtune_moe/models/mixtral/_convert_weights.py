"""Mixtral Hub weights <-> torchtune_moe: the key map.

Per layer i: attention without biases, ``block_sparse_moe.gate`` the router, ``block_sparse_moe.experts.N.w1``
(gate), ``.w3`` (up), ``.w2`` (down) the experts; every layer is MoE.
"""

import torch

from torchtune_moe.models._convert_weights import HFKeyMap, hf_to_tune, tune_to_hf
from torchtune_moe.models._hf_config import HFFamily
from torchtune_moe.models.mixtral._component_builders import mixtral
from torchtune_moe.models.mixtral._hf_config import mixtral_hf_config_to_kwargs

__all__ = ["mixtral_key_map", "mixtral_hf_to_tune", "mixtral_tune_to_hf", "HF_FAMILY"]

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


def mixtral_key_map(kwargs: dict) -> HFKeyMap:
    """The Hub names of a :func:`mixtral` built with ``kwargs``."""
    return HFKeyMap(_FROM_HF, _EXPERTS, tied=kwargs.get("tie_word_embeddings", False))


def mixtral_hf_to_tune(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Hub state dict (per-expert keys) -> torchtune_moe state dict (stacked experts)."""
    return hf_to_tune(state_dict, mixtral_key_map(mixtral_hf_config_to_kwargs(config)))


def mixtral_tune_to_hf(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """torchtune_moe state dict -> Hub state dict (``block_sparse_moe.experts.N.w1/w2/w3`` as published)."""
    return tune_to_hf(state_dict, mixtral_key_map(mixtral_hf_config_to_kwargs(config)))


HF_FAMILY = HFFamily(
    model_type="mixtral",
    architectures=("MixtralForCausalLM",),
    builder=mixtral,
    config_to_kwargs=mixtral_hf_config_to_kwargs,
    key_map=mixtral_key_map,
)
