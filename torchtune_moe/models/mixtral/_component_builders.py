"""Mixtral (8x7B, 8x22B) on top of :func:`torchtune_moe.models.moe`.

As transformers' ``MixtralForCausalLM``: GQA attention without biases or q/k norm, every layer an MoE of
SwiGLU experts (``w1`` gate, ``w3`` up, ``w2`` down), softmax top-K routing whose K weights are always
renormalised to sum to 1.
"""

from typing import Optional

from torchtune.modules import TransformerDecoder

from torchtune_moe.models._utils import renamed_arguments, router_kwargs, set_padding_idx
from torchtune_moe.models.moe import moe

__all__ = ["mixtral"]


@renamed_arguments(moe_intermediate_dim="moe_hidden_dim")
def mixtral(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    moe_hidden_dim: int,
    num_experts: int,
    experts_per_token: int,
    max_seq_len: int,
    head_dim: Optional[int] = None,
    rope_base: float = 1_000_000.0,
    norm_eps: float = 1e-5,
    attn_dropout: float = 0.0,
    tie_word_embeddings: bool = False,
    activation: str = "silu",
    pad_token_id: Optional[int] = None,
    aux_loss_coeff: float = 0.0,
    **moe_kwargs,
) -> TransformerDecoder:
    """Builds a Mixtral decoder (names as in config.json in brackets).

    Args:
        vocab_size (int): [vocab_size].
        num_layers (int): [num_hidden_layers].
        num_heads (int): [num_attention_heads].
        num_kv_heads (int): [num_key_value_heads].
        embed_dim (int): [hidden_size].
        moe_hidden_dim (int): hidden dim of each expert [intermediate_size] (was ``moe_intermediate_dim``).
        num_experts (int): [num_local_experts].
        experts_per_token (int): [num_experts_per_tok].
        max_seq_len (int): RoPE cache length [max_position_embeddings].
        head_dim (Optional[int]): [head_dim], default ``embed_dim // num_heads``.
        rope_base (float): [rope_theta].
        norm_eps (float): [rms_norm_eps].
        attn_dropout (float): [attention_dropout].
        tie_word_embeddings (bool): [tie_word_embeddings].
        activation (str): [hidden_act].
        pad_token_id (Optional[int]): embedding row without gradient [pad_token_id].
        aux_loss_coeff (float): per-layer load-balancing loss coefficient.
        **moe_kwargs: training options of :func:`torchtune_moe.models.moe`.
    """
    model = moe(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        head_dim=head_dim,
        max_seq_len=max_seq_len,
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        moe_hidden_dim=moe_hidden_dim,
        rope_base=rope_base,
        norm_eps=norm_eps,
        attn_dropout=attn_dropout,
        tie_word_embeddings=tie_word_embeddings,
        activation=activation,
        aux_loss_coeff=aux_loss_coeff,
        **router_kwargs(True, moe_kwargs),
    )
    set_padding_idx(model, pad_token_id)
    return model
