"""VisPruner, HoloV and CDPruner: shapes and budgets, batch = each image alone, agreement with naive
per-image references of each official algorithm, and properties of the greedy DPP (ops/dpp.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mmpress.ops.dpp import greedy_dpp_map
from mmpress.presses import VisualContext, get_press

M, H, W, D, T = 3, 6, 8, 16, 7
N = H * W
NAMES = ["vispruner", "holov", "cdpruner"]
ops_settings = settings(max_examples=60, deadline=None, derandomize=True)


def make_inputs(m=M, n=N, d=D, dtype=torch.float32, seed=0):
    """Tokens (m, n, d) and a context with every signal; ragged prompts (7, 2 and 0 real tokens)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(m, n, d, generator=g, dtype=dtype)
    text_mask = torch.arange(T) < torch.tensor([T, 2, 0] * m)[:m, None]
    ctx = VisualContext(grid=(H, W) if n == N else None,
                        cls_attn=torch.randn(m, n, generator=g).mul(2).softmax(dim=-1),
                        vision_keys=torch.randn(m, n, 8, generator=g),
                        vision_features=torch.randn(m, n, 12, generator=g, dtype=dtype),
                        text=torch.randn(m, T, d, generator=g, dtype=dtype) * text_mask.unsqueeze(-1),
                        text_mask=text_mask)
    return tokens, ctx


def alone(ctx: VisualContext, i: int) -> VisualContext:
    """Image i's context alone, its prompt trimmed to its real tokens."""
    t = int(ctx.text_mask[i].sum())
    return VisualContext(grid=ctx.grid, cls_attn=ctx.cls_attn[i : i + 1], vision_keys=ctx.vision_keys[i : i + 1],
                         vision_features=ctx.vision_features[i : i + 1],
                         text=ctx.text[i : i + 1, :t], text_mask=ctx.text_mask[i : i + 1, :t])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- every new press -------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 2, 7, 16, 33, N - 1])
def test_budget_shapes_unique_sorted(name, k):
    tokens, ctx = make_inputs()
    out, index = get_press(name, keep=k).press(tokens, ctx)
    assert out.shape == (M, k, D) and index.shape == (M, k) and index.dtype == torch.long
    assert ((index >= 0) & (index < N)).all() and (index.diff(dim=1) > 0).all()
    assert torch.equal(out, tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, D)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [3, 16])
def test_batch_equals_each_image_alone(name, k):
    tokens, ctx = make_inputs()
    press = get_press(name, keep=k)
    index = press.press(tokens, ctx)[1]
    for i in range(M):
        assert torch.equal(index[i : i + 1], press.press(tokens[i : i + 1], alone(ctx, i))[1])


@pytest.mark.parametrize("name", NAMES)
def test_options_are_validated(name):
    bad = {"vispruner": dict(important_ratio=1.5), "holov": dict(crops=0), "cdpruner": dict(theta=1.0)}[name]
    with pytest.raises(ValueError):
        get_press(name, keep=8, **bad)


# ---- VisPruner -------------------------------------------------------------------------------
def vispruner_reference(x, attn, k, ratio=0.5, per_round=8):
    """The official loop, one image, Python lists: important by attention, then rounds of
    bipartite duplicate removal over the rest in descending-attention order. ``x``: the vision
    features before the projector (official ``image_features``)."""
    important = int(k * ratio)
    order = sorted(range(len(attn)), key=lambda i: (-float(attn[i]), i))
    rest, unit = order[important:], F.normalize(x, dim=-1)
    while important < k and len(rest) > k - important:
        a, b = rest[::2], rest[1::2]
        drop = min(per_round, len(rest) - (k - important), len(a))
        score = [max(float(unit[i] @ unit[j]) for j in b) for i in a]
        ranked = sorted(range(len(a)), key=lambda t: (-score[t], t))
        rest = [a[t] for t in ranked[drop:]] + b
    return sorted(order[:important] + (rest if important < k else []))


@pytest.mark.parametrize("k,ratio,per_round", [(1, 0.5, 8), (5, 0.5, 8), (12, 0.75, 8), (20, 0.5, 3), (9, 0.0, 8),
                                               (9, 1.0, 8), (N - 3, 0.5, 8)])
def test_vispruner_matches_reference(k, ratio, per_round):
    tokens, ctx = make_inputs(dtype=torch.float64)
    index = get_press("vispruner", keep=k, important_ratio=ratio, per_round=per_round).press(tokens, ctx)[1]
    for i in range(M):
        assert index[i].tolist() == vispruner_reference(ctx.vision_features[i], ctx.cls_attn[i], k, ratio, per_round)
    projected = get_press("vispruner", keep=k, important_ratio=ratio, per_round=per_round, similarity="projected")
    for i, row in enumerate(projected.press(tokens, ctx)[1]):  # the option: the LM input tokens' similarity
        assert row.tolist() == vispruner_reference(tokens[i], ctx.cls_attn[i], k, ratio, per_round)


