"""Qwen2-MoE ``config.json`` -> :func:`~torchtune_moe.models.qwen2_moe.qwen2_moe` arguments."""

from typing import Optional

from torchtune_moe.models._hf_config import HFConfigReader
from torchtune_moe.models._utils import check_sliding_window, hf_aux_loss_coeff, hf_moe_layer_ids

__all__ = ["qwen2_moe_hf_config_to_kwargs"]

# transformers' Qwen2MoeConfig defaults, for keys a config.json leaves out.
_DEFAULTS = dict(
    vocab_size=151936, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, hidden_size=2048,
    num_experts=60, num_experts_per_tok=4, max_position_embeddings=32768, rope_theta=10_000.0, rms_norm_eps=1e-6,
)


def qwen2_moe_hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None) -> dict:
    """:func:`qwen2_moe` kwargs from a config.json (defaults as transformers' ``Qwen2MoeConfig``).

    Raises:
        ValueError: an option that cannot be reproduced, naming it.
    """
    r = HFConfigReader(config, "qwen2_moe")
    kwargs = r.decoder(_DEFAULTS, max_seq_len)
    num_layers = kwargs["num_layers"]
    # Sliding window, as transformers decides it: layer_types from config.json, else sliding for odd-numbered
    # layers (i + 1 odd) below max_window_layers when use_sliding_window; the window is 0 without use_sliding_window.
    use_sliding = r.get_bool("use_sliding_window", False)
    window = r.get_int("sliding_window", 4096, minimum=0)
    max_window_layers = r.get_int("max_window_layers", 28, minimum=0)
    layer_types = r.raw("layer_types") or [
        "sliding_attention" if (i + 1) % 2 and i < max_window_layers and use_sliding else "full_attention"
        for i in range(num_layers)
    ]
    if len(layer_types) != num_layers or set(layer_types) - {"full_attention", "sliding_attention"}:
        r.refuse("layer_types", f"expected {num_layers} entries of 'full_attention' / 'sliding_attention'")
    if "sliding_attention" in layer_types:
        if not use_sliding:
            r.refuse("layer_types", "sliding_attention layers with use_sliding_window false (a window of 0)")
        check_sliding_window("qwen2_moe", window, kwargs["max_seq_len"])
    mlp_only_layers = list(r.raw("mlp_only_layers", []))
    decoder_sparse_step = r.get_int("decoder_sparse_step", 1)
    moe_layers = hf_moe_layer_ids(num_layers, mlp_only_layers, decoder_sparse_step)
    kwargs.update(
        dense_hidden_dim=r.get_int("intermediate_size", 5632),
        moe_hidden_dim=r.get_int("moe_intermediate_size", 1408),
        shared_expert_hidden_dim=r.get_int("shared_expert_intermediate_size", 5632),
        norm_topk_prob=r.get_bool("norm_topk_prob", False),
        mlp_only_layers=mlp_only_layers,
        decoder_sparse_step=decoder_sparse_step,
        qkv_bias=r.get_bool("qkv_bias", True),
        aux_loss_coeff=hf_aux_loss_coeff(
            r.get_float("router_aux_loss_coef", 0.001), kwargs["experts_per_token"], len(moe_layers)
        ),
    )
    if r.get_bool("use_mrope", False):
        r.refuse("use_mrope", "multimodal RoPE is not supported")
    r.finish()
    return kwargs
