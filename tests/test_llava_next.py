"""LLaVA-NeXT (AnyRes): each image is one item (base + unpadded tiles), its image_newline tokens
fixed in place; the layout, the tower signals and the prompts against transformers' own code."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import mmpress
import mmpress.models.llava_next  # noqa: F401  (registers the family)
from mmpress.flops import language_flops, transformer_flops
from mmpress.models.llava_next import LlavaNextAdapter, TilesPart, anyres_tiles, rasters, tile_candidates
from mmpress.presses.base import ScorerPress

A = LlavaNextAdapter
SIGNALS = ("cls_attn", "vision_keys", "vision_features", "cls_attn_concat", "vision_keys_concat")


@pytest.fixture(scope="module")
def model():
    return A.build("tiny")


@dataclass
class Probe(ScorerPress):
    """Test press: records what it was given; keeps the tokens of largest norm."""

    name = "test-anyres-probe"
    needs = SIGNALS
    seen = []

    def score(self, tokens, ctx):
        self.seen.append((tokens.shape, ctx))
        return tokens.norm(dim=-1)


@dataclass
class NormPress(ScorerPress):
    name = "test-anyres-norm"
    seen = []

    def score(self, tokens, ctx):
        self.seen.append((tokens.shape, ctx.parts))
        return tokens.norm(dim=-1)


def reference_pack(model, per_crop: torch.Tensor, size) -> tuple[list[int], torch.Tensor]:
    """transformers' own ``pack_image_features`` of one image's per-crop values (crops, s*s, C),
    with a marker channel whose newline value is 1: (newline rows, the other rows' values)."""
    marked = torch.cat([torch.zeros_like(per_crop[..., :1]), per_crop], dim=-1).double()
    newline = torch.zeros(marked.shape[-1], dtype=torch.float64)
    newline[0] = 1
    out = model.model.pack_image_features([marked], torch.tensor([size]), "default", image_newline=newline)[0][0]
    rows = out[:, 0] == 1
    return rows.nonzero()[:, 0].tolist(), out[~rows, 1:]


@settings(max_examples=60, deadline=None)
@given(st.integers(8, 220), st.integers(8, 220))
@example(8, 129)  # so wide that unpad_image keeps no row of its tiles: the base alone
@example(129, 8)  # so tall that it keeps no column: rows of a newline alone
@example(72, 40)  # 2 x 2 tiles cut to one tile's width
def test_layout_matches_pack_image_features(model, h, w):
    """For any image size: the item's length, newline rows and token order are those of
    transformers' ``pack_image_features`` (newlines where it writes image_newline, each tiles token
    the patch of the crop it packs there), and generate's candidate layouts include it."""
    tiles = anyres_tiles(model.config, (h, w))
    per_crop = torch.randn(tiles.crops, tiles.side**2, 3, dtype=torch.float64)
    rows, values = reference_pack(model, per_crop, (h, w))
    assert list(tiles.fixed) == rows and tiles.length == len(rows) + values.shape[0]
    assert torch.equal(tiles.pack(per_crop), values)
    assert tiles in tile_candidates(model.config, tiles.side, tiles.size, None)
    assert tiles.size in rasters(model.config, tiles.side, None)[tiles.length]
    part = tiles.parts[1]
    assert isinstance(part, TilesPart) and part.length == values.shape[0] - 64
    assert part.crops == (tiles.grid if tiles.size == tiles.cut[2:] else None)


def test_newline_rows_of_the_real_features_are_the_fixed_tokens(model):
    """The model's own features: the fixed tokens are image_newline, no other token is."""
    inputs = A.prompts(model, A.example_rows["ragged"])
    items = A(model).visual_items((), inputs)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    for item, f in zip(items, features):
        newline = (f == model.model.image_newline).all(-1)
        assert newline.nonzero()[:, 0].tolist() == list(item.fixed) and item.length == f.shape[0]
        assert [p.role for p in item.parts] == ["base", "tiles"] and item.parts[0].grid == (1, 8, 8)
        assert sum(p.length for p in item.parts) == item.length - len(item.fixed)


@pytest.mark.parametrize("rows", [A.example_rows["ragged"], [[(129, 8)], [(8, 129), (32, 32)]]])
def test_encoded_images_have_the_forward_layout(model, rows):
    """generate's encoded images (no image_sizes) get the same items as a forward's, also for
    images of which unpadding keeps no tiles column (129 x 8 px) or no row (8 x 129 px)."""
    inputs = A.prompts(model, rows)
    adapter = A(model)
    forward = adapter.visual_items((), inputs)
    with torch.no_grad():
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    kwargs = {"input_ids": inputs["input_ids"], "mm_encoder_outputs": {"image": encoded}}
    from_features = adapter.visual_items((), kwargs)
    strip = [(i.length, i.grid, i.fixed, [(p.start, p.length, p.grid, p.role) for p in i.parts]) for i in forward]
    assert strip == [(i.length, i.grid, i.fixed, [(p.start, p.length, p.grid, p.role) for p in i.parts])
                     for i in from_features]


def test_encoded_images_are_read_by_length_where_it_tells(model):
    """generate's encoded images: a token count only one raster gives needs no device read; a
    (32, 32) px image's 136 tokens (8 x 8 tiles raster, or 24 x 2) make the newline rows read."""
    from test_llava import count_syncs

    def reads(rows):
        inputs = A.prompts(model, rows)
        with torch.no_grad(), mmpress.get_press("divprune", keep=16)(model):
            pressed = count_syncs(lambda: model.generate(**inputs, max_new_tokens=2, do_sample=False))
        return pressed.get("nonzero", 0) - count_syncs(lambda: model.generate(**inputs, max_new_tokens=2)).get(
            "nonzero", 0)

    assert len(rasters(model.config, 8, None)[anyres_tiles(model.config, (32, 32)).length]) == 2
    assert reads([[(64, 64)], [(40, 72), (96, 32)]]) == 0
    assert reads([[(64, 64)], [(32, 32)]]) == 1


def test_generate_resolves_the_tile_grid_as_the_forward(model):
    """Under generate (image_sizes dropped) the tower signals and crop grids equal the forward's,
    also for an image whose LM raster several pinpoint layouts could give ((72, 40) px: 2x1 tiles
    uncut or 2x2 tiles cut to one tile's width)."""
    tiles = anyres_tiles(model.config, (72, 40))
    assert len(tile_candidates(model.config, tiles.side, tiles.size, None)) > 1
    inputs = A.prompts(model, A.example_rows["ragged"])
    press = Probe(keep=8)
    Probe.seen = []
    with torch.no_grad(), press(model):
        model(**inputs)
        forward, Probe.seen = Probe.seen, []
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        generated, Probe.seen = Probe.seen, []
    assert len(forward) == len(generated) == 4
    for (_, a), (_, b) in zip(forward, generated):
        assert a.parts == b.parts
        for name in SIGNALS:
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_cls_attention_is_each_crops_eager_attention_packed():
    """cls_attn / vision_features of every LM token: its own crop's [CLS] attention (eager, mean
    over heads) and feature-layer state, packed by transformers' pack_image_features."""
    model = A.build("tiny", attn="eager")
    inputs = A.prompts(model, A.example_rows["ragged"])
    tiles = A.crops_of(model.config, inputs)
    pixels = torch.cat([p[: t.crops] for p, t in zip(inputs["pixel_values"], tiles)])
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
    attn = out.attentions[-2].mean(dim=1)[:, 0, 1:]  # vision_feature_layer -2: block L-2's [CLS] row
    states = out.hidden_states[-2][:, 1:]
    press = Probe(keep=8)
    Probe.seen = []
    with torch.no_grad(), press(model):
        model(**inputs)
    got = [(a, f) for _, ctx in Probe.seen for a, f in zip(ctx.cls_attn, ctx.vision_features)]
    start = 0
    for size, t in zip(inputs["image_sizes"].tolist(), tiles):
        _, ref_attn = reference_pack(model, attn[start : start + t.crops, :, None], size)
        _, ref_states = reference_pack(model, states[start : start + t.crops], size)
        start += t.crops
        assert any(a.shape[0] == ref_attn.shape[0] and torch.allclose(a, ref_attn[:, 0].float(), atol=1e-6)
                   and torch.allclose(f, ref_states.float(), atol=1e-5) for a, f in got)


def captured_lm_inputs(model, inputs, press=None):
    """What the language model receives (its hook registered after the press's: it sees the pressed call)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], mask=kwargs.get("attention_mask"), pos=kwargs.get("position_ids"))

    def run():
        handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            handle.remove()

    with torch.no_grad():
        if press is None:
            run()
        else:
            with press(model, positions="keep"):
                run()
    return seen


def test_newline_tokens_are_kept_in_place_and_unseen(model):
    """Under a press, every newline token reaches the language model unchanged, in order among
    the kept tokens of its image (positions kept: each token's original position); the press
    sees each image's base and tiles together (no newlines), with their parts."""
    inputs = A.prompts(model, A.example_rows["ragged"])
    items = A(model).visual_items((), inputs)
    full = captured_lm_inputs(model, inputs)["embeds"]
    NormPress.seen = []
    pressed = captured_lm_inputs(model, inputs, NormPress(keep=16))
    assert sorted(shape[1] for shape, _ in NormPress.seen) == sorted(i.length - len(i.fixed) for i in items)
    assert {parts for _, parts in NormPress.seen} == {i.parts for i in items}
    newline = model.model.image_newline
    for b, members in enumerate([[0], [1, 2], [3]]):  # the items of each row
        valid = pressed["mask"][b].bool()
        index = pressed["pos"][b][valid]  # each kept token's column in the unpressed row (ids 0..L-1)
        assert torch.all(index[1:] > index[:-1]), "order changed"
        assert torch.equal(pressed["embeds"][b][valid], full[b][index]), "a kept token changed"
        originals = (full[b] == newline).all(-1).nonzero()[:, 0]
        assert len(originals) == sum(len(items[i].fixed) for i in members) and torch.isin(originals, index).all()
        visual = (inputs["input_ids"][b] == model.config.image_token_id).nonzero()[:, 0]
        assert int(torch.isin(index, visual).sum()) == len(originals) + 16 * len(members)


def test_prefill_flops_count_each_images_crops(model):
    """The tower runs over each image's own crops, not the processor's zero padding."""
    inputs = A.prompts(model, [[(64, 64)], [(32, 32)]])  # 5 and 3 crops, padded to 5 each
    assert inputs["pixel_values"].shape[:2] == (2, 5)
    cfg = model.config
    flops = A.prefill_flops(cfg, inputs, seq_len=100)
    assert flops.vision == transformer_flops(cfg.vision_config, 65, batch=8)
    assert flops.projector == 2.0 * 8 * 64 * (32 * 48 + 48 * 48)
    assert flops.language == language_flops(cfg.text_config, 100, 2)


def tiny_processor(model):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast

    try:
        from transformers import LlavaNextImageProcessorPil as Images
    except ImportError:
        from transformers import LlavaNextImageProcessor as Images
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<image>"])}
    vocab |= {f"w{i}": i for i in range(len(vocab), 64)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    images = Images(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                    image_grid_pinpoints=model.config.image_grid_pinpoints)
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def test_prompts_lay_out_images_as_the_processor(model):
    """prompts() gives each image the placeholders, crops and image_sizes the real processor gives
    the same images."""
    rows = [[(40, 72)], [(72, 40), (32, 32)], [(64, 64)]]
    processor = tiny_processor(model)
    images = [np.zeros((h, w, 3), np.uint8) for row in rows for h, w in row]
    text = ["w9 " + " ".join(["<image>"] * len(row)) + " w10" for row in rows]
    real = processor(text=text, images=images, padding=True, return_tensors="pt")
    ours = A.prompts(model, rows)
    assert torch.equal(ours["image_sizes"], real["image_sizes"])
    assert ours["pixel_values"].shape == real["pixel_values"].shape
    token = model.config.image_token_id
    assert torch.equal((ours["input_ids"] == token).sum(1), (real["input_ids"] == token).sum(1))


def test_pixels_without_image_sizes_raise(model):
    inputs = A.prompts(model, A.example_rows["single"])
    del inputs["image_sizes"]
    with pytest.raises(ValueError, match="image_sizes"):
        A(model).visual_items((), inputs)


def test_registered():
    assert mmpress.registry.family_of(A.build("tiny")) is A
