"""GroupedQueryAttention (the builders' default attention): torchtune's MultiHeadAttention numbers (output and every
gradient) with the key/value heads handed to SDPA ungrouped; a KV cache and as many key/value heads as query heads
take torchtune's own forward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchtune.models.qwen2 import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import MultiHeadAttention, RMSNorm

from torchtune_moe.models import moe
from torchtune_moe.modules.attention import GroupedQueryAttention


def _pair(num_heads=4, num_kv_heads=2, head_dim=8, q_norm=False):
    """torchtune's module and ours with the same weights (RoPE; torchtune's q/k norms if asked)."""
    torch.manual_seed(0)
    dim = 16

    def build(cls):
        torch.manual_seed(0)
        return cls(
            embed_dim=num_heads * head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            q_proj=nn.Linear(dim, num_heads * head_dim), k_proj=nn.Linear(dim, num_kv_heads * head_dim),
            v_proj=nn.Linear(dim, num_kv_heads * head_dim), output_proj=nn.Linear(num_heads * head_dim, dim),
            pos_embeddings=Qwen2RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=32),
            q_norm=RMSNorm(head_dim) if q_norm else None, k_norm=RMSNorm(head_dim) if q_norm else None,
            max_seq_len=32,
        )

    return build(MultiHeadAttention), build(GroupedQueryAttention)


def _kv_heads_seen(monkeypatch) -> list:
    """The key head count of each SDPA call."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(k.shape[1])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("q_norm", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_torchtune_output_and_gradients(q_norm, masked, monkeypatch):
    theirs, ours = _pair(q_norm=q_norm)
    x = torch.randn(2, 12, 16)
    mask = None
    if masked:  # packed samples' boolean mask: two documents per row
        doc = torch.arange(12) >= 5
        mask = (doc[:, None] == doc[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
        mask = mask.expand(2, 12, 12)
    seen = _kv_heads_seen(monkeypatch)
    pos = torch.arange(12).expand(2, 12)
    out_t = theirs(x, x, mask=mask, input_pos=pos)
    out_o = ours(x, x, mask=mask, input_pos=pos)
    assert seen == [4, 2]  # torchtune repeats the 2 key/value heads for the 4 query heads; ours does not
    torch.testing.assert_close(out_o, out_t, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out_t)
    out_t.backward(grad)
    out_o.backward(grad)
    for (name, p_t), p_o in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_o.grad, p_t.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_kv_cache_and_plain_heads_take_torchtunes_forward(monkeypatch):
    seen = _kv_heads_seen(monkeypatch)
    theirs, ours = _pair(num_kv_heads=4)  # as many key/value heads as query heads: nothing to repeat
    x = torch.randn(1, 6, 16)
    torch.testing.assert_close(ours(x, x), theirs(x, x))
    theirs, ours = _pair()
    for m in (theirs, ours):
        m.setup_cache(1, torch.float32, max_seq_len=32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, x), theirs(x, x))
    assert seen == [4, 4, 4, 4]


def test_builders_use_it():
    model = moe(vocab_size=50, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=16,
                num_experts=4, experts_per_token=2, moe_hidden_dim=16)
    assert all(type(layer.attn) is GroupedQueryAttention for layer in model.layers)
