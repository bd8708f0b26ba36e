"""Turning any torchtune_moe decoder into its LoRA / QLoRA version: one mechanism for every family and size."""

from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune.modules import FeedForward, TransformerDecoder
from torchtune.modules.peft import LoRALinear, get_adapter_params

from torchtune_moe.modules._utils import clean_module_name
from torchtune_moe.modules.attention import MultiHeadLatentAttention
from torchtune_moe.modules.attention_utils import NormedProjection
from torchtune_moe.modules.linear_attention import GatedDeltaNet
from torchtune_moe.modules.moe_layer import MoE
from torchtune_moe.modules.peft.lora_experts import LoRAMoELinear, dequantize, to_nf4_checked

__all__ = [
    "LORA_ATTN_MODULES",
    "LORA_MLA_MODULES",
    "attention_lora_modules",
    "apply_lora",
    "quantize_base_weights",
    "lora_modules",
    "lora_factors",
    "merged_state_dict",
    "adapter_state_dict",
    "LoRAGate",
    "base_weight",
]

# torchtune's names of the attention projections (MultiHeadAttention attributes).
LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")
#: The projections of a Gated DeltaNet layer (Qwen3.5-MoE's linear attention) that LoRA may adapt.
GATED_DELTANET_LORA_MODULES = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
# MultiHeadLatentAttention's projections (Hub: q_proj or q_a_proj / q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj).
LORA_MLA_MODULES = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "output_proj")


def attention_lora_modules(attn: nn.Module) -> tuple[str, ...]:
    """The projections of attention module ``attn`` that ``lora_attn_modules`` may name: torchtune's four for
    ``MultiHeadAttention`` (and the other softmax attentions built like it); for :class:`MultiHeadLatentAttention`
    ``q_proj`` (no query latent) or ``q_a_proj`` and ``q_b_proj`` (with one), then ``kv_a_proj``, ``kv_b_proj``,
    ``output_proj``; for the linear attention :class:`GatedDeltaNet` its input projections (``in_proj_qkv``,
    ``in_proj_z``, ``in_proj_b``, ``in_proj_a``) and ``out_proj``."""
    if isinstance(attn, MultiHeadLatentAttention):
        q = ("q_proj",) if attn.q_lora_rank is None else ("q_a_proj", "q_b_proj")
        return q + ("kv_a_proj", "kv_b_proj", "output_proj")
    if isinstance(attn, GatedDeltaNet):
        return GATED_DELTANET_LORA_MODULES
    return LORA_ATTN_MODULES


def _lora_linear(
    linear: nn.Linear, rank: int, alpha: float, dropout: float, quantize_base: bool, cls: type = LoRALinear
) -> LoRALinear:
    """torchtune's LoRALinear (or ``cls``) around ``linear``'s own weight and bias (shared, not copied)."""
    with torch.device(linear.weight.device):
        # Built unquantized: the base weight is replaced by linear's right after (quantize_base_weights
        # quantizes it once it holds its values).
        lora = cls(
            linear.in_features, linear.out_features, rank=rank, alpha=alpha, dropout=dropout,
            use_bias=linear.bias is not None, quantize_base=False,
        )
    lora.register_parameter("weight", linear.weight)
    if linear.bias is not None:
        lora.bias = linear.bias
    lora.lora_a.to(dtype=linear.weight.dtype)
    lora.lora_b.to(dtype=linear.weight.dtype)
    lora._quantize_base = quantize_base  # read by LoRALinear.forward (linear_nf4) and quantize_base_weights
    return lora


