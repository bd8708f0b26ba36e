"""Routing capture and replay: record which experts every MoE layer picked, and force them again later.

RL pipelines generate with an inference engine (vLLM returns the routed experts of every token) and train on
the same tokens; replaying the rollout's expert *selection* in the training forward removes the routing
mismatch between the two engines. The combine weights are recomputed from the current router scores, as
Megatron-LM's router replay does, so the router keeps getting gradients. Debugging uses the same tools to
freeze routing across steps.

::

    with capture_routing(model) as record:  # any forward(s): the latest one is kept
        model(tokens)
    arr_TLK = record.to_array()               # [tokens, MoE layers, top_k], vLLM's ``routed_experts`` layout
    ...
    with replay_routing(model, RoutingRecord.from_array(arr_TLK)):
        loss = loss_fn(model(tokens), labels)
        loss.backward()

Both context managers install a small hook on each :class:`~torchtune_moe.modules.MoE` layer (module order,
the order of :func:`~torchtune_moe.modules.moe_layers`) and remove it afterwards; outside them the layer pays
one ``None`` check. Nothing here syncs host and device after the checks at ``replay_routing`` entry.

Written here rather than reused: torchtune has no MoE, and Megatron-LM's / NeMo's router replay is tied to
their own router classes.
"""

import contextlib
import inspect
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from torchtune_moe.modules.moe_layer import MoE, moe_layers
from torchtune_moe.modules.routers import CausalExpertChoiceRouter, ExpertChoiceTopKRouter, _in_backward_recompute

__all__ = ["RoutingRecord", "capture_routing", "replay_routing"]

ArrayLike = Union[torch.Tensor, Sequence]  # a tensor, a numpy array or nested lists

# Routers whose assignments are not "K experts per token": nothing to capture or replay.
_NOT_TOKEN_CHOICE = (ExpertChoiceTopKRouter, CausalExpertChoiceRouter)


