"""SinkAttention's call (the sink as one more key on torch's SDPA) against the plain formula it replaces:
softmax over [q k^T * scale + mask, sink] with the sink column dropped, then @ v; outputs and gradients of q, k,
v and the sinks, with the sliding window and with a boolean mask, for head dims that are and are not multiples
of 8."""

import pytest
import torch
from torch import nn

from torchtune_moe.modules.attention import SinkAttention


def _module(head_dim: int, window):
    H, D = 4, 4 * head_dim
    return SinkAttention(
        sliding_window=window, embed_dim=D, num_heads=H, num_kv_heads=H, head_dim=head_dim,
        q_proj=nn.Linear(D, D), k_proj=nn.Linear(D, D), v_proj=nn.Linear(D, D), output_proj=nn.Linear(D, D),
        max_seq_len=32,
    )


def _reference(q, k, v, sinks, allowed):
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    b, h, s, _ = q.shape
    logits = torch.cat([scores, sinks.view(1, h, 1, 1).expand(b, h, s, 1)], dim=-1)
    return logits.softmax(-1)[..., :-1] @ v


@pytest.mark.parametrize("head_dim", [8, 12])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("with_mask", [False, True])
def test_sdpa_sink_equals_the_plain_formula(head_dim, window, with_mask):
    torch.manual_seed(0)
    attn = _module(head_dim, window)
    with torch.no_grad():
        attn.sinks.normal_(0.0, 2.0)
    b, h, s = 2, 4, 10
    q, k, v = (torch.randn(b, h, s, head_dim, requires_grad=True) for _ in range(3))
    i, j = torch.arange(s).unsqueeze(1), torch.arange(s).unsqueeze(0)
    mask = None
    allowed = j <= i
    if with_mask:  # e.g. a padded batch: some keys hidden from every query
        mask = (j <= i).expand(b, s, s).clone()
        mask[1, :, 0] = False
        mask[1, 0, 0] = True  # every query keeps at least one key
        allowed = mask[:, None]
    if window is not None:
        allowed = allowed & (i - j < window)
    got = attn._sink_attention(q, k, v, mask, 0.0, True)
    sinks = attn.sinks.detach().clone().requires_grad_(True)
    want = _reference(q, k, v, sinks, allowed)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(got)
    g_got = torch.autograd.grad(got, [q, k, v, attn.sinks], grad)
    g_want = torch.autograd.grad(want, [q, k, v, sinks], grad)
    for a, w in zip(g_got, g_want):
        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("as_block_mask", [False, True])
def test_packed_samples_equal_separate_sequences(as_block_mask):
    """Two samples packed into one row (block-causal mask, positions restarting at each sample) give each sample's
    own output, with the sliding window; the mask may come as a boolean tensor (CPU) or as the flex-attention
    BlockMask torchtune builds for packed samples on CUDA."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torchtune.modules import RotaryPositionalEmbeddings

    torch.manual_seed(0)
    H, hd, D = 4, 8, 32
    attn = SinkAttention(
        sliding_window=3, embed_dim=D, num_heads=H, num_kv_heads=2, head_dim=hd, q_proj=nn.Linear(D, D),
        k_proj=nn.Linear(D, 2 * hd), v_proj=nn.Linear(D, 2 * hd), output_proj=nn.Linear(D, D),
        pos_embeddings=RotaryPositionalEmbeddings(hd, max_seq_len=32), max_seq_len=32,
    )
    with torch.no_grad():
        attn.sinks.normal_(0.0, 1.0)
    lens = [5, 7]
    parts = [torch.randn(1, n, D) for n in lens]
    x = torch.cat(parts, dim=1)
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)]).unsqueeze(0)
    input_pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    if as_block_mask:
        mask = create_block_mask(lambda b, h, q, kv: (doc[b, q] == doc[b, kv]) & (q >= kv), 1, None, 12, 12,
                                 device="cpu")
    else:
        mask = (doc[:, :, None] == doc[:, None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    packed = attn(x, x, mask=mask, input_pos=input_pos)
    alone = torch.cat([attn(p, p) for p in parts], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
