"""SmolVLM / Idefics3 family (transformers ``SmolVLMForConditionalGeneration``, model_type
"smolvlm", and ``Idefics3ForConditionalGeneration``, "idefics3"): where the image tokens are and
which signals the SigLIP tower gives. Both classes share this layout (SmolVLM's modeling file is
generated from Idefics3's); the pressing itself is the shared core (``models/base.py``).

Where the image tokens are. The processor resizes an image so its longest edge is
``size["longest_edge"]`` (4 x the tower's ``image_size`` in the released models), cuts it into
r x c square crops of ``image_size`` px and appends the whole image resized to one crop (the
"global" image; with ``do_image_splitting=False``, as for SmolVLM's video frames, an image is
that one crop alone). The tower encodes every
crop; the connector pixel-shuffles each crop's (p x p) patch grid into (p/s x p/s) tokens
(``scale_factor`` s: each LM token concatenates an s x s block of patches) and projects them. The
prompt spells one image as

    <fake><row_1_col_1><image>*n <fake><row_1_col_2><image>*n ... \\n  (one line per tile row)
    \\n<fake><global-img><image>*n<fake>

(an unsplit image: ``<fake><global-img><image>*n<fake>``). ``<fake_token_around_image>``,
``<row_i_col_j>``, ``<global-img>`` and the newlines are ordinary text tokens: the core keeps
every text token, so no press ever drops or moves them (tested).

One :class:`Item` per IMAGE, not per crop: a press's budget (``keep=64``, a ratio) is the
image's, as the papers state it, and a press sees the image whole -- its tiles and its global
view together, so it can trade tokens between crops (DivPrune, VisionZip, ... pick the best
tokens of the whole image; a per-crop item would force the same share on a blank tile and a busy
one). ``Item.parts`` are the crops in token order: each tile (role ``"crop"``, row-major), then
the global image (role ``"base"``: the thumbnail, as LLaVA-NeXT's base image), each a (1, p/s,
p/s) raster. ``Item.grid`` is None for a split image (its tokens form no single raster) and
(1, p/s, p/s) for an unsplit one (no parts). Images of the same layout
are pressed together. SmolVLM's video frames are unsplit images to the model (the processor
writes each frame as one): each frame is an image item.

Which tokens belong to which image is read from the prompt: each crop is one run of ``n``
``<image>`` tokens (``n`` from the pixels' size), and the run preceded by the ``<global-img>``
marker closes an image. That marker's id is not in the config: it is the token before the last
run of every row holding images (every image ends with its global crop), and must be the same in
every row; a prompt not laid out as the processor lays it out raises a ValueError.

Padded images: ``pixel_values`` is (B, max images per row, 3, H, W) with rows of fewer crops
padded by all-zero crops, which the model drops before the tower (``real_images_inds``); the
placeholders count only real crops, so crops in the tower's batch are the real crops in row
order, and an item's ``source`` is the index of its first crop there. ``generate`` encodes the
images before its first forward and repeats each row's features per beam / returned sequence
(``repeat_interleave`` of rows): row r of the forward is row r // e of the tower's batch, e
found as (crops in the prompt) / (crops the tower encoded).

Positions: the language model is a Llama-like decoder (SmolLM, Llama 3) with 1-D RoPE:
"keep" and "reindex" are both defined.

Signals (``notes``): SigLIP has no [CLS], so ``cls_attn`` is the attention each patch RECEIVES in
the tower's last block (whose output, after the post-layernorm, the connector reads), averaged
over the queries of its crop (crops attend within themselves) and over heads,
``score_j = mean_{h, i} softmax_j(q_i . k_j / sqrt(d))`` (HiPrune's no-[CLS] saliency, arXiv
2508.00553, as ``qwen_vl.py`` computes it), then averaged over the s x s patches the pixel shuffle
puts into each LM token. A crop's padded patches (``pixel_attention_mask``) are masked as keys,
exactly as the tower masks them, and left out of the mean over queries. ``vision_keys``: that
block's keys, averaged over heads and over each token's s x s patches; ``cls_attn_concat`` /
``vision_keys_concat``: the same from one softmax over the heads-concatenated (full-width) q / k
scaled by C^-1/2, and those full-width keys; ``cls_attn_layers``: ``cls_attn`` at the blocks a
press names (hidden-state indices); ``vision_features``: what the connector's projection receives
for each token, its s x s patches concatenated by the pixel shuffle. All are computed by forward
pre-hooks from the blocks' own inputs (q / k recomputed, queries in chunks): the tower keeps
running with SDPA / FlashAttention, no attention map is materialised.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmpress.flops import PrefillFlops, language_flops, transformer_flops
from mmpress.models.base import LLM_SIGNALS, VISION_SIGNALS, Adapter, Item, Part, family
from mmpress.models.examples import left_pad, lm_shape, pixel_tensor, text_around, text_config
from mmpress.models.vision import CONCAT, HEADS, concat_layer, hook_forms, layer_index, press_layers
from mmpress.presses.base import Press, VisualContext

# token ids of the random models below (the released tokenizers' ids differ; the adapter reads
# only ``config.image_token_id`` and the prompt's structure)
IMAGE, FAKE, GLOBAL, NEWLINE, ROW_COL = 3, 4, 5, 6, 7  # ROW_COL + 6 * (i - 1) + (j - 1): <row_i_col_j>
TEXT_LOW = ROW_COL + 36  # random text ids start here (the processor names tiles up to <row_6_col_6>)
LONGEST_EDGE = 4  # the processors' size["longest_edge"], in crops (4 x image_size in every released config)
MAX_IMAGE_SIZE = 4096  # the image processors' absolute limit (MAX_IMAGE_SIZE)


@family
class Idefics3Adapter(Adapter):
    """Applies presses to a SmolVLM or Idefics3 model (see the module docstring)."""

    family = "smolvlm"
    model_types = ("smolvlm", "idefics3")
    classes = ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration")
    # no "grid": the processor splits every image (its longest edge becomes 4 crops), and a split
    # image's tokens are crop after crop, no single raster (only an unsplit one, a video frame, has it)
    signals = (VISION_SIGNALS - {"grid"}) | LLM_SIGNALS
    notes = ("one item per image, its tiles and global image as parts (no 2-D grid for a split image: crop after "
             "crop); no [CLS]: cls_attn = mean attention each patch receives (within its crop) in the last SigLIP "
             "block, averaged over the scale_factor**2 patches pixel-shuffled into each token; vision_keys = that "
             "block's keys, averaged the same way; *_concat: the same from one softmax over the heads-concatenated "
             "q / k; vision_features = the pixel-shuffled connector input")
    position_modes = ("keep", "reindex")
    language_model_attr = "text_model"  # Idefics3Model / SmolVLMModel name their language model so
    # (h, w) px per image; the tiny towers' crops are 36 (smolvlm) / 24 (idefics3) px, an image's
    # longest edge becomes 4 crops: 2 x 4 tiles; then 4 x 4, 1 x 4 and 4 x 2, 4 x 3 (+ the global image)
    example_rows = {"single": [[(72, 144)]], "ragged": [[(144, 144)], [(36, 144), (144, 72)], [(100, 60)]]}
    # a 2:1 landscape image: 2 x 4 tiles + the global image, 729 tokens (SmolVLM2) / 1521 (Idefics3); a
    # square one is 4 x 4 + 1 (1377 / 2873 tokens), about twice the CPU time a prefill
    bench_media = {"image": (768, 1536)}

    def __init__(self, model, positions: str | None = None):
        super().__init__(model, positions)
        if not hasattr(self.vlm, "vision_model") or not hasattr(self.vlm, "connector"):
            raise ValueError(f"{type(model).__name__} does not look like a transformers SmolVLM / Idefics3 model")
        self.token_ids = (self.config.image_token_id,)
        self.scale = self.config.scale_factor
        self.patch = self.config.vision_config.patch_size
        self.depth = len(self.vlm.vision_model.encoder.layers)
        # the last tower call: {"crops", "side" (patches per crop side), "valid" (N, S) or None,
        # "signals": {block | ("concat", block) | "features": ...}}; one forward consumes it
        self._tower: dict | None = None
        self._used: dict | None = None  # the tower call whose crops this forward's items index

    # ---- where the images are --------------------------------------------------------------
    def visual_items(self, args, kwargs) -> list[Item]:
        pixels = kwargs.get("pixel_values")
        encoded = self.protocol.encoded_in(kwargs, "image") if pixels is None else None
        if pixels is None and not encoded:
            return []
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("pressing a SmolVLM / Idefics3 prompt needs its input_ids (which tokens are an image's "
                             "is read from them), not inputs_embeds")
        # the tower call this forward's items index: the one inside this forward (pixels), else the
        # one generate made before it (if made under the press), consumed here
        self._used, self._tower = (None, None) if pixels is not None else (self._tower, None)
        tower = self._used
        if pixels is not None:
            side, tower_crops = pixels.shape[-2] // self.patch, None
        else:
            side = tower["side"] if tower else self.config.vision_config.image_size // self.patch
            tower_crops = tower["crops"] if tower else None
        n = (side // self.scale) ** 2
        images = image_crops(ids, self.config.image_token_id, n)  # per row: the crops of each image
        return self._items(images, n, side // self.scale, tower_crops)

    def _items(self, images: list[list[int]], n: int, side: int, tower_crops: int | None) -> list[Item]:
        per_row = [sum(row) for row in images]
        total = sum(per_row)
        expand = 1
        if tower_crops:  # generate's rows: each tower row repeated ``expand`` times in a row
            expand, rest = divmod(total, tower_crops)
            if rest or len(images) % expand or any(images[r] != images[r - r % expand] for r in range(len(images))):
                raise ValueError(f"the prompt holds {total} image crops, the vision tower encoded {tower_crops}: the "
                                 "pre-encoded images (mm_encoder_outputs) do not belong to this prompt")
        items, start = [], 0
        for r, row in enumerate(images):
            if r % expand == 0:
                first = start  # the tower row's first crop
                start += per_row[r]
            crop = first
            for m in row:
                items.append(Item(self.config.image_token_id, m * n, (1, side, side) if m == 1 else None, crop,
                                  parts=crop_parts(m, n, side)))
                crop += m
        return items

    # ---- vision signals (no [CLS]: attention received, see the module docstring) --------------
    def signal_hooks(self, press: Press) -> list:
        vision, needs = self.vlm.vision_model, set(press.needs)
        handles = [vision.register_forward_pre_hook(self._start_tower, with_kwargs=True),
                   self.vlm.register_forward_hook(self._end_forward)]
        encoder = vision.encoder.layers
        forms = hook_forms(needs, lambda: {self.depth - 1, *map(self._block, press_layers(press, self.depth))},
                           lambda: self._concat_block(press))
        handles += [encoder[b].self_attn.register_forward_pre_hook(self._attention_hook(b, form), with_kwargs=True)
                    for b, form in forms.items()]
        if "vision_features" in needs:
            handles.append(self.vlm.connector.modality_projection.register_forward_pre_hook(self._features_hook))
        return handles

    def _start_tower(self, module, args, kwargs):
        """A tower call begins: its crops (real ones only: the model dropped the padding crops),
        their patch grid and which patches are padding (host facts but the mask: a device tensor)."""
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        mask = kwargs.get("patch_attention_mask", args[1] if len(args) > 1 else None)
        crops, side = pixels.shape[0], pixels.shape[-2] // self.patch
        self._tower = {"crops": crops, "side": side, "signals": {},
                       "valid": None if mask is None else mask.reshape(crops, -1).bool()}

    def _end_forward(self, module, args, output):
        self._used = self._tower = None  # a tower call serves the forward it ran for (or ran before)

    def _block(self, hs_index: int) -> int:
        return layer_index(hs_index, self.depth)

    def _concat_block(self, press: Press) -> int:
        return self._block(concat_layer(press, -1, self.depth))  # the connector reads the last block's output

    def _pool(self, x: Tensor, side: int) -> Tensor:
        """(N, S, ...) per patch -> (N, S / s^2, ...) per LM token: the mean of the s x s patches the
        connector's pixel shuffle concatenates into each token (tokens in raster order)."""
        s, t = self.scale, side // self.scale
        return x.reshape(x.shape[0], t, s, t, s, *x.shape[2:]).mean(dim=(2, 4)).reshape(x.shape[0], t * t, *x.shape[2:])

    def _attention_hook(self, block: int, forms: set[str]):
        def hook(module, args, kwargs):
            tower = self._tower
            if tower is None:
                return
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            n, s, c = hidden.shape
            q, k = module.q_proj(hidden), module.k_proj(hidden)  # (N, S, C)
            bias, valid, side = key_bias(mask, tower["valid"], hidden.dtype), tower["valid"], tower["side"]
            if "heads" in forms:
                qh, kh = (t.view(n, s, module.num_heads, -1).transpose(1, 2) for t in (q, k))  # (N, H, S, d)
                score = received_by_crop(qh, kh, module.scale, bias, valid)
                tower["signals"][block] = (self._pool(score, side), self._pool(kh.mean(dim=1), side))
            if "concat" in forms:  # one softmax over the heads' concatenated q / k, scaled by C^-1/2
                score = received_by_crop(q[:, None], k[:, None], c**-0.5, bias, valid)
                tower["signals"][("concat", block)] = (self._pool(score, side), self._pool(k, side))

        return hook

    def _features_hook(self, module, args):
        if self._tower is not None:
            self._tower["signals"]["features"] = args[0]  # (N, n, C * s^2): the pixel-shuffled crops

    def fill_signals(self, press: Press, ctx: VisualContext, items: list[Item]) -> None:
        tower, needs = self._used or self._tower, set(press.needs)
        blocks = [self.depth - 1, *map(self._block, press_layers(press, self.depth))] if HEADS & needs else []
        concat = ("concat", self._concat_block(press)) if CONCAT & needs else None
        wanted = [*blocks, *([concat] if concat else []), *(["features"] if "vision_features" in needs else [])]
        if tower is None or any(w not in tower["signals"] for w in wanted):
            raise ValueError("vision signals missing: encode the images inside the `with press(model):` block")
        crops = items[0].length // (tower["side"] // self.scale) ** 2
        index = torch.tensor([[item.source + c for c in range(crops)] for item in items])
        if int(index.max()) >= tower["crops"]:
            raise ValueError(f"the items index crop {int(index.max())}, the tower encoded {tower['crops']}")

        def per_item(t: Tensor) -> Tensor:  # (N crops, n, ...) -> (items, crops * n, ...)
            return t[index.to(t.device)].reshape(len(items), items[0].length, *t.shape[2:])

        signals = tower["signals"]
        if blocks:
            attn, keys = signals[blocks[0]]
            ctx.cls_attn, ctx.vision_keys = per_item(attn), per_item(keys)
            if len(blocks) > 1:
                ctx.cls_attn_layers = torch.stack([per_item(signals[b][0]) for b in blocks[1:]], dim=1)
        if concat:
            ctx.cls_attn_concat, ctx.vision_keys_concat = map(per_item, signals[concat])
        if "vision_features" in needs:
            ctx.vision_features = per_item(signals["features"])

    # ---- cost and shapes ----------------------------------------------------------------------
    @classmethod
    def prefill_flops(cls, config, inputs: dict, seq_len: int, layer_seq_len=None) -> PrefillFlops:
        """The tower (patch embedding and blocks) over every real crop (all-zero padding crops are
        dropped, as the model drops them), the connector's projection (no bias) over each crop's
        tokens, and ``batch`` rows of ``seq_len`` LM tokens."""
        vision_cfg, text_cfg = config.vision_config, config.text_config
        batch = inputs["input_ids"].shape[0]
        pixels = inputs.get("pixel_values")
        crops, patches = 0, 0
        if pixels is not None:
            crops = int(pixels.flatten(0, -4).ne(0).flatten(1).any(dim=1).sum())
            patches = (pixels.shape[-2] // vision_cfg.patch_size) * (pixels.shape[-1] // vision_cfg.patch_size)
        embed = 2.0 * crops * patches * vision_cfg.hidden_size * vision_cfg.num_channels * vision_cfg.patch_size**2
        vision = embed + transformer_flops(vision_cfg, patches, batch=crops)
        tokens = crops * patches // config.scale_factor**2
        projector = 2.0 * tokens * vision_cfg.hidden_size * config.scale_factor**2 * text_cfg.hidden_size
        return PrefillFlops(vision, projector, language_flops(text_cfg, seq_len, batch, layer_seq_len))

    @classmethod
    def build(cls, size: str = "tiny", seed: int = 0, attn: str = "sdpa", model_type: str | None = None,
              **overrides):
        """A random model of the real class of ``model_type`` ("smolvlm", the default, or "idefics3").
        "real": SmolVLM2-2.2B's tower geometry (384 px crops, patch 14, pixel shuffle 3: 81 tokens a
        crop) or Idefics3-8B's (364 px, patch 14, shuffle 2: 169 tokens), the SigLIP tower scaled to
        6 x 384 as LLaVA's CLIP is for a CPU, and the shared 12 x 896 LM (a Llama: SmolLM / Llama 3
        are Llama decoders). "tiny": 36 px crops (shuffle 3) / 24 px (shuffle 2), 9 tokens a crop.
        ``image_size`` (an override) is the crop's side: the tower's resolution."""
        from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig, SmolVLMConfig,
                                  SmolVLMForConditionalGeneration)

        model_type = model_type or "smolvlm"
        if model_type not in cls.model_types:
            raise ValueError(f"model_type must be one of {cls.model_types}, got {model_type!r}")
        crop = {("smolvlm", "real"): (384, 14, 3), ("idefics3", "real"): (364, 14, 2),
                ("smolvlm", "tiny"): (36, 4, 3), ("idefics3", "tiny"): (24, 4, 2)}
        image_size, patch_size, scale = crop[model_type, "real" if size == "real" else "tiny"]
        vision = dict(vision_layers=6, vision_hidden=384) if size == "real" else \
            dict(vision_layers=2, vision_hidden=32, vision_heads=4)
        shape = {**lm_shape(size), **({"vocab": 128} if size == "tiny" else {}), **vision,
                 "image_size": image_size, "patch_size": patch_size, "scale_factor": scale, **overrides}
        if shape["image_size"] // shape["patch_size"] % shape["scale_factor"]:  # (the conv drops a remainder)
            raise ValueError(f"{model_type}: a crop of {shape['image_size']} px must be a number of "
                             f"{shape['patch_size']} px patches a side divisible by the pixel shuffle's "
                             f"{shape['scale_factor']}")
        torch.manual_seed(seed)
        hidden = shape["vision_hidden"]
        vision_config = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=shape["vision_layers"],
                             num_attention_heads=shape.get("vision_heads") or max(1, hidden // 64),
                             image_size=shape["image_size"], patch_size=shape["patch_size"])
        config_cls, model_cls = ((SmolVLMConfig, SmolVLMForConditionalGeneration) if model_type == "smolvlm"
                                 else (Idefics3Config, Idefics3ForConditionalGeneration))
        config = config_cls(vision_config=vision_config, text_config=LlamaConfig(**text_config(shape)),
                            scale_factor=shape["scale_factor"], image_token_id=IMAGE)
        config._attn_implementation = attn
        model = model_cls(config).eval()
        model.generation_config.pad_token_id = 0
        return model

    @classmethod
    def prompts(cls, model, rows: list, kind: str = "image", seed: int = 0, first_row: int = 0,
                text: int = 33) -> dict:
        """Left-padded rows (numbered from ``first_row``) as the processor lays them out: a few
        system tokens, the row's images (each resized to a longest edge of 4 crops, cut into tiles,
        + the global image, with their markers), a question of ragged length; ``pixel_values``
        (B, most crops in a row, 3, S, S) padded with all-zero crops and ``pixel_attention_mask``,
        as the image processor pads them."""
        if kind != "image":
            raise ValueError("SmolVLM / Idefics3 prompts take images (a video is a series of unsplit images)")
        cfg = model.config
        crop = cfg.vision_config.image_size
        n = (crop // cfg.vision_config.patch_size // cfg.scale_factor) ** 2
        sequences, crops = [], []
        for i, row in enumerate(rows):
            layouts = [tile_layout(h, w, crop) for h, w in row]
            sequences.append(text_around([image_tokens(r, c, n) for r, c in layouts], first_row + i, seed, text,
                                         cfg.text_config.vocab_size, low=TEXT_LOW))
            crops.append([pixel_tensor((3, crop, crop), seed, first_row + i, 1000 * j + t)
                          for j, (r, c) in enumerate(layouts) for t in range(r * c + 1 if r else 1)])
        if not any(crops):
            return left_pad(sequences)
        most = max(map(len, crops))
        pixels = torch.zeros(len(rows), most, 3, crop, crop)
        mask = torch.zeros(len(rows), most, crop, crop, dtype=torch.long)
        for i, row in enumerate(crops):
            if row:
                pixels[i, : len(row)], mask[i, : len(row)] = torch.stack(row), 1
        return {**left_pad(sequences), "pixel_values": pixels, "pixel_attention_mask": mask}

    @classmethod
    def encode(cls, model, inputs: dict) -> None:
        model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                       pixel_attention_mask=inputs.get("pixel_attention_mask"))


