"""Hugging Face checkpoints of MoE families: config.json translation, key layout, streaming safetensors I/O.

One layout serves every direction. It is derived from the parameter names and shapes of the model that the
checkpoint's config.json describes (built on the meta device, no memory), so a parameter of ours that has no
Hub key fails loudly instead of being dropped, and every Hub key is checked by name and shape (from the
safetensors headers, before any tensor is read) when loading:

- ``tok_embeddings``, ``norm``, ``output``, attention and dense FFN weights map one to one;
- the stacked experts of a layer (``experts.gate_up_proj`` [E, 2H, D], ``experts.down_proj`` [E, D, H]) map to
  E x 3 per-expert Hub tensors (``experts.N.gate_proj/up_proj/down_proj`` or Mixtral's ``w1/w3/w2``);
- router state the Hub format has no slot for (aux-loss-free ``expert_bias``, Expert Threshold ``thresholds``)
  is "extra state": kept in :data:`EXTRA_STATE_FILE` beside the Hub files.

Families register in :func:`hf_families`; each provides ``config_to_kwargs`` (config.json -> builder kwargs,
refusing what it cannot reproduce) and its Hub names.
"""

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn
from torchtune import training
from torchtune.modules import TransformerDecoder
from torchtune.utils import get_logger

from torchtune_moe.modules import Router

log = get_logger("INFO")

__all__ = [
    "EXTRA_STATE_FILE",
    "HFFamily",
    "hf_families",
    "detect_family",
    "read_hf_config",
    "build_from_hf_config",
    "from_hf_pretrained",
    "HFLayout",
    "hf_layout",
    "hf_aux_loss_coeff",
    "hf_moe_layer_ids",
    "is_extra_state_key",
    "convert_hf_to_tune",
    "convert_tune_to_hf",
]

#: File written beside the Hub files for state the Hub format has no slot for (router buffers).
EXTRA_STATE_FILE = "torchtune_moe_extra_state.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"

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

# torch dtype <-> safetensors dtype name.
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}

_MAX_LISTED = 40  # keys listed per category in a bad-checkpoint message


# --------------------------------------------------------------------------------------------------------
# Families and config.json
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFFamily:
    """A Hub model family this package reproduces.

    Attributes:
        model_type (str): config.json ``model_type``.
        architectures (tuple[str, ...]): config.json ``architectures`` names of the family.
        builder (Callable): component builder taking the kwargs of ``config_to_kwargs``.
        config_to_kwargs (Callable): ``(config: dict, max_seq_len: Optional[int]) -> dict`` builder kwargs;
            raises ValueError for anything it cannot reproduce exactly.
        moe_prefix (str): Hub module name of the MoE block inside a layer (``mlp`` or ``block_sparse_moe``).
        expert_names (tuple[str, str, str]): Hub names of each expert's gate, up and down projections.
    """

    model_type: str
    architectures: tuple[str, ...]
    builder: Callable[..., TransformerDecoder]
    config_to_kwargs: Callable[..., dict]
    moe_prefix: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


def hf_families() -> dict[str, HFFamily]:
    """The supported families by ``model_type``."""
    from torchtune_moe.models.mixtral._convert_weights import HF_FAMILY as mixtral
    from torchtune_moe.models.olmoe._convert_weights import HF_FAMILY as olmoe
    from torchtune_moe.models.qwen2_moe._convert_weights import HF_FAMILY as qwen2_moe
    from torchtune_moe.models.qwen3_moe._convert_weights import HF_FAMILY as qwen3_moe

    return {f.model_type: f for f in (mixtral, qwen2_moe, qwen3_moe, olmoe)}


def _supported_text() -> str:
    return ", ".join(f"{a} (model_type {f.model_type!r})" for f in hf_families().values() for a in f.architectures)


