"""Hub key names <-> ours, shared by the families: the one helper that splits and stacks per-expert weights.

Each family's ``_convert_weights.py`` writes its key map out in full (:class:`HFKeyMap`: a ``_FROM_HF`` dict of
Hub key -> our key, ``{}`` standing for the layer index, as torchtune's ``qwen2/_convert_weights.py``) plus
the names of one expert's three Hub tensors. The stacked experts of a layer (ours:
``experts.gate_up_proj`` [E, 2H, D], ``experts.down_proj`` [E, D, H]) are the only tensors that are not one to
one: :func:`expert_pieces` splits them into E x 3 Hub tensors and :func:`hf_layout` stacks them back.

A :class:`HFLayout` says where each of our tensors lives in the Hub format. It is derived either from our
names and shapes (a model, even on the meta device, or a state dict: :func:`tune_layout`) or from the Hub
names and shapes (a checkpoint's safetensors headers or a Hub state dict: :func:`hf_layout`); comparing the
two (:func:`check_hf_tensors`) lists every missing, unexpected and mis-shaped tensor before any data is read.
Router state the Hub format has no slot for (``expert_bias``, Expert Threshold ``thresholds``) is "extra
state" (:func:`is_extra_state_key`), saved beside the Hub files by ``torchtune_moe.training``.
"""

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = [
    "HFKeyMap",
    "HFLayout",
    "expert_pieces",
    "tune_layout",
    "hf_layout",
    "check_hf_tensors",
    "check_tune_state_dict",
    "is_extra_state_key",
    "router_state_of_moe_layer",
    "TRANSPOSED",
    "take",
    "hf_to_tune",
    "tune_to_hf",
]

_MAX_LISTED = 40  # keys listed per category in a bad-checkpoint message

Index = tuple  # index into our tensor: () whole, (e,) one expert, (e, slice) part of one expert, or TRANSPOSED

#: The index of a Hub tensor that is our whole tensor with its last two dims swapped (GPT-OSS stores its stacked
#: experts in x out: ``gate_up_proj`` [E, D, 2H] for our [E, 2H, D]).
TRANSPOSED = ("transposed",)


def take(tensor: torch.Tensor, index: Index) -> torch.Tensor:
    """The part of our ``tensor`` that one Hub tensor holds (a view): ``tensor[index]``, or its transpose."""
    return tensor.transpose(-2, -1) if index == TRANSPOSED else tensor[index]


@dataclass(frozen=True)
class HFKeyMap:
    """A family's Hub key names.

    Attributes:
        from_hf (dict[str, str]): Hub key -> our key for every one-to-one tensor; ``{}`` is the layer index.
        experts (tuple[str, str, str]): Hub keys of expert ``e``'s gate, up and down projections of layer ``i``,
            as ``str.format(i, e)`` templates.
        tied (bool): the output projection is the token embedding (a Hub ``lm_head.weight`` is ignored).
        num_layers (Optional[int]): Hub keys of layers at or past this index are ignored on load (DeepSeek-V3 and
            GLM-4.5 publish their multi-token-prediction module as layer ``num_hidden_layers``, which
            transformers ignores too); None: no such layers.
        transposed (frozenset[str]): our keys (``{}``: layer index) of ``from_hf`` whose Hub tensor is ours with
            the last two dims swapped (:data:`TRANSPOSED`: GPT-OSS's stacked experts).
    """

    from_hf: dict[str, str]
    experts: tuple[str, str, str]
    tied: bool = False
    num_layers: Optional[int] = None
    transposed: frozenset = frozenset()
    to_hf: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "to_hf", {ours: hf for hf, ours in self.from_hf.items()})
        if len(self.to_hf) != len(self.from_hf):
            raise ValueError("HFKeyMap.from_hf maps two Hub keys to one of ours")

    def ignores(self, hf_key: str) -> bool:
        """Hub keys accepted on load and dropped: RoPE buffers, a tied model's ``lm_head.weight``, layers past
        ``num_layers``."""
        if hf_key.endswith("rotary_emb.inv_freq") or (self.tied and hf_key == "lm_head.weight"):
            return True
        m = _LAYER_RE.fullmatch(hf_key)
        return self.num_layers is not None and m is not None and int(m[2]) >= self.num_layers


@dataclass
class HFLayout:
    """Where each of our tensors lives in the Hub format.

    Attributes:
        shapes (dict[str, tuple]): our state-dict keys (Hub-mapped and extra state) and shapes.
        pieces (dict[str, list[tuple[str, tuple]]]): our key -> [(Hub key, index into our tensor)].
        hf_keys (dict[str, tuple[str, tuple, tuple]]): Hub key -> (our key, index, Hub shape).
        extra_keys (list[str]): our keys with no Hub slot (router state).
        ignored_hf_keys (list[str]): Hub keys accepted on load and dropped (``lm_head.weight`` of a tied model).
        ignores (Optional[Callable[[str], bool]]): all Hub keys accepted on load and dropped
            (:meth:`HFKeyMap.ignores`).
    """

    shapes: dict[str, tuple]
    pieces: dict[str, list[tuple[str, tuple]]]
    hf_keys: dict[str, tuple[str, tuple, tuple]]
    extra_keys: list[str]
    ignored_hf_keys: list[str]
    ignores: Optional[Callable[[str], bool]] = None


