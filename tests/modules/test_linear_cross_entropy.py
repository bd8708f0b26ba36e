"""LinearCrossEntropyLoss against F.cross_entropy on the full logits: loss and both gradients, masked labels,
chunk counts, tied and frozen weights, the model's ``skip_output_layer`` and refused inputs. The CUDA path (fp32
GEMM outputs, the compiled softmax, quack's kernel) are the ``gpu``-marked tests at the end."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import TiedLinear
from torchtune.modules.peft import LoRALinear

from torchtune_moe.models import moe
from torchtune_moe.modules import LinearCrossEntropyLoss
from torchtune_moe.modules import _cute_gemm
from torchtune_moe.modules import linear_cross_entropy as lce_module


class _Head(nn.Module):
    def __init__(self, dim, vocab, dtype=torch.float32, tied=False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim, dtype=dtype)
        self.output = TiedLinear(self.tok_embeddings) if tied else nn.Linear(dim, vocab, bias=False, dtype=dtype)

    @property
    def weight(self):
        return self.tok_embeddings.weight if isinstance(self.output, TiedLinear) else self.output.weight


def _bf16_case(dim, vocab, rows, cols, chunks, device="cpu", **loss_kw):
    """A bf16 head of ``vocab`` x ``dim`` with its loss (``chunks`` chunks however short), [rows, cols] hidden
    states and labels (seeded)."""
    torch.manual_seed(0)
    head = _Head(dim, vocab, dtype=torch.bfloat16).to(device)
    loss_fn = LinearCrossEntropyLoss(num_output_chunks=chunks, min_tokens_per_chunk=1, **loss_kw)
    loss_fn.set_model_output(head)
    h = torch.randn(rows, cols, dim, dtype=torch.bfloat16, device=device, requires_grad=True)
    return head, loss_fn, h, torch.randint(0, vocab, (rows, cols), device=device)


def _reference(h, w, labels):
    """Mean cross-entropy of the full fp32-upcast logits (the plain path)."""
    return F.cross_entropy((h @ w.t()).float().reshape(-1, w.shape[0]), labels.reshape(-1))


def _grads(fn, h, w, times=3.0):
    """loss, and the gradients of ``loss * times`` (3: a grad_output other than 1)."""
    h.grad = w.grad = None
    loss = fn()
    (loss * times).backward()
    return loss.detach(), h.grad.clone(), w.grad.clone()


def _rows_seen(monkeypatch) -> list:
    """Records the rows each call of the loss's autograd function gets (fewer than the labels: rows dropped)."""
    seen, apply = [], lce_module._LinearCrossEntropy.apply

    def spy(h_ND, *args):
        seen.append(h_ND.shape[0])
        return apply(h_ND, *args)

    monkeypatch.setattr(lce_module._LinearCrossEntropy, "apply", spy)
    return seen


@pytest.mark.parametrize("chunks", [1, 3, 8, 100])
@pytest.mark.parametrize("mask", ["drop", "keep", False])
@pytest.mark.parametrize("tied", [False, True])
def test_matches_full_logits_fp32(chunks, mask, tied, monkeypatch):
    """Ignored rows dropped before the projection ("drop"), kept because too few to pay for the gathers ("keep",
    the default rule at this tiny vocab), or kept by ``mask_ignored_tokens=False``: the same loss and gradients."""
    torch.manual_seed(0)
    head = _Head(16, 37, tied=tied)
    if mask == "drop":
        monkeypatch.setattr(lce_module, "_DROP_IGNORED_VOCAB_ROWS", 0)
    loss_fn = LinearCrossEntropyLoss(num_output_chunks=chunks, mask_ignored_tokens=bool(mask), min_tokens_per_chunk=1)
    loss_fn.set_model_output(head)
    h = torch.randn(3, 11, 16, requires_grad=True)
    labels = torch.randint(0, 37, (3, 11))
    labels[0, :4] = -100  # masked prompt tokens
    labels[2, -1] = -100
    seen = _rows_seen(monkeypatch)
    # times 3, and times the label count as the recipes do (the summed loss's gradient scale is then exactly 1)
    for times in (3.0, float((labels != -100).sum())):
        got = _grads(lambda: loss_fn(h, labels), h, head.weight, times)
        assert seen.pop() == (28 if mask == "drop" else 33)
        ref = _grads(lambda: _reference(h, head.weight, labels), h, head.weight, times)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        assert got[1][0, :4].abs().max() == 0  # no gradient into masked positions


