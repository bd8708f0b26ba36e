"""Qwen2-MoE ``config.json`` -> :func:`~torchtune_moe.models.qwen2_moe.qwen2_moe` arguments."""

from typing import Optional

from torchtune_moe.models._hf_config import HFConfigReader
from torchtune_moe.models._utils import check_sliding_window, hf_aux_loss_coeff, hf_moe_layer_ids

__all__ = ["qwen2_moe_hf_config_to_kwargs"]


def qwen2_moe_hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None) -> dict:
    """:func:`qwen2_moe` kwargs from a config.json (defaults as transformers' ``Qwen2MoeConfig``).

    Raises:
        ValueError: an option that cannot be reproduced, naming it.
    """
    r = HFConfigReader(config, "qwen2_moe")
    num_layers = r.get_int("num_hidden_layers", 24)
    num_heads = r.get_int("num_attention_heads", 16)
    embed_dim = r.get_int("hidden_size", 2048)
    experts_per_token = r.get_int("num_experts_per_tok", 4)
    mlp_only_layers = r.raw("mlp_only_layers", [])
    decoder_sparse_step = r.get_int("decoder_sparse_step", 1)
    max_seq_len = max_seq_len or r.get_int("max_position_embeddings", 32768)
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
        check_sliding_window("qwen2_moe", window, max_seq_len)
    kwargs = dict(
        vocab_size=r.get_int("vocab_size", 151936),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=r.get_int("num_key_value_heads", 16),
        embed_dim=embed_dim,
        head_dim=r.get_int("head_dim", embed_dim // num_heads),
        dense_hidden_dim=r.get_int("intermediate_size", 5632),
        moe_hidden_dim=r.get_int("moe_intermediate_size", 1408),
        shared_expert_hidden_dim=r.get_int("shared_expert_intermediate_size", 5632),
        num_experts=r.get_int("num_experts", 60),
        experts_per_token=experts_per_token,
        max_seq_len=max_seq_len,
        rope_base=r.rope_theta(default_theta=10_000.0),
        norm_eps=r.get_float("rms_norm_eps", 1e-6),
        norm_topk_prob=r.get_bool("norm_topk_prob", False),
        mlp_only_layers=list(mlp_only_layers),
        decoder_sparse_step=decoder_sparse_step,
        qkv_bias=r.get_bool("qkv_bias", True),
        attn_dropout=r.get_float("attention_dropout", 0.0),
        tie_word_embeddings=r.get_bool("tie_word_embeddings", False),
        activation=r.activation(),
        pad_token_id=r.raw("pad_token_id"),
        aux_loss_coeff=hf_aux_loss_coeff(
            r.get_float("router_aux_loss_coef", 0.001),
            experts_per_token,
            len(hf_moe_layer_ids(num_layers, mlp_only_layers, decoder_sparse_step)),
        ),
    )
    if r.get_bool("use_mrope", False):
        r.refuse("use_mrope", "multimodal RoPE is not supported")
    r.ignore("max_position_embeddings")
    r.finish()
    return kwargs
