"""Qwen2-MoE published sizes (values of the Hub config.json files) and the tokenizer."""

from typing import Optional

from torchtune.data._prompt_templates import _TemplateType
from torchtune.models.qwen2 import qwen2_tokenizer
from torchtune.models.qwen2._tokenizer import Qwen2Tokenizer
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._hf import hf_aux_loss_coeff
from torchtune_moe.models.qwen2_moe._component_builders import qwen2_moe

__all__ = ["qwen1_5_moe_a2_7b", "qwen2_moe_57b_a14b", "qwen2_moe_tokenizer"]


def qwen1_5_moe_a2_7b(
    *, max_seq_len: int = 32768, aux_loss_coeff: float = hf_aux_loss_coeff(0.001, 4, 24), **moe_kwargs
) -> TransformerDecoder:
    """Qwen1.5-MoE-A2.7B (and -Chat): 24 layers, 60 experts, top-4, a gated shared expert, 14.3B parameters,
    2.7B active.

    Args:
        max_seq_len (int): RoPE cache length (config.json max_position_embeddings).
        aux_loss_coeff (float): default reproduces the published ``router_aux_loss_coef`` 0.001
            (``0.001 * top_k 4 / 24 MoE layers``).
        **moe_kwargs: training options of :func:`torchtune_moe.models.moe`.
    """
    return qwen2_moe(
        vocab_size=151936,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        embed_dim=2048,
        intermediate_dim=5632,
        moe_intermediate_dim=1408,
        shared_expert_intermediate_dim=5632,
        num_experts=60,
        experts_per_token=4,
        max_seq_len=max_seq_len,
        rope_base=1_000_000.0,
        norm_eps=1e-6,
        norm_topk_prob=False,
        qkv_bias=True,
        aux_loss_coeff=aux_loss_coeff,
        **moe_kwargs,
    )


def qwen2_moe_57b_a14b(
    *, max_seq_len: int = 131072, aux_loss_coeff: float = hf_aux_loss_coeff(0.001, 8, 28), **moe_kwargs
) -> TransformerDecoder:
    """Qwen2-57B-A14B (and -Instruct): 28 layers, 64 experts, top-8, a gated shared expert, 57.4B parameters,
    14B active.

    Args:
        max_seq_len (int): RoPE cache length (config.json max_position_embeddings: 131072).
        aux_loss_coeff (float): default reproduces the published ``router_aux_loss_coef`` 0.001
            (``0.001 * 8 / 28``).
        **moe_kwargs: training options of :func:`torchtune_moe.models.moe`.
    """
    return qwen2_moe(
        vocab_size=151936,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        embed_dim=3584,
        intermediate_dim=18944,
        moe_intermediate_dim=2560,
        shared_expert_intermediate_dim=20480,
        num_experts=64,
        experts_per_token=8,
        max_seq_len=max_seq_len,
        rope_base=1_000_000.0,
        norm_eps=1e-6,
        norm_topk_prob=False,
        qkv_bias=True,
        aux_loss_coeff=aux_loss_coeff,
        **moe_kwargs,
    )


def qwen2_moe_tokenizer(
    path: str,
    merges_file: str,
    special_tokens_path: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    prompt_template: Optional[_TemplateType] = None,
    **kwargs,
) -> Qwen2Tokenizer:
    """Qwen1.5/Qwen2 tokenizer: torchtune's Qwen2 byte-level BPE tokenizer; chat turns are ChatML.

    Args:
        path (str): ``vocab.json`` of the checkpoint.
        merges_file (str): ``merges.txt``.
        special_tokens_path (Optional[str]): the checkpoint's ``tokenizer.json`` (None = Qwen2's special tokens,
            which are the ones these checkpoints have).
        max_seq_len (Optional[int]): truncate tokenized samples to this length.
        prompt_template (Optional[_TemplateType]): a torchtune prompt template.
        **kwargs: other arguments of torchtune's ``Qwen2Tokenizer``.
    """
    return qwen2_tokenizer(
        path=path,
        merges_file=merges_file,
        special_tokens_path=special_tokens_path,
        max_seq_len=max_seq_len,
        prompt_template=prompt_template,
        **kwargs,
    )