def detect_family(config: dict) -> HFFamily:
    """The family of a config.json (by ``architectures``, else ``model_type``).

    Raises:
        ValueError: unsupported or contradictory ``architectures``/``model_type``, naming the supported ones.
    """
    families = hf_families()
    by_arch = {a: f for f in families.values() for a in f.architectures}
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    model_type = config.get("model_type")
    found = [by_arch[a] for a in archs if a in by_arch]
    if archs and not found:
        raise ValueError(
            f"config.json architectures {archs} (model_type {model_type!r}) is not supported; supported: "
            f"{_supported_text()}"
        )
    family = found[0] if found else families.get(model_type)
    if family is None:
        raise ValueError(
            f"config.json has model_type {model_type!r} and no supported architectures; supported: {_supported_text()}"
        )
    if model_type is not None and model_type != family.model_type:
        raise ValueError(
            f"config.json architectures {archs} belong to model_type {family.model_type!r} but model_type is "
            f"{model_type!r}"
        )
    return family


def read_hf_config(checkpoint_dir: Union[str, Path]) -> dict:
    """Reads ``checkpoint_dir/config.json``."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: checkpoint_dir must be a Hugging Face model directory")
    with open(path) as f:
        return json.load(f)


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

    def rope_theta(self, default_theta: float) -> float:
        """RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling`` (older files);
        only the default (unscaled, full-width) RoPE is supported."""
        params = self.raw("rope_parameters") or self.raw("rope_scaling") or {}
        if not isinstance(params, dict):
            self.refuse("rope_parameters", "expected a dict")
        params = dict(params)
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        if rope_type != "default":
            raise ValueError(
                f"{self.family} config.json rope type {rope_type!r} (rope_parameters/rope_scaling) is not supported: "
                "only the default RoPE is (remove the scaling to fine-tune at the pretraining context length)"
            )
        theta = params.pop("rope_theta", None)
        if theta is None:
            theta = self.get_float("rope_theta", default_theta)
        else:
            self.used.add("rope_theta")
        partial = params.pop("partial_rotary_factor", None)
        if partial is None:
            partial = self.raw("partial_rotary_factor", 1.0)
        if partial != 1.0:
            self.refuse("partial_rotary_factor", "only RoPE over the full head dim (1.0) is supported")
        if params:
            raise ValueError(
                f"{self.family} config.json rope_parameters holds {sorted(params)}, which are not supported "
                "(only rope_type 'default' and rope_theta)"
            )
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            self.refuse("rope_theta", "must be a number > 0")
        return float(theta)

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


def hf_aux_loss_coeff(router_aux_loss_coef: float, experts_per_token: int, num_moe_layers: int) -> float:
    """Our per-layer ``aux_loss_coeff`` that matches transformers' ``router_aux_loss_coef`` in effect.

    transformers adds ``router_aux_loss_coef * load_balancing_loss_func(all MoE layers' router logits)``; that
    function pools the L MoE layers' tokens and counts top-K assignments, so it is K at uniform routing and
    about the *mean* over layers. Ours is ``sum over layers of coeff * load_balancing_loss`` with 1.0 at uniform
    routing. Equal scale therefore needs ``coeff = router_aux_loss_coef * K / L`` (exactly equal for one MoE
    layer; with several, transformers pools the load fractions over layers, a small difference).
    """
    return router_aux_loss_coef * experts_per_token / num_moe_layers


def hf_moe_layer_ids(num_layers: int, mlp_only_layers: Iterable[int], decoder_sparse_step: int) -> list[int]:
    """MoE layers as Qwen2-MoE/Qwen3-MoE choose them: not in ``mlp_only_layers`` and ``(i+1) % step == 0``."""
    if decoder_sparse_step < 1:
        raise ValueError(f"decoder_sparse_step must be >= 1, got {decoder_sparse_step}")
    dense = set(mlp_only_layers)
    bad = sorted(i for i in dense if not (isinstance(i, int) and 0 <= i < num_layers))
    if bad:
        raise ValueError(f"mlp_only_layers holds indices outside 0..{num_layers - 1}: {bad}")
    ids = [i for i in range(num_layers) if i not in dense and (i + 1) % decoder_sparse_step == 0]
    if not ids:
        raise ValueError(
            f"no MoE layer: mlp_only_layers={sorted(dense)} and decoder_sparse_step={decoder_sparse_step} make all "
            f"{num_layers} layers dense (use a dense model recipe for that)"
        )
    return ids


def router_kwargs(norm_topk_prob: bool, moe_kwargs: dict) -> dict:
    """``norm_topk_prob`` applies to the token-choice router the Hub families use; another router chosen in
    ``moe_kwargs`` (e.g. ``router="causal_expert_choice"``) does not take it."""
    if moe_kwargs.get("router", "token_choice") == "token_choice":
        return {"norm_topk_prob": norm_topk_prob, **moe_kwargs}
    return dict(moe_kwargs)


def set_padding_idx(model: TransformerDecoder, pad_token_id: Optional[int]) -> None:
    """Gives the token embedding ``padding_idx`` as transformers does (no gradient for the pad row)."""
    if pad_token_id is not None:
        vocab_size = model.tok_embeddings.num_embeddings
        if not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id must be in 0..{vocab_size - 1}, got {pad_token_id}")
        model.tok_embeddings.padding_idx = pad_token_id


def check_sliding_window(family: str, window: Optional[int], max_seq_len: int) -> None:
    """Sliding-window attention equals full causal attention for sequences of at most ``window`` tokens (a
    token attends to itself and the ``window - 1`` before it); longer sequences are refused."""
    if window is not None and max_seq_len > window:
        raise ValueError(
            f"{family} config.json enables sliding-window attention (window {window}) and max_seq_len is "
            f"{max_seq_len}: this package has full causal attention only, which is the same for sequences of at "
            f"most {window} tokens. Pass max_seq_len <= {window}."
        )


# --------------------------------------------------------------------------------------------------------
# Building from config.json
# --------------------------------------------------------------------------------------------------------

# Builder kwargs a caller may set on top of config.json: sequence length and training-only options.
_TRAINING_OPTIONS = frozenset(
    {
        "aux_loss_coeff", "z_loss_coeff", "seq_aux_loss_coeff", "router", "expert_bias_update_rate",
        "capacity_factor", "max_experts_per_token", "threshold_ema_decay", "attn_dropout",
    }
)


def hf_config_to_kwargs(config: dict, max_seq_len: Optional[int] = None, **overrides) -> tuple[HFFamily, dict]:
    """The family and builder kwargs of a config.json, with training options from ``overrides``.

    Raises:
        ValueError: unsupported family or option, or an override that would change the architecture.
    """
    family = detect_family(config)
    kwargs = family.config_to_kwargs(config, max_seq_len=max_seq_len)
    fixed = sorted(k for k in overrides if k not in _TRAINING_OPTIONS)
    if fixed:
        raise ValueError(
            f"{fixed} cannot be overridden: the architecture comes from config.json. Allowed: max_seq_len and "
            f"{sorted(_TRAINING_OPTIONS)}"
        )
    kwargs.update(overrides)
    return family, kwargs


def build_from_hf_config(
    config: dict,
    *,
    device: Union[str, torch.device] = "meta",
    dtype: torch.dtype = torch.float32,
    max_seq_len: Optional[int] = None,
    **overrides,
) -> TransformerDecoder:
    """Builds the model a config.json describes, uninitialised unless ``device`` is a real device.

    On ``"meta"`` (default) it costs no memory: use it for names and shapes.
    """
    family, kwargs = hf_config_to_kwargs(config, max_seq_len=max_seq_len, **overrides)
    with training.set_default_dtype(dtype), torch.device(device):
        return family.builder(**kwargs)


def _reset_buffers(model: nn.Module, device: torch.device) -> None:
    """After ``to_empty``: recompute RoPE caches and zero router statistics (all router buffers start at 0)."""
    handled = set()
    with torch.device(device):
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
                handled.update(id(b) for b in module.buffers(recurse=False))
            elif isinstance(module, Router):
                for b in module.buffers(recurse=False):
                    b.zero_()
                    handled.add(id(b))
    unknown = [n for n, b in model.named_buffers() if id(b) not in handled]
    if unknown:  # a new kind of buffer: refuse rather than leave uninitialised memory in the model
        raise RuntimeError(f"from_hf_pretrained does not know how to initialise buffers {unknown}")


def from_hf_pretrained(
    checkpoint_dir: Union[str, Path],
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    max_seq_len: Optional[int] = None,
    **overrides,
) -> TransformerDecoder:
    """Loads a Hugging Face MoE checkpoint (config.json + sharded safetensors) as a torchtune model.

    The family comes from config.json (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE); each tensor is streamed from the
    safetensors files straight into the model's parameters (the model is allocated once, uninitialised, no
    extra copy). Router state saved beside the weights (:data:`EXTRA_STATE_FILE`) is loaded too.

    Args:
        checkpoint_dir (str | Path): directory with config.json and ``model.safetensors.index.json`` (or one
            ``model.safetensors``).
        dtype (Optional[torch.dtype]): parameter dtype; None = config.json ``dtype``/``torch_dtype``, else fp32.
        device (str | torch.device): where the model is allocated.
        max_seq_len (Optional[int]): RoPE cache length and longest sequence; default config.json
            ``max_position_embeddings``.
        **overrides: training options (``aux_loss_coeff``, ``z_loss_coeff``, ``seq_aux_loss_coeff``, ``router``,
            ``expert_bias_update_rate``, ...). By default ``aux_loss_coeff`` reproduces config.json's
            ``router_aux_loss_coef`` (see :func:`hf_aux_loss_coeff`).

    Returns:
        TransformerDecoder: in eval mode (as transformers returns models); call ``.train()`` to fine-tune.

    Raises:
        ValueError: unsupported architecture or option; missing, unexpected or mis-shaped tensors (listed).
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = read_hf_config(checkpoint_dir)
    if dtype is None:
        name = config.get("dtype") or config.get("torch_dtype") or "float32"
        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"config.json dtype {name!r} is not a floating-point torch dtype; pass dtype=")
    device = torch.device(device)
    model = build_from_hf_config(config, device="meta", dtype=dtype, max_seq_len=max_seq_len, **overrides)
    layout = hf_layout(model, detect_family(config))
    files = _checkpoint_files(checkpoint_dir)
    _check_hf_tensors(layout, _read_headers(files), where=str(checkpoint_dir))
    extra = _read_extra_state(checkpoint_dir, layout, strict=True)
    model.to_empty(device=device)
    _reset_buffers(model, device)
    dest = model.state_dict(keep_vars=True)
    with torch.no_grad():
        _stream_hf_tensors(files, layout, lambda key: dest[key])
        for key, value in extra.items():
            dest[key].copy_(value)
    return model.eval()


