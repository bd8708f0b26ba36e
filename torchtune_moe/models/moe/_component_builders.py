"""Builders for MoE layers and MoE decoders made of torchtune's transformer pieces."""

import inspect
from typing import Callable, Optional, Union

from torch import nn
from torchtune.models.qwen2 import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import (
    FeedForward,
    RMSNorm,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)
from torchtune.utils import get_logger

from torchtune_moe.modules import (
    ExpertChoiceTopKRouter,
    CausalExpertChoiceRouter,
    MoE,
    MoELinear,
    TokenChoiceTopKRouter,
)
from torchtune_moe.modules.attention import GroupedQueryAttention, PartialRotaryPositionalEmbeddings
from torchtune_moe.modules.attention_utils import NormedProjection
from torchtune_moe.models._utils import renamed_arguments
from torchtune_moe.models.moe._decoder import MoETransformerDecoder
from torchtune_moe.modules.moe_linear import _ALIGN_ELEMENTS, _get_activation

log = get_logger("INFO")

__all__ = ["moe_layer", "moe", "ROUTERS"]

# Router name -> (class, options that only this router takes). Every router also takes score_func and gate_bias.
_COMMON_ROUTER_OPTIONS = ("score_func", "gate_bias")
ROUTERS = {
    "token_choice": (
        TokenChoiceTopKRouter,
        ("norm_topk_prob", "route_scale", "num_expert_groups", "num_limited_groups", "expert_bias_update_rate",
         "expert_bias"),
    ),
    "expert_choice": (ExpertChoiceTopKRouter, ("capacity_factor",)),
    "causal_expert_choice": (
        CausalExpertChoiceRouter,
        ("capacity_factor", "max_experts_per_token", "threshold_ema_decay"),
    ),
}


def _router_options(router: str, options: dict) -> dict:
    """The options (None = the router's default) that ``router`` takes. Options meant for another router are
    dropped with a logged note, so that switching the router is one override (``model.router=expert_choice``)
    even when the config sets another router's options (``norm_topk_prob``, ``capacity_factor``, ...)."""
    allowed = ROUTERS[router][1]
    given = {k: v for k, v in options.items() if v is not None}
    dropped = sorted(k for k in given if k not in _COMMON_ROUTER_OPTIONS and k not in allowed)
    if dropped:
        log.info(
            f"router={router!r} does not use {dropped} (options of another router): ignored. It takes "
            f"{list(allowed)}, score_func and gate_bias."
        )
    return {k: v for k, v in given.items() if k not in dropped}


def _ffn(dim: int, hidden_dim: int, activation: str, bias: bool = False) -> FeedForward:
    return FeedForward(
        gate_proj=nn.Linear(dim, hidden_dim, bias=bias),
        down_proj=nn.Linear(hidden_dim, dim, bias=bias),
        up_proj=nn.Linear(dim, hidden_dim, bias=bias),
        activation=_ActivationModule(activation),
    )


class _ActivationModule(nn.Module):
    def __init__(self, activation: str):
        super().__init__()
        self.name = activation
        self.fn = _get_activation(activation)

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


