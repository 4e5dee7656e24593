"""Batched cosine similarity and distance between token sets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def at_least_float32(t: Tensor) -> Tensor:
    """Half precision -> float32 (similarities and running sums lose rankings in fp16/bf16);
    float32 and float64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def cosine_similarity(a: Tensor, b: Tensor | None = None) -> Tensor:
    """(M, Na, D) x (M, Nb, D) -> (M, Na, Nb) cosine similarities, in float32 at least
    (half-precision dot products of 4096-d embeddings lose the ranking). ``b=None``: ``a`` vs ``a``."""
    a = F.normalize(at_least_float32(a), dim=-1)
    b = a if b is None else F.normalize(at_least_float32(b), dim=-1)
    return a @ b.transpose(-1, -2)


def cosine_distance(a: Tensor, b: Tensor | None = None) -> Tensor:
    """1 - cosine similarity, (M, Na, Nb): 0 for parallel tokens, 2 for opposite ones."""
    return 1.0 - cosine_similarity(a, b)
