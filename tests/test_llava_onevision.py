"""LLaVA-OneVision: AnyRes images (tiled when alone in a row, shrunk past anyres_max_N) and videos
(pooled frames, one newline) as items; SigLIP's attention-received signal; against transformers'
own code."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mmpress
import mmpress.models.llava_onevision  # noqa: F401  (registers the family)
from mmpress.flops import language_flops, transformer_flops
from mmpress.models.llava_next import anyres_tiles, rasters, tile_candidates
from mmpress.models.llava_onevision import LlavaOnevisionAdapter
from mmpress.presses.base import PRESSES, ScorerPress

A = LlavaOnevisionAdapter
SIGNALS = ("cls_attn", "vision_keys", "vision_features", "cls_attn_concat", "vision_keys_concat")
MIXED = [[(96, 64)], [(4, 32, 32)], [(4, 32, 32), (40, 72)]]  # images and videos in one batch


@pytest.fixture(scope="module")
def model():
    return A.build("tiny")


@dataclass
class Probe(ScorerPress):
    name = "test-onevision-probe"
    needs = SIGNALS
    seen = []

    def score(self, tokens, ctx):
        self.seen.append((tokens.shape, ctx))
        return tokens.norm(dim=-1)


def reference_pack(model, per_crop: torch.Tensor, size) -> tuple[list[int], torch.Tensor]:
    """transformers' own ``pack_image_features`` (with its anyres_max_N shrink) of one image's
    per-crop values, a marker channel flagging the newline: (newline rows, the other rows)."""
    marked = torch.cat([torch.zeros_like(per_crop[..., :1]), per_crop], dim=-1).double()
    newline = torch.zeros(marked.shape[-1], dtype=torch.float64)
    newline[0] = 1
    out = model.model.pack_image_features([marked], torch.tensor([size]), image_newline=newline,
                                          vision_aspect_ratio=model.config.vision_aspect_ratio)[0][0]
    rows = out[:, 0] == 1
    return rows.nonzero()[:, 0].tolist(), out[~rows, 1:]


def count_processor(model):
    """transformers' LLaVA-OneVision processor's token counting, without its video processor
    (which needs torchvision): the counting methods read only these attributes."""
    from transformers import LlavaOnevisionProcessor

    processor = object.__new__(LlavaOnevisionProcessor)
    processor.image_processor = type("P", (), {"image_grid_pinpoints": model.config.image_grid_pinpoints})()
    processor.num_image_tokens = 64
    processor.vision_aspect_ratio = model.config.vision_aspect_ratio
    processor.vision_feature_select_strategy = "full"
    processor.image_token, processor.video_token = "<image>", "<video>"
    return processor


@settings(max_examples=60, deadline=None)
@given(st.integers(8, 200), st.integers(8, 200))
def test_layout_matches_pack_image_features(model, h, w):
    """Any image size, shrunk or not: length, newline rows and token order as transformers'
    pack_image_features and its processor's count; generate's candidates include the layout."""
    tiles = anyres_tiles(model.config, (h, w), 4)
    per_crop = torch.randn(tiles.crops, 64, 3, dtype=torch.float64)
    rows, values = reference_pack(model, per_crop, (h, w))
    assert list(tiles.fixed) == rows and tiles.length == len(rows) + values.shape[0]
    torch.testing.assert_close(tiles.pack(per_crop), values, rtol=0, atol=1e-12)
    assert tiles.length == count_processor(model)._get_number_of_features(h, w, 32, 32)
    assert tiles in tile_candidates(model.config, tiles.side, tiles.size, 4)
    assert tiles.size in rasters(model.config, tiles.side, 4)[tiles.length]


def test_shrunk_tiles_have_no_crop_grid(model):
    """A 3 x 2 tiles raster (24 x 16 > 4 crops' worth) is shrunk to 19 x 13: its tokens are no
    longer one crop's patch each, so the tiles part gives no crop grid; an unshrunk one does."""
    shrunk, plain = anyres_tiles(model.config, (96, 64), 4), anyres_tiles(model.config, (64, 64), 4)
    assert shrunk.size == (19, 13) and shrunk.parts[1].crops is None
    assert plain.size == (16, 16) and plain.parts[1].crops == (2, 2)


def test_items_of_images_and_videos(model):
    """A row's lone image is tiled, images sharing a row are their base + one newline; a video is
    its pooled frames (t, 4, 4) then one newline; the real features have image_newline there."""
    inputs = A.prompts(model, MIXED)
    items = A(model).visual_items((), inputs)
    assert [(i.kind, i.grid, i.fixed[-1] == i.length - 1) for i in items] == [
        ("image", None, True), ("image", None, True), ("video", (4, 4, 4), True), ("video", (4, 4, 4), True)]
    assert items[2].length == 4 * 16 + 1 and items[2].fixed == (64,)
    with torch.no_grad():
        images = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                batch_num_images=inputs["batch_num_images"]).pooler_output
        videos = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
    newline = model.model.image_newline
    for item, f in zip(items, [*images, *videos]):
        assert (f == newline).all(-1).nonzero()[:, 0].tolist() == list(item.fixed) and f.shape[0] == item.length
    two = A(model).visual_items((), A.prompts(model, [[(72, 40), (32, 32)]]))
    assert [(i.length, i.grid, i.fixed) for i in two] == [(65, (1, 8, 8), (64,))] * 2


