"""InternVL family (transformers ``InternVLForConditionalGeneration``, model_type "internvl": the
transformers-native port of InternVL3 / InternVL2.5, e.g. ``OpenGVLab/InternVL3-1B-hf``): where
its visual tokens are and which signals its InternViT tower gives. The pressing itself is the
shared core (``models/base.py``).

Where the visual tokens are: the processor cuts an image into tiles of the tower's resolution
(448 px) on the grid of tiles whose aspect ratio is closest to the image's (1 to 12 tiles by
default) and, when that grid has more than one tile, appends a thumbnail (the whole image resized
to one tile). Every tile goes through the tower on its own ([CLS] + 32 x 32 patches); the
projector pixel-shuffles each 2 x 2 block of patches into one token (``downsample_ratio`` 0.5:
``1 / ratio`` squared patches, channels concatenated) and projects it, so a tile is 16 x 16 = 256
tokens, in raster order. The prompt holds an image as ``<img>`` + tiles x 256 ``<IMG_CONTEXT>``
(``config.image_token_id``) + ``</img>``: the tiles one after another in row-major grid order,
the thumbnail last; the language model is a Qwen2 / Llama decoder with 1-D RoPE, so positions
are "keep" or "reindex".

One item per image, its tiles as parts. The model's inputs say how many tiles an image has (its
run of ``<IMG_CONTEXT>`` tokens, a multiple of 256; ``pixel_values`` holds every tile of the batch
with no per-image count) but not how they are arranged: the grid (e.g. 2 x 3 or 3 x 2 for 6
tiles) depends on the original image size, which the model never receives. So an image's tokens
form no single raster (``Item.grid`` None; ``(1, 16, 16)`` for a one-tile image) and each tile is
a :class:`Part` of grid ``(1, 16, 16)``: role "crop" for the grid's tiles, "base" for the
thumbnail, last (the processor adds one exactly when the grid has more than one tile), as the
SmolVLM / Idefics3 file names its crops and global image. Why per image and not per tile: a
press's budget (``keep=64``, a ratio) is the image's, as the papers state it, and a press that
sees the image whole can trade tokens between tiles (a blank tile gives its share to a busy one,
the thumbnail's global view competes with the crops' details), where per-tile items would force
the same count on every tile. Presses that work per sub-image read the parts: HiPrune and SCOPE
press the thumbnail and each crop as pieces, as they press LLaVA-NeXT's base and crops;
GlobalCom2 needs each crop's place in the thumbnail (the crop grid), which these inputs lack, and
raises. A press that needs the image's 2-D grid (``uniform``, ``pool``, the video presses) gets
one for a one-tile image only and raises on a tiled one (``VisualContext.require("grid")``), so
this family does not declare the "grid" signal.

Video: the processor writes each frame as its own ``<img>`` + 256 tokens + ``</img>`` (one tile,
"FrameN: " text between frames) and passes the frames in ``pixel_values`` with the images; the
model's inputs do not say which runs are frames, so each frame is an image item of one tile
(``kind="image"``), pressed with a per-frame budget. The video presses need a video's temporal
structure, which these inputs lack: they are not offered.

Signals: InternViT has a [CLS] token (prepended by its embeddings; the "default" feature strategy
drops it before the pixel shuffle). ``cls_attn``: the [CLS] row of the attention in the block
producing ``vision_feature_layer`` (-1: the last), per head (with the module's own ``q_norm`` /
``k_norm``, identities in InternViT-300M, RMSNorms in InternViT-6B) and averaged over heads, over
the tile's patches, then mapped through the pixel shuffle: a token's score is the mean of its
``1 / ratio`` squared patches' scores (``vision_keys``: their head-averaged keys, averaged the
same way). Each tile has its own [CLS] (the tower runs per tile), so an image's scores are those
of its tiles, each tile's patch scores summing to at most 1 (the rest is [CLS]'s own share).
``cls_attn_concat`` / ``vision_keys_concat``: the same from one softmax over the
heads-concatenated q / k (official PruMerge's form);
``cls_attn_layers``: ``cls_attn`` at the vision layers a press lists. From a forward pre-hook on
the block's attention module (``models.vision.cls_signals``), so the tower keeps running with
SDPA. ``vision_features``: the projector's input, each token's patches concatenated as the pixel
shuffle lays them out (``4 C`` channels), from a forward pre-hook on the projector.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from mmpress.flops import PrefillFlops, language_flops, transformer_flops
from mmpress.models.base import LLM_SIGNALS, Adapter, Item, Part, family
from mmpress.models.examples import left_pad, lm_shape, pixel_tensor, qwen2_text, text_around
from mmpress.models.vision import (fill_cls_signals, attention_module, cls_signals, concat_layer, encoder_layers,
                                   hook_forms, layer_index, press_layers)
from mmpress.presses.base import Press, VisualContext

IMAGE_TOKEN, IMG_START, IMG_END = 3, 4, 5  # <IMG_CONTEXT>, <img>, </img> of the random models below
MAX_TILES = 12  # InternVL3's processor: crop_to_patches, min_patches 1, max_patches 12


@family
class InternVLAdapter(Adapter):
    """Applies presses to an InternVL model (``InternVLForConditionalGeneration``). ``positions``:
    None (the press's official numbering), "keep" or "reindex"."""

    family = "internvl"
    model_types = ("internvl",)
    classes = ("InternVLForConditionalGeneration",)
    signals = LLM_SIGNALS | {"cls_attn", "vision_keys", "cls_attn_concat", "vision_keys_concat", "vision_features",
                             "text"}
    notes = ("one item per image, its tiles and thumbnail as parts (no 2-D grid for a tiled image, no crop grid: "
             "the tile arrangement is not in the model's inputs); cls_attn = each tile's [CLS] attention in the "
             "vision_feature_layer block, a token's the mean over its 2x2 pixel-shuffled patches; video frames are "
             "one-tile images")
    # tiny tiles are 32 px: (64, 96) px -> 3 x 2 tiles + thumbnail; (32, 32) -> one tile; (64, 64) -> 2 x 2 +
    # thumbnail; (32, 96) -> 3 x 1 + thumbnail
    example_rows = {"single": [[(64, 96)]], "ragged": [[(32, 32)], [(64, 64), (32, 96)], [(64, 96)]]}
    bench_media = {"image": (896, 896)}  # 2 x 2 tiles + thumbnail of 448 px: 1280 tokens

    def __init__(self, model, positions: str | None = None):
        super().__init__(model, positions)
        if not hasattr(self.vlm, "vision_tower") or not hasattr(self.vlm, "multi_modal_projector"):
            raise ValueError(f"{type(model).__name__} does not look like a transformers InternVL model")
        self.token_ids = (self.config.image_token_id,)
        self.scale = round(1 / self.config.downsample_ratio)  # patches per token side of the pixel shuffle
        # per tile of the last tower call: vision block -> {"heads" / "concat": (scores (tiles, T), keys (tiles, T, d))}
        self.vision: dict[int, dict[str, tuple[Tensor, Tensor]]] = {}
        self.features: Tensor | None = None  # (tiles, T, 4C) the projector's input of the last tower call
        self.tiles_seen = 0  # tiles of the last tower call
        self.tile_start: list[int] = []  # per encoded image (Item.source): its first tile in the tower call

    # ---- where the visual tokens are ----------------------------------------------------------
    def tile_tokens(self, side: int | None = None) -> int:
        """LM tokens per tile: (patches per side / scale) squared (``side``: a tile's patches per side)."""
        vision = self.config.vision_config
        side = side or _pair(vision.image_size)[0] // _pair(vision.patch_size)[0]
        if side % self.scale:
            raise ValueError(f"a tile of {side} x {side} patches does not pixel-shuffle by {self.scale}")
        return (side // self.scale) ** 2

    def visual_items(self, args, kwargs) -> list[Item]:
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        encoded = self.protocol.encoded_in(kwargs, "image")  # generate() encodes images first
        if pixel_values is None and not encoded:
            return []
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("pressing an InternVL model needs input_ids (an image's tiles are located by their "
                             "<IMG_CONTEXT> placeholder ids), not inputs_embeds")
        if pixel_values is not None:
            self.vision, self.features, self.tiles_seen = {}, None, 0  # the tower runs inside this call
            patch = _pair(self.config.vision_config.patch_size)[0]
            per_tile = self.tile_tokens(pixel_values.shape[-1] // patch)
            tiles = pixel_values.shape[0]
        else:
            per_tile, tiles = encoded[0].shape[0], len(encoded)
        rows = _runs(input_ids, self.config.image_token_id)  # per row: each image's placeholder count
        counts = [n for row in rows for n in row]
        if any(n % per_tile for n in counts):
            raise ValueError(f"an InternVL image is <img>, tiles x {per_tile} <IMG_CONTEXT> tokens, </img>: the prompt "
                             f"holds runs of {counts} tokens. Build the prompt with the model's processor")
        if sum(counts) != tiles * per_tile:
            raise ValueError(f"the prompt's <IMG_CONTEXT> tokens stand for {sum(counts) // per_tile} tiles, "
                             f"pixel_values holds {tiles}: pass the processor's input_ids and pixel_values together")
        sources = self._sources([[n // per_tile for n in row] for row in rows], tiles)
        items = []
        for count, source in zip(counts, sources):
            n = count // per_tile
            side = math.isqrt(per_tile)
            grid = (1, side, side)
            parts = () if n == 1 else tuple(Part(k * per_tile, per_tile, grid, "base" if k == n - 1 else "crop")
                                            for k in range(n))
            items.append(Item(self.config.image_token_id, count, grid if n == 1 else None, source, parts=parts))
        return items

    def _sources(self, rows: list[list[int]], tiles: int) -> list[int]:
        """Each image's index among the images the tower encoded (``Item.source``; ``rows``: per
        row, its images' tile counts), and their first tiles (``self.tile_start``). ``generate``
        encodes the batch once, then repeats every row's tiles per beam / returned sequence
        (``expand`` consecutive copies of each row, as it repeats ``input_ids``): an image of row b
        is then the image of row b - b % expand."""
        seen = self.tiles_seen
        expand = tiles // seen if seen and tiles % seen == 0 and len(rows) % (tiles // seen) == 0 else 1
        per_row: list[list[int]] = []
        self.tile_start, first = [], 0
        for b, row in enumerate(rows):
            if b % expand:
                if row != rows[b - b % expand]:
                    raise ValueError("generate repeated a prompt row per beam with other images in it")
                per_row.append(per_row[b - b % expand])
                continue
            per_row.append(list(range(len(self.tile_start), len(self.tile_start) + len(row))))
            for n in row:
                self.tile_start.append(first)
                first += n
        return [s for row in per_row for s in row]

    # ---- [CLS] signals ------------------------------------------------------------------------
    def signal_hooks(self, press: Press) -> list:
        needs = set(press.needs)
        handles = [self.vlm.vision_tower.register_forward_pre_hook(self._tower_hook, with_kwargs=True)]
        if "vision_features" in needs:
            handles.append(self.vlm.multi_modal_projector.register_forward_pre_hook(self._projector_hook))
        layers = encoder_layers(self.vlm.vision_tower)
        forms = hook_forms(needs, lambda: {self._block(i) for i in (self._feature_layer(), *self._press_layers(press))},
                           lambda: self._concat_block(press))
        return handles + [attention_module(layers[block]).register_forward_pre_hook(self._vision_hook(block, form),
                                                                                    with_kwargs=True)
                          for block, form in forms.items()]

    def fill_signals(self, press: Press, ctx: VisualContext, items: list[Item]) -> None:
        needs, n = set(press.needs), items[0].length
        index = None

        def tokens(per_tile: Tensor) -> Tensor:
            """(tiles, T, ...) per tile of the tower call -> (M, n, ...) per item."""
            nonlocal index
            t = per_tile.shape[1]
            if per_tile.shape[0] != self.tiles_seen or n % t or max(it.source for it in items) >= len(self.tile_start):
                raise ValueError(f"vision signal covers {tuple(per_tile.shape[:2])} tiles x tokens, the LM sees "
                                 f"{len(items)} images of {n} tokens: encode the images inside the "
                                 "`with press(model):` block")
            if index is None:  # (M * tiles per image) tiles of the items, in order (no tensor from host data)
                index = torch.cat([torch.arange(self.tile_start[item.source], self.tile_start[item.source] + n // t,
                                                device=per_tile.device) for item in items])
            return per_tile[index].reshape(len(items), n, *per_tile.shape[2:])

        ctx.cls_first = False  # the "default" strategy: [CLS] is not among the LM's tokens
        if "vision_features" in needs:
            if self.features is None:
                raise ValueError("vision signals missing: encode the images inside the `with press(model):` block")
            ctx.vision_features = tokens(self.features)
        fill_cls_signals(ctx, needs, self.vision, tokens,
                         lambda: (self._block(self._feature_layer()), [self._block(i) for i in self._press_layers(press)]),
                         lambda: self._concat_block(press))

    def _feature_layer(self) -> int:
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("presses needing [CLS] attention support a single vision_feature_layer, not a list")
        return layer

    def _depth(self) -> int:
        return len(encoder_layers(self.vlm.vision_tower))

    def _press_layers(self, press: Press) -> tuple[int, ...]:
        return press_layers(press, self._depth())

    def _concat_block(self, press: Press) -> int:
        return self._block(concat_layer(press, self._feature_layer(), self._depth()))

    def _block(self, hs_index: int) -> int:
        """Vision block producing hidden state ``hs_index`` (-1 and its positive twin: one hook)."""
        return layer_index(hs_index, self._depth())

    def _tower_hook(self, module, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        self.tiles_seen = pixels.shape[0]

    def _projector_hook(self, module, args):
        self.features = args[0]

    def _vision_hook(self, block: int, forms: set[str]):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            # InternViT normalises q and k over the full width (use_qk_norm) before splitting heads
            normed = SimpleNamespace(q_proj=lambda x: module.q_norm(module.q_proj(x)),
                                     k_proj=lambda x: module.k_norm(module.k_proj(x)),
                                     num_heads=module.num_heads, scale=module.scale)
            raw = cls_signals(normed, hidden, heads="heads" in forms, concat="concat" in forms)
            self.vision[block] = {form: (self._shuffled(scores), self._shuffled(keys))
                                  for form, (scores, keys) in raw.items()}

        return hook

    def _shuffled(self, t: Tensor) -> Tensor:
        """Per-patch values (tiles, 1 + P, ...) of a tower block ([CLS] first) -> per LM token
        (tiles, T, ...): [CLS] dropped ("default" strategy), each token the mean of the scale x scale
        patches the pixel shuffle concatenates into it (rows 2i, 2i + 1 x columns 2j, 2j + 1 for
        token (i, j) at scale 2), tokens in raster order."""
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError("InternVL's pixel shuffle needs the 'default' feature strategy ([CLS] dropped)")
        t = t[:, 1:]
        side, s = math.isqrt(t.shape[1]), self.scale
        if side * side != t.shape[1] or side % s:
            raise ValueError(f"a tile of {t.shape[1]} patches is not a square that pixel-shuffles by {s}")
        grid = t.reshape(t.shape[0], side // s, s, side // s, s, *t.shape[2:])
        return grid.mean(dim=(2, 4)).flatten(1, 2)

    # ---- cost and shapes ------------------------------------------------------------------------
    @classmethod
    def prefill_flops(cls, config, inputs: dict, seq_len: int, layer_seq_len=None) -> PrefillFlops:
        """The tower over every tile of the batch (its patch embedding, then every block over [CLS]
        + patches), the projector (4C -> D and D -> D; norms ignored) over the tokens the LM sees,
        and ``batch`` rows of ``seq_len`` LM tokens."""
        vision_cfg, text_cfg = config.vision_config, config.text_config
        batch = inputs["input_ids"].shape[0]
        pixels = inputs.get("pixel_values")
        tiles = pixels.shape[0] if pixels is not None else 0
        patch = _pair(vision_cfg.patch_size)[0]
        side = pixels.shape[-1] // patch if pixels is not None else _pair(vision_cfg.image_size)[0] // patch
        patches, scale = side * side, round(1 / config.downsample_ratio)
        embed = 2.0 * tiles * patches * vision_cfg.num_channels * patch * patch * vision_cfg.hidden_size
        vision = embed + transformer_flops(vision_cfg, patches + 1, batch=tiles)
        tokens = tiles * patches // scale**2
        width, hidden = vision_cfg.hidden_size * scale**2, text_cfg.hidden_size
        projector = 2.0 * tokens * (width * hidden + hidden * hidden)
        return PrefillFlops(vision, projector, language_flops(text_cfg, seq_len, batch, layer_seq_len))

    @classmethod
    def build(cls, size: str = "tiny", seed: int = 0, attn: str = "sdpa", model_type: str | None = None,
              **overrides):
        """"real": InternVL3-1B (InternViT-300M: 24 x 1024 at 448 px, patch 14; Qwen2.5-0.5B) scaled
        for a CPU as LLaVA's shape: an InternViT of 6 x 384 at 448 px (1024 patches, 256 tokens a
        tile) and the shared 12 x 896 Qwen2 LM. "tiny": 32 px tiles of 4 px patches (16 tokens).
        ``vision_extra``: other InternViT config fields (e.g. ``use_qk_norm=True``, InternViT-6B's)."""
        from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

        if model_type not in (None, *cls.model_types):
            raise ValueError(f"{cls.family} builds {cls.model_types}, not {model_type!r}")
        real = dict(vision_layers=6, vision_hidden=384, image_size=448, patch_size=14)
        tiny = dict(vision_layers=2, vision_hidden=32, image_size=32, patch_size=4)
        shape = {**lm_shape(size), **(real if size == "real" else tiny), "vision_extra": {}, **overrides}
        side, patch = shape["image_size"], shape["patch_size"]
        if side % patch or (side // patch) % 2:
            raise ValueError(f"an InternVL tile of {side} px is not an even number of {patch} px patches, which the "
                             f"2 x 2 pixel shuffle needs: pick a multiple of {2 * patch} px")
        torch.manual_seed(seed)
        hidden = shape["vision_hidden"]
        vision = InternVLVisionConfig(**shape["vision_extra"], hidden_size=hidden,
                                      intermediate_size=4 * hidden if size == "real" else 2 * hidden,
                                      num_hidden_layers=shape["vision_layers"],
                                      num_attention_heads=max(1, hidden // 64) if size == "real" else 4,
                                      image_size=shape["image_size"], patch_size=shape["patch_size"])
        per_tile = (side // patch // 2) ** 2
        config = InternVLConfig(vision_config=vision, text_config=qwen2_text(shape), image_token_id=IMAGE_TOKEN,
                                image_seq_length=per_tile, downsample_ratio=0.5, vision_feature_layer=-1,
                                vision_feature_select_strategy="default")
        config._attn_implementation = attn
        model = InternVLForConditionalGeneration(config).eval()
        model.generation_config.pad_token_id = 0
        return model

    @classmethod
    def prompts(cls, model, rows: list, kind: str = "image", seed: int = 0, first_row: int = 0) -> dict:
        """Left-padded rows as InternVL's processor lays them out: a few system tokens, each image as
        <img> + its tiles' <IMG_CONTEXT> tokens + </img>, a question of ragged length. An image of
        (h, w) px is resized to the tile grid the processor picks (``get_optimal_tiled_canvas``,
        1..12 tiles) and cut row-major, plus a thumbnail when the grid has more than one tile."""
        if kind != "image":
            raise ValueError("InternVL's model inputs carry images only (the processor passes video frames as "
                             "one-tile images)")
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        config = model.config
        size = _pair(config.vision_config.image_size)[0]
        per_tile = (size // _pair(config.vision_config.patch_size)[0] // round(1 / config.downsample_ratio)) ** 2
        vocab = config.text_config.vocab_size
        sequences, pixels = [], []
        for i, row in enumerate(rows):
            tokens = []
            for j, (h, w) in enumerate(row):
                cols, grid_rows = get_optimal_tiled_canvas((h, w), (size, size), 1, MAX_TILES)
                image = pixel_tensor((3, h, w), seed, first_row + i, j)[None]
                tiles = F.interpolate(image, size=(grid_rows * size, cols * size), mode="bilinear", align_corners=False)
                tiles = tiles.reshape(3, grid_rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(-1, 3, size, size)
                if cols * grid_rows > 1:
                    thumbnail = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
                    tiles = torch.cat([tiles, thumbnail])
                pixels.append(tiles)
                tokens.append([IMG_START, *[config.image_token_id] * (tiles.shape[0] * per_tile), IMG_END])
            sequences.append(text_around(tokens, first_row + i, seed, 33 if vocab > 1000 else 12, vocab))
        inputs = left_pad(sequences)
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels)
        return inputs

    @classmethod
    def encode(cls, model, inputs: dict) -> None:
        config = model.config
        model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=config.vision_feature_layer,
                                 vision_feature_select_strategy=config.vision_feature_select_strategy)


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def _runs(input_ids: Tensor, token: int) -> list[list[int]]:
    """Per row, the lengths of its runs of ``token`` (an InternVL image's placeholders are one run,
    between <img> and </img>), in order: one host read of the ids' placeholder mask, then numpy."""
    mask = (input_ids == token).cpu().numpy()
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)  # +1 at a run's start, -1 after its end
    rows, starts = np.nonzero(edges == 1)
    lengths = np.nonzero(edges == -1)[1] - starts  # row-major: the k-th end closes the k-th start
    out: list[list[int]] = [[] for _ in range(mask.shape[0])]
    for row, length in zip(rows.tolist(), lengths.tolist()):
        out[row].append(length)
    return out
