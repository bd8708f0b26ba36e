"""Qwen3.5-MoE published sizes (text model) and the tokenizer.

Each size is its Hub config.json's text keys, built through the same translation as a downloaded checkpoint
(:func:`qwen3_5_moe_hf_config_to_kwargs`): the numbers live here once. Sources:

- 35B-A3B: transformers 5.24's ``Qwen3_5MoeTextConfig`` defaults, which its docstring gives as the
  Qwen/Qwen3.5-35B-A3B shapes; RoPE base 1e7 and 25 % rotary as THUDM/slime ``scripts/models/qwen3.5-35B-A3B.sh``
  (Megatron arguments of the same model, which also repeat every shape above); context 262144 as the model card.
- 397B-A17B: THUDM/slime ``scripts/models/qwen3.5-397B-A17B.sh`` (60 layers, hidden 4096, 32/2 heads of 256, 512
  experts top-10 of 1024, shared expert 1024, RoPE 1e7 over 25 %); linear-attention heads (16 key / 64 value
  of 128) as the Hub config.json is quoted in public code (NVIDIA Megatron-Bridge's Qwen3.5 test config has the
  same, but a shared expert of 4096: the slime value, 1024, gives 396.3B for the text model, the published 397B with the vision tower; 4096 would give 398.6B).
- 122B-A10B: no transformers or slime file; the Hub config.json as two independent public test configs quote it
  (hidden 3072, 48 layers, 32/2 heads of 256, 256 experts top-8 of 1024, shared 1024, linear heads 16/64 of 128),
  which gives 122.1B parameters, 9.8B active: the published 122B / 10B.
"""

from typing import Optional

from torchtune.data._prompt_templates import _get_prompt_template
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._hf_config import published_kwargs
from torchtune_moe.models._utils import PromptTemplateArg
from torchtune_moe.models.olmoe._tokenizer import OlmoeTokenizer
from torchtune_moe.models.qwen3_5_moe._component_builders import qwen3_5_moe
from torchtune_moe.models.qwen3_5_moe._hf_config import qwen3_5_moe_hf_config_to_kwargs

__all__ = [
    "qwen3_5_moe_35b_a3b",
    "qwen3_5_moe_122b_a10b",
    "qwen3_5_moe_397b_a17b",
    "qwen3_5_moe_tokenizer",
    "QWEN3_5_MOE_35B_A3B",
    "QWEN3_5_MOE_122B_A10B",
    "QWEN3_5_MOE_397B_A17B",
]

#: text_config of Qwen/Qwen3.5-35B-A3B, network keys (every 4th layer full attention).
QWEN3_5_MOE_35B_A3B = {
    "vocab_size": 248320, "num_hidden_layers": 40, "num_attention_heads": 16, "num_key_value_heads": 2,
    "hidden_size": 2048, "head_dim": 256, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
    "num_experts": 256, "num_experts_per_tok": 8, "full_attention_interval": 4, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4, "max_position_embeddings": 262144,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000, "partial_rotary_factor": 0.25},
    "rms_norm_eps": 1e-6, "attention_bias": False, "tie_word_embeddings": False, "hidden_act": "silu",
    "router_aux_loss_coef": 0.001,
}
#: text_config of Qwen/Qwen3.5-122B-A10B, network keys.
QWEN3_5_MOE_122B_A10B = {
    **QWEN3_5_MOE_35B_A3B, "num_hidden_layers": 48, "num_attention_heads": 32, "hidden_size": 3072,
    "moe_intermediate_size": 1024, "shared_expert_intermediate_size": 1024, "linear_num_value_heads": 64,
}
#: text_config of Qwen/Qwen3.5-397B-A17B, network keys.
QWEN3_5_MOE_397B_A17B = {
    **QWEN3_5_MOE_122B_A10B, "num_hidden_layers": 60, "hidden_size": 4096, "num_experts": 512,
    "num_experts_per_tok": 10,
}


def qwen3_5_moe_35b_a3b(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """Qwen3.5-35B-A3B text model: 40 layers (30 Gated DeltaNet, 10 gated full attention), 256 experts top-8
    plus a gated shared expert; 34.7B parameters without the vision tower and the MTP module, 3.5B active.

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default config.json max_position_embeddings (262144).
        **options: training options (``aux_loss_coeff``, ``z_loss_coeff``, ``router``, ...: see
            ``TRAINING_OPTIONS`` in :mod:`torchtune_moe.models._hf_config`).
    """
    return qwen3_5_moe(**published_kwargs(qwen3_5_moe_hf_config_to_kwargs, QWEN3_5_MOE_35B_A3B, max_seq_len, options))


def qwen3_5_moe_122b_a10b(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """Qwen3.5-122B-A10B text model: 48 layers (36 Gated DeltaNet, 12 full attention), 256 experts top-8 plus
    a gated shared expert; 122.1B parameters, 9.8B active.

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default 262144.
        **options: training options, as :func:`qwen3_5_moe_35b_a3b`.
    """
    return qwen3_5_moe(**published_kwargs(qwen3_5_moe_hf_config_to_kwargs, QWEN3_5_MOE_122B_A10B, max_seq_len, options))


def qwen3_5_moe_397b_a17b(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """Qwen3.5-397B-A17B text model: 60 layers (45 Gated DeltaNet, 15 full attention), 512 experts top-10 plus
    a gated shared expert; 396.3B parameters, 17.3B active.

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default 262144.
        **options: training options, as :func:`qwen3_5_moe_35b_a3b`.
    """
    return qwen3_5_moe(**published_kwargs(qwen3_5_moe_hf_config_to_kwargs, QWEN3_5_MOE_397B_A17B, max_seq_len, options))


def qwen3_5_moe_tokenizer(
    path: str,
    tokenizer_config_path: Optional[str] = None,
    generation_config_path: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    prompt_template: PromptTemplateArg = "torchtune.data.ChatMLTemplate",
) -> OlmoeTokenizer:
    """Qwen3.5 tokenizer: the checkpoint's ``tokenizer.json`` through torchtune's ``HuggingFaceBaseTokenizer``
    wrapper (:class:`OlmoeTokenizer`: no BOS, EOS from ``tokenizer_config.json``), ChatML turns by default.

    Not torchtune's Qwen2.5 tokenizer (the Qwen2/Qwen3 families' path): Qwen3.5 has a new 248k vocabulary and a
    pre-tokenizer that also keeps combining marks (``\\p{M}``) with letters, which torchtune's hard-coded Qwen2
    pattern does not; ``tokenizer.json`` carries the right one.

    Args:
        path (str): ``tokenizer.json``.
        tokenizer_config_path (Optional[str]): ``tokenizer_config.json`` (EOS and pad tokens).
        generation_config_path (Optional[str]): ``generation_config.json``.
        max_seq_len (Optional[int]): truncate tokenized samples to this length.
        prompt_template (PromptTemplateArg): a torchtune prompt template (default ChatML, as Qwen's chat
            template writes turns: ``<|im_start|>role\\n ... <|im_end|>\\n``); None for none.
    """
    template = _get_prompt_template(prompt_template) if prompt_template is not None else None
    return OlmoeTokenizer(
        path,
        tokenizer_config_path=tokenizer_config_path,
        generation_config_path=generation_config_path,
        max_seq_len=max_seq_len,
        prompt_template=template,
    )
