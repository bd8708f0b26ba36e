"""The Hugging Face families this package reproduces, and building a model from a ``config.json`` dict.

This is the one path from a config.json to a model: :func:`detect_family` picks the family,
its ``config_to_kwargs`` translates (refusing what it cannot reproduce), training options go on top
(:func:`~torchtune_moe.models._hf_config.apply_training_options`). The published size builders
(``qwen3_moe_30b_a3b``, ...) go through the same translation. Reading checkpoint files is
``torchtune_moe.training``'s job (:func:`torchtune_moe.training.from_hf_pretrained`).
"""

from typing import Optional, Union

import torch
from torchtune import training
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._convert_weights import HFKeyMap
from torchtune_moe.models._hf_config import HFFamily, apply_training_options
from torchtune_moe.models.deepseek_v2._convert_weights import HF_FAMILY as _DEEPSEEK_V2
from torchtune_moe.models.deepseek_v3._convert_weights import HF_FAMILY as _DEEPSEEK_V3
from torchtune_moe.models.glm4_moe._convert_weights import HF_FAMILY as _GLM4_MOE
from torchtune_moe.models.gpt_oss._convert_weights import HF_FAMILY as _GPT_OSS
from torchtune_moe.models.mixtral._convert_weights import HF_FAMILY as _MIXTRAL
from torchtune_moe.models.olmoe._convert_weights import HF_FAMILY as _OLMOE
from torchtune_moe.models.qwen2_moe._convert_weights import HF_FAMILY as _QWEN2_MOE
from torchtune_moe.models.qwen3_moe._convert_weights import HF_FAMILY as _QWEN3_MOE
from torchtune_moe.models.qwen3_5_moe._convert_weights import HF_FAMILY as _QWEN3_5_MOE
from torchtune_moe.models.qwen3_5_moe._convert_weights import HF_FAMILY_TEXT as _QWEN3_5_MOE_TEXT

__all__ = ["HF_FAMILIES", "detect_family", "hf_config_to_kwargs", "hf_key_map", "build_from_hf_config"]

#: The supported families by config.json ``model_type``.
HF_FAMILIES: dict[str, HFFamily] = {
    f.model_type: f
    for f in (
        _MIXTRAL, _QWEN2_MOE, _QWEN3_MOE, _OLMOE, _GLM4_MOE, _DEEPSEEK_V3, _DEEPSEEK_V2, _GPT_OSS, _QWEN3_5_MOE,
        _QWEN3_5_MOE_TEXT,
    )
}


def _supported_text() -> str:
    return ", ".join(f"{a} (model_type {f.model_type!r})" for f in HF_FAMILIES.values() for a in f.architectures)


def detect_family(config: dict) -> HFFamily:
    """The family of a config.json (by ``architectures``, else ``model_type``).

    Raises:
        ValueError: unsupported or contradictory ``architectures``/``model_type``, naming the supported ones.
    """
    by_arch = {a: f for f in HF_FAMILIES.values() for a in f.architectures}
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    model_type = config.get("model_type")
    found = [by_arch[a] for a in archs if a in by_arch]
    if archs and not found:
        raise ValueError(
            f"config.json architectures {archs} (model_type {model_type!r}) is not supported; supported: "
            f"{_supported_text()}"
        )
    family = found[0] if found else HF_FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"config.json has model_type {model_type!r} and no supported architectures; supported: {_supported_text()}"
        )
    if model_type is not None and model_type != family.model_type:
        raise ValueError(
            f"config.json architectures {archs} belong to model_type {family.model_type!r} but model_type is "
            f"{model_type!r}"
        )
    return family


def hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None, **options) -> tuple[HFFamily, dict]:
    """The family and builder kwargs of a config.json, with training ``options`` on top.

    Raises:
        ValueError: unsupported family or option, or an option that would change the architecture.
    """
    family = detect_family(config)
    return family, apply_training_options(family.config_to_kwargs(config, max_seq_len=max_seq_len), options)


def hf_key_map(config: dict) -> HFKeyMap:
    """The Hub key names of the model a config.json describes."""
    family, kwargs = hf_config_to_kwargs(config)
    return family.key_map(kwargs)


def build_from_hf_config(
    config: dict,
    *,
    device: Union[str, torch.device] = "meta",
    dtype: torch.dtype = torch.float32,
    max_seq_len: Optional[int] = None,
    **options,
) -> TransformerDecoder:
    """Builds the model a config.json describes, uninitialised unless ``device`` is a real device.

    On ``"meta"`` (default) it costs no memory: use it for names and shapes.
    """
    family, kwargs = hf_config_to_kwargs(config, max_seq_len=max_seq_len, **options)
    with training.set_default_dtype(dtype), torch.device(device):
        return family.builder(**kwargs)