# --------------------------------------------------------------------------------------------------------
# Key layout
# --------------------------------------------------------------------------------------------------------

_Index = tuple  # index into our tensor: () whole, (e,) one expert, (e, slice) part of one expert


@dataclass
class HFLayout:
    """Where each of our tensors lives in the Hub format.

    Attributes:
        shapes (dict[str, tuple]): our state-dict keys (Hub-mapped and extra state) and shapes.
        pieces (dict[str, list[tuple[str, tuple]]]): our key -> [(Hub key, index into our tensor)].
        hf_keys (dict[str, tuple[str, tuple, tuple]]): Hub key -> (our key, index, Hub shape).
        extra_keys (list[str]): our keys with no Hub slot (router state), saved in :data:`EXTRA_STATE_FILE`.
        ignored_hf_keys (list[str]): Hub keys accepted on load and dropped (``lm_head.weight`` of a tied model).
    """

    shapes: dict[str, tuple]
    pieces: dict[str, list[tuple[str, tuple]]]
    hf_keys: dict[str, tuple[str, tuple, tuple]]
    extra_keys: list[str]
    ignored_hf_keys: list[str]


_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
_EXTRA_RE = re.compile(r"layers\.\d+\.mlp\.router\.(?!gate\.).+")
_FFN_NAMES = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}  # torchtune FeedForward w1/w2/w3


