"""``compile_model`` (the recipe's ``compile.model``): each decoder layer and the final norm compiled, the same
outputs and gradients as the eager model (CPU, bf16: the dtype ``compile: true`` requires)."""

import copy

import torch
from torch._dynamo.utils import counters

from torchtune_moe.models import moe
from torchtune_moe.training import compile_model


def test_layers_and_final_norm_compiled_with_the_eager_numbers():
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    eager = moe(vocab_size=50, num_layers=2, num_heads=2, num_kv_heads=2, embed_dim=32, max_seq_len=16,
                num_experts=4, experts_per_token=2, moe_hidden_dim=16).to(torch.bfloat16)
    compiled = copy.deepcopy(eager)
    compile_model(compiled, verbose=False)
    assert compiled.norm._compiled_call_impl is not None
    assert all(layer._compiled_call_impl is not None for layer in compiled.layers)
    assert eager.norm._compiled_call_impl is None
    tokens = torch.randint(0, 50, (2, 12))
    out_e, out_c = eager(tokens), compiled(tokens)
    torch.testing.assert_close(out_c, out_e, rtol=2e-2, atol=2e-2)
    out_e.float().square().mean().backward()
    out_c.float().square().mean().backward()
    assert counters["stats"]["unique_graphs"] >= 2  # the layers' graph and the norm's
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=5e-2, atol=5e-3, msg=name)


def test_cuda_graphs_compile_the_layers_with_reduce_overhead(monkeypatch):
    """``compile.cuda_graphs``: each decoder layer compiles with ``mode="reduce-overhead"`` (torch.compile's CUDA
    graphs), the final norm as before; without it, no mode (torchtune's per-layer compile)."""
    from torch import nn
    from torchtune.modules import TransformerSelfAttentionLayer

    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: calls.append((type(self), kw.get("mode"))))
    model = moe(vocab_size=50, num_layers=2, num_heads=2, num_kv_heads=2, embed_dim=32, max_seq_len=16,
                num_experts=4, experts_per_token=2, moe_hidden_dim=16)
    compile_model(model, verbose=False, cuda_graphs=True)
    assert calls == [(TransformerSelfAttentionLayer, "reduce-overhead")] * 2 + [(type(model.norm), None)]
    calls.clear()
    compile_model(model, verbose=False)
    assert calls == [(TransformerSelfAttentionLayer, None)] * 2 + [(type(model.norm), None)]


def test_capture_cuda_graph_refuses_by_name_before_any_pass():
    """``capture_cuda_graph`` (the GPU test: tests/modules/test_cuda_graph_gpu.py) refuses a model off CUDA, a
    warm-up that is not an int of at least 1, a step that is not callable and a causal expert choice router (a host
    read each forward), before running ``step``."""
    import pytest

    from torchtune_moe.models import moe_layer
    from torchtune_moe.training import capture_cuda_graph

    ran = []
    layer = moe_layer(dim=32, hidden_dim=16, num_experts=4, experts_per_token=2)
    with pytest.raises(ValueError, match="capture_cuda_graph: model must be on a CUDA device"):
        capture_cuda_graph(layer, lambda: ran.append(1))
    for warmup in (0, 2.5, "3", True):
        message = f"capture_cuda_graph: warmup must be an int of at least 1 .* got {warmup!r}"
        with pytest.raises(ValueError, match=message):
            capture_cuda_graph(layer, lambda: ran.append(1), warmup=warmup)
    with pytest.raises(ValueError, match="capture_cuda_graph: step must be a function of no arguments, got Tensor"):
        capture_cuda_graph(layer, torch.zeros(1))
    causal = moe_layer(dim=32, hidden_dim=16, num_experts=4, experts_per_token=2, router="causal_expert_choice")
    with pytest.raises(ValueError, match=r"capture_cuda_graph: router is a causal expert choice router, which reads"):
        capture_cuda_graph(causal, lambda: ran.append(1))
    assert not ran
