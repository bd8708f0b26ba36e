"""NormedProjection: the q/k norms of Qwen3-MoE (per head, before RoPE) and OLMoE (full width, then clip)."""

import pytest
import torch
from torch import nn
from torchtune.modules import RMSNorm

from torchtune_moe.modules.attention_utils import NormedProjection


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_per_head_norm():
    torch.manual_seed(0)
    proj = nn.Linear(16, 3 * 8, bias=False)
    norm = RMSNorm(8, eps=1e-6)
    nn.init.normal_(norm.scale)
    layer = NormedProjection(proj, norm, head_dim=8)
    x = torch.randn(2, 5, 16)
    expected = rms(proj(x).view(2, 5, 3, 8), norm.scale).view(2, 5, 24)
    torch.testing.assert_close(layer(x), expected)


def test_full_norm_then_clip_as_olmoe():
    """Hugging Face OlmoeAttention: ``q = q_norm(q_proj(x))`` then ``q.clamp_(-clip_qkv, clip_qkv)``."""
    torch.manual_seed(0)
    proj = nn.Linear(16, 24, bias=False)
    norm = RMSNorm(24, eps=1e-6)
    nn.init.normal_(norm.scale, std=2.0)
    layer = NormedProjection(proj, norm, clip=0.5)
    x = torch.randn(2, 5, 16) * 10
    expected = rms(proj(x), norm.scale).clamp(-0.5, 0.5)
    torch.testing.assert_close(layer(x), expected)
    # Clipping before the norm would differ: the norm rescales the clipped values.
    assert not torch.allclose(layer(x), rms(proj(x).clamp(-0.5, 0.5), norm.scale))


def test_clip_only():
    proj = nn.Linear(4, 8)
    layer = NormedProjection(proj, None, clip=0.1)
    x = torch.randn(3, 4) * 10
    torch.testing.assert_close(layer(x), proj(x).clamp(-0.1, 0.1))


def test_bad_clip():
    with pytest.raises(ValueError, match="clip"):
        NormedProjection(nn.Linear(4, 8), None, clip=0.0)
