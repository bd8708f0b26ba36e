"""Reading a Hugging Face ``config.json`` into builder arguments: the part every family shares.

Each family's ``_hf_config.py`` translates its config.json keys with :class:`HFConfigReader` (defaults and
type checks as transformers', unknown keys refused); :class:`HFFamily` bundles what the loaders need to know
about a family. Nothing here reads files (``torchtune_moe.training`` does) or imports a family.
"""

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._convert_weights import HFKeyMap, hf_to_tune, tune_to_hf

__all__ = ["HFConfigReader", "HFFamily", "TRAINING_OPTIONS", "apply_training_options"]

# config.json keys that describe no part of the network (bookkeeping, generation, inference switches).
_BOOKKEEPING_KEYS = frozenset(
    {
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
        "use_cache", "initializer_range", "output_router_logits", "bos_token_id", "eos_token_id",
        "chunk_size_feed_forward", "id2label", "label2id", "is_encoder_decoder", "output_attentions",
        "output_hidden_states", "problem_type", "return_dict", "torchscript", "tokenizer_class", "prefix",
        "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task",
        "max_length", "min_length", "do_sample", "num_beams", "temperature", "top_k", "top_p",
        "repetition_penalty", "length_penalty", "num_return_sequences", "no_repeat_ngram_size",
    }
)

# Hub activation names -> MoELinear / FeedForward activation names (same functions as transformers' ACT2FN).
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "relu": "relu"}


