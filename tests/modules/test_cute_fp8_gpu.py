"""expert_fp8 through quack's fp8 GEMM: the kernel with the scaling epilogue (``_cute_fp8_kernels``) against the
fp32 product of the same fp8 operands and scales and against torch's ``_scaled_grouped_mm``, its op under
``opcheck``, the weight's column-scaled transpose against the torch code, and ``QuackFp8GroupedGemm`` against the
emulation. (The whole layer on this path: tests/modules/test_fp8_gpu.py.) Marked ``gpu``; needs a
compute-capability 9.x GPU and quack-kernels: ``python -m pytest -m gpu tests/modules/test_cute_fp8_gpu.py``."""

import pytest
import torch

from torchtune_moe.modules import _cute_gemm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and _cute_gemm.cute_available()),
        reason="needs quack-kernels and a compute-capability 9.x GPU",
    ),
]

FP8 = torch.float8_e4m3fn


def _operands(gather, T=512, E=8, K=256, N=384):
    counts = torch.tensor([0, 48, 160, 16, 96, 32, 112, 48])  # multiples of 16 (torch's fp8 grouped GEMM), one empty
    M = int(counts.sum())
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32).cuda()
    a8 = (torch.randn(T if gather else M, K, device="cuda") * 8).to(FP8)
    idx = torch.randint(0, T, (M,), device="cuda", dtype=torch.int32) if gather else None
    w8 = (torch.randn(E, N, K, device="cuda") * 8).to(FP8)
    a_scale = 2.0 ** torch.randint(-8, -2, (M,), device="cuda").float()
    w_scale = 2.0 ** torch.randint(-8, -2, (E, N), device="cuda").float()
    return a8, w8, a_scale, w_scale, cu, idx


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("tile", [(128, 192, 2, True), (128, 128, 1, True)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scaled_fp8_grouped_mm_matches_fp32_and_torch(gather, tile, seed):
    """Against the fp32 product of the same fp8 values (fast accumulation's error only: a scale applied to the wrong
    row or column is off by a power of 2) and against torch's kernel; three seeds (a cooperative tile's race showed
    in one run of two)."""
    from torchtune_moe.modules._cute_fp8_kernels import scaled_fp8_grouped_mm

    torch.manual_seed(seed)
    a8, w8, a_scale, w_scale, cu, idx = _operands(gather)
    got = scaled_fp8_grouped_mm(a8, w8, a_scale, w_scale, cu, idx, tile)
    rows = a8[idx.long()] if gather else a8
    M = rows.shape[0]
    ref = torch.empty(M, w8.shape[1], device="cuda")
    for e in range(w8.shape[0]):
        s, t = int(cu[e]), int(cu[e + 1])
        ref[s:t] = (rows[s:t].float() @ w8[e].float().t()) * a_scale[s:t, None] * w_scale[e][None, :]
    want = torch._scaled_grouped_mm(
        rows, w8.transpose(-2, -1), a_scale, w_scale, cu[1:], out_dtype=torch.bfloat16, use_fast_accum=True
    )
    assert got.shape == want.shape == (M, w8.shape[1]) and got.dtype == torch.bfloat16
    rel = ((got.float() - ref).norm() / ref.norm()).item()
    rel_torch = ((want.float() - ref).norm() / ref.norm()).item()
    bad = ((got.float() - ref).abs() > 0.05 * ref.abs().max()).nonzero()
    assert rel < 2 * rel_torch + 1e-3, (rel, rel_torch, bad[:8].tolist(), bad.shape[0])


def test_scaled_fp8_grouped_mm_refuses_cooperative_tiles():
    from torchtune_moe.modules._cute_fp8_kernels import scaled_fp8_grouped_mm

    a8, w8, a_scale, w_scale, cu, idx = _operands(False)
    with pytest.raises(ValueError, match="ping-pong tiles only"):
        scaled_fp8_grouped_mm(a8, w8, a_scale, w_scale, cu, idx, (128, 256, 1, False))


def test_scaled_fp8_op_opcheck():
    """The custom op (what torch.compile sees) against its fake: schema, shapes and dtypes."""
    from torchtune_moe.modules import _cute_fp8

    a8, w8, a_scale, w_scale, cu, idx = _operands(True)
    # test_faketensor only: the schema test compares the fp8 inputs with allclose, which fp8 lacks
    torch.library.opcheck(_cute_fp8._scaled_fp8_mm.op, (a8, w8, a_scale, w_scale, cu, idx), test_utils="test_faketensor")
    got = _cute_fp8._scaled_fp8_mm(a8, w8, a_scale, w_scale, cu, idx)
    fallback = _cute_fp8._dequantized_mm(a8, w8, a_scale, w_scale, cu, idx)  # the path where quack's kernel fails
    assert ((got.float() - fallback.float()).norm() / fallback.float().norm()).item() < 1e-2
    assert not _cute_fp8._failed  # quack's kernel ran (no silent fallback)


@pytest.mark.parametrize("op", ["forward", "input_grad_rows", "input_grad_per_row"])
def test_quack_fp8_gemms_against_emulation_and_bf16(op):
    """QuackFp8GroupedGemm's forward and both input gradients against the torch path's emulation (the same
    quantization, but for the input gradient of per-token rows, scaled per column of w) and bf16."""
    from torchtune_moe.modules import _grouped_gemm as gg
    from torchtune_moe.modules import _cute_fp8
    from torchtune_moe.modules._cute_fp8 import QUACK_FP8

    torch.manual_seed(0)
    counts = [256, 0, 512, 128, 1152, 3]
    T, N, K = 1024, 768, 512
    offsets_E = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    cu = torch.nn.functional.pad(offsets_E, (1, 0))
    A = int(offsets_E[-1])
    idx = torch.randint(0, T, (A,), device="cuda", dtype=torch.int32)
    w = torch.randn(len(counts), N, K, device="cuda").bfloat16()
    emul = gg.Fp8GroupedGemm(emulate=True)
    if op == "forward":
        x = torch.randn(T, K, device="cuda").bfloat16()
        got, state = QUACK_FP8.forward(gg.Rows(x, idx, offsets_E[-1:], False), w, cu)
        want, want_state = emul.forward(x[idx.long()].cpu(), w.cpu(), offsets_E.cpu())
        exact = gg.BF16.forward(x[idx.long()], w, offsets_E)[0]
        assert torch.equal(state.cpu(), want_state)
    elif op == "input_grad_rows":
        g = torch.randn(T, N, device="cuda").bfloat16()
        got = QUACK_FP8.input_grad(gg.Rows(g, idx, offsets_E[-1:], False), w, cu)
        want = emul.input_grad(g[idx.long()].cpu(), w.cpu(), offsets_E.cpu())
        exact = gg.BF16.input_grad(g[idx.long()], w, offsets_E)
    else:
        g = (torch.randn(A, N, device="cuda") * torch.logspace(-2, 2, A, device="cuda").unsqueeze(-1)).bfloat16()
        _, state = QUACK_FP8.forward(torch.randn(A, K, device="cuda").bfloat16(), w, cu)
        got = QUACK_FP8.input_grad(g, w, cu, state)
        want = emul.input_grad(g.cpu(), w.cpu(), offsets_E.cpu())
        exact = gg.BF16.input_grad(g, w, offsets_E)
    rel = lambda a, b: ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()  # noqa: E731
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    assert rel(got, want) < (6e-2 if op == "input_grad_rows" else 1e-2), rel(got, want)
    assert rel(got, exact) < 0.06
    assert not _cute_fp8._failed


@pytest.mark.parametrize("shape", [(2, 200, 96), (3, 64, 130), (8, 2048, 1024)])
def test_colwise_transpose_fp8_matches_the_torch_code(shape):
    from torchtune_moe.modules import _kernels
    from torchtune_moe.modules._grouped_gemm import rowwise_fp8_torch

    torch.manual_seed(0)
    E, N, K = shape
    w = (torch.randn(E, N, K, device="cuda") * torch.logspace(-4, 2, K, device="cuda")).bfloat16()
    w[0, :, 5] = 0  # an all-zero column: torchao's scale of EPS, rounded
    q, s = _kernels.colwise_transpose_fp8(w)
    want_q, want_s = rowwise_fp8_torch(w.transpose(-2, -1), dim=-1)
    assert q.shape == (E, K, N) and q.is_contiguous()
    assert torch.equal(q.view(torch.uint8), want_q.contiguous().view(torch.uint8))
    assert torch.equal(s, want_s.squeeze(-1))