_LAYER_RE = re.compile(r"(.*?layers)\.(\d+)\.(.+)")
_EXPERT_RE = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_EXTRA_RE = re.compile(r"layers\.\d+\.mlp\.router\.(?!gate\.).+")


def is_extra_state_key(key: str) -> bool:
    """True for state of ours the Hub format has no slot for (router buffers such as ``expert_bias``)."""
    return _EXTRA_RE.fullmatch(key) is not None


def _abstract(key: str) -> tuple[str, str]:
    """``model.layers.3.x`` -> (``model.layers.{}.x``, ``"3"``); keys outside layers -> (key, "")."""
    m = _LAYER_RE.fullmatch(key)
    return (f"{m[1]}.{{}}.{m[3]}", m[2]) if m else (key, "")


def expert_pieces(layer: int, name: str, shape: tuple, key_map: HFKeyMap) -> list[tuple[str, Index]]:
    """The Hub tensors of one of our stacked expert tensors: ``gate_up_proj`` [E, 2H, D] is E gate and E up
    projections ([H, D] each), ``down_proj`` [E, D, H] is E down projections."""
    gate, up, down = key_map.experts
    if name == "down_proj":
        return [(down.format(layer, e), (e,)) for e in range(shape[0])]
    E, H2, _ = shape
    H = H2 // 2
    return [
        piece
        for e in range(E)
        for piece in ((gate.format(layer, e), (e, slice(0, H))), (up.format(layer, e), (e, slice(H, H2))))
    ]


def _piece_shape(shape: tuple, index: Index) -> tuple:
    return tuple(take(torch.empty(shape, device="meta"), index).shape)


def _whole(template: str, key_map: HFKeyMap) -> Index:
    """The index of a one-to-one Hub tensor: the whole of ours, or its transpose."""
    return TRANSPOSED if template in key_map.transposed else ()


def _layout(shapes: dict[str, tuple], pieces: dict, extra: list[str], ignored: list[str], key_map: HFKeyMap) -> HFLayout:
    hf_keys = {hf: (key, index, _piece_shape(shapes[key], index)) for key, ps in pieces.items() for hf, index in ps}
    return HFLayout(
        shapes=shapes, pieces=pieces, hf_keys=hf_keys, extra_keys=extra, ignored_hf_keys=ignored,
        ignores=key_map.ignores,
    )


def tune_layout(shapes: dict[str, tuple], key_map: HFKeyMap) -> HFLayout:
    """The layout of our state dict (names -> shapes, e.g. of a model on the meta device).

    Raises:
        RuntimeError: a key of ours with no Hub name (a parameter this converter does not know).
    """
    pieces, extra = {}, []
    for key, shape in shapes.items():
        template, layer = _abstract(key)
        if template in key_map.to_hf:  # router state may have a Hub slot (e_score_correction_bias)
            pieces[key] = [(key_map.to_hf[template].format(layer), _whole(template, key_map))]
        elif is_extra_state_key(key):
            extra.append(key)
        elif m := _EXPERT_RE.fullmatch(key):
            pieces[key] = expert_pieces(int(m[1]), m[2], shape, key_map)
        else:
            template, layer = _abstract(key)
            if template not in key_map.to_hf:
                raise RuntimeError(f"{key} has no Hugging Face name (a parameter this converter does not know)")
            pieces[key] = [(key_map.to_hf[template].format(layer), ())]
    ignored = ["lm_head.weight"] if key_map.tied else []
    return _layout(dict(shapes), pieces, extra, ignored, key_map)