def test_generate_gives_the_forwards_items_and_signals(model):
    """Under generate (images and videos encoded first, image_sizes dropped) every item's signals
    and parts equal the forward's."""
    inputs = A.prompts(model, MIXED)
    Probe.seen = []
    with torch.no_grad(), Probe(keep=8)(model):
        model(**inputs)
        forward, Probe.seen = Probe.seen, []
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        generated, Probe.seen = Probe.seen, []
    assert len(forward) == len(generated) == 3
    for (sa, a), (sb, b) in zip(forward, generated):
        assert sa == sb and a.parts == b.parts
        for name in SIGNALS:
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def received(attentions: torch.Tensor) -> torch.Tensor:
    """Attention each token receives: eager probabilities averaged over heads and queries."""
    return attentions.mean(dim=1).mean(dim=1)


def test_signal_is_the_attention_received_in_each_crop_and_frame():
    """cls_attn (no [CLS]): per crop / frame, eager attention received in the feature layer (the
    last block), packed as pack_image_features packs (images) or pooled bilinearly to 4 x 4 as
    apply_pooling pools (videos)."""
    model = A.build("tiny", attn="eager")
    inputs = A.prompts(model, [[(96, 64)], [(4, 32, 32)]])
    tiles = A.crops_of(model.config, inputs)[0]
    with torch.no_grad():
        image = model.model.vision_tower(inputs["pixel_values"][0, : tiles.crops], output_attentions=True)
        video = model.model.vision_tower(inputs["pixel_values_videos"][0], output_attentions=True)
    Probe.seen = []
    with torch.no_grad(), Probe(keep=8)(model):
        model(**inputs)
    by_kind = {ctx.cls_attn.shape[1]: ctx for _, ctx in Probe.seen}
    _, ref = reference_pack(model, received(image.attentions[-1])[..., None], (96, 64))
    torch.testing.assert_close(by_kind[ref.shape[0]].cls_attn[0], ref[:, 0].float(), atol=1e-6, rtol=1e-5)
    frames = received(video.attentions[-1]).view(4, 1, 8, 8)
    pooled = F.interpolate(frames, size=[4, 4], mode="bilinear").flatten()
    torch.testing.assert_close(by_kind[64].cls_attn[0], pooled, atol=1e-6, rtol=1e-5)


def generate(model, inputs):
    out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, -2:], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("name", sorted(n for n, cls in PRESSES.items() if cls.video and cls.stage == "pre_llm"))
