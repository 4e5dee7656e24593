"""GlobalCom2, HiPrune and SCOPE: each against a re-implementation of its official selection
(written from the official code, float64), on single images and on AnyRes items (a base image and
the crops of its unpadded tiles, ``ctx.parts``), and through a tiny LLaVA's forward and generate."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmpress.models.base import Part
from mmpress.presses import VisualContext, get_press
from mmpress.presses.globalcom2 import anyres_layout, apportion, globalcom2_select, split_evenly
from mmpress.presses.scope import scope_greedy

from conftest import make_batch


@dataclass(frozen=True)
class TilesPart(Part):
    """A "tiles" part with its crop grid, as the LLaVA-NeXT adapter is to give it (Part.crops)."""

    crops: tuple[int, int] | None = None


def anyres(side: int, crops: tuple[int, int], original: tuple[int, int]):
    """An AnyRes item as official LLaVA unpads it: ``side`` x ``side`` crops on a rows x cols
    canvas, the image of (width, height) ``original`` pixels. Returns (parts, pad_top, pad_left,
    H', W') with official ``unpad_image``'s padding (int(original * scale_factor))."""
    rows, cols = crops
    ch, cw = rows * side, cols * side
    width, height = original
    top = left = 0
    if width / height > cw / ch:
        new = int(height * (cw / width))
        top = (ch - new) // 2
    else:
        new = int(width * (ch / height))
        left = (cw - new) // 2
    h, w = ch - 2 * top, cw - 2 * left
    parts = (Part(0, side * side, (1, side, side), "base"), TilesPart(side * side, h * w, (1, h, w), "tiles", crops))
    return parts, top, left, h, w


