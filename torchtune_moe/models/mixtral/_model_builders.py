"""Mixtral published sizes (values of the Hub config.json files) and the tokenizer."""

from typing import Optional

from torchtune.data import Message, truncate
from torchtune.data._prompt_templates import _get_prompt_template, _TemplateType
from torchtune.models.mistral._tokenizer import MistralTokenizer
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._hf import hf_aux_loss_coeff
from torchtune_moe.models.mixtral._component_builders import mixtral

__all__ = ["mixtral_8x7b", "mixtral_8x22b", "mixtral_tokenizer", "MixtralTokenizer"]


def mixtral_8x7b(
    *, max_seq_len: int = 32768, aux_loss_coeff: float = hf_aux_loss_coeff(0.02, 2, 32), **moe_kwargs
) -> TransformerDecoder:
    """Mixtral-8x7B-v0.1 (and -Instruct-v0.1): 32 layers, 8 experts, top-2, 46.7B parameters, 12.9B active.

    Args:
        max_seq_len (int): RoPE cache length (config.json max_position_embeddings: 32768).
        aux_loss_coeff (float): default reproduces the published ``router_aux_loss_coef`` 0.02
            (``0.02 * top_k 2 / 32 MoE layers``).
        **moe_kwargs: training options of :func:`torchtune_moe.models.moe`.
    """
    return mixtral(
        vocab_size=32000,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=4096,
        moe_intermediate_dim=14336,
        num_experts=8,
        experts_per_token=2,
        max_seq_len=max_seq_len,
        rope_base=1_000_000.0,
        norm_eps=1e-5,
        aux_loss_coeff=aux_loss_coeff,
        **moe_kwargs,
    )


def mixtral_8x22b(
    *,
    vocab_size: int = 32000,
    max_seq_len: int = 65536,
    aux_loss_coeff: float = hf_aux_loss_coeff(0.001, 2, 56),
    **moe_kwargs,
) -> TransformerDecoder:
    """Mixtral-8x22B-v0.1: 56 layers, 8 experts, top-2, 141B parameters, 39B active.

    Args:
        vocab_size (int): 32000 for v0.1, 32768 for -Instruct-v0.1 (its larger tokenizer).
        max_seq_len (int): RoPE cache length (config.json max_position_embeddings: 65536).
        aux_loss_coeff (float): default reproduces the published ``router_aux_loss_coef`` 0.001
            (``0.001 * 2 / 56``).
        **moe_kwargs: training options of :func:`torchtune_moe.models.moe`.
    """
    return mixtral(
        vocab_size=vocab_size,
        num_layers=56,
        num_heads=48,
        num_kv_heads=8,
        embed_dim=6144,
        moe_intermediate_dim=16384,
        num_experts=8,
        experts_per_token=2,
        max_seq_len=max_seq_len,
        rope_base=1_000_000.0,
        norm_eps=1e-5,
        aux_loss_coeff=aux_loss_coeff,
        **moe_kwargs,
    )


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
    prompt_template: Optional[_TemplateType] = "torchtune.models.mistral.MistralChatTemplate",
) -> MixtralTokenizer:
    """Mixtral tokenizer: torchtune's Mistral SentencePiece tokenizer (``[INST] ... [/INST]`` chat template).

    Args:
        path (str): the checkpoint's ``tokenizer.model``.
        max_seq_len (Optional[int]): truncate tokenized samples to this length.
        prompt_template (Optional[_TemplateType]): default ``MistralChatTemplate``; None for plain text.
    """
    template = _get_prompt_template(prompt_template) if prompt_template is not None else None
    return MixtralTokenizer(path=path, max_seq_len=max_seq_len, prompt_template=template)
