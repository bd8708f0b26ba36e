"""Small helpers the builders share: which layers are MoE, router options, padding row, renamed arguments.

Nothing here reads files or knows a family: every builder may import it (see docs/layout.md).
"""

import functools
import warnings
from typing import Callable, Iterable, Optional, Union

from torchtune.data import PromptTemplateInterface
from torchtune.modules import TransformerDecoder

__all__ = [
    "hf_moe_layer_ids",
    "hf_aux_loss_coeff",
    "router_kwargs",
    "set_padding_idx",
    "check_sliding_window",
    "renamed_arguments",
    "PromptTemplateArg",
]


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


def hf_aux_loss_coeff(router_aux_loss_coef: float, experts_per_token: int, num_moe_layers: int) -> float:
    """Our per-layer ``aux_loss_coeff`` with the scale of transformers' ``router_aux_loss_coef``.

    transformers adds ``router_aux_loss_coef * load_balancing_loss_func(all MoE layers' router logits)``: one
    loss over the tokens of all L MoE layers pooled together, K at uniform routing. Ours is ``sum over layers of
    coeff * load_balancing_loss(layer)``, 1.0 per layer at uniform routing. Equal scale needs
    ``coeff = router_aux_loss_coef * K / L``. Equal *values* hold for one MoE layer only: with several,
    transformers' pooling lets opposite imbalances of two layers cancel (docs/routers_and_losses.md);
    ``aux_loss_pooled=True`` reproduces the pooled form exactly.
    """
    return router_aux_loss_coef * experts_per_token / num_moe_layers


def router_kwargs(norm_topk_prob: bool, moe_kwargs: dict) -> dict:
    """``norm_topk_prob`` of a Hub family, for the token-choice router it was published with; another router
    chosen in ``moe_kwargs`` (e.g. ``router="causal_expert_choice"``) does not take it, so it is left out."""
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


def renamed_arguments(**renames: str) -> Callable:
    """Decorator: a builder keeps accepting its old argument names (``old="new"``), with a FutureWarning
    naming the new key, so configs written against older versions keep working. Both names at once is an
    error."""

    def wrap(builder: Callable) -> Callable:
        @functools.wraps(builder)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise ValueError(
                            f"{builder.__name__}() got both {old!r} (deprecated) and {new!r}; pass {new!r} only"
                        )
                    warnings.warn(
                        f"{builder.__name__}(): argument {old!r} is deprecated, use {new!r} (model.{new} in a "
                        "config)",
                        FutureWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return builder(*args, **kwargs)

        wrapper.renamed_arguments = dict(renames)
        return wrapper

    return wrap


#: What torchtune tokenizer builders accept as ``prompt_template`` (torchtune's own alias is private).
PromptTemplateArg = Optional[Union[str, dict[str, tuple[str, str]], PromptTemplateInterface]]
