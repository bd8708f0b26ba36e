"""Qwen2-MoE Hub weights <-> torchtune_moe: the key map.

Per layer i: biases on q, k, v (none on o), ``mlp.gate`` the router, ``mlp.experts.N.{gate,up,down}_proj`` the
routed experts, ``mlp.shared_expert.{gate,up,down}_proj`` and ``mlp.shared_expert_gate`` the gated shared
expert (MoE layers) or ``mlp.{gate,up,down}_proj`` (dense layers).
"""

from torchtune_moe.models._hf_config import HFFamily
from torchtune_moe.models.qwen2_moe._component_builders import qwen2_moe
from torchtune_moe.models.qwen2_moe._hf_config import qwen2_moe_hf_config_to_kwargs

__all__ = ["qwen2_moe_hf_to_tune", "qwen2_moe_tune_to_hf", "HF_FAMILY"]

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
    "model.layers.{}.mlp.shared_expert.gate_proj.weight": "layers.{}.mlp.shared_expert.w1.weight",
    "model.layers.{}.mlp.shared_expert.down_proj.weight": "layers.{}.mlp.shared_expert.w2.weight",
    "model.layers.{}.mlp.shared_expert.up_proj.weight": "layers.{}.mlp.shared_expert.w3.weight",
    "model.layers.{}.mlp.shared_expert_gate.weight": "layers.{}.mlp.shared_expert_gate.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
}
_EXPERTS = (
    "model.layers.{}.mlp.experts.{}.gate_proj.weight",
    "model.layers.{}.mlp.experts.{}.up_proj.weight",
    "model.layers.{}.mlp.experts.{}.down_proj.weight",
)


HF_FAMILY = HFFamily(
    model_type="qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    builder=qwen2_moe,
    config_to_kwargs=qwen2_moe_hf_config_to_kwargs,
    from_hf=_FROM_HF,
    experts=_EXPERTS,
)

#: Hub state dict -> ours, and back (``(state_dict, config) -> state_dict``; see :class:`HFFamily`).
qwen2_moe_hf_to_tune = HF_FAMILY.hf_to_tune
qwen2_moe_tune_to_hf = HF_FAMILY.tune_to_hf
