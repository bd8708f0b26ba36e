"""Mixtral ``config.json`` -> :func:`~torchtune_moe.models.mixtral.mixtral` arguments."""

from typing import Optional

from torchtune_moe.models._hf_config import HFConfigReader
from torchtune_moe.models._utils import check_sliding_window, hf_aux_loss_coeff

__all__ = ["mixtral_hf_config_to_kwargs"]

# transformers' MixtralConfig defaults, for keys a config.json leaves out (num_key_value_heads None: the heads).
_DEFAULTS = dict(
    vocab_size=32000, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None, hidden_size=4096,
    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096 * 32, rope_theta=1_000_000.0,
    rms_norm_eps=1e-5,
)


def mixtral_hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None) -> dict:
    """:func:`mixtral` kwargs from a config.json (defaults as transformers' ``MixtralConfig``).

    Raises:
        ValueError: an option that cannot be reproduced (router jitter noise, rope scaling, a sliding window
            shorter than ``max_seq_len``, unknown keys, ...), naming it.
    """
    r = HFConfigReader(config, "mixtral", aliases={"num_experts": "num_local_experts"})
    kwargs = r.decoder(_DEFAULTS, max_seq_len)
    window = r.raw("sliding_window")
    if window is not None:
        window = r.get_int("sliding_window")
    check_sliding_window("mixtral", window, kwargs["max_seq_len"])
    if r.get_float("router_jitter_noise", 0.0) != 0.0:
        r.refuse("router_jitter_noise", "multiplicative router input noise in training is not reproduced; set it to 0")
    kwargs.update(
        moe_hidden_dim=r.get_int("intermediate_size", 14336),
        aux_loss_coeff=hf_aux_loss_coeff(
            r.get_float("router_aux_loss_coef", 0.001), kwargs["experts_per_token"], kwargs["num_layers"]
        ),
    )
    r.finish()
    return kwargs
