"""Gated DeltaNet linear attention (Yang et al. 2024), the token mixer of Qwen3.5-MoE's (and Qwen3-Next's)
linear-attention layers, as transformers' ``Qwen3_5MoeGatedDeltaNet``.

Why it is not torchtune's ``MultiHeadAttention``: there is no softmax over keys and no KV cache. Each head keeps
a [d_k, d_v] state matrix S that every token decays (``exp(g)``), corrects by the delta rule (write
``beta * (v - S^T k)`` along k) and reads with q. q, k, v come from one projection passed through a causal
depthwise convolution; k/v heads may differ in number (grouped values); the output is normalised per head by a
gated RMSNorm (``RMSNorm(o) * silu(z)``, z a projection of the input) before the output projection. It takes the
decoder layer's arguments (``forward(x, y, mask=, input_pos=)``) so that it sits in torchtune's
``TransformerSelfAttentionLayer`` in place of the attention module.

The recurrence runs in chunks (:func:`chunk_gated_delta_rule`): within a chunk of C tokens the delta-rule
updates are solved at once (a unit lower-triangular system, the "UT transform"), and one state pass per chunk
carries S across chunks. On CUDA the maintained Triton kernel of flash-linear-attention
(``fla.ops.gated_delta_rule.chunk_gated_delta_rule``) is used when the package is installed; otherwise, and
on CPU, the torch path below. The torch path is written here because no maintained CPU library implements the
gated delta rule: transformers has one, but as a private function of its model files (the parity reference,
not a dependency of the package).

Packed samples: each sample of a packed row is mixed on its own, from a zero state (``GatedDeltaNet._per_sample``).
"""

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from torchtune_moe.modules.attention_utils import TrainingOnlySelfAttention
from torchtune_moe.modules.moe_linear import _get_activation

__all__ = ["GatedDeltaNet", "GatedRMSNorm", "chunk_gated_delta_rule", "packed_layout", "recurrent_gated_delta_rule"]

