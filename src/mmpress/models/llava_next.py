"""LLaVA-NeXT family (transformers ``LlavaNextForConditionalGeneration``): AnyRes images, a base
image plus tiles, and ``image_newline`` tokens. The LLaVA file (``llava.py``) gives the [CLS]
signals of the CLIP tower; this file says where AnyRes puts each crop's tokens.

Where the visual tokens are (``LlavaNextModel.pack_image_features``): each image is encoded as
crops of the tower's resolution, the base (the whole image, resized) then the tiles of the grid
``get_anyres_image_grid_shape`` picks from ``image_grid_pinpoints``. The base gives its h x w
patch tokens in raster order; the tiles are stitched into one (rows*h) x (cols*w) raster,
``unpad_image`` cuts the rows (or columns) that only the processor's padding filled, and an
``image_newline`` token ends every row of what is left. An image is one :class:`Item`: base, then
the unpadded tiles with their newlines, all with the image placeholder id (transformers writes the
newline embedding among the image features). Presses act on an image's base and tiles together:
the newline tokens are ``Item.fixed`` (kept, in place, never seen by a press), ``Item.parts`` the
base grid (1, h, w) then the unpadded tiles grid (1, H', W'). An image the processor did not tile
(LLaVA-OneVision's multi-image rows) is the base and one newline after it.

Signals: the tower's, per crop (``llava.py``: the [CLS] attention and keys of the
``vision_feature_layer`` block, the projector's input), mapped onto the LM tokens through the same
stitching and unpadding (OneVision: and pooling) the features go through (:class:`Tiles.pack`),
so ``cls_attn`` of a tile token is the [CLS] attention of its own crop (each crop is its own
softmax, as in the tower). A tiled image's tokens form no single raster (``Item.grid`` None): the
presses needing one (``grid``: uniform, pool, the video presses) do not run on LLaVA-NeXT.

``generate`` encodes the images before the prefill and drops ``image_sizes``: an encoded image's
layout is then read from its token count, or from its newline rows where several rasters have
that count, and, for a press reading tower signals, its tile grid is the one of the
``image_grid_pinpoints`` whose stitching of the projector's output gives the encoded features
exactly (:meth:`LlavaNextAdapter.read_layouts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                 image_size_to_num_patches, unpad_image)

from mmpress.flops import PrefillFlops, language_flops, transformer_flops
from mmpress.models.base import LLM_SIGNALS, VISION_SIGNALS, Item, Part, family
from mmpress.models.examples import left_pad, lm_shape, pixel_tensor, qwen2_text, text_around
from mmpress.models.llava import LlavaAdapter
from mmpress.models.vision import fill_cls_signals
from mmpress.presses.base import Press, VisualContext

IMAGE_TOKEN = 3  # the placeholder id of the random models below
SIGNALS = ("cls_attn", "vision_keys", "cls_attn_concat", "vision_keys_concat", "vision_features")


@dataclass(frozen=True)
class TilesPart(Part):
    """The "tiles" part of an AnyRes image, with its crop grid ``crops`` = (rows, cols): the
    unpadded (1, H', W') raster sits centred on a canvas of rows x cols crops of the base's size
    (GlobalCom2, HiPrune and SCOPE press each crop). None where the tokens are not one crop's
    patches each (OneVision's shrunk rasters) or the grid is unknown."""

    crops: tuple[int, int] | None = None


@dataclass(frozen=True)
class Tiles:
    """How one image's crops become its LM tokens. ``crops``: what the tower encodes (base +
    tiles); ``side``: tokens per crop side; ``grid``: (rows, cols) of tiles, None for a base-only
    image; ``cut``: (top, left, height, width) of the stitched tiles raster kept by
    ``unpad_image``; ``size``: (H', W') the LM sees (after OneVision's interpolation)."""

    crops: int
    side: int
    grid: tuple[int, int] | None = None
    cut: tuple[int, int, int, int] | None = None
    size: tuple[int, int] | None = None

    @property
    def length(self) -> int:
        base = self.side**2
        return base + 1 if self.grid is None else base + self.size[0] * (self.size[1] + 1)

    @property
    def fixed(self) -> tuple[int, ...]:
        """The newline tokens: one after the base of an untiled image, else one ending each row."""
        base = self.side**2
        if self.grid is None:
            return (base,)
        rows, cols = self.size
        return tuple(base + r * (cols + 1) + cols for r in range(rows))

    @property
    def parts(self) -> tuple[Part, ...]:
        base = self.side**2
        parts = (Part(0, base, (1, self.side, self.side), "base"),)
        if self.grid is not None:
            rows, cols = self.size
            # the crop grid, where each tiles token is one crop's patch (not after OneVision's shrink)
            crops = self.grid if self.crops and self.cut[2:] == self.size else None
            parts += (TilesPart(base, rows * cols, (1, rows, cols), "tiles", crops),)
        return parts

    def fields(self) -> dict:
        """The :class:`Item` fields of this image but its placeholder id and source."""
        grid = (1, self.side, self.side) if self.grid is None else None
        return {"length": self.length, "grid": grid, "fixed": self.fixed, "parts": self.parts}

    def item(self, token_id: int, source: int) -> Item:
        return Item(token_id, source=source, **self.fields())

    def pack(self, crops: Tensor) -> Tensor:
        """(crops, side**2, C) per-crop values -> (pressable tokens, C) in the LM's order, newlines
        left out: the stitching, unpadding and interpolation of ``pack_image_features``."""
        base = crops[0]
        if self.grid is None:
            return base
        (rows, cols), s, c = self.grid, self.side, crops.shape[-1]
        x = crops[1:].reshape(rows, cols, s, s, c).permute(4, 0, 2, 1, 3).reshape(c, rows * s, cols * s)
        top, left, height, width = self.cut
        x = x[:, top : top + height, left : left + width]
        if height and (height, width) != self.size:  # OneVision's "anyres_max_N": bilinear, as the features
            x = nn.functional.interpolate(x[None], list(self.size), mode="bilinear")[0]
        return torch.cat([base, x.flatten(1, 2).transpose(0, 1)])


def interpolated(height: int, width: int, side: int, max_patches: int | None) -> tuple[int, int]:
    """The tiles raster the LM sees after OneVision's ``anyres_max_N`` shrink (None: LLaVA-NeXT)."""
    if max_patches is None:
        return height, width
    ratio = math.sqrt(height * width / (max_patches * side**2))
    return (int(height // ratio), int(width // ratio)) if ratio > 1.1 else (height, width)


def anyres_tiles(config, image_size, max_patches: int | None = None, tiled: bool = True) -> Tiles:
    """The :class:`Tiles` of an image of ``image_size`` (h, w) px, from transformers' own helpers
    (``image_size_to_num_patches``, ``get_anyres_image_grid_shape``, ``unpad_image``)."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if not tiled:
        return Tiles(1, side)
    image_size = [int(v) for v in image_size]
    pinpoints = config.image_grid_pinpoints
    crops = image_size_to_num_patches(image_size, pinpoints, vision.image_size)
    rows, cols = get_anyres_image_grid_shape(image_size, pinpoints, vision.image_size)
    full = (rows * side, cols * side)
    height, width = unpad_image(torch.empty(0, *full), image_size).shape[1:]
    cut = ((full[0] - height) // 2, (full[1] - width) // 2, height, width)  # unpad_image slices [pad : n - pad]
    size = interpolated(height, width, side, max_patches) if height else (0, 0)  # nothing of the tiles kept
    return Tiles(crops, side, (rows, cols), cut, size)


def all_tiles(config, side: int, max_patches: int | None) -> list[Tiles]:
    """Every layout an image could have under ``image_grid_pinpoints``: each tile grid with each
    symmetric cut ``unpad_image`` can make (rows or columns, two at a time), then the shrink; a
    raster left with no rows (an image so thin that nothing of its tiles is kept) has size (0, 0).
    Cached per config."""
    key = (tuple(map(tuple, config.image_grid_pinpoints)), config.vision_config.image_size, side, max_patches)
    if key not in _ALL:
        found = []
        for ph, pw in key[0]:
            rows, cols = ph // key[1], pw // key[1]
            full_h, full_w = rows * side, cols * side
            cuts = [(full_h, w) for w in range(full_w, -1, -2)] + [(h, full_w) for h in range(full_h - 2, -1, -2)]
            for height, width in cuts:
                seen = interpolated(height, width, side, max_patches) if height else (0, 0)
                cut = ((full_h - height) // 2, (full_w - width) // 2, height, width)
                found.append(Tiles(rows * cols + 1, side, (rows, cols), cut, seen))
        _ALL[key] = found
    return _ALL[key]


_ALL: dict = {}


def tile_candidates(config, side: int, size: tuple[int, int], max_patches: int | None) -> list[Tiles]:
    """The layouts (:func:`all_tiles`) giving an LM raster of ``size`` (H', W')."""
    return [t for t in all_tiles(config, side, max_patches) if t.size == tuple(size)]


def rasters(config, side: int, max_patches: int | None) -> dict[int, set[tuple[int, int]]]:
    """Token count of an image -> the LM rasters (H', W') of the layouts (:func:`all_tiles`) giving it."""
    out: dict[int, set] = {}
    for t in all_tiles(config, side, max_patches):
        out.setdefault(t.length, set()).add(t.size)
    return out


@family
class LlavaNextAdapter(LlavaAdapter):
    """Applies presses to a LLaVA-NeXT model: each image (base + tiles) one item, its newline
    tokens kept in place. ``positions``: None (the press's official numbering), "keep" or "reindex"."""

    family = "llava_next"
    model_types = ("llava_next",)
    classes = ("LlavaNextForConditionalGeneration",)
    signals = (VISION_SIGNALS - {"grid"}) | LLM_SIGNALS  # a tiled image is no single raster
    notes = ("cls_attn = [CLS] row of the attention in the vision_feature_layer block, per crop (base, tiles), "
             "mapped onto the LM tokens as pack_image_features maps the features; vision_keys = its keys; "
             "*_concat: the same from one softmax over the heads-concatenated q / k; an image is its base and "
             "tiles (ctx.parts), no single grid; image_newline tokens are kept in place and seen by no press")
    example_rows = {"single": [[(40, 72)]], "ragged": [[(64, 64)], [(72, 40), (32, 32)], [(40, 72)]]}
    bench_media = {"image": (672, 672)}  # 2 x 2 tiles + base: 2928 tokens, as LLaVA-NeXT-7B
    has_cls = True  # CLIP: token 0 of a crop is [CLS] (dropped with the "default" strategy)
    vision_modes = frozenset()  # in-vision presses (tome_vit, downsample) run on LLaVA-1.5's single crop only

    def __init__(self, model, positions: str | None = None):
        super().__init__(model, positions)
        self.tiles: dict[str, list] = {}  # kind -> the layout of each item of this forward, by source
        self.kinds: list[str] = []  # the kinds this forward encodes, in the model's order (images first)
        self.records: list[tuple[dict, Tensor | None, Tensor | None]] = []  # earlier tower calls' signals
        self.projected: Tensor | None = None  # the projector's output of the last tower call
        self.reading: dict = {}  # the tower call whose signals fill_signals reads now

    # ---- where the tokens are ---------------------------------------------------------------
    def visual_items(self, args, kwargs) -> list[Item]:
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        self.tiles, self.kinds = {}, self.kinds_in(kwargs)
        if pixel_values is None:
            return self.encoded(kwargs, "image", self.config.image_token_id)
        sizes = kwargs.get("image_sizes")
        if sizes is None:
            raise ValueError(f"pressing a {self.family} image needs image_sizes (the processor returns it)")
        self.new_call()
        tiles = self.layouts_of(self.config, sizes.tolist(), self.tiled_images(kwargs, len(sizes)))
        self.tiles["image"] = tiles
        return [t.item(self.config.image_token_id, i) for i, t in enumerate(tiles)]

    def kinds_in(self, kwargs: dict) -> list[str]:
        """The kinds of media this forward holds, pixels or encoded, in the order the model encodes them."""
        pixels = {"image": "pixel_values", "video": "pixel_values_videos"}
        return [kind for kind in ("image", "video")
                if kwargs.get(pixels[kind]) is not None or self.protocol.encoded_in(kwargs, kind)]

    def encoded(self, kwargs: dict, kind: str, token: int) -> list[Item]:
        """The items of ``kind`` ``generate`` encoded before this forward: their layouts read from
        their features (:meth:`read_layouts`), one per encoded item."""
        features, _ = self.encoded_media(kwargs, kind)
        if not features:
            return []
        layouts = self.tiles[kind] = self.read_layouts(kind, features)
        return self.encoded_items(kwargs, kind, token, lambda t, s: layouts[s].fields())

    def new_call(self) -> None:
        """The tower runs inside this forward: forget the signals of earlier calls."""
        self.vision, self.features, self.records, self.projected = {}, None, [], None

    def read_layouts(self, kind: str, features: list[Tensor]) -> list[Tiles]:
        """The layout of each image ``generate`` encoded (it drops ``image_sizes``): its LM raster
        (H', W'), hence its newlines, from its length where only one raster of the model's
        ``image_grid_pinpoints`` has that many tokens, else from its newline rows (those equal to
        ``image_newline``: one host read for all images). With the tower hooked (a press reading
        its signals), the tile grid is the layout giving that raster whose stitching of the
        projector's output reproduces the encoded features exactly (one in practice; a host read
        per candidate, once per ``generate``). Unhooked, the tile grid stays unknown (``crops=0``)."""
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        base, max_patches = side**2, self.max_patches_of(self.config)
        by_length = rasters(self.config, side, max_patches)
        known = [by_length.get(f.shape[0], set()) | ({None} if f.shape[0] == base + 1 else set()) for f in features]
        if any(len(k) != 1 for k in known):  # the newline rows tell
            newline = self.vlm.image_newline
            where = torch.cat([(f == newline.to(f)).all(dim=-1) for f in features]).nonzero()[:, 0].tolist()
            known, start = [], 0
            for f in features:
                rows = [w - start for w in where if start <= w < start + f.shape[0]]
                start += f.shape[0]
                size = None if rows == [base] and f.shape[0] == base + 1 else (len(rows), rows[0] - base if rows else 0)
                known.append({size})
                check = Tiles(0, side, (0, 0), None, size) if size else Tiles(1, side)
                if (size and size[1] < 0) or list(check.fixed) != rows or check.length != f.shape[0]:
                    raise ValueError(f"an encoded image of {f.shape[0]} tokens has image_newline rows at {rows[:8]}: "
                                     f"not a {self.family} layout (a base of {base} tokens, then rows each ending "
                                     "in a newline)")
        projected = self._call_of(kind)[2] if self.records or self.projected is not None else None
        layouts, crop = [], 0
        for f, (size,) in zip(features, known):
            unknown = Tiles(0, side, (0, 0), None, size) if size else Tiles(1, side)
            if projected is None:
                layouts.append(unknown)
                continue
            keep = torch.ones(f.shape[0], dtype=torch.bool, device=f.device)
            keep[list(unknown.fixed)] = False
            wanted = f[keep]
            options = tile_candidates(self.config, side, size, max_patches) if size else [unknown]
            options = [t for t in options if crop + t.crops <= projected.shape[0]
                       and torch.equal(t.pack(projected[crop : crop + t.crops]).to(wanted), wanted)]
            if len({(t.crops, t.grid, t.cut) for t in options}) != 1:
                raise ValueError(f"cannot tell the tile grid of an encoded image of {f.shape[0]} tokens "
                                 f"({len(options)} layouts fit): call the model (forward) with pixel_values "
                                 "and image_sizes for the prefill")
            crop += options[0].crops
            layouts.append(options[0])
        return layouts

    # ---- signals ------------------------------------------------------------------------------
    def signal_hooks(self, press: Press) -> list:
        handles = super().signal_hooks(press)
        if set(SIGNALS) & set(press.needs):
            handles.append(self.vlm.vision_tower.register_forward_pre_hook(self._tower_hook))
            handles.append(self.vlm.multi_modal_projector.register_forward_hook(self._projected_hook))
        return handles

    def _tower_hook(self, module, args):
        """A new tower call (OneVision encodes images, then videos): keep the last call's signals."""
        if self.vision or self.features is not None:
            self.records = [*self.records[-1:], (self.vision, self.features, self.projected)]
        self.vision, self.features, self.projected = {}, None, None

    def _projected_hook(self, module, args, output):
        self.projected = output

    def _call_of(self, kind: str) -> tuple[dict, Tensor | None, Tensor | None]:
        """The signals of the tower call that encoded the items of ``kind``: this forward's (or,
        under ``generate``, the encoding's) last calls, one per kind, images before videos."""
        calls = [*self.records, (self.vision, self.features, self.projected)]
        index = len(calls) - len(self.kinds) + self.kinds.index(kind)
        if index < 0 or not calls[index][0] and calls[index][1] is None and calls[index][2] is None:
            raise ValueError("vision signals missing: encode the images inside the `with press(model):` block")
        return calls[index]

    def fill_signals(self, press: Press, ctx: VisualContext, items: list[Item]) -> None:
        kind, needs = items[0].kind, set(press.needs)
        self.reading, features, projected = self._call_of(kind)
        layouts = self.tiles[kind]
        if any(t.crops == 0 for t in layouts):
            raise ValueError("vision signals missing: encode the images inside the `with press(model):` block")
        offsets = [0]
        for tiles in layouts:
            offsets.append(offsets[-1] + tiles.crops)
        drop_cls = self.drops_cls()

        def mapped(per_crop: Tensor, with_cls: bool = True) -> Tensor:
            per_crop = per_crop[:, 1:] if drop_cls and with_cls else per_crop
            flat = per_crop.ndim == 2
            per_crop = per_crop[..., None] if flat else per_crop
            if per_crop.shape[0] != offsets[-1]:
                raise ValueError(f"vision signal covers {per_crop.shape[0]} crops, the items encoded {offsets[-1]}")
            out = torch.stack([self.pack(kind, layouts[i.source], per_crop[offsets[i.source]:offsets[i.source + 1]])
                               for i in items])
            return out[..., 0] if flat else out

        if "vision_features" in needs:
            if features is None:
                raise ValueError("vision signals missing: encode the images inside the `with press(model):` block")
            ctx.vision_features = mapped(features, with_cls=False)
        fill_cls_signals(ctx, needs, self.reading, mapped,
                         lambda: (self._block(self._feature_layer()), [self._block(i) for i in self._press_layers(press)]),
                         lambda: self._concat_block(press))

    def drops_cls(self) -> bool:
        return self.config.vision_feature_select_strategy == "default" and self.has_cls

    def pack(self, kind: str, tiles: Tiles, per_crop: Tensor) -> Tensor:
        return tiles.pack(per_crop)

    # ---- cost and shapes ------------------------------------------------------------------------
    @classmethod
    def layouts_of(cls, config, sizes: list, tiled: list[bool]) -> list[Tiles]:
        """The :class:`Tiles` of images of ``sizes`` (h, w) px (host facts)."""
        max_patches = cls.max_patches_of(config)
        return [anyres_tiles(config, size, max_patches, t) for size, t in zip(sizes, tiled)]

    @classmethod
    def crops_of(cls, config, inputs: dict) -> list[Tiles]:
        """The :class:`Tiles` of every image of a batch."""
        if inputs.get("pixel_values") is None:
            return []
        sizes = inputs["image_sizes"].tolist()
        return cls.layouts_of(config, sizes, cls.tiled_images(inputs, len(sizes)))

    @classmethod
    def max_patches_of(cls, config) -> int | None:
        """OneVision's ``anyres_max_N`` (None: LLaVA-NeXT keeps every tile token)."""
        return None

    @classmethod
    def tiled_images(cls, inputs: dict, images: int) -> list[bool]:
        """Whether each image is tiled (LLaVA-NeXT: always)."""
        return [True] * images

    @classmethod
    def prefill_flops(cls, config, inputs: dict, seq_len: int, layer_seq_len=None) -> PrefillFlops:
        """The tower over every crop of every image (base + tiles; [CLS] + patches for CLIP), the
        2-layer MLP projector over every crop's patch tokens (before unpadding: transformers
        projects them all), and ``batch`` rows of ``seq_len`` LM tokens."""
        crops = sum(t.crops for t in cls.crops_of(config, inputs)) + cls.video_frames(inputs)
        batch, vision_cfg, text_cfg = inputs["input_ids"].shape[0], config.vision_config, config.text_config
        patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
        cls_token = cls.has_cls
        vision = transformer_flops(vision_cfg, patches + cls_token, batch=crops) if crops else 0.0
        tokens = patches + (cls_token and config.vision_feature_select_strategy == "full")
        projector = 2.0 * crops * tokens * (vision_cfg.hidden_size * text_cfg.hidden_size + text_cfg.hidden_size**2)
        return PrefillFlops(vision, projector, language_flops(text_cfg, seq_len, batch, layer_seq_len))

    @classmethod
    def video_frames(cls, inputs: dict) -> int:
        """Frames the tower encodes for the batch's videos (LLaVA-NeXT: none)."""
        return 0

    @classmethod
    def build(cls, size: str = "tiny", seed: int = 0, attn: str = "sdpa", model_type: str | None = None,
              **overrides):
        """"real": LLaVA-NeXT-7B's tower geometry (CLIP-L/336: 336 px crops of 14 px patches, its
        pinpoints up to 2 x 2 / 3 x 1 tiles) scaled for a CPU as LLaVA-1.5's: CLIP 6 x 384, the
        shared Qwen2 LM of 12 x 896. "tiny": 32 px crops of 4 px patches (64 tokens a crop), tiles
        up to 2 x 2. ``pinpoints`` overrides."""
        from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

        real = dict(vision_layers=6, vision_hidden=384, image_size=336, patch_size=14,
                    pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
        tiny = dict(vision_layers=3, vision_hidden=32, image_size=32, patch_size=4,
                    pinpoints=[[32, 64], [64, 32], [64, 64], [96, 32]])
        shape = {**lm_shape(size), **(real if size == "real" else tiny), **overrides}
        torch.manual_seed(seed)
        hidden = shape["vision_hidden"]
        vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden if size == "real" else 2 * hidden,
                                  num_hidden_layers=shape["vision_layers"],
                                  num_attention_heads=max(1, hidden // 64) if size == "real" else 4,
                                  image_size=shape["image_size"], patch_size=shape["patch_size"])
        config = LlavaNextConfig(vision_config=vision, text_config=qwen2_text(shape), image_token_id=IMAGE_TOKEN,
                                 image_grid_pinpoints=shape["pinpoints"], vision_feature_layer=-2,
                                 vision_feature_select_strategy="default")
        config._attn_implementation = attn
        model = LlavaNextForConditionalGeneration(config).eval()
        model.generation_config.pad_token_id = 0
        return model

    @classmethod
    def prompts(cls, model, rows: list, kind: str = "image", seed: int = 0, first_row: int = 0) -> dict:
        """Left-padded rows as the LLaVA-NeXT processor lays them out: a few system tokens, each
        image's placeholders (base + unpadded tiles + newlines), a question of ragged length;
        ``pixel_values`` (images, most crops, 3, s, s) zero-padded as the processor pads them,
        ``image_sizes`` (h, w). The crops' pixels are random (what the processor would crop)."""
        config = model.config
        if any(len(size) != 2 for row in rows for size in row):
            raise ValueError(f"{cls.family} prompts take images of (h, w) px")
        sizes = [tuple(size) for row in rows for size in row]
        inputs = {"image_sizes": torch.tensor(sizes).reshape(-1, 2)}
        tiles = cls.layouts_of(config, sizes, [True] * len(sizes))
        vocab = config.text_config.vocab_size
        sequences, pixels, k = [], [], 0
        for i, row in enumerate(rows):
            media = []
            for j, size in enumerate(row):
                media.append([config.image_token_id] * tiles[k].length)
                pixels.append(pixel_tensor((tiles[k].crops, 3, config.vision_config.image_size,
                                            config.vision_config.image_size), seed, first_row + i, j))
                k += 1
            sequences.append(text_around(media, first_row + i, seed, 33 if vocab > 1000 else 12, vocab))
        out = left_pad(sequences)
        if pixels:
            most = max(p.shape[0] for p in pixels)
            out["pixel_values"] = torch.stack([nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[0]))
                                               for p in pixels])
            out.update(inputs)
        return out

    @classmethod
    def encode(cls, model, inputs: dict) -> None:
        if inputs.get("pixel_values") is not None:
            model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
