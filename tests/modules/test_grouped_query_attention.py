"""GroupedQueryAttention (the builders' default attention): torchtune's MultiHeadAttention numbers (output and every
gradient) with the key/value heads handed to SDPA ungrouped and, in self-attention with plain ``nn.Linear``
projections, q, k and v from one GEMM; other projections (LoRA, subclasses, mixed biases, hooks) and
cross-attention keep their own calls; a KV cache and as many key/value heads as query heads take torchtune's own
forward."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchtune.models.qwen2 import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import MultiHeadAttention, RMSNorm
from torchtune.modules.peft import LoRALinear

from torchtune_moe.models import moe
from torchtune_moe.modules.attention import GroupedQueryAttention


def _pair(num_heads=4, num_kv_heads=2, head_dim=8, q_norm=False, bias=True):
    """torchtune's module and ours with the same weights (RoPE; torchtune's q/k norms if asked; q/k/v biases if
    ``bias``)."""
    torch.manual_seed(0)
    dim = 16

    def build(cls):
        torch.manual_seed(0)
        return cls(
            embed_dim=num_heads * head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            q_proj=nn.Linear(dim, num_heads * head_dim, bias=bias),
            k_proj=nn.Linear(dim, num_kv_heads * head_dim, bias=bias),
            v_proj=nn.Linear(dim, num_kv_heads * head_dim, bias=bias), output_proj=nn.Linear(num_heads * head_dim, dim),
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


def _linear_out_features(monkeypatch) -> list:
    """The output width of each ``F.linear`` call (nn.Linear's forward calls it too): the fused q/k/v GEMM of
    ``_pair``'s modules is the one 64 wide (32 + 16 + 16)."""
    seen, linear = [], F.linear

    def spy(x, weight, *args, **kwargs):
        seen.append(weight.shape[0])
        return linear(x, weight, *args, **kwargs)

    monkeypatch.setattr(F, "linear", spy)
    return seen


def _projection_calls(monkeypatch, module) -> list:
    """The names of ``module``'s q/k/v projections whose own forward runs, in call order (the forward is replaced
    on the instance: type and hooks unchanged)."""
    calls = []
    for name in ("q_proj", "k_proj", "v_proj"):
        proj = getattr(module, name)

        def forward(*args, _name=name, _forward=proj.forward, **kwargs):
            calls.append(_name)
            return _forward(*args, **kwargs)

        monkeypatch.setattr(proj, "forward", forward)
    return calls


def _mask(b=2, s=12):
    """Packed samples' boolean mask [b, s, s]: two documents per row, causal in each."""
    doc = torch.arange(s) >= 5
    return ((doc[:, None] == doc[None, :]) & torch.ones(s, s, dtype=torch.bool).tril()).expand(b, s, s)


def _assert_same(theirs, ours, x, y=None, mask=None, input_pos=None) -> None:
    """Same output, input gradient(s) and every parameter's gradient (each one present) as torchtune's."""
    ins_t = [x.clone().requires_grad_()] + ([] if y is None else [y.clone().requires_grad_()])
    ins_o = [x.clone().requires_grad_()] + ([] if y is None else [y.clone().requires_grad_()])
    out_t = theirs(ins_t[0], ins_t[-1], mask=mask, input_pos=input_pos)
    out_o = ours(ins_o[0], ins_o[-1], mask=mask, input_pos=input_pos)
    torch.testing.assert_close(out_o, out_t, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out_t)
    out_t.backward(grad)
    out_o.backward(grad)
    for i_t, i_o in zip(ins_t, ins_o):
        torch.testing.assert_close(i_o.grad, i_t.grad, rtol=1e-5, atol=1e-6)
    params_t, params_o = dict(theirs.named_parameters()), dict(ours.named_parameters())
    assert list(params_o) == list(params_t)
    for name, p_t in params_t.items():
        if p_t.requires_grad:
            assert p_t.grad is not None and params_o[name].grad is not None, name
            torch.testing.assert_close(params_o[name].grad, p_t.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("q_norm", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_torchtune_output_and_gradients(q_norm, masked, bias, monkeypatch):
    theirs, ours = _pair(q_norm=q_norm, bias=bias)
    x = torch.randn(2, 12, 16)
    mask = _mask() if masked else None
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        out_t = theirs(x, x, mask=mask, input_pos=pos)
    seen = _kv_heads_seen(monkeypatch)
    widths = _linear_out_features(monkeypatch)
    calls = _projection_calls(monkeypatch, ours)
    with torch.no_grad():
        out_o = ours(x, x, mask=mask, input_pos=pos)
    assert seen == [2]  # torchtune repeats the 2 key/value heads for the 4 query heads; ours does not
    assert widths == [64, 16] and calls == []  # q, k and v from one GEMM, then output_proj
    torch.testing.assert_close(out_o, out_t, rtol=1e-5, atol=1e-6)
    _assert_same(theirs, ours, x, mask=mask, input_pos=pos)
    assert widths[2:] == [32, 16, 16, 16, 64, 16] and calls == []  # theirs: three GEMMs; ours: fused again


def _lora(linear: nn.Linear) -> LoRALinear:
    """torchtune's LoRALinear with ``linear``'s weights and a nonzero adapter (rank 2)."""
    lora = LoRALinear(linear.in_features, linear.out_features, rank=2, alpha=4.0, use_bias=linear.bias is not None)
    lora.load_state_dict(linear.state_dict(), strict=False)
    nn.init.normal_(lora.lora_b.weight)
    return lora


class _Linear(nn.Linear):
    """A subclass of nn.Linear whose forward adds 1: fusing it as a plain nn.Linear would lose that."""

    def forward(self, x):
        return super().forward(x) + 1.0


def _subclass(linear: nn.Linear) -> _Linear:
    sub = _Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    sub.load_state_dict(linear.state_dict())
    return sub


def _drop_bias(linear: nn.Linear) -> nn.Linear:
    linear.bias = None
    return linear


@pytest.mark.parametrize(
    "name, change",
    [("q_proj", _lora), ("v_proj", _lora), ("k_proj", _subclass), ("k_proj", _drop_bias), ("q_proj", _drop_bias)],
    ids=["lora_q", "lora_v", "subclass_k", "no_bias_k", "no_bias_q"],
)
def test_other_projections_keep_their_own_calls(name, change, monkeypatch):
    """A projection that is not exactly nn.Linear, or biases on some projections only: the three projections'
    own forwards, with torchtune's numbers (torchtune's module given the same projections)."""
    theirs, ours = _pair()
    setattr(theirs, name, change(getattr(theirs, name)))
    setattr(ours, name, copy.deepcopy(getattr(theirs, name)))
    widths = _linear_out_features(monkeypatch)
    calls = _projection_calls(monkeypatch, ours)
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        ours(x, x)
    assert calls == ["q_proj", "k_proj", "v_proj"] and 64 not in widths
    _assert_same(theirs, ours, x, mask=_mask())


def test_hooks_and_cross_attention_keep_their_own_calls(monkeypatch):
    theirs, ours = _pair()
    hooked = []
    ours.v_proj.register_forward_hook(lambda module, args, out: hooked.append(out.shape))
    calls = _projection_calls(monkeypatch, ours)
    x = torch.randn(2, 12, 16)
    _assert_same(theirs, ours, x)
    assert calls == ["q_proj", "k_proj", "v_proj"] and hooked == [(2, 12, 16)]
    theirs, ours = _pair()
    calls = _projection_calls(monkeypatch, ours)
    _assert_same(theirs, ours, x, y=torch.randn(2, 7, 16))  # cross-attention: k and v from y
    assert calls == ["q_proj", "k_proj", "v_proj"]


def test_state_dict_and_modules_unchanged():
    theirs, ours = _pair()
    x = torch.randn(1, 6, 16)
    ours(x, x).sum().backward()  # the fused path adds nothing to the module
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [(n, type(m)) for n, m in ours.named_modules()][1:] == [(n, type(m)) for n, m in theirs.named_modules()][1:]
    assert [type(m) for m in (ours.q_proj, ours.k_proj, ours.v_proj)] == [nn.Linear] * 3
    ours.load_state_dict(theirs.state_dict())  # strict


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


def test_fused_projection_keeps_no_concatenated_weight_for_the_backward():
    """The backward concatenates the weights again: what autograd keeps from the fused GEMM is the input and the
    three weights themselves (parameters, kept anyway), never a [q + k + v, d] copy."""
    _, ours = _pair(bias=True)
    x = torch.randn(2, 12, ours.q_proj.in_features, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ours(x, x)
    fused = ours.q_proj.out_features + ours.k_proj.out_features + ours.v_proj.out_features
    assert tuple(ours.q_proj.weight.shape) in saved  # the fused path ran and kept the weights themselves
    d = ours.q_proj.in_features
    assert not {(fused, d), (d, fused)} & set(saved), saved  # neither the concatenation nor its transpose
    out.sum().backward()
    assert all(p.grad is not None for p in ours.parameters())
