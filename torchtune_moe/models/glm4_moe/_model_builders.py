"""GLM-4.5 published sizes and the tokenizer.

Each size is its Hub config.json (the keys that describe the network), built through the same translation as
a downloaded checkpoint (:func:`glm4_moe_hf_config_to_kwargs`): the numbers live here once.
"""

from typing import Optional

from torchtune.data._prompt_templates import _get_prompt_template
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._hf_config import published_kwargs
from torchtune_moe.models._utils import PromptTemplateArg
from torchtune_moe.models.glm4_moe._component_builders import glm4_moe
from torchtune_moe.models.glm4_moe._hf_config import glm4_moe_hf_config_to_kwargs
from torchtune_moe.models.olmoe._tokenizer import OlmoeTokenizer

__all__ = ["glm4_5_355b_a32b", "glm4_5_air_106b_a12b", "glm4_moe_tokenizer", "GLM4_5", "GLM4_5_AIR"]

#: config.json of zai-org/GLM-4.5 (also -Base), network keys.
GLM4_5 = {
    "vocab_size": 151552, "num_hidden_layers": 92, "num_attention_heads": 96, "num_key_value_heads": 8,
    "hidden_size": 5120, "head_dim": 128, "intermediate_size": 12288, "moe_intermediate_size": 1536,
    "n_routed_experts": 160, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
    "max_position_embeddings": 131072, "rope_theta": 1_000_000, "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-5, "attention_bias": True, "use_qk_norm": True, "tie_word_embeddings": False,
    "pad_token_id": 151329, "num_nextn_predict_layers": 1,
}
#: config.json of zai-org/GLM-4.5-Air (also -Base), network keys.
GLM4_5_AIR = {
    **GLM4_5, "num_hidden_layers": 46, "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "n_routed_experts": 128, "first_k_dense_replace": 1, "routed_scaling_factor": 1.0, "use_qk_norm": False,
}


def glm4_5_355b_a32b(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """GLM-4.5: 92 layers (3 dense), 160 routed experts top-8 plus a shared one, 353B parameters without the
    multi-token-prediction layer (355B with it), 32B active.

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default config.json max_position_embeddings (131072).
        **options: training options (``expert_bias_update_rate``, ``aux_loss_coeff``, ``z_loss_coeff``,
            ``router``, ...: see ``TRAINING_OPTIONS`` in :mod:`torchtune_moe.models._hf_config`). By default the
            published ``e_score_correction_bias`` stays fixed and no aux loss is added, as in transformers.
    """
    return glm4_moe(**published_kwargs(glm4_moe_hf_config_to_kwargs, GLM4_5, max_seq_len, options))


def glm4_5_air_106b_a12b(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """GLM-4.5-Air: 46 layers (1 dense), 128 routed experts top-8 plus a shared one, 106B parameters, 12B active.

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default config.json max_position_embeddings (131072).
        **options: training options, as :func:`glm4_5_355b_a32b`.
    """
    return glm4_moe(**published_kwargs(glm4_moe_hf_config_to_kwargs, GLM4_5_AIR, max_seq_len, options))


def glm4_moe_tokenizer(
    path: str,
    tokenizer_config_path: Optional[str] = None,
    generation_config_path: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    prompt_template: PromptTemplateArg = None,
) -> OlmoeTokenizer:
    """GLM-4.5 tokenizer: the checkpoint's ``tokenizer.json`` (byte-level BPE with GLM's special tokens) through
    the same torchtune ``HuggingFaceBaseTokenizer`` wrapper as OLMoE (:class:`OlmoeTokenizer`: no BOS, EOS
    ``<|endoftext|>`` from ``tokenizer_config.json``). Messages are encoded one after another; pass a
    ``prompt_template`` for GLM's chat markup (``<|user|>``, ``<|assistant|>``).

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
