"""static_patches (presses/static_patches.py) on Qwen-VL: the merge units that copy the previous
temporal step (videos) or their LOCO-I prediction (images, PixelPrune) are dropped before the
tower. The kept set is checked against a plain-loop computation written here; the pressed run
against the oracle of tests/test_qwen_in_vision.py (the stock tower fed the kept patches by hand,
the language model fed the kept embeddings with their unpressed M-RoPE ids, row by row)."""

from __future__ import annotations

import pytest
import torch
from test_qwen_in_vision import ROWS, TYPES, oracle_logits, pressed_logits

import mmpress
from mmpress.models.qwen_vl import QwenVLAdapter as Q
from mmpress.presses.spec import parse_press, press_spec
from mmpress.presses.static_patches import StaticPatchesPress


def _item_units(inputs, kind):
    """Per item of ``kind``: its (t, h, w) unit grid and a view of its units' pixels (t, h, w, D)."""
    pixels = inputs["pixel_values" if kind == "image" else "pixel_values_videos"]
    out, offset = [], 0
    for t, h, w in inputs[f"{kind}_grid_thw"].tolist():
        n = t * h * w // 4
        out.append(pixels.view(-1, 4 * pixels.shape[-1])[offset:offset + n].view(t, h // 2, w // 2, -1))
        offset += n
    return out


def make_static(inputs):
    """Exact copies: video step 1 repeats step 0 whole, step 3 repeats step 2's top half; an
    image's first unit row is flat (each unit a copy of unit (0, 0)) and its unit (2, 1) copies
    its left neighbour."""
    for units in _item_units(inputs, "video") if "video_grid_thw" in inputs else []:
        units[1] = units[0]
        if units.shape[0] > 3:
            units[3, : units.shape[1] // 2] = units[2, : units.shape[1] // 2]
    for units in _item_units(inputs, "image") if "image_grid_thw" in inputs else []:
        units[0, 0, 1:] = units[0, 0, :1]
        units[0, 2, 1] = units[0, 2, 0]
    return inputs


def _same(x, y, tolerance):
    return bool((x - y).abs().max() <= tolerance)


def expected_keep(units, kind, tolerance=0.0):
    """The kept units of one item, by plain loops: videos against the previous step; images by
    PixelPrune's LOCO-I prediction (left A, above B, above-left C)."""
    t, h, w, _ = units.shape
    keep = []
    for f in range(t):
        for r in range(h):
            for c in range(w):
                if t > 1:
                    keep.append(f == 0 or not _same(units[f, r, c], units[f - 1, r, c], tolerance))
                    continue
                if kind == "video" or (r, c) == (0, 0):
                    keep.append(True)
                    continue
                g = units[0]
                if r == 0:
                    pred = g[r, c - 1]
                elif c == 0:
                    pred = g[r - 1, c]
                else:
                    a, b, cc = g[r, c - 1], g[r - 1, c], g[r - 1, c - 1]
                    pred = b if _same(cc, a, tolerance) and not _same(cc, b, tolerance) else a
                keep.append(not _same(g[r, c], pred, tolerance))
    return keep


def expected(inputs, kind, tolerance=0.0):
    if f"{kind}_grid_thw" not in inputs:
        return None
    return [expected_keep(units, kind, tolerance) for units in _item_units(inputs, kind)]


# ---- the kept set ---------------------------------------------------------------------------
@pytest.mark.parametrize("tolerance", [0.0, 0.3])
def test_the_kept_set_is_exactly_the_repeats(tolerance):
    model = Q.build("tiny")
    inputs = make_static(Q.prompts(model, ROWS["ragged"]))
    if tolerance:  # near copies: noise below the tolerance on every copied unit, one unit above it
        for units in _item_units(inputs, "video"):
            units[1] += torch.rand_like(units[1]) * 0.2
            units[1, 0, 0, 0] += 1.0
    press = StaticPatchesPress(tolerance=tolerance)
    for kind in ("image", "video"):
        for units in _item_units(inputs, kind):
            want = torch.tensor(expected_keep(units, kind, tolerance))
            got = press.drop_plan(units, kind).flatten()
            assert torch.equal(got, want)
            assert not want.all()  # each item has something to drop


def test_image_rule_predicts_from_above_across_a_vertical_edge():
    """LOCO-I: a flat left region (columns 0-1) and a flat right column of another value. At
    (r, 2) the above-left C equals the left A but not the above B (a vertical edge): the unit is
    predicted from above and dropped; only (0, 0) and (0, 2) are kept."""
    units = torch.zeros(1, 3, 3, 2)
    units[0, :, 2] = 1.0
    got = StaticPatchesPress().drop_plan(units, "image")[0]
    want = torch.tensor([[True, False, True], [False, False, False], [False, False, False]])
    assert torch.equal(got, want)
    assert torch.equal(got.flatten(), torch.tensor(expected_keep(units, "image")))
    assert StaticPatchesPress(images="none").drop_plan(units, "image").all()


# ---- the pressed run --------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("rows", sorted(ROWS))
def test_pressed_run_equals_the_oracle_with_the_copies_removed(model_type, rows):
    model = Q.build("tiny", model_type=model_type)
    inputs = make_static(Q.prompts(model, ROWS[rows]))
    keep_image, keep_video = expected(inputs, "image"), expected(inputs, "video")
    got, stats = pressed_logits(model, inputs, mmpress.get_press("static_patches"))
    want = oracle_logits(model, inputs, keep_image, keep_video)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    kept = sum(sum(k) for keeps in (keep_image or [], keep_video) for k in keeps)
    assert stats.kept_visual_tokens == kept < stats.visual_tokens
    # fewer tokens reach every block of the tower: 4 patches per kept unit
    assert stats.vision_block_tokens == [4 * kept] * len(model.model.visual.blocks)


@pytest.mark.parametrize("model_type", TYPES)
def test_keep_all_reproduces_the_unpressed_logits_exactly(model_type):
    model = Q.build("tiny", model_type=model_type)
    inputs = make_static(Q.prompts(model, ROWS["ragged"]))
    with torch.no_grad():
        want = model(**inputs).logits
        with StaticPatchesPress(tolerance=-1)(model) as run:
            got = model(**inputs).logits
    assert torch.equal(got, want)
    assert run.stats.kept_visual_tokens == run.stats.visual_tokens


def test_the_tower_blocks_see_fewer_patches():
    model = Q.build("tiny")
    inputs = make_static(Q.prompts(model, ROWS["single"]))
    seen = []
    handle = model.model.visual.blocks[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        pressed_logits(model, inputs, StaticPatchesPress())
    finally:
        handle.remove()
    assert seen == [4 * sum(expected(inputs, "video")[0])] and seen[0] < inputs["pixel_values_videos"].shape[0]


def test_composes_with_a_pre_llm_press_choosing_among_the_kept():
    model = Q.build("tiny")
    inputs = make_static(Q.prompts(model, ROWS["ragged"]))
    press = mmpress.compose(mmpress.get_press("static_patches"), mmpress.get_press("divprune", keep=10))
    _, stats = pressed_logits(model, inputs, press)
    kept = [sum(k) for keeps in (expected(inputs, "image"), expected(inputs, "video")) for k in keeps]
    assert stats.kept_visual_tokens == sum(min(10, k) for k in kept)
    assert stats.vision_block_tokens == [4 * sum(kept)] * len(model.model.visual.blocks)


def test_generate_ragged_decodes_like_each_row_alone():
    model = Q.build("tiny")
    rows = ROWS["ragged"]
    inputs = make_static(Q.prompts(model, rows))
    with torch.no_grad(), StaticPatchesPress()(model):
        batched = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, -3:]
        for i, row in enumerate(rows):
            alone = model.generate(**make_static(Q.prompts(model, [row], first_row=i)), max_new_tokens=3,
                                   do_sample=False)
            assert torch.equal(batched[i], alone[0, -3:])


# ---- the press as a value -------------------------------------------------------------------
def test_bad_settings_raise_naming_the_fix():
    with pytest.raises(ValueError, match="tolerance"):
        StaticPatchesPress(tolerance=-0.5)
    with pytest.raises(ValueError, match="images"):
        StaticPatchesPress(images="left")
    with pytest.raises(ValueError, match="takes no budget"):
        mmpress.get_press("static_patches", keep=4)
    with pytest.raises(ValueError, match="does not support"):
        with StaticPatchesPress()(mmpress.registry.FAMILIES["llava"].build("tiny")):
            pass


def test_spec_round_trip():
    press = parse_press("static_patches+divprune:16")
    assert press_spec(press) == "static_patches+divprune:16"
    assert parse_press("static_patches", tolerance=0.1) == StaticPatchesPress(tolerance=0.1)
