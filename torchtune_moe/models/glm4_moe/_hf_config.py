"""GLM-4.5 ``config.json`` -> :func:`~torchtune_moe.models.glm4_moe.glm4_moe` arguments."""

from typing import Optional

from torchtune_moe.models._hf_config import HFConfigReader

__all__ = ["glm4_moe_hf_config_to_kwargs"]

# transformers' Glm4MoeConfig defaults, for keys a config.json leaves out.
_DEFAULTS = dict(
    vocab_size=151552, num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8, hidden_size=4096,
    num_experts=128, num_experts_per_tok=8, max_position_embeddings=131072, rope_theta=10_000.0, rms_norm_eps=1e-5,
)


def glm4_moe_hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None) -> dict:
    """:func:`glm4_moe` kwargs from a config.json (defaults as transformers' ``Glm4MoeConfig``).

    Raises:
        ValueError: an option that cannot be reproduced (rope scaling, unknown keys, ...), naming it.
    """
    r = HFConfigReader(config, "glm4_moe", aliases={"n_routed_experts": "num_experts", "num_local_experts": "num_experts"})
    kwargs = r.decoder(_DEFAULTS, max_seq_len, rope=False)
    rope = r.rope_parameters(_DEFAULTS["rope_theta"])
    # transformers' Glm4MoeConfig defaults partial_rotary_factor to 0.5 when config.json has none.
    if "partial_rotary_factor" not in config and "partial_rotary_factor" not in (
        r.raw("rope_parameters") or r.raw("rope_scaling") or {}
    ):
        rope["partial_rotary_factor"] = 0.5
    if rope.pop("rope_type") != "default" or set(rope) != {"rope_theta", "partial_rotary_factor"}:
        r.refuse("rope_parameters", "only unscaled RoPE (rope_theta, partial_rotary_factor) is supported")
    first_k = r.get_int("first_k_dense_replace", 1, minimum=0)
    if first_k >= kwargs["num_layers"]:
        r.refuse("first_k_dense_replace", f"must be below num_hidden_layers ({kwargs['num_layers']}): no MoE layer")
    n_group = r.get_int("n_group", 1)
    if kwargs["num_experts"] % n_group:
        r.refuse("n_group", f"must divide n_routed_experts ({kwargs['num_experts']})")
    # The multi-token-prediction module (layer num_hidden_layers of the checkpoint) is not built, as in transformers.
    r.ignore("num_nextn_predict_layers", "num_mtp_layers")
    kwargs.update(
        rope_base=rope["rope_theta"],
        partial_rotary_factor=rope["partial_rotary_factor"],
        dense_hidden_dim=r.get_int("intermediate_size", 10944),
        moe_hidden_dim=r.get_int("moe_intermediate_size", 1408),
        num_shared_experts=r.get_int("n_shared_experts", 1, minimum=0),
        num_dense_layers=first_k,
        norm_topk_prob=r.get_bool("norm_topk_prob", True),
        route_scale=r.get_float("routed_scaling_factor", 1.0),
        num_expert_groups=n_group,
        num_limited_groups=r.get_int("topk_group", 1),
        qk_norm=r.get_bool("use_qk_norm", False),
        attn_bias=r.get_bool("attention_bias", False),
    )
    r.finish()
    return kwargs