def test_vispruner_keeps_important_and_drops_duplicates():
    """6 tight clusters of 8; attention on cluster 0: the important half is cluster 0's top tokens,
    the diverse half reaches the other clusters (attention alone would stay in cluster 0)."""
    centres = torch.randn(6, D) * 5
    tokens = (centres.repeat_interleave(8, 0) + 0.01 * torch.randn(N, D)).unsqueeze(0)
    attn = torch.rand(1, N) * 0.1
    attn[0, :8] += 1
    index = get_press("vispruner", keep=12).press(tokens, VisualContext(cls_attn=attn, vision_features=tokens))[1][0]
    assert set(attn[0].topk(6).indices.tolist()) <= set(index.tolist())
    assert len(set((index // 8).tolist())) >= 5


# ---- HoloV -------------------------------------------------------------------------------------
def holov_reference(x, attn, k, crops, alpha=0.09, eps=1e-6):
    """The official ``HoloV`` loop, one image, plus our surplus rule (crops that cannot take
    their budget hand it to the best-attended tokens left)."""
    n = len(attn)
    crops = min(crops, n)
    q, rem = divmod(n, crops)
    bounds, start = [], 0
    for c in range(crops):
        bounds.append((start, start + q + (c < rem)))
        start = bounds[-1][1]
    scores = []
    for s, e in bounds:
        a = attn[s:e]
        if e - s == 1:
            scores.append(float(a[0]))
            continue
        f = x[s:e] / (x[s:e].norm(dim=1, keepdim=True) + eps)
        sim = (f @ f.T) * (1 - torch.eye(e - s, dtype=f.dtype))
        mean = sim.sum(1) / (e - s - 1)
        var = ((sim - mean[:, None]) ** 2).sum(1) / (e - s - 1)
        scaled = a * 1e3
        scale = scaled.abs().mean() / (var.abs().mean() + eps)
        scores.append(float((scaled + alpha * var * scale).mean()))
    weights = [s / (sum(scores) + eps) for s in scores]
    budget = [math.floor(w * k) for w in weights]
    for c in sorted(range(crops), key=lambda c: (-weights[c], c))[: max(k - sum(budget), 0)]:
        budget[c] += 1
    kept = []
    for (s, e), b in zip(bounds, budget):
        kept += sorted(range(s, e), key=lambda i: (-float(attn[i]), i))[: min(b, e - s)]
    others = sorted(set(range(n)) - set(kept), key=lambda i: (-float(attn[i]), i))
    return sorted(kept + others[: k - len(kept)])


@pytest.mark.parametrize("k,crops", [(1, None), (4, None), (8, 4), (16, None), (16, 5), (30, 3), (40, 16), (N - 1, 7)])
def test_holov_matches_reference(k, crops):
    tokens, ctx = make_inputs(dtype=torch.float64)
    ctx.cls_attn = ctx.cls_attn.double()
    index = get_press("holov", keep=k, crops=crops).press(tokens, ctx)[1]
    c = crops or max(1, int(1024 / 576 * N / k))
    for i in range(M):
        assert index[i].tolist() == holov_reference(tokens[i], ctx.cls_attn[i], k, c)


def test_holov_crop_rule_and_surplus():
    """Official crop count: 16 at 64 of 576 tokens. Attention piled on one crop gives it more
    budget than it holds: it keeps all its tokens and the surplus still yields exactly k."""
    tokens, ctx = make_inputs(m=1)
    ctx.cls_attn = torch.full((1, N), 1e-4)
    ctx.cls_attn[0, :6] = 1.0  # crop 0 of 4 (12 tokens): 6 tokens, most of the attention
    index = get_press("holov", keep=24, crops=4).press(tokens, ctx)[1][0]
    assert index.shape == (24,) and (index.diff() > 0).all() and set(range(12)) <= set(index.tolist())
    assert max(1, 1024 * 576 // (576 * 64)) == 16


# ---- CDPruner -------------------------------------------------------------------------------
def logdet_greedy(kernel, k):
    """Naive greedy MAP: each step the item maximising log det of the picked block."""
    picked = []
    for _ in range(k):
        gains = {j: torch.logdet(kernel[picked + [j]][:, picked + [j]]) for j in range(len(kernel)) if j not in picked}
        picked.append(max(gains, key=lambda j: (gains[j], -j)))
    return picked


def cdpruner_reference(x, text, k):
    unit, text = F.normalize(x, dim=-1), F.normalize(text, dim=-1)
    r = (-(unit @ text.T)).mean(1) if len(text) else torch.zeros(len(x), dtype=x.dtype)  # official: negated
    q = (r - r.min() + 1e-6) / (r.max() - r.min()) if r.max() > r.min() else torch.ones_like(r)
    sim = (unit @ unit.T).fill_diagonal_(1.0)
    return sorted(logdet_greedy(q[:, None] * sim * q[None], k))


@pytest.mark.parametrize("k", [1, 3, 8, 11])
def test_cdpruner_matches_reference(k):
    tokens, ctx = make_inputs(n=12, dtype=torch.float64)  # N <= D: a full-rank kernel
    index = get_press("cdpruner", keep=k).press(tokens, ctx)[1]
    for i in range(M):
        t = int(ctx.text_mask[i].sum())
        assert index[i].tolist() == cdpruner_reference(tokens[i], ctx.text[i, :t], k)


def test_cdpruner_follows_the_text_and_spreads():
    """Text equal to token 5: with the official negated sign token 5 gets the lowest relevance
    and is not kept; un-negated it is the most relevant, so the first pick. 4 clusters and no
    text: one token per cluster (near-duplicates add no volume)."""
    tokens, ctx = make_inputs(m=1)
    ctx.text, ctx.text_mask = tokens[:, [5]], torch.ones(1, 1, dtype=torch.bool)
    press, flipped = get_press("cdpruner", keep=4), get_press("cdpruner", keep=4, negate_relevance=False)
    assert press.relevance(tokens, ctx).argmin().item() == 5 and 5 not in press.press(tokens, ctx)[1][0].tolist()
    assert flipped.relevance(tokens, ctx).argmax().item() == 5 and 5 in flipped.press(tokens, ctx)[1][0].tolist()
    centres = torch.randn(4, D) * 5
    clustered = (centres.repeat_interleave(12, 0) + 0.01 * torch.randn(N, D)).unsqueeze(0)
    no_text = VisualContext(text=torch.zeros(1, 0, D), text_mask=torch.zeros(1, 0, dtype=torch.bool))
    assert sorted((press.press(clustered, no_text)[1][0] // 12).tolist()) == [0, 1, 2, 3]


def test_cdpruner_theta_and_negation_change_the_kernel():
    tokens, ctx = make_inputs()
    base = get_press("cdpruner", keep=10).press(tokens, ctx)[1]
    assert not torch.equal(base, get_press("cdpruner", keep=10, negate_relevance=False).press(tokens, ctx)[1])
    no_text = VisualContext(text=ctx.text[:, :0], text_mask=ctx.text_mask[:, :0])  # q = 1, as exp(0 * r)
    assert torch.equal(get_press("cdpruner", keep=10, theta=0.0).press(tokens, ctx)[1],
                       get_press("cdpruner", keep=10).press(tokens, no_text)[1])


# ---- ops/dpp.py: greedy MAP of a DPP -------------------------------------------------------------
@st.composite
def kernels(draw, max_n=14):
    """(kernel (M, N, N) float64 PSD, k, full_rank): Gaussian Gram matrices, low rank, repeated
    items or all zero, any k <= N."""
    m, n = draw(st.integers(1, 3)), draw(st.integers(1, max_n))
    kind = draw(st.sampled_from(["full", "low_rank", "duplicates", "zeros"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    d = n + 2 if kind == "full" else draw(st.integers(1, 3))
    x = torch.randn(m, n, d, generator=g, dtype=torch.float64)
    if kind == "duplicates":
        x = x[:, torch.randint(0, min(2, n), (n,), generator=g)]
    kernel = x @ x.mT
    if kind == "full":
        kernel = kernel + 0.1 * torch.eye(n, dtype=torch.float64)
    elif kind == "zeros":
        kernel = torch.zeros_like(kernel)
    return kernel, draw(st.integers(1, n)), kind == "full"


@ops_settings
@given(kernels())
def test_dpp_picks_k_unique_first_is_max_diagonal(case):
    kernel, k, _ = case
    index = greedy_dpp_map(kernel, k)
    m, n = kernel.shape[:2]
    assert index.shape == (m, k) and ((index >= 0) & (index < n)).all()
    assert all(len(set(row.tolist())) == k for row in index)
    assert torch.equal(index[:, 0], kernel.diagonal(dim1=1, dim2=2).argmax(dim=-1))
    for i in range(m):  # each kernel alone gives the same picks
        assert torch.equal(index[i : i + 1], greedy_dpp_map(kernel[i : i + 1], k))


@ops_settings
@given(kernels())
def test_dpp_matches_naive_logdet_greedy(case):
    kernel, k, full_rank = case
    if not full_rank:
        return
    index = greedy_dpp_map(kernel, k)
    for i in range(kernel.shape[0]):
        assert index[i].tolist() == logdet_greedy(kernel[i], k)


def test_dpp_float32_and_validation():
    x = torch.randn(2, 20, 4)
    index = greedy_dpp_map((x @ x.mT).half(), 20)  # rank 4 < k: still 20 unique picks, no NaN path
    assert all(len(set(row.tolist())) == 20 for row in index)
    with pytest.raises(ValueError):
        greedy_dpp_map(torch.eye(3).expand(1, 3, 3), 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", NAMES)
def test_no_host_sync_on_cuda(name):
    tokens, ctx = make_inputs()
    ctx = VisualContext(**{f: (v.cuda() if torch.is_tensor(v) else v) for f, v in vars(ctx).items()})
    press = get_press(name, keep=16)
    expected, tokens = press.press(tokens, make_inputs()[1])[1], tokens.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device -> host wait in the selection raises
    try:
        index = press.select(tokens, ctx, 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(index.sort(dim=1).values.cpu(), expected)
