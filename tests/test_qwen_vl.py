"""The Qwen-VL adapter (Qwen2-VL, Qwen2.5-VL): images of different sizes, M-RoPE positions,
video, every press x batch shape, against hand-built oracles. Tiny random configs, no download."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)

import mmpress
from mmpress.models.vision import received_attention
from mmpress.presses.base import ScorerPress

IMAGE, VIDEO, START, END, PAD = 7, 8, 5, 6, 0
PATCH, MERGE, TEMPORAL = 4, 2, 2
TEXT = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
            rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]})


def tiny_qwen(kind: str = "qwen2_vl", seed: int = 0):
    torch.manual_seed(seed)
    common = dict(depth=2, num_heads=4, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                  in_channels=3)
    if kind == "qwen2_vl":
        config = Qwen2VLConfig(vision_config=dict(embed_dim=32, hidden_size=48, mlp_ratio=2, **common),
                               text_config=TEXT, image_token_id=IMAGE, video_token_id=VIDEO,
                               vision_start_token_id=START, vision_end_token_id=END)
        cls = Qwen2VLForConditionalGeneration
    else:
        config = Qwen2_5_VLConfig(vision_config=dict(hidden_size=32, intermediate_size=64, out_hidden_size=48,
                                                     window_size=16, fullatt_block_indexes=[1], **common),
                                  text_config=TEXT, image_token_id=IMAGE, video_token_id=VIDEO,
                                  vision_start_token_id=START, vision_end_token_id=END)
        cls = Qwen2_5_VLForConditionalGeneration
    config._attn_implementation = "sdpa"
    model = cls(config).eval()
    model.generation_config.pad_token_id = PAD
    return model


def make_batch(model, rows, seed=0):
    """rows: per row, a list of ("image"|"video", (t, H, W) patches) and a text length; left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids_rows, images, videos = [], [], []
    for visuals, text_len in rows:
        row = torch.randint(10, 64, (2,), generator=g).tolist()
        for kind, grid in visuals:
            n = grid[0] * grid[1] * grid[2] // MERGE**2
            row += [START] + [IMAGE if kind == "image" else VIDEO] * n + [END]
            (images if kind == "image" else videos).append(grid)
        rows_text = torch.randint(10, 64, (text_len,), generator=g).tolist()
        ids_rows.append(row + rows_text)
    width = max(map(len, ids_rows))
    ids = torch.full((len(ids_rows), width), PAD)
    mask = torch.zeros(len(ids_rows), width, dtype=torch.long)
    for i, row in enumerate(ids_rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    batch = {"input_ids": ids, "attention_mask": mask}
    patch_dim = 3 * TEMPORAL * PATCH * PATCH
    for key, grids in (("image", images), ("video", videos)):
        if grids:
            grid = torch.tensor(grids)
            pixels = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)
            batch["pixel_values" if key == "image" else "pixel_values_videos"] = pixels
            batch[f"{key}_grid_thw"] = grid
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        batch["mm_token_type_ids"] = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    return batch


SINGLE = [([("image", (1, 8, 8))], 5)]  # 16 visual tokens
RAGGED = [([("image", (1, 8, 8))], 5), ([("image", (1, 8, 12)), ("image", (1, 8, 8))], 9), ([], 4)]
VIDEO_ROWS = [([("video", (2, 8, 8))], 5)]  # 2 frames x 4 x 4 = 32 tokens


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def model(request):
    return tiny_qwen(request.param)


CLS_PRESSES = {name for name, cls in mmpress.PRESSES.items() if "cls_attn" in cls.needs or "vision_keys" in cls.needs}


class NormPress(ScorerPress):
    name = "test-norm"

    def score(self, tokens, ctx):
        return tokens.norm(dim=-1)


def generate(model, inputs, steps=3):
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -steps:], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("rows", [SINGLE, RAGGED, VIDEO_ROWS], ids=["single", "ragged", "video"])
def test_keep_all_reproduces_unpressed(model, rows):
    check_keep_all(model, make_batch(model, rows))


def check_keep_all(model, batch):
    """The keep-everything press gives the unpressed logits and generate scores, bit for bit."""
    with torch.no_grad():
        reference, (ref_tokens, ref_scores) = model(**batch).logits, generate(model, batch)
        with mmpress.get_press("none")(model):
            assert torch.equal(model(**batch).logits, reference)
            tokens, scores = generate(model, batch)
    assert torch.equal(tokens, ref_tokens) and torch.equal(scores, ref_scores)


