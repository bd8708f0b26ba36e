"""Token cross-entropy over the output projection that never holds the [tokens, vocab] logits.

:class:`LinearCrossEntropyLoss` takes the model's final hidden states (the model built with
``skip_output_layer = True``) and applies the output projection itself, a chunk of tokens at a time. Each chunk's
gradients (with respect to the hidden states and the projection's weight) are computed in the forward, right after
its logits, so the logits and their gradient are freed before the next chunk: the backward only scales the two
stored gradients. Against torchtune's ``CEWithChunkedOutputLoss`` this saves

- the logits kept for the backward (all chunks, in bf16: 2.5 GB for 8192 tokens of Qwen3's 151936-word vocab) and
  their fp32 upcasts;
- the adds that sum the weight gradient over chunks (autograd adds one [vocab, dim] gradient per chunk): here the
  chunks accumulate inside the GEMM's epilogue (``addmm``, beta = 1);
- the cross-entropy's second pass over the logits in the backward.

Why written here: torchtune 0.6.1 has no such loss (its later ``LinearCrossEntropyLoss`` applies the projection per
chunk but leaves the gradients to autograd, so it keeps the logits); Liger-Kernel has one but is a Triton-only
package that the CPU install and the tests cannot run. The GEMMs are ``torch.mm`` / ``torch.addmm``, but the logits'
GEMM where quack's cross-entropy runs (below), which is quack's dense GEMM (:data:`_LOGITS_TILE`). The per-chunk
softmax and its gradient:

- for bf16 logits on a compute-capability 9.x GPU (H100, H200) with quack-kernels importable (a dependency on
  Linux, as for the experts' GEMMs) and a vocabulary that is a multiple of 8: quack's cross-entropy kernel, which
  holds each row in the shared memory of a cluster of CTAs, so it reads the logits once and writes their gradient
  over them. torch's code (below) reads them twice and writes a
  new tensor: at Qwen3's 151936-word vocab, 1024 rows, 209 against 360 us on an H200, and the whole loss (8192
  tokens, forward + backward) 25.5 against 27.5 ms (benchmarks/NOTES.md, session 23). A quack call that fails
  (its JIT on an unsupported driver) warns once and torch's code takes over for the rest of the process;
- elsewhere, plain torch code (:meth:`LinearCrossEntropyLoss.compute_cross_entropy`) that ``torch.compile`` fuses
  (:meth:`LinearCrossEntropyLoss.apply_compile_strategy`).
"""

import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torchtune.modules import TiedLinear

from torchtune_moe.modules._cute_gemm import dense_mm, gemm_usable
from torchtune_moe.modules._kernels import use_triton
from torchtune_moe.modules._utils import is_hopper

__all__ = ["LinearCrossEntropyLoss"]


@functools.cache
def _quack_cross_entropy() -> "Callable | str":
    """quack's ``cross_entropy_fwd_out`` (loss per row, and the logits' gradient written where it is told), or why
    it cannot be imported here (no Triton on a CPU install, the CUTLASS DSL failing to load)."""
    try:
        from quack.cross_entropy import cross_entropy_fwd_out
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return cross_entropy_fwd_out


def _on_hopper(t: torch.Tensor) -> bool:
    """Whether ``t`` is on a compute-capability 9.x GPU (H100, H200)."""
    return t.is_cuda and is_hopper(t.device.index if t.device.index is not None else torch.cuda.current_device())


# Set when quack's kernel failed in this process: from then on torch's code computes the softmax.
_quack_failed: list[str] = []


def _quack_usable(t: torch.Tensor, vocab: int) -> bool:
    """Whether quack's cross-entropy kernel serves [rows, ``vocab``] logits of ``t``'s dtype and device (see the
    module doc): bf16 (the dtype tested on GPUs), rows of 16-byte multiples (its vectorised loads need them)."""
    if t.dtype != torch.bfloat16 or vocab % 8 or _quack_failed or not _on_hopper(t):
        return False
    return not isinstance(_quack_cross_entropy(), str)


