"""Mixtral published sizes and the tokenizer.

Each size is its Hub config.json (the keys that describe the network), built through the same translation as
a downloaded checkpoint (:func:`mixtral_hf_config_to_kwargs`): the numbers live here once.
"""

from typing import Optional

from torchtune.data import Message, truncate
from torchtune.data._prompt_templates import _get_prompt_template  # no public equivalent in torchtune 0.6.1
from torchtune.models.mistral import MistralTokenizer
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._hf_config import published_kwargs
from torchtune_moe.models._utils import PromptTemplateArg
from torchtune_moe.models.mixtral._component_builders import mixtral
from torchtune_moe.models.mixtral._hf_config import mixtral_hf_config_to_kwargs

__all__ = ["mixtral_8x7b", "mixtral_8x22b", "mixtral_tokenizer", "MixtralTokenizer", "MIXTRAL_8X7B", "MIXTRAL_8X22B"]

#: config.json of mistralai/Mixtral-8x7B-v0.1 (and -Instruct-v0.1), network keys.
MIXTRAL_8X7B = {
    "vocab_size": 32000, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2,
    "max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-5, "sliding_window": None,
    "tie_word_embeddings": False, "router_aux_loss_coef": 0.02,
}
#: config.json of mistralai/Mixtral-8x22B-v0.1, network keys (-Instruct-v0.1: vocab_size 32768).
MIXTRAL_8X22B = {
    **MIXTRAL_8X7B, "num_hidden_layers": 56, "num_attention_heads": 48, "hidden_size": 6144,
    "intermediate_size": 16384, "max_position_embeddings": 65536, "router_aux_loss_coef": 0.001,
}


def mixtral_8x7b(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """Mixtral-8x7B-v0.1 (and -Instruct-v0.1): 32 layers, 8 experts, top-2, 46.7B parameters, 12.9B active.

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default config.json max_position_embeddings (32768).
        **options: training options (``aux_loss_coeff``, ``z_loss_coeff``, ``router``, ...). The default
            ``aux_loss_coeff`` reproduces the published ``router_aux_loss_coef`` 0.02
            (``0.02 * experts_per_token 2 / 32 MoE layers``).
    """
    return mixtral(**published_kwargs(mixtral_hf_config_to_kwargs, MIXTRAL_8X7B, max_seq_len, options))


def mixtral_8x22b(*, vocab_size: int = 32000, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """Mixtral-8x22B-v0.1: 56 layers, 8 experts, top-2, 141B parameters, 39B active.

    Args:
        vocab_size (int): 32000 for v0.1, 32768 for -Instruct-v0.1 (its larger tokenizer).
        max_seq_len (Optional[int]): RoPE cache length; default config.json max_position_embeddings (65536).
        **options: training options, as :func:`mixtral_8x7b` (default ``aux_loss_coeff`` ``0.001 * 2 / 56``).
    """
    config = {**MIXTRAL_8X22B, "vocab_size": vocab_size}
    return mixtral(**published_kwargs(mixtral_hf_config_to_kwargs, config, max_seq_len, options))


class MixtralTokenizer(MistralTokenizer):
    """torchtune's Mistral SentencePiece tokenizer, with ``max_seq_len`` applied to ``tokenize_messages``
    (torchtune 0.6.1's ``MistralTokenizer`` stores ``max_seq_len`` but never truncates; the other model
    tokenizers do, keeping the final EOS)."""

    def tokenize_messages(self, messages: list[Message], *, add_eos: bool = True) -> tuple[list[int], list[bool]]:
        tokens, mask = super().tokenize_messages(messages, add_eos=add_eos)
        if self.max_seq_len:
            tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_eos else None)
            mask = truncate(mask, self.max_seq_len, True if add_eos else None)
        return tokens, mask


def mixtral_tokenizer(
    path: str,
    max_seq_len: Optional[int] = None,
    prompt_template: PromptTemplateArg = "torchtune.models.mistral.MistralChatTemplate",
) -> MixtralTokenizer:
    """Mixtral tokenizer: torchtune's Mistral SentencePiece tokenizer (``[INST] ... [/INST]`` chat template).

    Args:
        path (str): the checkpoint's ``tokenizer.model``.
        max_seq_len (Optional[int]): truncate tokenized samples to this length.
        prompt_template (PromptTemplateArg): default ``MistralChatTemplate``; None for plain text.
    """
    template = _get_prompt_template(prompt_template) if prompt_template is not None else None
    return MixtralTokenizer(path=path, max_seq_len=max_seq_len, prompt_template=template)