@pytest.mark.parametrize("name", [p for p in mmpress.list_presses("pre_llm")
                                  if p != "none" and mmpress.models.QwenVLAdapter.runs(mmpress.PRESSES[p])])
@pytest.mark.parametrize("rows", [SINGLE, RAGGED, VIDEO_ROWS], ids=["single", "ragged", "video"])
def test_every_press_forward_and_generate(model, name, rows):
    """Every press runs on images of different sizes in one batch, and on video; presses needing
    [CLS] attention (CLS_PRESSES) get the adapter's substitute (attention received)."""
    batch, press = make_batch(model, rows), mmpress.get_press(name, keep_ratio=0.5)
    with torch.no_grad(), press(model) as run:
        logits = model(**batch).logits
        tokens, scores = generate(model, batch)
    visual = run.stats.visual_tokens
    assert run.stats.kept_visual_tokens < visual
    # a text-only row loses nothing, so the ragged batch keeps its width
    assert logits.shape[1] == run.stats.pressed_seq_len <= batch["input_ids"].shape[1]
    assert torch.isfinite(logits).all() and torch.isfinite(scores).all()


def oracle_logits(model, inputs, kept_flat):
    """The pressed sequence by hand: every text token + the visual tokens at ``kept_flat`` (flat
    positions in the batch-1 prompt), with the unpressed prompt's M-RoPE ids."""
    vlm = model.model
    ids = inputs["input_ids"]
    embeds = vlm.get_input_embeddings()(ids)
    for token, feats in zip((IMAGE, VIDEO), features(model, inputs)):
        if feats:
            embeds = embeds.masked_scatter((ids == token)[..., None], torch.cat(feats))
    extra = {k: inputs[k] for k in ("mm_token_type_ids", "image_grid_thw", "video_grid_thw") if k in inputs}
    pos, _ = vlm.get_rope_index(ids, attention_mask=inputs["attention_mask"], **extra)
    keep = (ids[0] != IMAGE) & (ids[0] != VIDEO)
    keep[kept_flat] = True
    hidden = vlm.language_model(inputs_embeds=embeds[:, keep], position_ids=pos[:, :, keep]).last_hidden_state
    return model.lm_head(hidden)


def features(model, inputs):
    """Per-image and per-video features, as the model computes them."""
    vlm = model.model
    images = (vlm.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
              if "pixel_values" in inputs else [])
    videos = (vlm.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
              if "pixel_values_videos" in inputs else [])
    return list(images), list(videos)


def kept_positions(model, inputs, press):
    """Flat positions (batch 1) of the visual tokens ``press`` keeps, item by item."""
    out = []
    for token, feats in zip((IMAGE, VIDEO), features(model, inputs)):
        if feats:
            where = (inputs["input_ids"][0] == token).nonzero()[:, 0].split([f.shape[0] for f in feats])
            out += [w[press.press(f[None], mmpress.VisualContext())[1][0]] for f, w in zip(feats, where)]
    return torch.cat(out)


def test_pressed_video_matches_hand_built_sequence(model):
    inputs = make_batch(model, [([("video", (4, 8, 8)), ("image", (1, 8, 12))], 5)])
    press = NormPress(keep=6)
    with torch.no_grad():
        expected = oracle_logits(model, inputs, kept_positions(model, inputs, press))
        with press(model):
            got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pressed_forward_and_decoding_match_hand_built_sequence(model):
    """Two images of different sizes, batch 1: the pressed forward equals the kept tokens with
    their original M-RoPE ids, and greedy decoding equals a cache-free oracle at every step."""
    inputs = make_batch(model, [([("image", (1, 8, 8)), ("image", (1, 8, 12))], 6)])
    press = NormPress(keep=5)
    with torch.no_grad():
        kept = kept_positions(model, inputs, press)
        expected = oracle_logits(model, inputs, kept)
        with press(model):
            got = model(**inputs).logits
            tokens, scores = generate(model, inputs, steps=3)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        ids = inputs["input_ids"]
        for step in range(3):  # full recompute each step: the oracle uses no cache
            step_inputs = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if "mm_token_type_ids" in inputs:
                step_inputs["mm_token_type_ids"] = (ids == IMAGE).int()
            torch.testing.assert_close(oracle_logits(model, step_inputs, kept)[0, -1], scores[0, step],
                                       atol=1e-4, rtol=1e-4)
            ids = torch.cat([ids, tokens[:, step : step + 1]], dim=1)