def test_video_presses_run_on_video_and_keep_the_newline(model, name):
    """The video presses run on OneVision video, forward and generate: each video's newline
    reaches the language model, and a ragged batch (rows of other text lengths) gives each row
    its logits and tokens alone."""
    rows = [[(4, 32, 32)], [(4, 32, 32)]]
    inputs = A.prompts(model, rows)
    press = mmpress.get_press(name, keep=24)
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])  # the prefill's

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), press(model) as run:
            logits = model(**inputs).logits
            tokens, scores = generate(model, inputs)
    finally:
        handle.remove()
    stats = run.prefills[0]
    assert (stats.visual_tokens, stats.fixed_tokens, stats.kinds) == (2 * 64, 2, {"video": 2})
    assert stats.kept_visual_tokens == 2 * 24
    newline = (seen["embeds"] == model.model.image_newline).all(-1)
    assert newline.sum(1).tolist() == [1, 1]
    for i, row in enumerate(rows):
        alone = A.prompts(model, [row], first_row=i)
        with torch.no_grad(), press(model):
            row_logits = model(**alone).logits
            row_tokens, row_scores = generate(model, alone)
        torch.testing.assert_close(logits[i, -1], row_logits[0, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(scores[i], row_scores[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens[i], row_tokens[0])


def test_prefill_flops_count_crops_and_frames(model):
    """Tower: each image's own crops (a shared row's images one crop each) and every video frame."""
    inputs = A.prompts(model, [[(64, 64)], [(32, 32), (32, 32)], [(4, 32, 32)]])
    assert inputs["pixel_values"].shape[:2] == (3, 5)
    crops = 5 + 1 + 1 + 4
    cfg = model.config
    flops = A.prefill_flops(cfg, inputs, seq_len=100)
    assert flops.vision == transformer_flops(cfg.vision_config, 64, batch=crops)
    assert flops.projector == 2.0 * crops * 64 * (32 * 48 + 48 * 48)
    assert flops.language == language_flops(cfg.text_config, 100, 3)


def test_prompts_lay_out_media_as_the_processor(model):
    """prompts() gives each image and video the placeholders the processor gives, and the image
    processor's crops, image_sizes and batch_num_images."""
    try:
        from transformers import LlavaOnevisionImageProcessorPil as Images
    except ImportError:
        from transformers import LlavaOnevisionImageProcessor as Images
    rows = [[(96, 64)], [(72, 40), (32, 32)], [(64, 64)]]
    images = Images(size={"height": 32, "width": 32}, image_grid_pinpoints=model.config.image_grid_pinpoints)
    real = images([[np.zeros((h, w, 3), np.uint8) for h, w in row] for row in rows], return_tensors="pt")
    ours = A.prompts(model, rows)
    for key in ("pixel_values", "image_sizes", "batch_num_images"):
        assert ours[key].shape == torch.as_tensor(real[key]).shape, key
    assert torch.equal(ours["image_sizes"], torch.as_tensor(real["image_sizes"]))
    assert ours["batch_num_images"].tolist() == list(real["batch_num_images"])
    processor, token = count_processor(model), model.config.image_token_id
    inputs = {"batch_num_images": [1, 2, 1], "image_sizes": ours["image_sizes"], "pixel_values": ours["pixel_values"]}
    expected = [len(processor.replace_image_token(inputs, i)) // len("<image>") for i in range(4)]
    assert (ours["input_ids"] == token).sum(1).tolist() == [expected[0], expected[1] + expected[2], expected[3]]
    video = A.prompts(model, [[(4, 32, 32)]])
    counted = processor.replace_video_token({"pixel_values_videos": video["pixel_values_videos"]}, 0)
    assert int((video["input_ids"] == model.config.video_token_id).sum()) == len(counted) // len("<video>")


def test_registered():
    assert mmpress.registry.family_of(A.build("tiny")) is A
