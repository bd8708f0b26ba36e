"""DeepSeek-V3 ``config.json`` -> :func:`~torchtune_moe.models.deepseek_v3.deepseek_v3` arguments."""

from typing import Optional

from torchtune_moe.models._hf_config import HFConfigReader

__all__ = ["deepseek_v3_hf_config_to_kwargs"]

# transformers' DeepseekV3Config defaults, for keys a config.json leaves out.
_DEFAULTS = dict(
    vocab_size=129280, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=None, hidden_size=7168,
    num_experts=256, num_experts_per_tok=8, max_position_embeddings=4096, rope_theta=10_000.0, rms_norm_eps=1e-6,
)
_YARN = {  # config.json rope_parameters key -> yarn argument of deepseek_v3()
    "factor": "factor", "original_max_position_embeddings": "original_max_seq_len", "beta_fast": "beta_fast",
    "beta_slow": "beta_slow", "mscale": "mscale", "mscale_all_dim": "mscale_all_dim",
    "attention_factor": "attention_factor", "truncate": "truncate",
}


def deepseek_v3_hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None) -> dict:
    """:func:`deepseek_v3` kwargs from a config.json (defaults as transformers' ``DeepseekV3Config``). The keys
    of DeepSeek's own modelling code are checked too: ``scoring_func`` must be sigmoid, ``topk_method``
    ``noaux_tc``, ``moe_layer_freq`` 1; ``aux_loss_alpha``/``seq_aux`` (pretraining's sequence-wise loss) are
    ignored, as transformers does (``seq_aux_loss_coeff`` adds such a loss here).

    Raises:
        ValueError: an option that cannot be reproduced (rope scaling other than YaRN, unknown keys, ...).
    """
    r = HFConfigReader(config, "deepseek_v3", aliases={"n_routed_experts": "num_experts", "num_local_experts": "num_experts"})
    kwargs = r.decoder(_DEFAULTS, max_seq_len, rope=False)
    num_heads = kwargs.pop("num_heads")
    if kwargs.pop("num_kv_heads") != num_heads:
        r.refuse("num_key_value_heads", f"multi-head latent attention has one key/value head per query head ({num_heads})")
    nope = r.get_int("qk_nope_head_dim", 128)
    rope_dim = r.get_int("qk_rope_head_dim", 64)
    # transformers writes head_dim (= qk_rope_head_dim) and qk_head_dim (= nope + rope) into config.json.
    if kwargs.pop("head_dim") != rope_dim and "head_dim" in config:
        r.refuse("head_dim", f"must equal qk_rope_head_dim ({rope_dim})")
    if r.get_int("qk_head_dim", nope + rope_dim) != nope + rope_dim:
        r.refuse("qk_head_dim", f"must equal qk_nope_head_dim + qk_rope_head_dim ({nope + rope_dim})")
    rope = r.rope_parameters(_DEFAULTS["rope_theta"])
    rope_type = rope.pop("rope_type")
    if rope.pop("partial_rotary_factor") != 1.0:
        r.refuse("partial_rotary_factor", "only 1.0 (RoPE over all qk_rope_head_dim channels) is supported")
    rope_base = rope.pop("rope_theta")
    yarn = None
    if rope_type == "yarn":
        unknown = sorted(set(rope) - set(_YARN))
        if unknown:
            r.refuse("rope_parameters", f"YaRN keys {unknown} are not supported (known: {sorted(_YARN)})")
        rope.setdefault("original_max_position_embeddings", r.get_int("max_position_embeddings", 4096))
        if rope.get("factor") is None:
            rope["factor"] = r.get_int("max_position_embeddings", 4096) / rope["original_max_position_embeddings"]
        yarn = {_YARN[k]: v for k, v in rope.items() if v is not None}
    elif rope_type != "default" or rope:
        r.refuse("rope_parameters", "only the default RoPE and YaRN (rope_type 'yarn') are supported")
    for key, required in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if r.raw(key, required) != required:
            r.refuse(key, f"only {required!r} (DeepSeek-V3's routing) is supported")
    first_k = r.get_int("first_k_dense_replace", 3, minimum=0)
    if first_k >= kwargs["num_layers"]:
        r.refuse("first_k_dense_replace", f"must be below num_hidden_layers ({kwargs['num_layers']}): no MoE layer")
    n_group = r.get_int("n_group", 8)
    if kwargs["num_experts"] % n_group:
        r.refuse("n_group", f"must divide n_routed_experts ({kwargs['num_experts']})")
    if r.get_int("pretraining_tp", 1) != 1:
        r.refuse("pretraining_tp", "only 1 is supported")
    q_lora_rank = r.raw("q_lora_rank", None)
    if q_lora_rank is not None:
        q_lora_rank = r.get_int("q_lora_rank")
    # Multi-token-prediction layers are not built (transformers neither); ep_size is DeepSeek's inference
    # parallelism; aux_loss_alpha/seq_aux the pretraining loss transformers does not apply; auto_map the remote code.
    r.ignore("num_nextn_predict_layers", "num_mtp_layers", "ep_size", "aux_loss_alpha", "seq_aux", "auto_map")
    kwargs.update(
        num_heads=num_heads,
        rope_base=rope_base,
        yarn=yarn,
        rope_interleave=r.get_bool("rope_interleave", True),
        dense_hidden_dim=r.get_int("intermediate_size", 18432),
        moe_hidden_dim=r.get_int("moe_intermediate_size", 2048),
        kv_lora_rank=r.get_int("kv_lora_rank", 512),
        q_lora_rank=q_lora_rank,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=r.get_int("v_head_dim", 128),
        num_shared_experts=r.get_int("n_shared_experts", 1, minimum=0),
        num_dense_layers=first_k,
        norm_topk_prob=r.get_bool("norm_topk_prob", True),
        route_scale=r.get_float("routed_scaling_factor", 2.5),
        num_expert_groups=n_group,
        num_limited_groups=r.get_int("topk_group", 4),
        attn_bias=r.get_bool("attention_bias", False),
    )
    r.finish()
    return kwargs