def test_matches_full_logits_bf16():
    """bf16: the same roundings as the plain path up to the fp32 accumulation order (one bf16 ulp)."""
    head, loss_fn, h, labels = _bf16_case(64, 301, 4, 32, chunks=4)
    got = _grads(lambda: loss_fn(h, labels), h, head.weight)
    ref = _grads(lambda: _reference(h, head.weight, labels), h, head.weight)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    _assert_as_close_to_fp32(got, ref, h, head.weight, labels)


def _assert_as_close_to_fp32(got, ref, h, w, labels):
    """The bf16 gradients against the fp32 math: the hidden states' within the plain path's distance (ours rounds
    once, after an fp32 GEMM output), the weight's within 3x it (summed over the chunks in bf16, as autograd sums
    CEWithChunkedOutputLoss's chunks; the plain path is one GEMM)."""
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref32 = _grads(lambda: _reference(h32, w32, labels), h32, w32)
    for i, slack in ((1, 1.01), (2, 3.0)):
        err_ours = (got[i].float() - ref32[i]).abs().max().item()
        err_plain = (ref[i].float() - ref32[i]).abs().max().item()
        assert err_ours <= slack * err_plain + 1e-7, (i, err_ours, err_plain)


def test_frozen_weight_no_grad_and_eval():
    torch.manual_seed(0)
    head = _Head(8, 20)
    head.output.weight.requires_grad_(False)
    loss_fn = LinearCrossEntropyLoss(num_output_chunks=2)
    loss_fn.set_model_output(head)
    h = torch.randn(10, 8, requires_grad=True)
    labels = torch.randint(0, 20, (10,))
    loss_fn(h, labels).backward()
    assert head.output.weight.grad is None and h.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(loss_fn(h, labels), _reference(h, head.output.weight, labels))


def test_all_labels_ignored_gives_zero():
    head = _Head(8, 20)
    loss_fn = LinearCrossEntropyLoss()
    loss_fn.set_model_output(head)
    h = torch.randn(2, 5, 8, requires_grad=True)
    loss = loss_fn(h, torch.full((2, 5), -100))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max() == 0 and head.output.weight.grad.abs().max() == 0


def test_moe_model_skip_output_layer():
    """The loss on the model's hidden states equals the cross-entropy of the model's own logits."""
    torch.manual_seed(0)
    kw = dict(vocab_size=50, num_layers=2, num_heads=2, num_kv_heads=2, embed_dim=32, max_seq_len=16,
              num_experts=4, experts_per_token=2, moe_hidden_dim=16)
    model = moe(**kw)
    tokens = torch.randint(0, 50, (2, 12))
    labels = torch.randint(0, 50, (2, 12))
    ref = _reference(model(tokens), torch.eye(50), labels)  # logits @ I.T: the logits themselves
    loss_fn = LinearCrossEntropyLoss(num_output_chunks=3)
    loss_fn.set_model_output(model)
    assert model.skip_output_layer
    hidden = model(tokens)
    assert hidden.shape == (2, 12, 32)
    torch.testing.assert_close(loss_fn(hidden, labels), ref)


def test_drop_rule_follows_the_vocab_and_counts_late_after_a_call_that_kept_all(monkeypatch):
    """The default rule drops ignored rows from 1024 / vocab of the rows up: at a 4096-word vocab, 16 of 64. After a
    call with too few to drop, the next call keeps every row without counting first (no host sync) and its count,
    read later, decides the call after it: one call late when the data changes, the same loss either way."""
    torch.manual_seed(0)
    head = _Head(8, 4096)
    loss_fn = LinearCrossEntropyLoss(min_tokens_per_chunk=1)
    loss_fn.set_model_output(head)
    h = torch.randn(64, 8, requires_grad=True)
    seen = _rows_seen(monkeypatch)
    late = []
    count_later = loss_fn._count_later
    monkeypatch.setattr(loss_fn, "_count_later", lambda *a: late.append(1) or count_later(*a))
    # (ignored labels, rows projected, counted late): 15 of 64 is too few; the next call keeps all 64 of 16 ignored
    # unsynced, and its count (16: worth dropping) makes the call after it count first and drop.
    for ignored, rows, counted_late in ((15, 64, 0), (16, 64, 1), (16, 48, 0), (1, 64, 0), (0, 64, 1), (0, 64, 1)):
        labels = torch.randint(0, 4096, (64,))
        labels[:ignored] = -100
        loss = loss_fn(h, labels)
        assert (seen.pop(), len(late)) == (rows, counted_late), ignored
        late.clear()
        torch.testing.assert_close(loss, _reference(h, head.weight, labels))


