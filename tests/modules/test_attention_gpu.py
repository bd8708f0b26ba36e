"""The attention components written here, on the GPU against their CPU fp32 results: the builders' grouped-query
attention and GPT-OSS's sink attention (on SDPA's fused kernels there) and Qwen3.5's Gated DeltaNet (its torch
chunked path, or fla's kernel where installed). Marked ``gpu``: skipped where CUDA is absent (CI);
``python -m pytest -m gpu`` on a GPU machine."""

import copy

import pytest
import torch
from torch import nn

from torchtune_moe.modules.attention import GroupedQueryAttention, SinkAttention
from torchtune_moe.modules.linear_attention import GatedDeltaNet

pytestmark = pytest.mark.gpu


def _rel(gpu: torch.Tensor, cpu: torch.Tensor) -> float:
    gpu, cpu = gpu.float().cpu(), cpu.float()
    assert torch.isfinite(gpu).all()
    return float((gpu - cpu).norm() / cpu.norm().clamp(min=1e-12))


def _check(module: nn.Module, x: torch.Tensor, tol: float, self_attention_args: bool = False, skip=()) -> None:
    """bf16 on CUDA against fp32 on CPU: output and every parameter gradient but ``skip`` within ``tol`` (relative
    norm)."""
    cpu = module.float()
    gpu = copy.deepcopy(module).to("cuda", torch.bfloat16)
    x_gpu = x.to("cuda", torch.bfloat16)
    out_cpu = cpu(x, x) if self_attention_args else cpu(x)  # torchtune's attention takes y = x
    out_gpu = gpu(x_gpu, x_gpu) if self_attention_args else gpu(x_gpu)
    assert _rel(out_gpu, out_cpu) < tol
    grad = torch.randn_like(out_cpu)
    out_cpu.backward(grad)
    out_gpu.backward(grad.to("cuda", torch.bfloat16))
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        if name not in skip:
            assert _rel(p_gpu.grad, p_cpu.grad) < tol, name


@pytest.mark.parametrize("window", [None, 128])
def test_sink_attention_on_gpu(window):
    torch.manual_seed(0)
    H, hd = 8, 64
    D = H * hd
    attn = SinkAttention(
        sliding_window=window, embed_dim=D, num_heads=H, num_kv_heads=2, head_dim=hd,
        q_proj=nn.Linear(D, D), k_proj=nn.Linear(D, 2 * hd), v_proj=nn.Linear(D, 2 * hd),
        output_proj=nn.Linear(D, D), max_seq_len=512,
    )
    with torch.no_grad():
        attn.sinks.normal_(0.0, 1.0)
    # k_proj.bias: softmax ignores a key bias but for the sink column, so its gradient is a nearly cancelling sum
    # whose bf16 relative error is large (2.7% on an H200).
    _check(attn, torch.randn(2, 300, D), tol=2e-2, self_attention_args=True, skip={"k_proj.bias"})


def test_grouped_query_attention_on_gpu():
    """SDPA's fused kernel with ``enable_gqa`` (cuDNN on an H100/H200): 8 query heads over 2 key/value heads, causal."""
    torch.manual_seed(0)
    H, hd = 8, 64
    D = H * hd
    attn = GroupedQueryAttention(
        embed_dim=D, num_heads=H, num_kv_heads=2, head_dim=hd, q_proj=nn.Linear(D, D), k_proj=nn.Linear(D, 2 * hd),
        v_proj=nn.Linear(D, 2 * hd), output_proj=nn.Linear(D, D), max_seq_len=512,
    )
    _check(attn, torch.randn(2, 300, D), tol=2e-2, self_attention_args=True, skip={"k_proj.bias"})


def test_gated_deltanet_on_gpu():
    torch.manual_seed(0)
    net = GatedDeltaNet(embed_dim=256, num_key_heads=2, num_value_heads=4, key_head_dim=32, value_head_dim=32)
    with torch.no_grad():
        net.A_log.uniform_(-2.0, 1.0)
    _check(net, torch.randn(2, 150, 256), tol=5e-2)  # bf16: the per-head decay gradients sum over all tokens