@renamed_arguments(hidden_dim="moe_hidden_dim")
def moe_layer(
    *,
    dim: int,
    moe_hidden_dim: int,
    num_experts: int,
    experts_per_token: int,
    router: Union[str, nn.Module] = "token_choice",
    score_func: Optional[str] = None,
    norm_topk_prob: Optional[bool] = None,
    route_scale: Optional[float] = None,
    num_expert_groups: Optional[int] = None,
    num_limited_groups: Optional[int] = None,
    expert_bias_update_rate: Optional[float] = None,
    expert_bias: Optional[bool] = None,
    gate_bias: Optional[bool] = None,
    capacity_factor: Optional[float] = None,
    max_experts_per_token: Optional[int] = None,
    threshold_ema_decay: Optional[float] = None,
    activation: str = "silu",
    gated: bool = True,
    expert_linear_bias: bool = False,
    expert_fp8: bool = False,
    shared_expert_hidden_dim: int = 0,
    shared_expert_gate: bool = False,
    aux_loss_coeff: float = 0.0,
    aux_loss_pooled: bool = False,
    z_loss_coeff: float = 0.0,
    seq_aux_loss_coeff: float = 0.0,
) -> MoE:
    """Builds one MoE feed-forward layer ``[B, S, dim] -> [B, S, dim]``.

    Args:
        dim (int): model dim.
        moe_hidden_dim (int): hidden dim of each routed expert (was ``hidden_dim``).
        num_experts (int): routed experts E.
        experts_per_token (int): K (for expert choice and threshold routers: the average K).
        router (str | nn.Module): ``"token_choice"``, ``"expert_choice"`` (not causal: see docs),
            ``"causal_expert_choice"`` (Expert Threshold routing), or your own router module.
        score_func (Optional[str]): ``"softmax"`` (default) or ``"sigmoid"`` (every router).
        gate_bias (Optional[bool]): a trained bias on the router gate's logits (every router; GPT-OSS).
        norm_topk_prob, route_scale, num_expert_groups, num_limited_groups, expert_bias_update_rate, expert_bias:
            token-choice options (:class:`~torchtune_moe.modules.TokenChoiceTopKRouter`); None = its default.
        capacity_factor: expert-choice and causal-expert-choice option.
        max_experts_per_token, threshold_ema_decay: causal-expert-choice options
            (:class:`~torchtune_moe.modules.CausalExpertChoiceRouter`).
            An option the chosen router does not take is ignored with a logged note (see ``ROUTERS``), so that a
            config switches routers by one override.
        activation (str): expert activation (``"silu"``, ``"gelu"``, ``"gelu_tanh"``, ``"relu"``).
        gated (bool): GLU experts (SwiGLU with silu).
        expert_linear_bias (bool): biases on each routed expert's projections (GPT-OSS; see
            :class:`~torchtune_moe.modules.MoELinear`).
        expert_fp8 (bool): the routed experts' grouped GEMMs in rowwise-scaled float8 (torchao's recipe with one
            change; CUDA GPUs of compute capability 9.0+; ``dim`` and ``moe_hidden_dim`` multiples of 16; see
            :class:`~torchtune_moe.modules.MoELinear`).
        shared_expert_hidden_dim (int): hidden dim of the shared expert FFN, 0 for none (N shared experts of
            hidden h are one FFN of hidden N*h).
        shared_expert_gate (bool): scale the shared expert by ``sigmoid(Linear(dim, 1)(x))`` (Qwen2-MoE).
        aux_loss_coeff (float): load-balancing loss coefficient, 0 = off.
        aux_loss_pooled (bool): pool the load-balancing statistics over all MoE layers of the model, as
            transformers' ``load_balancing_loss_func`` does, instead of one loss per layer (see
            :func:`~torchtune_moe.modules.collect_aux_loss`); for reproducing a transformers-trained run.
        z_loss_coeff (float): router z-loss coefficient, 0 = off.
        seq_aux_loss_coeff (float): sequence-wise balance loss coefficient, 0 = off.

    Raises:
        ValueError: an impossible or inapplicable option, naming it and what is allowed.
    """
    options = {
        "score_func": score_func,
        "norm_topk_prob": norm_topk_prob,
        "route_scale": route_scale,
        "num_expert_groups": num_expert_groups,
        "num_limited_groups": num_limited_groups,
        "expert_bias_update_rate": expert_bias_update_rate,
        "expert_bias": expert_bias,
        "gate_bias": gate_bias,
        "capacity_factor": capacity_factor,
        "max_experts_per_token": max_experts_per_token,
        "threshold_ema_decay": threshold_ema_decay,
    }
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    # moe() passes these through **moe_layer_kwargs, where the config check cannot see their annotations.
    for name, value in (("gated", gated), ("shared_expert_gate", shared_expert_gate), ("aux_loss_pooled", aux_loss_pooled),
                        ("expert_linear_bias", expert_linear_bias), ("gate_bias", gate_bias),
                        ("expert_fp8", expert_fp8)):
        if name == "gate_bias" and value is None:  # None: the router's default
            continue
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    if not 1 <= experts_per_token <= num_experts:
        raise ValueError(f"experts_per_token must be between 1 and num_experts ({num_experts}), got {experts_per_token}")
    if moe_hidden_dim < 1 or moe_hidden_dim % _ALIGN_ELEMENTS:
        raise ValueError(
            f"moe_hidden_dim must be a positive multiple of {_ALIGN_ELEMENTS} (grouped GEMM needs 16-byte aligned "
            f"rows), got {moe_hidden_dim}"
        )
    if shared_expert_hidden_dim < 0:
        raise ValueError(f"shared_expert_hidden_dim must be >= 0, got {shared_expert_hidden_dim}")
    if shared_expert_gate and not shared_expert_hidden_dim:
        raise ValueError("shared_expert_gate=True needs shared_expert_hidden_dim > 0")
    if isinstance(router, nn.Module):
        given = [k for k, v in options.items() if v is not None]
        if given:
            raise ValueError(f"router options {given} do not apply to a router module; configure the module itself")
        router_experts = getattr(router, "num_experts", num_experts)
        if router_experts != num_experts:
            raise ValueError(f"the router module has num_experts={router_experts}, but num_experts={num_experts}")
        router_module = router
    elif isinstance(router, str) and router in ROUTERS:
        router_module = ROUTERS[router][0](dim, num_experts, experts_per_token, **_router_options(router, options))
    else:
        raise ValueError(f"router must be one of {sorted(ROUTERS)} or an nn.Module, got {router!r}")
    experts = MoELinear(
        num_experts, dim, moe_hidden_dim, activation=activation, gated=gated, bias=expert_linear_bias,
        expert_fp8=expert_fp8,
    )
    shared = _ffn(dim, shared_expert_hidden_dim, activation) if shared_expert_hidden_dim else None
    gate = nn.Linear(dim, 1, bias=False) if shared_expert_gate else None
    return MoE(
        experts=experts,
        router=router_module,
        shared_expert=shared,
        shared_expert_gate=gate,
        aux_loss_coeff=aux_loss_coeff,
        aux_loss_pooled=aux_loss_pooled,
        z_loss_coeff=z_loss_coeff,
        seq_aux_loss_coeff=seq_aux_loss_coeff,
    )


