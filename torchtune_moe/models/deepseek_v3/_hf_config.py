"""DeepSeek-V3 ``config.json`` -> :func:`~torchtune_moe.models.deepseek_v3.deepseek_v3` arguments."""

from typing import Optional

from torchtune_moe.models._hf_config import HFConfigReader

__all__ = ["deepseek_v3_hf_config_to_kwargs", "deepseek_v2_hf_config_to_kwargs"]

# transformers' DeepseekV3Config and DeepseekV2Config defaults, for keys a config.json leaves out.
_DEFAULTS = {
    "deepseek_v3": dict(
        vocab_size=129280, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=None, hidden_size=7168,
        num_experts=256, num_experts_per_tok=8, max_position_embeddings=4096, rope_theta=10_000.0, rms_norm_eps=1e-6,
        intermediate_size=18432, moe_intermediate_size=2048, n_shared_experts=1, routed_scaling_factor=2.5,
        first_k_dense_replace=3, n_group=8, topk_group=4, norm_topk_prob=True, q_lora_rank=1536,
        scoring_func="sigmoid", topk_method="noaux_tc",
    ),
    "deepseek_v2": dict(
        vocab_size=102400, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None, hidden_size=4096,
        num_experts=64, num_experts_per_tok=None, max_position_embeddings=2048, rope_theta=10_000.0,
        rms_norm_eps=1e-6, intermediate_size=11008, moe_intermediate_size=1407, n_shared_experts=2,
        routed_scaling_factor=1.0, first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=False,
        q_lora_rank=1536, scoring_func="softmax", topk_method="greedy",
    ),
}
_YARN = {  # config.json rope_parameters key -> yarn argument of deepseek_v3()
    "factor": "factor", "original_max_position_embeddings": "original_max_seq_len", "beta_fast": "beta_fast",
    "beta_slow": "beta_slow", "mscale": "mscale", "mscale_all_dim": "mscale_all_dim",
    "attention_factor": "attention_factor", "truncate": "truncate",
}


def deepseek_v3_hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None) -> dict:
    """:func:`deepseek_v3` kwargs from a DeepSeek-V3 config.json (defaults as transformers' ``DeepseekV3Config``).
    The keys of DeepSeek's own modelling code are checked too: ``scoring_func`` must be sigmoid, ``topk_method``
    ``noaux_tc``, ``moe_layer_freq`` 1; ``aux_loss_alpha``/``seq_aux`` (pretraining's sequence-wise loss) are
    ignored, as transformers does (``seq_aux_loss_coeff`` adds such a loss here).

    Raises:
        ValueError: an option that cannot be reproduced (rope scaling other than YaRN, unknown keys, ...).
    """
    return _deepseek_hf_config_to_kwargs(config, max_seq_len, "deepseek_v3")


def deepseek_v2_hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None) -> dict:
    """:func:`deepseek_v3` kwargs from a DeepSeek-V2 config.json (defaults as transformers' ``DeepseekV2Config``):
    the same network with softmax scores, ``topk_method`` ``greedy`` (``group_limited_greedy``, DeepSeek-V2's
    236B model, scores groups by their best expert: refused), no selection bias and no renormalisation
    (transformers' DeepSeek-V2 ignores ``norm_topk_prob``, so ``true`` is refused).

    Raises:
        ValueError: an option that cannot be reproduced, naming it.
    """
    return _deepseek_hf_config_to_kwargs(config, max_seq_len, "deepseek_v2")