# The logits' GEMM where quack's cross-entropy runs: quack's dense GEMM at 128 x 192 tiles, a cluster of two,
# ping-pong (quack's own default on Hopper). On one H200, per 2048-row chunk: 1.58 against cuBLAS's 1.64 ms at Qwen3's
# 151936-word vocabulary, 0.56 against 0.66 ms at OLMoE's 50304; the training step 0.4-0.65 ms shorter at Qwen3. The
# gradients' two GEMMs stay cuBLAS's: quack's best tiles alone were not faster at both vocabularies, and its
# weight-gradient GEMM, faster alone at 151936 words, made the Qwen3 step 0.7 ms slower (benchmarks/NOTES.md,
# session 25).
_LOGITS_TILE = [128, 192, 2, 1]


def _logits_quack(h_CD: torch.Tensor, w_VD: torch.Tensor) -> torch.Tensor:
    """[C, V] logits ``h @ w.T`` through quack's GEMM (:data:`_LOGITS_TILE`)."""
    return dense_mm(h_CD, w_VD.t(), _LOGITS_TILE)


def _logits_torch(h_CD: torch.Tensor, w_VD: torch.Tensor) -> torch.Tensor:
    """[C, V] logits ``h @ w.T`` (torch's GEMM)."""
    return h_CD @ w_VD.t()


