"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B) on top of :func:`torchtune_moe.models.moe`.

As transformers' ``Qwen3MoeForCausalLM``: RMSNorm of each query and key head *before* RoPE (``q_norm``/``k_norm``
over ``head_dim``), ``head_dim`` independent of ``embed_dim // num_heads``, softmax top-K routing with optional
renormalisation (``norm_topk_prob``), no shared expert, dense SwiGLU layers where ``mlp_only_layers`` /
``decoder_sparse_step`` say so, ``attention_bias`` on q, k, v *and* the output projection.
"""

from typing import Optional, Sequence

from torchtune.modules import TransformerDecoder

from torchtune_moe.models._utils import hf_moe_layer_ids, renamed_arguments, router_kwargs, set_padding_idx
from torchtune_moe.models.moe import moe

__all__ = ["qwen3_moe"]


@renamed_arguments(intermediate_dim="dense_hidden_dim", moe_intermediate_dim="moe_hidden_dim")
def qwen3_moe(
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
    rope_base: float = 1_000_000.0,
    norm_eps: float = 1e-6,
    norm_topk_prob: bool = True,
    mlp_only_layers: Sequence[int] = (),
    decoder_sparse_step: int = 1,
    attn_bias: bool = False,
    attn_dropout: float = 0.0,
    tie_word_embeddings: bool = False,
    activation: str = "silu",
    pad_token_id: Optional[int] = None,
    aux_loss_coeff: float = 0.0,
    **moe_kwargs,
) -> TransformerDecoder:
    """Builds a Qwen3-MoE decoder (names as in config.json in brackets).

    Args:
        vocab_size (int): [vocab_size].
        num_layers (int): [num_hidden_layers].
        num_heads (int): [num_attention_heads].
        num_kv_heads (int): [num_key_value_heads].
        embed_dim (int): [hidden_size].
        head_dim (int): [head_dim].
        dense_hidden_dim (int): hidden dim of the dense layers [intermediate_size] (was ``intermediate_dim``).
        moe_hidden_dim (int): hidden dim of each expert [moe_intermediate_size] (was ``moe_intermediate_dim``).
        num_experts (int): [num_experts].
        experts_per_token (int): [num_experts_per_tok].
        max_seq_len (int): RoPE cache length [max_position_embeddings].
        rope_base (float): [rope_theta].
        norm_eps (float): [rms_norm_eps], also of the q/k norms.
        norm_topk_prob (bool): renormalise the top-K weights to sum to 1 [norm_topk_prob].
        mlp_only_layers (Sequence[int]): dense layers [mlp_only_layers].
        decoder_sparse_step (int): layer i is MoE when ``(i + 1) % step == 0`` [decoder_sparse_step].
        attn_bias (bool): biases on q, k, v and output projections [attention_bias].
        attn_dropout (float): [attention_dropout].
        tie_word_embeddings (bool): [tie_word_embeddings].
        activation (str): [hidden_act].
        pad_token_id (Optional[int]): embedding row without gradient [pad_token_id].
        aux_loss_coeff (float): per-layer load-balancing loss coefficient (see
            :func:`torchtune_moe.models._utils.hf_aux_loss_coeff` for the published value's equivalent).
        **moe_kwargs: training options of :func:`torchtune_moe.models.moe` (``z_loss_coeff``, ``router``,
            ``expert_bias_update_rate``, ...).
    """
    moe_ids = hf_moe_layer_ids(num_layers, mlp_only_layers, decoder_sparse_step)
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
        moe_layer_ids=moe_ids,
        dense_hidden_dim=dense_hidden_dim if len(moe_ids) < num_layers else None,
        rope_base=rope_base,
        norm_eps=norm_eps,
        qk_norm="head",
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
