"""The fused fp8 kernels of quack's fp8 path against the kernels they fuse: SwiGLU's (``_triton.swiglu_forward_fp8``,
``swiglu_backward_fp8``: SwiGLU's kernels, then the row quantizer) on rows with dropped slots, a hidden dim that is
not a power of 2 and a row count that is not a multiple of the block. The same fp8 bytes and scales, the same bf16
outputs. Run by tests/modules/test_cute_fp8.py in Triton's interpreter
on CPU (where Triton is installed) and by tests/modules/test_fp8_gpu.py on the GPU:
``python tests/modules/_fp8_kernels_cases.py [cuda]``."""

import sys

import torch

from torchtune_moe.modules._kernels import _triton


def _valid(t, n):
    return t[:n]


def check(device: str) -> None:
    torch.manual_seed(0)
    E, H = 3, 96
    for A, num_valid, may_drop in ((37, 37, False), (37, 30, True), (301, 301, False)):
        h = (torch.randn(A, 2 * H) * torch.logspace(-2, 1, A).unsqueeze(-1)).bfloat16().to(device)
        w = torch.rand(A).to(device)
        nv = torch.tensor([num_valid], dtype=torch.int32, device=device)
        q, s = _triton.swiglu_forward_fp8(h, w, nv, may_drop)
        want_q, want_s = _triton.rowwise_fp8(_triton.swiglu_forward(h, w, nv, may_drop))
        assert q.shape == (A, H) and q.dtype == torch.float8_e4m3fn and s.shape == (A, 1)
        assert torch.equal(_valid(s, num_valid), _valid(want_s, num_valid)), "forward scales"
        assert torch.equal(_valid(q, num_valid).view(torch.uint8), _valid(want_q, num_valid).view(torch.uint8))

        ghs = torch.randn(A, H).bfloat16().to(device)
        offsets = torch.tensor([10, 10, num_valid], dtype=torch.int64, device=device)  # an empty expert
        expert = torch.searchsorted(offsets, torch.arange(A, device=device), right=True).clamp(max=E - 1)
        mul = torch.exp2(-torch.randint(0, 6, (E, 2 * H))).bfloat16().to(device)
        gh, gw, hs, q, s = _triton.swiglu_backward_fp8(h, w, ghs, nv, may_drop, mul, expert)
        want_gh, want_gw, want_hs = _triton.swiglu_backward(h, w, ghs, nv, may_drop)
        want_q, want_s = _triton.rowwise_fp8(want_gh, mul, expert)
        for got, want, name in ((gh, want_gh, "grad_h"), (hs, want_hs, "hs")):
            assert torch.equal(_valid(got, num_valid), _valid(want, num_valid)), name
        torch.testing.assert_close(gw[:num_valid], want_gw[:num_valid], rtol=1e-5, atol=1e-6)
        if may_drop:
            assert torch.equal(gw[num_valid:], torch.zeros_like(gw[num_valid:])), "dropped rows' weight gradient"
        assert torch.equal(_valid(s, num_valid), _valid(want_s, num_valid)), "backward scales"
        assert torch.equal(_valid(q, num_valid).view(torch.uint8), _valid(want_q, num_valid).view(torch.uint8))


if __name__ == "__main__":
    check(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print("ok")
