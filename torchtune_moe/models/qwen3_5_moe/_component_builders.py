"""Qwen3.5-MoE (text model) on top of :func:`torchtune_moe.models.moe`, as transformers' ``Qwen3_5MoeForCausalLM``:
hybrid layers (``layer_types``: Gated DeltaNet linear attention, :class:`~torchtune_moe.modules.linear_attention.
GatedDeltaNet`, three layers in four on the published models; output-gated full attention,
:class:`~torchtune_moe.modules.gated_attention.GatedMultiHeadAttention`, with per-head q/k norms and partial RoPE
in the others), every layer MoE with softmax top-K routing (weights renormalised) and a sigmoid-gated shared
expert, all norms zero-centred (:class:`~torchtune_moe.modules.gated_attention.OffsetRMSNorm`).
"""

from typing import Optional, Sequence

from torch import nn
from torchtune.models.qwen2 import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._utils import router_kwargs, set_padding_idx
from torchtune_moe.models.moe import moe
from torchtune_moe.modules.attention import PartialRotaryPositionalEmbeddings
from torchtune_moe.modules.gated_attention import GatedMultiHeadAttention, OffsetRMSNorm
from torchtune_moe.modules.linear_attention import GatedDeltaNet

__all__ = ["qwen3_5_moe", "LAYER_TYPES"]

#: The token mixers of ``layer_types``.
LAYER_TYPES = ("linear_attention", "full_attention")


def qwen3_5_moe(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    head_dim: int,
    moe_hidden_dim: int,
    shared_expert_hidden_dim: int,
    num_experts: int,
    experts_per_token: int,
    max_seq_len: int,
    layer_types: Sequence[str],
    linear_num_key_heads: int,
    linear_num_value_heads: int,
    linear_key_head_dim: int,
    linear_value_head_dim: int,
    linear_conv_kernel_dim: int = 4,
    linear_chunk_size: int = 64,
    rope_base: float = 10_000.0,
    partial_rotary_factor: float = 0.25,
    norm_eps: float = 1e-6,
    attn_bias: bool = False,
    attn_dropout: float = 0.0,
    tie_word_embeddings: bool = False,
    activation: str = "silu",
    pad_token_id: Optional[int] = None,
    aux_loss_coeff: float = 0.0,
    **moe_kwargs,
) -> TransformerDecoder:
    """Builds a Qwen3.5-MoE text decoder (names as in config.json / ``text_config`` in brackets).

    Args:
        vocab_size (int): [vocab_size].
        num_layers (int): [num_hidden_layers] (the published multi-token-prediction module is not built).
        num_heads (int): query heads of the full-attention layers [num_attention_heads].
        num_kv_heads (int): [num_key_value_heads].
        embed_dim (int): [hidden_size].
        head_dim (int): [head_dim].
        moe_hidden_dim (int): hidden dim of each routed expert [moe_intermediate_size].
        shared_expert_hidden_dim (int): [shared_expert_intermediate_size].
        num_experts (int): [num_experts].
        experts_per_token (int): [num_experts_per_tok].
        max_seq_len (int): RoPE cache length [max_position_embeddings].
        layer_types (Sequence[str]): per layer ``"linear_attention"`` or ``"full_attention"`` [layer_types, or
            every ``full_attention_interval``-th layer full].
        linear_num_key_heads (int): [linear_num_key_heads].
        linear_num_value_heads (int): [linear_num_value_heads].
        linear_key_head_dim (int): [linear_key_head_dim].
        linear_value_head_dim (int): [linear_value_head_dim].
        linear_conv_kernel_dim (int): [linear_conv_kernel_dim].
        linear_chunk_size (int): tokens per chunk of the linear attention's torch path (not a checkpoint value).
        rope_base (float): [rope_parameters.rope_theta].
        partial_rotary_factor (float): RoPE covers ``int(head_dim * factor)`` channels of each head
            [rope_parameters.partial_rotary_factor].
        norm_eps (float): [rms_norm_eps].
        attn_bias (bool): biases on q, k, v and the output projection [attention_bias].
        attn_dropout (float): [attention_dropout].
        tie_word_embeddings (bool): [tie_word_embeddings].
        activation (str): experts' and the convolution's activation [hidden_act].
        pad_token_id (Optional[int]): embedding row without gradient [pad_token_id].
        aux_loss_coeff (float): per-layer load-balancing loss coefficient.
        **moe_kwargs: training options of :func:`torchtune_moe.models.moe` (``z_loss_coeff``, ``router``, ...).

    Raises:
        ValueError: a bad layer type list, RoPE width or linear-attention shape, naming it.
    """
    layer_types = list(layer_types)
    if len(layer_types) != num_layers or any(t not in LAYER_TYPES for t in layer_types):
        raise ValueError(
            f"layer_types must list {num_layers} entries (num_layers) of {list(LAYER_TYPES)}, got {layer_types}"
        )
    if not 0 < partial_rotary_factor <= 1:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor}")
    rotary_dim = int(head_dim * partial_rotary_factor)
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"RoPE width int(head_dim * partial_rotary_factor) = {rotary_dim} must be a positive even number")
    rope = Qwen2RotaryPositionalEmbeddings(dim=rotary_dim, max_seq_len=max_seq_len, base=rope_base)
    if rotary_dim != head_dim:
        rope = PartialRotaryPositionalEmbeddings(rope)

    def attention(i: int) -> nn.Module:
        if layer_types[i] == "linear_attention":
            return GatedDeltaNet(
                embed_dim=embed_dim, num_key_heads=linear_num_key_heads, num_value_heads=linear_num_value_heads,
                key_head_dim=linear_key_head_dim, value_head_dim=linear_value_head_dim,
                conv_kernel_size=linear_conv_kernel_dim, activation=activation, norm_eps=norm_eps,
                chunk_size=linear_chunk_size,
            )
        return GatedMultiHeadAttention(
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, num_heads * head_dim * 2, bias=attn_bias),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=attn_bias),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=attn_bias),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=attn_bias),
            q_norm=OffsetRMSNorm(head_dim, eps=norm_eps), k_norm=OffsetRMSNorm(head_dim, eps=norm_eps),
            pos_embeddings=rope, attn_dropout=attn_dropout,
        )

    options = dict(score_func="softmax", **moe_kwargs)
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
        shared_expert_hidden_dim=shared_expert_hidden_dim,
        shared_expert_gate=True,
        attention=attention,
        norm_eps=norm_eps,
        tie_word_embeddings=tie_word_embeddings,
        activation=activation,
        aux_loss_coeff=aux_loss_coeff,
        **router_kwargs(True, options),  # transformers' router always renormalises the top-K weights
    )
    # moe() builds torchtune's RMSNorm (weight applied as is); Qwen3.5 stores its norms zero-centred.
    for layer in model.layers:
        layer.sa_norm = OffsetRMSNorm(embed_dim, eps=norm_eps)
        layer.mlp_norm = OffsetRMSNorm(embed_dim, eps=norm_eps)
    model.norm = OffsetRMSNorm(embed_dim, eps=norm_eps)
    set_padding_idx(model, pad_token_id)
    return model