class RoutingRecord:
    """The experts each MoE layer selected for each token: one ``[T, K]`` int tensor per layer.

    Tokens are those of the flattened batch, ``T = B * S`` in row-major order (token ``b * S + s``); layers
    are the MoE layers of the model in module order (dense layers have no entry).

    Interchange with inference engines and datasets goes through :meth:`to_array` / :meth:`from_array`
    (``[T, L, K]``, the layout of vLLM's ``routed_experts``) and :meth:`from_batch` (per-sample arrays of a
    padded batch).

    Args:
        experts (Sequence[torch.Tensor]): L tensors ``[T, K]`` of expert ids (any integer dtype).
        weights (Optional[Sequence[torch.Tensor]]): L tensors ``[T, K]`` of combine weights (capture only;
            replay recomputes the weights from the current router).

    Attributes:
        experts (list): the L ``experts_TK`` tensors.
        weights (Optional[list]): the L ``weights_TK`` tensors, or None if not captured.

    Raises:
        ValueError: tensors that are not 2-D integer ``[T, K]`` of one shape for all layers.
    """

    def __init__(self, experts: Sequence[torch.Tensor], weights: Optional[Sequence[torch.Tensor]] = None):
        experts = list(experts)
        if not experts:
            raise ValueError("RoutingRecord needs experts for at least one layer, got an empty list")
        for i, e in enumerate(experts):
            if not isinstance(e, torch.Tensor) or e.dim() != 2 or e.dtype.is_floating_point or e.dtype == torch.bool:
                got = f"{tuple(e.shape)} {e.dtype}" if isinstance(e, torch.Tensor) else type(e).__name__
                raise ValueError(f"RoutingRecord experts[{i}] must be a 2-D integer tensor [tokens, top_k], got {got}")
            if e.shape != experts[0].shape:
                raise ValueError(
                    f"RoutingRecord experts must all have one shape [tokens, top_k]: experts[0] is "
                    f"{tuple(experts[0].shape)}, experts[{i}] is {tuple(e.shape)}"
                )
        if weights is not None:
            weights = list(weights)
            if len(weights) != len(experts) or any(w.shape != experts[0].shape for w in weights):
                raise ValueError(
                    f"RoutingRecord weights must be {len(experts)} tensors of shape {tuple(experts[0].shape)} "
                    f"like the experts, got {[tuple(w.shape) for w in weights]}"
                )
        self.experts: list = experts
        self.weights: Optional[list] = weights

    @classmethod
    def _empty(cls, num_layers: int, with_weights: bool) -> "RoutingRecord":
        """A record with a ``None`` slot per layer, filled by :func:`capture_routing`."""
        record = cls.__new__(cls)
        record.experts = [None] * num_layers
        record.weights = [None] * num_layers if with_weights else None
        return record

    def _filled(self) -> list:
        missing = [i for i, e in enumerate(self.experts) if e is None]
        if missing:
            raise RuntimeError(
                f"this RoutingRecord has no routing for MoE layers {missing}: run a forward of the model inside "
                f"capture_routing() before using the record"
            )
        return self.experts

    @property
    def num_layers(self) -> int:
        """L, the number of MoE layers."""
        return len(self.experts)

    @property
    def num_tokens(self) -> int:
        """T, the number of tokens (B * S of the captured batch)."""
        return self._filled()[0].shape[0]

    @property
    def top_k(self) -> int:
        """K, experts per token."""
        return self._filled()[0].shape[1]

    def to_array(self) -> torch.Tensor:
        """All layers in one tensor ``[T, L, K]`` (vLLM's ``routed_experts`` layout), on the records' device.

        For a batch of B sequences of S tokens, ``to_array().view(B, S, L, K)[b]`` is sample b's routing; store
        it with the sample, e.g. as ``arr.tolist()`` in a dataset column.
        """
        return torch.stack(self._filled(), dim=1)

    @classmethod
    def from_array(cls, arr_TLK: ArrayLike) -> "RoutingRecord":
        """Builds a record from one ``[T, L, K]`` integer array (tensor, numpy array or nested lists).

        Raises:
            ValueError: ``arr_TLK`` is not a 3-D integer array.
        """
        arr_TLK = _as_int_tensor(arr_TLK, "arr_TLK")
        if arr_TLK.dim() != 3 or arr_TLK.shape[1] == 0:
            raise ValueError(
                f"arr_TLK must be [num_tokens, num_layers >= 1, top_k], got shape {tuple(arr_TLK.shape)}"
            )
        return cls(list(arr_TLK.permute(1, 0, 2).contiguous().unbind(0)))

    @classmethod
    def from_batch(
        cls,
        arrays: Union[ArrayLike, Sequence[ArrayLike]],
        seq_len: Optional[int] = None,
        lengths: Optional[Sequence[int]] = None,
    ) -> "RoutingRecord":
        """Builds the record of a padded batch from per-sample routing.

        ``arrays`` is either one ``[B, S, L, K]`` array or B per-sample ``[S_b, L, K]`` arrays of any lengths
        (tensors, numpy arrays or nested lists: what a dataset column holds). Each sample is padded at the end to
        ``seq_len`` (default: the longest sample) and the record holds ``B * seq_len`` tokens in row-major order,
        matching ``tokens`` of shape ``[B, seq_len]``. Padding positions, and token rows holding a negative id
        (a padding marker), get the experts ``0..K-1``: any valid choice will do, as padding tokens are masked
        out of the loss and, the model being causal, do not change earlier positions.

        Args:
            arrays: ``[B, S, L, K]`` or B arrays ``[S_b, L, K]`` of expert ids.
            seq_len (Optional[int]): padded sequence length of the batch (``tokens.shape[1]``).
            lengths (Optional[Sequence[int]]): unpadded token count of each sample, to check the routing against:
                sample b must have routing for ``lengths[b]`` tokens, or ``lengths[b] - 1`` (an engine may leave
                out the last sampled token, which it never ran through the model; the missing row is padded).

        Raises:
            ValueError: samples of different L or K, a sample longer than ``seq_len`` or whose length does not
                match ``lengths`` (naming both sizes).
        """
        if isinstance(arrays, torch.Tensor) or (hasattr(arrays, "__array__") and getattr(arrays, "dtype", None) != object):
            arr = _as_int_tensor(arrays, "arrays")
            if arr.dim() == 4:
                samples = list(arr.unbind(0))
            elif arr.dim() == 3 and arr.shape[0] == 0:
                samples = []
            else:
                raise ValueError(f"arrays as one array must be [B, S, L, K], got shape {tuple(arr.shape)}")
        else:
            samples = [_as_int_tensor(a, f"arrays[{b}]") for b, a in enumerate(arrays)]
        if not samples:
            raise ValueError("from_batch needs at least one sample, got none")
        for b, a in enumerate(samples):
            if a.dim() != 3 or a.shape[1:] != samples[0].shape[1:]:
                raise ValueError(
                    f"every sample must be [S, L, K] with one L and K: sample 0 is {tuple(samples[0].shape)}, "
                    f"sample {b} is {tuple(a.shape)}"
                )
        L, K = samples[0].shape[1:]
        if lengths is not None:
            if len(lengths) != len(samples):
                raise ValueError(f"lengths has {len(lengths)} entries but arrays holds {len(samples)} samples")
            for b, (a, n) in enumerate(zip(samples, lengths)):
                if a.shape[0] not in (n, n - 1):
                    raise ValueError(
                        f"sample {b} has routing for {a.shape[0]} tokens but {n} tokens (lengths[{b}]); the routing "
                        f"must cover the sample's tokens (or all but the last)"
                    )
        longest = max(a.shape[0] for a in samples)
        if seq_len is None:
            seq_len = longest
        if longest > seq_len:
            b = max(range(len(samples)), key=lambda i: samples[i].shape[0])
            raise ValueError(f"sample {b} has routing for {longest} tokens, more than seq_len={seq_len}")
        filler_K = torch.arange(K, dtype=samples[0].dtype, device=samples[0].device)
        out_BSLK = filler_K.expand(len(samples), seq_len, L, K).clone()
        for b, a in enumerate(samples):
            out_BSLK[b, : a.shape[0]] = a
        padding_BSL1 = (out_BSLK < 0).any(dim=-1, keepdim=True)
        out_BSLK = torch.where(padding_BSL1, filler_K, out_BSLK)
        return cls.from_array(out_BSLK.reshape(len(samples) * seq_len, L, K))

    def __repr__(self) -> str:
        if any(e is None for e in self.experts):
            return f"RoutingRecord(num_layers={self.num_layers}, empty)"
        return (
            f"RoutingRecord(num_tokens={self.num_tokens}, num_layers={self.num_layers}, top_k={self.top_k}, "
            f"with_weights={self.weights is not None})"
        )