class LoRAGate(LoRALinear):
    """A router's gate (``dim -> num_experts``) with a LoRA pair.

    The routers compute their logits from ``gate.weight`` with their own kernel rather than by calling the gate,
    so here ``weight`` reads as the adapted weight ``W + alpha / r * B @ A`` (an [E, D] product, recomputed at
    each read; gradients flow to A and B). The frozen base stays the registered parameter ``weight`` (same
    state-dict key as the plain gate); :func:`base_weight` returns it.
    """

    @property
    def weight(self) -> torch.Tensor:
        try:
            w = self._parameters["weight"]
        except KeyError:
            raise AttributeError("weight") from None  # not registered yet (construction)
        delta = (self.alpha / self.rank) * (self.lora_b.weight @ self.lora_a.weight)
        return w + delta.to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen base weight of a LoRA module (for :class:`LoRAGate`, not the adapted one ``.weight`` reads)."""
    return module._parameters["weight"]


def apply_lora(
    model: TransformerDecoder,
    *,
    lora_attn_modules: Iterable[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_experts: bool = True,
    apply_lora_to_output: bool = False,
    apply_lora_to_router: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """Replaces the chosen linears of ``model`` (in place) by LoRA modules sharing their base weights.

    - attention: the projections named in ``lora_attn_modules`` become torchtune ``LoRALinear``: of ``q_proj``,
      ``k_proj``, ``v_proj``, ``output_proj`` (``MultiHeadAttention``), or of the multi-head latent attention's
      ``q_proj`` (no query latent) or ``q_a_proj`` / ``q_b_proj``, ``kv_a_proj``, ``kv_b_proj``, ``output_proj``
      (:func:`attention_lora_modules` lists a layer's);
    - ``apply_lora_to_mlp``: every dense FFN (``w1``/``w2``/``w3`` of the dense layers and of the shared
      experts, treated like dense MLPs) becomes ``LoRALinear``;
    - ``apply_lora_to_experts``: each MoE layer's routed experts become :class:`LoRAMoELinear` (a pair per
      expert and projection);
    - ``apply_lora_to_output``: the output projection (not possible with tied embeddings);
    - ``apply_lora_to_router``: each router's gate becomes :class:`LoRAGate` (the router's own state, e.g. the
      aux-loss-free bias, is unchanged).

    Adapter weights start with B = 0 (the model computes exactly what the base does). ``quantize_base``
    marks the adapted modules' base weights for NF4; the weights are quantized now if they live on a real
    device, else by :func:`quantize_base_weights` after loading.

    Raises:
        ValueError: a projection the model's attention does not have (naming the allowed ones), a tied output
            with ``apply_lora_to_output``, a rank that is not a positive multiple of 8 with experts, a router without a linear gate, nothing to adapt.
    """
    if isinstance(lora_attn_modules, str):
        raise ValueError(f"lora_attn_modules must be a list of projection names, got the string {lora_attn_modules!r}")
    lora_attn_modules = list(lora_attn_modules)
    # Checked before any layer is changed. A hybrid model (softmax and linear attention layers) adapts in each
    # layer the named projections it has, as PEFT's target_modules do; a name that no layer has is refused.
    kinds = {}  # attention class name -> (first layer of that kind, its projections)
    for i, layer in enumerate(model.layers):
        kinds.setdefault(type(layer.attn).__name__, (i, attention_lora_modules(layer.attn)))
    bad = [m for m in lora_attn_modules if not any(m in allowed for _, allowed in kinds.values())]
    if bad:
        if len(kinds) == 1:
            (name, (i, allowed)), = kinds.items()
            raise ValueError(f"lora_attn_modules: {bad} not in the attention of layer {i} ({name}); "
                             f"choose from {list(allowed)}")
        choices = "; ".join(f"{name} (layers like {i}): {list(allowed)}" for name, (i, allowed) in kinds.items())
        raise ValueError(f"lora_attn_modules: {bad} not in the attention of any layer; choose from {choices}")
    if lora_rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    if not (lora_attn_modules or apply_lora_to_mlp or apply_lora_to_experts or apply_lora_to_output
            or apply_lora_to_router):
        raise ValueError(
            "nothing to adapt: give lora_attn_modules or set apply_lora_to_mlp / apply_lora_to_experts / "
            "apply_lora_to_output / apply_lora_to_router"
        )
    kw = dict(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, quantize_base=quantize_base)

    for layer in model.layers:
        attn = layer.attn
        for name in lora_attn_modules:
            if name not in attention_lora_modules(attn):  # a hybrid model's other kind of attention
                continue
            proj = getattr(attn, name)
            if isinstance(proj, NormedProjection):  # q/k norm or clipping around the linear
                proj.proj = _lora_linear(proj.proj, **kw)
            else:
                setattr(attn, name, _lora_linear(proj, **kw))
        mlp = layer.mlp
        ffns = []
        if isinstance(mlp, MoE):
            if apply_lora_to_experts:
                mlp.experts = LoRAMoELinear.from_moe_linear(
                    mlp.experts, rank=lora_rank, alpha=lora_alpha, quantize_base=quantize_base
                )
            if mlp.shared_expert is not None:
                ffns.append(mlp.shared_expert)
            if apply_lora_to_router:
                gate = getattr(mlp.router, "gate", None)
                if not isinstance(gate, nn.Linear):
                    raise ValueError(
                        f"apply_lora_to_router: the router {type(mlp.router).__name__} has no linear gate to adapt"
                    )
                # The router's gate is small ([E, D]) and read directly by its logits kernel: never quantized.
                mlp.router.gate = _lora_linear(gate, **{**kw, "quantize_base": False}, cls=LoRAGate)
        elif isinstance(mlp, FeedForward):
            ffns.append(mlp)
        if apply_lora_to_mlp:
            for ffn in ffns:
                for name in ("w1", "w2", "w3"):
                    linear = getattr(ffn, name, None)
                    if isinstance(linear, nn.Linear):
                        setattr(ffn, name, _lora_linear(linear, **kw))
    if apply_lora_to_output:
        if not isinstance(model.output, nn.Linear):
            raise ValueError("apply_lora_to_output: the output projection is tied to the embeddings (no own weight)")
        model.output = _lora_linear(model.output, **kw)
    quantize_base_weights(model)
    return model


def lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every LoRA module of ``model`` (``LoRALinear`` and :class:`LoRAMoELinear`), names as
    in the state dict (without the wrappers activation checkpointing or compile add)."""

    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, LoRAMoELinear)):
            yield clean_module_name(name), module


