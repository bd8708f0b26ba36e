"""The kernels that write fp8 rows (``_triton.swiglu_forward_fp8``, ``_triton.swiglu_backward(fp8=True)``,
``_triton.gather_rows_fp8``) against the unfused kernels (or the plain gather) followed by the rowwise quantizer
kernel, run by Triton's CPU interpreter (``TRITON_INTERPRET=1 python tests/modules/_fp8_kernels_cases.py``;
test_fp8.py runs it in a subprocess: the interpreter must be chosen before Triton is imported).

Both sides go through the interpreter's fp8 cast, which rounds differently from the GPU's: the fp8 bytes are
compared between kernels (the same cast on both sides), the scales with our torch code exactly, the dequantized
values with the torch code loosely. Shapes: one tile per row and two passes (H or D > 16384), dropped rows, fp32 rows.
"""

import os
import sys

import torch

from torchtune_moe.modules import _grouped_gemm as gg
from torchtune_moe.modules import _kernels
from torchtune_moe.modules._kernels import _triton as K

CASES = [  # A, H, rows before num_valid, dtype
    (37, 96, 37, torch.bfloat16),
    (21, 1024, 15, torch.bfloat16),
    (5, 17000, 5, torch.bfloat16),
    (13, 160, 10, torch.float32),
]


def _dequantized_err(q, s, q_t, s_t) -> float:
    got, want = q.float() / s, q_t.float() / s_t
    return ((got - want).norm() / want.norm()).item()


def check(A: int, H: int, nv: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    may_drop = nv < A
    h = (torch.randn(A, 2 * H) * torch.logspace(-2, 2, A).unsqueeze(-1)).to(dtype)
    h[2] = 0  # a zero row
    w = torch.rand(A)
    w[3] = 0  # a zero routing weight (a pad row)
    ghs = (torch.randn(A, H) * torch.logspace(-3, 1, A).unsqueeze(-1)).to(dtype)
    num_valid = torch.tensor([nv], dtype=torch.int32)

    q, s = K.swiglu_forward_fp8(h, w, num_valid, may_drop)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (A, H) and s.shape == (A, 1)
    q_u, s_u = K.rowwise_fp8(K.swiglu_forward(h, w, num_valid, may_drop))
    assert torch.equal(s[:nv], s_u[:nv]), "forward scales"
    assert torch.equal(q[:nv].view(torch.uint8), q_u[:nv].view(torch.uint8)), "forward bytes"
    assert (q[nv:].float() == 0).all(), "dropped rows"
    q_t, s_t = gg.rowwise_fp8_torch(_kernels.swiglu_forward(h, w, num_valid, may_drop), -1)
    assert torch.equal(s[:nv], s_t[:nv]), "forward scales vs torch code"
    assert _dequantized_err(q[:nv], s[:nv], q_t[:nv], s_t[:nv]) < 0.2

    gh, gw, hs, q8, s8 = K.swiglu_backward(h, w, ghs, num_valid, may_drop, fp8=True)
    gh0, gw0, hs0 = K.swiglu_backward(h, w, ghs, num_valid, may_drop)
    assert torch.equal(gh[:nv], gh0[:nv]) and torch.equal(hs[:nv], hs0[:nv]), "backward bf16 outputs"
    torch.testing.assert_close(gw, gw0, rtol=1e-5, atol=1e-6)
    q8_u, s8_u = K.rowwise_fp8(gh)
    assert torch.equal(s8[:nv], s8_u[:nv]), "backward scales"
    assert torch.equal(q8[:nv].view(torch.uint8), q8_u[:nv].view(torch.uint8)), "backward bytes"
    q8_t, s8_t = gg.rowwise_fp8_torch(_kernels.swiglu_backward(h, w, ghs, num_valid, may_drop)[0], -1)
    assert torch.equal(s8[:nv], s8_t[:nv]), "backward scales vs torch code"
    assert _dequantized_err(q8[:nv], s8[:nv], q8_t[:nv], s8_t[:nv]) < 0.2


def check_gather(T: int, A: int, D: int, nv: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    may_drop = nv < A
    src = (torch.randn(T, D) * torch.logspace(-3, 3, T).unsqueeze(-1)).to(dtype)
    src[1] = 0
    index = torch.randint(0, T, (A,))
    index[0] = 1  # a zero row
    num_valid = torch.tensor([nv], dtype=torch.int32)
    for copy in (False, True):
        q, s, rows = K.gather_rows_fp8(src, index, num_valid, may_drop, copy)
        assert q.dtype == torch.float8_e4m3fn and q.shape == (A, D) and s.shape == (A, 1)
        assert rows.shape == ((A, D) if copy else (0, D))
        q_u, s_u = K.rowwise_fp8(src[index])
        assert torch.equal(s[:nv], s_u[:nv]), "gather scales"
        assert torch.equal(q[:nv].view(torch.uint8), q_u[:nv].view(torch.uint8)), "gather bytes"
        assert (q[nv:].float() == 0).all(), "dropped rows"
        if copy:
            assert torch.equal(rows[:nv], src[index][:nv]), "gathered rows"
        q_t, s_t = gg.rowwise_fp8_torch(src[index], -1)
        assert torch.equal(s[:nv], s_t[:nv]), "gather scales vs torch code"
        assert _dequantized_err(q[:nv], s[:nv], q_t[:nv], s_t[:nv]) < 0.2


GATHER_CASES = [  # T, A, D, rows before num_valid, dtype
    (11, 40, 96, 40, torch.bfloat16),
    (7, 9, 2048, 6, torch.bfloat16),
    (5, 6, 16400, 6, torch.bfloat16),
    (9, 12, 160, 12, torch.float32),
]


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    for case in CASES:
        check(*case)
    for case in GATHER_CASES:
        check_gather(*case)
    sys.exit(0)