def test_min_tokens_per_chunk_merges_short_chunks(monkeypatch):
    """Chunks of fewer than ``min_tokens_per_chunk`` label tokens are merged: 33 tokens with 8 chunks asked for are
    chunks of 5 (7 of them); with at least 10, 4 chunks (10, 10, 10, 3); the default (2048) makes one; the same loss
    each way."""
    torch.manual_seed(0)
    head = _Head(16, 37)
    h = torch.randn(3, 11, 16, requires_grad=True)
    labels = torch.randint(0, 37, (3, 11))
    losses = []
    for kw, chunks in (({"min_tokens_per_chunk": 1}, 7), ({"min_tokens_per_chunk": 10}, 4), ({}, 1)):
        loss_fn = LinearCrossEntropyLoss(num_output_chunks=8, **kw)
        loss_fn.set_model_output(head)
        calls = []
        ce = loss_fn.compute_cross_entropy
        monkeypatch.setattr(loss_fn, "compute_cross_entropy", lambda *a: calls.append(a[0].shape[0]) or ce(*a))
        losses.append(loss_fn(h, labels))
        assert len(calls) == chunks, (kw, calls)
        with torch.no_grad():  # the no-grad path splits the same way
            torch.testing.assert_close(loss_fn(h, labels), losses[-1])
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(losses[2], losses[0])
    assert LinearCrossEntropyLoss().min_tokens_per_chunk == 2048


def test_refused():
    with pytest.raises(ValueError, match="num_output_chunks must be an integer >= 1, got 0"):
        LinearCrossEntropyLoss(num_output_chunks=0)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=f"min_tokens_per_chunk must be an integer >= 1, got {bad!r}"):
            LinearCrossEntropyLoss(min_tokens_per_chunk=bad)
    with pytest.raises(ValueError, match="mask_ignored_tokens must be true or false, got 'yes'"):
        LinearCrossEntropyLoss(mask_ignored_tokens="yes")
    with pytest.raises(ValueError, match="ignore_index must be an integer, got 1.5"):
        LinearCrossEntropyLoss(ignore_index=1.5)
    loss_fn = LinearCrossEntropyLoss()
    with pytest.raises(RuntimeError, match="set_model_output"):
        loss_fn(torch.randn(2, 8), torch.zeros(2, dtype=torch.long))
    head = _Head(8, 20)
    head.output = LoRALinear(8, 20, rank=2, alpha=4)
    with pytest.raises(ValueError, match="apply_lora_to_output use torchtune.modules.loss.CEWithChunkedOutputLoss"):
        loss_fn.set_model_output(head)
    head.output = nn.Linear(8, 20)
    with pytest.raises(ValueError, match="bias-free nn.Linear or a TiedLinear, got Linear with a bias"):
        loss_fn.set_model_output(head)
    head = _Head(8, 20)
    loss_fn.set_model_output(head)
    with pytest.raises(ValueError, match=r"do not match labels \[3\] and the output weight \[20, 8\]"):
        loss_fn(torch.randn(2, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="is model.skip_output_layer set"):
        loss_fn(torch.randn(2, 20), torch.zeros(2, dtype=torch.long))



def test_quack_failure_warns_once_and_the_torch_code_takes_over(monkeypatch):
    """A quack call that raises (its JIT on an unsupported driver): one warning, the same loss and gradients from
    the torch code, and no further quack calls in the process. On CPU, with quack made to look usable."""
    head, loss_fn, h, labels = _bf16_case(16, 40, 3, 10, chunks=4)
    ref = _grads(lambda: loss_fn(h, labels), h, head.weight)  # the torch code (no quack on CPU)
    assert not lce_module._quack_usable(h, 40)

    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("DSL JIT failed")

    monkeypatch.setattr(lce_module, "_quack_failed", [])
    monkeypatch.setattr(lce_module, "_quack_cross_entropy", lambda: broken)
    monkeypatch.setattr(lce_module, "_on_hopper", lambda t: True)
    assert lce_module._quack_usable(h, 40) and not lce_module._quack_usable(h, 41)
    with pytest.warns(UserWarning, match="quack's cross-entropy kernel failed.*DSL JIT failed"):
        got = _grads(lambda: loss_fn(h, labels), h, head.weight)
    assert len(calls) == 1 and not lce_module._quack_usable(h, 40)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)

