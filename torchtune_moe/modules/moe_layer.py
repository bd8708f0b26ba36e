"""The MoE feed-forward layer: router + routed experts (+ shared experts), and model-level helpers."""

import dataclasses
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from torchtune_moe.modules.losses import load_balancing_loss, router_z_loss, sequence_balance_loss
from torchtune_moe.modules.dispatch import _copy_to_host, _kept_prefix, dispatch_combine  # noqa: F401 (re-exported)
from torchtune_moe.modules.moe_linear import MoELinear
from torchtune_moe.modules.routers import Router, RouterOutput, _in_backward_recompute

__all__ = ["MoE", "collect_aux_loss", "update_routers", "moe_layers", "dispatch_combine"]


def _detached(routing: RouterOutput) -> RouterOutput:
    return dataclasses.replace(
        routing,
        **{
            f.name: getattr(routing, f.name).detach()
            for f in dataclasses.fields(routing)
            if isinstance(getattr(routing, f.name), torch.Tensor)
        },
    )


def _without_aux_losses(state: dict) -> dict:
    """``state`` (a layer's ``__dict__`` or a copy of it) with no aux losses of a forward kept."""
    state.update(aux_losses={}, aux_loss=None, balance_stats=None)
    return state


class MoE(nn.Module):
    """Mixture-of-Experts feed-forward layer: ``[B, S, D] -> [B, S, D]``.

    ``out = sum_k w_k * expert_k(x) + shared(x) * sigmoid(shared_gate(x))`` (the shared term only when a
    shared expert is given; the gate only when ``shared_expert_gate`` is given, as Qwen2-MoE has).

    In training mode the layer also computes its auxiliary losses (those with a non-zero coefficient) and
    keeps them in ``aux_losses`` (unweighted, by name) and ``aux_loss`` (coefficient-weighted sum);
    :func:`collect_aux_loss` sums ``aux_loss`` over a model. Every forward keeps the expert load in
    ``tokens_per_expert`` ([E], for logging) and the routing in ``last_routing``.

    Args:
        experts (MoELinear): routed experts.
        router (nn.Module): a :class:`~torchtune_moe.modules.Router` or any module mapping ``x_TD`` to a
            :class:`~torchtune_moe.modules.RouterOutput`.
        shared_expert (Optional[nn.Module]): dense FFN applied to every token.
        shared_expert_gate (Optional[nn.Module]): ``D -> 1`` linear whose sigmoid scales the shared expert.
        aux_loss_coeff (float): load-balancing loss coefficient (0 = off).
        aux_loss_pooled (bool): leave the load-balancing loss to :func:`collect_aux_loss`, which pools the
            statistics of all such layers (transformers' form); the layer keeps them in ``balance_stats``.
        z_loss_coeff (float): router z-loss coefficient (0 = off).
        seq_aux_loss_coeff (float): sequence-wise balance loss coefficient (0 = off).
    """

    def __init__(
        self,
        *,
        experts: MoELinear,
        router: nn.Module,
        shared_expert: Optional[nn.Module] = None,
        shared_expert_gate: Optional[nn.Module] = None,
        aux_loss_coeff: float = 0.0,
        aux_loss_pooled: bool = False,
        z_loss_coeff: float = 0.0,
        seq_aux_loss_coeff: float = 0.0,
    ):
        super().__init__()
        for name, value in (
            ("aux_loss_coeff", aux_loss_coeff),
            ("z_loss_coeff", z_loss_coeff),
            ("seq_aux_loss_coeff", seq_aux_loss_coeff),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if shared_expert_gate is not None and shared_expert is None:
            raise ValueError("shared_expert_gate needs a shared_expert")
        self.experts = experts
        self.router = router
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.num_experts = experts.num_experts
        self.aux_loss_coeff = aux_loss_coeff
        self.aux_loss_pooled = aux_loss_pooled
        self.z_loss_coeff = z_loss_coeff
        self.seq_aux_loss_coeff = seq_aux_loss_coeff
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.aux_loss: Optional[torch.Tensor] = None
        # aux_loss_pooled: (sum over tokens of the router probabilities [E], assignments per expert [E], tokens).
        self.balance_stats: Optional[tuple[torch.Tensor, torch.Tensor, int]] = None
        self.tokens_per_expert: Optional[torch.Tensor] = None
        self.last_routing: Optional[RouterOutput] = None
        # Installed by capture_routing / replay_routing (torchtune_moe.modules.routing_replay), else None.
        self._routing_hook = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): [B, S, D]

        Returns:
            torch.Tensor: [B, S, D]
        """
        B, S, D = x.shape
        x_TD = x.reshape(B * S, D)
        hook = self._routing_hook
        routing = self.router(x_TD) if hook is None else hook(self, x_TD)
        # dispatch -> experts -> combine: MoELinear.forward, through __call__ (FSDP2 gathers the experts there)
        out_TD, tokens_per_expert_E = self.experts(x_TD, routing)
        if self.shared_expert is not None:
            shared_TD = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = shared_TD * torch.sigmoid(self.shared_expert_gate(x_TD))
            out_TD = out_TD + shared_TD
        aux_losses, aux_loss = self._compute_aux_losses(routing, tokens_per_expert_E, B, S)
        pooled = self.aux_loss_pooled and "load_balancing" in aux_losses
        if not _in_backward_recompute():
            # Activation checkpointing re-runs this forward inside backward: the graph (aux losses included) is
            # rebuilt, but the layer keeps the first forward's values (else it would keep the recompute's graph
            # alive until the next forward).
            self.tokens_per_expert = tokens_per_expert_E.detach()
            self.last_routing = _detached(routing)
            self.aux_losses, self.aux_loss = aux_losses, aux_loss
            self.balance_stats = (routing.probs_TE.float().sum(0), tokens_per_expert_E, B * S) if pooled else None
        return out_TD.view(B, S, D)

    def _compute_aux_losses(
        self, routing: RouterOutput, tokens_per_expert_E: torch.Tensor, B: int, S: int
    ) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """Returns the unweighted aux losses by name and their coefficient-weighted sum (None when none)."""
        aux_losses: dict[str, torch.Tensor] = {}
        if not (self.training and torch.is_grad_enabled()):
            return aux_losses, None
        total = None
        for name, coeff, fn in (
            ("load_balancing", self.aux_loss_coeff, lambda: load_balancing_loss(routing.probs_TE, tokens_per_expert_E)),
            ("z_loss", self.z_loss_coeff, lambda: router_z_loss(routing.logits_TE)),
            (
                "seq_balance",
                self.seq_aux_loss_coeff,
                lambda: sequence_balance_loss(
                    routing.probs_TE.view(B, S, -1), routing.token_ids_A, routing.expert_ids_A
                ),
            ),
        ):
            if coeff > 0:
                value = fn()
                if name == "load_balancing" and self.aux_loss_pooled:
                    aux_losses[name] = value.detach()  # logged; collect_aux_loss adds the pooled form
                    continue
                aux_losses[name] = value
                total = coeff * value if total is None else total + coeff * value
        return aux_losses, total

    def clear_aux_losses(self) -> None:
        """Drops the aux losses of the latest forward, which keep its autograd graph until the next forward.

        Call it on every MoE layer before dropping a model sharded with FSDP2 in a process that goes on: FSDP2's
        hooks on that graph refer back to the model, and autograd holds them where Python's garbage collector
        cannot see, so the model (and its GPU memory) is otherwise never freed.
        """
        _without_aux_losses(self.__dict__)

    def __getstate__(self) -> dict:
        # copy.deepcopy (and pickle) cannot copy that graph either: copies of the layer start without it.
        return _without_aux_losses(super().__getstate__())

    @torch.no_grad()
    def routing_stats(self) -> dict[str, torch.Tensor]:
        """Load statistics of the latest forward: ``tokens_per_expert`` [E], ``dropped_tokens`` (tokens no
        expert computed), ``router_entropy`` (mean entropy of the router probabilities, nats)."""
        if self.last_routing is None:
            raise RuntimeError("routing_stats() needs a forward first")
        r = self.last_routing
        T = r.probs_TE.shape[0]
        valid_A = r.expert_ids_A < self.num_experts
        routed_T = torch.zeros(T, device=r.probs_TE.device).index_add_(0, r.token_ids_A, valid_A.float())
        p = r.probs_TE.float()
        entropy = -(p * p.clamp(min=1e-20).log()).sum(-1).mean()
        return {
            "tokens_per_expert": self.tokens_per_expert,
            "dropped_tokens": (routed_T == 0).sum(),
            "router_entropy": entropy,
        }


def moe_layers(model: nn.Module) -> Iterator[tuple[str, MoE]]:
    """Yields ``(name, layer)`` for each MoE layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            yield name, module


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """Coefficient-weighted sum of the auxiliary losses of all MoE layers from the latest forward.

    A scalar tensor that backpropagates into the routers; 0 when no layer computed an aux loss (eval mode,
    all coefficients 0, or no MoE layer). Call it once per forward and add it to the loss.

    Layers built with ``aux_loss_pooled=True`` contribute one load-balancing loss computed from their pooled
    statistics, as transformers' ``load_balancing_loss_func`` does: ``E * sum_i f_i * P_i`` with ``f_i`` the
    share of all L layers' assignments that went to expert i and ``P_i`` the mean probability of expert i over
    all L layers' tokens, weighted by the sum of the L coefficients (so uniform routing gives the same total as
    L per-layer losses, and with ``coeff = router_aux_loss_coef * K / L`` it equals transformers'
    ``router_aux_loss_coef * aux_loss`` exactly).
    """
    total = None
    device = None
    pooled: list[tuple[float, torch.Tensor, torch.Tensor, int]] = []
    for _, layer in moe_layers(model):
        if layer.aux_loss is not None:
            total = layer.aux_loss if total is None else total + layer.aux_loss
        if layer.balance_stats is not None:
            pooled.append((layer.aux_loss_coeff, *layer.balance_stats))
        if device is None and layer.tokens_per_expert is not None:
            device = layer.tokens_per_expert.device
    if pooled:
        sizes = {p.shape[0] for _, p, _, _ in pooled}
        if len(sizes) != 1:
            raise ValueError(f"aux_loss_pooled pools layers of one expert count; the model has {sorted(sizes)}")
        coeff = sum(c for c, _, _, _ in pooled)
        probs_sum_E = torch.stack([p for _, p, _, _ in pooled]).sum(0)
        counts_E = torch.stack([n for _, _, n, _ in pooled]).sum(0).float()
        num_tokens = sum(t for _, _, _, t in pooled)  # L * T: the pooled mean probability
        E = probs_sum_E.shape[0]
        loss = E * ((counts_E / counts_E.sum().clamp(min=1.0)) * (probs_sum_E / num_tokens)).sum()
        total = coeff * loss if total is None else total + coeff * loss
    if total is None:
        return torch.zeros((), device=device)
    return total


def update_routers(model: nn.Module, process_group: Optional[dist.ProcessGroup] = None) -> None:
    """Applies the load statistics every router accumulated since the last call (aux-loss-free expert bias,
    expert thresholds), reduced over ``process_group`` when distributed. Call once per optimizer step."""
    for module in model.modules():
        if isinstance(module, Router):
            module.update(process_group)
