"""The full-attention pieces of Qwen3.5-MoE (and Qwen3-Next) that torchtune 0.6.1 does not have.

- :class:`OffsetRMSNorm`: RMSNorm whose weight is stored zero-centred and applied as ``1 + weight`` (every norm
  of these models: layer norms, final norm, per-head q/k norms). Same numbers as ``RMSNorm`` with scale
  ``1 + weight``; kept in this form so that checkpoints convert one to one (the weight decays towards the
  identity, as in the original training).
- :class:`GatedMultiHeadAttention`: does not fit torchtune's ``MultiHeadAttention``, which has no output gate:
  here ``q_proj`` yields, per head, the query and a gate of the same width, and the attention output is
  multiplied by ``sigmoid(gate)`` before ``output_proj``. The q/k norms act per head before (partial) RoPE.
  The attention call is torchtune's (SDPA, or flex attention for packed samples' ``BlockMask``).
"""

from typing import Optional

import torch
from torch import nn
from torchtune.modules.attention_utils import _MaskType, _sdpa_or_flex_attention

from torchtune_moe.modules.attention_utils import TrainingOnlySelfAttention

__all__ = ["OffsetRMSNorm", "GatedMultiHeadAttention"]


class OffsetRMSNorm(nn.Module):
    """``RMSNorm(x) * (1 + scale)`` over the last dim in fp32, cast back to the input dtype (transformers'
    ``Qwen3_5MoeRMSNorm``). ``scale`` starts at 0 (identity).

    Args:
        dim (int): normalised size.
        eps (float): epsilon.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., dim] -> [..., dim]"""
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.scale.float())).type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.scale.shape)}, eps={self.eps}, offset=1"


class GatedMultiHeadAttention(TrainingOnlySelfAttention):
    """Grouped-query attention with a sigmoid output gate (transformers' ``Qwen3_5MoeAttention``).

    Per token x::

        q, gate = split per head(q_proj(x))                [H, 2 * head_dim] -> [H, head_dim] twice
        q = RoPE(q_norm(q)),  k = RoPE(k_norm(k_proj(x))),  v = v_proj(x)
        out = output_proj(softmax(q k^T / sqrt(head_dim) + causal) v * sigmoid(gate))

    Args:
        num_heads (int): H.
        num_kv_heads (int): key/value heads (divides H).
        head_dim (int): per-head dim.
        q_proj (nn.Module): ``[.., D] -> [.., H * 2 * head_dim]`` (query and gate of each head, interleaved by
            head as the Hub weights store them).
        k_proj, v_proj (nn.Module): ``[.., D] -> [.., num_kv_heads * head_dim]``.
        output_proj (nn.Module): ``[.., H * head_dim] -> [.., D]``.
        q_norm, k_norm (nn.Module): per-head norms (``[.., head_dim]``), applied before RoPE.
        pos_embeddings (nn.Module): RoPE (``[b, s, n_h, head_dim]`` in and out; partial RoPE wraps a narrower
            one).
        attn_dropout (float): attention dropout.
    """

    def __init__(
        self,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        output_proj: nn.Module,
        q_norm: nn.Module,
        k_norm: nn.Module,
        pos_embeddings: nn.Module,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must be >= 1 and divide num_heads ({num_heads}), got {num_kv_heads}")
        if not 0.0 <= attn_dropout <= 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1], got {attn_dropout}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.output_proj = output_proj
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.pos_embeddings = pos_embeddings
        self.attn_dropout = attn_dropout
        self._attention_call = _sdpa_or_flex_attention()

    def forward(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        *,
        mask: Optional[_MaskType] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Self-attention ``x`` [b, s, D] -> [b, s, D] (``y`` must be None or ``x``).

        Args:
            mask: None (causal), a boolean [b, s, s] mask or a flex-attention ``BlockMask`` (packed samples).
            input_pos: [b, s] positions of packed samples, None for 0..s-1.
        """
        self.check_self_attention(x, y)
        b, s, _ = x.shape
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, gate = self.q_proj(x).view(b, s, H, 2 * hd).split(hd, dim=-1)
        q = self.pos_embeddings(self.q_norm(q), input_pos=input_pos)
        k = self.pos_embeddings(self.k_norm(self.k_proj(x).view(b, s, Hkv, hd)), input_pos=input_pos)
        v = self.v_proj(x).view(b, s, Hkv, hd)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if H != Hkv:
            k = k.unsqueeze(2).expand(b, Hkv, H // Hkv, s, hd).flatten(1, 2)
            v = v.unsqueeze(2).expand(b, Hkv, H // Hkv, s, hd).flatten(1, 2)
        out = self._attention_call(
            q, k, v, mask=mask, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=mask is None
        )
        out = out.transpose(1, 2).reshape(b, s, H * hd) * torch.sigmoid(gate.reshape(b, s, H * hd))
        return self.output_proj(out)