def _as_int_tensor(arr: ArrayLike, name: str) -> torch.Tensor:
    t = arr if isinstance(arr, torch.Tensor) else torch.as_tensor(arr)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer expert ids, got dtype {t.dtype}")
    return t


class _RoutingHook:
    """Per-layer state while capture or replay is active; called by ``MoE.forward`` as ``hook(layer, x_TD)``.

    ``forced_TK`` is the replayed routing (None: route freely); ``records`` the captures to fill, as
    (record, layer index) pairs. ``last_forced_TK`` is the routing that the latest forward (outside backward)
    used: an activation-checkpoint recompute during backward replays it, so it matches the first forward even
    when backward runs after ``replay_routing`` has exited. The hook then stays installed until the layer's
    next forward.
    """

    def __init__(self):
        self.forced_TK: Optional[torch.Tensor] = None
        self.last_forced_TK: Optional[torch.Tensor] = None
        self.records: list = []

    def idle(self) -> bool:
        return self.forced_TK is None and self.last_forced_TK is None and not self.records

    def __call__(self, layer: MoE, x_TD: torch.Tensor):
        recompute = _in_backward_recompute()
        forced_TK = self.last_forced_TK if recompute else self.forced_TK
        if forced_TK is not None and forced_TK.shape[0] != x_TD.shape[0]:
            raise ValueError(
                f"replay_routing: the record holds routing for {forced_TK.shape[0]} tokens but the forward has "
                f"{x_TD.shape[0]} tokens (batch size x sequence length); replay the record of this batch"
            )
        if not recompute:
            if forced_TK is not None and (forced_TK.device != x_TD.device or forced_TK.dtype != torch.long):
                forced_TK = self.forced_TK = forced_TK.to(device=x_TD.device, dtype=torch.long)
            self.last_forced_TK = forced_TK
        routing = layer.router(x_TD) if forced_TK is None else layer.router(x_TD, forced_experts_TK=forced_TK)
        if not recompute:
            if self.records:
                if routing.experts_TK is None:
                    raise ValueError(
                        f"capture_routing: {type(layer.router).__name__} returned no experts_TK (not K experts per "
                        f"token), so its routing cannot be captured"
                    )
                experts_TK = routing.experts_TK.detach()
                weights_TK = routing.weights_A.detach().reshape(experts_TK.shape)
                for record, i in self.records:
                    record.experts[i] = experts_TK
                    if record.weights is not None:
                        record.weights[i] = weights_TK
            if self.idle():
                layer._routing_hook = None
        return routing


