"""The InternVL adapter: one item per image with its tiles as parts, [CLS] signals through the
pixel shuffle, generate's repeated tiles, the processor's layout, and the FLOPs count."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmpress
from mmpress.models.base import Part
from mmpress.models.internvl import IMAGE_TOKEN, IMG_END, IMG_START, InternVLAdapter
from mmpress.presses.base import ScorerPress

A = InternVLAdapter
T = 16  # tokens per tile of the tiny model: 32 px tiles, 4 px patches, 2 x 2 pixel shuffle
# (64, 96) px -> 3 x 2 tiles + thumbnail (7); (32, 32) -> 1; (64, 64) -> 2 x 2 + 1 (5); (32, 96) -> 3 x 1 + 1 (4)
ROWS = [[(32, 32), (64, 96)], [(64, 64), (32, 96), (64, 96)], [(64, 96)]]
TILES = [[1, 7], [5, 4, 7], [7]]


@pytest.fixture(scope="module")
def model():
    return A.build("tiny", lm_layers=4)


@dataclass
class Probe(ScorerPress):
    """Unregistered test press: records every group's context, keeps the top cls_attn tokens."""

    name = "test-internvl-probe"
    needs = ("cls_attn", "vision_keys", "vision_features", "text")
    seen = None

    def score(self, tokens, ctx):
        self.seen.append(ctx)
        return ctx.cls_attn if ctx.cls_attn is not None else ctx.cls_attn_concat


def probe_contexts(model, inputs, needs=Probe.needs, **kwargs):
    press = Probe(keep=8)
    press.seen, press.needs = [], needs
    with torch.no_grad(), press(model):
        model(**inputs, **kwargs)
    return press.seen


def row_alone(batch, i, tiles):
    start = int(batch["attention_mask"][i].nonzero()[0])
    first = sum(map(sum, tiles[:i]))
    return {"input_ids": batch["input_ids"][i : i + 1, start:],
            "attention_mask": batch["attention_mask"][i : i + 1, start:],
            "pixel_values": batch["pixel_values"][first : first + sum(tiles[i])]}


# ---- layout -----------------------------------------------------------------------------------
def test_one_item_per_image_with_its_tiles_as_parts(model):
    """Each image is one item of tiles x 16 tokens; a tiled image's parts are its crops, then the
    thumbnail ("base"), each a 4 x 4 raster, and it has no single grid; a one-tile image has one."""
    batch = A.prompts(model, ROWS)
    adapter = A(model)
    items = adapter.visual_items((), batch)
    assert [it.length for it in items] == [n * T for row in TILES for n in row]
    assert [it.source for it in items] == list(range(6)) and adapter.tile_start == [0, 1, 8, 13, 17, 24]
    one, seven = items[0], items[1]
    assert one.grid == (1, 4, 4) and one.parts == ()
    assert seven.grid is None and seven.kind == "image"
    crops = tuple(Part(k * T, T, (1, 4, 4), "crop") for k in range(6))
    assert seven.parts == crops + (Part(6 * T, T, (1, 4, 4), "base"),)
    assert items[1].shape == items[4].shape == items[5].shape  # pressed together


def test_press_acts_on_the_whole_image(model):
    """The budget is the image's: a press keeps k tokens of all its tiles together, as many from one
    tile as its ranking says (not k / tiles each)."""
    batch = A.prompts(model, [[(64, 96)]])
    seen = probe_contexts(model, batch)
    (ctx,) = seen
    assert ctx.cls_attn.shape == (1, 7 * T) and ctx.grid is None
    assert [p.role for p in ctx.parts] == ["crop"] * 6 + ["base"]
    with torch.no_grad(), mmpress.get_press("visionzip", keep=12)(model) as run:
        model(**batch)
    assert run.stats.kept_visual_tokens == 12


