"""OLMoE (OLMoE-1B-7B) on top of :func:`torchtune_moe.models.moe`.

As transformers' ``OlmoeForCausalLM``: RMSNorm over the *whole* query and key projections (``q_norm`` of
``hidden_size``, ``k_norm`` of ``num_kv_heads * head_dim``) before RoPE, then the optional clamp of q, k, v to
``[-clip_qkv, clip_qkv]`` (after the norm, as transformers does), every layer an MoE, softmax top-K routing with
optional renormalisation (``norm_topk_prob``), ``attention_bias`` on q, k, v and the output projection.
"""

from typing import Optional

from torchtune.modules import TransformerDecoder

from torchtune_moe.models._utils import renamed_arguments, router_kwargs, set_padding_idx
from torchtune_moe.models.moe import moe

__all__ = ["olmoe"]


@renamed_arguments(moe_intermediate_dim="moe_hidden_dim")
def olmoe(
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
    rope_base: float = 10_000.0,
    norm_eps: float = 1e-5,
    norm_topk_prob: bool = False,
    clip_qkv: Optional[float] = None,
    attn_bias: bool = False,
    attn_dropout: float = 0.0,
    tie_word_embeddings: bool = False,
    activation: str = "silu",
    pad_token_id: Optional[int] = None,
    aux_loss_coeff: float = 0.0,
    **moe_kwargs,
) -> TransformerDecoder:
    """Builds an OLMoE decoder (names as in config.json in brackets).

    Args:
        vocab_size (int): [vocab_size].
        num_layers (int): [num_hidden_layers].
        num_heads (int): [num_attention_heads].
        num_kv_heads (int): [num_key_value_heads].
        embed_dim (int): [hidden_size]; ``head_dim`` is ``embed_dim // num_heads``.
        moe_hidden_dim (int): hidden dim of each expert [intermediate_size] (was ``moe_intermediate_dim``).
        num_experts (int): [num_experts].
        experts_per_token (int): [num_experts_per_tok].
        max_seq_len (int): RoPE cache length [max_position_embeddings].
        rope_base (float): [rope_theta].
        norm_eps (float): [rms_norm_eps], also of the q/k norms.
        norm_topk_prob (bool): renormalise the top-K weights [norm_topk_prob].
        clip_qkv (Optional[float]): clamp q, k, v [clip_qkv].
        attn_bias (bool): biases on q, k, v and output projections [attention_bias].
        attn_dropout (float): [attention_dropout].
        tie_word_embeddings (bool): [tie_word_embeddings].
        activation (str): [hidden_act].
        pad_token_id (Optional[int]): embedding row without gradient [pad_token_id] (1 in OLMoE-1B-7B).
        aux_loss_coeff (float): per-layer load-balancing loss coefficient.
        **moe_kwargs: training options of :func:`torchtune_moe.models.moe`.
    """
    model = moe(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        moe_hidden_dim=moe_hidden_dim,
        rope_base=rope_base,
        norm_eps=norm_eps,
        qk_norm="full",
        clip_qkv=clip_qkv,
        attn_bias=attn_bias,
        attn_output_bias=attn_bias,
        attn_dropout=attn_dropout,
        tie_word_embeddings=tie_word_embeddings,
        activation=activation,
        aux_loss_coeff=aux_loss_coeff,
        **router_kwargs(norm_topk_prob, moe_kwargs),
    )
    set_padding_idx(model, pad_token_id)
    return model