def _mm_fp32(a_MK: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    """``a @ b`` written in fp32 for bf16/fp16 ``a``, ``b`` (on CUDA the GEMM writes fp32 itself through
    ``out_dtype``; torch's CPU GEMMs have no ``out_dtype``, so there the operands are upcast)."""
    if a_MK.is_cuda and a_MK.dtype != torch.float32:
        return torch.mm(a_MK, b_KN, out_dtype=torch.float32)
    return a_MK.float() @ b_KN.float()


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of ``cross_entropy(h_ND @ w_VD.T, labels_N)`` with both gradients made in the forward."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, rows, ce_and_grad, logits):
        N, D = h_ND.shape
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        # [N, D] in fp32 (small): the hidden-state gradient is rounded once, after the backward's scaling.
        grad_h_ND = torch.empty(N, D, dtype=torch.float32, device=h_ND.device) if need_h else None
        grad_w_VD = None
        for start in range(0, N, rows):
            h_CD = h_ND[start : start + rows]
            logits_CV = logits(h_CD, w_VD)
            loss_c, grad_CV = ce_and_grad(logits_CV, labels_N[start : start + rows])
            del logits_CV
            loss = loss + loss_c
            if need_h:
                grad_h_ND[start : start + rows] = _mm_fp32(grad_CV, w_VD)
            if need_w:  # summed over chunks in the weight's dtype, in the GEMM's epilogue (beta = 1)
                if grad_w_VD is None:
                    grad_w_VD = grad_CV.t() @ h_CD
                else:
                    torch.addmm(grad_w_VD, grad_CV.t(), h_CD, out=grad_w_VD)
        if need_w and grad_w_VD is None:  # no rows
            grad_w_VD = torch.zeros_like(w_VD)
        ctx.save_for_backward(grad_h_ND, grad_w_VD)
        ctx.h_dtype = h_ND.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        dh = None
        if grad_h_ND is not None:
            dh = (_scaled_rows_compiled if use_triton(grad_h_ND) else _scaled_rows)(grad_h_ND, grad_loss, ctx.h_dtype)
        dw = None
        if grad_w_VD is not None:
            dw = (_scaled_compiled if use_triton(grad_w_VD) else _scaled)(grad_w_VD, grad_loss)
        return dh, dw, None, None, None, None


def _scaled(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t * scale`` in fp32, rounded once to ``t``'s dtype, for a 0-dim ``scale`` on ``t``'s device.

    On CUDA it runs compiled (:data:`_scaled_compiled`): torch's eager multiply by a 0-dim CUDA tensor takes its
    non-vectorised broadcasting kernel (1.2 ms for Qwen3's [151936, 2048] bf16 weight gradient on an H200, 0.3 ms
    compiled), and reading the scale to the host instead (a Python number) costs a host sync that measured
    slower still in the training step (benchmarks/NOTES.md)."""
    return (t.float() * scale).to(t.dtype)


_scaled_compiled = torch.compile(_scaled, dynamic=False)  # compiled at its first call


def _scaled_rows(t_ND: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fp32 [N, D] hidden-state gradient times a 0-dim ``scale``, rounded once to ``dtype``. Compiled on CUDA
    (:data:`_scaled_rows_compiled`, one kernel instead of eager's broadcasting multiply and a cast: ~35 against
    ~130 us at 8192 x 2048 on an H200); its own function because the row count varies from step to step where
    :func:`_scaled`'s shape does not."""
    return (t_ND * scale).to(dtype)


_scaled_rows_compiled = torch.compile(_scaled_rows)  # automatic dynamic shapes: the second row count compiles once more


# The ignored rows are dropped only where that pays: dropping costs gathers of the kept rows and the scatter of their
# gradient (~0.2 ms at 8192 x 2048 on an H200), keeping one costs its share of the three output GEMMs, ~6 * dim * vocab
# flops (2.5 us at Qwen3's 151936-word vocab). They break even near 1500 / vocab of the rows ignored; rows are
# dropped from 1024 / vocab up (ignored rows * vocab >= rows * this). The last position of each sample alone stays
# below it.
_DROP_IGNORED_VOCAB_ROWS = 1024


def _drop_pays(ignored: int, rows: int, vocab: int) -> bool:
    """Whether dropping ``ignored`` of ``rows`` label rows before a ``vocab``-wide projection pays (see above)."""
    return ignored * vocab >= rows * _DROP_IGNORED_VOCAB_ROWS


class LinearCrossEntropyLoss(nn.Module):
    """Mean token cross-entropy of ``hidden @ output.weight.T`` against ``labels``, computed a chunk of tokens at a
    time without keeping any logits (see the module docstring). A drop-in for torchtune's
    ``CEWithChunkedOutputLoss`` in the recipes: the recipe calls :meth:`set_model_output`, which sets
    ``model.skip_output_layer = True``, so the model returns its normed hidden states and this loss owns the
    projection.

    The numbers are the chunked path's: logits in the model's dtype (GEMMs accumulate in fp32), the softmax in
    fp32, the logits' gradient rounded to the model's dtype, the weight gradient summed over chunks in the
    weight's dtype (as autograd sums CEWithChunkedOutputLoss's chunks); the hidden-state gradient is kept in fp32
    and rounded once.

    Memory: one chunk's logits and their gradient at a time ([rows, vocab] each, rows = the label tokens /
    ``num_output_chunks`` but at least ``min_tokens_per_chunk``), plus the
    [vocab, dim] weight gradient and an fp32 [tokens, dim] hidden-state gradient, held from the forward to the
    backward.

    Args:
        num_output_chunks (int): chunks the label tokens are split into (torchtune's key). Default 8.
        min_tokens_per_chunk (int): fewer chunks where they would hold fewer label tokens than this: the output
            GEMMs lose speed on short chunks (the weight gradient's GEMM reduces over the chunk's tokens). At
            Qwen3's 151936-word vocab and 8192 label tokens, 8 chunks of 1024 made the training step 1.3-1.5 ms
            slower than 4 of 2048 on an H200 (benchmarks/NOTES.md, session 24) and the loss alone 0.55 GiB
            lighter (session 22). A chunk's logits take at most
            ``max(tokens / num_output_chunks, min_tokens_per_chunk) * vocab`` elements. 1: exactly
            ``num_output_chunks`` chunks. Default 2048.
        ignore_index (int): label of positions without a loss. Default -100.
        mask_ignored_tokens (bool): drop the ignored positions before the projection, so that masked prompt
            tokens cost no GEMM work, where there are enough of them to outweigh the gathers (from 1024 / vocab of
            the tokens up). Counting them is a host sync per call; after a call with too few to drop, the next
            call keeps every row and counts without waiting, which decides the call after it (so a run whose
            every token has a label syncs once). Default True.

    Raises:
        ValueError: ``num_output_chunks`` or ``min_tokens_per_chunk`` not an integer >= 1, ``ignore_index`` not
            an integer, ``mask_ignored_tokens`` not a bool.
    """

    def __init__(
        self, num_output_chunks: int = 8, ignore_index: int = -100, mask_ignored_tokens: bool = True,
        min_tokens_per_chunk: int = 2048,
    ):
        super().__init__()
        for key, value in (("num_output_chunks", num_output_chunks), ("min_tokens_per_chunk", min_tokens_per_chunk)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
        if not isinstance(mask_ignored_tokens, bool):
            raise ValueError(f"mask_ignored_tokens must be true or false, got {mask_ignored_tokens!r}")
        self.num_output_chunks = num_output_chunks
        self.min_tokens_per_chunk = min_tokens_per_chunk
        self.ignore_index = ignore_index
        self.mask_ignored_tokens = mask_ignored_tokens
        self._output = None
        # The latest counted call's (ignored rows, rows), None before the first call; and a call's label count on
        # its way to the host (the count, the CUDA event after its copy or None, rows), read by the next call.
        self._last_ignored = None
        self._pending_count = None

    def set_model_output(self, model: nn.Module) -> None:
        """Takes the projection from ``model.output`` (a bias-free ``nn.Linear`` or torchtune's ``TiedLinear``)
        and sets ``model.skip_output_layer = True`` so that the model returns hidden states.

        Raises:
            ValueError: an output projection of another kind (a LoRA-adapted one: use ``CEWithChunkedOutputLoss``),
                or one sharded as an FSDP unit of its own.
        """
        output = getattr(model, "output", None)
        if isinstance(output, FSDPModule) or (isinstance(output, TiedLinear) and isinstance(output.tied_module, FSDPModule)):
            raise ValueError(
                "loss: LinearCrossEntropyLoss cannot take an output projection that is an FSDP unit of its own "
                "(custom_sharded_layers names it): its weight is gathered only inside that module's forward"
            )
        if isinstance(output, TiedLinear):
            pass
        elif type(output) is not nn.Linear or output.bias is not None:
            raise ValueError(
                f"loss: LinearCrossEntropyLoss needs the model's output projection as a bias-free nn.Linear or a "
                f"TiedLinear, got {type(output).__name__}{' with a bias' if isinstance(output, nn.Linear) else ''} "
                f"(with apply_lora_to_output use torchtune.modules.loss.CEWithChunkedOutputLoss)"
            )
        self._output = output
        model.skip_output_layer = True

    def _count_now(self, vocab: int) -> bool:
        """Whether to count this call's ignored rows now (a host sync) to drop them: before the first call, and
        after a call whose ignored rows were worth dropping. After one with too few, this call keeps every row
        (its result is the same either way) and its count reaches the host without the host waiting
        (:meth:`_count_later`) to decide the next call: data whose every token has a label never syncs here."""
        if self._pending_count is not None:
            count, event, rows = self._pending_count
            if event is not None:
                event.synchronize()  # recorded a call ago: long complete
            self._last_ignored, self._pending_count = (rows - int(count), rows), None
        return self._last_ignored is None or _drop_pays(*self._last_ignored, vocab)

    def _count_later(self, total: torch.Tensor, rows: int) -> None:
        """Starts the copy of this call's label count to the host, read by the next call's :meth:`_count_now`."""
        if total.is_cuda:
            count = torch.empty((), dtype=total.dtype, pin_memory=True)
            count.copy_(total, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending_count = (count, event, rows)
        else:
            self._pending_count = (total, None, rows)

    @property
    def weight(self) -> torch.Tensor:
        """[V, D] the output projection's current weight (read at each call: FSDP2 swaps the tensor)."""
        if self._output is None:
            raise RuntimeError("LinearCrossEntropyLoss: call set_model_output(model) before computing the loss")
        if isinstance(self._output, TiedLinear):
            return self._output.tied_module.weight
        return self._output.weight

    def apply_compile_strategy(self) -> "LinearCrossEntropyLoss":
        """Compiles the per-chunk softmax and gradient (:meth:`compute_cross_entropy`, used where quack's kernel is
        not: see the module doc) with ``torch.compile``; the chunk loop and the GEMMs stay eager. Returns self.

        torch.compile's automatic dynamic shapes: the first call compiles for its row count, the first other row
        count compiles once more with the rows symbolic (the label tokens per step vary), the vocabulary stays
        static. ``dynamic=True`` (the vocabulary symbolic too) made the kernel 1.5x slower on an H200."""
        self.compute_cross_entropy = torch.compile(self.compute_cross_entropy)
        return self

    def compute_cross_entropy(self, logits_CV: torch.Tensor, labels_C: torch.Tensor):
        """One chunk's summed cross-entropy and its gradient with respect to the logits.

        Args:
            logits_CV (torch.Tensor): [C, V] logits (any float dtype; the math is fp32).
            labels_C (torch.Tensor): [C] target ids, ``ignore_index`` for none.

        Returns:
            tuple: fp32 scalar loss sum, [C, V] gradient of that sum in the logits' dtype.
        """
        logits = logits_CV.float()
        valid_C = labels_C != self.ignore_index
        target_C = torch.where(valid_C, labels_C, 0)
        lse_C = torch.logsumexp(logits, dim=-1)
        loss = torch.where(valid_C, lse_C - logits.gather(1, target_C[:, None]).squeeze(1), 0.0).sum()
        cols_V = torch.arange(logits.shape[1], device=logits.device)
        onehot_CV = (cols_V[None, :] == target_C[:, None]).to(logits.dtype)
        grad_CV = (torch.exp(logits - lse_C[:, None]) - onehot_CV) * valid_C[:, None]
        return loss, grad_CV.to(logits_CV.dtype)

    def fused_cross_entropy(self, logits_CV: torch.Tensor, labels_C: torch.Tensor):
        """:meth:`compute_cross_entropy` through quack's kernel (CUDA, see the module doc): the gradient is written
        over ``logits_CV``, which must be contiguous and not needed afterwards. If quack fails, a warning (once) and
        :meth:`compute_cross_entropy` for this and every later chunk."""
        if not _quack_failed:
            loss_C = torch.empty(logits_CV.shape[0], dtype=torch.float32, device=logits_CV.device)
            try:
                _quack_cross_entropy()(logits_CV, labels_C, None, loss_C, None, logits_CV, self.ignore_index)
                return loss_C.sum(), logits_CV
            except Exception as e:  # raised before the kernel runs (its JIT), so the logits are untouched
                _quack_failed.append(f"{type(e).__name__}: {e}")
                warnings.warn(f"LinearCrossEntropyLoss: quack's cross-entropy kernel failed ({_quack_failed[0]}); "
                              f"torch's code computes the softmax from now on in this process")
        return self.compute_cross_entropy(logits_CV, labels_C)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        Args:
            hidden (torch.Tensor): [B, S, D] or [N, D] final (normed) hidden states.
            labels (torch.Tensor): [B, S] or [N] target ids, ``ignore_index`` where there is no loss.

        Returns:
            torch.Tensor: fp32 scalar, the mean cross-entropy over the non-ignored labels (0 if there are none).

        Raises:
            ValueError: hidden states and labels of mismatched shapes, or a width other than the projection's.
        """
        w_VD = self.weight
        if isinstance(w_VD, DTensor):
            raise RuntimeError(
                "LinearCrossEntropyLoss: the output weight is still sharded after the model's forward; with FSDP2 "
                "keep the root unit's weights gathered until the backward: model.set_reshard_after_forward(False, "
                "recurse=False) after fully_shard(model) (the recipes do this)"
            )
        h_ND = hidden.reshape(-1, hidden.shape[-1])
        labels_N = labels.reshape(-1)
        if h_ND.shape[0] != labels_N.shape[0] or h_ND.shape[-1] != w_VD.shape[1]:
            raise ValueError(
                f"LinearCrossEntropyLoss: hidden states {list(hidden.shape)} do not match labels {list(labels.shape)}"
                f" and the output weight {list(w_VD.shape)} (expected [..., {w_VD.shape[1]}] hidden states with one"
                f" label each; is model.skip_output_layer set?)"
            )
        valid_N = labels_N != self.ignore_index
        total = valid_N.sum()
        N, V = labels_N.numel(), w_VD.shape[0]
        if self.mask_ignored_tokens and self._count_now(V):
            keep = valid_N.nonzero().squeeze(1)  # the host waits for the GPU here to size the kept rows
            self._last_ignored = (N - keep.numel(), N)
            if _drop_pays(*self._last_ignored, V):
                h_ND, labels_N = h_ND.index_select(0, keep), labels_N.index_select(0, keep)
        elif self.mask_ignored_tokens:
            self._count_later(total, N)
        rows = max(-(-h_ND.shape[0] // self.num_output_chunks), self.min_tokens_per_chunk)
        if torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad):
            quack = _quack_usable(h_ND, w_VD.shape[0])
            ce = self.fused_cross_entropy if quack else self.compute_cross_entropy
            logits = _logits_quack if quack and gemm_usable(h_ND) else _logits_torch
            loss_sum = _LinearCrossEntropy.apply(h_ND, w_VD, labels_N, rows, ce, logits)
        else:
            loss_sum = sum(
                (F.cross_entropy((h_CD @ w_VD.t()).float(), l_C, ignore_index=self.ignore_index, reduction="sum")
                 for h_CD, l_C in zip(h_ND.split(rows), labels_N.split(rows))),
                torch.zeros((), dtype=torch.float32, device=h_ND.device),
            )
        return loss_sum / total.clamp(min=1)