@pytest.mark.parametrize("gemm_ok", [True, False])
def test_logits_gemm_goes_to_quack_where_its_cross_entropy_runs(monkeypatch, gemm_ok):
    """Where quack's cross-entropy serves the logits, their GEMM is quack's too (``dense_mm`` at
    ``_LOGITS_TILE``), unless quack's GEMMs are off here (``gemm_usable``: TORCHTUNE_MOE_GROUPED_GEMM=torch, or a
    failure before); the loss and gradients do not change. On CPU with stand-ins for the GPU kernels."""
    head, loss_fn, h, labels = _bf16_case(16, 40, 3, 10, chunks=4)
    ref = _grads(lambda: loss_fn(h, labels), h, head.weight)
    tiles = []

    def dense_mm(a, b, tile):
        tiles.append(tile)
        return a @ b

    monkeypatch.setattr(lce_module, "_quack_usable", lambda t, vocab: True)
    monkeypatch.setattr(lce_module, "gemm_usable", lambda t: gemm_ok)
    monkeypatch.setattr(lce_module, "dense_mm", dense_mm)
    monkeypatch.setattr(loss_fn, "fused_cross_entropy", loss_fn.compute_cross_entropy)
    got = _grads(lambda: loss_fn(h, labels), h, head.weight)
    assert tiles == ([lce_module._LOGITS_TILE] * 4 if gemm_ok else [])  # one GEMM per chunk
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_bf16_matches_full_logits(compiled):
    """CUDA: the hidden-state GEMM writes fp32 (``out_dtype``), ``addmm`` sums the weight gradient in its
    epilogue, the softmax compiled or eager; against the plain path and the fp32 math."""
    head, loss_fn, h, labels = _bf16_case(512, 5003, 4, 300, chunks=8, device="cuda")  # 5003: not quack's
    if compiled:
        loss_fn.apply_compile_strategy()
    labels[:, :50] = -100
    got = _grads(lambda: loss_fn(h, labels), h, head.weight)
    ref = _grads(lambda: _reference(h, head.weight, labels), h, head.weight)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)
    _assert_as_close_to_fp32(got, ref, h, head.weight, labels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_every_label_kept_counts_without_a_host_sync():
    """After a call with too few ignored labels to drop (the last position of each sample), the next call's forward
    makes no synchronizing CUDA call (torch's sync debug mode), and the loss and gradients stay the plain path's."""
    head, loss_fn, h, labels = _bf16_case(256, 5008, 4, 512, chunks=2, device="cuda")
    labels[:, -1] = -100
    ref = _grads(lambda: _reference(h, head.weight, labels), h, head.weight)
    _grads(lambda: loss_fn(h, labels), h, head.weight)  # counts now: nothing worth dropping
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = loss_fn(h, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not [w for w in caught if "synchroniz" in str(w.message)], [str(w.message) for w in caught]
    assert loss_fn._pending_count is not None  # its count is on its way to the host
    got = _grads(lambda: loss_fn(h, labels), h, head.weight)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)
    _assert_as_close_to_fp32(got, ref, h, head.weight, labels)
    torch.testing.assert_close(loss, got[0])


def _quack_here() -> bool:
    return torch.cuda.is_available() and lce_module._quack_usable(torch.empty(0, device="cuda", dtype=torch.bfloat16), 8)


@pytest.mark.gpu
@pytest.mark.skipif(not _quack_here(), reason="needs quack-kernels and a compute-capability 9.x GPU")
@pytest.mark.parametrize("vocab", [5008, 50304, 5003])
@pytest.mark.parametrize("mask", [True, False])
def test_quack_cross_entropy_matches_torch_code(vocab, mask, monkeypatch):
    """quack's kernel and its logits GEMM (the default on an H100/H200) against the torch code they replace: the
    same loss, gradients within a bf16 rounding, ignored rows through the kernel too (``mask_ignored_tokens=False``). A vocab that is
    not a multiple of 8 (rows not 16-byte aligned) takes the torch code."""
    head, loss_fn, h, labels = _bf16_case(256, vocab, 2, 333, chunks=3, device="cuda", mask_ignored_tokens=mask)
    labels[:, :40] = -100
    calls = []
    fused = loss_fn.fused_cross_entropy
    monkeypatch.setattr(loss_fn, "fused_cross_entropy", lambda *a: calls.append(1) or fused(*a))
    gemms, dense_mm = [], lce_module.dense_mm
    monkeypatch.setattr(lce_module, "dense_mm", lambda *a: gemms.append(1) or dense_mm(*a))
    got = _grads(lambda: loss_fn(h, labels), h, head.weight)
    assert not lce_module._quack_failed, lce_module._quack_failed
    assert not _cute_gemm._failed, _cute_gemm._failed
    assert len(calls) == len(gemms) == (3 if vocab % 8 == 0 else 0)  # quack served every chunk, or none
    monkeypatch.setattr(lce_module, "_quack_usable", lambda t, vocab: False)
    ref = _grads(lambda: loss_fn(h, labels), h, head.weight)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(got[1:], ref[1:]):
        torch.testing.assert_close(g, r, rtol=1.6e-2, atol=1e-5)
    assert got[1][:, :40].abs().max() == 0
    _assert_as_close_to_fp32(got, _grads(lambda: _reference(h, head.weight, labels), h, head.weight), h,
                             head.weight, labels)
