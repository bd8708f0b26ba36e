"""OLMoE published size and the tokenizer.

The size is its Hub config.json (the keys that describe the network), built through the same translation as a
downloaded checkpoint (:func:`olmoe_hf_config_to_kwargs`): the numbers live here once.
"""

from typing import Optional

from torchtune.data._prompt_templates import _get_prompt_template  # no public equivalent in torchtune 0.6.1
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._hf_config import published_kwargs
from torchtune_moe.models._utils import PromptTemplateArg
from torchtune_moe.models.olmoe._component_builders import olmoe
from torchtune_moe.models.olmoe._hf_config import olmoe_hf_config_to_kwargs
from torchtune_moe.models.olmoe._tokenizer import OlmoeTokenizer

__all__ = ["olmoe_1b_7b", "olmoe_tokenizer", "OLMOE_1B_7B"]

#: config.json of allenai/OLMoE-1B-7B-0924 (-0125 and the -Instruct ones alike), network keys.
OLMOE_1B_7B = {
    "vocab_size": 50304, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
    "hidden_size": 2048, "intermediate_size": 1024, "num_experts": 64, "num_experts_per_tok": 8,
    "max_position_embeddings": 4096, "rope_theta": 10_000.0, "rms_norm_eps": 1e-5, "norm_topk_prob": False,
    "clip_qkv": None, "attention_bias": False, "tie_word_embeddings": False, "pad_token_id": 1,
    "router_aux_loss_coef": 0.01,
}


def olmoe_1b_7b(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """OLMoE-1B-7B (-0924, -0125 and their -Instruct): 16 layers, 64 experts, top-8, 6.9B parameters, 1.3B active.

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default config.json max_position_embeddings (4096).
        **options: training options (``aux_loss_coeff``, ``z_loss_coeff``, ``router``, ...). The default
            ``aux_loss_coeff`` reproduces the published ``router_aux_loss_coef`` 0.01
            (``0.01 * experts_per_token 8 / 16 MoE layers``). OLMoE was pretrained with a router z-loss of 0.001, which
            transformers does not apply: ``z_loss_coeff=0.001`` adds it.
    """
    return olmoe(**published_kwargs(olmoe_hf_config_to_kwargs, OLMOE_1B_7B, max_seq_len, options))


def olmoe_tokenizer(
    path: str,
    tokenizer_config_path: Optional[str] = None,
    generation_config_path: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    prompt_template: PromptTemplateArg = None,
) -> OlmoeTokenizer:
    """OLMoE tokenizer from the checkpoint's ``tokenizer.json`` (see :class:`OlmoeTokenizer`).

    Args:
        path (str): ``tokenizer.json``.
        tokenizer_config_path (Optional[str]): ``tokenizer_config.json``.
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
