"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B) on top of :func:`torchtune_moe.models.moe`.

As transformers' ``Qwen2MoeForCausalLM``: biases on the q, k, v projections (``qkv_bias``, none on the output
projection), no q/k norm, softmax top-K routing with optional renormalisation (``norm_topk_prob``), a shared
SwiGLU expert of ``shared_expert_intermediate_size`` added to every MoE layer's output and scaled by
``sigmoid(shared_expert_gate(x))``, dense SwiGLU layers where ``mlp_only_layers`` / ``decoder_sparse_step`` say so.
"""

from typing import Optional, Sequence

from torchtune.modules import TransformerDecoder

from torchtune_moe.models._utils import hf_moe_layer_ids, renamed_arguments, router_kwargs, set_padding_idx
from torchtune_moe.models.moe import moe

__all__ = ["qwen2_moe"]


@renamed_arguments(
    intermediate_dim="dense_hidden_dim",
    moe_intermediate_dim="moe_hidden_dim",
    shared_expert_intermediate_dim="shared_expert_hidden_dim",
)
def qwen2_moe(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    dense_hidden_dim: int,
    moe_hidden_dim: int,
    shared_expert_hidden_dim: int,
    num_experts: int,
    experts_per_token: int,
    max_seq_len: int,
    head_dim: Optional[int] = None,
    rope_base: float = 1_000_000.0,
    norm_eps: float = 1e-6,
    norm_topk_prob: bool = False,
    mlp_only_layers: Sequence[int] = (),
    decoder_sparse_step: int = 1,
    qkv_bias: bool = True,
    attn_dropout: float = 0.0,
    tie_word_embeddings: bool = False,
    activation: str = "silu",
    pad_token_id: Optional[int] = None,
    aux_loss_coeff: float = 0.0,
    **moe_kwargs,
) -> TransformerDecoder:
    """Builds a Qwen2-MoE decoder (names as in config.json in brackets).

    Args:
        vocab_size (int): [vocab_size].
        num_layers (int): [num_hidden_layers].
        num_heads (int): [num_attention_heads].
        num_kv_heads (int): [num_key_value_heads].
        embed_dim (int): [hidden_size].
        dense_hidden_dim (int): hidden dim of the dense layers [intermediate_size] (was ``intermediate_dim``).
        moe_hidden_dim (int): hidden dim of each routed expert [moe_intermediate_size] (was
            ``moe_intermediate_dim``).
        shared_expert_hidden_dim (int): hidden dim of the shared expert [shared_expert_intermediate_size] (was
            ``shared_expert_intermediate_dim``).
        num_experts (int): [num_experts].
        experts_per_token (int): [num_experts_per_tok].
        max_seq_len (int): RoPE cache length [max_position_embeddings].
        head_dim (Optional[int]): [head_dim], default ``embed_dim // num_heads``.
        rope_base (float): [rope_theta].
        norm_eps (float): [rms_norm_eps].
        norm_topk_prob (bool): renormalise the top-K weights [norm_topk_prob].
        mlp_only_layers (Sequence[int]): dense layers [mlp_only_layers].
        decoder_sparse_step (int): layer i is MoE when ``(i + 1) % step == 0`` [decoder_sparse_step].
        qkv_bias (bool): biases on q, k, v [qkv_bias].
        attn_dropout (float): [attention_dropout].
        tie_word_embeddings (bool): [tie_word_embeddings].
        activation (str): [hidden_act].
        pad_token_id (Optional[int]): embedding row without gradient [pad_token_id].
        aux_loss_coeff (float): per-layer load-balancing loss coefficient.
        **moe_kwargs: training options of :func:`torchtune_moe.models.moe`.
    """
    moe_ids = hf_moe_layer_ids(num_layers, mlp_only_layers, decoder_sparse_step)
    if shared_expert_hidden_dim < 1:
        raise ValueError(
            f"shared_expert_hidden_dim must be >= 1 (Qwen2-MoE always has a gated shared expert), got "
            f"{shared_expert_hidden_dim}"
        )
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
        attn_bias=qkv_bias,
        attn_dropout=attn_dropout,
        tie_word_embeddings=tie_word_embeddings,
        activation=activation,
        shared_expert_hidden_dim=shared_expert_hidden_dim,
        shared_expert_gate=True,
        aux_loss_coeff=aux_loss_coeff,
        **router_kwargs(norm_topk_prob, moe_kwargs),
    )
    set_padding_idx(model, pad_token_id)
    return model
