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
def mmtok_official(text, x, clip, k, alpha=0.5, tv=0.02, vv=0.2):
    """Official ``mm_coverage_selection`` for one image: text (m, D) question tokens, x (n, D)
    projected tokens, clip (n, C) the tower's features before the projector."""
    def unit(t):
        return t / t.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    p_mat = unit(text) @ unit(x).T
    q_mat = unit(clip) @ unit(clip).T
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
    """The vision-vision term on the tower's features (``vision_features``), not the projected
    tokens: the official signal."""
    d, t_max = 12, 6
    real = [6, 3, 1]  # ragged prompts: padding rows must cover nothing
    xs = [tokens_with_duplicates(n, d, seed * 10 + i, dup) for i in range(3)]
    g = torch.Generator().manual_seed(100 + seed)
    clip = torch.randn(3, n, 7, generator=g, dtype=torch.float64)
    for i, x in enumerate(xs):  # a duplicated token has duplicated features
        first = [next(j for j in range(n) if torch.equal(x[j], x[q])) for q in range(n)]
        clip[i] = clip[i, first]
    text = torch.randn(3, t_max, d, generator=g, dtype=torch.float64)
    mask = torch.arange(t_max) < torch.tensor(real)[:, None]
    ctx = VisualContext(text=text * mask.unsqueeze(-1), text_mask=mask, vision_features=clip)
    index = get_press("mmtok", keep=k).press(batch(xs), ctx)[1]
    for i, x in enumerate(xs):
        ref = mmtok_official(text[i, : real[i]], x, clip[i], k)
        if dup:
            assert canonical(x, index[i].tolist()) == canonical(x, ref)
        else:
            assert index[i].tolist() == ref
    projected = get_press("mmtok", keep=k, similarity="projected").press(batch(xs), ctx)[1]
    for i, x in enumerate(xs):  # the option: the official greedy on the projected tokens
        ref = mmtok_official(text[i, : real[i]], x, x, k)
        assert canonical(x, projected[i].tolist()) == canonical(x, ref)


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