@torch.no_grad()
def quantize_base_weights(model: nn.Module) -> None:
    """Stores the base weights of the LoRA modules marked ``quantize_base`` in NF4 (skips meta and done ones)."""
    for name, module in lora_modules(model):
        if isinstance(module, LoRAMoELinear):
            module.quantize_base_weights()
        elif module._quantize_base:
            w = base_weight(module)
            if not isinstance(w, NF4Tensor) and not w.is_meta:
                module.weight = nn.Parameter(to_nf4_checked(w.detach(), f"{name}.weight"), requires_grad=False)


def lora_factors(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(A, B, parts)`` of base weight ``name`` of a LoRA module (see :meth:`LoRAMoELinear.lora_factors`);
    ``LoRALinear``: A [r, in], B [out, r], one part."""
    if isinstance(module, LoRAMoELinear):
        return module.lora_factors(name)
    if name != "weight":
        raise KeyError(name)
    return module.lora_a.weight, module.lora_b.weight, 1


@torch.no_grad()
def merged_state_dict(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter merged in (``W + alpha / r * B @ A``), dense (NF4
    dequantized), without adapter keys: what the base model's checkpointer saves. Tensors on CPU.

    Args:
        model (nn.Module): the LoRA model (its modules give ranks, scales and shapes).
        state_dict (Optional[dict]): its full (gathered) state dict; default ``model.state_dict()``.
    """
    state_dict = model.state_dict() if state_dict is None else state_dict
    merged, adapter_keys = {}, set()
    for name, module in lora_modules(model):
        prefix = f"{name}." if name else ""
        adapter_keys.update(prefix + p for p in module.adapter_params())
        if isinstance(module, LoRAMoELinear):
            weights = module.base_shapes
        else:
            weights = {"weight": None}
        for w, shape in weights.items():
            base = dequantize(state_dict[prefix + w], shape).cpu()
            a, b, parts = lora_factors(module, w)
            a_key, b_key = (prefix + k for k in _factor_keys(module, w))
            a, b = state_dict[a_key].cpu().float(), state_dict[b_key].cpu().float()
            r, rows = module.rank, b.shape[-2] // parts
            delta = torch.cat(
                [b[..., p * rows : (p + 1) * rows, :] @ a[..., p * r : (p + 1) * r, :] for p in range(parts)], dim=-2
            )
            merged[prefix + w] = (base.float() + (module.alpha / module.rank) * delta).to(base.dtype)
    return {k: merged.get(k, dequantize(v).detach().cpu()) for k, v in state_dict.items() if k not in adapter_keys}


def _factor_keys(module: nn.Module, weight: str) -> tuple[str, str]:
    """Parameter names (in ``module``) of the A and B of its base weight ``weight``."""
    if isinstance(module, LoRAMoELinear):
        stem = weight.removesuffix("_proj")
        return f"lora_{stem}_a", f"lora_{stem}_b"
    return "lora_a.weight", "lora_b.weight"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters of ``model`` by state-dict key (torchtune's ``get_adapter_params``), detached."""

    return {clean_module_name(k): v.detach() for k, v in get_adapter_params(model).items()}

