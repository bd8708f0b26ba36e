"""Attention projection wrappers that torchtune's ``MultiHeadAttention`` does not have.

torchtune 0.6.1 applies ``q_norm``/``k_norm`` after RoPE; Qwen3-MoE normalises each head *before* RoPE and
OLMoE normalises the whole projection and then may clip it (``clip_qkv``, applied after the norm as in Hugging
Face's ``OlmoeAttention``). Wrapping the projection reproduces both exactly
while keeping torchtune's attention module unchanged.
"""

from typing import Optional

import torch
from torch import nn


class NormedProjection(nn.Module):
    """``clip(norm(proj(x)))``: a linear projection followed by an optional RMSNorm and an optional clamp.

    Args:
        proj (nn.Module): the projection, ``[..., D] -> [..., N * head_dim]``.
        norm (Optional[nn.Module]): applied per head (``head_dim`` given) or over the whole output.
        head_dim (Optional[int]): normalise each head of this size separately; None normalises all N*head_dim.
        clip (Optional[float]): clamp the (normalised) projection to ``[-clip, clip]`` (OLMoE ``clip_qkv``).
    """

    def __init__(
        self,
        proj: nn.Module,
        norm: Optional[nn.Module] = None,
        *,
        head_dim: Optional[int] = None,
        clip: Optional[float] = None,
    ):
        super().__init__()
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        self.proj = proj
        self.norm = norm
        self.head_dim = head_dim
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, S, N * head_dim]"""
        y = self.proj(x)
        if self.norm is not None:
            if self.head_dim is None:
                y = self.norm(y)
            else:
                shape = y.shape
                y = self.norm(y.view(*shape[:-1], -1, self.head_dim)).view(shape)
        if self.clip is not None:
            y = y.clamp(-self.clip, self.clip)
        return y


class TrainingOnlySelfAttention(nn.Module):
    """Base of this package's own attention modules (MLA, gated attention, Gated DeltaNet): what torchtune's
    ``TransformerDecoder`` asks of a layer's attention beyond ``forward``, for modules that fine-tune only. They
    keep no KV cache (generation is the job of transformers or vLLM, from the saved Hugging Face checkpoint) and
    attend to their own input only."""

    is_causal = True
    kv_cache = None
    cache_enabled = False

    def setup_cache(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} has no KV cache: this package fine-tunes; generate with transformers or vLLM "
            "from the saved Hugging Face checkpoint"
        )

    def reset_cache(self) -> None:
        pass

    def check_self_attention(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> None:
        """Refuses cross-attention: ``y`` must be None or ``x``."""
        if y is not None and y is not x:
            raise ValueError(f"{type(self).__name__} is self-attention only: y must be None or x")
