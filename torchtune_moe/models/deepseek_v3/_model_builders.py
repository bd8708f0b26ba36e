"""DeepSeek-V3 published sizes and the tokenizer.

Each size is its Hub config.json (the keys that describe the network), built through the same translation as
a downloaded checkpoint (:func:`deepseek_v3_hf_config_to_kwargs`): the numbers live here once.
"""

from typing import Optional

from torchtune.data._prompt_templates import _get_prompt_template
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._hf_config import published_kwargs
from torchtune_moe.models._utils import PromptTemplateArg
from torchtune_moe.models.deepseek_v3._component_builders import deepseek_v3
from torchtune_moe.models.deepseek_v3._hf_config import deepseek_v3_hf_config_to_kwargs
from torchtune_moe.models.olmoe._tokenizer import OlmoeTokenizer

__all__ = ["deepseek_v3_671b", "moonlight_16b_a3b", "deepseek_v3_tokenizer", "DEEPSEEK_V3", "MOONLIGHT_16B_A3B"]

#: config.json of deepseek-ai/DeepSeek-V3 (also -Base, -0324, DeepSeek-V3.1, DeepSeek-R1: same network keys), in
#: its bf16 form (the Hub files are FP8 with a quantization_config, which is refused: convert them to bf16 first).
DEEPSEEK_V3 = {
    "vocab_size": 129280, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0,
    },
    "rms_norm_eps": 1e-6, "attention_bias": False, "tie_word_embeddings": False, "num_nextn_predict_layers": 1,
}
#: config.json of moonshotai/Moonlight-16B-A3B (also -Instruct), network keys.
MOONLIGHT_16B_A3B = {
    **DEEPSEEK_V3, "vocab_size": 163840, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "hidden_size": 2048, "intermediate_size": 11264, "moe_intermediate_size": 1408, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 2.446, "q_lora_rank": None, "max_position_embeddings": 8192, "rope_theta": 50000.0,
    "rope_scaling": None, "rms_norm_eps": 1e-5,
}
del MOONLIGHT_16B_A3B["num_nextn_predict_layers"]


def deepseek_v3_671b(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """DeepSeek-V3 / V3.1 / R1: 61 layers (3 dense), MLA, 256 routed experts top-8 in 8 groups (best 4) plus a
    shared one, YaRN RoPE (factor 40); 671B parameters without the multi-token-prediction layer, 37B active.

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default config.json max_position_embeddings (163840).
        **options: training options (``expert_bias_update_rate``, ``seq_aux_loss_coeff``, ``z_loss_coeff``,
            ``router``, ...: see ``TRAINING_OPTIONS`` in :mod:`torchtune_moe.models._hf_config`). By default the
            published ``e_score_correction_bias`` stays fixed and no aux loss is added, as in transformers.
    """
    return deepseek_v3(**published_kwargs(deepseek_v3_hf_config_to_kwargs, DEEPSEEK_V3, max_seq_len, options))


def moonlight_16b_a3b(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """Moonlight-16B-A3B: 27 layers (1 dense), MLA without a query latent, 64 routed experts top-6 plus two
    shared; 16.0B parameters, 3.0B active.

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default config.json max_position_embeddings (8192).
        **options: training options, as :func:`deepseek_v3_671b`.
    """
    return deepseek_v3(**published_kwargs(deepseek_v3_hf_config_to_kwargs, MOONLIGHT_16B_A3B, max_seq_len, options))


def deepseek_v3_tokenizer(
    path: str,
    tokenizer_config_path: Optional[str] = None,
    generation_config_path: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    prompt_template: PromptTemplateArg = None,
) -> OlmoeTokenizer:
    """DeepSeek-V3 tokenizer: the checkpoint's ``tokenizer.json`` (byte-level BPE) through the same torchtune
    ``HuggingFaceBaseTokenizer`` wrapper as OLMoE (:class:`OlmoeTokenizer`), with DeepSeek's BOS
    ``<｜begin▁of▁sentence｜>`` and EOS ``<｜end▁of▁sentence｜>`` from ``tokenizer_config.json``. Messages are encoded
    one after another; pass a ``prompt_template`` for DeepSeek's chat markup (``<｜User｜>``, ``<｜Assistant｜>``).
    Moonlight ships a tiktoken file and its own tokenizer code instead of a ``tokenizer.json``: not covered.

    Args:
        path (str): ``tokenizer.json``.
        tokenizer_config_path (Optional[str]): ``tokenizer_config.json`` (BOS, EOS and pad tokens).
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
