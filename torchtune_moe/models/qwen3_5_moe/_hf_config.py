"""Qwen3.5-MoE ``config.json`` -> :func:`~torchtune_moe.models.qwen3_5_moe.qwen3_5_moe` arguments.

Two layouts: the published checkpoints are multimodal (``Qwen3_5MoeForConditionalGeneration``, model_type
``qwen3_5_moe``: the text model's keys under ``text_config``, a ``vision_config`` for the vision tower); a text-only
save (``Qwen3_5MoeForCausalLM``, model_type ``qwen3_5_moe_text``) has the text keys at the top. Both build the text
model only: the vision tower is not built (images and videos cannot be fed).
"""

from typing import Optional

from torchtune_moe.models._hf_config import HFConfigReader
from torchtune_moe.models._utils import hf_aux_loss_coeff
from torchtune_moe.models.qwen3_5_moe._component_builders import LAYER_TYPES

__all__ = ["qwen3_5_moe_hf_config_to_kwargs", "text_config"]

# transformers' Qwen3_5MoeTextConfig defaults (its docstring: the Qwen/Qwen3.5-35B-A3B shapes), for keys a
# config.json leaves out.
_DEFAULTS = dict(
    vocab_size=248320, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2, hidden_size=2048,
    num_experts=256, num_experts_per_tok=8, max_position_embeddings=32768, rope_theta=10_000.0, rms_norm_eps=1e-6,
)
# Top-level keys of the multimodal config.json that describe the vision tower or its special tokens.
_VISION_KEYS = ("vision_config", "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def text_config(config: dict) -> dict:
    """The text model's keys of a Qwen3.5-MoE config.json (``text_config`` of the multimodal layout, with the
    top-level ``tie_word_embeddings``; the config itself for the text-only layout).

    Raises:
        ValueError: unknown top-level keys, or top-level and text ``tie_word_embeddings`` that disagree.
    """
    if "text_config" not in config and config.get("model_type") != "qwen3_5_moe":
        return config
    top = HFConfigReader(config, "qwen3_5_moe")
    text = top.raw("text_config", {})
    if not isinstance(text, dict):
        top.refuse("text_config", "expected a dict")
    # The vision tower is not built: this package fine-tunes the text model (docs/models.md).
    top.ignore(*_VISION_KEYS)
    tie = top.get_bool("tie_word_embeddings", False)
    top.finish()
    if text.get("tie_word_embeddings") not in (None, tie):
        raise ValueError(
            f"qwen3_5_moe config.json sets tie_word_embeddings={tie} but text_config.tie_word_embeddings="
            f"{text['tie_word_embeddings']}"
        )
    return {**text, "tie_word_embeddings": tie}


def qwen3_5_moe_hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None) -> dict:
    """:func:`qwen3_5_moe` kwargs from a config.json (defaults as transformers' ``Qwen3_5MoeTextConfig``).

    Raises:
        ValueError: an option that cannot be reproduced (rope scaling, unknown keys, ...), naming it.
    """
    r = HFConfigReader(text_config(config), "qwen3_5_moe")
    kwargs = r.decoder(_DEFAULTS, max_seq_len, rope=False)
    rope = r.rope_parameters(_DEFAULTS["rope_theta"])
    # transformers' Qwen3_5MoeTextConfig defaults partial_rotary_factor to 0.25 when config.json has none.
    if "partial_rotary_factor" not in r.config and "partial_rotary_factor" not in (
        r.raw("rope_parameters") or r.raw("rope_scaling") or {}
    ):
        rope["partial_rotary_factor"] = 0.25
    # M-RoPE: text tokens have equal temporal, height and width positions, so the interleaved sections all
    # rotate by the same angle: plain RoPE for the text model.
    rope.pop("mrope_section", None)
    rope.pop("mrope_interleaved", None)
    if rope.pop("rope_type") != "default" or set(rope) != {"rope_theta", "partial_rotary_factor"}:
        r.refuse("rope_parameters", "only unscaled (M-)RoPE (rope_theta, partial_rotary_factor) is supported")
    num_layers = kwargs["num_layers"]
    layer_types = r.raw("layer_types")
    if layer_types is None:  # transformers: every full_attention_interval-th layer is full attention
        interval = r.get_int("full_attention_interval", 4)
        layer_types = [LAYER_TYPES[(i + 1) % interval == 0] for i in range(num_layers)]
    else:
        r.ignore("full_attention_interval")
        layer_types = list(layer_types)
        if len(layer_types) != num_layers or any(t not in LAYER_TYPES for t in layer_types):
            r.refuse("layer_types", f"expected {num_layers} entries (num_hidden_layers) of {list(LAYER_TYPES)}")
    # Keys that Hub files may carry and transformers' text model does not read; the values it would have.
    if r.get_bool("attn_output_gate", True) is not True:
        r.refuse("attn_output_gate", "transformers' Qwen3.5-MoE attention always has the output gate")
    if r.get_bool("norm_topk_prob", True) is not True:
        r.refuse("norm_topk_prob", "transformers' Qwen3.5-MoE router always renormalises the top-K weights")
    if r.get_int("decoder_sparse_step", 1) != 1 or list(r.raw("mlp_only_layers", [])):
        r.refuse("decoder_sparse_step", "every Qwen3.5-MoE layer is MoE (decoder_sparse_step 1, no mlp_only_layers)")
    # No dense FFN is built (every layer is MoE); the multi-token-prediction module (mtp.*) is not built, as in
    # transformers.
    r.ignore("intermediate_size", *[k for k in r.config if k.startswith("mtp_")])
    kwargs.update(
        head_dim=r.get_int("head_dim", 256),
        layer_types=layer_types,
        rope_base=rope["rope_theta"],
        partial_rotary_factor=rope["partial_rotary_factor"],
        moe_hidden_dim=r.get_int("moe_intermediate_size", 512),
        shared_expert_hidden_dim=r.get_int("shared_expert_intermediate_size", 512),
        linear_num_key_heads=r.get_int("linear_num_key_heads", 16),
        linear_num_value_heads=r.get_int("linear_num_value_heads", 32),
        linear_key_head_dim=r.get_int("linear_key_head_dim", 128),
        linear_value_head_dim=r.get_int("linear_value_head_dim", 128),
        linear_conv_kernel_dim=r.get_int("linear_conv_kernel_dim", 4),
        attn_bias=r.get_bool("attention_bias", False),
        aux_loss_coeff=hf_aux_loss_coeff(
            r.get_float("router_aux_loss_coef", 0.001), kwargs["experts_per_token"], num_layers
        ),
    )
    if kwargs["linear_num_value_heads"] % kwargs["linear_num_key_heads"]:
        r.refuse("linear_num_value_heads", f"must be a multiple of linear_num_key_heads ({kwargs['linear_num_key_heads']})")
    r.finish()
    return kwargs
