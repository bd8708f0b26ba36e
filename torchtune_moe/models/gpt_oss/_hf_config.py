"""GPT-OSS ``config.json`` -> :func:`~torchtune_moe.models.gpt_oss.gpt_oss` arguments."""

from typing import Optional

from torchtune_moe.models._hf_config import HFConfigReader
from torchtune_moe.models._utils import hf_aux_loss_coeff

__all__ = ["gpt_oss_hf_config_to_kwargs"]

# transformers' GptOssConfig defaults, for keys a config.json leaves out.
_DEFAULTS = dict(
    vocab_size=201088, num_hidden_layers=36, num_attention_heads=64, num_key_value_heads=8, hidden_size=2880,
    num_local_experts=128, num_experts_per_tok=4, max_position_embeddings=131072, rope_theta=150000.0,
    rms_norm_eps=1e-5,
)
# GptOssConfig's rope_parameters when config.json has none.
_DEFAULT_YARN = {
    "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
    "original_max_position_embeddings": 4096,
}
_YARN = {  # config.json rope_parameters key -> yarn argument of gpt_oss()
    "factor": "factor", "original_max_position_embeddings": "original_max_seq_len", "beta_fast": "beta_fast",
    "beta_slow": "beta_slow", "attention_factor": "attention_factor", "truncate": "truncate",
}
_LAYER_TYPES = ("sliding_attention", "full_attention")


def gpt_oss_hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None) -> dict:
    """:func:`gpt_oss` kwargs from a config.json (defaults as transformers' ``GptOssConfig``).

    OpenAI's own keys are read too: ``experts_per_token`` (must equal ``num_experts_per_tok``) and
    ``initial_context_length`` (the YaRN ``original_max_position_embeddings``, which is what the network
    reads). ``hidden_act`` is ignored, as transformers' GPT-OSS experts ignore it (their activation is the
    clamped SwiGLU of ``swiglu_alpha`` and ``swiglu_limit``). A ``quantization_config`` of ``quant_method``
    ``mxfp4`` (the published checkpoints) is accepted: the MXFP4 expert weights are dequantised on load.

    Raises:
        ValueError: an option that cannot be reproduced (another quantisation, unknown keys, ...), naming it.
    """
    config = dict(config)
    if "head_dim" not in config:  # GptOssConfig's default is 64, not hidden_size // num_attention_heads
        config["head_dim"] = 64
    quant = config.pop("quantization_config", None)
    if quant is not None and (not isinstance(quant, dict) or quant.get("quant_method") != "mxfp4"):
        raise ValueError(
            f"gpt_oss config.json quantization_config={quant!r} is not supported: only the published MXFP4 experts "
            "(quant_method 'mxfp4', dequantised on load) or none"
        )
    r = HFConfigReader(
        config, "gpt_oss", aliases={"num_experts": "num_local_experts", "experts_per_token": "num_experts_per_tok"}
    )
    kwargs = r.decoder(_DEFAULTS, max_seq_len, rope=False)
    num_layers = kwargs["num_layers"]
    if "rope_parameters" not in config and "rope_scaling" not in config:
        config_rope = dict(_DEFAULT_YARN)
        r.config["rope_parameters"] = config_rope
    rope = r.rope_parameters(_DEFAULTS["rope_theta"])
    rope_type = rope.pop("rope_type")
    if rope.pop("partial_rotary_factor") != 1.0:
        r.refuse("partial_rotary_factor", "only 1.0 (RoPE over the whole head) is supported")
    rope_base = rope.pop("rope_theta")
    yarn = None
    if rope_type == "yarn":
        unknown = sorted(set(rope) - set(_YARN))
        if unknown:
            r.refuse("rope_parameters", f"YaRN keys {unknown} are not supported (known: {sorted(_YARN)})")
        if rope.get("original_max_position_embeddings") is None:
            r.refuse("rope_parameters", "YaRN needs original_max_position_embeddings")
        if rope.get("factor") is None:
            rope["factor"] = r.get_int("max_position_embeddings", _DEFAULTS["max_position_embeddings"]) / rope[
                "original_max_position_embeddings"
            ]
        yarn = {_YARN[k]: v for k, v in rope.items() if v is not None}
    elif rope_type != "default" or rope:
        r.refuse("rope_parameters", "only YaRN (rope_type 'yarn', as published) and the default RoPE are supported")
    r.get_int("initial_context_length", 4096)  # OpenAI's copy of original_max_position_embeddings: not read
    # transformers' GPT-OSS experts ignore hidden_act (clamped SwiGLU, below).
    r.ignore("hidden_act")
    window = config.get("sliding_window")
    r.ignore("sliding_window")
    if window is not None:
        window = r.get_int("sliding_window", 128)
    elif "sliding_window" not in config:
        window = 128
    layer_types = r.raw("layer_types") or [_LAYER_TYPES[(i + 1) % 2 == 0] for i in range(num_layers)]
    if (
        not isinstance(layer_types, (list, tuple)) or len(layer_types) != num_layers
        or any(t not in _LAYER_TYPES for t in layer_types)
    ):
        r.refuse("layer_types", f"expected {num_layers} entries, each one of {list(_LAYER_TYPES)}")
    if window is None and "sliding_attention" in layer_types:
        r.refuse("sliding_window", "layer_types has sliding_attention layers but sliding_window is null")
    kwargs.pop("activation")
    kwargs.update(
        rope_base=rope_base,
        yarn=yarn,
        moe_hidden_dim=r.get_int("intermediate_size", 2880),
        sliding_window=window,
        layer_types=list(layer_types),
        swiglu_alpha=r.get_float("swiglu_alpha", 1.702),
        swiglu_limit=r.get_float("swiglu_limit", 7.0),
        attn_bias=r.get_bool("attention_bias", True),
        aux_loss_coeff=hf_aux_loss_coeff(
            r.get_float("router_aux_loss_coef", 0.001), kwargs["experts_per_token"], num_layers
        ),
    )
    r.finish()
    return kwargs