_ROUTER_ARGS = _COMMON_ROUTER_OPTIONS + tuple(sorted({o for _, opts in ROUTERS.values() for o in opts}))
_MOE_LAYER_ARGS = [p for p in inspect.signature(moe_layer).parameters if p not in ("dim", "moe_hidden_dim")]


def _moe_layer_ids(moe_layer_ids: Union[str, int, list], num_layers: int) -> set[int]:
    if isinstance(moe_layer_ids, str):
        if moe_layer_ids == "all":
            return set(range(num_layers))
    elif isinstance(moe_layer_ids, int) and not isinstance(moe_layer_ids, bool):
        if not 1 <= moe_layer_ids <= num_layers:
            raise ValueError(
                f"moe_layer_ids as an int (every n-th layer) must be between 1 and num_layers ({num_layers}), "
                f"got {moe_layer_ids}"
            )
        # Same convention as Hugging Face's decoder_sparse_step: layer i is MoE when (i + 1) % n == 0.
        return {i for i in range(num_layers) if (i + 1) % moe_layer_ids == 0}
    elif hasattr(moe_layer_ids, "__iter__"):  # list, tuple or OmegaConf ListConfig
        ids = list(moe_layer_ids)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers]
        if bad or not ids:
            raise ValueError(
                f"moe_layer_ids as a list must hold layer indices in 0..{num_layers - 1} (at least one), got {ids}"
            )
        return set(ids)
    raise ValueError(f"moe_layer_ids must be 'all', an int n (every n-th layer) or a list of layer indices, got {moe_layer_ids!r}")


