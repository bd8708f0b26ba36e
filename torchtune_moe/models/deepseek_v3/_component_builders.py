"""DeepSeek-V3 (and Moonlight; DeepSeek-V2 with softmax routing) on top of :func:`torchtune_moe.models.moe`, as transformers'
``DeepseekV3ForCausalLM``: multi-head latent attention
(:class:`~torchtune_moe.modules.attention.MultiHeadLatentAttention`) with optional YaRN RoPE and its softmax
scale, the first ``first_k_dense_replace`` layers dense, then MoE layers with sigmoid top-K routing (the
checkpoint's fixed ``e_score_correction_bias`` added for selection only, group-limited routing, renormalised
weights times ``routed_scaling_factor``) plus always-on shared experts.
"""

from typing import Optional

from torchtune.models.qwen2 import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._utils import router_kwargs, set_padding_idx
from torchtune_moe.models.moe import moe
from torchtune_moe.modules.attention import MultiHeadLatentAttention, YarnRotaryPositionalEmbeddings, yarn_mscale

__all__ = ["deepseek_v3"]

_YARN_KEYS = ("factor", "original_max_seq_len", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "attention_factor", "truncate")


def _rope_and_scale(head_dim: int, rope_dim: int, max_seq_len: int, base: float, yarn: Optional[dict]):
    """The RoPE module and the softmax scale: plain RoPE and ``head_dim ** -0.5``, or YaRN with cos/sin scaled by
    ``attention_factor`` (default ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``) and the softmax
    scale times ``mscale(factor, mscale_all_dim) ** 2``, as transformers' DeepSeek-V3."""
    if yarn is None:
        return Qwen2RotaryPositionalEmbeddings(dim=rope_dim, max_seq_len=max_seq_len, base=base), head_dim**-0.5
    unknown = sorted(set(yarn) - set(_YARN_KEYS))
    if unknown or "factor" not in yarn or "original_max_seq_len" not in yarn:
        raise ValueError(f"yarn takes factor, original_max_seq_len and optionally {list(_YARN_KEYS[2:])}; got {sorted(yarn)}")
    factor, mscale, mscale_all_dim = yarn["factor"], yarn.get("mscale"), yarn.get("mscale_all_dim")
    attention_factor = yarn.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
            else yarn_mscale(factor)
        )
    rope = YarnRotaryPositionalEmbeddings(
        dim=rope_dim, max_seq_len=max_seq_len, base=base, factor=factor,
        original_max_seq_len=yarn["original_max_seq_len"], beta_fast=yarn.get("beta_fast") or 32.0,
        beta_slow=yarn.get("beta_slow") or 1.0, attention_factor=attention_factor, truncate=yarn.get("truncate", True),
    )
    scale = head_dim**-0.5 * (yarn_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0)
    return rope, scale


