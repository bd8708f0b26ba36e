"""Attention pieces torchtune 0.6.1 does not have: partial RoPE, YaRN RoPE and multi-head latent attention.

- :class:`PartialRotaryPositionalEmbeddings` (GLM-4.5): RoPE over the first ``rotary_dim`` channels of each head,
  the rest passed through. torchtune's ``MultiHeadAttention`` takes any ``pos_embeddings`` module, so wrapping
  a rotate-half RoPE of ``rotary_dim`` channels keeps torchtune's attention unchanged.
- :class:`YarnRotaryPositionalEmbeddings` (DeepSeek-V3): rotate-half RoPE with YaRN frequency interpolation
  (Peng et al. 2023) and its cos/sin scaling, as the published DeepSeek-V3 config.json sets (``rope_scaling``
  type ``yarn``, factor 40).
- :class:`MultiHeadLatentAttention` (DeepSeek-V2/V3, Moonlight): does not fit ``MultiHeadAttention``, which
  projects q, k and v from the input with one linear each and uses one head dim. MLA projects k and v from a
  low-rank latent (``kv_a_proj`` -> RMSNorm -> ``kv_b_proj``), optionally q too (``q_lora_rank``), splits each
  query/key head into a RoPE part and a no-RoPE part with one RoPE key shared by all heads, has a value head
  dim of its own and a softmax scale of its own (YaRN's mscale). It reuses torchtune's attention call (SDPA, or
  flex attention for packed samples' ``BlockMask``), so packing works as for the other families.
- :class:`GroupedQueryAttention`: torchtune's ``MultiHeadAttention`` that hands SDPA the key/value heads as they
  are (``enable_gqa=True``) instead of repeating each for its query heads first. torchtune 0.6.1 materialises the
  repeat: a copy of k and v in the forward and a sum over the repeats in the backward, ~0.12 ms per layer at
  Qwen3-30B-A3B's 32 query and 4 key/value heads (8192 tokens, H200), which the fused kernels (cuDNN, flash,
  math) do not need. In self-attention with plain ``nn.Linear`` projections it also computes q, k and v with one
  GEMM over the concatenated weights (~0.1 ms per layer there). The builders' default attention.
- :class:`SinkAttention` (GPT-OSS): torchtune's ``MultiHeadAttention`` (projections, biases, GQA, RoPE) with
  its attention call replaced. Attention sinks (a learned logit per head that joins the softmax denominator and
  attends to nothing) and a sliding window change the softmax itself, which neither SDPA nor torchtune's call
  can express, so this one call is written out; everything around it stays torchtune's.
"""

import math
from typing import Optional

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_mask
from torchtune.models.qwen2 import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import MultiHeadAttention, RMSNorm
from torchtune.modules.attention_utils import _MaskType, _sdpa_or_flex_attention

from torchtune_moe.modules.attention_utils import TrainingOnlySelfAttention

__all__ = [
    "PartialRotaryPositionalEmbeddings",
    "YarnRotaryPositionalEmbeddings",
    "yarn_mscale",
    "MultiHeadLatentAttention",
    "SinkAttention",
    "GroupedQueryAttention",
]