@renamed_arguments(moe_layers="moe_layer_ids")
def moe(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    num_experts: int,
    experts_per_token: int,
    moe_hidden_dim: int,
    router: Union[str, nn.Module] = "token_choice",
    head_dim: Optional[int] = None,
    moe_layer_ids: Union[str, int, list] = "all",
    dense_hidden_dim: Optional[int] = None,
    rope_base: float = 10_000.0,
    rotary_dim: Optional[int] = None,
    attention: Optional[Callable[[int], nn.Module]] = None,
    norm_eps: float = 1e-6,
    attn_bias: bool = False,
    attn_output_bias: bool = False,
    qk_norm: Optional[str] = None,
    clip_qkv: Optional[float] = None,
    attn_dropout: float = 0.0,
    tie_word_embeddings: bool = False,
    **moe_layer_kwargs,
) -> TransformerDecoder:
    """Builds a torchtune ``TransformerDecoder`` whose feed-forward blocks are MoE layers.

    Attention, RoPE (rotate-half, as Hugging Face models use), RMSNorm and the decoder layer are
    torchtune's. Non-MoE layers get a dense SwiGLU FFN of ``dense_hidden_dim``.

    Args:
        vocab_size (int): vocabulary size.
        num_layers (int): decoder layers.
        num_heads (int): query heads.
        num_kv_heads (int): key/value heads (GQA); must divide num_heads.
        embed_dim (int): model dim.
        max_seq_len (int): maximum sequence length (RoPE cache).
        num_experts (int): routed experts per MoE layer.
        experts_per_token (int): K.
        moe_hidden_dim (int): hidden dim of each routed expert.
        router (str | nn.Module): see :func:`moe_layer`. A module is only allowed with one MoE layer; use a
            router name to get a fresh router per layer.
        head_dim (Optional[int]): per-head dim, default ``embed_dim // num_heads``.
        moe_layer_ids (str | int | list): which layers are MoE: ``"all"``, an int n (layer i is MoE when
            ``(i + 1) % n == 0``, as Hugging Face's ``decoder_sparse_step``), or a list of layer indices (was
            ``moe_layers``, the name of :func:`torchtune_moe.modules.moe_layers`).
        dense_hidden_dim (Optional[int]): hidden dim of the dense FFN of non-MoE layers (required if any).
        rope_base (float): RoPE theta.
        rotary_dim (Optional[int]): RoPE over the first ``rotary_dim`` channels of each head only (GLM-4.5's
            ``partial_rotary_factor``); None: the whole head.
        attention (Optional[Callable[[int], nn.Module]]): ``layer index -> attention module`` replacing the
            default :class:`~torchtune_moe.modules.attention.GroupedQueryAttention` (torchtune's
            ``MultiHeadAttention`` without the key/value repeat), e.g. DeepSeek's multi-head latent attention; the
            attention arguments above other than ``num_heads`` and ``head_dim`` (the decoder's) are then unused.
        norm_eps (float): RMSNorm epsilon.
        attn_bias (bool): biases on the q, k, v projections (Qwen2-MoE).
        attn_output_bias (bool): bias on the attention output projection (Qwen3-MoE and OLMoE put one there
            when their ``attention_bias`` is set).
        qk_norm (Optional[str]): None, ``"head"`` (RMSNorm of each query/key head before RoPE: Qwen3-MoE) or
            ``"full"`` (RMSNorm over the whole q and k projections: OLMoE).
        clip_qkv (Optional[float]): clamp q, k, v projections to ``[-clip_qkv, clip_qkv]`` (OLMoE).
        attn_dropout (float): attention dropout.
        tie_word_embeddings (bool): output projection shares the token embedding.
        **moe_layer_kwargs: any other argument of :func:`moe_layer` (router options, shared experts,
            aux-loss coefficients, activation...).

    Returns:
        TransformerDecoder: a :class:`MoETransformerDecoder`, which checks its input tokens.
    """
    unknown = sorted(set(moe_layer_kwargs) - set(_MOE_LAYER_ARGS))
    if unknown:
        raise ValueError(f"moe() got unknown arguments {unknown}; allowed extra arguments are {_MOE_LAYER_ARGS}")
    for name, value in (("num_layers", num_layers), ("num_heads", num_heads), ("embed_dim", embed_dim),
                        ("vocab_size", vocab_size), ("max_seq_len", max_seq_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads must be >= 1 and divide num_heads ({num_heads}), got {num_kv_heads}")
    if head_dim is None:
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}) when head_dim is not given")
        head_dim = embed_dim // num_heads
    if head_dim < 1 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number (RoPE), got {head_dim}")
    # Checked here to name moe()'s arguments; MoELinear checks the same as dim / hidden_dim.
    for name, value in (("embed_dim", embed_dim), ("moe_hidden_dim", moe_hidden_dim)):
        if value < 1 or value % _ALIGN_ELEMENTS:
            raise ValueError(
                f"{name} must be a positive multiple of {_ALIGN_ELEMENTS} (grouped GEMM needs 16-byte aligned "
                f"rows), got {value}"
            )
    for name, value in (("rope_base", rope_base), ("norm_eps", norm_eps)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if clip_qkv is not None and not clip_qkv > 0:
        raise ValueError(f"clip_qkv must be None or > 0, got {clip_qkv}")
    if qk_norm not in (None, "head", "full"):
        raise ValueError(f"qk_norm must be None, 'head' or 'full', got {qk_norm!r}")
    moe_ids = _moe_layer_ids(moe_layer_ids, num_layers)
    if len(moe_ids) < num_layers and not dense_hidden_dim:
        raise ValueError("dense_hidden_dim is required when some layers are dense (moe_layer_ids is not 'all')")
    if isinstance(router, nn.Module) and len(moe_ids) > 1:
        raise ValueError("router as a module can serve one MoE layer only; pass a router name instead")
    if isinstance(router, str) and router in ROUTERS:  # drop other routers' options once, not once per layer
        options = {k: moe_layer_kwargs.pop(k) for k in _ROUTER_ARGS if k in moe_layer_kwargs}
        moe_layer_kwargs.update(_router_options(router, options))

    if rotary_dim is not None and not (0 < rotary_dim <= head_dim and rotary_dim % 2 == 0):
        raise ValueError(f"rotary_dim must be a positive even number <= head_dim ({head_dim}), got {rotary_dim}")
    if attention is not None:
        rope = None  # the attention modules bring their own
    elif rotary_dim is None or rotary_dim == head_dim:
        rope = Qwen2RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_base)
    else:
        rope = PartialRotaryPositionalEmbeddings(
            Qwen2RotaryPositionalEmbeddings(dim=rotary_dim, max_seq_len=max_seq_len, base=rope_base)
        )

    def proj(n_out: int, norm: bool) -> nn.Module:
        linear = nn.Linear(embed_dim, n_out, bias=attn_bias)
        norm_module = None
        if norm and qk_norm == "head":
            norm_module = RMSNorm(head_dim, eps=norm_eps)
        elif norm and qk_norm == "full":
            norm_module = RMSNorm(n_out, eps=norm_eps)
        if norm_module is None and clip_qkv is None:
            return linear
        return NormedProjection(
            linear, norm_module, head_dim=head_dim if qk_norm == "head" else None, clip=clip_qkv
        )

    layers = nn.ModuleList()
    for i in range(num_layers):
        attn = attention(i) if attention is not None else GroupedQueryAttention(
            # torchtune only checks embed_dim % num_heads (it reads embed_dim nowhere else): give it the attention
            # width, which GLM-4.5's 96 heads of 128 over a 5120-dim model need.
            embed_dim=num_heads * head_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=proj(num_heads * head_dim, norm=True),
            k_proj=proj(num_kv_heads * head_dim, norm=True),
            v_proj=proj(num_kv_heads * head_dim, norm=False),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=attn_output_bias),
            pos_embeddings=rope,
            max_seq_len=max_seq_len,
            attn_dropout=attn_dropout,
        )
        if i in moe_ids:
            mlp = moe_layer(
                dim=embed_dim,
                moe_hidden_dim=moe_hidden_dim,
                num_experts=num_experts,
                experts_per_token=experts_per_token,
                router=router,
                **moe_layer_kwargs,
            )
        else:
            mlp = _ffn(embed_dim, dense_hidden_dim, moe_layer_kwargs.get("activation", "silu"))
        layers.append(
            TransformerSelfAttentionLayer(
                attn=attn,
                mlp=mlp,
                sa_norm=RMSNorm(embed_dim, eps=norm_eps),
                mlp_norm=RMSNorm(embed_dim, eps=norm_eps),
            )
        )
    tok_embeddings = nn.Embedding(vocab_size, embed_dim)
    output = TiedLinear(tok_embeddings) if tie_word_embeddings else nn.Linear(embed_dim, vocab_size, bias=False)
    return MoETransformerDecoder(
        tok_embeddings=tok_embeddings,
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=RMSNorm(embed_dim, eps=norm_eps),
        output=output,
    )
