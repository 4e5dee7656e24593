"""Audio helpers: tokens (M, N, D) of M audio clips, N frames each in time order (the audio
encoder's output frames). Pure tensor functions, batched over the M clips, no loop over tokens and
no host sync (counts are Python ints or device tensors; every round count is static).

- :func:`adjacent_similarity`: cosine of every frame with the next one, (M, N - 1).
- :func:`top_edges`: the r best adjacent edges per row (r may differ per row), ties to the lower index.
- :func:`alternate_in_chains`: of selected edges, those a left-to-right walk merging PAIRS realises
  (a frame is merged at most once per step).
- :func:`merge_adjacent`: merge the runs the selected edges join, weighted (FastAdaSP's merge).
- :func:`merge_adjacent_pairs`: A-ToMe-style stacked rounds of adjacent pair merging to k tokens.
- :func:`similar_runs`: SA-MAP's runs: a run grows while the next frame's mean similarity to
  the run's frames stays at or above a threshold.
- :func:`loudest`: the k loudest frames of each clip (energy VAD with a budget).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpress.ops.similarity import at_least_float32
from mmpress.ops.video import merge_runs, row_rank


def adjacent_similarity(x: Tensor) -> Tensor:
    """x (M, N, D) -> (M, N - 1): cosine of frame i with frame i + 1, in float32 at least."""
    unit = F.normalize(at_least_float32(x), dim=-1)
    return (unit[:, :-1] * unit[:, 1:]).sum(dim=-1)


def top_edges(score: Tensor, r: int | Tensor) -> Tensor:
    """score (M, E) -> (M, E) bool: the ``r`` highest per row (``r`` an int or an (M,) tensor),
    ties to the lower index (a stable sort; ``torch.topk`` leaves them unspecified)."""
    rank = row_rank(score, descending=True)
    return rank < (r[:, None] if isinstance(r, Tensor) else r)


def runs_from_edges(selected: Tensor) -> Tensor:
    """selected (M, N - 1) edges (i, i + 1) -> start (M, N) bool: frame i opens a new run unless
    the edge joining it to frame i - 1 is selected (frame 0 always opens one)."""
    first = torch.ones(selected.shape[0], 1, dtype=torch.bool, device=selected.device)
    return torch.cat([first, ~selected], dim=1)


def alternate_in_chains(selected: Tensor) -> Tensor:
    """Of the selected edges (M, E), those a left-to-right walk realises when a merge takes a PAIR
    and skips past it: in every maximal chain of consecutive selected edges, the 1st, 3rd, 5th ...
    (the walk merges (i, i+1) and resumes at i + 2, so edge i + 1 finds frame i + 1 taken)."""
    e = selected.shape[1]
    cols = torch.arange(e, device=selected.device).expand_as(selected)
    prev = torch.cat([torch.zeros_like(selected[:, :1]), selected[:, :-1]], dim=1)
    chain_start = torch.where(selected & ~prev, cols, -1).cummax(dim=1).values
    return selected & ((cols - chain_start) % 2 == 0)


def merge_adjacent(x: Tensor, score: Tensor, k: int, weight: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Merge x (M, N, D) to exactly k tokens in one step: the N - k best adjacent edges of
    ``score`` (M, N - 1) (ties to the lower index) join their frames, and every run of joined
    frames becomes its ``weight``-weighted mean (None: the plain mean; a run whose weights sum to
    0 takes the plain mean). Returns the merged tokens (M, k, D) in float32 at least, the weight
    each carries (M, k; the run's size without ``weight``) and each run's first frame (M, k),
    ascending."""
    m, n, _ = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    x = at_least_float32(x)
    start = runs_from_edges(top_edges(score, n - k))
    ones = x.new_ones(m, n)
    total, size, first = merge_runs(x, ones, start, k)
    if weight is None:
        return total / size.unsqueeze(-1), size, first
    w = weight.to(x.dtype)
    wtotal, wsum, _ = merge_runs(x * w.unsqueeze(-1), w, start, k)
    plain = total / size.unsqueeze(-1)
    merged = torch.where((wsum > 0).unsqueeze(-1), wtotal / wsum.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1),
                         plain)
    return merged, wsum, first