def test_prompts_match_the_processor():
    """prompts() lays a batch out as transformers' InternVLProcessor does for images of the same
    sizes: the same placeholder runs between <img> / </img> (tiles chosen by the processor's tiling,
    thumbnail included), the same number of tiles, left padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor, PreTrainedTokenizerFast
    from PIL import Image

    vocab = {"[PAD]": 0, "<IMG_CONTEXT>": IMAGE_TOKEN, "<img>": IMG_START, "</img>": IMG_END, "<video>": 6, "q": 10}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})

    class Processor(InternVLProcessor):  # no video processor here (it needs torchvision); images only
        def check_argument_for_proper_class(self, name, arg):
            return None

    images = GotOcr2ImageProcessorPil(crop_to_patches=True, size={"height": 32, "width": 32}, max_patches=12)
    processor = Processor(image_processor=images, tokenizer=tokenizer, video_processor=None, image_seq_length=T)
    model = A.build("tiny")
    ours = A.prompts(model, ROWS)
    pil = [[Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)) for h, w in row] for row in ROWS]
    theirs = processor(images=pil, text=["q " + "<IMG_CONTEXT> " * len(row) + "q" for row in ROWS],
                       return_tensors="pt", padding=True)
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    for i in range(len(ROWS)):
        mine = [t for t in ours["input_ids"][i].tolist() if t in (IMAGE_TOKEN, IMG_START, IMG_END)]
        real = [t for t in theirs["input_ids"][i].tolist() if t in (IMAGE_TOKEN, IMG_START, IMG_END)]
        assert mine == real
        assert ours["attention_mask"][i, -1] == 1 and theirs["attention_mask"][i, -1] == 1  # left padded
    with torch.no_grad():  # the processor's own batch runs under a press, one item per image
        adapter = A(model)
        assert [it.length // T for it in adapter.visual_items((), dict(theirs))] == [n for row in TILES for n in row]


_MODEL: dict = {}  # one tiny model for the hypothesis examples (a fixture is not reset between them)


@settings(max_examples=25, deadline=None)
@given(st.integers(8, 400), st.integers(8, 400))
def test_tile_count_is_the_processors(h, w):
    from transformers import GotOcr2ImageProcessorPil

    model = _MODEL.get("m") or _MODEL.setdefault("m", A.build("tiny"))
    images = GotOcr2ImageProcessorPil(crop_to_patches=True, size={"height": 32, "width": 32}, max_patches=12)
    inputs = A.prompts(model, [[(h, w)]])
    tiles = images.get_number_of_image_patches(h, w, {})
    assert inputs["pixel_values"].shape[0] == tiles
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == tiles * T


def test_video_prompts_are_refused(model):
    with pytest.raises(ValueError, match="one-tile images"):
        A.prompts(model, [[(4, 32, 32)]], kind="video")


# ---- signals ----------------------------------------------------------------------------------
def eager_reference(model, pixel_values, layer=-1):
    """Per tile, from eager attention and the tower's own modules, mapped to LM tokens with the
    model's own pixel_shuffle: the head-mean [CLS] attention (mean of each token's patches), the
    head-mean keys (likewise) and the projector's input."""
    tower = model.model.vision_tower
    out = tower(pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
    last = len(tower.encoder.layer) + layer  # the block producing hidden state `layer` (-1: the last)
    cls = out.attentions[last].mean(dim=1)[:, 0, 1:]  # (tiles, P)
    block = tower.encoder.layer[last]
    attn = block.attention
    k = attn.k_norm(attn.k_proj(block.layernorm_before(out.hidden_states[last])))
    keys = k.view(*k.shape[:2], attn.num_heads, -1).mean(dim=2)[:, 1:]  # (tiles, P, d)

    def shuffle(t):  # (tiles, P, c) -> (tiles, T, 4, c): each token's 4 patches, as the projector gets them
        side = math.isqrt(t.shape[1])
        s = model.model.pixel_shuffle(t.reshape(t.shape[0], side, side, -1), scale_factor=0.5)
        return s.reshape(t.shape[0], -1, 4, t.shape[-1])

    features = shuffle((out.last_hidden_state if layer == -1 else out.hidden_states[layer])[:, 1:]).flatten(2)
    return shuffle(cls[..., None]).mean(dim=(2, 3)), shuffle(keys).mean(dim=2), features


@pytest.mark.parametrize("qk_norm, layer", [(False, -1), (True, -1), (False, -2)])
def test_cls_signals_equal_eager_attention_through_the_pixel_shuffle(qk_norm, layer):
    model = A.build("tiny", attn="eager", vision_extra={"use_qk_norm": qk_norm})
    model.config.vision_feature_layer = layer
    if qk_norm:  # RMSNorm weights away from 1, so a missing norm shows
        with torch.no_grad():
            for block in model.model.vision_tower.encoder.layer:
                block.attention.q_norm.weight.uniform_(0.5, 2.0)
                block.attention.k_norm.weight.uniform_(0.5, 2.0)
    batch = A.prompts(model, ROWS)
    with torch.no_grad():
        cls, keys, features = eager_reference(model, batch["pixel_values"], layer)
    seen = probe_contexts(model, batch)
    starts = [0, 1, 8, 13, 17, 24]
    lengths = [n for row in TILES for n in row]
    by_length = {}
    for i, (s, n) in enumerate(zip(starts, lengths)):
        by_length.setdefault(n, []).append(range(s, s + n))
    assert sorted(c.cls_attn.shape[1] // T for c in seen) == sorted(by_length)
    for ctx in seen:
        tiles = [list(r) for r in by_length[ctx.cls_attn.shape[1] // T]]
        torch.testing.assert_close(ctx.cls_attn, torch.stack([cls[t].flatten() for t in tiles]), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ctx.vision_keys, torch.stack([keys[t].flatten(0, 1) for t in tiles]),
                                   atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ctx.vision_features, torch.stack([features[t].flatten(0, 1) for t in tiles]))
        assert not ctx.cls_first


def test_concat_and_layer_signals_have_one_value_per_token(model):
    batch = A.prompts(model, [[(64, 96)], [(64, 96)]])
    seen = probe_contexts(model, batch, needs=("cls_attn_concat", "vision_keys_concat"))
    (ctx,) = seen
    assert ctx.cls_attn_concat.shape == (2, 7 * T) and ctx.vision_keys_concat.shape == (2, 7 * T, 32)
    # each tile's [CLS] softmax over its 64 patches and itself: token means sum to at most 1 / 4 per tile
    per_tile = ctx.cls_attn_concat.view(2, 7, T).sum(-1) * 4
    assert (per_tile <= 1 + 1e-6).all() and (per_tile > 0).all()


# ---- batches and generate -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["visionzip", "divprune", "vispruner"])
def test_ragged_batch_equals_each_row_alone(model, name):
    press, batch = mmpress.get_press(name, keep=12), A.prompts(model, ROWS)
    with torch.no_grad(), press(model):
        logits = model(**batch).logits[:, -1]
        tokens = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
        for i in range(len(ROWS)):
            row = row_alone(batch, i, TILES)
            torch.testing.assert_close(logits[i], model(**row).logits[0, -1], atol=1e-4, rtol=1e-4)
            assert torch.equal(tokens[i], model.generate(**row, max_new_tokens=3, do_sample=False)[0, -3:])


@pytest.mark.parametrize("name", ["visionzip", "vispruner"])
def test_beams_read_the_signals_of_their_own_images(model, name):
    """generate encodes the tiles once and repeats each row's per beam / returned sequence: the
    [CLS] signals of a beam's image are its original image's."""
    press, batch = mmpress.get_press(name, keep=12), A.prompts(model, ROWS)
    with torch.no_grad(), press(model):
        beams = model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)[:, -3:]
        both = model.generate(**batch, max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False)
        for i in range(len(ROWS)):
            alone = model.generate(**row_alone(batch, i, TILES), max_new_tokens=3, num_beams=2, do_sample=False)
            assert torch.equal(beams[i], alone[0, -3:])
    assert both.shape[0] == 2 * len(ROWS)


def test_keep_all_is_bit_identical(model):
    batch = A.prompts(model, ROWS)
    with torch.no_grad():
        reference = model(**batch).logits
        ref_tokens = model.generate(**batch, max_new_tokens=3, do_sample=False)
        with mmpress.get_press("none")(model):
            assert torch.equal(model(**batch).logits, reference)
            assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), ref_tokens)


# ---- errors -------------------------------------------------------------------------------------
def test_prompt_not_laid_out_by_tiles_is_an_error(model):
    batch = A.prompts(model, [[(32, 32)]])
    ids = batch["input_ids"].clone()
    ids[0, (ids[0] == IMAGE_TOKEN).nonzero()[0]] = 11  # one placeholder short: a run of 15 and no tile of it
    with pytest.raises(ValueError, match="tiles x 16"), mmpress.get_press("divprune", keep=4)(model):
        model(**{**batch, "input_ids": ids})
    two = A.prompts(model, [[(32, 32), (32, 32)]])
    with pytest.raises(ValueError, match="pixel_values holds 1"), mmpress.get_press("divprune", keep=4)(model):
        model(**{**two, "pixel_values": two["pixel_values"][:1]})


def test_inputs_embeds_is_an_error(model):
    batch = A.prompts(model, [[(32, 32)]])
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(ValueError, match="needs input_ids"), mmpress.get_press("divprune", keep=4)(model):
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])


