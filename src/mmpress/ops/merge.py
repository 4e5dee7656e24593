"""Token merging by bipartite soft matching (ToMe, Bolya et al., ICLR 2023, arXiv 2210.09461).

One round (ToMe Sec. 3, "bipartite soft matching"): split the tokens alternately into A (even)
and B (odd); each A token proposes an edge to its most similar B token (cosine); the r A tokens
with the strongest edges are merged into their B partner, the others stay. Merged tokens are
SIZE-weighted means (ToMe's ``merge_wavg``) and sizes add, so a token that already stands for
several patches counts for them all. One round removes at most half the tokens; rounds repeat
until exactly k remain. Every token keeps the original position of the B token it ended in.

Token order between rounds is the official one by default: a round outputs the unmerged A tokens
in descending order of their best edge, then the B tokens (``torch.cat([unm, dst])`` in ToMe's
``merge``), and the next round splits that sequence alternately. ``reorder=True`` puts the tokens
back in position order after each round instead (a spatially interleaved split every round).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpress.ops.similarity import at_least_float32


def _rows(t: Tensor, index: Tensor) -> Tensor:
    """Gather rows: t (M, N, C), index (M, k) -> (M, k, C)."""
    return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def bipartite_merge(x: Tensor, size: Tensor, pos: Tensor, r: int,
                    reorder: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One round merging r tokens away. x (M, N, D) float32+, size (M, N), pos (M, N) original
    positions -> the same three with N - r tokens: the unmerged A tokens (by descending edge
    score, ties to the lower A index; official ``argsort`` is unstable there), then B, as ToMe
    orders them; in position order with ``reorder``."""
    unit = F.normalize(x, dim=-1)
    score, partner = (unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)).max(dim=-1)  # best B for each A
    order = score.argsort(dim=-1, descending=True, stable=True)
    src, keep = order[:, :r], order[:, r:]  # A tokens merged away / A tokens kept
    dst = partner.gather(1, src)

    def combine(t: Tensor) -> Tensor:  # sum the merged A rows into their B rows, drop them from A
        a, b = t[:, ::2], t[:, 1::2]
        b = b.scatter_reduce(1, dst.unsqueeze(-1).expand(-1, -1, t.shape[-1]), _rows(a, src), reduce="sum")
        return torch.cat([_rows(a, keep), b], dim=1)

    total = combine(x * size.unsqueeze(-1))
    size = combine(size.unsqueeze(-1)).squeeze(-1)
    pos = torch.cat([pos[:, ::2].gather(1, keep), pos[:, 1::2]], dim=1)
    x = total / size.unsqueeze(-1)
    if not reorder:
        return x, size, pos
    order = pos.argsort(dim=-1)
    return _rows(x, order), size.gather(1, order), pos.gather(1, order)


