"""OLMoE ``config.json`` -> :func:`~torchtune_moe.models.olmoe.olmoe` arguments."""

from typing import Optional

from torchtune_moe.models._hf_config import HFConfigReader
from torchtune_moe.models._utils import hf_aux_loss_coeff

__all__ = ["olmoe_hf_config_to_kwargs"]


def olmoe_hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None) -> dict:
    """:func:`olmoe` kwargs from a config.json (defaults as transformers' ``OlmoeConfig``).

    Raises:
        ValueError: an option that cannot be reproduced, naming it.
    """
    r = HFConfigReader(config, "olmoe", aliases={"num_local_experts": "num_experts"})
    num_layers = r.get_int("num_hidden_layers", 16)
    num_heads = r.get_int("num_attention_heads", 16)
    embed_dim = r.get_int("hidden_size", 2048)
    experts_per_token = r.get_int("num_experts_per_tok", 8)
    if embed_dim % num_heads:
        r.refuse("hidden_size", f"must be divisible by num_attention_heads ({num_heads})")
    head_dim = r.raw("head_dim")
    if head_dim is not None and head_dim != embed_dim // num_heads:
        # transformers' OLMoE sizes q_norm by hidden_size and k_norm by (hidden_size // heads) * kv_heads.
        r.refuse("head_dim", f"OLMoE's q/k norms need head_dim = hidden_size // num_attention_heads ({embed_dim // num_heads})")
    clip_qkv = r.raw("clip_qkv")
    if clip_qkv is not None:
        clip_qkv = r.get_float("clip_qkv")
    kwargs = dict(
        vocab_size=r.get_int("vocab_size", 50304),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=r.get_int("num_key_value_heads", num_heads),
        embed_dim=embed_dim,
        moe_hidden_dim=r.get_int("intermediate_size", 2048),
        num_experts=r.get_int("num_experts", 64),
        experts_per_token=experts_per_token,
        max_seq_len=max_seq_len or r.get_int("max_position_embeddings", 4096),
        rope_base=r.rope_theta(default_theta=10_000.0),
        norm_eps=r.get_float("rms_norm_eps", 1e-5),
        norm_topk_prob=r.get_bool("norm_topk_prob", False),
        clip_qkv=clip_qkv,
        attn_bias=r.get_bool("attention_bias", False),
        attn_dropout=r.get_float("attention_dropout", 0.0),
        tie_word_embeddings=r.get_bool("tie_word_embeddings", False),
        activation=r.activation(),
        pad_token_id=config["pad_token_id"] if "pad_token_id" in config else 1,  # OlmoeConfig default: 1
        aux_loss_coeff=hf_aux_loss_coeff(r.get_float("router_aux_loss_coef", 0.01), experts_per_token, num_layers),
    )
    r.ignore("max_position_embeddings", "pad_token_id")
    r.finish()
    return kwargs