# ---- cost ---------------------------------------------------------------------------------------
def test_prefill_flops_by_hand(model):
    batch = A.prompts(model, ROWS)
    tiles, width = batch["pixel_values"].shape[0], batch["input_ids"].shape[1]
    flops = A.prefill_flops(model.config, batch, width)
    # tower: 2 blocks of width 32 (4 heads of 8, MLP 64) over [CLS] + 64 patches per tile
    s, c, f = 65, 32, 64
    block = s * (4 * c * c + 2 * c * f) + 2 * c * s * s
    embed = 64 * 3 * 4 * 4 * c  # the patch embedding: a 4 x 4 convolution of 3 channels to 32, per patch
    assert flops.vision == 2.0 * tiles * (embed + 2 * block)
    # projector: every LM token (16 a tile) from 4 x 32 channels to 48, then 48 -> 48
    tokens = int((batch["input_ids"] == IMAGE_TOKEN).sum())
    assert tokens == tiles * T
    assert flops.projector == 2.0 * tokens * (128 * 48 + 48 * 48)
    assert flops.language > 0 and flops.total == flops.vision + flops.projector + flops.language


def test_tower_and_projector_flops_equal_the_counted_ones():
    """Patch embedding, blocks, projector: exactly what torch counts with eager attention."""
    from torch.utils.flop_counter import FlopCounterMode

    model = A.build("tiny", attn="eager")
    batch = A.prompts(model, ROWS)
    flops = A.prefill_flops(model.config, batch, batch["input_ids"].shape[1])
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        A.encode(model, batch)
    assert flops.vision + flops.projector == counter.get_total_flops()


