"""Pre-LLM presses against re-implementations of their OFFICIAL selection, written from reading the
official code (one image or video at a time, plain Python loops, float64 where ties threaten):

- divprune        vbdi/divprune, ``LLaVA/llava/model/llava_arch.py: DivPrune``
- mmtok           Ironieser/MMTok, ``mmtok/core/semantic_selector.py: mm_coverage_selection``
- tome            facebookresearch/ToMe, ``tome/merge.py: bipartite_soft_matching`` + ``merge_wavg``
- temporal_merge  KD-TAO/DyCoke, ``llava/model/llava_arch.py: dycole_ttm``
- holov, evs, fastvid: the references already in tests/test_new_presses.py
  (``holov_reference``: official ``HoloV`` loop) and tests/test_video_presses.py
  (``evs_reference``: vLLM ``compute_retention_mask``; ``fastvid_reference``: the official
  LLaVA-OneVision loop); here only the cases they leave out (ties, duplicated tokens).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmpress.presses import VisualContext, get_press

SEEDS = [0, 1, 2]


def tokens_with_duplicates(n, d, seed, dup=0):
    """(n, d) float64 random tokens; the last ``dup`` repeat earlier ones exactly (ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if dup:
        x[n - dup :] = x[torch.randperm(n - dup, generator=g)[:dup]]
    return x


def batch(xs):
    return torch.stack(xs)


def canonical(x, index):
    """Each index replaced by the lowest index of an identical token, sorted: which of two
    identical tokens a greedy takes is decided by the last bit of a matrix product (BLAS blocking),
    in the official code as in ours, so with duplicates the kept CONTENT is what must match."""
    first = [next(j for j in range(len(x)) if torch.equal(x[j], x[i])) for i in index]
    return sorted(first)


# ---- DivPrune --------------------------------------------------------------------------------
def divprune_official(x, k):
    """Official ``DivPrune`` for one image: cosine distance 1 - cos of the LM-input tokens; first
    pick argmax of each column's 2nd-smallest distance (the smallest is the token itself), then
    argmax over columns of the min distance to the picked rows. No masking of picked tokens
    (valid while k stays below the number of distinct tokens). Returned sorted, as the official
    ``keep_indexs.sort()``."""
    unit = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.T
    picks = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = dist[picks].min(dim=0).values
        picks.append(int(torch.argmax(scores)))
    return sorted(picks)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,d,k,dup", [(48, 16, 8, 0), (48, 16, 30, 0), (36, 5, 12, 6), (64, 8, 40, 10)])
def test_divprune_matches_official(seed, n, d, k, dup):
    xs = [tokens_with_duplicates(n, d, seed * 10 + i, dup) for i in range(3)]
    index = get_press("divprune", keep=k).press(batch(xs), VisualContext())[1]
    for i, x in enumerate(xs):
        assert index[i].tolist() == divprune_official(x, k)


# ---- MMTok -----------------------------------------------------------------------------------
def mmtok_official(text, x, k, alpha=0.5, tv=0.02, vv=0.2):
    """Official ``mm_coverage_selection`` for one image: text (m, D) question tokens, x (n, D)
    tokens (here also the features of the vision-vision term, see the press's deviations)."""
    def unit(t):
        return t / t.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    p_mat = unit(text) @ unit(x).T
    q_mat = unit(x) @ unit(x).T
    m, n = p_mat.shape
    p_mat = F.softmax(p_mat / tv, dim=1) / m
    q_mat = F.softmax(q_mat / vv, dim=1) / n
    combined = torch.cat([p_mat, q_mat * alpha], dim=0)
    best = torch.zeros(m + n, dtype=x.dtype)
    mask = torch.zeros(n, dtype=x.dtype)
    picks = []
    for _ in range(k):
        delta = (combined - best.unsqueeze(1)).clamp_min(0).sum(0) + mask
        b = int(torch.argmax(delta))
        picks.append(b)
        best = torch.maximum(best, combined[:, b])
        mask[b] = float("-inf")
    return sorted(picks)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,k,dup", [(40, 6, 0), (40, 25, 0), (30, 12, 8)])
def test_mmtok_matches_official(seed, n, k, dup):
    d, t_max = 12, 6
    real = [6, 3, 1]  # ragged prompts: padding rows must cover nothing
    xs = [tokens_with_duplicates(n, d, seed * 10 + i, dup) for i in range(3)]
    g = torch.Generator().manual_seed(100 + seed)
    text = torch.randn(3, t_max, d, generator=g, dtype=torch.float64)
    mask = torch.arange(t_max) < torch.tensor(real)[:, None]
    ctx = VisualContext(text=text * mask.unsqueeze(-1), text_mask=mask)
    index = get_press("mmtok", keep=k).press(batch(xs), ctx)[1]
    for i, x in enumerate(xs):
        ref = mmtok_official(text[i, : real[i]], x, k)
        if dup:
            assert canonical(x, index[i].tolist()) == canonical(x, ref)
        else:
            assert index[i].tolist() == ref


# ---- ToMe ------------------------------------------------------------------------------------
def tome_official(x, k):
    """Official ``bipartite_soft_matching`` + ``merge_wavg`` rounds for one image down to k
    tokens, r = min(N - k, N // 2) per round, each round on the previous round's output order
    (unmerged A by descending edge, then B). Positions: the B token a token ends in. Returns
    (positions ascending, merged tokens in that order). Edge ties broken stably (the official
    argsort leaves them unspecified)."""
    size = torch.ones(len(x), 1, dtype=x.dtype)
    pos = torch.arange(len(x))
    while len(x) > k:
        r = min(len(x) - k, len(x) // 2)
        metric = x / x.norm(dim=-1, keepdim=True)
        node_max, node_idx = (metric[::2] @ metric[1::2].T).max(dim=-1)
        edge_idx = node_max.argsort(descending=True, stable=True)
        unm, src = edge_idx[r:], edge_idx[:r]
        dst = node_idx[src]

        def merge(t):
            a, b = t[::2], t[1::2].clone()
            b.index_add_(0, dst, a[src])
            return torch.cat([a[unm], b])

        total, size = merge(x * size), merge(size)
        x = total / size
        pos = torch.cat([pos[::2][unm], pos[1::2]])
    order = pos.argsort()
    return pos[order], x[order]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,k,dup", [(48, 40, 0), (48, 20, 0), (48, 5, 0), (37, 9, 0), (40, 10, 12)])
def test_tome_matches_official(seed, n, k, dup):
    xs = [tokens_with_duplicates(n, 8, seed * 10 + i, dup) for i in range(3)]
    out, index = get_press("tome", keep=k).press(batch(xs), VisualContext())
    for i, x in enumerate(xs):
        ref_pos, ref_x = tome_official(x, k)
        assert index[i].tolist() == ref_pos.tolist()
        torch.testing.assert_close(out[i], ref_x)


def test_tome_official_order_differs_from_reorder_option():
    """Several rounds, one of odd length (its unmerged A token leads the next split): the official order between rounds and the position-order option select
    differently, so the default is really the official one."""
    xs = [tokens_with_duplicates(45, 8, s) for s in range(4)]  # 45 -> 23: an odd round
    official = get_press("tome", keep=6).press(batch(xs), VisualContext())[1]
    reordered = get_press("tome", keep=6, reorder=True).press(batch(xs), VisualContext())[1]
    assert not torch.equal(official, reordered)