def _layers(model: nn.Module, fn: str) -> list[MoE]:
    """The MoE layers of ``model`` in module order; raises for none or for routers without K experts per token."""
    layers = []
    for name, layer in moe_layers(model):
        layers.append(layer)
        router = layer.router
        if isinstance(router, _NOT_TOKEN_CHOICE) or (
            fn == "replay_routing" and "forced_experts_TK" not in inspect.signature(router.forward).parameters
        ):
            raise ValueError(
                f"{fn}: MoE layer {name!r} uses {type(router).__name__}, which does not pick a fixed K experts per "
                f"token and cannot capture or replay routing; routing capture/replay needs token-choice routers "
                f"(router='token_choice', TokenChoiceTopKRouter)"
            )
    if not layers:
        raise ValueError(f"{fn}: the model has no MoE layers")
    return layers


def _hook(layer: MoE) -> _RoutingHook:
    if layer._routing_hook is None:
        layer._routing_hook = _RoutingHook()
    return layer._routing_hook


def _release(layer: MoE, hook: _RoutingHook) -> None:
    if hook.idle() and layer._routing_hook is hook:
        layer._routing_hook = None


@contextlib.contextmanager
def capture_routing(model: nn.Module, *, with_weights: bool = False) -> Iterator[RoutingRecord]:
    """Records the experts every MoE layer of ``model`` selects in forwards run inside the context.

    Yields a :class:`RoutingRecord` whose ``experts[l]`` is ``[T, K]`` (``T = B * S``, row-major) for the l-th
    MoE layer, plus ``weights[l]`` (fp32 combine weights) when ``with_weights``. If several forwards run inside,
    **the latest forward wins** (each layer keeps the routing of its latest forward). Activation-checkpoint
    recomputes during backward are not recorded. Inside :func:`replay_routing` the forced experts are
    recorded. The tensors stay on the model's device and are detached.

    Args:
        model (nn.Module): a model holding :class:`~torchtune_moe.modules.MoE` layers.
        with_weights (bool): also record the combine weights.

    Raises:
        ValueError: the model has no MoE layer, or one uses a router that does not pick K experts per token
            (expert choice, causal expert choice).
    """
    layers = _layers(model, "capture_routing")
    record = RoutingRecord._empty(len(layers), with_weights)
    hooks = [_hook(layer) for layer in layers]
    for i, hook in enumerate(hooks):
        hook.records.append((record, i))
    try:
        yield record
    finally:
        for layer, hook in zip(layers, hooks):
            hook.records = [(r, i) for r, i in hook.records if r is not record]
            _release(layer, hook)


