"""Qwen3.5-MoE Hub weights <-> torchtune_moe: the key maps.

Per layer i (text model): ``linear_attn.*`` the Gated DeltaNet of linear-attention layers (same names in ours,
under ``attn``; the gated norm's ``weight`` is our ``scale``); ``self_attn.{q,k,v,o}_proj`` and the per-head
``q_norm``/``k_norm`` of full-attention layers (``q_proj`` holds each head's query and output gate, kept as
one tensor); ``mlp.gate`` the router, ``mlp.shared_expert`` and ``mlp.shared_expert_gate`` the gated shared
expert, ``mlp.experts.N.{gate,up,down}_proj`` the routed experts. Every norm weight is zero-centred on the Hub
and in ours (:class:`~torchtune_moe.modules.gated_attention.OffsetRMSNorm`): copied as is.

Two families: the published multimodal checkpoints (``Qwen3_5MoeForConditionalGeneration``) keep the text model
under ``model.language_model.``, the vision tower under ``model.visual.`` and a multi-token-prediction module
under ``mtp.``: those two are ignored on load (the text model only is built; a saved checkpoint holds the text
model's tensors). A text-only save (``Qwen3_5MoeForCausalLM``) has the text model under ``model.``.
"""

from dataclasses import dataclass

from torchtune_moe.models._convert_weights import HFKeyMap
from torchtune_moe.models._hf_config import HFFamily
from torchtune_moe.models.qwen3_5_moe._component_builders import qwen3_5_moe
from torchtune_moe.models.qwen3_5_moe._hf_config import qwen3_5_moe_hf_config_to_kwargs

__all__ = ["qwen3_5_moe_hf_to_tune", "qwen3_5_moe_tune_to_hf", "HF_FAMILY", "HF_FAMILY_TEXT"]

_LAYER = {  # Hub key after the text model's prefix -> ours
    "layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "layers.{}.linear_attn.in_proj_qkv.weight": "layers.{}.attn.in_proj_qkv.weight",
    "layers.{}.linear_attn.in_proj_z.weight": "layers.{}.attn.in_proj_z.weight",
    "layers.{}.linear_attn.in_proj_b.weight": "layers.{}.attn.in_proj_b.weight",
    "layers.{}.linear_attn.in_proj_a.weight": "layers.{}.attn.in_proj_a.weight",
    "layers.{}.linear_attn.conv1d.weight": "layers.{}.attn.conv1d.weight",
    "layers.{}.linear_attn.dt_bias": "layers.{}.attn.dt_bias",
    "layers.{}.linear_attn.A_log": "layers.{}.attn.A_log",
    "layers.{}.linear_attn.norm.weight": "layers.{}.attn.norm.scale",
    "layers.{}.linear_attn.out_proj.weight": "layers.{}.attn.out_proj.weight",
    "layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q_proj.bias",
    "layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k_proj.bias",
    "layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v_proj.bias",
    "layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "layers.{}.self_attn.o_proj.bias": "layers.{}.attn.output_proj.bias",
    "layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.scale",
    "layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.scale",
    "layers.{}.mlp.gate.weight": "layers.{}.mlp.router.gate.weight",
    "layers.{}.mlp.shared_expert.gate_proj.weight": "layers.{}.mlp.shared_expert.w1.weight",
    "layers.{}.mlp.shared_expert.down_proj.weight": "layers.{}.mlp.shared_expert.w2.weight",
    "layers.{}.mlp.shared_expert.up_proj.weight": "layers.{}.mlp.shared_expert.w3.weight",
    "layers.{}.mlp.shared_expert_gate.weight": "layers.{}.mlp.shared_expert_gate.weight",
}
_EXPERTS = (
    "layers.{}.mlp.experts.{}.gate_proj.weight",
    "layers.{}.mlp.experts.{}.up_proj.weight",
    "layers.{}.mlp.experts.{}.down_proj.weight",
)


def _key_map(prefix: str) -> tuple[dict[str, str], tuple[str, str, str]]:
    """The full Hub key map with the text model under ``prefix`` (``model.`` or ``model.language_model.``)."""
    from_hf = {
        f"{prefix}embed_tokens.weight": "tok_embeddings.weight",
        f"{prefix}norm.weight": "norm.scale",
        "lm_head.weight": "output.weight",
        **{prefix + hf: ours for hf, ours in _LAYER.items()},
    }
    return from_hf, tuple(prefix + t for t in _EXPERTS)


@dataclass(frozen=True)
class _MultimodalKeyMap(HFKeyMap):
    """:class:`HFKeyMap` that also drops the vision tower and the multi-token-prediction module on load."""

    ignored_prefixes: tuple[str, ...] = ()

    def ignores(self, hf_key: str) -> bool:
        return hf_key.startswith(self.ignored_prefixes) or super().ignores(hf_key)


@dataclass(frozen=True)
class _MultimodalFamily(HFFamily):
    """The multimodal checkpoints: :class:`HFFamily` whose key map ignores ``ignored_prefixes``."""

    ignored_prefixes: tuple[str, ...] = ()

    def key_map(self, kwargs: dict) -> HFKeyMap:
        base = super().key_map(kwargs)
        return _MultimodalKeyMap(
            base.from_hf, base.experts, tied=base.tied, num_layers=base.num_layers,
            ignored_prefixes=self.ignored_prefixes,
        )


_FROM_HF, _EXPERTS_MM = _key_map("model.language_model.")
_FROM_HF_TEXT, _EXPERTS_TEXT = _key_map("model.")

#: The published checkpoints (Qwen/Qwen3.5-35B-A3B, -122B-A10B, -397B-A17B).
HF_FAMILY = _MultimodalFamily(
    model_type="qwen3_5_moe",
    architectures=("Qwen3_5MoeForConditionalGeneration",),
    builder=qwen3_5_moe,
    config_to_kwargs=qwen3_5_moe_hf_config_to_kwargs,
    from_hf=_FROM_HF,
    experts=_EXPERTS_MM,
    ignored_prefixes=("model.visual.", "mtp."),
)
#: A text-only save (transformers' ``Qwen3_5MoeForCausalLM``).
HF_FAMILY_TEXT = _MultimodalFamily(
    model_type="qwen3_5_moe_text",
    architectures=("Qwen3_5MoeForCausalLM",),
    builder=qwen3_5_moe,
    config_to_kwargs=qwen3_5_moe_hf_config_to_kwargs,
    from_hf=_FROM_HF_TEXT,
    experts=_EXPERTS_TEXT,
    ignored_prefixes=("mtp.",),
)

#: Hub state dict -> ours, and back (``(state_dict, config) -> state_dict``; see :class:`HFFamily`); the family
#: (multimodal or text-only key names) follows the config.
def qwen3_5_moe_hf_to_tune(state_dict, config: dict):
    return _family(config).hf_to_tune(state_dict, config)


def qwen3_5_moe_tune_to_hf(state_dict, config: dict):
    return _family(config).tune_to_hf(state_dict, config)


def _family(config: dict) -> HFFamily:
    text_only = config.get("model_type") == "qwen3_5_moe_text" or "Qwen3_5MoeForCausalLM" in (
        config.get("architectures") or []
    )
    return HF_FAMILY_TEXT if text_only else HF_FAMILY