def is_extra_state_key(key: str) -> bool:
    """True for state of ours the Hub format has no slot for (router buffers such as ``expert_bias``)."""
    return _EXTRA_RE.fullmatch(key) is not None


def _hf_pieces(key: str, shape: tuple, family: HFFamily) -> list[tuple[str, tuple]]:
    if key == "tok_embeddings.weight":
        return [("model.embed_tokens.weight", ())]
    if key == "norm.scale":
        return [("model.norm.weight", ())]
    if key == "output.weight":
        return [("lm_head.weight", ())]
    m = _LAYER_RE.fullmatch(key)
    if m:
        i, rest = m.groups()
        p = f"model.layers.{i}."
        moe = p + family.moe_prefix
        gate, up, down = family.expert_names
        simple = {"sa_norm.scale": "input_layernorm.weight", "mlp_norm.scale": "post_attention_layernorm.weight",
                  "mlp.router.gate.weight": f"{family.moe_prefix}.gate.weight",
                  "mlp.shared_expert_gate.weight": "mlp.shared_expert_gate.weight"}
        if rest in simple:
            return [(p + simple[rest], ())]
        if r := re.fullmatch(r"attn\.([qkv])_proj(?:\.proj)?\.(weight|bias)", rest):
            return [(p + f"self_attn.{r[1]}_proj.{r[2]}", ())]
        if r := re.fullmatch(r"attn\.([qk])_proj\.norm\.scale", rest):
            return [(p + f"self_attn.{r[1]}_norm.weight", ())]
        if r := re.fullmatch(r"attn\.output_proj\.(weight|bias)", rest):
            return [(p + f"self_attn.o_proj.{r[1]}", ())]
        if r := re.fullmatch(r"mlp\.(shared_expert\.)?w([123])\.weight", rest):
            return [(p + f"mlp.{r[1] or ''}{_FFN_NAMES[r[2]]}.weight", ())]
        if rest == "mlp.experts.gate_up_proj":
            E, H2, _ = shape
            H = H2 // 2
            return [
                piece
                for e in range(E)
                for piece in (
                    (f"{moe}.experts.{e}.{gate}.weight", (e, slice(0, H))),
                    (f"{moe}.experts.{e}.{up}.weight", (e, slice(H, H2))),
                )
            ]
        if rest == "mlp.experts.down_proj":
            return [(f"{moe}.experts.{e}.{down}.weight", (e,)) for e in range(shape[0])]
    raise RuntimeError(f"{key} has no Hugging Face {family.model_type} name (a parameter this converter does not know)")


