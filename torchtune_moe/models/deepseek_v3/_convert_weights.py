"""DeepSeek-V3 Hub weights <-> torchtune_moe: the key map.

Per layer i: multi-head latent attention (``self_attn.q_proj`` without a query latent, else ``q_a_proj``,
``q_a_layernorm``, ``q_b_proj``; ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``);
``mlp.{gate,up,down}_proj`` the FFN of the first ``first_k_dense_replace`` layers; in MoE layers ``mlp.gate``
the router with its ``e_score_correction_bias`` (ours: the router's ``expert_bias`` buffer),
``mlp.shared_experts`` the shared FFN, ``mlp.experts.N.{gate,up,down}_proj`` the routed experts. The
checkpoints' multi-token-prediction layer (``model.layers.{num_hidden_layers}``) is ignored on load, as
transformers does.
"""

from torchtune_moe.models._hf_config import HFFamily
from torchtune_moe.models.deepseek_v3._component_builders import deepseek_v3
from torchtune_moe.models.deepseek_v3._hf_config import deepseek_v3_hf_config_to_kwargs

__all__ = ["deepseek_v3_hf_to_tune", "deepseek_v3_tune_to_hf", "HF_FAMILY"]

_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.q_a_proj.weight": "layers.{}.attn.q_a_proj.weight",
    "model.layers.{}.self_attn.q_a_proj.bias": "layers.{}.attn.q_a_proj.bias",
    "model.layers.{}.self_attn.q_a_layernorm.weight": "layers.{}.attn.q_norm.scale",
    "model.layers.{}.self_attn.q_b_proj.weight": "layers.{}.attn.q_b_proj.weight",
    "model.layers.{}.self_attn.kv_a_proj_with_mqa.weight": "layers.{}.attn.kv_a_proj.weight",
    "model.layers.{}.self_attn.kv_a_proj_with_mqa.bias": "layers.{}.attn.kv_a_proj.bias",
    "model.layers.{}.self_attn.kv_a_layernorm.weight": "layers.{}.attn.kv_norm.scale",
    "model.layers.{}.self_attn.kv_b_proj.weight": "layers.{}.attn.kv_b_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attn.output_proj.bias",
    "model.layers.{}.mlp.gate.weight": "layers.{}.mlp.router.gate.weight",
    "model.layers.{}.mlp.gate.e_score_correction_bias": "layers.{}.mlp.router.expert_bias",
    "model.layers.{}.mlp.shared_experts.gate_proj.weight": "layers.{}.mlp.shared_expert.w1.weight",
    "model.layers.{}.mlp.shared_experts.down_proj.weight": "layers.{}.mlp.shared_expert.w2.weight",
    "model.layers.{}.mlp.shared_experts.up_proj.weight": "layers.{}.mlp.shared_expert.w3.weight",
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
    model_type="deepseek_v3",
    architectures=("DeepseekV3ForCausalLM",),
    builder=deepseek_v3,
    config_to_kwargs=deepseek_v3_hf_config_to_kwargs,
    from_hf=_FROM_HF,
    experts=_EXPERTS,
    mtp_layers=True,
)

#: Hub state dict -> ours, and back (``(state_dict, config) -> state_dict``; see :class:`HFFamily`).
deepseek_v3_hf_to_tune = HF_FAMILY.hf_to_tune
deepseek_v3_tune_to_hf = HF_FAMILY.tune_to_hf
