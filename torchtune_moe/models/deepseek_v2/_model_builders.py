"""DeepSeek-V2-Lite, built with :func:`~torchtune_moe.models.deepseek_v3.deepseek_v3` (same multi-head latent
attention and layer layout; softmax routing). The numbers live here once, as the Hub config.json."""

from typing import Optional

from torchtune.modules import TransformerDecoder

from torchtune_moe.models._hf_config import published_kwargs
from torchtune_moe.models.deepseek_v3._component_builders import deepseek_v3
from torchtune_moe.models.deepseek_v3._hf_config import deepseek_v2_hf_config_to_kwargs

__all__ = ["deepseek_v2_lite", "DEEPSEEK_V2_LITE"]

#: config.json of deepseek-ai/DeepSeek-V2-Lite (also -Chat), network keys.
DEEPSEEK_V2_LITE = {
    "vocab_size": 102400, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "n_group": 1, "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707,
    },
    "rms_norm_eps": 1e-6, "attention_bias": False, "tie_word_embeddings": False,
}


def deepseek_v2_lite(*, max_seq_len: Optional[int] = None, **options) -> TransformerDecoder:
    """DeepSeek-V2-Lite: 27 layers (1 dense), MLA without a query latent, 64 routed experts top-6 (softmax, not
    renormalised) plus two shared, YaRN RoPE; 15.7B parameters, 2.7B active.

    Args:
        max_seq_len (Optional[int]): RoPE cache length; default config.json max_position_embeddings (163840).
        **options: training options (``aux_loss_coeff``, ``seq_aux_loss_coeff``, ``z_loss_coeff``, ``router``,
            ...: see ``TRAINING_OPTIONS`` in :mod:`torchtune_moe.models._hf_config`).
    """
    return deepseek_v3(**published_kwargs(deepseek_v2_hf_config_to_kwargs, DEEPSEEK_V2_LITE, max_seq_len, options))