def _piece_shape(shape: tuple, index: _Index) -> tuple:
    return tuple(torch.empty(shape, device="meta")[index].shape)


def hf_layout(model: nn.Module, family: HFFamily) -> HFLayout:
    """The layout of ``model`` (any device, meta included) in ``family``'s Hub format."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    pieces, hf_keys, extra = {}, {}, []
    for key, shape in shapes.items():
        if is_extra_state_key(key):
            extra.append(key)
            continue
        pieces[key] = _hf_pieces(key, shape, family)
        for hf_key, index in pieces[key]:
            hf_keys[hf_key] = (key, index, _piece_shape(shape, index))
    ignored = ["lm_head.weight"] if "output.weight" not in shapes else []
    return HFLayout(shapes=shapes, pieces=pieces, hf_keys=hf_keys, extra_keys=extra, ignored_hf_keys=ignored)


def _listing(title: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return f"\n  {title} ({len(keys)}): {shown}{more}"


def _check_hf_tensors(layout: HFLayout, found: dict[str, tuple[tuple, str]], where: str) -> None:
    """Compares Hub tensors (name -> (shape, dtype)) with the layout; raises listing every problem."""
    missing = sorted(k for k in layout.hf_keys if k not in found)
    unexpected = sorted(
        k for k in found
        if k not in layout.hf_keys and k not in layout.ignored_hf_keys and not k.endswith("rotary_emb.inv_freq")
    )
    misshaped = sorted(
        f"{k} {list(found[k][0])} (expected {list(layout.hf_keys[k][2])})"
        for k in found
        if k in layout.hf_keys and tuple(found[k][0]) != layout.hf_keys[k][2]
    )
    if missing or unexpected or misshaped:
        msg = f"checkpoint {where} does not match its config.json:"
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if keys:
                msg += _listing(title, keys)
        if any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in unexpected):
            msg += (
                "\n  (stacked experts.gate_up_proj / experts.down_proj are transformers 5's in-memory layout, written "
                "by save_pretrained(..., save_original_format=False); save with the default to get the published "
                "per-expert keys)"
            )
        raise ValueError(msg)


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------


def _checkpoint_files(checkpoint_dir: Path) -> dict[str, list[str]]:
    """safetensors file -> the tensor names it should hold (from the index, or all names of a single file)."""
    index_path = checkpoint_dir / _INDEX_FILE
    if index_path.is_file():
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(str(checkpoint_dir / file), []).append(name)
        absent = sorted(f for f in files if not os.path.isfile(f))
        if absent:
            raise ValueError(f"{index_path} names files that do not exist: {absent}")
        return files
    single = checkpoint_dir / _SINGLE_FILE
    if single.is_file():
        return {str(single): []}
    present = sorted(p.name for p in checkpoint_dir.iterdir()) if checkpoint_dir.is_dir() else []
    raise ValueError(
        f"{checkpoint_dir} has neither {_INDEX_FILE} nor {_SINGLE_FILE} (found {present}); only safetensors "
        "checkpoints are supported (pytorch_model.bin files are not)"
    )


def _read_headers(files: dict[str, list[str]]) -> dict[str, tuple[tuple, str]]:
    """Tensor name -> (shape, safetensors dtype), from the file headers only."""
    from safetensors import safe_open

    found: dict[str, tuple[tuple, str]] = {}
    for path, names in files.items():
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            listed_absent = sorted(set(names) - keys)
            if listed_absent:
                raise ValueError(f"{path} lacks tensors its index assigns to it: {listed_absent[:_MAX_LISTED]}")
            for name in keys:
                if names and name not in names:
                    continue  # the index assigns this name to another file
                s = f.get_slice(name)
                found[name] = (tuple(s.get_shape()), s.get_dtype())
    return found


def _stream_hf_tensors(
    files: dict[str, list[str]], layout: HFLayout, dest: Callable[[str], torch.Tensor]
) -> None:
    """Copies every Hub tensor into ``dest(our_key)[index]``, one tensor at a time."""
    from safetensors import safe_open

    for path, names in files.items():
        with safe_open(path, framework="pt") as f:
            for name in names or list(f.keys()):
                if name not in layout.hf_keys:
                    continue  # ignored (checked before)
                our_key, index, _ = layout.hf_keys[name]
                dest(our_key)[index].copy_(f.get_tensor(name))


def _router_state_of_moe_layer(key: str, layout: HFLayout) -> bool:
    """An extra-state key whose layer has a router in ``layout`` (the router options may differ)."""
    return is_extra_state_key(key) and f"{key.split('.mlp.router.')[0]}.mlp.router.gate.weight" in layout.shapes


def _read_extra_state(checkpoint_dir: Path, layout: HFLayout, strict: bool) -> dict[str, torch.Tensor]:
    """Router state saved beside the Hub files. ``strict``: the model of ``layout`` must have each tensor
    (same router options); else any router state of an MoE layer is returned, for the caller's model to take."""
    path = checkpoint_dir / EXTRA_STATE_FILE
    if not path.is_file():
        if layout.extra_keys:
            log.info(
                f"{checkpoint_dir} has no {EXTRA_STATE_FILE}: router state {layout.extra_keys[:4]}... starts from "
                "its initial value"
            )
        return {}
    from safetensors.torch import load_file

    extra = load_file(str(path))
    if not strict:
        bad = sorted(k for k in extra if not _router_state_of_moe_layer(k, layout))
        if bad:
            raise ValueError(f"{path} holds tensors that are not router state of an MoE layer: {bad[:_MAX_LISTED]}")
        return extra
    unexpected = sorted(k for k in extra if k not in layout.extra_keys)
    if unexpected:
        raise ValueError(
            f"{path} holds router state {unexpected[:_MAX_LISTED]} that the model does not have. It was trained with "
            "other router options: pass them (e.g. expert_bias_update_rate=... for expert_bias, "
            "router='causal_expert_choice' for thresholds)"
        )
    misshaped = sorted(k for k, v in extra.items() if tuple(v.shape) != layout.shapes[k])
    if misshaped:
        raise ValueError(f"{path} has wrongly shaped tensors: {misshaped}")
    missing = sorted(k for k in layout.extra_keys if k not in extra)
    if missing:
        log.info(f"{path} lacks router state {missing[:4]}...: it starts from its initial value")
    return extra


