"""ToMe inside the vision tower (``tome_vit``): the pure ops (ToMe's bipartite soft matching,
size-weighted merge), our block forward for CLIP / SigLIP / DINOv2 layers, and the press on tiny
random models, each checked against a reference written from the official code
(facebookresearch/ToMe ``tome/merge.py``, ``tome/patch/timm.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmpress.ops.merge import (Matching, bipartite_soft_matching, merge, merge_representatives, merge_wavg,
                               parse_r)

ops_settings = settings(max_examples=40, deadline=None)


# ---- a reference of the official matching, one row at a time -----------------------------------
def reference_matching(metric: torch.Tensor, r: int, class_token: bool):
    """The official ``bipartite_soft_matching`` read line by line, per row in Python (float64):
    returns the kept A indices (in order), the merged A indices and their B partners, and the merged
    sequence order as original indices."""
    out = []
    for row in metric.double():
        n = row.shape[0]
        rr = min(r, (n - int(class_token)) // 2)
        na = (n + 1) // 2
        if rr <= 0:
            out.append((list(range(na)), [], []))
            continue
        unit = row / row.norm(dim=-1, keepdim=True)
        a, b = unit[0::2], unit[1::2]
        best, partner = [], []
        for i in range(a.shape[0]):
            if class_token and i == 0:
                best.append(-math.inf)
                partner.append(0)
                continue
            sims = [float(a[i] @ b[j]) for j in range(b.shape[0])]
            j = max(range(len(sims)), key=lambda t: (sims[t], -t))  # first maximum, as torch.max
            best.append(sims[j])
            partner.append(j)
        edges = sorted(range(na), key=lambda i: -best[i])  # stable: ties keep the lower A index
        unm, src = edges[rr:], edges[:rr]
        if class_token:
            unm = sorted(unm)
        out.append((unm, src, [partner[i] for i in src]))
    return out


@st.composite
def metrics(draw, max_n=17):
    m = draw(st.integers(1, 3))
    n = draw(st.integers(2, max_n))
    d = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    # few distinct values so ties (equal edges) happen often
    g = torch.Generator().manual_seed(seed)
    levels = draw(st.sampled_from([None, 3]))
    x = torch.randn(m, n, d, generator=g, dtype=torch.float64)
    if levels:
        x = torch.randint(-levels, levels + 1, (m, n, d), generator=g).double() + 0.1
    return x, draw(st.integers(0, n)), draw(st.integers(0, 1))


@ops_settings
@given(metrics())
def test_matching_equals_the_official_algorithm(case):
    """Same kept / merged / destination tokens and the same output order as the official code."""
    metric, r, protected = case
    got = bipartite_soft_matching(metric, r, protected)
    want = reference_matching(metric, r, bool(protected))
    for i, (unm, src, dst) in enumerate(want):
        assert got.unm[i].tolist() == unm
        assert got.src[i].tolist() == src
        assert got.dst[i].tolist() == dst


@ops_settings
@given(metrics(), st.data())
def test_merge_wavg_conserves_sizes_and_protects(case, data):
    """Sizes sum to the original count, exactly r' = min(r, (N - p) // 2) tokens fewer, the
    size-weighted sum is conserved, protected tokens come out untouched (first, size 1)."""
    metric, r, protected = case
    m, n, _ = metric.shape
    x = torch.randn(m, n, 3, dtype=torch.float64)
    size = torch.tensor(data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)),
                        dtype=torch.float64).expand(m, n)
    match = bipartite_soft_matching(metric, r, protected)
    rr = max(0, min(r, (n - protected) // 2))
    assert match.r == rr
    merged, new_size = merge_wavg(x, match, size)
    assert merged.shape == (m, n - rr, 3) and new_size.shape == (m, n - rr)
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    torch.testing.assert_close((merged * new_size[..., None]).sum(1), (x * size[..., None]).sum(1))
    rep = merge_representatives(torch.arange(n).expand(m, n), match)
    assert (rep.sort(1).values.diff(1) > 0).all()  # each original index represents at most one token
    if protected:
        assert (rep[:, 0] == 0).all() and (new_size[:, 0] == size[:, 0]).all()
        torch.testing.assert_close(merged[:, 0], x[:, 0])
    # every token's value is the weighted mean of the originals that chose its representative
    for i in range(m):
        group = {int(t): [int(t)] for t in rep[i]}
        a_idx = torch.arange(0, n, 2)
        b_idx = torch.arange(1, n, 2)
        for s, d in zip(match.src[i].tolist(), match.dst[i].tolist()):
            group[int(b_idx[d])].append(int(a_idx[s]))
        for j, t in enumerate(rep[i].tolist()):
            w = size[i, group[t]]
            torch.testing.assert_close(merged[i, j], (x[i, group[t]] * w[:, None]).sum(0) / w.sum())


def test_merge_identity_at_r_zero_and_default_size():
    x = torch.randn(2, 7, 4)
    match = bipartite_soft_matching(x, 0)
    assert match.r == 0
    merged, size = merge_wavg(x, match)
    assert merged.shape == x.shape and (size == 1).all()
    # the identity keeps the order: A then B, which is a permutation: representatives say which
    rep = merge_representatives(torch.arange(7).expand(2, 7), match)
    torch.testing.assert_close(merged, x[:, rep[0]])


def test_matching_merges_identical_pairs():
    base = torch.randn(1, 4, 8)
    x = base.repeat_interleave(2, dim=1)  # a a b b c c d d: each A token's twin is its B neighbour
    match = bipartite_soft_matching(x, 4)
    merged, size = merge_wavg(x, match)
    torch.testing.assert_close(merged, base)
    assert size.tolist() == [[2.0] * 4]
    assert merge_representatives(torch.arange(8)[None], match).tolist() == [[1, 3, 5, 7]]


def test_parse_r_is_the_official_schedule():
    assert parse_r(4, 8) == [8, 8, 8, 8]
    assert parse_r(5, (8, -1.0)) == [16, 12, 8, 4, 0]  # the paper's decreasing schedule
    assert parse_r(5, (8, 1.0)) == [0, 4, 8, 12, 16]
    assert parse_r(3, [1, 2]) == [1, 2, 0]
    with pytest.raises(ValueError, match="non-negative int"):
        parse_r(3, -1)
    with pytest.raises(ValueError, match="inflect"):
        parse_r(3, (8, 2.0))


def test_protected_must_be_a_count():
    with pytest.raises(ValueError, match="protected"):
        bipartite_soft_matching(torch.randn(1, 4, 2), 1, protected=True)
