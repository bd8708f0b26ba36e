"""Gated DeltaNet (torchtune_moe.modules.linear_attention): the chunked torch path equals the token-by-token
definition for any chunk size (sequence lengths off the chunk grid included), the module equals transformers'
``Qwen3_5MoeGatedDeltaNet`` with the same weights, gradients flow to every parameter, misuse is refused."""

import pytest
import torch

from torchtune_moe.modules.gated_attention import OffsetRMSNorm
from torchtune_moe.modules.linear_attention import (
    GatedDeltaNet,
    GatedRMSNorm,
    chunk_gated_delta_rule,
    recurrent_gated_delta_rule,
)


def _inputs(B=2, S=37, Hk=2, Hv=4, K=8, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, S, Hk, K, generator=g), torch.randn(B, S, Hk, K, generator=g)
    v = torch.randn(B, S, Hv, V, generator=g)
    return q, k, v, -torch.rand(B, S, Hv, generator=g) * 2, torch.rand(B, S, Hv, generator=g)


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 64])
def test_chunked_equals_recurrent(chunk_size):
    args = _inputs()
    torch.testing.assert_close(chunk_gated_delta_rule(*args, chunk_size=chunk_size), recurrent_gated_delta_rule(*args),
                               atol=1e-5, rtol=1e-5)


def _module(**kw):
    torch.manual_seed(0)
    m = GatedDeltaNet(embed_dim=32, num_key_heads=2, num_value_heads=4, key_head_dim=8, value_head_dim=16,
                      chunk_size=8, **kw)
    with torch.no_grad():
        m.norm.scale.uniform_(0.5, 1.5)
        m.dt_bias.normal_()
    return m


def test_matches_transformers_gated_deltanet():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeGatedDeltaNet

    ours = _module(conv_kernel_size=3)
    cfg = transformers.Qwen3_5MoeTextConfig(
        hidden_size=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=16, linear_conv_kernel_dim=3, num_hidden_layers=1, layer_types=["linear_attention"],
    )
    hf = Qwen3_5MoeGatedDeltaNet(cfg, layer_idx=0)
    sd = {("norm.weight" if k == "norm.scale" else k): v for k, v in ours.state_dict().items()}
    hf.load_state_dict(sd, strict=True)
    x = torch.randn(2, 29, 32)  # 29 tokens: 3 full chunks of 8 and a partial one
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), atol=1e-5, rtol=1e-5)


def test_causal_and_gradients_reach_every_parameter():
    m = _module()
    x = torch.randn(1, 20, 32, requires_grad=True)
    out = m(x)
    out[:, 9].sum().backward()
    assert x.grad[:, 10:].abs().sum() == 0 and x.grad[:, :10].abs().sum() > 0  # token 9 sees only tokens 0..9
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_bf16_runs_and_keeps_dtype():
    m = _module().to(torch.bfloat16)
    assert m(torch.randn(1, 12, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_misuse_is_refused():
    m = _module()
    x = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="packed"):
        m(x, mask=torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="self-attention"):
        m(x, torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="multiple of num_key_heads"):
        GatedDeltaNet(embed_dim=32, num_key_heads=3, num_value_heads=4, key_head_dim=8, value_head_dim=8)
    with pytest.raises(NotImplementedError):
        m.setup_cache(1, torch.float32, 16)


def test_norms():
    x, z = torch.randn(3, 16), torch.randn(3, 16)
    gated = GatedRMSNorm(16)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.nn.functional.silu(z)
    torch.testing.assert_close(gated(x, z), expected)
    offset = OffsetRMSNorm(16)
    with torch.no_grad():
        offset.scale.fill_(0.5)
    torch.testing.assert_close(offset(x), 1.5 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_packed_layout_is_computed_once_per_positions_tensor():
    """Every linear-attention layer of a forward gets the same input_pos: the layout (and its host sync) is
    reused for it, and recomputed for another tensor or after an in-place change."""
    from torchtune_moe.modules.linear_attention import packed_layout

    input_pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    sample_T, pos_T, N, L = first = packed_layout(input_pos)
    assert sample_T.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3] and pos_T.tolist() == [0, 1, 2, 0, 1, 0, 1, 0, 1, 2]
    assert (N, L) == (4, 3)
    assert packed_layout(input_pos) is first
    assert packed_layout(input_pos.clone()) is not first
    input_pos[0, 3] = 3  # one sample in row 0 now
    assert packed_layout(input_pos)[2:] == (3, 5)
