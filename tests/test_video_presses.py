"""Video presses (temporal_merge, evs, fastvid) and ``ops.video``: shapes and exact budgets, batch =
each video alone, static videos, agreement with naive per-video references of each official
algorithm, and no host sync in the selection path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmpress.ops.video import (
    cut_segments, frame_index_to_video, frames_as_images, merge_runs, row_rank, split_evenly, video_grid,
)
from mmpress.presses import PRESSES, VisualContext, get_press

T, H, W, D = 4, 3, 4, 16
P = H * W
N = T * P
NAMES = ["temporal_merge", "evs", "fastvid"]


def make_video(m=3, t=T, h=H, w=W, d=D, seed=0, static=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, t, h * w, d, generator=g)
    if static:
        x = x[:, :1].expand(m, t, h * w, d)
    else:  # some places barely change between frames, as in a real video
        x = x.cumsum(dim=1) * 0.5
    ctx = VisualContext(grid=(h, w), grid_thw=(t, h, w),
                        cls_attn=torch.rand(m, t * h * w, generator=g).softmax(-1))
    return x.reshape(m, t * h * w, d).to(dtype), ctx


def alone(ctx, i):
    return VisualContext(grid=ctx.grid, grid_thw=ctx.grid_thw, cls_attn=ctx.cls_attn[i : i + 1])


@pytest.mark.parametrize("name", NAMES)
def test_declared_video_aware(name):
    assert PRESSES[name].video and PRESSES[name].paper and "grid" in PRESSES[name].needs
    assert not PRESSES["divprune"].video


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 5, P - 1, P, P + 1, 2 * P + 3, N - 1])
def test_shapes_exact_budget_unique_sorted(name, k):
    tokens, ctx = make_video()
    out, index = get_press(name, keep=k).press(tokens, ctx)
    assert out.shape == (3, k, D) and index.shape == (3, k) and torch.isfinite(out).all()
    assert ((index >= 0) & (index < N)).all() and (index.diff(dim=1) > 0).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [4, P, 20, 37])
def test_batch_equals_each_video_alone(name, k):
    tokens, ctx = make_video()
    press = get_press(name, keep=k)
    out, index = press.press(tokens, ctx)
    for i in range(3):
        out_i, index_i = press.press(tokens[i : i + 1], alone(ctx, i))
        assert torch.equal(index[i : i + 1], index_i)
        torch.testing.assert_close(out[i : i + 1], out_i)


@pytest.mark.parametrize("name", NAMES)
def test_image_is_one_frame(name):
    """grid_thw None reads the image grid as t = 1: the same as grid_thw = (1, h, w)."""
    tokens, ctx = make_video(t=1)
    press = get_press(name, keep=5)
    a = press.press(tokens, ctx)
    b = press.press(tokens, VisualContext(grid=(H, W), cls_attn=ctx.cls_attn))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


@pytest.mark.parametrize("name", NAMES)
def test_bf16(name):
    tokens, ctx = make_video(dtype=torch.bfloat16)
    out, index = get_press(name, keep=17).press(tokens, ctx)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 17, D) and (index.diff(dim=1) > 0).all()


def test_wrong_grid_is_a_clear_error():
    tokens, ctx = make_video()
    ctx.grid_thw = (T, H, W + 1)
    with pytest.raises(ValueError, match="does not hold"):
        get_press("evs", keep=8).press(tokens, ctx)


# ---- static video ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["temporal_merge", "evs"])
def test_static_video_keeps_the_first_frame(name):
    tokens, ctx = make_video(static=True)
    out, index = get_press(name, keep=P).press(tokens, ctx)
    assert torch.equal(index, torch.arange(P).expand(3, P))
    torch.testing.assert_close(out, tokens[:, :P])


def test_static_video_merge_is_the_mean_of_identical_runs():
    tokens, ctx = make_video(static=True)
    out, index = get_press("temporal_merge", keep=P + 2, merge=True).press(tokens, ctx)
    # frame 0 whole; the remaining 2: one token of frame 1, one of frame 2 (cosines all ~1)
    assert torch.equal(index[:, :P], torch.arange(P).expand(3, P))
    assert torch.equal(index[:, P:] // P, torch.tensor([1, 2]).expand(3, 2))
    place = index % P  # every token is the mean of identical copies of its place
    torch.testing.assert_close(out, tokens.gather(1, place.unsqueeze(-1).expand(-1, -1, D)))


def test_static_video_fastvid_keeps_budget_and_first_frame_content():
    tokens, ctx = make_video(static=True)
    out, index = get_press("fastvid", keep=2 * T).press(tokens, ctx)
    frame0 = tokens[:, :P]
    # every kept token is a (weighted mean of) copies of frame-0 tokens: close to some of them
    sim = F.normalize(out, dim=-1) @ F.normalize(frame0, dim=-1).transpose(1, 2)
    assert index.shape == (3, 2 * T) and (sim.amax(-1) > 0.5).all()


def test_temporal_merge_drop_mode_keeps_representatives():
    tokens, ctx = make_video()
    out, index = get_press("temporal_merge", keep=30, merge=False).press(tokens, ctx)
    assert torch.equal(out, tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, D)))


# ---- naive references ----------------------------------------------------------------------------
def evs_reference(x, thw, k):
    """vLLM ``compute_retention_mask`` for one video (k >= h*w), as written there."""
    t, h, w = thw
    v = x.reshape(t, h, w, -1)
    dissim = 1 - F.cosine_similarity(v[1:], v[:-1], dim=-1)
    dissim = torch.cat([255 * torch.ones_like(v[:1, :, :, 0]), dissim], dim=0).view(-1)
    order = torch.argsort(dissim, descending=True, stable=True)
    mask = torch.zeros_like(dissim, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.nonzero().squeeze(1)


@pytest.mark.parametrize("k", [P, P + 1, 25, N - 3])
def test_evs_matches_vllm(k):
    tokens, ctx = make_video()
    index = get_press("evs", keep=k).press(tokens, ctx)[1]
    for i in range(3):
        assert index[i].tolist() == evs_reference(tokens[i], (T, H, W), k).tolist()


def test_evs_below_one_frame_samples_frame_zero_uniformly():
    tokens, ctx = make_video()
    index = get_press("evs", keep=4).press(tokens, ctx)[1]
    assert (index < P).all()
    assert torch.equal(index, get_press("uniform", keep=4).press(tokens[:, :P], VisualContext(grid=(H, W)))[1])


def temporal_merge_reference(x, thw, k):
    """The ``reference="previous", merge=True`` option (our algorithm, not DyCoke's windows: the
    official selection is checked in tests/test_official_pre.py), per video with Python loops:
    per-frame least-redundant tokens open runs, runs along time at each place, then (k < P)
    raster merging of the place runs."""
    t, h, w = thw
    p = h * w
    frames = x.view(t, p, -1).double()
    opens = [[True] * p] + [[False] * p for _ in range(t - 1)]
    if k >= p:
        base, extra = divmod(k - p, t - 1) if t > 1 else (0, 0)
        for f in range(1, t):
            sim = [F.cosine_similarity(frames[f, q], frames[f - 1, q], dim=0).item() for q in range(p)]
            for q in sorted(range(p), key=lambda q: (sim[q], q))[: base + (f - 1 < extra)]:
                opens[f][q] = True
    runs = []  # (first index, [indices])
    for q in range(p):
        for f in range(t):
            if opens[f][q]:
                runs.append((f * p + q, []))
            runs[-1][1].append(f * p + q)
    flat = x.double()
    if k < p:  # one run per place, in raster order
        means = [flat[r].mean(0) for _, r in runs]
        edges = []
        for q in range(1, p):
            s = F.cosine_similarity(means[q - 1], means[q], dim=0).item() - (4.0 if q % w == 0 else 0.0)
            edges.append((-s, q))
        merged = {q for _, q in sorted(edges)[: p - k]}
        new = []
        for q, run in enumerate(runs):
            if q in merged:
                new[-1] = (new[-1][0], new[-1][1] + run[1])
            else:
                new.append(run)
        runs = new
    runs.sort()
    return torch.tensor([r[0] for r in runs]), torch.stack([flat[r[1]].mean(0) for r in runs]).to(x.dtype)


@pytest.mark.parametrize("thw", [(4, 3, 4), (1, 3, 4), (3, 2, 5)])
@pytest.mark.parametrize("k", [2, 7, 12, 13, 21, 30])
def test_temporal_merge_matches_reference(thw, k):
    t, h, w = thw
    if k >= t * h * w:
        return
    tokens, ctx = make_video(t=t, h=h, w=w)
    out, index = get_press("temporal_merge", keep=k, reference="previous", merge=True).press(tokens, ctx)
    for i in range(3):
        ref_index, ref_out = temporal_merge_reference(tokens[i], thw, k)
        assert index[i].tolist() == ref_index.tolist()
        torch.testing.assert_close(out[i], ref_out, rtol=1e-4, atol=1e-5)


def fastvid_reference(x, attn, thw, k, c=8, tau=0.9, d=0.4, step=4, beta=0.6, knn=4):
    """FastVID's official LLaVA-OneVision loop for one video, on budgets where its floors are exact
    (k divisible by t; each segment's contextual budget divisible by its anchor count)."""
    t, h, w = thw
    p = h * w
    frames = x.view(t, p, -1).double()
    g = F.normalize(frames.mean(1), dim=-1)
    sim = (g[1:] * g[:-1]).sum(-1)
    cuts = set(torch.topk(sim, min(c - 1, t - 1), largest=False).indices.tolist()) | set(
        (sim < tau).nonzero().squeeze(1).tolist())
    segments, cur = [], [0]
    for f in range(1, t):
        if f - 1 in cuts:
            segments.append(cur)
            cur = []
        cur.append(f)
    segments.append(cur)
    retain = k // t
    ctx_num = int(retain * d)
    sal = retain - ctx_num
    salient = {f: set(torch.topk(attn.view(t, p)[f], sal).indices.tolist()) for f in range(t)}
    free = {f: [q for q in range(p) if q not in salient[f]] for f in range(t)}
    result = {f * p + q: frames[f, q] for f in range(t) for q in salient[f]}
    for seg in segments:
        n_anchor = math.ceil(len(seg) / step)
        share = ctx_num * len(seg) // n_anchor
        assert share * n_anchor == ctx_num * len(seg)
        members = [frames[f, q] for f in seg for q in free[f]]
        for a in [seg[len(seg) - 1 - j * step] for j in range(n_anchor)]:
            xs = frames[a, free[a]]
            dist = torch.cdist(xs, xs) / math.sqrt(xs.shape[-1])
            density = torch.exp(-(torch.topk(dist, min(knn, len(xs)), largest=False).values ** 2).mean(-1))
            delta = torch.stack([dist[i][density > density[i]].min() if (density > density[i]).any() else dist.max()
                                 for i in range(len(xs))])
            picks = torch.topk(delta * density, share).indices.tolist()
            targets = xs[picks]
            assigned = [[] for _ in picks]
            for y in members:
                assigned[int(F.cosine_similarity(targets, y[None], dim=-1).argmax())].append(y)
            for j, pick in enumerate(picks):
                count = len(assigned[j])
                alpha = max(1 / (count + 1), beta)
                mean = torch.stack(assigned[j]).mean(0) if count else torch.zeros_like(targets[j])
                result[a * p + free[a][pick]] = alpha * targets[j] + (1 - alpha) * mean
    index = sorted(result)
    return torch.tensor(index), torch.stack([result[i] for i in index]).to(x.dtype)


def segmented_video(m=2, t=8, p=20, d=D, seed=0):
    """Frames 0-4 and 5-7 each share a base (global similarity ~1 within, ~0 across)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, 2, p, d, generator=g)
    which = torch.tensor([0] * 5 + [1] * 3)
    x = base[:, which] + 0.3 * torch.randn(m, t, p, d, generator=g)
    return x.reshape(m, t * p, d), torch.rand(m, t * p, generator=g).softmax(-1)


@pytest.mark.parametrize("segments, k, seed", [(1, 40, 0), (1, 64, 0), (2, 40, 0), (3, 40, 0), (8, 40, 0), (8, 80, 0)]
                         + [(c, k, seed) for seed in (1, 2, 3) for c, k in ((1, 40), (2, 40), (8, 80))])
def test_fastvid_matches_official_loop(segments, k, seed):
    tokens, attn = segmented_video(seed=seed)
    ctx = VisualContext(grid_thw=(8, 4, 5), cls_attn=attn)
    out, index = get_press("fastvid", keep=k, segments=segments).press(tokens, ctx)
    for i in range(2):
        ref_index, ref_out = fastvid_reference(tokens[i], attn[i], (8, 4, 5), k, c=segments)
        assert index[i].tolist() == ref_index.tolist()
        torch.testing.assert_close(out[i], ref_out, rtol=1e-4, atol=1e-5)


def test_fastvid_keeps_top_attention_of_every_frame():
    tokens, ctx = make_video()
    index = get_press("fastvid", keep=8 * T).press(tokens, ctx)[1]  # 8 per frame: 5 salient
    top = ctx.cls_attn.view(3, T, P).topk(5, dim=-1).indices + torch.arange(T)[:, None] * P
    for i in range(3):
        assert set(top[i].flatten().tolist()) <= set(index[i].tolist())


# ---- ops.video ---------------------------------------------------------------------------------
def test_video_grid_resolution():
    assert video_grid(24, (2, 3, 4)) == (2, 3, 4)
    assert video_grid(12, None, (3, 4)) == (1, 3, 4)
    with pytest.raises(ValueError):
        video_grid(12)


def test_cut_segments_and_budgets():
    sim = torch.tensor([[0.99, 0.5, 0.95, 0.97, 0.2]])
    assert cut_segments(sim, 1, 0.9).tolist() == [[0, 0, 1, 1, 1, 2]]
    assert cut_segments(sim, 3, 0.0).tolist() == [[0, 0, 1, 1, 1, 2]]
    assert cut_segments(sim, 4, 0.0).tolist() == [[0, 0, 1, 2, 2, 3]]
    assert split_evenly(10, 4).tolist() == [3, 3, 2, 2]
    assert row_rank(torch.tensor([[3.0, 1.0, 3.0, 2.0]])).tolist() == [[0, 3, 1, 2]]


def test_merge_runs():
    x = torch.arange(5.0).view(1, 5, 1)
    start = torch.tensor([[True, False, True, False, False]])
    total, size, first = merge_runs(x, torch.ones(1, 5), start, 2)
    assert total.flatten().tolist() == [1.0, 9.0] and size.tolist() == [[2, 3]] and first.tolist() == [[0, 2]]


def test_image_press_frame_by_frame():
    """The helper an adapter uses to run a 2-D press (pool, uniform) per frame."""
    tokens, _ = make_video()
    per_frame = get_press("uniform", keep=4).press(frames_as_images(tokens, T), VisualContext(grid=(H, W)))[1]
    index = frame_index_to_video(per_frame, T, P)
    assert index.shape == (3, 4 * T) and (index.diff(dim=1) > 0).all()
    assert torch.equal(index[:, 4:8] - P, index[:, :4])


# ---- no host sync --------------------------------------------------------------------------------
class SyncCounter(TorchDispatchMode):
    """Counts the ops that copy a device value to the host (or decide a shape from data)."""

    SYNCS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        bool_index = name == "aten.index" and any(
            i is not None and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []))
        if name in self.SYNCS or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [5, P + 3, 30])
def test_no_host_sync(name, k):
    tokens, ctx = make_video()
    press = get_press(name, keep=k)
    with SyncCounter() as counter:
        press.press(tokens, ctx)
    assert counter.seen == []