def hf_layout(hf_shapes: dict[str, tuple], key_map: HFKeyMap) -> tuple[HFLayout, list[str]]:
    """The layout of a Hub checkpoint (Hub names -> shapes, e.g. from the safetensors headers), stacking each
    layer's experts. Returns the layout and the Hub keys it could not place (unknown names, or an expert set
    that is incomplete or unevenly shaped), for the caller to report."""
    experts_re = [re.compile(re.escape(t).replace(r"\{\}", r"(\d+)")) for t in key_map.experts]
    pieces: dict[str, list] = {}
    shapes: dict[str, tuple] = {}
    by_layer: dict[int, dict[int, dict[int, tuple]]] = {}  # layer -> expert -> which (0 gate, 1 up, 2 down) -> shape
    bad, ignored = [], []
    for hf_key, shape in hf_shapes.items():
        if key_map.ignores(hf_key):
            ignored.append(hf_key)
            continue
        for which, pattern in enumerate(experts_re):
            if m := pattern.fullmatch(hf_key):
                by_layer.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[which] = tuple(shape)
                break
        else:
            template, layer = _abstract(hf_key)
            if template in key_map.from_hf:
                ours = key_map.from_hf[template]
                key = ours.format(layer)
                index = _whole(ours, key_map)
                pieces[key] = [(hf_key, index)]
                shapes[key] = tuple(shape) if index == () else (*shape[:-2], shape[-1], shape[-2])
            else:
                bad.append(hf_key)
    for layer, experts in sorted(by_layer.items()):
        E = max(experts) + 1
        gate_shapes = {experts[e].get(0) for e in experts} | {experts[e].get(1) for e in experts}
        down_shapes = {experts[e].get(2) for e in experts}
        if len(experts) != E or len(gate_shapes) != 1 or len(down_shapes) != 1 or None in gate_shapes | down_shapes:
            bad += [key_map.experts[w].format(layer, e) for e in experts for w in experts[e]]
            continue
        (H, D), down_shape = gate_shapes.pop(), down_shapes.pop()
        if down_shape != (D, H):
            bad += [key_map.experts[2].format(layer, e) for e in experts]
            continue
        for name, shape in (("gate_up_proj", (E, 2 * H, D)), ("down_proj", (E, D, H))):
            key = f"layers.{layer}.mlp.experts.{name}"
            shapes[key] = shape
            pieces[key] = expert_pieces(layer, name, shape, key_map)
    return _layout(shapes, pieces, [], ignored, key_map), sorted(bad)


def _listing(title: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return f"\n  {title} ({len(keys)}): {shown}{more}"


def check_hf_tensors(layout: HFLayout, found: dict[str, tuple], where: str) -> None:
    """Compares Hub tensors (name -> shape) with the layout our model needs; raises listing every problem."""
    missing = sorted(k for k in layout.hf_keys if k not in found)
    unexpected = sorted(
        k for k in found
        if k not in layout.hf_keys and k not in layout.ignored_hf_keys and not k.endswith("rotary_emb.inv_freq")
        and not (layout.ignores is not None and layout.ignores(k))
    )
    misshaped = sorted(
        f"{k} {list(found[k])} (expected {list(layout.hf_keys[k][2])})"
        for k in found
        if k in layout.hf_keys and tuple(found[k]) != layout.hf_keys[k][2]
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


def router_state_of_moe_layer(key: str, shapes: dict[str, tuple]) -> bool:
    """An extra-state key whose layer has a router in ``shapes`` (the router options may differ)."""
    return is_extra_state_key(key) and f"{key.split('.mlp.router.')[0]}.mlp.router.gate.weight" in shapes


def check_tune_state_dict(state_dict: dict[str, torch.Tensor], layout: HFLayout, what: str) -> None:
    """Compares our state dict with a layout (router extra state of its MoE layers allowed); raises listing."""
    missing = sorted(k for k in layout.pieces if k not in state_dict)
    unexpected = sorted(
        k for k in state_dict if k not in layout.pieces and not router_state_of_moe_layer(k, layout.shapes)
    )
    misshaped = sorted(
        f"{k} {list(v.shape)} (expected {list(layout.shapes[k])})"
        for k, v in state_dict.items()
        if k in layout.pieces and tuple(v.shape) != layout.shapes[k]
    )
    if missing or unexpected or misshaped:
        msg = f"the state dict does not match {what}:"
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if keys:
                msg += _listing(title, keys)
        raise ValueError(msg)


def hf_to_tune(state_dict: dict[str, torch.Tensor], key_map: HFKeyMap) -> dict[str, torch.Tensor]:
    """Hub state dict -> ours (experts stacked into new tensors, the rest as given). Raises listing keys it
    cannot place."""
    layout, bad = hf_layout({k: tuple(v.shape) for k, v in state_dict.items()}, key_map)
    if bad:
        raise ValueError("the Hub state dict has tensors with no place in the model:" + _listing("unexpected", bad))
    out: dict[str, torch.Tensor] = {}
    for key, pieces in layout.pieces.items():
        if pieces == [(pieces[0][0], ())]:
            out[key] = state_dict[pieces[0][0]]
            continue
        out[key] = torch.empty(layout.shapes[key], dtype=state_dict[pieces[0][0]].dtype)
        for hf_key, index in pieces:
            take(out[key], index).copy_(state_dict[hf_key])
    return out


def tune_to_hf(state_dict: dict[str, torch.Tensor], key_map: HFKeyMap) -> dict[str, torch.Tensor]:
    """Our state dict -> Hub names (per-expert tensors are views); router extra state is left out."""
    layout = tune_layout({k: tuple(v.shape) for k, v in state_dict.items()}, key_map)
    return {hf_key: take(state_dict[key], index) for key, pieces in layout.pieces.items() for hf_key, index in pieces}