@contextlib.contextmanager
def replay_routing(model: nn.Module, record: RoutingRecord) -> Iterator[None]:
    """Forces the experts of ``record`` in every forward of ``model`` run inside the context.

    Each MoE layer passes ``record.experts[l]`` to its router as ``forced_experts_TK``; the combine weights are
    recomputed from the current router scores (Megatron-LM router replay semantics), so the router still gets
    gradients. Every forward inside must have ``B * S == record.num_tokens`` tokens. Activation-checkpoint
    recomputes during backward reuse the routing of the latest forward, even when backward runs after the
    context has exited; run each forward's backward before the next forward of the model (the usual
    forward/backward per micro-batch), as a recompute replays the latest forward's routing.

    Args:
        model (nn.Module): a model holding :class:`~torchtune_moe.modules.MoE` layers.
        record (RoutingRecord): routing for every MoE layer, e.g. from :func:`capture_routing` or
            :meth:`RoutingRecord.from_array`.

    Raises:
        ValueError: before any forward, when the record's layer count or top_k differs from the model's, it
            holds expert ids outside ``0..E-1`` or repeats an expert within a token, or a router cannot replay
            (expert choice, causal expert choice, a router without ``forced_experts_TK``); at a forward, when its
            token count differs from the record's. Each message names both sizes.
    """
    if not isinstance(record, RoutingRecord):
        raise ValueError(f"replay_routing: record must be a RoutingRecord, got {type(record).__name__}")
    layers = _layers(model, "replay_routing")
    experts = record._filled()
    if len(experts) != len(layers):
        raise ValueError(
            f"replay_routing: the record holds routing for {len(experts)} MoE layers but the model has "
            f"{len(layers)} MoE layers"
        )
    forced = []
    bad = []
    for i, (layer, e) in enumerate(zip(layers, experts)):
        k = getattr(layer.router, "experts_per_token", e.shape[1])
        if e.shape[1] != k:
            raise ValueError(
                f"replay_routing: the record holds top_k={e.shape[1]} experts per token but MoE layer {i} routes "
                f"top_k={k}"
            )
        if e.is_inference():  # captured under torch.inference_mode: such tensors cannot be saved for backward
            e = e.clone()
        forced.append(e)
        sorted_TK = e.sort(dim=-1).values
        bad.append(
            torch.stack([
                sorted_TK[:, 0].lt(0).any(),
                sorted_TK[:, -1].ge(layer.num_experts).any(),
                (sorted_TK[:, 1:] == sorted_TK[:, :-1]).any(),
            ])
        )
    # One host-device sync for all layers, before any forward.
    bad_L3 = torch.stack([b.to(bad[0].device) for b in bad]).tolist()
    for i, (out_of_range_low, out_of_range_high, repeated) in enumerate(bad_L3):
        if out_of_range_low or out_of_range_high:
            raise ValueError(
                f"replay_routing: the record's layer {i} holds expert ids outside 0..{layers[i].num_experts - 1} "
                f"(the layer has {layers[i].num_experts} experts)"
            )
        if repeated:
            raise ValueError(f"replay_routing: the record's layer {i} picks the same expert twice for a token")
    hooks = [_hook(layer) for layer in layers]
    previous = [hook.forced_TK for hook in hooks]
    for hook, e in zip(hooks, forced):
        hook.forced_TK = e
    try:
        yield
    finally:
        for layer, hook, p in zip(layers, hooks, previous):
            hook.forced_TK = p
            _release(layer, hook)
