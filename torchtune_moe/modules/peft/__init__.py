"""LoRA / QLoRA for MoE decoders: per-expert adapters on the grouped experts, and torchtune's LoRALinear for
every dense projection."""

from torchtune_moe.modules.peft._apply import (
    LORA_ATTN_MODULES,
    LORA_MLA_MODULES,
    LoRAGate,
    attention_lora_modules,
    adapter_state_dict,
    base_weight,
    apply_lora,
    lora_factors,
    lora_modules,
    merged_state_dict,
    quantize_base_weights,
)
from torchtune_moe.modules.peft.lora_experts import LoRAMoELinear, dequantize

__all__ = [
    "LORA_ATTN_MODULES",
    "LORA_MLA_MODULES",
    "LoRAGate",
    "attention_lora_modules",
    "LoRAMoELinear",
    "base_weight",
    "apply_lora",
    "adapter_state_dict",
    "dequantize",
    "lora_factors",
    "lora_modules",
    "merged_state_dict",
    "quantize_base_weights",
]
