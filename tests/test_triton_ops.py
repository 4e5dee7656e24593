"""The Triton greedy kernels (ops.triton_greedy) against the PyTorch reference loops, on CPU through
Triton's interpreter (TRITON_INTERPRET=1 runs a kernel's program on CPU tensors with numpy).

Max-min diversity must give identical picks (a running minimum is exact). Coverage and the DPP
sum in another order than torch, so at a near-tie the kernel may take the other candidate: there
the test asks that both candidates have the same gain (to float precision), and exact ties
(duplicated candidates, zero gains) must go to the lowest index exactly as in the reference.
Skipped when triton is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The interpreter is chosen when triton is imported: set it first. When something imported triton
# earlier (conftest -> transformers does), the kernel tests re-run this file in a fresh process.
_PRESET = os.environ.get("TRITON_INTERPRET") == "1"
_FRESH = "triton" not in sys.modules
if _FRESH:
    os.environ.setdefault("TRITON_INTERPRET", "1")
IN_PROCESS = _PRESET or (_FRESH and os.environ.get("TRITON_INTERPRET") == "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("triton")

from mmpress.ops import triton_greedy  # noqa: E402
from mmpress.ops.coverage import greedy_coverage, greedy_coverage_torch  # noqa: E402
from mmpress.ops.dpp import greedy_dpp_map, greedy_dpp_map_torch  # noqa: E402
from mmpress.ops.diversity import farthest_nearest_neighbour, greedy_max_min, max_min_diversity  # noqa: E402
from mmpress.ops.similarity import cosine_distance, cosine_similarity  # noqa: E402

interpreted = pytest.mark.skipif(not IN_PROCESS, reason="triton imported before TRITON_INTERPRET=1: "
                                 "run by test_kernels_in_fresh_interpreter")


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_kernels_in_fresh_interpreter():
    """This file's kernel tests in a process that imports triton with TRITON_INTERPRET=1 (no
    conftest, so nothing imports triton first)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
                           str(Path(__file__))], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


kernel_settings = settings(max_examples=10, deadline=None, derandomize=True)


def tokens(m, n, d=8, distinct=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, d, generator=g)
    if distinct:  # duplicated tokens: every later distance / gain ties
        x = x[:, torch.randint(0, min(distinct, n), (n,), generator=g)]
    return x


def check_max_min(x, k):
    dist = cosine_distance(x)
    first = farthest_nearest_neighbour(dist)
    got = triton_greedy.max_min(dist, first, k)
    assert torch.equal(got, greedy_max_min(dist, k, first))


def first_divergence(g_row, r_row, k):
    """The first step where the kernel's picks leave the reference's (None: identical); there both
    picks must be (near-)equal greedy choices. The kernel's k picks must be unique."""
    assert len(set(g_row.tolist())) == k
    differ = (g_row != r_row).nonzero()
    return differ[0].item() if len(differ) else None


def check_coverage(cover, k):
    got, ref = triton_greedy.greedy_coverage(cover, k), greedy_coverage_torch(cover, k)
    assert got.shape == ref.shape and got.dtype == torch.long
    for g_row, r_row, c in zip(got, ref, cover):
        i = first_divergence(g_row, r_row, k)
        if i is None:
            continue
        best = c[:, g_row[:i]].amax(dim=1, keepdim=True).clamp_min(0) if i else torch.zeros(c.shape[0], 1)
        gain = (c - best).clamp_min(0).sum(dim=0)
        assert gain[g_row[i]] > 0, "exact zero-gain ties must go to the lowest index"
        torch.testing.assert_close(gain[g_row[i]], gain[r_row[i]], rtol=1e-5, atol=1e-7)


def dpp_kernel(m, n, d=8, distinct=None, seed=0):
    """CDPruner's kernel diag(q) S diag(q): S the tokens' cosines (rank <= d), q in (0, 1]."""
    x = tokens(m, n, d=d, distinct=distinct, seed=seed)
    sim = cosine_similarity(x)
    sim.diagonal(dim1=1, dim2=2).fill_(1.0)
    q = torch.rand(m, n, generator=torch.Generator().manual_seed(seed + 1)) + 1e-3
    if distinct:  # duplicated tokens of equal quality: exact ties
        q = q[:, :1].expand(m, n).contiguous()
    return q.unsqueeze(-1) * sim * q.unsqueeze(-2)


def residuals(kernel, picked):
    """float64 d_j^2 = L_jj - L_jS L_S^+ L_Sj of every item given the picked set S (one image)."""
    L = kernel.double()
    if len(picked) == 0:
        return L.diagonal().clone()
    ls = L[:, picked]  # (N, |S|)
    return L.diagonal() - (ls @ torch.linalg.pinv(L[picked][:, picked], hermitian=True) * ls).sum(dim=1)


def check_dpp(kernel, k):
    got, ref = triton_greedy.greedy_dpp(kernel, k), greedy_dpp_map_torch(kernel, k)
    assert got.shape == ref.shape == (kernel.shape[0], k) and got.dtype == torch.long
    for g_row, r_row, L in zip(got, ref, kernel):
        i = first_divergence(g_row, r_row, k)
        if i is None:
            continue
        d2 = residuals(L, g_row[:i])
        scale = L.diagonal().abs().max().double()
        assert abs(d2[g_row[i]] - d2[r_row[i]]) <= 1e-4 * scale, (i, d2[g_row[i]], d2[r_row[i]])


