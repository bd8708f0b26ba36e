"""GPT-OSS published sizes and the tokenizer.

Each size is its Hub config.json (the keys that describe the network), built through the same translation as
a downloaded checkpoint (:func:`gpt_oss_hf_config_to_kwargs`): the numbers live here once. The Hub files hold
MXFP4 experts (with a ``quantization_config``, accepted: dequantised on load); these dicts leave it out.
"""

from typing import Optional

from torchtune.data._prompt_templates import _get_prompt_template
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._hf_config import published_kwargs
from torchtune_moe.models._utils import PromptTemplateArg
from torchtune_moe.models.gpt_oss._component_builders import gpt_oss
from torchtune_moe.models.gpt_oss._hf_config import gpt_oss_hf_config_to_kwargs
from torchtune_moe.models.olmoe._tokenizer import OlmoeTokenizer

__all__ = ["gpt_oss_20b", "gpt_oss_120b", "gpt_oss_tokenizer", "GPT_OSS_20B", "GPT_OSS_120B"]

#: config.json of openai/gpt-oss-120b, network keys.
GPT_OSS_120B = {
    "vocab_size": 201088, "num_hidden_layers": 36, "num_attention_heads": 64, "num_key_value_heads": 8,
    "hidden_size": 2880, "head_dim": 64, "intermediate_size": 2880, "num_local_experts": 128,
    "num_experts_per_tok": 4, "experts_per_token": 4, "max_position_embeddings": 131072,
    "initial_context_length": 4096, "rope_theta": 150000,
    "rope_scaling": {
        "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        "original_max_position_embeddings": 4096,
    },
    "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 18, "rms_norm_eps": 1e-5,
    "attention_bias": True, "attention_dropout": 0.0, "swiglu_limit": 7.0, "router_aux_loss_coef": 0.9,
    "hidden_act": "silu", "tie_word_embeddings": False, "pad_token_id": 199999,
}
#: config.json of openai/gpt-oss-20b, network keys.
GPT_OSS_20B = {
    **GPT_OSS_120B, "num_hidden_layers": 24, "num_local_experts": 32,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
}


def gpt_oss_20b(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """gpt-oss-20b: 24 layers, 32 experts top-4, 20.9B parameters, 3.6B active (without the input embedding).

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default config.json max_position_embeddings (131072).
        **options: training options (``aux_loss_coeff``, ``z_loss_coeff``, ``router``, ...: see
            ``TRAINING_OPTIONS`` in :mod:`torchtune_moe.models._hf_config`).
    """
    return gpt_oss(**published_kwargs(gpt_oss_hf_config_to_kwargs, GPT_OSS_20B, max_seq_len, options))


def gpt_oss_120b(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """gpt-oss-120b: 36 layers, 128 experts top-4, 116.8B parameters, 5.1B active (without the input embedding).

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default config.json max_position_embeddings (131072).
        **options: training options, as :func:`gpt_oss_20b`.
    """
    return gpt_oss(**published_kwargs(gpt_oss_hf_config_to_kwargs, GPT_OSS_120B, max_seq_len, options))


def gpt_oss_tokenizer(
    path: str,
    tokenizer_config_path: Optional[str] = None,
    generation_config_path: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    prompt_template: PromptTemplateArg = None,
) -> OlmoeTokenizer:
    """GPT-OSS tokenizer: the checkpoint's ``tokenizer.json`` (o200k_harmony byte-level BPE) through the same
    torchtune ``HuggingFaceBaseTokenizer`` wrapper as OLMoE (:class:`OlmoeTokenizer`: no BOS, EOS from
    ``tokenizer_config.json``). Messages are encoded one after another; pass a ``prompt_template`` for the
    harmony chat markup (``<|start|>``, ``<|message|>``, ``<|end|>``).

    Args:
        path (str): ``tokenizer.json``.
        tokenizer_config_path (Optional[str]): ``tokenizer_config.json`` (EOS and pad tokens).
        generation_config_path (Optional[str]): ``generation_config.json``.
        max_seq_len (Optional[int]): truncate tokenized samples to this length.
        prompt_template (PromptTemplateArg): a torchtune prompt template.
    """
    template = _get_prompt_template(prompt_template) if prompt_template is not None else None
    return OlmoeTokenizer(
        path,
        tokenizer_config_path=tokenizer_config_path,
        generation_config_path=generation_config_path,
        max_seq_len=max_seq_len,
        prompt_template=template,
    )
