"""MoE components: experts, routers, the MoE layer, its auxiliary losses and the output cross-entropy."""

from torchtune_moe.modules.linear_cross_entropy import LinearCrossEntropyLoss
from torchtune_moe.modules.losses import load_balancing_loss, router_z_loss, sequence_balance_loss
from torchtune_moe.modules.moe_layer import MoE, collect_aux_loss, dispatch_combine, moe_layers, update_routers
from torchtune_moe.modules.moe_linear import MoELinear
from torchtune_moe.modules.routers import (
    CausalExpertChoiceRouter,
    ExpertChoiceTopKRouter,
    ExpertThresholdRouter,
    Router,
    RouterOutput,
    TokenChoiceTopKRouter,
)
from torchtune_moe.modules.routing_replay import RoutingRecord, capture_routing, replay_routing

__all__ = [
    "MoELinear",
    "Router",
    "RouterOutput",
    "TokenChoiceTopKRouter",
    "ExpertChoiceTopKRouter",
    "CausalExpertChoiceRouter",
    "ExpertThresholdRouter",  # deprecated alias of CausalExpertChoiceRouter
    "MoE",
    "collect_aux_loss",
    "update_routers",
    "moe_layers",
    "dispatch_combine",
    "load_balancing_loss",
    "router_z_loss",
    "sequence_balance_loss",
    "LinearCrossEntropyLoss",
    "RoutingRecord",
    "capture_routing",
    "replay_routing",
]