# ---- DyCoke TTM (temporal_merge) -------------------------------------------------------------
def dycoke_official(x, t, p, prune=0.7):
    """Official ``dycole_ttm(image_feature, p, prune)`` for one video, as written there: pairs
    (i, i+1), i even: frame i whole, frame i+1's int((1 - K) p) tokens least similar to frame i;
    then windows i = 0, 4, ... < t - 4: frame i + 2's tokens least similar to frame i. Returns the
    kept indices sorted (the official order is frame by frame, ascending similarity within)."""
    keep = int((1 - prune) * p)
    frames = x.view(t, p, -1)
    pairs = [F.cosine_similarity(F.normalize(frames[i], dim=1), F.normalize(frames[i + 1], dim=1), dim=1)
             for i in range(0, t - 1, 2)]
    kept = []
    for i in range(0, t - 1, 2):
        kept.append(torch.arange(p) + i * p)
        kept.append(pairs[i // 2].topk(keep, largest=False).indices + (i + 1) * p)
    for i in range(0, t - 4, 4):
        sim = F.cosine_similarity(frames[i], frames[i + 2], dim=1)
        kept[i] = torch.arange(p) + i * p
        kept[i + 2] = sim.topk(keep, largest=False).indices + (i + 2) * p
    return sorted(torch.cat(kept).tolist())


def video(t, p, d, seed, m=3):
    """m videos (m, t*p, d) float64 whose places drift slowly between frames."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, t, p, d, generator=g, dtype=torch.float64).cumsum(dim=1) * 0.5).reshape(m, t * p, d)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("t,h,w,prune", [(4, 3, 4, 0.7), (8, 3, 4, 0.7), (9, 2, 5, 0.7), (12, 4, 4, 0.5),
                                         (16, 3, 3, 0.7), (2, 3, 4, 0.3)])
def test_temporal_merge_matches_dycoke(seed, t, h, w, prune):
    p = h * w
    ref0 = dycoke_official(video(t, p, 6, seed)[0], t, p, prune)
    k = len(ref0)  # the official count: whole frames * P + compared frames * int((1 - K) P)
    tokens = video(t, p, 6, seed)
    ctx = VisualContext(grid=(h, w), grid_thw=(t, h, w))
    out, index = get_press("temporal_merge", keep=k).press(tokens, ctx)
    for i in range(3):
        assert index[i].tolist() == dycoke_official(tokens[i], t, p, prune)
    torch.testing.assert_close(out, tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, 6)))  # pruned, not merged


def test_temporal_merge_dycoke_ties_go_to_the_lower_place():
    """A static video: every cosine is 1, DyCoke's topk(largest=False) has only ties (order
    unspecified there); each compared frame keeps its first places."""
    t, h, w = 8, 3, 4
    p = h * w
    frame = 2.0 * torch.eye(p, dtype=torch.float64)  # cosines exactly 1 (unit vectors are exact)
    tokens = frame.expand(2, t, p, p).reshape(2, t * p, p)
    k = 3 * p + 12  # whole: 0, 4, 6; compared: 1, 2 (against 0), 3, 5, 7 share 12 as 3, 3, 2, 2, 2
    index = get_press("temporal_merge", keep=k).press(tokens, VisualContext(grid=(h, w), grid_thw=(t, h, w)))[1]
    whole = [0, 4, 6]
    expected = sorted([f * p + q for f in whole for q in range(p)]
                      + [f * p + q for f, n in zip([1, 2, 3, 5, 7], [3, 3, 2, 2, 2]) for q in range(n)])
    assert index[0].tolist() == expected and index[1].tolist() == expected


def test_temporal_merge_merge_option_is_size_weighted():
    """merge=True (HoliTom): a token left out joins its partner's token at the same place; with
    every frame identical up to scale, the merged token is the mean of its copies."""
    t, h, w = 8, 2, 3
    p = h * w
    tokens = video(t, p, 4, 0, m=2)
    k = 3 * p + 5 * 2
    ctx = VisualContext(grid=(h, w), grid_thw=(t, h, w))
    out, index = get_press("temporal_merge", keep=k, merge=True).press(tokens, ctx)
    pruned = get_press("temporal_merge", keep=k).press(tokens, ctx)[1]
    assert torch.equal(index, pruned)
    # the merged mass equals the total mass: sizes of the groups sum to N
    partner = {f: (f - 1 if f % 2 else (f - 2 if f % 4 == 2 and f < t - 2 else -1)) for f in range(t)}
    for i in range(2):
        kept = set(index[i].tolist())
        groups = {}
        for j in range(t * p):
            r = j
            while r not in kept:
                r = partner[r // p] * p + r % p
            groups.setdefault(r, []).append(j)
        ref = torch.stack([tokens[i, groups[j]].mean(0) for j in index[i].tolist()])
        torch.testing.assert_close(out[i], ref)


# ---- HoloV, EVS, FastVID: the existing official references, on ties and more seeds ----------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k,crops", [(8, None), (16, 4), (20, 3)])
def test_holov_matches_official_with_tied_attention_and_duplicates(seed, k, crops):
    """``holov_reference`` (tests/test_new_presses.py) is the official ``HoloV`` loop. Here the
    attention takes 4 values only (ties inside a crop go to the lower index; official ``topk``
    leaves them unspecified) and some tokens repeat."""
    from test_new_presses import holov_reference

    n = 48
    xs = [tokens_with_duplicates(n, 16, seed * 10 + i, dup=8) for i in range(3)]
    g = torch.Generator().manual_seed(seed)
    attn = torch.randint(1, 5, (3, n), generator=g).double()
    attn = attn / attn.sum(dim=1, keepdim=True)
    index = get_press("holov", keep=k, crops=crops).press(batch(xs), VisualContext(cls_attn=attn))[1]
    c = crops or max(1, int(1024 / 576 * n / k))
    for i, x in enumerate(xs):
        assert index[i].tolist() == holov_reference(x, attn[i], k, c)


@pytest.mark.parametrize("seed", SEEDS)
def test_evs_matches_vllm_with_exactly_static_places(seed):
    """``evs_reference`` (tests/test_video_presses.py) is vLLM's ``compute_retention_mask``. Half
    the places never change (unit vectors: dissimilarity exactly 0, ties broken by the stable
    sort to the earlier token), the others drift."""
    from test_video_presses import evs_reference

    t, h, w, d = 5, 2, 4, 16
    p = h * w
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(3, t, p, d, dtype=torch.float64)
    static = torch.arange(p) % 2 == 0
    x[:, :, static, : p] = 2.0 * torch.eye(p, dtype=torch.float64)[static]
    x[:, :, ~static, p:] = torch.randn(3, t, int((~static).sum()), d - p, generator=g, dtype=torch.float64)
    tokens = x.reshape(3, t * p, d)
    ctx = VisualContext(grid=(h, w), grid_thw=(t, h, w))
    for k in [p, p + 5, p + 16 + 3, 3 * p]:
        index = get_press("evs", keep=k).press(tokens, ctx)[1]
        for i in range(3):
            assert index[i].tolist() == evs_reference(tokens[i], (t, h, w), k).tolist()