def merge_adjacent_pairs(x: Tensor, k: int, metric: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A-ToMe-style adjacent token merging of x (M, N, D) down to exactly k tokens.

    One round (one A-ToMe module): the cosine of every token with the next one (of ``metric``'s
    tokens, merged alongside; default ``x``), the g - k best edges of a row holding g tokens
    selected (ties to the lower index), and each selected edge realised as a PAIR merge walking
    left to right (:func:`alternate_in_chains`: a token is merged once per round). Merged tokens
    are size-weighted means (sizes add), so a token stands for all the frames it holds. A round
    realises at least half of what it asks for, so ``(N - k).bit_length()`` rounds (static: no
    host sync) reach k in every row; rows already at k stay as they are.

    Returns the merged tokens (M, k, D) in float32 at least, their sizes (M, k) (frames each holds;
    they sum to N) and each token's first frame (M, k), ascending: a merged token takes the
    position of the earlier frame of its pair."""
    m, n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    x = at_least_float32(x)
    metric = x if metric is None else at_least_float32(metric)
    start = torch.ones(m, n, dtype=torch.bool, device=x.device)
    frames = torch.arange(n, device=x.device).expand(m, n)
    ones = x.new_ones(m, n)
    for _ in range((n - k).bit_length()):
        groups = start.sum(dim=1)  # (M,) tokens in each row now
        _, size, _ = merge_runs(x, ones, start, n)  # slots past a row's count hold size 0
        total, _, _ = merge_runs(metric, ones, start, n)
        mean = total / size.clamp_min(1).unsqueeze(-1)
        score = adjacent_similarity(mean)
        valid = frames[:, 1:] < groups[:, None]  # edge j joins tokens j and j + 1 of the row
        score = score.masked_fill(~valid, -torch.inf)
        realised = alternate_in_chains(top_edges(score, groups - k) & valid)
        # token j + 1's first frame stops opening a run: the (j+1)-th True of ``start``
        heads = start.to(torch.uint8).argsort(dim=1, descending=True, stable=True)  # True slots first, ascending
        cleared = torch.zeros_like(start).scatter(1, heads[:, 1:], realised)
        start = start & ~cleared
    total, size, first = merge_runs(x, ones, start, k)
    return total / size.unsqueeze(-1), size, first


def similar_runs(sim: Tensor, threshold: float) -> Tensor:
    """SA-MAP's greedy segmentation, batched: sim (M, N, N) similarities of the frames -> start
    (M, N) bool, True where a run begins. Walking left to right, frame j joins the current run
    [s, j) while ``mean_{i in [s, j)} sim[i, j] >= threshold``; the first frame that fails opens
    the next run. Every start s gives its run's end e(s) (the first failing j, or N) from prefix
    sums of ``sim``'s columns; the starts are the orbit 0, e(0), e(e(0)), ..., marked by pointer
    doubling in ``N.bit_length()`` steps (no loop over frames, no host sync)."""
    m, n, _ = sim.shape
    sim = sim.double()  # differences of prefix sums: keep the threshold test as exact as a direct mean
    # prefix[j, t] = sum_{i < t} sim[i, j]: the run [s, j)'s total at column j is prefix[j, j] - prefix[j, s]
    prefix = torch.cat([sim.new_zeros(m, n, 1), sim.transpose(1, 2).cumsum(dim=2)], dim=2)  # (M, j, t)
    cols = torch.arange(n, device=sim.device)
    at_j = prefix.gather(2, cols.view(1, n, 1).expand(m, n, 1))  # prefix[j, j] (M, N, 1)
    total = at_j.transpose(1, 2) - prefix[:, :, :n].transpose(1, 2)  # (M, s, j)
    span = (cols[None, :] - cols[:, None]).clamp_min(1)  # j - s
    fails = (cols[None, :] > cols[:, None]) & (total < threshold * span)
    fails = torch.cat([fails, torch.ones(m, n, 1, dtype=torch.bool, device=sim.device)], dim=2)  # j = N ends all
    end = fails.to(torch.uint8).argmax(dim=2)  # (M, N) the first failing j > s (argmax: first max)
    jump = torch.cat([end, torch.full((m, 1), n, device=sim.device)], dim=1)  # (M, N + 1), N a fixed point
    reach = torch.zeros(m, n + 1, dtype=torch.bool, device=sim.device)
    reach[:, 0] = True
    for _ in range(max(1, n.bit_length())):  # reach: {f^t(0) : t < 2^step}
        reach = reach | torch.zeros_like(reach, dtype=torch.int32).scatter_add(1, jump, reach.int()).bool()
        jump = jump.gather(1, jump)
    return reach[:, :n]


def loudest(energy: Tensor, k: int) -> Tensor:
    """energy (M, N) -> (M, k) indices of the k highest-energy frames of each row, ascending;
    among equal energies the earlier frame (a stable sort: silence padding is many equal values)."""
    order = at_least_float32(energy).argsort(dim=1, descending=True, stable=True)[:, :k]
    return order.sort(dim=1).values


def attention_to_tokens(attn: Tensor, tokens: int) -> Tensor:
    """Audio-encoder attention between frames (..., F, F) pooled to its first ``tokens`` tokens
    (..., T, T), each token the pair of frames 2t, 2t + 1 the encoder's stride-2 pool averages: a
    query token the mean of its 2 frames' rows, a key token the sum of its 2 frames' columns
    (SA-MAP's ``attn.reshape(N, 2, N, 2).mean(1).sum(-1)``)."""
    pairs = attn[..., : 2 * tokens, : 2 * tokens].unflatten(-1, (tokens, 2)).unflatten(-3, (tokens, 2))
    return pairs.mean(dim=-3).sum(dim=-1)
