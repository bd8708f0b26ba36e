"""Qwen3-MoE ``config.json`` -> :func:`~torchtune_moe.models.qwen3_moe.qwen3_moe` arguments."""

from typing import Optional

from torchtune_moe.models._hf_config import HFConfigReader
from torchtune_moe.models._utils import check_sliding_window, hf_aux_loss_coeff, hf_moe_layer_ids

__all__ = ["qwen3_moe_hf_config_to_kwargs"]


def qwen3_moe_hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None) -> dict:
    """:func:`qwen3_moe` kwargs from a config.json (defaults as transformers' ``Qwen3MoeConfig``).

    Raises:
        ValueError: an option that cannot be reproduced (rope scaling, sliding window longer than
            ``max_seq_len``, unknown keys, ...), naming it.
    """
    r = HFConfigReader(config, "qwen3_moe", aliases={"num_local_experts": "num_experts"})
    num_layers = r.get_int("num_hidden_layers", 24)
    num_heads = r.get_int("num_attention_heads", 32)
    embed_dim = r.get_int("hidden_size", 2048)
    experts_per_token = r.get_int("num_experts_per_tok", 8)
    mlp_only_layers = r.raw("mlp_only_layers", [])
    decoder_sparse_step = r.get_int("decoder_sparse_step", 1)
    max_seq_len = max_seq_len or r.get_int("max_position_embeddings", 32768)
    r.ignore("max_position_embeddings")
    # transformers' Qwen3-MoE applies sliding_window (when use_sliding_window) to every layer; max_window_layers is
    # not read by it.
    window = r.get_int("sliding_window", 4096) if r.get_bool("use_sliding_window", False) else None
    r.ignore("sliding_window", "max_window_layers")
    check_sliding_window("qwen3_moe", window, max_seq_len)
    kwargs = dict(
        vocab_size=r.get_int("vocab_size", 151936),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=r.get_int("num_key_value_heads", 4),
        embed_dim=embed_dim,
        head_dim=r.get_int("head_dim", embed_dim // num_heads),
        dense_hidden_dim=r.get_int("intermediate_size", 6144),
        moe_hidden_dim=r.get_int("moe_intermediate_size", 768),
        num_experts=r.get_int("num_experts", 128),
        experts_per_token=experts_per_token,
        max_seq_len=max_seq_len,
        rope_base=r.rope_theta(default_theta=10_000.0),
        norm_eps=r.get_float("rms_norm_eps", 1e-6),
        norm_topk_prob=r.get_bool("norm_topk_prob", False),
        mlp_only_layers=list(mlp_only_layers),
        decoder_sparse_step=decoder_sparse_step,
        attn_bias=r.get_bool("attention_bias", False),
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
    r.finish()
    return kwargs
