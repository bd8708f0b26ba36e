"""Builders: the generic ``moe()``/``moe_layer()`` and one folder per model family."""

from torchtune_moe.models._hf import from_hf_pretrained
from torchtune_moe.models._lora import lora_model
from torchtune_moe.models._peft import load_peft_adapter, save_peft_adapter
from torchtune_moe.models.moe import moe, moe_layer

__all__ = ["moe", "moe_layer", "from_hf_pretrained", "lora_model", "save_peft_adapter", "load_peft_adapter"]
