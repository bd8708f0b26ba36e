from torchtune_moe.models.moe._component_builders import ROUTERS, moe, moe_layer

__all__ = ["moe", "moe_layer", "ROUTERS"]
