"""Top-k with budgets and batched gathers."""

from __future__ import annotations

from torch import Tensor


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices (M, k) of the k largest scores per row, sorted ascending (token order kept)."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens (M, N, D), index (M, k) -> (M, k, D)."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