def lm_scores(base: torch.Tensor, crop: torch.Tensor, side, crops, top, left, h, w) -> torch.Tensor:
    """Per LM token: the base's scores, then each unpadded tiles token's score from its own crop."""
    y, x = torch.meshgrid(torch.arange(h) + top, torch.arange(w) + left, indexing="ij")
    c = (y // side) * crops[1] + x // side
    local = (y % side) * side + x % side
    return torch.cat([base, crop[c.flatten(), local.flatten()]])


def to_lm(crop_index: int, local: int, side, crops, top, left, w) -> int:
    y, x = divmod(local, side)
    r, c = divmod(crop_index, crops[1])
    return side * side + (r * side + y - top) * w + (c * side + x - left)


# ---- official GlobalCom2, re-implemented from llava/model/llava_arch.py ----------------------------
def official_globalcom2(base_cls, crop_cls, crops, side, original, ratio=0.25, temperature=10.0):
    """Kept LM-token indices of one image (official loops; base_cls (S^2,), crop_cls (C, S^2))."""
    nph, npw = crops
    # compress_thumbnail
    top_k = int(base_cls.shape[0] * ratio)
    base_keep = torch.argsort(base_cls, descending=True)[:top_k].tolist()
    # generate_scale_for_crop_features
    n = base_cls.shape[0]
    s = int(n ** 0.5)
    pw, ph = max(s // npw, 1), max(s // nph, 1)
    sums = np.zeros(npw * nph)
    for idx, score in enumerate(base_cls):
        i, j = divmod(idx, s)
        sums[min(i // ph, nph - 1) * npw + min(j // pw, npw - 1)] += score.item()
    e = np.exp((sums - np.max(sums)) / temperature)
    soft = e / (np.sum(e) + 1e-8)
    scales = np.clip(ratio * (1 + soft - np.mean(soft)), None, 1.0).tolist()
    # compress_crops: the unpad mask over the canvas, crop by crop
    width, height = original
    ch, cw = nph * side, npw * side
    mask = torch.zeros(ch, cw, dtype=torch.bool)
    if width / height > cw / ch:
        new = int(height * (cw / width))
        pad = (ch - new) // 2
        mask[pad:ch - pad, :] = True
    else:
        new = int(width * (ch / height))
        pad = (cw - new) // 2
        mask[:, pad:cw - pad] = True
    rows_valid, cols_valid = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    cur_h, cur_w = int(rows_valid[-1] - rows_valid[0] + 1), int(cols_valid[-1] - cols_valid[0] + 1)
    per_crop = mask.view(nph, side, npw, side).permute(0, 2, 1, 3).reshape(nph * npw, side * side)
    dims = []
    for c in range(nph * npw):
        nz = per_crop[c].view(side, side).nonzero()
        dims.append((0, 0) if len(nz) == 0 else (int(nz[:, 1].max() - nz[:, 1].min() + 1),
                                                 int(nz[:, 0].max() - nz[:, 0].min() + 1)))
    interp = F.interpolate(base_cls.view(1, 1, s, s), size=(cur_h, cur_w), mode="bilinear",
                           align_corners=False).squeeze()
    glob, y0 = [], 0
    for i in range(nph):
        x0 = 0
        for j in range(npw):
            cw_, chh = dims[i * npw + j]
            glob.append(interp[y0:y0 + chh, x0:x0 + cw_].flatten())
            x0 += cw_
        y0 += dims[i * npw][1]
    kept = list(base_keep)
    for c in range(nph * npw):
        valid = per_crop[c].nonzero().flatten()
        own = crop_cls[c][per_crop[c]]
        top = int(own.shape[0] * scales[c])
        combined = F.normalize(own.unsqueeze(0), p=2, dim=-1)[0] + F.normalize(glob[c].unsqueeze(0), p=2, dim=-1)[0]
        picked = valid[torch.topk(combined, top).indices] if top else valid[:0]
        kept += [("crop", c, int(t)) for t in picked]
    return kept


LAYOUTS = [  # (side, crop grid, original (width, height))
    (6, (2, 2), (200, 100)),  # wide: rows unpadded
    (6, (2, 2), (90, 180)),  # tall: columns unpadded
    (6, (1, 2), (100, 100)),  # a small square image on a 1x2 canvas: the image spans both crops
    (6, (3, 1), (50, 160)),
    (8, (2, 3), (300, 290)),  # unequal regions on the base (8 // 3)
]


@pytest.mark.parametrize("side,crops,original", LAYOUTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_globalcom2_matches_official(side, crops, original, seed):
    g = torch.Generator().manual_seed(seed)
    c = crops[0] * crops[1]
    base = torch.randn(side * side, generator=g, dtype=torch.float64) * 3
    crop = torch.randn(c, side * side, generator=g, dtype=torch.float64) * 3
    parts, top, left, h, w = anyres(side, crops, original)
    official = official_globalcom2(base, crop, crops, side, original)
    want = sorted(t if isinstance(t, int) else to_lm(t[1], t[2], side, crops, top, left, w) for t in official)
    score = lm_scores(base, crop, side, crops, top, left, h, w).unsqueeze(0)
    layout = anyres_layout(parts, score.shape[1], None, "globalcom2")
    got = globalcom2_select(score.repeat(2, 1), layout, len(want), 0.25)
    assert got[0].tolist() == want and got[1].tolist() == want


def test_globalcom2_press_reads_log_concat_attention_and_keeps_k():
    side, crops, original = 6, (2, 2), (200, 100)
    parts, top, left, h, w = anyres(side, crops, original)
    n = side * side + h * w
    attn = torch.rand(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.01
    ctx = VisualContext(cls_attn_concat=attn, parts=parts)
    press = get_press("globalcom2", keep_ratio=0.25)
    k = press.budget(n)
    tokens = torch.randn(3, n, 4, dtype=torch.float64)
    out, index = press.press(tokens, ctx)
    layout = anyres_layout(parts, n, None, "globalcom2")
    assert index.tolist() == globalcom2_select(attn.log(), layout, k, 0.25).tolist()
    assert out.shape == (3, k, 4) and torch.equal(out, tokens.gather(1, index[..., None].expand(-1, -1, 4)))


def test_globalcom2_single_image_is_the_thumbnail_topk():
    attn = torch.rand(2, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ctx = VisualContext(cls_attn_concat=attn, grid=(8, 8))
    _, index = get_press("globalcom2", keep=10).press(torch.randn(2, 64, 4), ctx)
    assert index.tolist() == attn.argsort(dim=1, descending=True)[:, :10].sort(dim=1).values.tolist()


def test_apportion_gives_official_counts_then_exactly_k():
    target = torch.tensor([[9.0, 3.7, 0.2, 5.9], [9.0, 1.1, 4.4, 4.5]], dtype=torch.float64)
    size = torch.tensor([36, 10, 10, 6])  # limit: read from it
    official = apportion(target, size, 17)
    assert official[0].tolist() == [9, 3, 0, 5]  # k = its official total: the official counts
    for k in (1, 17, 25, 40, 62):
        q = apportion(target, size, k)
        assert (q.sum(1) == k).all() and (q <= size).all() and (q >= 0).all()
    assert apportion(target, size, 62).tolist() == [[36, 10, 10, 6]] * 2


def test_crop_layout_spans_crops_and_skips_empty_ones():
    # a square image on a 1x2 canvas of 6x6 crops: 6 x 6 tokens, columns 3..8 of the canvas
    parts, top, left, h, w = anyres(6, (1, 2), (100, 100))
    assert (top, left, h, w) == (0, 3, 6, 6)
    layout = anyres_layout(parts, 36 + 36, None, "x")
    base, c0, c1 = layout.pieces
    assert base.grid == (6, 6) and c0.grid == (6, 3) and c1.grid == (6, 3)
    assert c0.index.tolist()[:4] == [36, 37, 38, 42] and c1.index.tolist()[:3] == [39, 40, 41]
    # a wide image on a 2x2 canvas: the top crops hold 2 rows, the bottom ones 2
    parts, top, left, h, w = anyres(6, (2, 2), (300, 100))
    assert (h, w) == (4, 12)
    sizes = [p.index.numel() for p in anyres_layout(parts, 36 + h * w, None, "x").pieces]
    assert sizes == [36, 12, 12, 12, 12]
    # a very wide image on a 3x1 canvas: only the middle crop holds tokens
    parts, top, left, h, w = anyres(6, (3, 1), (600, 100))
    pieces = anyres_layout(parts, 36 + h * w, None, "x").pieces
    assert (h, w) == (2, 6) and [p.index.numel() for p in pieces] == [36, 0, 12, 0]
    for name, signals in (("globalcom2", {"cls_attn_concat": torch.rand(1, 48) + 0.1}),
                          ("hiprune", {"cls_attn": torch.rand(1, 48), "cls_attn_layers": torch.rand(1, 1, 48)}),
                          ("scope", {"cls_attn": torch.rand(1, 48), "vision_features": torch.randn(1, 48, 4)})):
        ctx = VisualContext(parts=parts, **signals)
        _, index = get_press(name, keep=20).press(torch.randn(1, 48, 2), ctx)
        assert index.shape == (1, 20) and index.unique().numel() == 20
    # tiles without a crop grid (OneVision's shrunk raster): one sub-image
    pieces = anyres_layout((Part(0, 36, (1, 6, 6), "base"), Part(36, 24, (1, 4, 6), "tiles")), 60, None, "x").pieces
    assert [(p.role, p.index.tolist()[:2], p.grid) for p in pieces] == [("base", [0, 1], (6, 6)),
                                                                         ("tiles", [36, 37], (4, 6))]
    with pytest.raises(ValueError, match="'base' part"):
        anyres_layout((Part(0, 24, (1, 4, 6), "tiles"),), 24, None, "x")
    with pytest.raises(ValueError, match="symmetric"):
        anyres_layout((Part(0, 36, (1, 6, 6), "base"), TilesPart(36, 30, (1, 5, 6), "tiles", (2, 1))), 66, None, "x")


def test_globalcom2_on_parts_without_crop_positions():
    """InternVL-like parts (tiles and a thumbnail, no crop grid): GlobalCom2 cannot place the crops
    in the thumbnail and says so; HiPrune and SCOPE press each part apart. OneVision's shrunk tiles
    are one crop of ratio r, guided by the whole thumbnail."""
    parts = (Part(0, 16, (1, 4, 4), "crop"), Part(16, 16, (1, 4, 4), "crop"), Part(32, 16, (1, 4, 4), "base"))
    attn = torch.rand(1, 48) + 0.1
    with pytest.raises(ValueError, match="hiprune, scope"):
        get_press("globalcom2", keep=12).press(torch.randn(1, 48, 2), VisualContext(cls_attn_concat=attn, parts=parts))
    ctx = VisualContext(cls_attn=attn, cls_attn_layers=attn[:, None], vision_features=torch.randn(1, 48, 4),
                        parts=parts)
    for name in ("hiprune", "scope"):
        _, index = get_press(name, keep=12).press(torch.randn(1, 48, 2), ctx)
        assert [(index // 16 == p).sum().item() for p in range(3)] == [4, 4, 4]
    shrunk = (Part(0, 16, (1, 4, 4), "base"), Part(16, 30, (1, 5, 6), "tiles"))
    score = torch.randn(1, 46, dtype=torch.float64)
    got = globalcom2_select(score, anyres_layout(shrunk, 46, None, "g"), 4 + 7, 0.25)
    glob = F.interpolate(score[:, :16].view(1, 1, 4, 4), size=(5, 6), mode="bilinear", align_corners=False).flatten(1)
    tiles = F.normalize(score[:, 16:], dim=-1) + F.normalize(glob, dim=-1)
    want = score[0, :16].argsort(descending=True)[:4].tolist() + (tiles[0].argsort(descending=True)[:7] + 16).tolist()
    assert got[0].tolist() == sorted(want)  # int(16 x 0.25) = 4 and int(30 x 0.25) = 7: the official counts


def test_split_evenly():
    assert split_evenly(10, [36, 12, 12, 12, 12]) == [2, 2, 2, 2, 2]
    assert split_evenly(13, [36, 12, 12, 12, 12]) == [3, 3, 3, 2, 2]
    assert split_evenly(40, [36, 2, 0, 12]) == [26, 2, 0, 12]  # full pieces pass their share on
    with pytest.raises(ValueError):
        split_evenly(10, [3, 3])


# ---- official HiPrune, re-implemented from LLaVA/llava/model/llava_arch.py -------------------------
def official_hiprune(shallow, deep, q, alpha, width):
    """One image's kept indices, the official loop body (shallow / deep: (n,))."""
    n = shallow.shape[0]
    t = round(q * alpha / 5)
    idx = torch.topk(shallow.unsqueeze(0), k=t, dim=1)[1]
    idx = torch.cat([idx, idx - 1, idx + 1, idx - width, idx + width], dim=1).clamp(0, n - 1)
    idx = torch.unique(idx, sorted=False).unsqueeze(0)
    mask = torch.zeros(1, n, dtype=torch.bool).scatter_(1, idx, 1)
    deep = deep - mask.int().squeeze()
    deep_idx = torch.topk(deep.unsqueeze(0), k=q - idx.shape[1], dim=1)[1]
    return torch.sort(torch.cat([idx, deep_idx], dim=1), dim=1)[0][0].tolist()


@pytest.mark.parametrize("q,alpha,grid", [(64, 0.1, (24, 24)), (160, 0.1, (24, 24)), (20, 1.0, (8, 8)),
                                          (12, 0.5, (6, 5)), (5, 0.0, (4, 4))])
def test_hiprune_matches_official_on_one_image(q, alpha, grid):
    n = grid[0] * grid[1]
    g = torch.Generator().manual_seed(q)
    shallow, deep = (torch.rand(3, n, generator=g, dtype=torch.float64) for _ in range(2))
    ctx = VisualContext(grid=grid, cls_attn=deep, cls_attn_layers=shallow.unsqueeze(1))
    _, index = get_press("hiprune", keep=q, alpha=alpha).press(torch.randn(3, n, 2), ctx)
    for i in range(3):
        assert index[i].tolist() == official_hiprune(shallow[i], deep[i], q, alpha, grid[1])


def test_hiprune_presses_base_and_each_crop_apart():
    side, crops, original = 6, (2, 2), (200, 100)
    parts, top, left, h, w = anyres(side, crops, original)
    n = side * side + h * w
    g = torch.Generator().manual_seed(5)
    shallow, deep = (torch.rand(2, n, generator=g, dtype=torch.float64) for _ in range(2))
    ctx = VisualContext(cls_attn=deep, cls_attn_layers=shallow.unsqueeze(1), parts=parts)
    k = 37
    _, index = get_press("hiprune", keep=k, alpha=0.5).press(torch.randn(2, n, 2), ctx)
    layout = anyres_layout(parts, n, None, "hiprune")
    quota = split_evenly(k, [p.index.numel() for p in layout.pieces])
    for i in range(2):
        want = []
        for piece, q in zip(layout.pieces, quota):
            local = official_hiprune(shallow[i, piece.index], deep[i, piece.index], q, 0.5, piece.grid[1])
            want += piece.index[local].tolist()
        assert index[i].tolist() == sorted(want)


def test_hiprune_object_layer_follows_the_tower_depth():
    press = get_press("hiprune", keep=8)
    assert press.vision_layers_for(24) == (9,) and press.vision_layers_for(3) == (1,)
    assert get_press("hiprune", keep=8, object_layer=16).vision_layers_for(32) == (16,)
    with pytest.raises(ValueError, match="alpha"):
        get_press("hiprune", keep=8, alpha=2)
    with pytest.raises(ValueError, match="beyond a budget"):
        ctx = VisualContext(grid=(4, 4), cls_attn=torch.rand(1, 16), cls_attn_layers=torch.rand(1, 1, 16))
        get_press("hiprune", keep=3, alpha=1.0).press(torch.randn(1, 16, 2), ctx)
    with pytest.raises(ValueError, match="raster"):
        ctx = VisualContext(cls_attn=torch.rand(1, 16), cls_attn_layers=torch.rand(1, 1, 16))
        get_press("hiprune", keep=8).press(torch.randn(1, 16, 2), ctx)


# ---- official SCOPE, re-implemented from scope/clip_encoder.py --------------------------------------
def official_scope(features, q, cls_attn, alpha=1.0, combined="multi"):
    norm = features / features.norm(dim=-1, keepdim=True)
    sim = torch.bmm(norm, norm.transpose(1, 2))
    b, n = features.shape[:2]
    selected = torch.zeros(b, n, dtype=torch.bool)
    out = torch.empty(b, q, dtype=torch.long)
    cur = torch.zeros(b, n, dtype=features.dtype)
    powered = cls_attn ** alpha
    for i in range(q):
        gains = torch.maximum(torch.zeros(1, dtype=features.dtype),
                              sim.masked_fill(selected.unsqueeze(1), 0) - cur.unsqueeze(2)).sum(dim=1)
        gains = gains * powered if combined == "multi" else gains + powered
        best = gains.masked_fill(selected, float("-inf")).argmax(dim=1)
        selected[torch.arange(b), best] = True
        out[:, i] = best
        cur = torch.maximum(cur, sim[torch.arange(b), best])
    return out


@pytest.mark.parametrize("alpha,combine", [(1.0, "multi"), (0.5, "multi"), (1.0, "add")])
def test_scope_matches_official_on_one_image(alpha, combine):
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(3, 49, 16, generator=g, dtype=torch.float64)
    attn = torch.rand(3, 49, generator=g, dtype=torch.float64)
    want = official_scope(feats, 12, attn, alpha, combine)
    assert torch.equal(scope_greedy(feats, attn, 12, alpha, combine), want)
    ctx = VisualContext(grid=(7, 7), cls_attn=attn, vision_features=feats)
    _, index = get_press("scope", keep=12, alpha=alpha, combine=combine).press(torch.randn(3, 49, 2), ctx)
    assert index.tolist() == want.sort(dim=1).values.tolist()


def test_scope_ties_go_to_the_first_token():
    feats = torch.ones(1, 6, 3, dtype=torch.float64)  # every token a duplicate: equal gains
    attn = torch.ones(1, 6, dtype=torch.float64)
    assert scope_greedy(feats, attn, 3).tolist() == official_scope(feats, 3, attn).tolist() == [[0, 1, 2]]


def test_scope_selects_each_crop_apart():
    side, crops, original = 6, (2, 2), (90, 180)
    parts, top, left, h, w = anyres(side, crops, original)
    n = side * side + h * w
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, n, 8, generator=g, dtype=torch.float64)
    attn = torch.rand(2, n, generator=g, dtype=torch.float64)
    ctx = VisualContext(cls_attn=attn, vision_features=feats, parts=parts)
    _, index = get_press("scope", keep=30).press(torch.randn(2, n, 2), ctx)
    layout = anyres_layout(parts, n, None, "scope")
    quota = split_evenly(30, [p.index.numel() for p in layout.pieces])
    want = torch.cat([p.index[official_scope(feats[:, p.index], q, attn[:, p.index])]
                      for p, q in zip(layout.pieces, quota) if q], dim=1)
    assert index.tolist() == want.sort(dim=1).values.tolist()


# ---- on a tiny LLaVA --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["globalcom2", "hiprune", "scope"])
def test_runs_in_forward_and_generate(model, name, one_thread):
    batch = make_batch((5, 3))
    press = get_press(name, keep=16)
    with torch.no_grad():
        plain = model(**batch).logits
        with press(model):
            out = model(**batch)
            gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
        with get_press(name, keep=64)(model):  # every token kept: the unpressed logits
            same = model(**batch).logits
    assert out.logits.shape[0] == 2 and gen.shape == (2, batch["input_ids"].shape[1] + 3)
    assert torch.equal(same, plain)
    assert not torch.equal(out.logits[:, -1], plain[:, -1])


@pytest.fixture(scope="module")
def next_model():
    from mmpress.models.llava_next import LlavaNextAdapter

    return LlavaNextAdapter.build("tiny")


@pytest.mark.parametrize("name", ["globalcom2", "hiprune", "scope"])
def test_llava_next_ragged_rows_decode_as_alone(next_model, name, one_thread):
    """On LLaVA-NeXT (base + unpadded tiles + newlines): a ragged batch of images of different tile
    grids decodes as each row alone, and keeping every token gives the unpressed logits."""
    from mmpress.models.llava_next import LlavaNextAdapter

    rows = LlavaNextAdapter.example_rows["ragged"]
    batch = LlavaNextAdapter.prompts(next_model, rows)
    with torch.no_grad():
        plain = next_model(**batch).logits
        with get_press(name, keep_ratio=1.0)(next_model):
            assert torch.equal(next_model(**batch).logits, plain)
        with get_press(name, keep_ratio=0.3)(next_model):
            gen = next_model.generate(**batch, max_new_tokens=4, do_sample=False)
            alone = [next_model.generate(**LlavaNextAdapter.prompts(next_model, [row], first_row=i),
                                         max_new_tokens=4, do_sample=False) for i, row in enumerate(rows)]
    for i, one in enumerate(alone):
        assert gen[i, -4:].tolist() == one[0, -4:].tolist()


@pytest.mark.parametrize("name", ["globalcom2", "hiprune", "scope"])
def test_llava_next_pressing_adds_no_host_syncs(next_model, name):
    """Per-crop pressing syncs no more than a plain top-k press on the same AnyRes batch: the
    layout (pieces, crop of each token) is built once per layout and device, quotas on the device."""
    from test_llava import count_syncs

    from mmpress.models.llava_next import LlavaNextAdapter

    batch = LlavaNextAdapter.prompts(next_model, LlavaNextAdapter.example_rows["ragged"])
    with torch.no_grad():
        with get_press("random", keep_ratio=0.3)(next_model):
            plain = count_syncs(lambda: next_model(**batch))
        with get_press(name, keep_ratio=0.3)(next_model):
            next_model(**batch)  # the first call builds the layout
            pressed = count_syncs(lambda: next_model(**batch))
    assert pressed == plain, name