def test_ragged_batch_equals_each_row_alone(model):
    batch = make_batch(model, RAGGED)
    press = mmpress.get_press("divprune", keep_ratio=0.5)
    with torch.no_grad(), press(model):
        logits = model(**batch).logits
        tokens, _ = generate(model, batch)
        for i, row in enumerate(RAGGED):
            alone = make_batch(model, [row])
            # the same random draws: rebuild the single row's pixels from the batch's
            row_logits = model(**_row(batch, alone, i)).logits
            torch.testing.assert_close(logits[i, -1], row_logits[0, -1], atol=1e-4, rtol=1e-4)
            row_tokens, _ = generate(model, _row(batch, alone, i))
            assert torch.equal(tokens[i], row_tokens[0])


def _row(batch, alone, i):
    """Row i of ``batch`` alone (unpadded), with its own images' pixels."""
    start = int(batch["attention_mask"][i].nonzero()[0])
    ids = batch["input_ids"][i : i + 1, start:]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = batch["mm_token_type_ids"][i : i + 1, start:]
    grids = batch.get("image_grid_thw")
    if grids is not None and (ids == IMAGE).any():
        per_row = [(batch["input_ids"][r] == IMAGE).sum() for r in range(len(batch["input_ids"]))]
        tokens = (grids.prod(-1) // MERGE**2).tolist()
        first = 0
        while sum(tokens[:first]) < sum(per_row[:i]):
            first += 1
        last = first
        while sum(tokens[first:last]) < per_row[i]:
            last += 1
        patches = grids.prod(-1).tolist()
        out["pixel_values"] = batch["pixel_values"][sum(patches[:first]) : sum(patches[:last])]
        out["image_grid_thw"] = grids[first:last]
    return out


def test_reindex_is_refused_and_qwen3_names_deepstack(model):
    with pytest.raises(ValueError, match="positions must be one of"):
        with NormPress(keep=4)(model, positions="reindex"):
            pass


def test_later_turn_on_pressed_cache_equals_rerunning_the_conversation(model):
    """New tokens fed onto the pressed cache continue from the original M-RoPE positions (with no
    attention mask Qwen numbers them from the cache length, which is shorter once pressed; a
    full-length mask with several new tokens fails in transformers itself, pressed or not)."""
    batch, new_ids = make_batch(model, SINGLE), torch.tensor([[11, 12, 13]])
    press = mmpress.get_press("divprune", keep=6)  # text-independent: both runs keep the same tokens
    whole = {**batch, "input_ids": torch.cat([batch["input_ids"], new_ids], dim=1)}
    whole["attention_mask"] = torch.ones_like(whole["input_ids"])
    if "mm_token_type_ids" in batch:
        whole["mm_token_type_ids"] = (whole["input_ids"] == IMAGE).int()
    with torch.no_grad(), press(model):
        out = model(**batch, use_cache=True)
        got = model(input_ids=new_ids, past_key_values=out.past_key_values).logits
        expected = model(**whole).logits[:, -3:]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---- no [CLS]: the attention each token receives ---------------------------------------------
class ProbePress(ScorerPress):
    """Keeps the tokens of highest ``cls_attn`` and records the signals it was given."""

    name = "test-probe"
    needs = ("cls_attn", "vision_keys")

    def score(self, tokens, ctx):
        self.seen.append((ctx.cls_attn, ctx.vision_keys))
        return ctx.cls_attn


def test_received_attention_equals_the_full_masked_map():
    """Query chunks and batched equal-length segments give the column means of the full
    block-diagonal softmax map."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 23, 3, 8, generator=g).unbind(0)
    bounds = [0, 5, 9, 13, 17, 23]
    seg = torch.repeat_interleave(torch.arange(5), torch.tensor(bounds).diff())
    logits = torch.einsum("ihd,jhd->hij", q, k) * 0.3
    probs = logits.masked_fill(seg[:, None] != seg[None, :], float("-inf")).softmax(dim=-1)  # (H, S, S)
    size = torch.tensor(bounds).diff()[seg]
    expected = (probs.sum(dim=1) / size).mean(dim=0)  # mean over the queries of the key's segment, then heads
    for budget in (1, 7, 1 << 24):
        torch.testing.assert_close(received_attention(q, k, bounds, 0.3, budget=budget), expected, atol=1e-6, rtol=0)


def eager_reference(model, inputs, monkeypatch):
    """Per image / video: eager attention's mean attention received in the tower's last block and
    its head-averaged keys, per merged token in the LM's order. The vision tower runs with eager
    attention; its attention probabilities are recorded where transformers computes them, and
    the merged tokens' order is read off the tower's own output (merger rows matched to
    pooler rows), not from the window index."""
    visual = model.model.visual
    modeling = sys.modules[type(visual).__module__]
    target, calls = visual.blocks[-1].attn, []
    eager = modeling.eager_attention_forward

    def recording(module, query, key, value, *args, **kwargs):
        out, weights = eager(module, query, key, value, *args, **kwargs)
        if module is target:
            calls.append((weights[0].mean(dim=0).mean(dim=0), key[0].mean(dim=0)))  # (n,), (n, d)
        return out, weights

    monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    monkeypatch.setattr(visual.config, "_attn_implementation", "eager")
    out = []
    for pixels, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        calls.clear()
        result = visual(inputs[pixels], grid_thw=inputs[grid_key])
        merged = visual.merger(result.last_hidden_state)  # in the blocks' (window) order
        order = torch.cdist(result.pooler_output, merged).argmin(dim=1)  # LM order -> block order
        assert order.unique().numel() == order.numel()
        score = torch.cat([c[0] for c in calls]).view(-1, MERGE**2).mean(dim=1)[order]
        keys = torch.cat([c[1] for c in calls])
        keys = keys.view(-1, MERGE**2, keys.shape[-1]).mean(dim=1)[order]
        sizes = (inputs[grid_key].prod(-1) // MERGE**2).tolist()
        out += list(zip(score.split(sizes), keys.split(sizes)))
    return out


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_cls_substitute_equals_eager_attention_received(kind, monkeypatch):
    """Two images of different sizes and a 2-frame video: the signal a press gets while the tower
    runs with SDPA equals eager attention's mean attention received (per frame for the video:
    Qwen attends within frames) and the head-averaged keys, token by token in the LM's order."""
    model = tiny_qwen(kind)
    inputs = make_batch(model, [([("image", (1, 8, 8)), ("image", (1, 8, 12)), ("video", (2, 8, 8))], 5)])
    press = ProbePress(keep=3)
    press.seen = []
    with torch.no_grad():
        with press(model):
            model(**inputs)
        expected = eager_reference(model, inputs, monkeypatch)
    got = {attn.shape[1]: (attn[0], keys[0]) for attn, keys in press.seen}  # groups: 16, 24, 32 tokens
    assert sorted(got) == [16, 24, 32]
    for score, keys in expected:
        torch.testing.assert_close(got[score.shape[0]][0], score, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[score.shape[0]][1], keys, atol=1e-5, rtol=1e-5)
    frames = {16: 1, 24: 1, 32: 2}  # each frame's patches share a total mass of 1 (softmax rows)
    assert all(abs(float(got[n][0].sum()) * MERGE**2 - t) < 1e-5 for n, t in frames.items())