try:  # the maintained Triton kernels (GPU only); optional
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk_gated_delta_rule
except Exception:  # not installed, or no Triton / CUDA
    _fla_chunk_gated_delta_rule = None


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim (flash-linear-attention's and transformers' form)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q_BSHK, k_BSHK, v_BSHV, g_BSH, beta_BSH):
    """Grouped values (each q/k head serves ``Hv // Hk`` consecutive value heads), fp32, heads first, q and k
    L2-normalised and q scaled by ``d_k ** -0.5``. Returns q, k [B, Hv, S, K], v [B, Hv, S, V], g, beta
    [B, Hv, S]."""
    Hk, Hv = k_BSHK.shape[2], v_BSHV.shape[2]
    if Hv != Hk:
        q_BSHK = q_BSHK.repeat_interleave(Hv // Hk, dim=2)
        k_BSHK = k_BSHK.repeat_interleave(Hv // Hk, dim=2)
    q, k, v = (t.transpose(1, 2).float() for t in (q_BSHK, k_BSHK, v_BSHV))
    g, beta = (t.transpose(1, 2).float() for t in (g_BSH, beta_BSH))
    q, k = _l2norm(q), _l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def chunk_gated_delta_rule(
    q_BSHK: torch.Tensor,
    k_BSHK: torch.Tensor,
    v_BSHV: torch.Tensor,
    g_BSH: torch.Tensor,
    beta_BSH: torch.Tensor,
    chunk_size: int = 64,
) -> torch.Tensor:
    """The gated delta rule over a whole sequence from a zero state, chunk by chunk (torch; fp32 inside).

    Per head, token t: ``S_t = exp(g_t) S_{t-1} + k_t beta_t (v_t - exp(g_t) S_{t-1}^T k_t)^T`` and
    ``o_t = S_t^T q_t``, q and k L2-normalised, q scaled by ``d_k ** -0.5``.

    Args:
        q_BSHK, k_BSHK: [B, S, Hk, K] queries and keys.
        v_BSHV: [B, S, Hv, V] values (Hv a multiple of Hk).
        g_BSH: [B, S, Hv] log decay (<= 0).
        beta_BSH: [B, S, Hv] write strength in (0, 1).
        chunk_size (int): C, tokens solved together.

    Returns:
        torch.Tensor: [B, S, Hv, V] in the dtype of ``q_BSHK``.
    """
    dtype = q_BSHK.dtype
    B, S = q_BSHK.shape[:2]
    q, k, v, g, beta = _prepare(q_BSHK, k_BSHK, v_BSHV, g_BSH, beta_BSH)
    H, K, V, C = v.shape[1], k.shape[-1], v.shape[-1], chunk_size
    pad = (-S) % C
    if pad:  # zero keys and values with zero decay: padding changes nothing before it
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    N = (S + pad) // C
    # [B, H, N, C, .]: chunk n holds tokens n*C .. n*C + C-1.
    q, k, v = (t.reshape(B, H, N, C, -1) for t in (q, k, v))
    g_cum = g.reshape(B, H, N, C).cumsum(-1)  # log decay from the chunk start to each token
    beta = beta.reshape(B, H, N, C, 1)
    k_beta = k * beta
    # decay_CC[i, j] = exp(g_cum_i - g_cum_j) for j <= i (from token j to token i), 0 above the diagonal.
    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    decay_CC = (g_cum.unsqueeze(-1) - g_cum.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()
    # The chunk's delta-rule writes depend on each other through a unit lower-triangular system (I + L) X = R
    # with L = strictly-lower(beta_i k_i . k_j decay_ij): solve it once for the values (u, what each token
    # writes from a zero state) and for the decayed keys (w, how much each token's write reads back the state
    # the chunk starts from).
    system_CC = (k_beta @ k.transpose(-1, -2)) * decay_CC
    u = torch.linalg.solve_triangular(system_CC, v * beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system_CC, k_beta * g_cum.exp().unsqueeze(-1), upper=False, unitriangular=True)
    attn_CC = (q @ k.transpose(-1, -2)) * decay_CC  # within-chunk reads (diagonal included)
    q_decayed = q * g_cum.exp().unsqueeze(-1)  # reads of the state the chunk starts from
    k_decayed = k * (g_cum[..., -1:] - g_cum).exp().unsqueeze(-1)  # writes, decayed to the chunk end
    chunk_decay = g_cum[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]
    state_KV = q.new_zeros(B, H, K, V)
    out = []
    for n in range(N):
        v_new = u[:, :, n] - w[:, :, n] @ state_KV  # the writes, corrected by what the state already holds
        out.append(q_decayed[:, :, n] @ state_KV + attn_CC[:, :, n] @ v_new)
        state_KV = state_KV * chunk_decay[:, :, n] + k_decayed[:, :, n].transpose(-1, -2) @ v_new
    o = torch.stack(out, dim=2).reshape(B, H, N * C, V)[:, :, :S]
    return o.transpose(1, 2).to(dtype)


def recurrent_gated_delta_rule(
    q_BSHK: torch.Tensor,
    k_BSHK: torch.Tensor,
    v_BSHV: torch.Tensor,
    g_BSH: torch.Tensor,
    beta_BSH: torch.Tensor,
) -> torch.Tensor:
    """The same as :func:`chunk_gated_delta_rule`, one token at a time: the definition, for tests (slow)."""
    dtype = q_BSHK.dtype
    q, k, v, g, beta = _prepare(q_BSHK, k_BSHK, v_BSHV, g_BSH, beta_BSH)
    B, H, S, K = k.shape
    state_KV = q.new_zeros(B, H, K, v.shape[-1])
    out = []
    for t in range(S):
        state_KV = state_KV * g[:, :, t].exp()[..., None, None]
        read_V = (state_KV * k[:, :, t].unsqueeze(-1)).sum(-2)
        delta_V = (v[:, :, t] - read_V) * beta[:, :, t].unsqueeze(-1)
        state_KV = state_KV + k[:, :, t].unsqueeze(-1) * delta_V.unsqueeze(-2)
        out.append((state_KV * q[:, :, t].unsqueeze(-1)).sum(-2))
    return torch.stack(out, dim=2).transpose(1, 2).to(dtype)


class GatedRMSNorm(nn.Module):
    """``RMSNorm(x) * silu(gate)`` over the last dim (the output norm of Gated DeltaNet), statistics in fp32.

    Args:
        dim (int): normalised size.
        eps (float): epsilon.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``x``, ``gate`` [..., dim] -> [..., dim] in the dtype of ``x``."""
        dtype = x.dtype
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.scale * normed.to(dtype) * F.silu(gate.float())).to(dtype)


# The last layout computed, for the input_pos tensor it came from: every linear-attention layer of a forward (and its
# activation-checkpoint recompute) gets the same input_pos object, so the host sync happens once per forward.
_LAST_LAYOUT: list = [None]


def packed_layout(input_pos_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Where each token of packed rows goes in a [N, L] batch of its samples (a sample starts where ``input_pos``
    is 0, and at each row start): ``(sample_T, pos_T, N, L)``, ``sample_T`` and ``pos_T`` [B*S]. One host sync
    (for N and L), made once per ``input_pos`` tensor: the result is reused while the same, unmodified tensor
    comes back."""
    last = _LAST_LAYOUT[0]
    if last is not None and last[0]() is input_pos_BS and last[1] == input_pos_BS._version:
        return last[2]
    B, S = input_pos_BS.shape
    starts_BS = input_pos_BS == 0
    starts_BS[:, 0] = True
    sample_T = starts_BS.flatten().cumsum(0) - 1  # [B*S] sample index of each token
    first_T = torch.arange(B * S, device=input_pos_BS.device)
    first_N = first_T[starts_BS.flatten()]  # flat index of each sample's first token
    pos_T = first_T - first_N[sample_T]
    layout = (sample_T, pos_T, first_N.numel(), int(pos_T.max()) + 1)  # the host sync
    _LAST_LAYOUT[0] = (weakref.ref(input_pos_BS), input_pos_BS._version, layout)
    return layout


class GatedDeltaNet(TrainingOnlySelfAttention):
    """Gated DeltaNet token mixer ``[B, S, D] -> [B, S, D]`` (Qwen3.5-MoE's linear-attention layers).

    Per token x::

        q, k, v = split(act(causal_conv1d(in_proj_qkv(x))))        [Hk, K], [Hk, K], [Hv, V]
        beta = sigmoid(in_proj_b(x)),  g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)      [Hv]
        o = gated_delta_rule(q, k, v, g, beta)                      [Hv, V]
        out = out_proj(GatedRMSNorm(o, in_proj_z(x)))               (norm per head)

    Args:
        embed_dim (int): model dim D.
        num_key_heads (int): Hk [linear_num_key_heads].
        num_value_heads (int): Hv, a multiple of Hk [linear_num_value_heads].
        key_head_dim (int): K [linear_key_head_dim].
        value_head_dim (int): V [linear_value_head_dim].
        conv_kernel_size (int): width of the causal depthwise convolution [linear_conv_kernel_dim].
        activation (str): activation after the convolution [hidden_act].
        norm_eps (float): epsilon of the gated output norm [rms_norm_eps].
        chunk_size (int): tokens per chunk of the torch path.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_key_heads: int,
        num_value_heads: int,
        key_head_dim: int,
        value_head_dim: int,
        conv_kernel_size: int = 4,
        activation: str = "silu",
        norm_eps: float = 1e-6,
        chunk_size: int = 64,
    ):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_key_heads", num_key_heads),
                            ("num_value_heads", num_value_heads), ("key_head_dim", key_head_dim),
                            ("value_head_dim", value_head_dim), ("conv_kernel_size", conv_kernel_size),
                            ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if num_value_heads % num_key_heads:
            raise ValueError(
                f"num_value_heads ({num_value_heads}) must be a multiple of num_key_heads ({num_key_heads})"
            )
        self.embed_dim = embed_dim
        self.num_key_heads = num_key_heads
        self.num_value_heads = num_value_heads
        self.key_head_dim = key_head_dim
        self.value_head_dim = value_head_dim
        self.chunk_size = chunk_size
        self.activation = activation
        self._act = _get_activation(activation)
        key_dim, value_dim = num_key_heads * key_head_dim, num_value_heads * value_head_dim
        self.key_dim, self.value_dim = key_dim, value_dim
        conv_dim = 2 * key_dim + value_dim
        self.in_proj_qkv = nn.Linear(embed_dim, conv_dim, bias=False)
        self.in_proj_z = nn.Linear(embed_dim, value_dim, bias=False)
        self.in_proj_b = nn.Linear(embed_dim, num_value_heads, bias=False)
        self.in_proj_a = nn.Linear(embed_dim, num_value_heads, bias=False)
        # Depthwise, causal by left padding (F.conv1d: cuDNN on GPU; no separate causal-conv1d package needed).
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, conv_kernel_size, groups=conv_dim, bias=False,
                                padding=conv_kernel_size - 1)
        self.dt_bias = nn.Parameter(torch.ones(num_value_heads))
        self.A_log = nn.Parameter(torch.empty(num_value_heads).uniform_(0.01, 16).log())
        self.norm = GatedRMSNorm(value_head_dim, eps=norm_eps)
        self.out_proj = nn.Linear(value_dim, embed_dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        *,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``x`` [B, S, D] -> [B, S, D], causal (``y`` must be None or ``x``).

        Packed samples (a ``mask`` with ``input_pos``, positions restarting at 0 at each sample): each sample runs
        from a zero state and a fresh convolution, as alone (:meth:`_per_sample`).

        Raises:
            ValueError: a mask without ``input_pos`` (the samples' starts are read from the positions).
        """
        self.check_self_attention(x, y)
        if mask is not None:
            if input_pos is None:
                raise ValueError(
                    "GatedDeltaNet (linear attention) got an attention mask without input_pos: packed samples need "
                    "their positions (torchtune's packed datasets give them) to restart the recurrence per sample"
                )
            return self._per_sample(x, input_pos)
        return self._mix(x)

    def _per_sample(self, x_BSD: torch.Tensor, input_pos_BS: torch.Tensor) -> torch.Tensor:
        """Packed rows: the samples are gathered into a zero-padded [N, L, D] batch (:func:`packed_layout`), mixed,
        and scattered back. Padding after a sample's tokens does not reach them (causal convolution and
        recurrence)."""
        B, S, D = x_BSD.shape
        sample_T, pos_T, N, L = packed_layout(input_pos_BS)
        x_NLD = x_BSD.new_zeros(N, L, D)
        x_NLD[sample_T, pos_T] = x_BSD.reshape(B * S, D)
        return self._mix(x_NLD)[sample_T, pos_T].reshape(B, S, D)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        """The token mixer over whole sequences from a zero state: [B, S, D] -> [B, S, D]."""
        B, S, _ = x.shape
        qkv_BSC = self.in_proj_qkv(x)
        qkv_BSC = self._act(self.conv1d(qkv_BSC.transpose(1, 2))[..., :S]).transpose(1, 2)
        q, k, v = qkv_BSC.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q_BSHK = q.reshape(B, S, self.num_key_heads, self.key_head_dim)
        k_BSHK = k.reshape(B, S, self.num_key_heads, self.key_head_dim)
        v_BSHV = v.reshape(B, S, self.num_value_heads, self.value_head_dim)
        beta_BSH = self.in_proj_b(x).sigmoid()
        g_BSH = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        if _fla_chunk_gated_delta_rule is not None and x.is_cuda:
            o_BSHV = self._fla(q_BSHK, k_BSHK, v_BSHV, g_BSH, beta_BSH)
        else:
            o_BSHV = chunk_gated_delta_rule(q_BSHK, k_BSHK, v_BSHV, g_BSH, beta_BSH, chunk_size=self.chunk_size)
        z_BSHV = self.in_proj_z(x).reshape(B, S, self.num_value_heads, self.value_head_dim)
        o_BSHV = self.norm(o_BSHV, z_BSHV)
        return self.out_proj(o_BSHV.reshape(B, S, self.value_dim))

    def _fla(self, q_BSHK, k_BSHK, v_BSHV, g_BSH, beta_BSH) -> torch.Tensor:
        """flash-linear-attention's chunked kernel ([B, S, H, .] layout), q/k repeated to the value heads."""
        Hk, Hv = self.num_key_heads, self.num_value_heads
        if Hv != Hk:
            q_BSHK = q_BSHK.repeat_interleave(Hv // Hk, dim=2)
            k_BSHK = k_BSHK.repeat_interleave(Hv // Hk, dim=2)
        o_BSHV, _ = _fla_chunk_gated_delta_rule(
            q_BSHK, k_BSHK, v_BSHV, g=g_BSH, beta=beta_BSH, scale=self.key_head_dim**-0.5,
            output_final_state=False, use_qk_l2norm_in_kernel=True,
        )
        return o_BSHV

    def extra_repr(self) -> str:
        return (f"key_heads={self.num_key_heads}, value_heads={self.num_value_heads}, key_head_dim="
                f"{self.key_head_dim}, value_head_dim={self.value_head_dim}, chunk_size={self.chunk_size}")
