"""GPT-OSS (transformers' ``GptOssForCausalLM``) on top of :func:`torchtune_moe.models.moe`.

As transformers: grouped-query attention with biases on q, k, v and the output projection, attention sinks (a
learned logit per head in the softmax denominator) and, per ``layer_types``, a sliding window or full causal
attention (:class:`~torchtune_moe.modules.attention.SinkAttention`); YaRN RoPE (rotate-half, cos and sin scaled
by its attention factor, softmax scale ``head_dim ** -0.5``); every layer MoE, routed by a gate with a bias
(top-K logits, softmax over the K: the token-choice router's softmax with ``norm_topk_prob``); experts with
biases and the clamped SwiGLU ``(clamp(up) + 1) * g * sigmoid(alpha * g)`` over interleaved gate/up rows
(:class:`~torchtune_moe.modules.moe_linear.ClampedSwiGLU`). No shared expert.
"""

from typing import Optional

from torch import nn
from torchtune.models.qwen2 import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._utils import router_kwargs, set_padding_idx
from torchtune_moe.models.moe import moe
from torchtune_moe.modules.attention import SinkAttention, YarnRotaryPositionalEmbeddings, yarn_mscale
from torchtune_moe.modules.moe_linear import ClampedSwiGLU

__all__ = ["gpt_oss"]

_YARN_KEYS = ("factor", "original_max_seq_len", "beta_fast", "beta_slow", "attention_factor", "truncate")
_LAYER_TYPES = ("sliding_attention", "full_attention")


def _rope(head_dim: int, max_seq_len: int, base: float, yarn: Optional[dict]) -> nn.Module:
    """Plain RoPE, or YaRN with cos/sin scaled by ``attention_factor`` (default ``0.1 * ln(factor) + 1``), as
    transformers' ``_compute_yarn_parameters``; GPT-OSS keeps the softmax scale at ``head_dim ** -0.5``."""
    if yarn is None:
        return Qwen2RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=base)
    unknown = sorted(set(yarn) - set(_YARN_KEYS))
    if unknown or "factor" not in yarn or "original_max_seq_len" not in yarn:
        raise ValueError(f"yarn takes factor, original_max_seq_len and optionally {list(_YARN_KEYS[2:])}; got {sorted(yarn)}")
    attention_factor = yarn.get("attention_factor")
    return YarnRotaryPositionalEmbeddings(
        dim=head_dim, max_seq_len=max_seq_len, base=base, factor=yarn["factor"],
        original_max_seq_len=yarn["original_max_seq_len"], beta_fast=yarn.get("beta_fast") or 32.0,
        beta_slow=yarn.get("beta_slow") or 1.0,
        attention_factor=yarn_mscale(yarn["factor"]) if attention_factor is None else attention_factor,
        truncate=yarn.get("truncate", True),
    )


def gpt_oss(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    head_dim: int,
    moe_hidden_dim: int,
    num_experts: int,
    experts_per_token: int,
    max_seq_len: int,
    rope_base: float = 150000.0,
    yarn: Optional[dict] = None,
    sliding_window: Optional[int] = 128,
    layer_types: Optional[list[str]] = None,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    norm_eps: float = 1e-5,
    attn_bias: bool = True,
    attn_dropout: float = 0.0,
    tie_word_embeddings: bool = False,
    pad_token_id: Optional[int] = None,
    aux_loss_coeff: float = 0.0,
    **moe_kwargs,
) -> TransformerDecoder:
    """Builds a GPT-OSS decoder (names as in config.json in brackets).

    Args:
        vocab_size (int): [vocab_size].
        num_layers (int): [num_hidden_layers].
        num_heads (int): [num_attention_heads].
        num_kv_heads (int): [num_key_value_heads].
        embed_dim (int): [hidden_size].
        head_dim (int): [head_dim].
        moe_hidden_dim (int): hidden dim of each expert [intermediate_size].
        num_experts (int): [num_local_experts].
        experts_per_token (int): [num_experts_per_tok].
        max_seq_len (int): RoPE cache length [max_position_embeddings].
        rope_base (float): [rope_theta].
        yarn (Optional[dict]): YaRN RoPE: ``factor``, ``original_max_seq_len`` and optionally ``beta_fast``,
            ``beta_slow``, ``attention_factor``, ``truncate`` [rope_parameters]; None: plain RoPE.
        sliding_window (Optional[int]): window of the sliding-attention layers [sliding_window].
        layer_types (Optional[list[str]]): ``"sliding_attention"`` or ``"full_attention"`` per layer
            [layer_types]; None: alternating, starting with sliding.
        swiglu_alpha (float): [swiglu_alpha].
        swiglu_limit (float): [swiglu_limit].
        norm_eps (float): [rms_norm_eps].
        attn_bias (bool): biases on q, k, v and the output projection [attention_bias].
        attn_dropout (float): [attention_dropout].
        tie_word_embeddings (bool): [tie_word_embeddings].
        pad_token_id (Optional[int]): embedding row without gradient [pad_token_id].
        aux_loss_coeff (float): per-layer load-balancing loss coefficient (from [router_aux_loss_coef], see
            :func:`torchtune_moe.models._utils.hf_aux_loss_coeff`).
        **moe_kwargs: training options of :func:`torchtune_moe.models.moe` (``z_loss_coeff``, ``router``, ...).
    """
    if layer_types is None:
        layer_types = [_LAYER_TYPES[(i + 1) % 2 == 0] for i in range(num_layers)]
    layer_types = list(layer_types)
    if len(layer_types) != num_layers or any(t not in _LAYER_TYPES for t in layer_types):
        raise ValueError(f"layer_types must hold {num_layers} entries, each one of {list(_LAYER_TYPES)}; got {layer_types}")
    if sliding_window is None and "sliding_attention" in layer_types:
        raise ValueError("sliding_window is required when layer_types has sliding_attention layers")
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    rope = _rope(head_dim, max_seq_len, rope_base, yarn)

    def attention(i: int) -> nn.Module:
        return SinkAttention(
            sliding_window=sliding_window if layer_types[i] == "sliding_attention" else None,
            embed_dim=num_heads * head_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=attn_bias),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=attn_bias),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=attn_bias),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=attn_bias),
            pos_embeddings=rope,
            max_seq_len=max_seq_len,
            attn_dropout=attn_dropout,
        )

    options = dict(gate_bias=True, **moe_kwargs)
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
        attention=attention,
        norm_eps=norm_eps,
        tie_word_embeddings=tie_word_embeddings,
        activation=ClampedSwiGLU(swiglu_alpha, swiglu_limit),
        expert_linear_bias=True,
        aux_loss_coeff=aux_loss_coeff,
        **router_kwargs(True, options),
    )
    set_padding_idx(model, pad_token_id)
    return model
