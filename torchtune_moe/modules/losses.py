"""Auxiliary router losses. Each returns a scalar fp32 tensor; perfectly uniform routing gives 1.0 for the
balance losses."""

import torch

__all__ = ["load_balancing_loss", "router_z_loss", "sequence_balance_loss"]


def load_balancing_loss(probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_i f_i * P_i``.

    ``f_i``: fraction of the routed assignments (T*K for token choice) that went to expert i (no gradient);
    ``P_i``: mean router probability of expert i over the T tokens. Uniform routing gives 1.0; the minimum.

    Args:
        probs_TE (torch.Tensor): [T, E] router probabilities (rows sum to 1).
        tokens_per_expert_E (torch.Tensor): [E] assignments per expert.
    """
    E = probs_TE.shape[-1]
    counts_E = tokens_per_expert_E.detach().float()
    f_E = counts_E / counts_E.sum().clamp(min=1.0)
    P_E = probs_TE.float().mean(dim=0)
    return E * (f_E * P_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``mean_t logsumexp(logits_t)^2``; keeps router logits small.

    Args:
        logits_TE (torch.Tensor): [T, E] router logits.
    """
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def sequence_balance_loss(
    probs_BSE: torch.Tensor, token_ids_A: torch.Tensor, expert_ids_A: torch.Tensor
) -> torch.Tensor:
    """Sequence-wise balance loss (DeepSeek-V3): the load-balancing loss per sequence, averaged over sequences.

    For sequence b: ``f_bi = E * n_bi / sum_j n_bj`` (``n_bi``: assignments of b's tokens to expert i; with K
    experts per token this is DeepSeek-V3's ``E / (K S) * n_bi``), ``P_bi`` = mean probability of expert i
    over b's tokens, loss = ``mean_b sum_i f_bi * P_bi``. Uniform routing gives 1.0.

    Args:
        probs_BSE (torch.Tensor): [B, S, E] router probabilities.
        token_ids_A (torch.Tensor): [A] flat token index (b * S + s) of each assignment.
        expert_ids_A (torch.Tensor): [A] expert of each assignment; E marks a dropped slot (ignored).
    """
    B, S, E = probs_BSE.shape
    seq_A = torch.div(token_ids_A, S, rounding_mode="floor")
    flat_A = seq_A * (E + 1) + expert_ids_A
    counts_BE = torch.zeros(B * (E + 1), device=probs_BSE.device).scatter_add_(
        0, flat_A, torch.ones_like(flat_A, dtype=torch.float32)
    ).view(B, E + 1)[:, :E]
    f_BE = E * counts_BE / counts_BE.sum(dim=-1, keepdim=True).clamp(min=1.0)
    P_BE = probs_BSE.float().mean(dim=1)
    return (f_BE * P_BE).sum(dim=-1).mean()
