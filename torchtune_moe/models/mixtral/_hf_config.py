"""Mixtral ``config.json`` -> :func:`~torchtune_moe.models.mixtral.mixtral` arguments."""

from typing import Optional

from torchtune_moe.models._hf_config import HFConfigReader
from torchtune_moe.models._utils import check_sliding_window, hf_aux_loss_coeff

__all__ = ["mixtral_hf_config_to_kwargs"]


def mixtral_hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None) -> dict:
    """:func:`mixtral` kwargs from a config.json (defaults as transformers' ``MixtralConfig``).

    Raises:
        ValueError: an option that cannot be reproduced (router jitter noise, rope scaling, a sliding window
            shorter than ``max_seq_len``, unknown keys, ...), naming it.
    """
    r = HFConfigReader(config, "mixtral", aliases={"num_experts": "num_local_experts"})
    num_layers = r.get_int("num_hidden_layers", 32)
    num_heads = r.get_int("num_attention_heads", 32)
    embed_dim = r.get_int("hidden_size", 4096)
    experts_per_token = r.get_int("num_experts_per_tok", 2)
    max_seq_len = max_seq_len or r.get_int("max_position_embeddings", 4096 * 32)
    r.ignore("max_position_embeddings")
    window = r.raw("sliding_window")
    if window is not None:
        window = r.get_int("sliding_window")
    check_sliding_window("mixtral", window, max_seq_len)
    if r.get_float("router_jitter_noise", 0.0) != 0.0:
        r.refuse("router_jitter_noise", "multiplicative router input noise in training is not reproduced; set it to 0")
    kwargs = dict(
        vocab_size=r.get_int("vocab_size", 32000),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=r.get_int("num_key_value_heads", num_heads),
        embed_dim=embed_dim,
        head_dim=r.get_int("head_dim", embed_dim // num_heads),
        moe_hidden_dim=r.get_int("intermediate_size", 14336),
        num_experts=r.get_int("num_local_experts", 8),
        experts_per_token=experts_per_token,
        max_seq_len=max_seq_len,
        rope_base=r.rope_theta(default_theta=1_000_000.0),
        norm_eps=r.get_float("rms_norm_eps", 1e-5),
        attn_dropout=r.get_float("attention_dropout", 0.0),
        tie_word_embeddings=r.get_bool("tie_word_embeddings", False),
        activation=r.activation(),
        pad_token_id=r.raw("pad_token_id"),
        aux_loss_coeff=hf_aux_loss_coeff(r.get_float("router_aux_loss_coef", 0.001), experts_per_token, num_layers),
    )
    r.finish()
    return kwargs
