"""Qwen3-MoE ``config.json`` -> :func:`~torchtune_moe.models.qwen3_moe.qwen3_moe` arguments."""

from typing import Optional

from torchtune_moe.models._hf_config import HFConfigReader
from torchtune_moe.models._utils import check_sliding_window, hf_aux_loss_coeff, hf_moe_layer_ids

__all__ = ["qwen3_moe_hf_config_to_kwargs"]

# transformers' Qwen3MoeConfig defaults, for keys a config.json leaves out.
_DEFAULTS = dict(
    vocab_size=151936, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4, hidden_size=2048,
    num_experts=128, num_experts_per_tok=8, max_position_embeddings=32768, rope_theta=10_000.0, rms_norm_eps=1e-6,
)


def qwen3_moe_hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None) -> dict:
    """:func:`qwen3_moe` kwargs from a config.json (defaults as transformers' ``Qwen3MoeConfig``).

    Raises:
        ValueError: an option that cannot be reproduced (rope scaling, sliding window longer than
            ``max_seq_len``, unknown keys, ...), naming it.
    """
    r = HFConfigReader(config, "qwen3_moe", aliases={"num_local_experts": "num_experts"})
    kwargs = r.decoder(_DEFAULTS, max_seq_len)
    # transformers' Qwen3-MoE applies sliding_window (when use_sliding_window) to every layer; max_window_layers is
    # not read by it.
    window = r.get_int("sliding_window", 4096) if r.get_bool("use_sliding_window", False) else None
    r.ignore("sliding_window", "max_window_layers")
    check_sliding_window("qwen3_moe", window, kwargs["max_seq_len"])
    mlp_only_layers = list(r.raw("mlp_only_layers", []))
    decoder_sparse_step = r.get_int("decoder_sparse_step", 1)
    moe_layers = hf_moe_layer_ids(kwargs["num_layers"], mlp_only_layers, decoder_sparse_step)
    kwargs.update(
        dense_hidden_dim=r.get_int("intermediate_size", 6144),
        moe_hidden_dim=r.get_int("moe_intermediate_size", 768),
        norm_topk_prob=r.get_bool("norm_topk_prob", False),
        mlp_only_layers=mlp_only_layers,
        decoder_sparse_step=decoder_sparse_step,
        attn_bias=r.get_bool("attention_bias", False),
        aux_loss_coeff=hf_aux_loss_coeff(
            r.get_float("router_aux_loss_coef", 0.001), kwargs["experts_per_token"], len(moe_layers)
        ),
    )
    r.finish()
    return kwargs