def deepseek_v3(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    embed_dim: int,
    dense_hidden_dim: int,
    moe_hidden_dim: int,
    num_experts: int,
    experts_per_token: int,
    max_seq_len: int,
    kv_lora_rank: int,
    q_lora_rank: Optional[int] = None,
    qk_nope_head_dim: int = 128,
    qk_rope_head_dim: int = 64,
    v_head_dim: int = 128,
    num_shared_experts: int = 1,
    num_dense_layers: int = 1,
    rope_base: float = 10_000.0,
    yarn: Optional[dict] = None,
    rope_interleave: bool = True,
    norm_eps: float = 1e-6,
    score_func: str = "sigmoid",
    expert_bias: bool = True,
    norm_topk_prob: bool = True,
    route_scale: float = 1.0,
    num_expert_groups: int = 1,
    num_limited_groups: int = 1,
    attn_bias: bool = False,
    attn_dropout: float = 0.0,
    tie_word_embeddings: bool = False,
    activation: str = "silu",
    pad_token_id: Optional[int] = None,
    aux_loss_coeff: float = 0.0,
    **moe_kwargs,
) -> TransformerDecoder:
    """Builds a DeepSeek-V3-family decoder (names as in config.json in brackets).

    Args:
        vocab_size (int): [vocab_size].
        num_layers (int): [num_hidden_layers] (the published multi-token-prediction layer is not built).
        num_heads (int): [num_attention_heads].
        embed_dim (int): [hidden_size].
        dense_hidden_dim (int): hidden dim of the dense layers [intermediate_size].
        moe_hidden_dim (int): hidden dim of each routed and shared expert [moe_intermediate_size].
        num_experts (int): routed experts [n_routed_experts].
        experts_per_token (int): [num_experts_per_tok].
        max_seq_len (int): RoPE cache length [max_position_embeddings].
        kv_lora_rank (int): rank of the key/value latent [kv_lora_rank].
        q_lora_rank (Optional[int]): rank of the query latent, None = direct q projection [q_lora_rank].
        qk_nope_head_dim (int): query/key channels without RoPE [qk_nope_head_dim].
        qk_rope_head_dim (int): query/key channels with RoPE [qk_rope_head_dim].
        v_head_dim (int): [v_head_dim].
        num_shared_experts (int): shared experts, one FFN of ``num_shared_experts * moe_hidden_dim``
            [n_shared_experts].
        num_dense_layers (int): the first layers are dense [first_k_dense_replace].
        rope_base (float): [rope_theta].
        yarn (Optional[dict]): YaRN RoPE scaling [rope_scaling of type yarn]: ``factor``,
            ``original_max_seq_len`` [original_max_position_embeddings], optionally ``beta_fast``, ``beta_slow``,
            ``mscale``, ``mscale_all_dim``, ``attention_factor``, ``truncate``. None: plain RoPE.
        rope_interleave (bool): RoPE channels in interleaved pairs [rope_interleave].
        norm_eps (float): [rms_norm_eps] (the latent norms use 1e-6, as transformers).
        score_func (str): ``"sigmoid"`` (V3) or ``"softmax"`` (V2) router scores [scoring_func].
        expert_bias (bool): the routers hold the checkpoint's selection bias [e_score_correction_bias; V2 has none].
        norm_topk_prob (bool): renormalise the top-K weights [norm_topk_prob].
        route_scale (float): multiplies the routed weights [routed_scaling_factor].
        num_expert_groups (int): [n_group]; 1 = no group limit.
        num_limited_groups (int): groups a token may use [topk_group].
        attn_bias (bool): biases on ``q_a_proj``, ``kv_a_proj`` and the output projection [attention_bias].
        attn_dropout (float): [attention_dropout].
        tie_word_embeddings (bool): [tie_word_embeddings].
        activation (str): [hidden_act].
        pad_token_id (Optional[int]): embedding row without gradient [pad_token_id].
        aux_loss_coeff (float): per-layer load-balancing loss coefficient (the published models balance with the
            bias: default 0).
        **moe_kwargs: training options of :func:`torchtune_moe.models.moe` (``expert_bias_update_rate`` to keep
            updating the bias, ``seq_aux_loss_coeff``, ``z_loss_coeff``, ``router``, ...).
    """
    if not 0 <= num_dense_layers < num_layers:
        raise ValueError(f"num_dense_layers must be in 0..{num_layers - 1} (at least one MoE layer), got {num_dense_layers}")
    if num_shared_experts < 0:
        raise ValueError(f"num_shared_experts must be >= 0, got {num_shared_experts}")
    qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
    rope, softmax_scale = _rope_and_scale(qk_head_dim, qk_rope_head_dim, max_seq_len, rope_base, yarn)

    def attention(_: int) -> MultiHeadLatentAttention:
        return MultiHeadLatentAttention(
            embed_dim=embed_dim, num_heads=num_heads, qk_nope_head_dim=qk_nope_head_dim,
            qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim, kv_lora_rank=kv_lora_rank,
            q_lora_rank=q_lora_rank, pos_embeddings=rope, max_seq_len=max_seq_len, softmax_scale=softmax_scale,
            rope_interleave=rope_interleave, attn_bias=attn_bias, attn_dropout=attn_dropout,
        )

    groups = {}
    if num_expert_groups != 1 or num_limited_groups != 1:
        groups = dict(num_expert_groups=num_expert_groups, num_limited_groups=num_limited_groups)
    options = dict(score_func=score_func, route_scale=route_scale, expert_bias=expert_bias, **groups, **moe_kwargs)
    model = moe(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        embed_dim=embed_dim,
        head_dim=qk_head_dim,
        max_seq_len=max_seq_len,
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        moe_hidden_dim=moe_hidden_dim,
        moe_layer_ids=list(range(num_dense_layers, num_layers)),
        dense_hidden_dim=dense_hidden_dim if num_dense_layers else None,
        shared_expert_hidden_dim=num_shared_experts * moe_hidden_dim,
        attention=attention,
        norm_eps=norm_eps,
        tie_word_embeddings=tie_word_embeddings,
        activation=activation,
        aux_loss_coeff=aux_loss_coeff,
        **router_kwargs(norm_topk_prob, options),
    )
    set_padding_idx(model, pad_token_id)
    return model