def test_cls_presses_are_listed_for_qwen_vl():
    from mmpress.models import QwenVLAdapter

    assert all(QwenVLAdapter.runs(mmpress.PRESSES[name]) for name in CLS_PRESSES)
    assert "receives" in QwenVLAdapter.notes


# one image per row: transformers 5.18 repeats pre-encoded items per item, not per row, for beams,
# which scrambles a row holding several images (the adapter then refuses: placeholder counts differ)
BEAM_ROWS = [([("image", (1, 8, 8))], 5), ([("image", (1, 8, 12))], 9), ([("image", (1, 8, 8))], 3), ([], 4)]


def test_visionzip_under_beam_search_equals_each_row_alone(model):
    """generate(num_beams=2) repeats each encoded item per beam: every beam of every row gets its
    own item's signal (rows 0 and 2 share a group of equal shape), so the ragged batch decodes as
    each row alone."""
    batch = make_batch(model, BEAM_ROWS)
    press = mmpress.get_press("visionzip", keep_ratio=0.5)
    options = dict(max_new_tokens=3, min_new_tokens=3, num_beams=2, do_sample=False)
    with torch.no_grad(), press(model):
        tokens = model.generate(**batch, **options)[:, -3:]
        for i in range(len(BEAM_ROWS)):
            alone = model.generate(**_row(batch, None, i), **options)[:, -3:]
            assert torch.equal(tokens[i], alone[0])