class PartialRotaryPositionalEmbeddings(nn.Module):
    """RoPE on the first ``rope.dim`` channels of each head; the other channels pass unchanged (GLM-4.5's
    ``partial_rotary_factor``, as transformers' ``Glm4MoeAttention``).

    Args:
        rope (nn.Module): a RoPE module over ``rope.dim`` channels (``[b, s, n_h, rope.dim]`` in and out).
    """

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.rope = rope
        self.rotary_dim = rope.dim

    @property
    def base(self) -> float:
        return self.rope.base

    def forward(self, x: torch.Tensor, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` [b, s, n_h, h_d] -> [b, s, n_h, h_d], RoPE applied to ``x[..., :rotary_dim]``."""
        x_rot, x_pass = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat([self.rope(x_rot, input_pos=input_pos), x_pass], dim=-1)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term ``0.1 * mscale * ln(factor) + 1`` (1 for ``factor <= 1``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class YarnRotaryPositionalEmbeddings(Qwen2RotaryPositionalEmbeddings):
    """Rotate-half RoPE with YaRN scaling: frequencies between the ``beta_fast`` and ``beta_slow`` rotation
    counts (over ``original_max_seq_len``) blend linearly from the original ones to ones divided by ``factor``;
    cos and sin are multiplied by ``attention_factor``. Same frequencies as transformers'
    ``_compute_yarn_parameters`` (``truncate`` rounds the blend range to whole channels).

    Args:
        dim (int): RoPE channels per head.
        max_seq_len (int): cache length.
        base (float): RoPE theta.
        factor (float): context extension factor.
        original_max_seq_len (int): pretraining context length (config ``original_max_position_embeddings``).
        beta_fast (float): rotation count above which frequencies are kept.
        beta_slow (float): rotation count below which frequencies are interpolated.
        attention_factor (float): scale of cos and sin.
        truncate (bool): round the blend range to integers.
    """

    def __init__(
        self,
        dim: int,
        max_seq_len: int,
        base: float,
        *,
        factor: float,
        original_max_seq_len: int,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        attention_factor: float = 1.0,
        truncate: bool = True,
    ):
        if not factor > 0 or original_max_seq_len < 1:
            raise ValueError(f"YaRN needs factor > 0 and original_max_seq_len >= 1, got {factor}, {original_max_seq_len}")
        self.factor = factor
        self.original_max_seq_len = original_max_seq_len
        self.beta_fast = beta_fast
        self.beta_slow = beta_slow
        self.attention_factor = attention_factor
        self.truncate = truncate
        super().__init__(dim=dim, max_seq_len=max_seq_len, base=base)

    def _correction_dim(self, rotations: float) -> float:
        """The channel whose frequency turns ``rotations`` times over the original context."""
        return self.dim * math.log(self.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(self.base))

    def rope_init(self) -> None:
        low, high = self._correction_dim(self.beta_fast), self._correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.dim - 1)
        if low == high:
            high += 0.001  # as transformers: avoid a zero-width ramp
        freqs = self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim)
        ramp = ((torch.arange(self.dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: original frequency (extrapolation), 0: interpolated by factor
        theta = (1.0 / (self.factor * freqs)) * (1 - keep) + (1.0 / freqs) * keep
        self.register_buffer("theta", theta, persistent=False)
        self.build_rope_cache(self.max_seq_len)

    def build_rope_cache(self, max_seq_len: int = 4096) -> None:
        super().build_rope_cache(max_seq_len)
        if self.attention_factor != 1.0:
            self.cache.mul_(self.attention_factor)


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """``[x0, x1, x2, x3, ...]`` -> ``[x0, x2, ..., x1, x3, ...]`` over the last dim: DeepSeek's interleaved RoPE
    pairs as rotate-half halves (q and k get the same permutation, so their dot products are unchanged)."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


class MultiHeadLatentAttention(TrainingOnlySelfAttention):
    """Multi-head latent attention (DeepSeek-V2, DeepSeek-V3, Moonlight), as transformers' ``DeepseekV3Attention``.

    Per token x [D]::

        q      = q_proj(x)                      or  q_b_proj(q_norm(q_a_proj(x)))      [H, nope + rope]
        c, k_r = split(kv_a_proj(x), [kv_lora_rank, rope])
        k_n, v = split(kv_b_proj(kv_norm(c)), [nope, v_head_dim])                      [H, nope], [H, v]
        q = [q_nope, RoPE(q_rope)],  k = [k_n, RoPE(k_r) for every head]
        out = output_proj(softmax(q k^T * softmax_scale + causal) v)

    Args:
        embed_dim (int): model dim D.
        num_heads (int): H.
        qk_nope_head_dim (int): query/key channels without RoPE.
        qk_rope_head_dim (int): query/key channels with RoPE (one RoPE key shared by the heads).
        v_head_dim (int): value channels per head.
        kv_lora_rank (int): rank of the key/value latent.
        q_lora_rank (Optional[int]): rank of the query latent; None projects q directly.
        pos_embeddings (nn.Module): RoPE over ``qk_rope_head_dim`` channels.
        max_seq_len (int): maximum sequence length.
        softmax_scale (Optional[float]): default ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5`` (times
            ``yarn_mscale(factor, mscale_all_dim) ** 2`` under YaRN: the caller's choice).
        rope_interleave (bool): the RoPE channels come in interleaved pairs (DeepSeek's checkpoints) rather than
            rotate-half halves.
        attn_bias (bool): biases on ``q_a_proj``, ``kv_a_proj`` and ``output_proj`` (config ``attention_bias``).
        latent_norm_eps (float): epsilon of the latent RMSNorms (transformers uses 1e-6 whatever ``rms_norm_eps``).
        attn_dropout (float): attention dropout.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        kv_lora_rank: int,
        q_lora_rank: Optional[int],
        pos_embeddings: nn.Module,
        max_seq_len: int,
        softmax_scale: Optional[float] = None,
        rope_interleave: bool = True,
        attn_bias: bool = False,
        latent_norm_eps: float = 1e-6,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("qk_nope_head_dim", qk_nope_head_dim),
                            ("v_head_dim", v_head_dim), ("kv_lora_rank", kv_lora_rank)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if qk_rope_head_dim < 2 or qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be a positive even number (RoPE), got {qk_rope_head_dim}")
        if q_lora_rank is not None and q_lora_rank < 1:
            raise ValueError(f"q_lora_rank must be None or >= 1, got {q_lora_rank}")
        if not 0.0 <= attn_dropout <= 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1], got {attn_dropout}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.max_seq_len = max_seq_len
        self.rope_interleave = rope_interleave
        self.softmax_scale = self.qk_head_dim**-0.5 if softmax_scale is None else softmax_scale
        self.attn_dropout = attn_dropout
        H = num_heads
        if q_lora_rank is None:
            self.q_proj = nn.Linear(embed_dim, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(embed_dim, q_lora_rank, bias=attn_bias)
            self.q_norm = RMSNorm(q_lora_rank, eps=latent_norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj = nn.Linear(embed_dim, kv_lora_rank + qk_rope_head_dim, bias=attn_bias)
        self.kv_norm = RMSNorm(kv_lora_rank, eps=latent_norm_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, H * (qk_nope_head_dim + v_head_dim), bias=False)
        self.output_proj = nn.Linear(H * v_head_dim, embed_dim, bias=attn_bias)
        self.pos_embeddings = pos_embeddings
        self._attention_call = _sdpa_or_flex_attention()

    def forward(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        *,
        mask: Optional[_MaskType] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Self-attention ``x`` [b, s, D] -> [b, s, D] (``y`` must be None or ``x``: no cross-attention).

        Args:
            mask: None (causal), a boolean [b, s, s] mask or a flex-attention ``BlockMask`` (packed samples).
            input_pos: [b, s] positions of packed samples, None for 0..s-1.
        """
        self.check_self_attention(x, y)
        b, s, _ = x.shape
        H = self.num_heads
        q_BSHQ = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_norm(self.q_a_proj(x)))
        q_BSHQ = q_BSHQ.view(b, s, H, self.qk_head_dim)
        q_nope, q_rope = q_BSHQ.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_rope = k_rope.view(b, s, 1, self.qk_rope_head_dim)
        if self.rope_interleave:
            q_rope, k_rope = _deinterleave(q_rope), _deinterleave(k_rope)
        q_rope = self.pos_embeddings(q_rope, input_pos=input_pos)
        k_rope = self.pos_embeddings(k_rope, input_pos=input_pos)
        kv = self.kv_b_proj(self.kv_norm(latent)).view(b, s, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(b, s, H, self.qk_rope_head_dim)], dim=-1)
        # torchtune's attention call applies the default 1/sqrt(qk_head_dim); fold our scale into q instead.
        q = q * (self.softmax_scale * math.sqrt(self.qk_head_dim))
        out = self._attention_call(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=mask is None,
        )
        return self.output_proj(out.transpose(1, 2).reshape(b, s, H * self.v_head_dim))


class GroupedQueryAttention(MultiHeadAttention):
    """torchtune's ``MultiHeadAttention`` (same arguments, parameters and numbers) whose self-attention without a KV
    cache passes the key/value heads to ``scaled_dot_product_attention`` ungrouped, with ``enable_gqa=True`` (see
    the module doc). When ``y`` is ``x`` and the three projections are exactly ``nn.Linear`` with all or no biases
    (and no hooks), q, k and v come from one GEMM over their concatenated weights; the parameters stay the three
    projections'. Everything else (a KV cache, packed samples' flex-attention ``BlockMask``, as many key/value
    heads as query heads) takes torchtune's own forward."""

    def forward(
        self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, mask: Optional[_MaskType] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x, y [b, s, d] (y: the keys' and values' input, x for self-attention), mask None (causal) or boolean
        [b, s_x, s_y] (True: may attend) -> [b, s_x, d]."""
        if y is None or self.kv_cache is not None or self.num_heads == self.num_kv_heads or isinstance(mask, BlockMask):
            return super().forward(x, y, mask=mask, input_pos=input_pos)
        b, s_x, _ = x.shape
        s_y = y.shape[1]
        if y is x and self._fusable_qkv():
            q, k, v = self._fused_qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(y), self.v_proj(y)
        q = q.view(b, s_x, self.num_heads, self.head_dim)
        k = k.view(b, s_y, self.num_kv_heads, self.head_dim)
        v = v.view(b, s_y, self.num_kv_heads, self.head_dim)
        if self.pos_embeddings is not None:
            q = self.pos_embeddings(q, input_pos=input_pos)
            k = self.pos_embeddings(k, input_pos=input_pos)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask[:, None, :, :],
            dropout_p=self.attn_dropout if self.training else 0.0, is_causal=mask is None and self.is_causal,
            enable_gqa=True,
        )
        return self.output_proj(out.transpose(1, 2).contiguous().view(b, s_x, -1))

    def _fusable_qkv(self) -> bool:
        """Whether :meth:`_fused_qkv` computes what the three projections would: each exactly ``nn.Linear`` (not
        a subclass), without module hooks, and all with or all without a bias."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        return (
            all(type(p) is nn.Linear for p in projs)
            and not any(p._forward_pre_hooks or p._forward_hooks or p._backward_pre_hooks or p._backward_hooks
                        for p in projs)
            and len({p.bias is None for p in projs}) == 1
        )

    def _fused_qkv(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` [b, s, d] -> q [b, s, n_h * h_d], k and v [b, s, n_kv * h_d] (views of one GEMM's output)."""
        # Written by hand: one GEMM over the concatenated weights instead of three. At Qwen3-30B-A3B's shape (8192
        # tokens, d 2048, q 4096, k and v 512 each; H200): forward 299 -> 256 us (+22 us to concatenate the
        # weights), input gradient 325 (three GEMMs and two adds) -> 223 us (+up to 46 us to concatenate the
        # gradients of q, k and v), weight gradient 249 -> 230 us: ~0.1 ms per layer. The parameters stay the
        # three projections' (state dict, FSDP2, LoRA see no change). Only exactly nn.Linear without hooks: anything
        # else (LoRALinear, torchao's Float8Linear, NF4 or FSDP2-wrapped linears, any subclass) or a hook does more
        # than F.linear, so it keeps its own three calls.
        projs = (self.q_proj, self.k_proj, self.v_proj)
        biases = () if self.q_proj.bias is None else tuple(p.bias for p in projs)
        qkv_BSQ = _ConcatLinear.apply(x_BSD, *(p.weight for p in projs), *biases)
        return qkv_BSQ.split([p.out_features for p in projs], dim=-1)


class _ConcatLinear(torch.autograd.Function):
    """``F.linear(x, cat(w_1, w_2, w_3), cat(b_1, b_2, b_3))`` whose backward concatenates the weights again rather
    than keeping their concatenation from the forward: the weights themselves cost nothing to keep (they are the
    parameters; FSDP2 gathers them again for the backward), the concatenation would be held until the backward, d *
    (q + k + v) elements per layer (20 MiB in bf16 at Qwen3-30B-A3B, ~1 GiB over its 48 layers without activation
    checkpointing), for +22 us per layer."""

    @staticmethod
    def forward(ctx, x_BSD: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        """x [b, s, d]; ``params``: three weights [n_i, d], then their three biases or none -> [b, s, sum n_i]."""
        weights, biases = params[:3], params[3:]
        ctx.save_for_backward(x_BSD, *weights)
        ctx.sizes = [w.shape[0] for w in weights]
        ctx.has_bias = bool(biases)
        return nn.functional.linear(x_BSD, torch.cat(weights), torch.cat(biases) if biases else None)

    @staticmethod
    def backward(ctx, grad_BSQ: torch.Tensor):
        x_BSD, *weights = ctx.saved_tensors
        grad_NQ = grad_BSQ.reshape(-1, grad_BSQ.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_NQ @ torch.cat(weights)).view_as(x_BSD)
        grad_w = (None,) * 3
        if any(ctx.needs_input_grad[1:4]):
            grad_w = (grad_NQ.t() @ x_BSD.reshape(-1, x_BSD.shape[-1])).split(ctx.sizes)
        grad_b = ()  # one per bias given to the forward
        if ctx.has_bias:
            grad_b = grad_NQ.sum(0).split(ctx.sizes) if any(ctx.needs_input_grad[4:]) else (None,) * 3
        return (grad_x, *grad_w, *grad_b)


class SinkAttention(MultiHeadAttention):
    """torchtune's ``MultiHeadAttention`` with attention sinks and an optional sliding window (GPT-OSS), as
    transformers' ``GptOssAttention``: per query head h,

        p = softmax([q k^T / sqrt(head_dim) + mask, sinks[h]])[:-1],   out = p v

    the sink logit takes part of the probability mass and attends to nothing. With ``sliding_window`` w, token i
    attends to tokens j with ``i - w < j <= i`` (itself and the w - 1 before it).

    It runs on torch's fused ``scaled_dot_product_attention`` (no [s, s] scores kept for backward) by writing the
    sink as one more key: queries get an extra channel of ones, keys an extra channel of zeros, and the sink key
    of head h is zero but for ``sinks[h] / scale`` in that channel, with a zero value; so its logit is
    ``sinks[h]`` for every query and it adds nothing to the output. The channels are padded to a multiple of 8
    (fused kernels' alignment). The window and causality are a boolean [s, s_k + 1] mask; packed samples' mask
    (boolean, or the flex-attention ``BlockMask`` torchtune builds on CUDA, evaluated to a boolean one) joins it.

    Args:
        sliding_window (Optional[int]): window w; None: full causal attention.
        **kwargs: ``MultiHeadAttention`` arguments (projections, heads, ``pos_embeddings``, ...).
    """

    def __init__(self, *, sliding_window: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
        self.sliding_window = sliding_window
        self.sinks = nn.Parameter(torch.zeros(self.num_heads))
        self._attention_call = self._sink_attention

    def _sink_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[_MaskType], dropout_p: float,
        is_causal: bool,
    ) -> torch.Tensor:
        """q [b, n_h, s, h_d], k and v [b, n_h, s_k, h_d] (GQA already expanded) -> [b, n_h, s, h_d].

        ``mask``: None (causal), a boolean [b, s, s_k] mask (True: may attend) or a flex-attention ``BlockMask``."""
        b, n_h, s, h_d = q.shape
        s_k = k.shape[2]
        if mask is not None and not isinstance(mask, torch.Tensor):
            # Packed samples on CUDA come as a flex-attention BlockMask: evaluated here into the boolean
            # [b, s, s_k] mask the SDPA call takes (s * s_k bytes per sample: 4 MiB at 2048 tokens).
            mask = create_mask(mask.mask_mod, b, None, s, s_k, device=q.device)[:, 0]
        scale = h_d**-0.5
        i = torch.arange(s, device=q.device).unsqueeze(1) + (s_k - s)
        j = torch.arange(s_k, device=q.device).unsqueeze(0)
        allowed = (j <= i) if mask is None else mask[:, None].bool()
        if self.sliding_window is not None:
            allowed = allowed & (i - j < self.sliding_window)
        allowed = torch.cat([allowed, torch.ones_like(allowed[..., :1]).expand(*allowed.shape[:-1], 1)], dim=-1)
        pad = 8 - h_d % 8  # >= 1: room for the sink channel, the rest zeros
        ones = q.new_zeros(b, n_h, s, pad)
        ones[..., 0] = 1.0
        q_ = torch.cat([q, ones], dim=-1)
        k_ = torch.cat([k, k.new_zeros(b, n_h, s_k, pad)], dim=-1)
        sink_key = torch.cat(
            [k.new_zeros(n_h, h_d), (self.sinks / scale).to(k.dtype).unsqueeze(-1), k.new_zeros(n_h, pad - 1)], dim=-1
        )
        k_ = torch.cat([k_, sink_key.view(1, n_h, 1, h_d + pad).expand(b, n_h, 1, h_d + pad)], dim=2)
        v_ = torch.cat([v, v.new_zeros(b, n_h, 1, v.shape[-1])], dim=2)
        return nn.functional.scaled_dot_product_attention(
            q_, k_, v_, attn_mask=allowed, dropout_p=dropout_p, scale=scale
        )

    def extra_repr(self) -> str:
        return f"sliding_window={self.sliding_window}"
