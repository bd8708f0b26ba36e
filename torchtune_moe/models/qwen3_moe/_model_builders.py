"""Qwen3-MoE published sizes and the tokenizer.

Each size is its Hub config.json (the keys that describe the network), built through the same translation as
a downloaded checkpoint (:func:`qwen3_moe_hf_config_to_kwargs`): the numbers live here once.
"""

from typing import Optional

from torchtune.models.qwen2 import Qwen2Tokenizer
from torchtune.models.qwen2_5 import qwen2_5_tokenizer
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._hf_config import published_kwargs
from torchtune_moe.models._utils import PromptTemplateArg
from torchtune_moe.models.qwen3_moe._component_builders import qwen3_moe
from torchtune_moe.models.qwen3_moe._hf_config import qwen3_moe_hf_config_to_kwargs

__all__ = ["qwen3_moe_30b_a3b", "qwen3_moe_235b_a22b", "qwen3_moe_tokenizer", "QWEN3_MOE_30B_A3B", "QWEN3_MOE_235B_A22B"]

#: config.json of Qwen/Qwen3-30B-A3B (also -Base, -Instruct-2507, -Thinking-2507), network keys.
QWEN3_MOE_30B_A3B = {
    "vocab_size": 151936, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "hidden_size": 2048, "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_experts": 128, "num_experts_per_tok": 8, "max_position_embeddings": 40960, "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "attention_bias": False, "tie_word_embeddings": False, "router_aux_loss_coef": 0.001,
}
#: config.json of Qwen/Qwen3-235B-A22B, network keys.
QWEN3_MOE_235B_A22B = {
    **QWEN3_MOE_30B_A3B, "num_hidden_layers": 94, "num_attention_heads": 64, "hidden_size": 4096,
    "intermediate_size": 12288, "moe_intermediate_size": 1536,
}


def qwen3_moe_30b_a3b(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """Qwen3-30B-A3B (also -Base, -Instruct-2507, -Thinking-2507: same architecture): 48 layers, 128 experts,
    top-8, 30.5B parameters, 3.3B active.

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default config.json max_position_embeddings (40960).
        **options: training options (``aux_loss_coeff``, ``z_loss_coeff``, ``router``, ...: see
            ``TRAINING_OPTIONS`` in :mod:`torchtune_moe.models._hf_config`). The default ``aux_loss_coeff``
            reproduces the published ``router_aux_loss_coef`` 0.001 (``0.001 * experts_per_token 8 / 48 MoE layers``).
    """
    return qwen3_moe(**published_kwargs(qwen3_moe_hf_config_to_kwargs, QWEN3_MOE_30B_A3B, max_seq_len, options))


def qwen3_moe_235b_a22b(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """Qwen3-235B-A22B: 94 layers, 128 experts, top-8, 235B parameters, 22B active.

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default config.json max_position_embeddings (40960).
        **options: training options, as :func:`qwen3_moe_30b_a3b` (default ``aux_loss_coeff``
            ``0.001 * 8 / 94``).
    """
    return qwen3_moe(**published_kwargs(qwen3_moe_hf_config_to_kwargs, QWEN3_MOE_235B_A22B, max_seq_len, options))


def qwen3_moe_tokenizer(
    path: str,
    merges_file: str,
    special_tokens_path: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    prompt_template: PromptTemplateArg = None,
    **kwargs,
) -> Qwen2Tokenizer:
    """Qwen3 tokenizer: torchtune's Qwen2.5 byte-level BPE tokenizer (same vocab.json and merges.txt) with the
    special tokens of the checkpoint's tokenizer.json (Qwen3 adds ``<think>``, ``</think>``, ...). Chat turns
    are ChatML (``<|im_start|>role\\n ... <|im_end|>\\n``), as Qwen3's chat template writes them.

    Args:
        path (str): ``vocab.json`` of the checkpoint.
        merges_file (str): ``merges.txt``.
        special_tokens_path (Optional[str]): the checkpoint's ``tokenizer.json`` (strongly recommended; None =
            Qwen2.5's special tokens, which lack Qwen3's).
        max_seq_len (Optional[int]): truncate tokenized samples to this length.
        prompt_template (PromptTemplateArg): a torchtune prompt template.
        **kwargs: other arguments of torchtune's ``Qwen2_5Tokenizer`` (a ``Qwen2Tokenizer``) (e.g. ``eos_token``).
    """
    return qwen2_5_tokenizer(
        path=path,
        merges_file=merges_file,
        special_tokens_path=special_tokens_path,
        max_seq_len=max_seq_len,
        prompt_template=prompt_template,
        **kwargs,
    )
