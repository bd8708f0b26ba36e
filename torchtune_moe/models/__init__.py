"""Builders: the generic ``moe()``/``moe_layer()`` and one folder per model family.

``from_hf_pretrained`` (loading a Hub checkpoint) lives in :mod:`torchtune_moe.training`, which reads files;
``torchtune_moe.models.from_hf_pretrained`` still works, with a deprecation warning. ``lora_model`` wraps any
builder with LoRA / QLoRA adapters; PEFT adapter files are read and written by ``torchtune_moe.training``
(``save_peft_adapter``, ``load_peft_adapter``).
"""

import warnings

from torchtune_moe.models._hf_families import build_from_hf_config
from torchtune_moe.models._lora import lora_model
from torchtune_moe.models.moe import moe, moe_layer

__all__ = ["moe", "moe_layer", "build_from_hf_config", "lora_model"]


def __getattr__(name: str):
    # Deprecated re-export, resolved on first use only: torchtune_moe.training imports this package, so an
    # import at the top would make a circle.
    if name == "from_hf_pretrained":
        warnings.warn(
            "torchtune_moe.models.from_hf_pretrained moved to torchtune_moe.training.from_hf_pretrained",
            FutureWarning,
            stacklevel=2,
        )
        from torchtune_moe.training import from_hf_pretrained

        return from_hf_pretrained
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
