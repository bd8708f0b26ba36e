"""OLMoE ``config.json`` -> :func:`~torchtune_moe.models.olmoe.olmoe` arguments."""

from typing import Optional

from torchtune_moe.models._hf_config import HFConfigReader
from torchtune_moe.models._utils import hf_aux_loss_coeff

__all__ = ["olmoe_hf_config_to_kwargs"]

# transformers' OlmoeConfig defaults, for keys a config.json leaves out (num_key_value_heads None: the heads).
_DEFAULTS = dict(
    vocab_size=50304, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=None, hidden_size=2048,
    num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096, rope_theta=10_000.0, rms_norm_eps=1e-5,
)


def olmoe_hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None) -> dict:
    """:func:`olmoe` kwargs from a config.json (defaults as transformers' ``OlmoeConfig``).

    Raises:
        ValueError: an option that cannot be reproduced, naming it.
    """
    r = HFConfigReader(config, "olmoe", aliases={"num_local_experts": "num_experts"})
    num_heads = r.get_int("num_attention_heads", _DEFAULTS["num_attention_heads"])
    embed_dim = r.get_int("hidden_size", _DEFAULTS["hidden_size"])
    if embed_dim % num_heads:
        r.refuse("hidden_size", f"must be divisible by num_attention_heads ({num_heads})")
    kwargs = r.decoder(_DEFAULTS, max_seq_len)
    if kwargs.pop("head_dim") != embed_dim // num_heads:
        # transformers' OLMoE sizes q_norm by hidden_size and k_norm by (hidden_size // heads) * kv_heads.
        r.refuse("head_dim", f"OLMoE's q/k norms need head_dim = hidden_size // num_attention_heads ({embed_dim // num_heads})")
    clip_qkv = r.raw("clip_qkv")
    kwargs.update(
        # OlmoeConfig's default is 1 when the key is absent; an explicit null means no padding row.
        pad_token_id=config["pad_token_id"] if "pad_token_id" in config else 1,
        moe_hidden_dim=r.get_int("intermediate_size", 2048),
        norm_topk_prob=r.get_bool("norm_topk_prob", False),
        clip_qkv=None if clip_qkv is None else r.get_float("clip_qkv"),
        attn_bias=r.get_bool("attention_bias", False),
        aux_loss_coeff=hf_aux_loss_coeff(
            r.get_float("router_aux_loss_coef", 0.01), kwargs["experts_per_token"], kwargs["num_layers"]
        ),
    )
    r.finish()
    return kwargs
