"""The LoRA / QLoRA version of any model builder (every family and size, one mechanism)."""

from typing import Callable, Iterable, Union

from torchtune.config._utils import _get_component_from_path
from torchtune.modules import TransformerDecoder

from torchtune_moe.modules.peft import apply_lora

__all__ = ["lora_model", "LORA_ARGS", "base_model_config"]

# lora_model's own arguments (the rest go to the base builder).
LORA_ARGS = (
    "lora_attn_modules",
    "apply_lora_to_mlp",
    "apply_lora_to_experts",
    "apply_lora_to_output",
    "apply_lora_to_router",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "quantize_base",
)


def lora_model(
    base: Union[str, Callable[..., TransformerDecoder]],
    *,
    lora_attn_modules: Iterable[str] = ("q_proj", "k_proj", "v_proj", "output_proj"),
    apply_lora_to_mlp: bool = False,
    apply_lora_to_experts: bool = True,
    apply_lora_to_output: bool = False,
    apply_lora_to_router: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
    **base_kwargs,
) -> TransformerDecoder:
    """Builds ``base(**base_kwargs)`` and puts LoRA adapters on it (:func:`~torchtune_moe.modules.peft.apply_lora`).

    In a config::

        model:
          _component_: torchtune_moe.models.lora_model
          base: torchtune_moe.models.qwen3_moe.qwen3_moe_30b_a3b
          lora_attn_modules: [q_proj, k_proj, v_proj, output_proj]
          apply_lora_to_experts: true
          lora_rank: 16
          lora_alpha: 32

    Args:
        base (str | Callable): a model builder or its dotted path (any ``torchtune_moe`` size builder, or
            ``torchtune_moe.models.moe``).
        lora_attn_modules (Iterable[str]): attention projections to adapt, of ``q_proj``, ``k_proj``, ``v_proj``,
            ``output_proj``; with multi-head latent attention (DeepSeek-V2/V3, Moonlight) of ``q_proj`` (no query
            latent) or ``q_a_proj`` and ``q_b_proj``, ``kv_a_proj``, ``kv_b_proj``, ``output_proj``.
        apply_lora_to_mlp (bool): adapt the dense FFNs (dense layers and shared experts).
        apply_lora_to_experts (bool): adapt the routed experts (a pair per expert and projection).
        apply_lora_to_output (bool): adapt the output projection.
        apply_lora_to_router (bool): adapt each router's gate (off by default: the router stays frozen).
        lora_rank (int): r (a multiple of 8 when the experts are adapted).
        lora_alpha (float): LoRA scale numerator (scale = alpha / r).
        lora_dropout (float): dropout on the input of the dense adapters (the expert adapters take none).
        quantize_base (bool): QLoRA: the adapted modules' base weights in NF4.
        **base_kwargs: arguments of ``base``.

    Raises:
        ValueError: ``base`` is not a builder, or a bad LoRA option (naming it).
    """
    if isinstance(base, str):
        try:
            base = _get_component_from_path(base)
        except Exception as e:
            raise ValueError(f"base: cannot import {base!r} ({e})") from e
    if not callable(base):
        raise ValueError(f"base must be a model builder or its dotted path, got {base!r}")
    model = base(**base_kwargs)
    return apply_lora(
        model,
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_experts=apply_lora_to_experts,
        apply_lora_to_output=apply_lora_to_output,
        apply_lora_to_router=apply_lora_to_router,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        quantize_base=quantize_base,
    )


def base_model_config(model_config: dict) -> dict:
    """The builder config of the base model of a :func:`lora_model` config (``_component_: base`` and the base
    builder's arguments): what rebuilds the model merged weights load into. Other configs are returned as is."""
    if not str(model_config.get("_component_", "")).endswith("lora_model"):
        return dict(model_config)
    base = model_config["base"]
    if not isinstance(base, str):
        raise ValueError("model.base must be a dotted path to describe the merged model")
    rest = {k: v for k, v in model_config.items() if k not in LORA_ARGS and k not in ("_component_", "base")}
    return {"_component_": base, **rest}
