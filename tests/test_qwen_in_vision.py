"""The Qwen-VL vision tower on a subset of merge units (models/qwen_vl.py ``vision_hooks``): the
pressed run equals an ORACLE written here without the adapter's code: the stock tower fed only
the kept patches with their rotary positions, frame and window boundaries passed in by hand
(transformers' precomputed ``position_ids`` / ``cu_seqlens`` / ``window_index`` /
``cu_window_seqlens`` kwargs), and the language model fed only the text and the kept visual
embeddings, each row alone, with the M-RoPE ids the unpressed model gives them."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch

import mmpress
from mmpress.models.qwen_vl import QwenVLAdapter as Q
from mmpress.presses.base import VisionPress

TYPES = ["qwen2_5_vl", "qwen2_vl"]


@dataclass
class EveryThird(VisionPress):
    """Test press: drops every unit whose raster index over (t, h, w) is 1 mod 3; images keep all."""

    name = "test-qwen-every-third"
    mode = "drop"
    needs_budget = False

    def drop_plan(self, units, kind):
        n = units.shape[0] * units.shape[1] * units.shape[2]
        keep = torch.arange(n) % 3 != 1 if kind == "video" else torch.ones(n, dtype=torch.bool)
        return keep.view(units.shape[:3])


@dataclass
class KeepAll(EveryThird):
    name = "test-qwen-keep-all"

    def drop_plan(self, units, kind):
        return torch.ones(units.shape[:3], dtype=torch.bool)


# ---- the oracle -----------------------------------------------------------------------------
def _units(model, grid):
    """[(frame, i, j)] of one item's merge units, in the processor's order."""
    merge = model.config.vision_config.spatial_merge_size
    t, h, w = grid
    return [(f, i, j) for f in range(t) for i in range(h // merge) for j in range(w // merge)]


def oracle_tower(model, pixels, grids, keeps):
    """The stock tower on the kept units (``keeps``: per item, a list of bools per unit), every
    boundary built here by hand. Returns per item the (k, D) features of its kept units."""
    visual, vision = model.model.visual, model.config.vision_config
    merge, unit = vision.spatial_merge_size, vision.spatial_merge_size**2
    rows, positions, kept_units = [], [], []  # kept_units: (item, frame, i, j)
    offset = 0
    for item, (grid, keep) in enumerate(zip(grids, keeps)):
        for u, ((f, i, j), k) in enumerate(zip(_units(model, grid), keep)):
            if k:
                kept_units.append((item, f, i, j))
                for a in range(merge):
                    for b in range(merge):
                        rows.append((offset + u) * unit + a * merge + b)
                        positions.append((merge * i + a, merge * j + b))
        offset += len(keep)
    kwargs = {"position_ids": torch.tensor(positions)}

    def cumulative(keys):
        counts = {}
        for key in keys:
            counts[key] = counts.get(key, 0) + unit
        cu = [0]
        for key in sorted(counts):
            cu.append(cu[-1] + counts[key])
        return torch.tensor(cu, dtype=torch.int32)

    kwargs["cu_seqlens"] = cumulative([(item, f) for item, f, _, _ in kept_units])
    if hasattr(visual, "fullatt_block_indexes"):
        side = vision.window_size // merge // vision.patch_size
        window = [(item, f, i // side, j // side) for item, f, i, j in kept_units]
        order = sorted(range(len(kept_units)), key=lambda n: (window[n], kept_units[n]))
        kwargs["window_index"] = torch.tensor(order)
        kwargs["cu_window_seqlens"] = cumulative(window)
    with torch.no_grad():
        out = visual(pixels[torch.tensor(rows)], grid_thw=torch.tensor(grids), **kwargs).pooler_output
    return list(out.split([sum(k) for k in keeps]))


def _lm_inputs(model, inputs):
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen


def oracle_logits(model, inputs, keep_image, keep_video):
    """Last-token logits of each row: the language model fed only the text and the kept visual
    tokens (in the prompt's order) with their unpressed M-RoPE ids, row by row (no padding).
    ``keep_*``: per item of that kind, a list of bools per unit (None: no such items)."""
    config = model.config
    position_ids = _lm_inputs(model, inputs)["position_ids"]
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().clone()
    keep_column = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    for kind, token, keeps in (("image", config.image_token_id, keep_image), ("video", config.video_token_id,
                                                                               keep_video)):
        if keeps is None:
            continue
        pixels = inputs["pixel_values" if kind == "image" else "pixel_values_videos"]
        grids = inputs[f"{kind}_grid_thw"].tolist()
        features = torch.cat(oracle_tower(model, pixels, grids, keeps))
        flags = torch.tensor([k for keep in keeps for k in keep])
        where = (inputs["input_ids"] == token).nonzero()  # placeholders in row-major order = item order
        kept_where = where[flags]
        embeds[kept_where[:, 0], kept_where[:, 1]] = features.to(embeds.dtype)
        keep_column[where[~flags][:, 0], where[~flags][:, 1]] = False
    mask = inputs["attention_mask"].bool() & keep_column
    out = []
    with torch.no_grad():
        for row in range(embeds.shape[0]):
            cols = mask[row].nonzero()[:, 0]
            hidden = model.model.language_model(inputs_embeds=embeds[row:row + 1, cols],
                                                position_ids=position_ids[..., row:row + 1, cols],
                                                attention_mask=torch.ones(1, len(cols), dtype=torch.long))
            out.append(model.lm_head(hidden.last_hidden_state[:, -1]))
    return torch.cat(out)


def pressed_logits(model, inputs, press):
    with torch.no_grad(), press(model) as run:
        return model(**inputs).logits[:, -1], run.stats


def every_third(inputs, kind):
    grids = inputs.get(f"{kind}_grid_thw")
    if grids is None:
        return None
    out = []
    for t, h, w in grids.tolist():
        n = t * h * w // 4
        out.append([u % 3 != 1 if kind == "video" else True for u in range(n)])
    return out


ROWS = {"single": [[(8, 32, 32)]], "ragged": [[(8, 32, 32)], [(4, 32, 48), (32, 32)], []]}


# ---- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("rows", sorted(ROWS))
def test_the_tower_on_kept_units_equals_the_oracle(model_type, rows):
    model = Q.build("tiny", model_type=model_type)
    inputs = Q.prompts(model, ROWS[rows])
    got, stats = pressed_logits(model, inputs, EveryThird())
    want = oracle_logits(model, inputs, every_third(inputs, "image"), every_third(inputs, "video"))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    videos = every_third(inputs, "video")
    kept = sum(map(sum, videos)) + sum(map(len, every_third(inputs, "image") or []))
    assert stats.kept_visual_tokens == kept
    assert stats.vision_block_tokens == [4 * kept] * len(model.model.visual.blocks)
    with torch.no_grad():  # not a tautology: the dropped tokens change the answer
        assert not torch.allclose(got, model(**inputs).logits[:, -1], atol=1e-4)


@pytest.mark.parametrize("model_type", TYPES)
def test_keep_all_is_the_unpressed_model_bit_for_bit(model_type):
    model = Q.build("tiny", model_type=model_type)
    inputs = Q.prompts(model, ROWS["ragged"])
    with torch.no_grad():
        want = model(**inputs).logits
        with KeepAll()(model) as run:
            got = model(**inputs).logits
    assert torch.equal(got, want)
    assert run.stats.kept_visual_tokens == run.stats.visual_tokens


def test_the_stock_tower_comes_back_after_the_block():
    model = Q.build("tiny")
    visual, vlm = model.model.visual, model.model
    inputs = Q.prompts(model, ROWS["single"])
    with pytest.raises(RuntimeError, match="boom"):
        with EveryThird()(model):
            assert "forward" in visual.__dict__
            raise RuntimeError("boom")
    assert "forward" not in visual.__dict__ and "get_video_features" not in vlm.__dict__
    with torch.no_grad():
        out = visual(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"]).pooler_output
    assert out.shape[0] == inputs["video_grid_thw"].prod(-1).sum() // 4


@pytest.mark.parametrize("press", [EveryThird(), mmpress.get_press("tome_vit", r=1)], ids=["drop", "tome"])
def test_sdpa_is_kept_in_the_tower(monkeypatch, press):
    model = Q.build("tiny")
    module = sys.modules[type(model.model.visual.blocks[0].attn).__module__]

    def eager(*args, **kwargs):
        raise AssertionError("eager attention ran")

    monkeypatch.setattr(module, "eager_attention_forward", eager)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    inputs = Q.prompts(model, ROWS["single"])
    pressed_logits(model, inputs, press)
    assert calls


def test_generate_ragged_decodes_like_each_row_alone():
    model = Q.build("tiny")
    rows = ROWS["ragged"]
    inputs = Q.prompts(model, rows)
    with torch.no_grad(), EveryThird()(model):
        batched = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, -3:]
        for i, row in enumerate(rows):
            alone = model.generate(**Q.prompts(model, [row], first_row=i), max_new_tokens=3, do_sample=False)
            assert torch.equal(batched[i], alone[0, -3:])


def test_a_pre_llm_press_reading_tower_signals_is_refused():
    model = Q.build("tiny")
    with pytest.raises(ValueError, match="kept patches only"):
        with mmpress.compose(EveryThird(), mmpress.get_press("visionzip", keep=8))(model):
            pass


# ---- tome_vit on the Qwen-VL tower, in 2x2 merge units ---------------------------------------
def reference_tome_tower(model, pixels, grid, r):
    """ToMe in merge units, by plain loops over one image's windows: eager attention with log(size)
    added to each key's logits, per-window bipartite matching (A = even, B = odd positions in the
    window's current order; each A's most similar B by cosine of the units' mean rotated keys; the
    r best edges, ties to the lower A; output order: unmerged A by edge score, then B), merged
    units as size-weighted averages slot by slot, a merged unit at its B unit's positions. Returns
    {original unit id of the representative: merger output}."""
    visual, vision = model.model.visual, model.config.vision_config
    merge, unit = vision.spatial_merge_size, vision.spatial_merge_size**2
    t, h, w = grid
    assert t == 1
    hu, wu = h // merge, w // merge
    side = vision.window_size // merge // vision.patch_size if hasattr(visual, "fullatt_block_indexes") else max(hu, wu)
    full = set(getattr(visual, "fullatt_block_indexes", range(len(visual.blocks))))
    wins = {}
    for i in range(hu):
        for j in range(wu):
            wins.setdefault((i // side, j // side), []).append(i * wu + j)
    with torch.no_grad():
        embedded = visual.patch_embed(pixels).view(hu * wu, unit, -1)
        windows = [[[embedded[u], 1.0, u] for u in wins[key]] for key in sorted(wins)]  # [x (4, C), size, rep]
        pos = torch.tensor([(merge * (u // wu) + a, merge * (u % wu) + b) for u in range(hu * wu)
                            for a in range(merge) for b in range(merge)])
        cos_all, sin_all = visual.rotary_pos_emb(embedded.flatten(0, 1), pos)
        rotate = sys.modules[type(visual.blocks[0].attn).__module__].apply_rotary_pos_emb_vision
        for b, block in enumerate(visual.blocks):
            segments = [windows] if b in full else [[win] for win in windows]
            keys = {}
            for segment in segments:
                units = [u for win in segment for u in win]
                x = torch.cat([u[0] for u in units])
                reps = torch.tensor([u[2] for u in units])
                rows = (reps[:, None] * unit + torch.arange(unit)).flatten()
                attn = block.attn
                q, k, v = attn.qkv(block.norm1(x)).view(len(rows), 3, attn.num_heads, -1).unbind(1)
                q, k = rotate(q, k, cos_all[rows], sin_all[rows])
                logits = torch.einsum("qhd,khd->hqk", q, k) * attn.scaling
                logits = logits + torch.tensor([u[1] for u in units]).log().repeat_interleave(unit)
                out = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v).reshape(len(rows), -1)
                x = x + attn.proj(out)
                for n, u in enumerate(units):
                    u[0] = x[n * unit:(n + 1) * unit]
                    keys[u[2]] = k[n * unit:(n + 1) * unit].mean(dim=(0, 1))
            if r:
                merged_windows = []
                for win in windows:
                    a_units, b_units = win[0::2], win[1::2]
                    rr = min(r, len(win) // 2)
                    edges = []
                    for ai, au in enumerate(a_units):
                        sims = [torch.nn.functional.cosine_similarity(keys[au[2]], keys[bu[2]], dim=0)
                                for bu in b_units]
                        best = max(range(len(b_units)), key=lambda bi: (sims[bi].item(), -bi))
                        edges.append((sims[best].item(), ai, best))
                    edges = sorted(edges, key=lambda e: (-e[0], e[1]))
                    merged = [[bu[0] * bu[1], bu[1], bu[2]] for bu in b_units]
                    for _, ai, bi in edges[:rr]:
                        merged[bi][0] = merged[bi][0] + a_units[ai][0] * a_units[ai][1]
                        merged[bi][1] += a_units[ai][1]
                    merged = [[x / s, s, rep] for x, s, rep in merged]
                    merged_windows.append([a_units[ai] for _, ai, _ in edges[rr:]] + merged)
                windows = merged_windows
            for win in windows:
                for u in win:
                    u[0] = u[0] + block.mlp(block.norm2(u[0]))
        units = [u for win in windows for u in win]
        out = visual.merger(torch.cat([u[0] for u in units]))
    return {u[2]: out[n] for n, u in enumerate(units)}


@pytest.mark.parametrize("model_type", TYPES)
def test_tome_in_units_equals_a_loop_reference(model_type):
    model = Q.build("tiny", model_type=model_type)
    inputs = Q.prompts(model, [[(32, 48)]])
    want = reference_tome_tower(model, inputs["pixel_values"], inputs["image_grid_thw"][0].tolist(), 1)
    with torch.no_grad(), mmpress.get_press("tome_vit", r=1)(model):
        got = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    rows = sorted(want)
    assert rows == got.abs().sum(-1).nonzero()[:, 0].tolist()
    torch.testing.assert_close(got[rows], torch.stack([want[u] for u in rows]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", TYPES)
def test_tome_r0_is_the_unpressed_model_and_r_gives_fewer_tokens_in_later_blocks(model_type):
    model = Q.build("tiny", model_type=model_type)
    inputs = Q.prompts(model, ROWS["ragged"])
    with torch.no_grad():
        want = model(**inputs).logits
        with mmpress.get_press("tome_vit", r=0)(model):
            got = model(**inputs).logits
    assert torch.equal(got, want)
    seen = []
    norm = model.model.visual.blocks[-1].norm1  # what the last block's attention reads
    handle = norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        _, stats = pressed_logits(model, inputs, mmpress.get_press("tome_vit", r=1))
    finally:
        handle.remove()
    first, *later = stats.vision_block_tokens
    assert first == sum(inputs[k].shape[0] for k in ("pixel_values", "pixel_values_videos"))
    assert all(n < first for n in later) and sum(seen) == later[0]
    assert stats.kept_visual_tokens * 4 == later[-1] < stats.visual_tokens * 4


@pytest.mark.parametrize("model_type", TYPES)
def test_tome_ragged_batch_equals_each_row_alone(model_type):
    model = Q.build("tiny", model_type=model_type)
    rows = ROWS["ragged"]
    press = mmpress.get_press("tome_vit", r=1)
    got, _ = pressed_logits(model, Q.prompts(model, rows), press)
    for i, row in enumerate(rows):
        alone, _ = pressed_logits(model, Q.prompts(model, [row], first_row=i), press)
        torch.testing.assert_close(got[i], alone[0], rtol=1e-4, atol=1e-5)
    with torch.no_grad(), press(model):
        batched = model.generate(**Q.prompts(model, rows), max_new_tokens=3, do_sample=False)[:, -3:]
        for i, row in enumerate(rows):
            alone = model.generate(**Q.prompts(model, [row], first_row=i), max_new_tokens=3, do_sample=False)
            assert torch.equal(batched[i], alone[0, -3:])


# ---- downsample ("resize") on the Qwen-VL tower -----------------------------------------------
def _frames(x, grid, vision):
    """An item's patch rows -> (t * T, C, H, W) frames, by loops over the rows."""
    t, h, w = grid
    m, p, tp = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
    out = torch.zeros(t * tp, 3, h * p, w * p)
    n = 0
    for f in range(t):
        for hb in range(h // m):
            for wb in range(w // m):
                for a in range(m):
                    for b in range(m):
                        patch = x[n].view(3, tp, p, p).transpose(0, 1)
                        out[f * tp:(f + 1) * tp, :, (hb * m + a) * p:(hb * m + a + 1) * p,
                            (wb * m + b) * p:(wb * m + b + 1) * p] = patch
                        n += 1
    return out


def _patches(frames, grid, vision):
    t, h, w = grid
    m, p, tp = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
    rows = []
    for f in range(t):
        for hb in range(h // m):
            for wb in range(w // m):
                for a in range(m):
                    for b in range(m):
                        y, x = (hb * m + a) * p, (wb * m + b) * p
                        rows.append(frames[f * tp:(f + 1) * tp, :, y:y + p, x:x + p].transpose(0, 1).flatten())
    return torch.stack(rows)


def resize_oracle(model, inputs, press):
    """Per kind: per item (features of the stock tower on the hand-resized item, the original
    token nearest each new token's centre)."""
    vision, out = model.config.vision_config, {}
    for kind, name in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if name not in inputs:
            continue
        grids = inputs[f"{kind}_grid_thw"].tolist()
        items = []
        for x, (t, h, w) in zip(inputs[name].split([t * h * w for t, h, w in grids]), grids):
            h2, w2 = press.grid_for(h, w, unit=2, frames=t)
            frames = press.resize(_frames(x, (t, h, w), vision), (h2 * vision.patch_size, w2 * vision.patch_size))
            with torch.no_grad():
                features = model.model.visual(_patches(frames, (t, h2, w2), vision),
                                              grid_thw=torch.tensor([[t, h2, w2]])).pooler_output
            nearest = [f * (h // 2) * (w // 2) + int((i + 0.5) * h / h2) * (w // 2) + int((j + 0.5) * w / w2)
                       for f in range(t) for i in range(h2 // 2) for j in range(w2 // 2)]
            items.append((features, nearest))
        out[kind] = items
    return out


def resize_oracle_logits(model, inputs, press):
    config, oracle = model.config, resize_oracle(model, inputs, press)
    position_ids = _lm_inputs(model, inputs)["position_ids"]
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().clone()
    keep = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    for kind, token in (("image", config.image_token_id), ("video", config.video_token_id)):
        where = (inputs["input_ids"] == token).nonzero()  # placeholders in row-major order = item order
        starts = 0
        grids = inputs[f"{kind}_grid_thw"].tolist() if kind in oracle else []
        for (features, nearest), (t, h, w) in zip(oracle.get(kind, []), grids):
            n = t * h * w // 4
            rows = where[starts:starts + n]
            flags = torch.zeros(n, dtype=torch.bool)
            flags[nearest] = True
            embeds[rows[flags][:, 0], rows[flags][:, 1]] = features
            keep[rows[~flags][:, 0], rows[~flags][:, 1]] = False
            starts += n
    mask = inputs["attention_mask"].bool() & keep
    out = []
    with torch.no_grad():
        for row in range(embeds.shape[0]):
            cols = mask[row].nonzero()[:, 0]
            hidden = model.model.language_model(inputs_embeds=embeds[row:row + 1, cols],
                                                position_ids=position_ids[..., row:row + 1, cols],
                                                attention_mask=torch.ones(1, len(cols), dtype=torch.long))
            out.append(model.lm_head(hidden.last_hidden_state[:, -1]))
    return torch.cat(out)


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("rows", sorted(ROWS))
def test_downsample_runs_the_tower_on_fewer_pixels_and_equals_its_oracle(model_type, rows):
    model = Q.build("tiny", model_type=model_type)
    inputs = Q.prompts(model, ROWS[rows])
    press = mmpress.get_press("downsample", keep_ratio=0.25)
    got, stats = pressed_logits(model, inputs, press)
    want = resize_oracle_logits(model, inputs, press)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    kept = sum(len(n) for items in resize_oracle(model, inputs, press).values() for _, n in items)
    assert stats.kept_visual_tokens == kept < stats.visual_tokens
    assert stats.vision_block_tokens == [4 * kept] * len(model.model.visual.blocks)


def test_downsample_keeping_every_token_is_the_unpressed_model():
    model = Q.build("tiny")
    inputs = Q.prompts(model, ROWS["ragged"])
    with torch.no_grad():
        want = model(**inputs).logits
        with mmpress.get_press("downsample", keep_ratio=1.0)(model):
            got = model(**inputs).logits
    assert torch.equal(got, want)


# ---- Qwen3-VL: DeepStack features of the kept units ----------------------------------------------
def test_qwen3_vl_tower_on_kept_units_equals_the_stock_tower_fed_them_by_hand():
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from mmpress.models.qwen3_vl import Qwen3VLAdapter

    model = Qwen3VLAdapter.build("tiny")
    visual = model.model.visual
    inputs = Qwen3VLAdapter.prompts(model, ROWS["ragged"])
    pixels, grids = inputs["pixel_values_videos"], inputs["video_grid_thw"]
    keeps = every_third(inputs, "video")
    flags = torch.tensor([k for keep in keeps for k in keep])
    rows = (flags.nonzero()[:, 0, None] * 4 + torch.arange(4)).flatten()
    index, weight = get_vision_interpolation_indices_and_weights(
        grids, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners, spatial_merge_size=2)
    positions = [(2 * i + a, 2 * j + b) for t, h, w in grids.tolist() for _ in range(t) for i in range(h // 2)
                 for j in range(w // 2) for a in range(2) for b in range(2)]
    lengths = [4 * sum(keep[f * (h * w // 4):(f + 1) * (h * w // 4)]) for keep, (t, h, w) in zip(keeps, grids.tolist())
               for f in range(t)]
    with torch.no_grad():
        want = visual(pixels[rows], grid_thw=grids, interp_indices=index[rows], interp_weights=weight[rows],
                      position_ids=torch.tensor(positions)[rows],
                      cu_seqlens=torch.tensor([0, *lengths]).cumsum(0).int())
        with EveryThird()(model):
            got = model.model.get_video_features(pixels, grids)
    torch.testing.assert_close(torch.cat(got.pooler_output)[flags], want.pooler_output, rtol=1e-4, atol=1e-5)
    for layer, expected in zip(got.deepstack_features, want.deepstack_features, strict=True):
        torch.testing.assert_close(torch.cat(layer)[flags], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("press", ["static_patches", "downsample"])
def test_qwen3_vl_keep_all_is_exact_and_ragged_is_each_row_alone(press):
    from test_static_patches import make_static

    from mmpress.models.qwen3_vl import Qwen3VLAdapter

    model = Qwen3VLAdapter.build("tiny")
    rows = ROWS["ragged"]
    inputs = make_static(Qwen3VLAdapter.prompts(model, rows))
    if press == "static_patches":
        keep_all, pressing = mmpress.get_press(press, tolerance=-1), mmpress.get_press(press)
    else:
        keep_all, pressing = mmpress.get_press(press, keep_ratio=1.0), mmpress.get_press(press, keep_ratio=0.25)
    with torch.no_grad():
        want = model(**inputs).logits
        with keep_all(model):
            assert torch.equal(model(**inputs).logits, want)
    got, stats = pressed_logits(model, inputs, pressing)
    assert stats.kept_visual_tokens < stats.visual_tokens
    assert stats.vision_block_tokens[0] < sum(inputs[k].shape[0] for k in ("pixel_values", "pixel_values_videos"))
    for i, row in enumerate(rows):
        alone, _ = pressed_logits(model, make_static(Qwen3VLAdapter.prompts(model, [row], first_row=i)), pressing)
        torch.testing.assert_close(got[i], alone[0], rtol=1e-4, atol=1e-5)


def test_qwen3_vl_refuses_tome_in_its_tower():
    from mmpress.models.qwen3_vl import Qwen3VLAdapter

    with pytest.raises(ValueError, match="does not support"):
        with mmpress.get_press("tome_vit", r=1)(Qwen3VLAdapter.build("tiny")):
            pass


def test_a_family_with_another_tower_runs_no_in_vision_press_until_it_opts_in():
    class OtherTower(Q):  # e.g. Qwen2.5-Omni's or Qwen3.5's tower: our tower forward is not theirs
        pass

    class OptedIn(Q):
        vision_modes = frozenset({"drop"})

    assert Q.vision_modes == {"drop", "merge", "resize"} and OtherTower.vision_modes == frozenset()
    assert OptedIn.vision_modes == {"drop"} and not OtherTower.runs(mmpress.get_press("static_patches"))
