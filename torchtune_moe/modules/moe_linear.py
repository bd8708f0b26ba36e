"""All routed experts of one MoE layer as stacked weights, run with torch's grouped GEMM."""

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

# torch.nn.functional.grouped_mm needs every row stride to be a multiple of 16 bytes.
_ALIGN_ELEMENTS = 8


def _get_activation(activation: str | Callable[[torch.Tensor], torch.Tensor]):
    if callable(activation):
        return activation
    table = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}
    if activation not in table:
        raise ValueError(f"activation must be one of {sorted(table)} or a callable, got {activation!r}")
    return table[activation]


class MoELinear(nn.Module):
    """The routed experts of one layer: E feed-forward networks held as stacked weights.

    Gated (SwiGLU by default): ``y = down(act(x @ gate^T) * (x @ up^T))``; ungated: ``y = down(act(x @ up^T))``.

    Weights (``nn.Linear`` layout, out x in, per expert):
      - ``gate_up_proj``: [E, 2*H, D] when gated (rows [0:H] are the gate, [H:2H] the up projection),
        [E, H, D] when not.
      - ``down_proj``: [E, D, H].

    The forward takes tokens already sorted by expert and the number of rows of each expert, and runs
    both projections as one grouped GEMM each (``torch.nn.functional.grouped_mm``): no Python loop over
    experts and no host-device sync.

    Args:
        num_experts (int): E.
        dim (int): model dim D.
        hidden_dim (int): expert hidden dim H.
        activation (str | Callable): ``"silu"`` (default), ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` or a callable.
        gated (bool): gated (GLU) experts. Default True.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        *,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "silu",
        gated: bool = True,
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim)):
            if value < 1 or value % _ALIGN_ELEMENTS:
                raise ValueError(
                    f"{name} must be a positive multiple of {_ALIGN_ELEMENTS} (grouped GEMM needs 16-byte "
                    f"aligned rows), got {value}"
                )
        self.num_experts = num_experts
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.gated = gated
        self.act = _get_activation(activation)
        in_rows = 2 * hidden_dim if gated else hidden_dim
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, in_rows, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init as one nn.Linear per expert (kaiming uniform with a=sqrt(5)).
        for w in (self.gate_up_proj, self.down_proj):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x_AD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x_AD (torch.Tensor): [A, D] rows sorted by expert (A = routed assignments).
            offsets_E (torch.Tensor): [E] int32, cumulative row counts: expert e owns rows
                ``offsets_E[e-1]:offsets_E[e]``. Rows past ``offsets_E[-1]`` are not computed (their output is
                undefined: the caller masks them).

        Returns:
            torch.Tensor: [A, D]
        """
        h_AH = F.grouped_mm(x_AD, self.gate_up_proj.transpose(-2, -1), offs=offsets_E)
        if self.gated:
            gate_AH, up_AH = h_AH.chunk(2, dim=-1)
            h_AH = self.act(gate_AH) * up_AH
        else:
            h_AH = self.act(h_AH)
        return F.grouped_mm(h_AH, self.down_proj.transpose(-2, -1), offs=offsets_E)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, gated={self.gated}"