def merge_to(tokens: Tensor, k: int, reorder: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Repeated bipartite soft matching down to exactly k tokens (``reorder``: position order
    between rounds; default the official order). tokens (M, N, D) -> merged (M, k, D) in the
    input dtype, size (M, k) patches per token (sums to N), position (M, k) original index of
    each token's destination, ascending."""
    m, n, _ = tokens.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    x = at_least_float32(tokens)
    size = x.new_ones(m, n)
    pos = torch.arange(n, device=x.device).expand(m, n)
    while x.shape[1] > k:
        x, size, pos = bipartite_merge(x, size, pos, min(x.shape[1] - k, x.shape[1] // 2), reorder)
    order = pos.argsort(dim=-1)
    return _rows(x, order).to(tokens.dtype), size.gather(1, order), pos.gather(1, order)


# ---- ToMe inside a ViT: one matching per block (the official ``tome/merge.py``) ---------------
class Matching(NamedTuple):
    """One block's bipartite soft matching (ToMe Sec. 3, steps 1-3), as indices into the two sets
    of the current sequence: A = tokens 0, 2, 4, ... and B = tokens 1, 3, 5, ... (the CURRENT order,
    whatever earlier merges left). ``unm`` (M, |A| - r): the A tokens kept, in their output order;
    ``src`` (M, r): the A tokens merged away; ``dst`` (M, r): the B token each of them joins."""

    unm: Tensor
    src: Tensor
    dst: Tensor

    @property
    def r(self) -> int:
        return self.src.shape[1]


def bipartite_soft_matching(metric: Tensor, r: int, protected: int = 0) -> Matching:
    """ToMe's bipartite soft matching (Bolya et al., ICLR 2023, Sec. 3; official ``tome/merge.py``).

    metric (M, N, d): the block's attention keys averaged over heads (ToMe's similarity, Sec. 3
    "Token similarity"). Step 1: split the CURRENT sequence alternately into A (even) and B (odd).
    Step 2: every A token draws an edge to its most similar B token, s_ab = cos(k_a, k_b). Step 3:
    the r strongest edges are kept, so r tokens fewer after ``merge_wavg``. ``protected`` leading
    tokens ([CLS]: 1; ToMe's class + distillation tokens: 2) are never merged: a protected A token
    draws no edge and a protected B token receives none (the official ``-inf`` rows / columns).
    r is capped at half the unprotected tokens, ``(N - protected) // 2`` (official); r <= 0 gives
    an empty matching (merging is then the identity on values and sizes).

    Order: the kept A tokens come out by descending edge score, as the official ``argsort`` leaves
    them, and sorted back to their A order when a token is protected (the official ``class_token``
    branch: "ensure the class token is at the start"). Ties: the official ``argsort`` is unstable,
    ours is stable (the lower A index first), so equal edges have one defined outcome.
    A pure function: no gradient (``torch.no_grad`` as the official code), any float dtype."""
    m, n, _ = metric.shape
    if not isinstance(protected, int) or isinstance(protected, bool) or not 0 <= protected <= n:
        raise ValueError(f"protected must be an int in [0, {n}] (leading tokens never merged), got {protected!r}")
    r = min(int(r), (n - protected) // 2)
    na = (n + 1) // 2
    if r <= 0:
        index = torch.arange(na, device=metric.device).expand(m, na)
        empty = index[:, :0]
        return Matching(index, empty, empty)
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # (M, |A|, |B|) cosine, step 2
        scores[:, : (protected + 1) // 2] = -math.inf  # protected A tokens (even indices < protected)
        scores[:, :, : protected // 2] = -math.inf  # protected B tokens (odd indices < protected)
        best, partner = scores.max(dim=-1)
        edges = best.argsort(dim=-1, descending=True, stable=True)  # step 3
        unm, src = edges[:, r:], edges[:, :r]
        if protected:
            unm = unm.sort(dim=-1).values
        return Matching(unm, src, partner.gather(1, src))


def merge(x: Tensor, matching: Matching, mode: str = "sum") -> Tensor:
    """Step 4-5 of bipartite soft matching: reduce each merged A token into its B partner
    (``scatter_reduce`` with ``mode``: "sum", "mean", "amax", ...) and concatenate the kept A
    tokens then B (``torch.cat([unm, dst])``, official). x (M, N) or (M, N, C) -> N - r tokens."""
    flat = x.dim() == 2
    if flat:
        x = x.unsqueeze(-1)
    a, b = x[:, ::2], x[:, 1::2]
    if matching.r:
        b = b.scatter_reduce(1, _expand(matching.dst, b), _rows(a, matching.src), reduce=mode)
    out = torch.cat([_rows(a, matching.unm), b], dim=1)
    return out.squeeze(-1) if flat else out


def merge_wavg(x: Tensor, matching: Matching, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Merge by SIZE-weighted average (official ``merge_wavg``): x_merged = sum_i s_i x_i / sum_i s_i
    and sizes add, s_merged = sum_i s_i, so a token standing for several patches counts for all of
    them. x (M, N, C), size (M, N) patches per token (None: all ones) -> (M, N - r, C), (M, N - r).
    Computed in x's dtype (the official code's): pass float64 for an exact reference."""
    if size is None:
        size = x.new_ones(x.shape[:2])
    total = merge(x * size.unsqueeze(-1).to(x.dtype), matching, "sum")
    size = merge(size, matching, "sum")
    return total / size.unsqueeze(-1).to(x.dtype), size


def merge_representatives(index: Tensor, matching: Matching) -> Tensor:
    """Each output token's representative: the B token (its destination) for a merged group, the
    token itself otherwise. index (M, N): any per-token label, e.g. the original patch index
    tracked through the blocks; -> (M, N - r) in the output order of ``merge``. A merged token
    takes its representative's position."""
    a, b = index[:, ::2], index[:, 1::2]
    return torch.cat([a.gather(1, matching.unm), b], dim=1)


def _expand(index: Tensor, like: Tensor) -> Tensor:
    return index.unsqueeze(-1).expand(-1, -1, like.shape[-1])


def parse_r(num_layers: int, r) -> list[int]:
    """ToMe's r schedule (official ``tome/utils.py`` ``parse_r``): an int is r in every block; a
    tuple (r, inflect) goes linearly from int(r (1 - inflect)) to 2r - that over the blocks (inflect
    -1: the paper's "decreasing schedule", 0: constant); a list gives each block's r (zeros pad it)."""
    if isinstance(r, list):
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in r):
            raise ValueError(f"an r schedule must be non-negative ints, one per block; got {r!r}")
        return r + [0] * (num_layers - len(r)) if len(r) < num_layers else list(r)
    inflect = 0.0
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"r as a tuple is (r, inflect), e.g. (16, -1.0); got {r!r}")
        r, inflect = r
        if not isinstance(inflect, (int, float)) or isinstance(inflect, bool) or not -1 <= inflect <= 1:
            raise ValueError(f"inflect must be a number in [-1, 1], got {inflect!r}")
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise ValueError(f"r must be a non-negative int (tokens merged per block), got {r!r}")
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(lo + step * i) for i in range(num_layers)]


# ---- DyMU: a threshold instead of r (Wang et al., NeurIPS 2025, arXiv 2504.17040) -----------------
class ThresholdMatching(NamedTuple):
    """One block's threshold matching (DyMU's dynamic token merging): ``merged`` (M, |A|) which A
    tokens join a B token, ``dst`` (M, |A|) that B token; ``order`` (M, L') the output order over
    cat([A, B]) (kept tokens first, then padding) and ``valid`` (M, L') which of them are real."""

    merged: Tensor
    dst: Tensor
    order: Tensor
    valid: Tensor


def threshold_matching(metric: Tensor, threshold: float, protected: int = 0,
                       valid: Tensor | None = None) -> ThresholdMatching:
    """DyMU's batch-level bipartite soft matching at inference (official ``tome.py``:
    ``batch_level_bipartite_soft_matching`` with ``specified_threshold``): ToMe's split and edges
    (A / B alternately in the current order, each A token's most similar B token by cosine of the
    head-mean keys), but EVERY A token whose best edge exceeds the block's ``threshold`` merges, so
    each image keeps as many tokens as its content needs. Protected leading tokens and padding
    (``valid`` False) neither merge nor receive. The output keeps the A tokens in place (the merged
    ones become padding) then B, and moves padding to the end (the official ``argsort`` of the
    padding mask; ours is stable, the official one unspecified among equals), cut to the longest
    row. A ragged batch: each row as it would be alone, padded."""
    m, n, _ = metric.shape
    if valid is None:
        valid = torch.ones(m, n, dtype=torch.bool, device=metric.device)
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)
        scores[:, : (protected + 1) // 2] = -math.inf
        scores[:, :, : protected // 2] = -math.inf
        scores = scores.masked_fill(~valid[:, ::2, None] | ~valid[:, None, 1::2], -math.inf)
        best, dst = scores.max(dim=-1)
        merged = best > threshold
        alive = torch.cat([valid[:, ::2] & ~merged, valid[:, 1::2]], dim=1)
        order = (~alive).to(torch.int8).argsort(dim=1, stable=True)
        length = int(alive.sum(dim=1).max())
        order = order[:, :length]
        return ThresholdMatching(merged, dst, order, alive.gather(1, order))


def merge_by_threshold(x: Tensor, matching: ThresholdMatching, size: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted merge of a ``threshold_matching`` (as ``merge_wavg``): x (M, N, C), size (M, N)
    -> (M, L', C), (M, L') in its output order; padding rows keep their values and sizes."""
    w = size.to(x.dtype).unsqueeze(-1)
    a, b = x[:, ::2] * w[:, ::2], x[:, 1::2] * w[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    keep = matching.merged.unsqueeze(-1)
    b = b.scatter_add(1, _expand(matching.dst, b), a * keep)
    sb = sb.scatter_add(1, matching.dst, sa * matching.merged)
    total, sizes = torch.cat([a, b], dim=1), torch.cat([sa, sb], dim=1)
    total, sizes = _rows(total, matching.order), sizes.gather(1, matching.order)
    return total / sizes.unsqueeze(-1).to(x.dtype), sizes


def threshold_representatives(index: Tensor, matching: ThresholdMatching) -> Tensor:
    """Each output token's representative (``merge_representatives`` for a threshold matching)."""
    return torch.cat([index[:, ::2], index[:, 1::2]], dim=1).gather(1, matching.order)
