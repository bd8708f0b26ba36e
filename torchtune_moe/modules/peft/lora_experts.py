"""LoRA on the routed experts: one low-rank pair per expert, run with grouped GEMMs inside the fused expert path."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
from torchtune.modules.peft import AdapterModule

from torchtune_moe.modules import _kernels
from torchtune_moe.modules._cute_gemm import bf16_gemm
from torchtune_moe.modules._grouped_gemm import BF16, Rows
from torchtune_moe.modules.moe_linear import (
    ClampedSwiGLU,
    MoELinear,
    _activate,
    _activate_backward,
    _bias_grad,
    _combine,
    _glu,
    _local,
    token_segments,
)

__all__ = ["LoRAMoELinear", "dequantize", "to_nf4_checked"]

# grouped_mm needs 16-byte aligned rows: the rank is a row length of the adapter matrices.
_RANK_MULTIPLE = 8


def dequantize(w: torch.Tensor, shape: Optional[torch.Size] = None) -> torch.Tensor:
    """The dense value of a (possibly NF4) base weight, in its original shape ``shape`` when given.

    torchao's NF4 takes 2-D tensors only, so quantized stacked expert weights are kept as ``[E*rows, cols]``.
    """
    if isinstance(w, NF4Tensor):
        w = w.get_original_weight()
    return w if shape is None else w.view(shape)


# torchao NF4: 64-element blocks whose scales are quantized in blocks of 256.
_NF4_NUMEL_MULTIPLE = 64 * 256


def to_nf4_checked(w: torch.Tensor, what: str) -> NF4Tensor:
    """``to_nf4(w)``, refusing (ValueError naming ``what``) a tensor torchao cannot quantize."""
    if w.numel() % _NF4_NUMEL_MULTIPLE:
        raise ValueError(
            f"quantize_base: {what} has {w.numel()} elements; NF4 (torchao) needs a multiple of {_NF4_NUMEL_MULTIPLE}"
        )
    return to_nf4(w)


class LoRAMoELinear(MoELinear, AdapterModule):
    """:class:`~torchtune_moe.modules.MoELinear` with a LoRA pair per expert on each projection; base frozen.

    ``W_e' = W_e + (alpha / rank) * B_e @ A_e`` for every expert ``e``, with separate pairs for the gate and the
    up projections (as the Hub checkpoints, PEFT and vLLM describe them: one adapter per
    ``experts.e.{gate,up,down}_proj``):

    - ``lora_gate_up_a`` [E, P*r, D]: rows ``[p*r:(p+1)*r]`` are the A of part p (P = 2 parts, gate then up,
      when gated; 1 otherwise); ``lora_gate_up_b`` [E, 2H (gated) or H, r]: rows ``[p*H:(p+1)*H]`` are the B of
      part p.
    - ``lora_down_a`` [E, r, H], ``lora_down_b`` [E, D, r].

    GPT-OSS (a :class:`~torchtune_moe.modules.moe_linear.ClampedSwiGLU` activation) keeps one pair (P = 1) on its
    whole fused ``gate_up_proj``, gate and up rows interleaved: the Hub stores that projection as one parameter
    and PEFT adapts it with one pair (``target_parameters``). Its biases (``bias=True``) stay frozen base weights:
    the gate/up bias is added inside the fused node, the down bias per routed row, scaled by the routing weight,
    as :class:`MoELinear` does.

    The adapter runs inside the same fused autograd node as the experts (:class:`_RoutedExpertsLoRA`): each
    low-rank product runs over the rows sorted by expert (no Python loop over experts, no host sync), and
    besides the base path it keeps only the ``[A, P*r]`` and ``[A, r]`` down-projected activations. On CUDA
    the products are Triton kernels that read each big activation as few times as they can
    (:func:`~torchtune_moe.modules._kernels.rows_project`, fused with the row gathers;
    :func:`~torchtune_moe.modules._kernels.lowrank_add_`, in place; and
    :func:`~torchtune_moe.modules._kernels.expert_outer` for the weight gradients); elsewhere grouped GEMMs.
    Set ``lora_kernels = False`` on a module to run the grouped GEMMs on CUDA too (benchmarks and tests
    compare the two).

    ``quantize_base`` stores the frozen base weights in NF4 (torchao, as torchtune's QLoRA): call
    :meth:`quantize_base_weights` once they hold their values (the builder does on a real device; the recipe
    after loading a checkpoint). Expert adapters take no dropout.

    Args:
        num_experts, dim, hidden_dim, activation, gated, bias: as :class:`MoELinear`.
        rank (int): r, a positive multiple of 8 (grouped GEMM alignment).
        alpha (float): scaling numerator (``scale = alpha / rank``).
        quantize_base (bool): NF4 base weights.
    """

    lora_kernels: bool = True

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        *,
        rank: int,
        alpha: float,
        activation="silu",
        gated: bool = True,
        bias: bool = False,
        quantize_base: bool = False,
    ):
        if rank < 1 or rank % _RANK_MULTIPLE:
            raise ValueError(
                f"lora_rank must be a positive multiple of {_RANK_MULTIPLE} for the experts' grouped GEMMs, got {rank}"
            )
        super().__init__(num_experts, dim, hidden_dim, activation=activation, gated=gated, bias=bias)
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        # One pair per Hub projection: gate and up apart, except GPT-OSS's interleaved fused gate_up_proj.
        self.parts = 2 if gated and not isinstance(self.act, ClampedSwiGLU) else 1
        self._quantize_base = quantize_base
        E, P = num_experts, self.parts
        self.lora_gate_up_a = nn.Parameter(torch.empty(E, P * rank, dim))
        self.lora_gate_up_b = nn.Parameter(torch.empty(E, self.gate_up_proj.shape[1], rank))
        self.lora_down_a = nn.Parameter(torch.empty(E, rank, hidden_dim))
        self.lora_down_b = nn.Parameter(torch.empty(E, dim, rank))
        self.initialize_parameters()

    @classmethod
    def from_moe_linear(cls, base: MoELinear, *, rank: int, alpha: float, quantize_base: bool = False):
        """A LoRA version of ``base`` sharing its (frozen) weights and biases, built on their device."""
        if base.expert_fp8:
            raise ValueError("expert_fp8=True is not supported with LoRA on the experts; build the base with expert_fp8=False")
        bias = base.gate_up_proj_bias is not None
        with torch.device(base.gate_up_proj.device):
            lora = cls(
                base.num_experts, base.dim, base.hidden_dim, rank=rank, alpha=alpha, activation=base.act,
                gated=base.gated, bias=bias, quantize_base=quantize_base,
            )
        lora.gate_up_proj, lora.down_proj = base.gate_up_proj, base.down_proj
        if bias:
            lora.gate_up_proj_bias, lora.down_proj_bias = base.gate_up_proj_bias, base.down_proj_bias
        lora.to(dtype=base.gate_up_proj.dtype)
        return lora

    def initialize_parameters(self) -> None:
        """A as ``nn.Linear``'s default (kaiming uniform, a=sqrt(5)) per expert, B zero: the adapter starts at 0."""
        for a in (self.lora_gate_up_a, self.lora_down_a):
            bound = 1.0 / math.sqrt(a.shape[-1])
            nn.init.uniform_(a, -bound, bound)
        nn.init.zeros_(self.lora_gate_up_b)
        nn.init.zeros_(self.lora_down_b)

    def adapter_params(self) -> list[str]:
        return ["lora_gate_up_a", "lora_gate_up_b", "lora_down_a", "lora_down_b"]

    @property
    def base_shapes(self) -> dict[str, torch.Size]:
        """Dense shapes of the base weights (an NF4 weight is stored flattened to 2-D)."""
        E, D, H = self.num_experts, self.dim, self.hidden_dim
        return {"gate_up_proj": torch.Size((E, (2 if self.gated else 1) * H, D)), "down_proj": torch.Size((E, D, H))}

    @torch.no_grad()
    def quantize_base_weights(self) -> None:
        """Stores the base weights in NF4 (no-op unless ``quantize_base``, already done or on meta)."""
        if not self._quantize_base:
            return
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(self, name)
            if isinstance(w, NF4Tensor) or w.is_meta:
                continue
            setattr(self, name, nn.Parameter(to_nf4_checked(w.detach().flatten(0, 1), name), requires_grad=False))

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(A, B, parts)`` of base weight ``name``: A [E, parts*r, in], B [E, out, r] (see class doc)."""
        if name == "gate_up_proj":
            return self.lora_gate_up_a, self.lora_gate_up_b, self.parts
        if name == "down_proj":
            return self.lora_down_a, self.lora_down_b, 1
        raise KeyError(name)

    @torch.no_grad()
    def merged_weight(self, name: str) -> torch.Tensor:
        """``W + scale * B @ A`` per expert (and part), in the base weight's dense shape and dtype."""
        w = dequantize(getattr(self, name), self.base_shapes[name])
        a, b, parts = self.lora_factors(name)
        r, rows = self.rank, b.shape[1] // parts
        delta = torch.cat(
            [b[:, p * rows : (p + 1) * rows].float() @ a[:, p * r : (p + 1) * r].float() for p in range(parts)], dim=1
        )
        return (w.float() + self.scale * delta).to(w.dtype)

    def grouped(self, x_AD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """Unfused reference path (plain autograd). Same contract as :meth:`MoELinear.grouped`."""
        P, r = self.parts, self.rank
        H = self.lora_gate_up_b.shape[1] // P  # rows of each part
        w_gu = dequantize(self.gate_up_proj, self.base_shapes["gate_up_proj"])
        w_d = dequantize(self.down_proj, self.base_shapes["down_proj"])
        h_AF = F.grouped_mm(x_AD, w_gu.transpose(-2, -1), offs=offsets_E)
        xa_AR = F.grouped_mm(x_AD, self.lora_gate_up_a.transpose(-2, -1), offs=offsets_E)
        delta_AF = torch.cat(
            [
                F.grouped_mm(
                    xa_AR[:, p * r : (p + 1) * r].contiguous(),
                    self.lora_gate_up_b[:, p * H : (p + 1) * H].transpose(-2, -1),
                    offs=offsets_E,
                )
                for p in range(P)
            ],
            dim=-1,
        )
        h_AF = h_AF + self.scale * delta_AF
        if self.gate_up_proj_bias is not None:
            expert_A = _kernels.row_experts(offsets_E, x_AD.shape[0])
            h_AF = h_AF + self.gate_up_proj_bias[expert_A]
        h_AH = _glu(h_AF, self.act) if self.gated else self.act(h_AF)
        y_AD = F.grouped_mm(h_AH, w_d.transpose(-2, -1), offs=offsets_E)
        ha_AR = F.grouped_mm(h_AH, self.lora_down_a.transpose(-2, -1), offs=offsets_E)
        y_AD = y_AD + self.scale * F.grouped_mm(ha_AR, self.lora_down_b.transpose(-2, -1), offs=offsets_E)
        if self.down_proj_bias is not None:
            y_AD = y_AD + self.down_proj_bias[expert_A]
        return y_AD

    def routed(
        self,
        x_TD: torch.Tensor,
        rows_A: torch.Tensor,
        weights_A: torch.Tensor,
        offsets_E: torch.Tensor,
        combine_TK: Optional[torch.Tensor] = None,
        may_drop: bool = False,
    ) -> torch.Tensor:
        """:meth:`MoELinear.routed` with the adapters (same arguments and result)."""
        index_J = offsets_T = None
        if combine_TK is None:  # any number of rows per token: combined per token segment, as MoELinear does
            index_J, offsets_T = token_segments(rows_A, offsets_E[-1:], x_TD.shape[0])
        expert_A = gate_up_bias = None
        if self.gate_up_proj_bias is not None:
            expert_A = _kernels.row_experts(offsets_E, rows_A.shape[0])
            gate_up_bias = _local(self.gate_up_proj_bias)
        out_TD = _RoutedExpertsLoRA.apply(
            x_TD, weights_A, self.gate_up_proj, self.down_proj,
            self.lora_gate_up_a, self.lora_gate_up_b, self.lora_down_a, self.lora_down_b,
            rows_A, offsets_E, combine_TK, index_J, offsets_T, may_drop, self, gate_up_bias, expert_A,
        )
        return self._add_down_bias(out_TD, rows_A, weights_A, offsets_E, expert_A)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, quantize_base={self._quantize_base}"


class _RoutedExpertsLoRA(torch.autograd.Function):
    """:class:`~torchtune_moe.modules.moe_linear._RoutedExperts` plus the per-expert adapters, one node.

    The base path is the same (the fused activation x routing weight, gather-sum combine, the activation output
    recomputed in backward); the adapters add, per projection, ``xa = x @ A^T`` ([A, P*r], kept for backward)
    and ``scale * xa @ B^T`` added in place into the projection's output before the activation (gate/up) or the
    combine (down) (:func:`_kernels.lowrank_add_`, as are the backward's ``grad_xa @ A`` terms). With SwiGLU
    on the Triton kernels the gate/up delta is never added to ``h``: :func:`_kernels.swiglu_lora_forward` and
    :func:`_kernels.swiglu_lora_backward` add it on the fly, and ``h`` is saved as the base GEMM wrote it. The
    products by the first factor (``x @ A_gu^T``, ``grad_y @ B_d``, ...) are :func:`_kernels.rows_project`, fused
    with the gather of ``x`` (forward) and of the output gradient (backward) where they read it, unless the base
    GEMMs read those rows by index themselves (quack's on Hopper: the same ``GroupedGemm`` choice as
    ``_RoutedExperts``, :func:`~torchtune_moe.modules._cute_gemm.bf16_gemm`; torch's without the kernels). The adapter
    weight gradients are per-expert outer-product sums (:func:`_kernels.expert_outer`); the one of ``A_gu``
    reads the input rows by index, so backward gathers no copy of ``x`` unless the base trains. Frozen NF4 base
    weights are dequantized when used (forward, and again in backward) and never kept dense. Base-weight gradients
    are computed only when they require grad. The gate/up bias (GPT-OSS, ``gate_up_bias`` [E, 2H] with
    ``expert_A`` each row's expert) is added to ``h_AF`` as in ``_RoutedExperts``; the down bias is added by the
    caller after the combine.
    """

    @staticmethod
    def forward(
        ctx, x_TD, weights_A, gate_up, down, a_gu, b_gu, a_d, b_d, rows_A, offsets_E, combine_TK, index_J, offsets_T,
        may_drop, mod, gate_up_bias=None, expert_A=None,
    ):
        P, s = mod.parts, mod.scale
        kern = mod.lora_kernels
        shapes = mod.base_shapes
        num_valid = offsets_E[-1:]
        # the base GEMMs: quack's on Hopper (they read x's rows by index), else torch's (as _RoutedExperts)
        gemm = bf16_gemm(x_TD, rows_A.shape[0], mod.hidden_dim) if kern else BF16
        seg_E, index_A = gemm.prepare(offsets_E, rows_A)  # in the GEMMs' form, once; kept for the backward
        # x @ A_gu^T, in the same pass over the rows as the dispatch gather when the base GEMM needs that copy
        xa_AR, x_AD = _kernels.rows_project(
            x_TD, a_gu.transpose(-2, -1), offsets_E, index_A=rows_A, copy=not gemm.loads_rows, triton=kern
        )
        x_rows = Rows(x_TD, index_A, num_valid, may_drop, x_AD)
        h_AF, _ = gemm.forward(x_rows, dequantize(gate_up, shapes["gate_up_proj"]), seg_E)
        # SwiGLU with the Triton kernels: h_AF is kept without the adapter, whose delta the SwiGLU kernels add
        # on the fly (forward and backward); otherwise it is added in place before the activation.
        fused = kern and mod.gated and mod.act is F.silu and _kernels.swiglu_lora_supported(h_AF, b_gu)
        if not fused:
            _kernels.lowrank_add_(h_AF, xa_AR, b_gu, offsets_E, s, P, triton=kern)
        if gate_up_bias is not None:
            h_AF.add_(gate_up_bias[expert_A])
        del x_AD, x_rows
        if fused:
            hs_AH = _kernels.swiglu_lora_forward(h_AF, weights_A, xa_AR, b_gu, offsets_E, s, num_valid, may_drop)
        else:
            hs_AH = _activate(h_AF, weights_A, num_valid, may_drop, mod.act, mod.gated)
        y_AD, _ = gemm.forward(hs_AH, dequantize(down, shapes["down_proj"]), seg_E)
        ha_AR, _ = _kernels.rows_project(hs_AH, a_d.transpose(-2, -1), offsets_E, triton=kern)
        _kernels.lowrank_add_(y_AD, ha_AR, b_d, offsets_E, s, triton=kern)
        out_TD = _combine(y_AD, combine_TK, index_J, offsets_T, num_valid, may_drop)
        ctx.save_for_backward(
            x_TD, weights_A, a_gu, b_gu, a_d, b_d, rows_A, offsets_E, combine_TK, index_J, offsets_T, h_AF, xa_AR,
            ha_AR, expert_A, seg_E, index_A,
        )
        ctx.bias_like = None if gate_up_bias is None else (gate_up_bias.shape, gate_up_bias.dtype)
        # Base weights by reference (NF4 subclasses included): parameters, alive as long as the module.
        ctx.gate_up, ctx.down = gate_up, down
        ctx.may_drop, ctx.mod, ctx.fused, ctx.gemm = may_drop, mod, fused, gemm
        return out_TD

    @staticmethod
    def backward(ctx, grad_out_TD):
        (
            x_TD, weights_A, a_gu, b_gu, a_d, b_d, rows_A, offsets_E, combine_TK, index_J, offsets_T, h_AF, xa_AR,
            ha_AR, expert_A, seg_E, index_A,
        ) = ctx.saved_tensors
        mod, may_drop = ctx.mod, ctx.may_drop
        P, s = mod.parts, mod.scale
        kern = mod.lora_kernels
        shapes = mod.base_shapes
        need = ctx.needs_input_grad
        need_x, need_w, need_gate_up, need_down = need[:4]
        need_a_gu, need_b_gu, need_a_d, need_b_d = need[4:8]
        num_valid, gemm = offsets_E[-1:], ctx.gemm
        w_down = dequantize(ctx.down, shapes["down_proj"])

        # down: y = hs @ Wd^T + s * (hs @ Ad^T) @ Bd^T
        # Rows past offsets_E[-1] (dropped slots) belong to no group: the grouped GEMMs leave them out of every
        # weight gradient, and the activation backward and the combine mask them.
        grad_ha_AR, grad_y_AD = _kernels.rows_project(
            grad_out_TD, b_d, offsets_E, scale=s, index_A=rows_A, copy=not gemm.loads_rows, triton=kern
        )
        grad_y_AD = Rows(grad_out_TD, index_A, num_valid, may_drop, grad_y_AD)  # gathered at most once
        grad_b_d = None
        if need_b_d:  # reads grad_out's rows by index ([T, D], mostly in L2) rather than their gathered copy
            grad_b_d = _kernels.expert_outer(grad_out_TD, ha_AR, offsets_E, scale=s, index_A=rows_A, triton=kern)
        grad_hs_AH = gemm.input_grad(grad_y_AD, w_down, seg_E)
        _kernels.lowrank_add_(grad_hs_AH, grad_ha_AR, a_d.transpose(-2, -1), offsets_E, 1.0, triton=kern)
        del w_down
        if ctx.fused:  # h_AF without the adapter: grad_h_AF is w.r.t. the whole h, hs includes the delta
            grad_h_AF, grad_w_A, hs_AH = _kernels.swiglu_lora_backward(
                h_AF, weights_A, grad_hs_AH, xa_AR, b_gu, offsets_E, s, num_valid, may_drop
            )
        else:
            grad_h_AF, grad_w_A, hs_AH = _activate_backward(
                h_AF, weights_A, grad_hs_AH, num_valid, may_drop, mod.act, mod.gated
            )
        del grad_hs_AH
        grad_a_d = None
        if need_a_d:
            grad_a_d = _kernels.expert_outer(hs_AH, grad_ha_AR, offsets_E, transposed=True, triton=kern)
        grad_down = gemm.weight_grad(grad_y_AD, hs_AH, seg_E) if need_down else None
        del grad_y_AD, hs_AH, grad_ha_AR

        # gate_up: h = x @ Wgu^T + s * [(x @ Agu_p^T) @ Bgu_p^T]_p
        grad_xa_AR, _ = _kernels.rows_project(grad_h_AF, b_gu, offsets_E, scale=s, parts=P, triton=kern)
        grad_b_gu = None
        if need_b_gu:
            grad_b_gu = _kernels.expert_outer(grad_h_AF, xa_AR, offsets_E, scale=s, parts=P, triton=kern)
        # grad A_gu reads the input rows by index (no gathered copy of x)
        grad_a_gu = None
        if need_a_gu:
            grad_a_gu = _kernels.expert_outer(
                x_TD, grad_xa_AR, offsets_E, index_A=rows_A, transposed=True, triton=kern
            )
        grad_gate_up = None
        if need_gate_up:
            grad_gate_up = gemm.weight_grad(grad_h_AF, Rows(x_TD, index_A, num_valid, may_drop), seg_E)
        grad_x_TD = None
        if need_x:
            w_gu = dequantize(ctx.gate_up, shapes["gate_up_proj"])
            grad_x_AD = gemm.input_grad(grad_h_AF, w_gu, seg_E)
            _kernels.lowrank_add_(grad_x_AD, grad_xa_AR, a_gu.transpose(-2, -1), offsets_E, 1.0, triton=kern)
            grad_x_TD = _combine(grad_x_AD, combine_TK, index_J, offsets_T, num_valid, may_drop)
        grad_w_A = grad_w_A.to(weights_A.dtype) if need_w else None
        if grad_gate_up is not None and isinstance(ctx.gate_up, NF4Tensor):
            grad_gate_up = None
        if grad_down is not None and isinstance(ctx.down, NF4Tensor):
            grad_down = None
        grad_bias = None
        if ctx.bias_like is not None and need[15]:
            grad_bias = _bias_grad(grad_h_AF, expert_A, *ctx.bias_like, offsets_E[-1:] if may_drop else None)
        return (
            grad_x_TD, grad_w_A, grad_gate_up, grad_down, grad_a_gu, grad_b_gu, grad_a_d, grad_b_d,
            None, None, None, None, None, None, None, grad_bias, None,
        )