# ---- the prompt's layout --------------------------------------------------------------------
def image_crops(input_ids: Tensor, image_token: int, n: int) -> list[list[int]]:
    """Per row, the crop count of each of its images (1: unsplit). Each crop must be one run of
    ``n`` image tokens; the global crop (the run after ``<global-img>``, whose id is the token
    before every row's last run) closes an image. One host read of ``input_ids``."""
    ids = input_ids.detach().cpu()
    is_img = ids == image_token
    before = torch.nn.functional.pad(is_img[:, :-1], (1, 0), value=False)
    after = torch.nn.functional.pad(is_img[:, 1:], (0, 1), value=False)
    starts, ends = (is_img & ~before).nonzero().tolist(), (is_img & ~after).nonzero()[:, 1].tolist()
    runs: list[list[int]] = [[] for _ in range(ids.shape[0])]  # the marker before each crop
    for (row, s), e in zip(starts, ends):
        if e - s + 1 != n:
            raise ValueError(f"an image crop is {n} <image> tokens, each crop behind its marker tokens, as the "
                             f"SmolVLM / Idefics3 processor writes them; row {row} has a run of {e - s + 1}")
        runs[row].append(int(ids[row, s - 1]) if s > 0 else -1)
    markers = {row[-1] for row in runs if row}
    if len(markers) > 1:
        raise ValueError("the rows' last image crops follow different tokens: every image must end with its global "
                         "crop (<fake_token_around_image><global-img><image>...), as the processor writes it")
    out: list[list[int]] = []
    for row in runs:
        images, tiles = [], 0
        for marker in row:
            if marker in markers:  # the global crop closes the image
                images.append(tiles + 1)
                tiles = 0
            else:
                tiles += 1
        out.append(images)
    return out


