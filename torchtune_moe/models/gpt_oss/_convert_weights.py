"""GPT-OSS Hub weights <-> torchtune_moe: the key map, and the MXFP4 dequantisation of the published experts.

Per layer i: attention with biases on q, k, v and o and the per-head ``sinks``; ``mlp.router`` the gate with its
bias (ours: ``mlp.router.gate``); ``mlp.experts`` the stacked experts, stored on the Hub in x out:
``gate_up_proj`` [E, D, 2H] (gate and up interleaved along 2H) and ``down_proj`` [E, H, D], each ours
transposed (ours keep the interleave: :class:`~torchtune_moe.modules.moe_linear.ClampedSwiGLU` reads it), and
their biases ``gate_up_proj_bias`` [E, 2H], ``down_proj_bias`` [E, D] as ours.

The published checkpoints (openai/gpt-oss-20b, -120b) store the two expert weights as MXFP4:
``{name}_blocks`` [E, rows, cols / 32, 16] uint8 (two 4-bit E2M1 values a byte, low nibble first) and
``{name}_scales`` [E, rows, cols / 32] uint8 (E8M0 exponents, one per 32 values), rows x cols in our (out x in)
layout. :func:`dequantize_mxfp4` turns them into our tensor with torchao's MX routine; what this package writes
back is the dequantised weights (bf16 in a bf16 run), not MXFP4.
"""

import torch

from torchtune_moe.models._hf_config import HFFamily
from torchtune_moe.models.gpt_oss._component_builders import gpt_oss
from torchtune_moe.models.gpt_oss._hf_config import gpt_oss_hf_config_to_kwargs

__all__ = ["gpt_oss_hf_to_tune", "gpt_oss_tune_to_hf", "dequantize_mxfp4", "dequantize_mxfp4_state_dict", "HF_FAMILY"]

_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v_proj.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attn.output_proj.bias",
    "model.layers.{}.self_attn.sinks": "layers.{}.attn.sinks",
    "model.layers.{}.mlp.router.weight": "layers.{}.mlp.router.gate.weight",
    "model.layers.{}.mlp.router.bias": "layers.{}.mlp.router.gate.bias",
    "model.layers.{}.mlp.experts.gate_up_proj": "layers.{}.mlp.experts.gate_up_proj",
    "model.layers.{}.mlp.experts.gate_up_proj_bias": "layers.{}.mlp.experts.gate_up_proj_bias",
    "model.layers.{}.mlp.experts.down_proj": "layers.{}.mlp.experts.down_proj",
    "model.layers.{}.mlp.experts.down_proj_bias": "layers.{}.mlp.experts.down_proj_bias",
}
# Stored on the Hub in x out (ours transposed).
_TRANSPOSED = frozenset({"layers.{}.mlp.experts.gate_up_proj", "layers.{}.mlp.experts.down_proj"})
_MXFP4_SUFFIXES = ("_blocks", "_scales")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MXFP4 weights -> ``dtype``, with torchao's MX dequantisation (``to_dtype``: E2M1 values, low nibble first,
    times ``2 ** (scale - 127)`` per block of 32).

    Args:
        blocks (torch.Tensor): [..., rows, cols / 32, 16] uint8, two 4-bit values a byte.
        scales (torch.Tensor): [..., rows, cols / 32] uint8 E8M0 exponents.
        dtype (torch.dtype): result dtype.

    Returns:
        torch.Tensor: [..., rows, cols].
    """
    from torchao.prototype.mx_formats.mx_tensor import to_dtype

    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(
            f"MXFP4 needs uint8 blocks [..., G, 16] and uint8 scales [..., G]; got {blocks.dtype} {list(blocks.shape)} "
            f"and {scales.dtype} {list(scales.shape)}"
        )
    *prefix, groups, _ = blocks.shape
    packed = blocks.reshape(-1, 16).contiguous()  # 32 values (one scale) per row
    values = to_dtype(packed, scales.reshape(-1).view(torch.float8_e8m0fnu), torch.float4_e2m1fn_x2, 32, torch.float32)
    return values.reshape(*prefix, groups * 32).to(dtype)


def dequantize_mxfp4_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> dict:
    """A Hub state dict with MXFP4 experts (``*_blocks``, ``*_scales``) -> the same with the dequantised
    ``gate_up_proj`` / ``down_proj`` in the Hub's bf16 layout (in x out); other tensors as given."""
    out = {k: v for k, v in state_dict.items() if not k.endswith(_MXFP4_SUFFIXES)}
    for key in state_dict:
        if key.endswith("_blocks"):
            name = key.removesuffix("_blocks")
            if name + "_scales" not in state_dict:
                raise ValueError(f"{key} has no {name}_scales")
            out[name] = dequantize_mxfp4(state_dict[key], state_dict[name + "_scales"], dtype).transpose(-2, -1)
        elif key.endswith("_scales") and key.removesuffix("_scales") + "_blocks" not in state_dict:
            raise ValueError(f"{key} has no {key.removesuffix('_scales')}_blocks")
    return out


HF_FAMILY = HFFamily(
    model_type="gpt_oss",
    architectures=("GptOssForCausalLM",),
    builder=gpt_oss,
    config_to_kwargs=gpt_oss_hf_config_to_kwargs,
    from_hf=_FROM_HF,
    experts=(),  # no per-expert Hub tensors: the experts are stacked (one-to-one, transposed)
    transposed=_TRANSPOSED,
)


def gpt_oss_hf_to_tune(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Hub state dict (bf16 or MXFP4 experts) -> torchtune_moe state dict, for the model ``config``
    (config.json) describes. MXFP4 experts are dequantised to the dtype of the other tensors."""
    dtype = next((v.dtype for v in state_dict.values() if v.is_floating_point()), torch.bfloat16)
    return HF_FAMILY.hf_to_tune(dequantize_mxfp4_state_dict(state_dict, dtype), config)


#: torchtune_moe state dict -> Hub state dict (bf16 experts, transposed views), for ``config``.
gpt_oss_tune_to_hf = HF_FAMILY.tune_to_hf
