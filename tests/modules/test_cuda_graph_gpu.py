"""The MoE layer's forward + backward captured in one CUDA graph (``torchtune_moe.training.capture_cuda_graph``)
replays exactly as eager passes do, after an eager pass on the default stream as a training loop would have run.
Marked ``gpu``: ``python -m pytest -m gpu tests/modules/test_cuda_graph_gpu.py``.
"""

import pytest
import torch

from torchtune_moe.models import moe_layer
from torchtune_moe.training import capture_cuda_graph

pytestmark = pytest.mark.gpu

T, E, K, D, H = 512, 16, 4, 256, 384


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_layer_forward_backward_replays_as_eager(router):
    torch.manual_seed(0)
    layer = moe_layer(dim=D, hidden_dim=H, num_experts=E, experts_per_token=K, router=router, aux_loss_coeff=0.01)
    layer = layer.cuda().to(torch.bfloat16).train()
    x = torch.randn(2, T // 2, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(x)
    leaves = [x, *layer.parameters()]

    def step():
        x.grad = None
        out = layer(x)
        torch.autograd.backward([out, layer.aux_loss], [gy, None])
        return out

    step()  # an eager pass on the default stream first: its aux loss holds that pass's autograd graph
    graph, out_static = capture_cuda_graph(layer, step)
    grads_static = [t.grad for t in leaves]
    assert all(g is not None for g in grads_static)

    for seed in (1, 2):  # new inputs copied into the captured tensors, as a training loop feeds a graph
        torch.manual_seed(seed)
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
            gy.copy_(torch.randn_like(gy))
        graph.replay()
        torch.cuda.synchronize()
        replayed = [out_static.clone(), *(g.clone() for g in grads_static)]
        for t in leaves:
            t.grad = None
        out = step()
        eager = [out.detach(), *(t.grad for t in leaves)]
        for got, want in zip(replayed, eager):
            assert torch.equal(got, want)