@interpreted
@pytest.mark.parametrize(("m", "n", "k", "d", "distinct"), [
    (1, 1, 1, 8, None), (2, 37, 1, 8, None), (3, 37, 10, 16, None), (2, 40, 40, 64, None),
    (2, 33, 20, 4, None), (2, 50, 50, 8, 3), (1, 129, 40, 32, None), (1, 600, 24, 64, None),
])
def test_dpp_kernel_matches_reference(m, n, k, d, distinct):
    """Full rank, rank below k (the eps path: picks without a factor update), duplicates."""
    check_dpp(dpp_kernel(m, n, d=d, distinct=distinct, seed=n + k), k)


@interpreted
def test_dpp_kernel_identical_picks_when_well_separated():
    """Away from near-ties (full rank: no residual sinks to float noise) the picks are identical,
    in order; a 0.1% error in the residual update changes them here."""
    for m, n, k, d in [(2, 200, 100, 128), (1, 150, 120, 160)]:
        kernel = dpp_kernel(m, n, d=d, seed=0)
        assert torch.equal(triton_greedy.greedy_dpp(kernel, k), greedy_dpp_map_torch(kernel, k))


@interpreted
@kernel_settings
@given(st.integers(1, 2), st.integers(1, 40), st.data())
def test_dpp_kernel_property(m, n, data):
    k = data.draw(st.integers(1, n))
    distinct = data.draw(st.sampled_from([None, 1, 2, 5]))
    check_dpp(dpp_kernel(m, n, d=data.draw(st.integers(1, 48)), distinct=distinct,
                         seed=data.draw(st.integers(0, 99))), k)


@interpreted
@pytest.mark.parametrize(("m", "n", "k", "distinct"), [
    (1, 1, 1, None), (2, 37, 1, None), (3, 37, 10, None), (2, 64, 64, None), (2, 50, 50, 3),
    (1, 100, 30, 1), (2, 129, 40, None),
])
def test_max_min_kernel_matches_reference(m, n, k, distinct):
    check_max_min(tokens(m, n, distinct=distinct), k)


@interpreted
@pytest.mark.parametrize("distinct", [None, 3])
def test_max_min_tiled_kernel_matches_reference(monkeypatch, distinct):
    """N beyond one register block: the running minimum streams through scratch, tile by tile."""
    monkeypatch.setattr(triton_greedy, "MAX_BLOCK_N", 16)
    check_max_min(tokens(2, 50, distinct=distinct), 50)
    check_max_min(tokens(1, 33, distinct=distinct, seed=1), 7)


@interpreted
def test_max_min_first_pick_is_passed_in():
    dist = cosine_distance(tokens(3, 20))
    first = torch.tensor([5, 0, 19])
    got = triton_greedy.max_min(dist, first, 8)
    assert got[:, 0].tolist() == [5, 0, 19]
    assert torch.equal(got, greedy_max_min(dist, 8, first))


@interpreted
@pytest.mark.parametrize(("m", "r", "n", "k"), [
    (1, 1, 1, 1), (2, 23, 37, 10), (1, 0, 5, 5), (3, 40, 16, 16), (2, 7, 50, 50), (2, 70, 33, 12),
])
def test_coverage_kernel_matches_reference(m, r, n, k):
    cover = torch.rand(m, r, n, generator=torch.Generator().manual_seed(r * n)).softmax(dim=-1)
    check_coverage(cover, k)


@interpreted
def test_coverage_kernel_exact_ties():
    """Duplicated candidates and all-zero gains: the same lowest-index picks as the reference."""
    g = torch.Generator().manual_seed(0)
    cover = torch.rand(2, 30, 6, generator=g)[:, :, torch.tensor([0, 1, 0, 2, 1, 0, 3, 3, 2, 4])]
    cover[1, :, 4:] = 0  # candidates that cover nothing
    got = triton_greedy.greedy_coverage(cover, 10)
    assert torch.equal(got, greedy_coverage_torch(cover, 10))
    negative = -torch.rand(1, 5, 9, generator=g)  # nothing covers anything: 0, 1, 2, ...
    assert triton_greedy.greedy_coverage(negative, 9)[0].tolist() == list(range(9))


@interpreted
@kernel_settings
@given(st.integers(1, 2), st.integers(1, 40), st.data())
def test_max_min_kernel_property(m, n, data):
    k = data.draw(st.integers(1, n))
    distinct = data.draw(st.sampled_from([None, 1, 2, 5]))
    check_max_min(tokens(m, n, d=data.draw(st.integers(1, 6)), distinct=distinct, seed=data.draw(st.integers(0, 99))), k)


@interpreted
@kernel_settings
@given(st.integers(1, 2), st.integers(0, 30), st.integers(1, 24), st.data())
def test_coverage_kernel_property(m, r, n, data):
    k = data.draw(st.integers(1, n))
    cover = torch.rand(m, r, n, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    if data.draw(st.booleans()):
        cover = cover.softmax(dim=-1)  # MMTok's rows are distributions
    check_coverage(cover, k)


def test_dispatch_uses_reference_off_cuda_and_when_disabled(monkeypatch):
    """CPU tensors never reach the kernels; set_enabled(False) forces the reference on CUDA too."""
    called = []
    monkeypatch.setattr(triton_greedy, "max_min", lambda *a: called.append("max_min"))
    monkeypatch.setattr(triton_greedy, "greedy_coverage", lambda *a: called.append("coverage"))
    monkeypatch.setattr(triton_greedy, "greedy_dpp", lambda *a: called.append("dpp"))
    x = tokens(2, 12)
    max_min_diversity(x, 4)
    greedy_coverage(torch.rand(2, 5, 12), 4)
    greedy_dpp_map(dpp_kernel(2, 12), 4)
    assert called == []
    previous = triton_greedy.set_enabled(False)
    try:
        assert not triton_greedy.use_triton(torch.zeros(1))
    finally:
        triton_greedy.set_enabled(previous)
