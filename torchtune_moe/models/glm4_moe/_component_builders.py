"""GLM-4.5 and GLM-4.5-Air (transformers' ``Glm4MoeForCausalLM``) on top of :func:`torchtune_moe.models.moe`.

As transformers: grouped-query attention with biases on q, k and v (not on the output projection), an optional
RMSNorm of each query and key head before RoPE (``use_qk_norm``), RoPE over the first ``partial_rotary_factor``
of each head only (:class:`~torchtune_moe.modules.attention.PartialRotaryPositionalEmbeddings`), the first
``first_k_dense_replace`` layers dense, then MoE layers with sigmoid top-K routing (the checkpoint's fixed
``e_score_correction_bias`` added for selection only, optional group limit, renormalised weights times
``routed_scaling_factor``) plus always-on shared experts.
"""

from typing import Optional

from torchtune.modules import TransformerDecoder

from torchtune_moe.models._utils import router_kwargs, set_padding_idx
from torchtune_moe.models.moe import moe

__all__ = ["glm4_moe"]


def glm4_moe(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    head_dim: int,
    dense_hidden_dim: int,
    moe_hidden_dim: int,
    num_experts: int,
    experts_per_token: int,
    max_seq_len: int,
    num_shared_experts: int = 1,
    num_dense_layers: int = 1,
    rope_base: float = 1_000_000.0,
    partial_rotary_factor: float = 0.5,
    norm_eps: float = 1e-5,
    norm_topk_prob: bool = True,
    route_scale: float = 1.0,
    num_expert_groups: int = 1,
    num_limited_groups: int = 1,
    qk_norm: bool = False,
    attn_bias: bool = False,
    attn_dropout: float = 0.0,
    tie_word_embeddings: bool = False,
    activation: str = "silu",
    pad_token_id: Optional[int] = None,
    aux_loss_coeff: float = 0.0,
    **moe_kwargs,
) -> TransformerDecoder:
    """Builds a GLM-4.5-family MoE decoder (names as in config.json in brackets).

    Args:
        vocab_size (int): [vocab_size].
        num_layers (int): [num_hidden_layers] (the published multi-token-prediction layer is not built).
        num_heads (int): [num_attention_heads].
        num_kv_heads (int): [num_key_value_heads].
        embed_dim (int): [hidden_size].
        head_dim (int): [head_dim].
        dense_hidden_dim (int): hidden dim of the dense layers [intermediate_size].
        moe_hidden_dim (int): hidden dim of each routed and shared expert [moe_intermediate_size].
        num_experts (int): routed experts [n_routed_experts].
        experts_per_token (int): [num_experts_per_tok].
        max_seq_len (int): RoPE cache length [max_position_embeddings].
        num_shared_experts (int): shared experts, one FFN of ``num_shared_experts * moe_hidden_dim``
            [n_shared_experts].
        num_dense_layers (int): the first layers are dense [first_k_dense_replace].
        rope_base (float): [rope_theta].
        partial_rotary_factor (float): RoPE covers ``int(head_dim * factor)`` channels of each head
            [partial_rotary_factor].
        norm_eps (float): [rms_norm_eps].
        norm_topk_prob (bool): renormalise the top-K weights [norm_topk_prob].
        route_scale (float): multiplies the routed weights [routed_scaling_factor].
        num_expert_groups (int): [n_group]; 1 = no group limit.
        num_limited_groups (int): groups a token may use [topk_group].
        qk_norm (bool): RMSNorm of each query and key head before RoPE [use_qk_norm].
        attn_bias (bool): biases on q, k, v [attention_bias].
        attn_dropout (float): [attention_dropout].
        tie_word_embeddings (bool): [tie_word_embeddings].
        activation (str): [hidden_act].
        pad_token_id (Optional[int]): embedding row without gradient [pad_token_id].
        aux_loss_coeff (float): per-layer load-balancing loss coefficient (the published models balance with the
            bias instead: default 0).
        **moe_kwargs: training options of :func:`torchtune_moe.models.moe` (``expert_bias_update_rate`` to keep
            updating the bias, ``z_loss_coeff``, ``router``, ...).
    """
    if not 0 <= num_dense_layers < num_layers:
        raise ValueError(f"num_dense_layers must be in 0..{num_layers - 1} (at least one MoE layer), got {num_dense_layers}")
    if num_shared_experts < 0:
        raise ValueError(f"num_shared_experts must be >= 0, got {num_shared_experts}")
    if not 0 < partial_rotary_factor <= 1:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor}")
    groups = {}
    if num_expert_groups != 1 or num_limited_groups != 1:
        groups = dict(num_expert_groups=num_expert_groups, num_limited_groups=num_limited_groups)
    options = dict(score_func="sigmoid", route_scale=route_scale, expert_bias=True, **groups, **moe_kwargs)
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
        moe_layer_ids=list(range(num_dense_layers, num_layers)),
        dense_hidden_dim=dense_hidden_dim if num_dense_layers else None,
        shared_expert_hidden_dim=num_shared_experts * moe_hidden_dim,
        rope_base=rope_base,
        rotary_dim=int(head_dim * partial_rotary_factor),
        norm_eps=norm_eps,
        qk_norm="head" if qk_norm else None,
        attn_bias=attn_bias,
        attn_output_bias=False,
        attn_dropout=attn_dropout,
        tie_word_embeddings=tie_word_embeddings,
        activation=activation,
        aux_loss_coeff=aux_loss_coeff,
        **router_kwargs(norm_topk_prob, options),
    )
    set_padding_idx(model, pad_token_id)
    return model