class HFConfigReader:
    """Reads config.json values with the family's defaults and type checks, and refuses unknown keys.

    ``None`` in config.json means "the default", as in transformers. Every key must be read, ignored
    explicitly or be bookkeeping (``_BOOKKEEPING_KEYS``); :meth:`finish` raises for the rest, so an option this
    package does not reproduce cannot pass unnoticed.

    Args:
        config (dict): config.json.
        family (str): name used in messages.
        aliases (dict[str, str]): alternative key -> canonical key (transformers' ``attribute_map``).
    """

    def __init__(self, config: dict, family: str, aliases: Optional[dict[str, str]] = None):
        self.family = family
        self.config = dict(config)
        for alias, key in (aliases or {}).items():
            if alias in self.config:
                value = self.config.pop(alias)
                if key in self.config and self.config[key] is not None and self.config[key] != value:
                    raise ValueError(f"{family} config.json sets both {key}={self.config[key]} and {alias}={value}")
                self.config[key] = value
        self.used: set[str] = set()

    def raw(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        value = self.config.get(key)
        return default if value is None else value

    def get_int(self, key: str, default: Any = None, minimum: int = 1) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{self.family} config.json {key} must be an integer >= {minimum}, got {value!r}")
        return value

    def get_float(self, key: str, default: Any = None) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.family} config.json {key} must be a number, got {value!r}")
        return float(value)

    def get_bool(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"{self.family} config.json {key} must be true or false, got {value!r}")
        return value

    def ignore(self, *keys: str) -> None:
        """Marks keys that do not change the network (documented where called)."""
        self.used.update(keys)

    def refuse(self, key: str, reason: str) -> None:
        raise ValueError(f"{self.family} config.json {key}={self.config.get(key)!r} is not supported: {reason}")

    def activation(self) -> str:
        act = self.raw("hidden_act", "silu")
        if act not in _ACTIVATIONS:
            self.refuse("hidden_act", f"supported activations are {sorted(_ACTIVATIONS)}")
        return _ACTIVATIONS[act]

    def rope_parameters(self, default_theta: float) -> dict:
        """The RoPE settings of ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``/
        ``partial_rotary_factor`` (older files), merged: ``rope_type`` (``"default"`` when unscaled),
        ``rope_theta``, ``partial_rotary_factor`` (1.0 when absent) and the scaling keys as given. The caller
        checks what it supports (:meth:`rope_theta` supports the default, full-width RoPE only)."""
        params = self.raw("rope_parameters") or self.raw("rope_scaling") or {}
        if not isinstance(params, dict):
            self.refuse("rope_parameters", "expected a dict")
        params = dict(params)
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        theta = params.pop("rope_theta", None)
        if theta is None:
            theta = self.get_float("rope_theta", default_theta)
        else:
            self.used.add("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            self.refuse("rope_theta", "must be a number > 0")
        partial = params.pop("partial_rotary_factor", None)
        if partial is None:
            partial = self.raw("partial_rotary_factor", 1.0)
        if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
            self.refuse("partial_rotary_factor", "must be a number in (0, 1]")
        return {"rope_type": rope_type, "rope_theta": float(theta), "partial_rotary_factor": float(partial), **params}

    def rope_theta(self, default_theta: float) -> float:
        """RoPE base (:meth:`rope_parameters`); only the default (unscaled, full-width) RoPE is supported."""
        params = self.rope_parameters(default_theta)
        rope_type = params.pop("rope_type")
        if rope_type != "default":
            raise ValueError(
                f"{self.family} config.json rope type {rope_type!r} (rope_parameters/rope_scaling) is not supported: "
                "only the default RoPE is (remove the scaling to fine-tune at the pretraining context length)"
            )
        theta = params.pop("rope_theta")
        if params.pop("partial_rotary_factor") != 1.0:
            self.refuse("partial_rotary_factor", "only RoPE over the full head dim (1.0) is supported")
        if params:
            raise ValueError(
                f"{self.family} config.json rope_parameters holds {sorted(params)}, which are not supported "
                "(only rope_type 'default' and rope_theta)"
            )
        return theta

    def decoder(self, defaults: dict[str, Any], max_seq_len: Optional[int] = None, rope: bool = True) -> dict:
        """The builder kwargs every family reads the same way, with the family's transformers defaults.

        Args:
            defaults (dict): config.json key -> transformers' default for ``vocab_size``, ``num_hidden_layers``,
                ``num_attention_heads``, ``num_key_value_heads`` (None: ``num_attention_heads``), ``hidden_size``,
                ``num_experts`` (the family's canonical experts key), ``num_experts_per_tok``,
                ``max_position_embeddings``, ``rope_theta``, ``rms_norm_eps``.
            max_seq_len (Optional[int]): overrides ``max_position_embeddings``.
            rope (bool): read ``rope_base`` with :meth:`rope_theta` (default RoPE only); False leaves the RoPE
                keys to the family (:meth:`rope_parameters`) and ``rope_base`` out.

        Returns:
            dict: ``vocab_size``, ``num_layers``, ``num_heads``, ``num_kv_heads``, ``embed_dim``, ``head_dim``,
            ``num_experts``, ``experts_per_token``, ``max_seq_len``, ``rope_base``, ``norm_eps``,
            ``attn_dropout``, ``tie_word_embeddings``, ``activation``, ``pad_token_id``.
        """
        num_heads = self.get_int("num_attention_heads", defaults["num_attention_heads"])
        embed_dim = self.get_int("hidden_size", defaults["hidden_size"])
        experts_key = "num_local_experts" if "num_local_experts" in defaults else "num_experts"
        kv_default = defaults["num_key_value_heads"]
        kwargs = dict(
            vocab_size=self.get_int("vocab_size", defaults["vocab_size"]),
            num_layers=self.get_int("num_hidden_layers", defaults["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=self.get_int("num_key_value_heads", num_heads if kv_default is None else kv_default),
            embed_dim=embed_dim,
            head_dim=self.get_int("head_dim", embed_dim // num_heads),
            num_experts=self.get_int(experts_key, defaults[experts_key]),
            experts_per_token=self.get_int("num_experts_per_tok", defaults["num_experts_per_tok"]),
            max_seq_len=max_seq_len or self.get_int("max_position_embeddings", defaults["max_position_embeddings"]),
            rope_base=self.rope_theta(default_theta=defaults["rope_theta"]) if rope else None,
            norm_eps=self.get_float("rms_norm_eps", defaults["rms_norm_eps"]),
            attn_dropout=self.get_float("attention_dropout", 0.0),
            tie_word_embeddings=self.get_bool("tie_word_embeddings", False),
            activation=self.activation(),
            pad_token_id=self.raw("pad_token_id", defaults.get("pad_token_id")),
        )
        self.ignore("max_position_embeddings")
        if not rope:
            del kwargs["rope_base"]
        return kwargs

    def finish(self) -> None:
        """Raises ValueError for config.json keys nobody read."""
        if self.config.get("quantization_config") is not None:
            self.refuse("quantization_config", "quantised checkpoints cannot be fine-tuned here; use the bf16 weights")
        unknown = sorted(
            k for k in self.config if k not in self.used and k not in _BOOKKEEPING_KEYS and not k.startswith("_")
        )
        if unknown:
            raise ValueError(
                f"{self.family} config.json has keys this package does not know: {unknown}. They may change the "
                "architecture, so loading stops; if they are metadata only, remove them from config.json."
            )


@dataclass(frozen=True)
class HFFamily:
    """A Hub model family this package reproduces: what the loaders and converters need to know about it.

    Attributes:
        model_type (str): config.json ``model_type``.
        architectures (tuple[str, ...]): config.json ``architectures`` names of the family.
        builder (Callable): component builder taking the kwargs of ``config_to_kwargs``.
        config_to_kwargs (Callable): ``(config: dict, max_seq_len: Optional[int]) -> dict`` builder kwargs;
            raises ValueError for anything it cannot reproduce exactly.
        from_hf (dict[str, str]): the explicit key map, Hub key -> ours (``{}``: layer index), of the family's
            ``_convert_weights.py``.
        experts (tuple[str, str, str]): Hub keys of expert ``e``'s gate, up and down projections in layer ``i``
            (``str.format(i, e)`` templates).
        from_hf_for (Optional[Callable]): ``(builder kwargs) -> from_hf`` where an option changes our names
            (OLMoE's ``clip_qkv``); None: ``from_hf`` always.
        mtp_layers (bool): the Hub checkpoints hold multi-token-prediction layers after the last decoder layer
            (``model.layers.{num_hidden_layers}.*``: DeepSeek-V3, GLM-4.5), ignored on load as transformers does.
        transposed (frozenset[str]): our keys of ``from_hf`` stored transposed on the Hub (see
            :attr:`HFKeyMap.transposed`).
    """

    model_type: str
    architectures: tuple[str, ...]
    builder: Callable[..., TransformerDecoder]
    config_to_kwargs: Callable[..., dict]
    from_hf: dict[str, str]
    experts: tuple[str, str, str]
    from_hf_for: Optional[Callable[[dict], dict[str, str]]] = None
    mtp_layers: bool = False
    transposed: frozenset = frozenset()

    def key_map(self, kwargs: dict) -> HFKeyMap:
        """The Hub names of the model ``builder(**kwargs)`` builds."""
        from_hf = self.from_hf_for(kwargs) if self.from_hf_for is not None else self.from_hf
        return HFKeyMap(
            from_hf, self.experts, tied=kwargs.get("tie_word_embeddings", False),
            num_layers=kwargs["num_layers"] if self.mtp_layers else None, transposed=self.transposed,
        )

    def hf_to_tune(self, state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        """Hub state dict (per-expert keys) -> torchtune_moe state dict (stacked experts), for the model
        ``config`` (config.json) describes."""
        return hf_to_tune(state_dict, self.key_map(self.config_to_kwargs(config)))

    def tune_to_hf(self, state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        """torchtune_moe state dict -> Hub state dict (per-expert keys as published; views, router extra state
        left out), for the model ``config`` (config.json) describes."""
        return tune_to_hf(state_dict, self.key_map(self.config_to_kwargs(config)))


# Builder kwargs a caller may set on top of config.json: training-only options that leave the weights' names
# and shapes alone (max_seq_len is an argument of its own).
TRAINING_OPTIONS = frozenset(
    {
        "aux_loss_coeff", "aux_loss_pooled", "z_loss_coeff", "seq_aux_loss_coeff", "router",
        "expert_bias_update_rate", "capacity_factor", "max_experts_per_token", "threshold_ema_decay",
        "attn_dropout",
    }
)


def apply_training_options(kwargs: dict, options: dict, source: str = "config.json") -> dict:
    """``kwargs`` (from a config.json) updated with training ``options``.

    Raises:
        ValueError: an option that would change the architecture, naming it and the allowed ones.
    """
    fixed = sorted(k for k in options if k not in TRAINING_OPTIONS)
    if fixed:
        raise ValueError(
            f"{fixed} cannot be overridden: the architecture comes from {source}. Allowed: max_seq_len and "
            f"{sorted(TRAINING_OPTIONS)}"
        )
    return {**kwargs, **options}


def published_kwargs(
    config_to_kwargs: Callable[..., dict], config: dict, max_seq_len: Optional[int], options: dict
) -> dict:
    """Builder kwargs of a published size: its config.json values through the family's translation (the one
    path from config.json to a model), plus training ``options`` (:data:`TRAINING_OPTIONS`)."""
    return apply_training_options(config_to_kwargs(config, max_seq_len=max_seq_len), options, "the published size")