def test_tile_side_the_pixel_shuffle_cannot_divide_is_refused():
    with pytest.raises(ValueError, match="multiple of 28 px"):
        A.build("real", image_size=434, vision_layers=1, lm_layers=1)  # 31 patches a side


def test_real_shape_is_internvl3_at_448_px():
    model = A.build("real", vision_layers=1, lm_layers=1)
    batch = A.prompts(model, [list(A.bench_media.values())])
    assert batch["pixel_values"].shape == (5, 3, 448, 448)  # 2 x 2 tiles + thumbnail
    assert int((batch["input_ids"] == IMAGE_TOKEN).sum()) == 5 * 256


def test_anyres_presses_read_the_tiles(model):
    """HiPrune and SCOPE press the thumbnail and each crop; GlobalCom2 needs the crop grid, which
    InternVL's inputs lack, and says so."""
    batch = A.prompts(model, ROWS)
    for name in ("hiprune", "scope"):
        with torch.no_grad(), mmpress.get_press(name, keep=14)(model) as run:
            model(**batch)
        assert run.stats.kept_visual_tokens == 6 * 14
    with pytest.raises(ValueError, match="thumbnail"), mmpress.get_press("globalcom2", keep=14)(model):
        model(**batch)


@pytest.mark.parametrize("name", ["visionzip", "vispruner", "prumerge", "divprune"])
def test_pressed_generate_adds_no_host_syncs(model, name):
    """Locating the tiles (one host read of the placeholder mask, then numpy) and gathering each
    image's tile signals add no syncing op to generate."""
    from test_llava import count_syncs

    batch = A.prompts(model, ROWS)
    with torch.no_grad():
        unpressed = count_syncs(lambda: model.generate(**batch, max_new_tokens=2, do_sample=False))
        with mmpress.get_press(name, keep=12)(model):
            pressed = count_syncs(lambda: model.generate(**batch, max_new_tokens=2, do_sample=False))
    assert pressed == unpressed, name


@dataclass
class NormPress(ScorerPress):
    """Unregistered test press: keeps the tokens of largest norm (deterministic, scattered)."""

    name = "test-internvl-norm"

    def score(self, tokens, ctx):
        return tokens.norm(dim=-1)


@pytest.mark.parametrize("positions", ["keep", "reindex"])
def test_pressed_forward_matches_hand_built_sequence(model, positions):
    """A row with a tiled and a one-tile image: the language model gets the text and, of each
    image, the tokens the press picks over all its tiles (positions original or 0..L'-1)."""
    from mmpress.presses.base import VisualContext

    inputs, press = A.prompts(model, [[(64, 96), (32, 32)]]), NormPress(keep=10)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output.flatten(0, 1)
        ids = inputs["input_ids"][0]
        image = ids == IMAGE_TOKEN
        embeds = model.get_input_embeddings()(ids).clone()
        embeds[image] = feats
        cols, keep = image.nonzero()[:, 0], ~image
        for start, n in ((0, 7 * T), (7 * T, T)):
            _, index = press.press(feats[start : start + n][None], VisualContext())
            keep[cols[start + index[0]]] = True
        pos = torch.arange(len(ids))[keep] if positions == "keep" else torch.arange(int(keep.sum()))
        hidden = model.model.language_model(inputs_embeds=embeds[keep][None], position_ids=pos[None]).last_hidden_state
        expected = model.lm_head(hidden)
        with press(model, positions=positions):
            got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
