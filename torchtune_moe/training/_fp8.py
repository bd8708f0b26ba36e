"""fp8 training of the dense linear layers (attention projections, dense MLPs, shared experts): torchao's
``Float8Linear``, as torchtune's later recipes turn it on (``enable_fp8_training``, ``fp8_recipe_name``).

The routed experts have their own fp8 option (``model.expert_fp8``: rowwise fp8 grouped GEMMs inside the fused
expert block), since they are not ``nn.Linear`` layers. Kept in bf16 here:

- the output projection: :class:`~torchtune_moe.modules.LinearCrossEntropyLoss` multiplies by its weight itself,
  and a language model's logits are the layer fp8 hurts most;
- the routers: their few outputs pick the experts, where a rounding changes which expert a token goes to;
- layers whose input or output size is not a multiple of 16 (fp8 GEMMs need 16-byte aligned rows), e.g. a
  shared expert's one-output gate.

The weights stay bf16 parameters under their own names (torchao casts them to fp8 for each GEMM), so
checkpoints, resume and the Hugging Face conversion are unchanged.
"""

import dataclasses
from typing import Optional

from torch import nn
from torchao.float8 import Float8LinearConfig, convert_to_float8_training as _convert
from torchao.float8.config import Float8LinearRecipeName
from torchao.float8.float8_linear import Float8Linear

__all__ = ["DEFAULT_FP8_RECIPE", "FP8_RECIPES", "convert_to_float8_training"]

#: torchao's recipe names (``Float8LinearConfig.from_recipe_name``; in torchao 0.15: one scale per tensor, the
#: fastest, per row, or per row with the weight gradient in bf16).
FP8_RECIPES = tuple(r.value for r in Float8LinearRecipeName)
#: The recipe of ``fp8_recipe_name: null`` (as torchao's ``Float8LinearConfig()``).
DEFAULT_FP8_RECIPE = Float8LinearRecipeName.TENSORWISE.value


def _converts(module: nn.Module, fqn: str) -> bool:
    """Whether the ``nn.Linear`` at ``fqn`` trains in fp8 (the module doc says which stay bf16)."""
    names = fqn.split(".")
    if fqn == "output" or "router" in names:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_float8_training(
    model: nn.Module, fp8_recipe_name: Optional[str] = None, *, emulate: bool = False
) -> int:
    """Swaps the model's dense ``nn.Linear`` layers for torchao's ``Float8Linear`` (in place), except those the
    module doc lists. Call it before compiling and sharding, on a model on any device (meta included).

    Args:
        model (nn.Module): the model.
        fp8_recipe_name (Optional[str]): one of :data:`FP8_RECIPES`; None: :data:`DEFAULT_FP8_RECIPE`.
        emulate (bool): run the fp8 GEMMs as fp32 matmuls of fp8-rounded values (for CPU tests).

    Returns:
        int: the number of layers converted.

    Raises:
        ValueError: ``fp8_recipe_name`` is not one of :data:`FP8_RECIPES`.
    """
    name = fp8_recipe_name or DEFAULT_FP8_RECIPE
    if name not in FP8_RECIPES:
        raise ValueError(f"fp8_recipe_name must be one of {', '.join(FP8_RECIPES)} (or null), got {fp8_recipe_name!r}")
    config = Float8LinearConfig.from_recipe_name(name)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    _convert(model, module_filter_fn=_converts, config=config)
    return sum(isinstance(m, Float8Linear) for m in model.modules())
