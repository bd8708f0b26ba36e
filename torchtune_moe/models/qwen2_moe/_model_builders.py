"""Qwen2-MoE published sizes and the tokenizer.

Each size is its Hub config.json (the keys that describe the network), built through the same translation as
a downloaded checkpoint (:func:`qwen2_moe_hf_config_to_kwargs`): the numbers live here once.
"""

from typing import Optional

from torchtune.models.qwen2 import Qwen2Tokenizer, qwen2_tokenizer
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._hf_config import published_kwargs
from torchtune_moe.models._utils import PromptTemplateArg
from torchtune_moe.models.qwen2_moe._component_builders import qwen2_moe
from torchtune_moe.models.qwen2_moe._hf_config import qwen2_moe_hf_config_to_kwargs

__all__ = ["qwen1_5_moe_a2_7b", "qwen2_moe_57b_a14b", "qwen2_moe_tokenizer", "QWEN1_5_MOE_A2_7B", "QWEN2_MOE_57B_A14B"]

#: config.json of Qwen/Qwen1.5-MoE-A2.7B (and -Chat), network keys.
QWEN1_5_MOE_A2_7B = {
    "vocab_size": 151936, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
    "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
    "max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "norm_topk_prob": False,
    "decoder_sparse_step": 1, "qkv_bias": True, "tie_word_embeddings": False, "router_aux_loss_coef": 0.001,
}
#: config.json of Qwen/Qwen2-57B-A14B (and -Instruct), network keys.
QWEN2_MOE_57B_A14B = {
    **QWEN1_5_MOE_A2_7B, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "hidden_size": 3584, "intermediate_size": 18944, "moe_intermediate_size": 2560,
    "shared_expert_intermediate_size": 20480, "num_experts": 64, "num_experts_per_tok": 8,
    "max_position_embeddings": 131072,
}


def qwen1_5_moe_a2_7b(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """Qwen1.5-MoE-A2.7B (and -Chat): 24 layers, 60 experts, top-4, a gated shared expert, 14.3B parameters,
    2.7B active.

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default config.json max_position_embeddings (32768).
        **options: training options (``aux_loss_coeff``, ``z_loss_coeff``, ``router``, ...). The default
            ``aux_loss_coeff`` reproduces the published ``router_aux_loss_coef`` 0.001
            (``0.001 * experts_per_token 4 / 24 MoE layers``).
    """
    return qwen2_moe(**published_kwargs(qwen2_moe_hf_config_to_kwargs, QWEN1_5_MOE_A2_7B, max_seq_len, options))


def qwen2_moe_57b_a14b(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """Qwen2-57B-A14B (and -Instruct): 28 layers, 64 experts, top-8, a gated shared expert, 57.4B parameters,
    14B active.

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default config.json max_position_embeddings (131072).
        **options: training options, as :func:`qwen1_5_moe_a2_7b` (default ``aux_loss_coeff`` ``0.001 * 8 / 28``).
    """
    return qwen2_moe(**published_kwargs(qwen2_moe_hf_config_to_kwargs, QWEN2_MOE_57B_A14B, max_seq_len, options))


def qwen2_moe_tokenizer(
    path: str,
    merges_file: str,
    special_tokens_path: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    prompt_template: PromptTemplateArg = None,
    **kwargs,
) -> Qwen2Tokenizer:
    """Qwen1.5/Qwen2 tokenizer: torchtune's Qwen2 byte-level BPE tokenizer; chat turns are ChatML.

    Args:
        path (str): ``vocab.json`` of the checkpoint.
        merges_file (str): ``merges.txt``.
        special_tokens_path (Optional[str]): the checkpoint's ``tokenizer.json`` (None = Qwen2's special tokens,
            which are the ones these checkpoints have).
        max_seq_len (Optional[int]): truncate tokenized samples to this length.
        prompt_template (PromptTemplateArg): a torchtune prompt template.
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
