"""Qwen3-MoE published sizes (values of the Hub config.json files) and the tokenizer."""

from typing import Optional

from torchtune.data._prompt_templates import _TemplateType
from torchtune.models.qwen2_5 import qwen2_5_tokenizer
from torchtune.models.qwen2_5._tokenizer import Qwen2_5Tokenizer
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._hf import hf_aux_loss_coeff
from torchtune_moe.models.qwen3_moe._component_builders import qwen3_moe

__all__ = ["qwen3_moe_30b_a3b", "qwen3_moe_235b_a22b", "qwen3_moe_tokenizer"]


def qwen3_moe_30b_a3b(
    *, max_seq_len: int = 40960, aux_loss_coeff: float = hf_aux_loss_coeff(0.001, 8, 48), **moe_kwargs
) -> TransformerDecoder:
    """Qwen3-30B-A3B (also -Base, -Instruct-2507, -Thinking-2507: same architecture): 48 layers, 128 experts,
    top-8, 30.5B parameters, 3.3B active.

    Args:
        max_seq_len (int): RoPE cache length (config.json max_position_embeddings: 40960).
        aux_loss_coeff (float): per-layer load-balancing coefficient; the default reproduces the published
            ``router_aux_loss_coef`` 0.001 (``0.001 * top_k 8 / 48 MoE layers``).
        **moe_kwargs: training options of :func:`torchtune_moe.models.moe` (``z_loss_coeff``, ``router``, ...).
    """
    return qwen3_moe(
        vocab_size=151936,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        embed_dim=2048,
        head_dim=128,
        intermediate_dim=6144,
        moe_intermediate_dim=768,
        num_experts=128,
        experts_per_token=8,
        max_seq_len=max_seq_len,
        rope_base=1_000_000.0,
        norm_eps=1e-6,
        norm_topk_prob=True,
        aux_loss_coeff=aux_loss_coeff,
        **moe_kwargs,
    )


def qwen3_moe_235b_a22b(
    *, max_seq_len: int = 40960, aux_loss_coeff: float = hf_aux_loss_coeff(0.001, 8, 94), **moe_kwargs
) -> TransformerDecoder:
    """Qwen3-235B-A22B: 94 layers, 128 experts, top-8, 235B parameters, 22B active.

    Args:
        max_seq_len (int): RoPE cache length (config.json max_position_embeddings: 40960).
        aux_loss_coeff (float): default reproduces the published ``router_aux_loss_coef`` 0.001
            (``0.001 * 8 / 94``).
        **moe_kwargs: training options of :func:`torchtune_moe.models.moe`.
    """
    return qwen3_moe(
        vocab_size=151936,
        num_layers=94,
        num_heads=64,
        num_kv_heads=4,
        embed_dim=4096,
        head_dim=128,
        intermediate_dim=12288,
        moe_intermediate_dim=1536,
        num_experts=128,
        experts_per_token=8,
        max_seq_len=max_seq_len,
        rope_base=1_000_000.0,
        norm_eps=1e-6,
        norm_topk_prob=True,
        aux_loss_coeff=aux_loss_coeff,
        **moe_kwargs,
    )


def qwen3_moe_tokenizer(
    path: str,
    merges_file: str,
    special_tokens_path: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    prompt_template: Optional[_TemplateType] = None,
    **kwargs,
) -> Qwen2_5Tokenizer:
    """Qwen3 tokenizer: torchtune's Qwen2.5 byte-level BPE tokenizer (same vocab.json and merges.txt) with the
    special tokens of the checkpoint's tokenizer.json (Qwen3 adds ``<think>``, ``</think>``, ...). Chat turns
    are ChatML (``<|im_start|>role\\n ... <|im_end|>\\n``), as Qwen3's chat template writes them.

    Args:
        path (str): ``vocab.json`` of the checkpoint.
        merges_file (str): ``merges.txt``.
        special_tokens_path (Optional[str]): the checkpoint's ``tokenizer.json`` (strongly recommended; None =
            Qwen2.5's special tokens, which lack Qwen3's).
        max_seq_len (Optional[int]): truncate tokenized samples to this length.
        prompt_template (Optional[_TemplateType]): a torchtune prompt template.
        **kwargs: other arguments of torchtune's ``Qwen2_5Tokenizer`` (e.g. ``eos_token``).
    """
    return qwen2_5_tokenizer(
        path=path,
        merges_file=merges_file,
        special_tokens_path=special_tokens_path,
        max_seq_len=max_seq_len,
        prompt_template=prompt_template,
        **kwargs,
    )