def crop_parts(crops: int, n: int, side: int) -> tuple[Part, ...]:
    """The crops of one image as parts, in token order: its tiles (row-major), then its global
    image (the thumbnail: role "base", as LLaVA-NeXT's)."""
    if crops == 1:
        return ()
    return tuple(Part(k * n, n, (1, side, side), "crop" if k < crops - 1 else "base") for k in range(crops))


def tile_layout(height: int, width: int, crop: int, longest: int | None = None) -> tuple[int, int]:
    """(tile rows, tile cols) the image processor cuts an image of ``height`` x ``width`` px into
    ((0, 0): unsplit): its longest edge resized to ``longest`` (4 crops), the other rounded up to
    even, each side then rounded up to whole crops (``resize_for_vision_encoder``)."""
    longest = LONGEST_EDGE * crop if longest is None else longest
    aspect = width / height
    if width >= height:
        w, h = longest, int(longest / aspect)
        h += h % 2
    else:
        h, w = longest, int(longest * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    if max(h, w) > MAX_IMAGE_SIZE:
        h, w = (int(MAX_IMAGE_SIZE / aspect), MAX_IMAGE_SIZE) if w >= h else (MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect))
    aspect = w / h
    if w >= h:
        w = math.ceil(w / crop) * crop
        h = math.ceil(int(w / aspect) / crop) * crop
    else:
        h = math.ceil(h / crop) * crop
        w = math.ceil(int(h * aspect) / crop) * crop
    return (h // crop, w // crop) if h > crop or w > crop else (0, 0)


def image_tokens(rows: int, cols: int, n: int) -> list[int]:
    """One image's prompt tokens as the processor writes them (the random models' ids)."""
    glob = [FAKE, GLOBAL] + [IMAGE] * n + [FAKE]
    if not rows:
        return glob
    tiles = [t for i in range(rows) for t in
             [*[t for j in range(cols) for t in [FAKE, ROW_COL + 6 * i + j] + [IMAGE] * n], NEWLINE]]
    return tiles + [NEWLINE] + glob


def key_bias(mask: Tensor | None, valid: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The additive (N, 1, S or 1, S) mask the tower's attention applies (None: no padding):
    transformers passes a 4-D bool (SDPA) or additive float (eager) mask, or a 2-D key mask (flash)."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask[:, None, None, :].bool()
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def received_by_crop(q: Tensor, k: Tensor, scale: float, bias: Tensor | None, valid: Tensor | None,
                     budget: int = 1 << 24) -> Tensor:
    """(N, S): the attention each key receives within its crop, ``mean_{h, valid i} softmax_j(q_i . k_j
    * scale + bias_ij)``, for q, k (N, H, S, d) and the tower's additive mask ``bias``; ``valid``
    (N, S) leaves padded queries out of the mean. Queries go in chunks of at most ``budget`` logits;
    at least float32 (float64 stays float64)."""
    n, h, s, _ = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(dtype), k.to(dtype)
    total = q.new_zeros(n, h, s)
    rows = max(1, budget // (n * h * s))
    for i in range(0, s, rows):
        logits = (q[:, :, i : i + rows] @ k.transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + (bias[:, :, i : i + rows] if bias.shape[2] > 1 else bias).to(dtype)
        probs = logits.softmax(dim=-1)
        if valid is not None:
            probs = probs * valid[:, None, i : i + rows, None]
        total += probs.sum(dim=2)
    count = s if valid is None else valid.sum(dim=1, keepdim=True).clamp(min=1)
    return total.mean(dim=1) / count
