"""LLaVA-OneVision family (transformers ``LlavaOnevisionForConditionalGeneration``): AnyRes images
as LLaVA-NeXT (``llava_next.py``), and videos.

Images: a row holding one image tiles it as LLaVA-NeXT does (base, unpadded tiles, a newline
ending each row), and when the tiles raster exceeds ``anyres_max_N`` crops' worth by more than
10% ``pack_image_features`` shrinks it bilinearly to ``int(H // r) x int(W // r)``; a row holding
several images gives each its base only, then one newline (``batch_num_images``). Each image is one
item, its newlines ``Item.fixed``.

Videos: every frame is one crop through the tower and projector, then ``apply_pooling`` halves its
h x w grid bilinearly (27 x 27 -> 14 x 14); a video's tokens are its frames' pooled grids, in
raster order over (t, h, w), then ONE newline token. A video is one item of ``kind="video"``,
grid (t, h', w') of its pooled frames, its last token fixed: the video presses (``mmpress list``)
run on it. The presses needing one raster (``grid``) run on videos and on the untiled images of
multi-image rows; a tiled image has none (its base and tiles are ``Item.parts``) and refuses them.

Signals: the SigLIP tower has no [CLS] token, so ``cls_attn`` is a documented substitute, as for
Qwen-VL (``qwen_vl.py``): the attention each token RECEIVES in the ``vision_feature_layer`` block,
averaged over the queries of its crop (frame) and over heads, ``score_j = mean_{h, i}
softmax_j(q_i . k_j / sqrt(d))`` (HiPrune's no-[CLS] saliency, arXiv 2508.00553), from a forward
pre-hook on that block's attention (``models.vision.received_attention``: no attention map, the
tower keeps SDPA); ``vision_keys`` its keys averaged over heads; ``*_concat`` the same from one
softmax over the heads-concatenated q / k, scaled by C^-1/2. Each crop's signals reach the LM
tokens as its features do: stitched, unpadded and shrunk like an image's (``Tiles.pack``), pooled
like a video frame's (the model's own ``apply_pooling``: a pooled token's score is the bilinear
mix of its patches' scores, as its feature is of theirs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmpress.models.base import LLM_SIGNALS, VISION_SIGNALS, Item, family
from mmpress.models.examples import left_pad, lm_shape, pixel_tensor, qwen2_text, text_around
from mmpress.models.llava_next import LlavaNextAdapter
from mmpress.models.vision import received_attention

IMAGE_TOKEN, VIDEO_TOKEN = 3, 4  # the placeholder ids of the random models below


@dataclass(frozen=True)
class Frames:
    """One video: ``crops`` frames through the tower, each pooled to ``size`` (h', w') tokens."""

    crops: int
    size: tuple[int, int]

    @property
    def length(self) -> int:
        return self.crops * self.size[0] * self.size[1] + 1  # + the one newline

    def fields(self) -> dict:
        return {"length": self.length, "grid": (self.crops, *self.size), "fixed": (self.length - 1,)}

    def item(self, token_id: int, source: int) -> Item:
        return Item(token_id, source=source, kind="video", **self.fields())


def pooled_side(config) -> int:
    side = config.vision_config.image_size // config.vision_config.patch_size
    return -(-side // 2)  # apply_pooling: ceil(side / 2)


def received_signals(attn, hidden: Tensor, heads: bool = True, concat: bool = False) -> dict:
    """The no-[CLS] signals of one SigLIP attention module given its input ``hidden`` (crops, S, C):
    per crop, the attention each token receives (mean over the crop's queries), per head averaged
    over heads with the keys averaged over heads ("heads"), or from one softmax over the full-width
    q / k scaled by C^-1/2 with the full-width keys ("concat"); the same structure as
    ``models.vision.cls_signals``."""
    b, s, c = hidden.shape
    q, k = attn.q_proj(hidden), attn.k_proj(hidden)  # (B, S, C)
    bounds = list(range(0, b * s + 1, s))  # each crop attends within itself
    out = {}
    if heads:
        h = attn.num_heads
        qh, kh = q.reshape(b * s, h, -1), k.reshape(b * s, h, -1)
        out["heads"] = (received_attention(qh, kh, bounds, attn.scale).view(b, s), k.view(b, s, h, -1).mean(dim=2))
    if concat:
        scores = received_attention(q.reshape(b * s, 1, c), k.reshape(b * s, 1, c), bounds, c**-0.5)
        out["concat"] = (scores.view(b, s), k)
    return out


@family
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """Applies presses to a LLaVA-OneVision model: each image (base + tiles) and each video one
    item, their newline tokens kept in place."""

    family = "llava_onevision"
    model_types = ("llava_onevision",)
    classes = ("LlavaOnevisionForConditionalGeneration",)
    signals = VISION_SIGNALS | LLM_SIGNALS
    notes = ("no [CLS] (SigLIP): cls_attn = mean attention each token receives within its crop / frame in the "
             "vision_feature_layer block (HiPrune's no-[CLS] saliency), mapped onto the LM tokens as the features "
             "are (stitched, unpadded, shrunk; video frames pooled); vision_keys = that block's keys; *_concat: the "
             "same from one softmax over the heads-concatenated q / k; grid (uniform, pool, video presses): videos "
             "and the untiled images of multi-image rows only, a tiled image is its base and tiles (ctx.parts); "
             "image_newline tokens are kept in place and seen by no press")
    example_rows = {"single": [[(40, 72)]], "ragged": [[(96, 64)], [(72, 40), (32, 32)], [(64, 64)]],
                    "video": [[(4, 32, 32)]]}
    bench_media = {"image": (768, 768), "video": (16, 384, 384)}  # 2 x 2 tiles + base: 3699 tokens; 16 x 196 + 1
    has_cls = False

    def __init__(self, model, positions: str | None = None):
        super().__init__(model, positions)
        self.token_ids = (self.config.image_token_id, self.config.video_token_id)

    def visual_items(self, args, kwargs) -> list[Item]:
        videos = kwargs.get("pixel_values_videos")
        if videos is not None and kwargs.get("pixel_values") is None:
            self.new_call()  # (with images too, the image call starts it)
        items = super().visual_items(args, kwargs)
        token = self.config.video_token_id
        if videos is None:
            return items + self.encoded(kwargs, "video", token)
        side = pooled_side(self.config)
        frames = self.tiles["video"] = [Frames(videos.shape[1], (side, side)) for _ in range(videos.shape[0])]
        return items + [f.item(token, i) for i, f in enumerate(frames)]

    def read_layouts(self, kind: str, features: list[Tensor]) -> list:
        if kind == "image":
            return super().read_layouts(kind, features)
        side = pooled_side(self.config)
        layouts = []
        for f in features:
            frames, rest = divmod(f.shape[0] - 1, side * side)
            if rest or frames < 1:
                raise ValueError(f"an encoded video of {f.shape[0]} tokens is not frames of {side} x {side} pooled "
                                 "tokens and a newline")
            layouts.append(Frames(frames, (side, side)))
        return layouts

    def pack(self, kind: str, tiles, per_crop: Tensor) -> Tensor:
        if kind == "video":  # the model's own pooling of each frame's grid, frames in order
            return self.vlm.apply_pooling(per_crop.contiguous()).flatten(0, 1)
        return tiles.pack(per_crop)

    def _vision_hook(self, block: int, forms: set[str]):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self.vision[block] = received_signals(module, hidden, heads="heads" in forms, concat="concat" in forms)

        return hook

    # ---- cost and shapes ------------------------------------------------------------------------
    @classmethod
    def max_patches_of(cls, config) -> int | None:
        return int(config.vision_aspect_ratio.strip("anyres_max_"))  # as pack_image_features reads it

    @classmethod
    def tiled_images(cls, inputs: dict, images: int) -> list[bool]:
        """Only an image alone in its row is tiled (``batch_num_images``; absent: every image)."""
        counts = inputs.get("batch_num_images")
        if counts is None:
            return [True] * images
        counts = counts.tolist() if isinstance(counts, Tensor) else list(counts)
        tiled = [n == 1 for n in counts for _ in range(n)]
        if len(tiled) != images:
            raise ValueError(f"batch_num_images {counts} counts {len(tiled)} images, pixel_values holds {images}")
        return tiled

    @classmethod
    def video_frames(cls, inputs: dict) -> int:
        videos = inputs.get("pixel_values_videos")
        return 0 if videos is None else videos.shape[0] * videos.shape[1]

    @classmethod
    def build(cls, size: str = "tiny", seed: int = 0, attn: str = "sdpa", model_type: str | None = None,
              **overrides):
        """"real": LLaVA-OneVision-7B's tower geometry (SigLIP at 384 px, 14 px patches: 729 tokens a
        crop, its 36 pinpoints up to 6 x 6 tiles, "anyres_max_9") scaled for a CPU as LLaVA's: SigLIP
        6 x 384, the shared Qwen2 LM of 12 x 896. "tiny": 32 px crops of 4 px patches (64 tokens a
        crop, 16 a pooled frame), tiles up to 3 x 2 under "anyres_max_4" (a 3 x 2 raster shrinks).
        ``pinpoints``, ``aspect`` override."""
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

        real = dict(vision_layers=6, vision_hidden=384, image_size=384, patch_size=14, aspect="anyres_max_9",
                    pinpoints=[[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)])
        tiny = dict(vision_layers=3, vision_hidden=32, image_size=32, patch_size=4, aspect="anyres_max_4",
                    pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64], [96, 64]])
        shape = {**lm_shape(size), **(real if size == "real" else tiny), **overrides}
        torch.manual_seed(seed)
        hidden = shape["vision_hidden"]
        vision = SiglipVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden if size == "real" else 2 * hidden,
                                    num_hidden_layers=shape["vision_layers"],
                                    num_attention_heads=max(1, hidden // 64) if size == "real" else 4,
                                    image_size=shape["image_size"], patch_size=shape["patch_size"])
        config = LlavaOnevisionConfig(vision_config=vision, text_config=qwen2_text(shape), image_token_id=IMAGE_TOKEN,
                                      video_token_id=VIDEO_TOKEN, image_grid_pinpoints=shape["pinpoints"],
                                      vision_feature_layer=-1, vision_feature_select_strategy="full",
                                      vision_aspect_ratio=shape["aspect"])
        config._attn_implementation = attn
        model = LlavaOnevisionForConditionalGeneration(config).eval()
        model.generation_config.pad_token_id = 0
        return model

    @classmethod
    def prompts(cls, model, rows: list, kind: str = "image", seed: int = 0, first_row: int = 0) -> dict:
        """Left-padded rows as the LLaVA-OneVision processor lays them out: a few system tokens,
        each medium's placeholders, a question of ragged length. An image is (h, w) px: tiled when
        alone in its row, else its base only (``batch_num_images``); ``pixel_values`` (images, most
        crops, 3, s, s) zero-padded, ``image_sizes`` (h, w). A video is (frames, h, w):
        ``pixel_values_videos`` (videos, frames, 3, s, s), every video of a batch the same frames."""
        config = model.config
        crop, vocab = config.vision_config.image_size, config.text_config.vocab_size
        images = [[tuple(m) for m in row if len(m) == 2] for row in rows]
        counts = [len(row) for row in images]
        sizes = [size for row in images for size in row]
        layouts = iter(cls.layouts_of(config, sizes, [n == 1 for n in counts for _ in range(n)]))
        side = pooled_side(config)
        sequences, pixels, videos = [], [], []
        for i, row in enumerate(rows):
            media = []
            for j, medium in enumerate(row):
                if len(medium) == 2:
                    tiles = next(layouts)
                    media.append([config.image_token_id] * tiles.length)
                    pixels.append(pixel_tensor((tiles.crops, 3, crop, crop), seed, first_row + i, j))
                elif len(medium) == 3:
                    media.append([config.video_token_id] * Frames(medium[0], (side, side)).length)
                    videos.append(pixel_tensor((medium[0], 3, crop, crop), seed, first_row + i, j))
                else:
                    raise ValueError(f"{cls.family} media are (h, w) images or (frames, h, w) videos, got {medium}")
            sequences.append(text_around(media, first_row + i, seed, 33 if vocab > 1000 else 12, vocab))
        out = left_pad(sequences)
        if pixels:
            most = max(p.shape[0] for p in pixels)
            out["pixel_values"] = torch.stack([torch.cat([p, p.new_zeros(most - p.shape[0], *p.shape[1:])])
                                               for p in pixels])
            out["image_sizes"] = torch.tensor(sizes)
            out["batch_num_images"] = torch.tensor(counts)
        if videos:
            if len({v.shape[0] for v in videos}) > 1:
                raise ValueError("every video of a LLaVA-OneVision batch has the same number of frames (one tensor)")
            out["pixel_values_videos"] = torch.stack(videos)
        return out

    @classmethod
    def encode(cls, model, inputs: dict) -> None:
        if inputs.get("pixel_values") is not None:
            model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                     batch_num_images=inputs.get("batch_num_images"))
        if inputs.get("pixel_values_videos") is not None:
            model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"])