def load_hf_state_dict(checkpoint_dir: Union[str, Path], layout: HFLayout) -> dict[str, torch.Tensor]:
    """Reads a Hub checkpoint as a state dict in our key names (tensors in the stored dtype), checked against
    ``layout`` first; includes the extra state when present."""
    checkpoint_dir = Path(checkpoint_dir)
    files = _checkpoint_files(checkpoint_dir)
    headers = _read_headers(files)
    _check_hf_tensors(layout, headers, where=str(checkpoint_dir))
    state: dict[str, torch.Tensor] = {}
    for key, pieces in layout.pieces.items():
        dtype = _TORCH_DTYPES.get(headers[pieces[0][0]][1])
        if dtype is None:
            raise ValueError(f"{pieces[0][0]} has dtype {headers[pieces[0][0]][1]}, which torch cannot hold")
        state[key] = torch.empty(layout.shapes[key], dtype=dtype)
    with torch.no_grad():
        _stream_hf_tensors(files, layout, lambda key: state[key])
    state.update(_read_extra_state(checkpoint_dir, layout, strict=False))
    return state


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def _write_safetensors(path: Path, tensors: list[tuple[str, Callable[[], torch.Tensor], tuple, torch.dtype]]) -> None:
    """Writes a safetensors file one tensor at a time: ``(name, get_tensor, shape, dtype)`` entries.

    Written by hand because safetensors' ``save_file`` needs every tensor of a file in memory at once (and a
    contiguous copy of each expert slice): streaming keeps the extra memory of saving a 30B+ model to one
    expert matrix. The format: 8-byte little-endian header size, JSON header (names, dtypes, shapes, byte
    ranges, ``__metadata__``), then the raw little-endian data in header order.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, _, shape, dtype in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name, get, shape, dtype in tensors:
            t = get().detach().to("cpu", dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{name}: shape {tuple(t.shape)} changed while saving (expected {shape})")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def _check_state_dict(state_dict: dict[str, torch.Tensor], layout: HFLayout) -> None:
    missing = sorted(k for k in layout.pieces if k not in state_dict)
    unexpected = sorted(
        k for k in state_dict if k not in layout.pieces and not _router_state_of_moe_layer(k, layout)
    )
    misshaped = sorted(
        f"{k} {list(v.shape)} (expected {list(layout.shapes[k])})"
        for k, v in state_dict.items()
        if k in layout.shapes and tuple(v.shape) != layout.shapes[k]
    )
    if missing or unexpected or misshaped:
        msg = "the state dict does not match the checkpoint's config.json:"
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if keys:
                msg += _listing(title, keys)
        raise ValueError(msg)


def save_hf_state_dict(
    state_dict: dict[str, torch.Tensor], layout: HFLayout, save_dir: Union[str, Path], max_shard_size: int
) -> list[str]:
    """Writes ``state_dict`` (our key names) into ``save_dir`` in the Hub format: per-expert tensors in shards
    of at most ``max_shard_size`` bytes (one tensor larger than that gets a shard of its own) with
    ``model.safetensors.index.json``, and the extra state in :data:`EXTRA_STATE_FILE`.

    Returns:
        list[str]: the files written.
    """
    if max_shard_size < 1:
        raise ValueError(f"max_shard_size must be >= 1 byte, got {max_shard_size}")
    _check_state_dict(state_dict, layout)
    save_dir = Path(save_dir)
    entries = []  # (hf_key, getter, shape, dtype)
    for key, pieces in layout.pieces.items():
        tensor = state_dict[key]
        for hf_key, index in pieces:
            entries.append((hf_key, (lambda t=tensor, i=index: t[i]), layout.hf_keys[hf_key][2], tensor.dtype))
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[2]) * entry[3].itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    weight_map, written, total = {}, [], 0
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(save_dir / name, shard)
        written.append(name)
        for hf_key, _, shape, dtype in shard:
            weight_map[hf_key] = name
            total += math.prod(shape) * dtype.itemsize
    with open(save_dir / _INDEX_FILE, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    written.append(_INDEX_FILE)
    extra = {k: v for k, v in state_dict.items() if k not in layout.pieces}  # router state (checked above)
    if extra:
        from safetensors.torch import save_file

        save_file({k: v.detach().to("cpu").contiguous() for k, v in extra.items()}, str(save_dir / EXTRA_STATE_FILE))
        written.append(EXTRA_STATE_FILE)
        log.warning(
            f"{len(extra)} router tensors ({', '.join(sorted(extra)[:3])}, ...) have no slot in the Hugging Face "
            f"format: saved beside it in {EXTRA_STATE_FILE}. torchtune_moe loads them back; transformers and vLLM "
            "ignore them and route without them."
        )
    return written


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def copy_hf_side_files(src_dir: Union[str, Path], dst_dir: Union[str, Path]) -> list[str]:
    """Copies config.json, tokenizer, generation and other non-weight files of a Hub directory (top level)."""
    copied = []
    for path in sorted(Path(src_dir).iterdir()):
        name = path.name
        if (
            not path.is_file()
            or name.startswith(".")
            or name.endswith(_WEIGHT_SUFFIXES)
            or name in (_INDEX_FILE, "pytorch_model.bin.index.json")
        ):
            continue
        shutil.copy2(path, Path(dst_dir) / name)
        copied.append(name)
    return copied


# --------------------------------------------------------------------------------------------------------
# In-memory conversion (torchtune's convert_weights style; small models and tests)
# --------------------------------------------------------------------------------------------------------


def convert_hf_to_tune(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Hub state dict -> ours, for the model config.json describes. Raises listing bad keys."""
    family = detect_family(config)
    layout = hf_layout(build_from_hf_config(config), family)
    _check_hf_tensors(layout, {k: (tuple(v.shape), "") for k, v in state_dict.items()}, where="state_dict")
    out: dict[str, torch.Tensor] = {}
    for key, pieces in layout.pieces.items():
        first = state_dict[pieces[0][0]]
        out[key] = torch.empty(layout.shapes[key], dtype=first.dtype)
        for hf_key, index in pieces:
            out[key][index].copy_(state_dict[hf_key])
    return out


def convert_tune_to_hf(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Our state dict -> Hub names (per-expert tensors are views); extra state is left out."""
    family = detect_family(config)
    layout = hf_layout(build_from_hf_config(config), family)
    _check_state_dict(state_dict, layout)
    return {hf_key: state_dict[key][index] for key, pieces in layout.pieces.items() for hf_key, index in pieces}