def _deepseek_hf_config_to_kwargs(config: dict, max_seq_len: Optional[int], family: str) -> dict:
    defaults = _DEFAULTS[family]
    r = HFConfigReader(config, family, aliases={"n_routed_experts": "num_experts", "num_local_experts": "num_experts"})
    kwargs = r.decoder(defaults, max_seq_len, rope=False)
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
    rope = r.rope_parameters(defaults["rope_theta"])
    rope_type = rope.pop("rope_type")
    if rope.pop("partial_rotary_factor") != 1.0:
        r.refuse("partial_rotary_factor", "only 1.0 (RoPE over all qk_rope_head_dim channels) is supported")
    rope_base = rope.pop("rope_theta")
    yarn = None
    if rope_type == "yarn":
        unknown = sorted(set(rope) - set(_YARN))
        if unknown:
            r.refuse("rope_parameters", f"YaRN keys {unknown} are not supported (known: {sorted(_YARN)})")
        rope.setdefault("original_max_position_embeddings", r.get_int("max_position_embeddings", defaults["max_position_embeddings"]))
        if rope.get("factor") is None:
            rope["factor"] = r.get_int("max_position_embeddings", defaults["max_position_embeddings"]) / rope["original_max_position_embeddings"]
        yarn = {_YARN[k]: v for k, v in rope.items() if v is not None}
    elif rope_type != "default" or rope:
        r.refuse("rope_parameters", "only the default RoPE and YaRN (rope_type 'yarn') are supported")
    for key in ("scoring_func", "topk_method", "moe_layer_freq"):
        required = defaults.get(key, 1)
        if r.raw(key, required) != required:
            r.refuse(key, f"only {required!r} ({family}'s routing as transformers implements it) is supported")
    first_k = r.get_int("first_k_dense_replace", defaults["first_k_dense_replace"], minimum=0)
    if first_k >= kwargs["num_layers"]:
        r.refuse("first_k_dense_replace", f"must be below num_hidden_layers ({kwargs['num_layers']}): no MoE layer")
    n_group = r.get_int("n_group", defaults["n_group"])
    topk_group = r.get_int("topk_group", defaults["topk_group"])
    if family == "deepseek_v2":
        # topk_method greedy (the only one accepted above) picks the top-k of all experts: transformers reads
        # n_group / topk_group only for group_limited_greedy, so they do not limit the routing here either.
        n_group = topk_group = 1
    if kwargs["num_experts"] % n_group:
        r.refuse("n_group", f"must divide n_routed_experts ({kwargs['num_experts']})")
    if r.get_int("pretraining_tp", 1) != 1:
        r.refuse("pretraining_tp", "only 1 is supported")
    q_lora_rank = config.get("q_lora_rank", defaults["q_lora_rank"])
    r.ignore("q_lora_rank")
    if q_lora_rank is not None:
        q_lora_rank = r.get_int("q_lora_rank", q_lora_rank)
    norm_topk_prob = r.get_bool("norm_topk_prob", defaults["norm_topk_prob"])
    if family == "deepseek_v2":
        if norm_topk_prob:
            r.refuse("norm_topk_prob", "transformers' DeepSeek-V2 does not renormalise the top-k weights")
        if r.get_bool("mlp_bias", False):
            r.refuse("mlp_bias", "transformers' DeepSeek-V2 MLPs have no biases")
    # Multi-token-prediction layers are not built (transformers neither); ep_size is DeepSeek's inference
    # parallelism; aux_loss_alpha/seq_aux the pretraining loss transformers does not apply; auto_map the remote code.
    r.ignore("num_nextn_predict_layers", "num_mtp_layers", "ep_size", "aux_loss_alpha", "seq_aux", "auto_map")
    kwargs.update(
        num_heads=num_heads,
        rope_base=rope_base,
        yarn=yarn,
        rope_interleave=r.get_bool("rope_interleave", True),
        dense_hidden_dim=r.get_int("intermediate_size", defaults["intermediate_size"]),
        moe_hidden_dim=r.get_int("moe_intermediate_size", defaults["moe_intermediate_size"]),
        kv_lora_rank=r.get_int("kv_lora_rank", 512),
        q_lora_rank=q_lora_rank,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=r.get_int("v_head_dim", 128),
        num_shared_experts=r.get_int("n_shared_experts", defaults["n_shared_experts"], minimum=0),
        num_dense_layers=first_k,
        score_func=defaults["scoring_func"],
        expert_bias=family == "deepseek_v3",
        norm_topk_prob=norm_topk_prob,
        route_scale=r.get_float("routed_scaling_factor", defaults["routed_scaling_factor"]),
        num_expert_groups=n_group,
        num_limited_groups=topk_group,
        attn_bias=r.get_bool("attention_bias", False),
    )
    r.finish()
    return kwargs
