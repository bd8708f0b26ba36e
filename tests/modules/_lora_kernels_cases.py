"""Checks of the expert-LoRA Triton kernels against their torch code, shared by the GPU tests and the CPU run
under Triton's interpreter (``TRITON_INTERPRET=1 python tests/modules/_lora_kernels_cases.py``, which
test_lora_kernels.py runs in a subprocess: the interpreter must be chosen before Triton is imported).

Segments of rows per expert straddle the kernels' 64-row tiles, include empty experts (first, middle and last)
and, with ``drop``, leave dropped slots past the last expert's end.
"""

import os
import sys

import torch

from torchtune_moe.modules import _kernels

# rows per expert: empty first / middle / last experts, segments across 64-row tiles, one longer than a tile
COUNTS = [0, 70, 0, 3, 64, 40, 1, 130, 0]


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    got, want = got.float().cpu(), want.float().cpu()
    assert torch.isfinite(got).all(), what
    err = ((got - want).norm() / want.norm().clamp(min=1e-12)).item()
    assert err < tol, f"{what}: relative error {err:.2e}"


def _offsets(device):
    return torch.tensor(COUNTS, device=device).cumsum(0).to(torch.int32)


def check_kernels(device: str, dtype: torch.dtype, tol: float) -> None:
    """``lowrank_add_`` and ``expert_outer``: Triton (``triton=True``) against the torch code."""
    torch.manual_seed(0)
    offsets_E = _offsets(device)
    E, valid = len(COUNTS), int(offsets_E[-1])
    A, R, T = valid + 20, 16, 97  # 20 dropped rows past the end
    rnd = lambda *s: torch.randn(*s, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    for N, parts in [(96, 2), (64, 1)]:
        y, z, w = rnd(A, N), rnd(A, parts * R), rnd(E, N, R)
        want = _kernels.lowrank_add_(y.clone(), z, w, offsets_E, 0.5, parts, triton=False)
        got = _kernels.lowrank_add_(y.clone(), z, w, offsets_E, 0.5, parts)
        _close(got[:valid], want[:valid], tol, f"lowrank_add_ N={N} parts={parts}")
        assert torch.equal(got[valid:], y[valid:]), "lowrank_add_ wrote a dropped row"
        # the backward's use: w a transposed view of A [E, R, N]
        wt = rnd(E, parts * R, N)
        want = _kernels.lowrank_add_(y.clone(), z, wt.transpose(-2, -1), offsets_E, 1.0, triton=False)
        got = _kernels.lowrank_add_(y.clone(), z, wt.transpose(-2, -1), offsets_E, 1.0)
        _close(got[:valid], want[:valid], tol, f"lowrank_add_ transposed N={N}")
    for N, parts, transposed, gather in [(96, 2, False, False), (64, 1, True, True), (48, 1, False, True)]:
        big = rnd(T if gather else A, N)
        small = rnd(A, parts * R)
        index = torch.randint(0, T, (A,), device=device) if gather else None
        kw = dict(scale=0.5, parts=parts, index_A=index, transposed=transposed)
        want = _kernels.expert_outer(big, small, offsets_E, triton=False, **kw)
        got = _kernels.expert_outer(big, small, offsets_E, **kw)
        assert got.shape == want.shape and got.is_contiguous()
        _close(got, want, tol, f"expert_outer N={N} parts={parts} transposed={transposed} gather={gather}")
        empty = [e for e, c in enumerate(COUNTS) if c == 0]
        assert got[empty].abs().max() == 0, "an expert without rows must get a zero gradient"


def check_rows_project(device: str, dtype: torch.dtype, tol: float) -> None:
    """``rows_project``: Triton against the torch code, with and without the gather and its copy."""
    torch.manual_seed(0)
    offsets_E = _offsets(device)
    E, valid = len(COUNTS), int(offsets_E[-1])
    A, R, T = valid + 20, 16, 97
    rnd = lambda *s: torch.randn(*s, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    for N, parts, gather, transposed in [(96, 2, False, False), (160, 1, True, True), (64, 1, True, False)]:
        y = rnd(T if gather else A, N)
        w = rnd(E, R, N).transpose(-2, -1) if transposed else rnd(E, N, R)
        index = torch.randint(0, T, (A,), device=device) if gather else None
        kw = dict(scale=0.5, parts=parts, index_A=index, copy=gather)
        want = _kernels.rows_project(y, w, offsets_E, triton=False, **kw)
        got = _kernels.rows_project(y, w, offsets_E, **kw)
        assert got[0].shape == want[0].shape == (A, parts * R)
        _close(got[0][:valid], want[0][:valid], tol, f"rows_project N={N} parts={parts} gather={gather}")
        if gather:
            assert torch.equal(got[1][:valid], want[1][:valid]), "rows_project copy"
        else:
            assert got[1] is None and want[1] is None


def check_swiglu_lora(device: str, dtype: torch.dtype, tol: float) -> None:
    """``swiglu_lora_forward`` / ``swiglu_lora_backward`` (SwiGLU with the gate/up LoRA delta added on the fly)
    against autograd through ``silu(gate') * up' * w`` in fp32, ``h' = h + s * delta`` built row by row; H not a
    multiple of the kernels' column block, dropped rows past the last expert's end."""
    torch.manual_seed(0)
    offsets_E = _offsets(device)
    E, valid = len(COUNTS), int(offsets_E[-1])
    for H, R in [(96, 16), (48, 8), (272, 16)]:  # 272: several column blocks of the kernels' tiles
        A, s = valid + 20, 0.5
        rnd = lambda *sh: torch.randn(*sh, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
        h, xa, b, ghs = rnd(A, 2 * H), rnd(A, 2 * R), rnd(E, 2 * H, R), rnd(A, H)
        w = torch.rand(A, device=device, dtype=torch.float32).to(dtype)
        num_valid = offsets_E[-1:]
        # reference: each row's expert, the delta per part in fp32, autograd through the activation
        expert_A = torch.searchsorted(offsets_E, torch.arange(A, device=device, dtype=torch.int32), right=True)
        b_A = b.float()[expert_A.clamp(max=E - 1)]  # [A, 2H, R]
        delta = torch.cat(
            [
                torch.einsum("ar,anr->an", xa.float()[:, :R], b_A[:, :H]),
                torch.einsum("ar,anr->an", xa.float()[:, R:], b_A[:, H:]),
            ],
            dim=-1,
        )
        hp = (h.float() + s * delta).requires_grad_(True)
        w32 = w.float().requires_grad_(True)
        gate, up = hp.chunk(2, dim=-1)
        want_hs = torch.nn.functional.silu(gate) * up * w32[:, None]
        want_gh, want_gw = torch.autograd.grad(want_hs, (hp, w32), ghs.float())
        for may_drop in (False, True):
            got_hs = _kernels.swiglu_lora_forward(h, w, xa, b, offsets_E, s, num_valid, may_drop)
            gh, gw, hs = _kernels.swiglu_lora_backward(h, w, ghs, xa, b, offsets_E, s, num_valid, may_drop)
            what = f"swiglu_lora H={H} R={R} may_drop={may_drop}"
            assert got_hs.shape == (A, H) and gh.shape == (A, 2 * H) and gw.shape == (A,) and hs.shape == (A, H)
            _close(got_hs[:valid], want_hs[:valid], tol, f"{what}: hs")
            _close(hs[:valid], want_hs[:valid], tol, f"{what}: recomputed hs")
            _close(gh[:valid], want_gh[:valid], tol, f"{what}: grad_h")
            _close(gw[:valid], want_gw[:valid], tol, f"{what}: grad_w")
            if may_drop:
                assert gw[valid:].abs().max() == 0, "dropped rows' routing-weight gradient must be zero"


def check_custom_ops(device: str) -> None:
    """``torch.library.opcheck`` of the three custom ops (schema, mutation, fake tensors, torch.compile's
    AOT tracing): every row inside an expert, so that no output row is left unspecified."""
    offsets_E = torch.tensor([0, 70, 70, 73, 150], dtype=torch.int32, device=device)
    A, R, N, E, T = 150, 16, 64, 5, 40
    rnd = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    y, z, w, x_TN = rnd(A, N), rnd(A, 2 * R), rnd(E, N, R), rnd(T, N)
    index = torch.randint(0, T, (A,), device=device)
    for op, args in [
        (_kernels._lowrank_add_op.op, (y.clone(), z, w, offsets_E, 0.5, 2)),
        (_kernels._expert_outer_op.op, (x_TN, z, offsets_E, index, 0.5, 1, True)),
        (_kernels._expert_outer_op.op, (y, z, offsets_E, None, 0.5, 2, False)),
        (_kernels._rows_project_op.op, (x_TN, w, offsets_E, index, 0.5, 1, True)),
        (_kernels._rows_project_op.op, (y, w, offsets_E, None, 1.0, 2, False)),
        (_kernels._swiglu_lora_forward_op.op, (y, rnd(A), rnd(A, 2 * R), w, offsets_E, 0.5)),
        (_kernels._swiglu_lora_backward_op.op, (y, rnd(A), rnd(A, N // 2), rnd(A, 2 * R), w, offsets_E, 0.5)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def _routed_inputs(T: int, K: int, drop: bool, device: str):
    """Token-choice style inputs of ``routed``: rows sorted by expert (sizes COUNTS-like, with empty experts),
    the token of each row, ``combine_TK`` (sorted position of each slot) and dropped slots sorted last."""
    E = len(COUNTS)
    g = torch.Generator().manual_seed(1)
    allowed = torch.tensor([e for e, c in enumerate(COUNTS) if c > 0])
    expert_S = allowed[torch.randint(0, len(allowed), (T * K,), generator=g)]
    keep_S = torch.rand(T * K, generator=g) > 0.2 if drop else torch.ones(T * K, dtype=torch.bool)
    order_A = torch.argsort(torch.where(keep_S, expert_S, E), stable=True)
    counts = torch.bincount(expert_S[keep_S], minlength=E)
    combine_S = torch.empty(T * K, dtype=torch.long)
    combine_S[order_A] = torch.arange(T * K)
    weights_A = torch.rand(T * K, generator=g)
    return [t.to(device) for t in (order_A // K, weights_A, counts.cumsum(0).to(torch.int32), combine_S.view(T, K))]


def check_layer(
    device: str, dtype: torch.dtype, tol: float, *, drop: bool, segments: bool = False, quantize: bool = False,
    gpt_oss: bool = False, bias: bool = False,
) -> None:
    """``LoRAMoELinear.routed`` forward and every gradient with the Triton kernels against the torch code; with
    SwiGLU the kernels' path adds the gate/up delta inside the SwiGLU kernels (checked to be taken)."""
    from torchtune_moe.modules.moe_linear import ClampedSwiGLU
    from torchtune_moe.modules.peft import LoRAMoELinear

    torch.manual_seed(0)
    E, D, H, T, K = len(COUNTS), 128, 64 if not quantize else 128, 40, 6
    kw = dict(activation=ClampedSwiGLU(), bias=True) if gpt_oss else dict(bias=bias)
    with torch.device(device):
        lora = LoRAMoELinear(E, D, H, rank=16, alpha=32.0, quantize_base=quantize, **kw).to(dtype)
        with torch.no_grad():
            for p in lora.parameters():
                p.normal_(0, 0.1)
        lora.quantize_base_weights()
    lora.requires_grad_(False)
    for name in lora.adapter_params():
        lora.get_parameter(name).requires_grad_(True)
    rows_A, weights_A, offsets_E, combine_TK = _routed_inputs(T, K, drop, device)
    weights_A = weights_A.to(dtype)
    x = torch.randn(T, D, device=device, dtype=dtype)
    grad = torch.randn(T, D, device=device, dtype=dtype)
    results = []
    calls = []
    fwd, bwd = _kernels.swiglu_lora_forward, _kernels.swiglu_lora_backward
    _kernels.swiglu_lora_forward = lambda *a, **k: calls.append("fwd") or fwd(*a, **k)  # noqa: E731
    _kernels.swiglu_lora_backward = lambda *a, **k: calls.append("bwd") or bwd(*a, **k)  # noqa: E731
    try:
        for kernels in (True, False):
            lora.lora_kernels = kernels
            xx, ww = x.clone().requires_grad_(True), weights_A.clone().requires_grad_(True)
            out = lora.routed(xx, rows_A, ww, offsets_E, None if segments else combine_TK, may_drop=drop)
            out.backward(grad)
            want_calls = ["fwd", "bwd"] if kernels and not gpt_oss else []
            assert calls == want_calls, f"lora_kernels={kernels}: SwiGLU-LoRA kernels called {calls}"
            calls.clear()
            results.append([out, xx.grad, ww.grad] + [lora.get_parameter(n).grad for n in lora.adapter_params()])
            for name in lora.adapter_params():
                lora.get_parameter(name).grad = None
    finally:
        _kernels.swiglu_lora_forward, _kernels.swiglu_lora_backward = fwd, bwd
    names = ["out", "grad_x", "grad_weights"] + lora.adapter_params()
    valid = int(offsets_E[-1])
    for name, got, want in zip(names, *results):
        if name == "grad_weights":  # dropped rows' routing-weight gradients are not read
            got, want = got[:valid], want[:valid]
        _close(got, want, tol, name)


if __name__ == "__main__":  # CPU, under TRITON_INTERPRET=1: every kernel (the base path's too) on CPU tensors
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    _kernels.use_triton = lambda t: True  # noqa: E731 - the interpreter runs the kernels on CPU tensors
    check_kernels("cpu", torch.float32, 1e-5)
    check_rows_project("cpu", torch.float32, 1e-5)
    check_swiglu_lora("cpu", torch.float32, 1e-5)
    check_custom_ops("cpu")
    for drop in (False, True):
        check_layer("cpu", torch.float32, 1e-5, drop=drop)
    check_layer("cpu", torch.float32, 1e-5, drop=False, gpt_oss=True)
    check_layer("cpu", torch.float32, 1e-5, drop=True, quantize=True)
    check_layer("cpu", torch.float32, 1e-5, drop=True, bias=True)
    print("ok", file=sys.stderr)
