"""Mistral 3 family (transformers ``Mistral3ForConditionalGeneration``: Mistral Small 3.1 / 3.2,
Magistral Small, Ministral 3): a Pixtral vision tower at native resolution, a patch merger in the
projector, a Mistral / Ministral language model with 1-D RoPE. The pressing itself is the shared
core (``models/base.py``).

Where the visual tokens are: each image keeps its own size (sides multiples of
``patch_size * spatial_merge_size`` = 28 px in the released models; images of one batch differ,
``image_sizes`` says each one's (h, w) in the zero-padded ``pixel_values``). Pixtral encodes all
images of a call as one packed sequence of (h / 14) x (w / 14) patches each, attending only within
its image (a block-diagonal mask), with 2-D RoPE over each image's (row, column) patch ids. The
projector's patch merger turns each 2 x 2 window of patches into one token (``unfold``: windows in
raster order), so an image gives R x C tokens, R = h / 28, C = w / 28. The processor writes them
row by row: C ``[IMG]`` placeholders, then ``[IMG_BREAK]``, the last row ending in ``[IMG_END]``
instead. The markers are text tokens of their own ids: they stay, in place, and no press sees them.
The placeholders, read in order, are the merged tokens in raster order (transformers scatters the
features into them in that order), so one :class:`Item` per image holds R * C tokens on a
(1, R, C) grid; a press keeping tokens of a row leaves that row's break where it was.

Positions: 1-D RoPE in the language model (Mistral, or Ministral 3 with YaRN), so both "keep" and
"reindex" are offered, as for LLaVA. Ministral 3 also scales its queries by
``1 + beta * log(1 + floor(pos / original_max_position_embeddings))`` (Llama 4's attention scaling),
which is exactly 1 below 16384 positions; the in-LLM scores (``models/lm.py``) leave that factor
out, so beyond 16384 positions they are the unscaled queries' attention.

Signals: Pixtral has no [CLS] token, so ``cls_attn`` is the documented substitute of
``qwen_vl.py``: the attention each patch RECEIVES in the vision block whose output the projector
reads (``vision_feature_layer``, -1: the last block), averaged over the queries of its own image
(Pixtral attends within an image) and over heads, ``score_j = mean_{h, i} softmax_j(q_i . k_j /
sqrt(d))`` with q, k rotated by the tower's 2-D RoPE (HiPrune's no-[CLS] saliency, Liu et al.,
arXiv 2508.00553: official code averages the attention map over heads, sums over queries and
averages each merge group; we take the query mean, the same ranking within an image). Patch
scores become token scores by averaging each 2 x 2 merge window (the patches the merger
concatenates into that token); ``vision_keys`` are that block's rotated keys, averaged over heads
and over the window. ``cls_attn_concat`` / ``vision_keys_concat`` (official PruMerge's form): the
same from one softmax over the heads-concatenated rotated q / k scaled by C^-1/2, and those
concatenated keys averaged over the window. ``cls_attn_layers``: the same per block a press lists
(hidden-state indices, as ``vision_feature_layer``). ``vision_features`` (VisPruner's similarity):
what the projector receives for each token, its window's four patches of the feature layer
concatenated in the order the merger's ``unfold`` reads them (channel-major: c * 4 + window
position), before the projector's RMSNorm (as Qwen-VL's merger input is before its norm).

How: forward pre-hooks on those blocks' ``PixtralAttention`` take its input hidden states and
rotary ``position_embeddings`` as transformers passes them, recompute q and k as the module does
(``q_proj`` / ``k_proj``, then the module's own ``apply_rotary_pos_emb``) and the column means in
query chunks per image (``models.vision.received_attention``): no attention map is materialised,
no eager attention is needed, the tower keeps running with SDPA / FlashAttention. The image
boundaries come from ``image_sizes`` as the tower reads them. Each tower call's signals are
recorded with the projector output they produced (its storage), so items ``generate`` encoded
before the forward find theirs.
"""

from __future__ import annotations

import sys
from itertools import accumulate

import torch
from torch import Tensor

from mmpress.flops import PrefillFlops, language_flops
from mmpress.models.base import LLM_SIGNALS, VISION_SIGNALS, Adapter, Item, family
from mmpress.models.examples import left_pad, lm_shape, pixel_tensor, text_around, text_config
from mmpress.models.vision import CONCAT, HEADS, concat_layer, hook_forms, layer_index, press_layers, received_attention
from mmpress.presses.base import Press, VisualContext

# the released (tekken) tokenizer's ids, used by the random models below
IMAGE_TOKEN, IMAGE_BREAK, IMAGE_END = 10, 12, 13
TEXT_LOW = 14  # random text ids start above the image markers


@family
class Mistral3Adapter(Adapter):
    """Applies presses to a Mistral 3 model (Pixtral tower, patch merger, 1-D RoPE language model)."""

    family = "mistral3"
    model_types = ("mistral3",)
    classes = ("Mistral3ForConditionalGeneration",)
    signals = VISION_SIGNALS | LLM_SIGNALS
    notes = ("no [CLS]: cls_attn = mean attention each token receives within its image in the vision_feature_layer "
             "block of Pixtral (HiPrune's no-[CLS] saliency, arXiv 2508.00553), averaged over each 2x2 merge window; "
             "vision_keys = that block's rotated keys; *_concat: the same from one softmax over the heads-concatenated "
             "q / k; vision_features = the projector's input, each window's patches concatenated; [IMG_BREAK] / "
             "[IMG_END] markers are kept in place")
    # tiny models: 4 px patches, 8 px per token; a text-only row in the ragged batch
    example_rows = {"single": [[(32, 48)]], "ragged": [[(32, 48)], [(48, 32), (32, 32)], []]}
    # Qwen-VL's bench image, at Pixtral's native resolution (no resize below 1540 px): 64 x 64
    # patches, 32 x 32 = 1024 tokens (+ 32 markers)
    bench_media = {"image": (896, 896)}

    def __init__(self, model, positions: str | None = None):
        super().__init__(model, positions)
        if not hasattr(self.vlm, "vision_tower") or not hasattr(self.vlm, "multi_modal_projector"):
            raise ValueError(f"{type(model).__name__} does not look like a transformers Mistral 3 model")
        self.token_ids = (self.config.image_token_id,)
        self.patch = self.config.vision_config.patch_size
        self.merge = self.config.spatial_merge_size
        # a tower call in flight: {"sizes": [(h, w) px per image], "signals": {...}}; the signals of
        # this forward's own call, and of recent calls by the storage of their projector output
        # (generate encodes before the forward and passes views of that output)
        self._encoding: dict | None = None
        self._expect = False
        self._current: dict | None = None
        self._by_storage: dict[int, dict] = {}
        self._read: tuple | None = None  # (image_sizes, their host list) of this forward

    # ---- where the visual tokens are ----------------------------------------------------------
    def _shape(self, size: tuple[int, int]) -> tuple[int, tuple[int, int, int]]:
        """Tokens and (1, R, C) grid of an image of ``size`` (h, w) px, as the merger's ``unfold``
        and ``get_image_features``' split count them."""
        unit = self.patch * self.merge
        rows, cols = size[0] // unit, size[1] // unit
        return rows * cols, (1, rows, cols)

    @staticmethod
    def _sizes(image_sizes, pixel_values: Tensor | None) -> list[tuple[int, int]]:
        """(h, w) px of each image: ``image_sizes`` (host read; transformers reads them too), or
        the padded size for every image when it is None (as the tower does)."""
        if image_sizes is None:
            if pixel_values is None:
                return []
            return [tuple(pixel_values.shape[-2:])] * pixel_values.shape[0]
        sizes = image_sizes.tolist() if isinstance(image_sizes, Tensor) else list(image_sizes)
        return [(int(h), int(w)) for h, w in sizes]

    def visual_items(self, args, kwargs) -> list[Item]:
        token = self.config.image_token_id
        pixels = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        if pixels is not None:
            if kwargs.get("image_sizes") is None:
                raise ValueError("pressing a Mistral 3 image needs image_sizes (the processor returns it): the "
                                 "images of a batch differ in size inside the padded pixel_values")
            self._current, self._expect = None, True  # the tower runs inside this call and records them
            sizes = self._sizes(kwargs["image_sizes"], pixels)
            self._read = (kwargs["image_sizes"], sizes)  # the tower gets the same tensor: read it once
            return [Item(token, *self._shape(size), i) for i, size in enumerate(sizes)]
        encoded = self.protocol.encoded_in(kwargs, "image")  # generate() encodes images first
        if not encoded:
            return []
        record = self._by_storage.get(encoded[0].untyped_storage().data_ptr())
        self._current = record
        sizes = record["sizes"] if record is not None else []

        def describe(features: Tensor, source: int) -> dict:
            if source < len(sizes) and self._shape(sizes[source])[0] == features.shape[0]:
                return {"length": features.shape[0], "grid": self._shape(sizes[source])[1]}
            return {"length": features.shape[0], "grid": None}  # encoded outside the press: no raster known

        return self.encoded_items(kwargs, "image", token, describe)

    # ---- vision signals (no [CLS]: attention received, see the module docstring) -------------
    def signal_hooks(self, press: Press) -> list:
        tower, projector = self.vlm.vision_tower, self.vlm.multi_modal_projector
        handles = [tower.register_forward_pre_hook(self._start_encoding, with_kwargs=True),
                   projector.register_forward_hook(self._finish_encoding)]
        needs, layers = set(press.needs), tower.transformer.layers
        forms = hook_forms(needs, lambda: {self._feature_block(), *map(self._block, self._press_layers(press))},
                           lambda: self._concat_block(press))
        handles += [layers[b].attention.register_forward_pre_hook(self._attention_hook(b, form), with_kwargs=True)
                    for b, form in forms.items()]
        if "vision_features" in needs:
            handles.append(projector.register_forward_pre_hook(self._projector_hook))
        return handles

    def _depth(self) -> int:
        return len(self.vlm.vision_tower.transformer.layers)

    def _block(self, hs_index: int) -> int:
        return layer_index(hs_index, self._depth())

    def _feature_block(self) -> int:
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("presses needing vision-tower attention support a single vision_feature_layer, not "
                             f"{layer!r}")
        return self._block(layer)

    def _press_layers(self, press: Press) -> tuple[int, ...]:
        return press_layers(press, self._depth())

    def _concat_block(self, press: Press) -> int:
        layer = concat_layer(press, None, self._depth())
        return self._feature_block() if layer is None else self._block(layer)

    def _start_encoding(self, module, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        image_sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        read, self._read = self._read, None
        sizes = read[1] if read is not None and read[0] is image_sizes else self._sizes(image_sizes, pixels)
        self._encoding = {"sizes": sizes, "signals": {}}

    def _finish_encoding(self, module, args, output):
        encoding, self._encoding = self._encoding, None
        if encoding is None or not isinstance(output, Tensor):
            return
        if self._expect:
            self._current, self._expect = encoding, False
        key = output.untyped_storage().data_ptr()
        self._by_storage = {**dict(list(self._by_storage.items())[-3:]), key: encoding}

    def _patch_grids(self, sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(h // self.patch, w // self.patch) for h, w in sizes]

    def _window_grids(self, x: Tensor, sizes: list[tuple[int, int]]) -> list[Tensor]:
        """Per image, the (R, m, C, m, F) merge windows of (S, ...) per-patch values of the packed
        sequence (a last odd row or column of patches, which the merger's ``unfold`` drops, is
        dropped); windows in raster order, as the merger makes its tokens."""
        m, out = self.merge, []
        grids = self._patch_grids(sizes)
        for chunk, (h, w) in zip(x.split([h * w for h, w in grids]), grids):
            rows, cols = h // m, w // m
            out.append(chunk.reshape(h, w, -1)[: rows * m, : cols * m].reshape(rows, m, cols, m, -1))
        return out

    def _windows(self, x: Tensor, sizes: list[tuple[int, int]]) -> list[Tensor]:
        """Per image, (R * C, ...): the mean of (S, ...) per-patch values over each merge window."""
        return [g.mean(dim=(1, 3)).reshape(-1, *x.shape[1:]) for g in self._window_grids(x, sizes)]

    def _attention_hook(self, block: int, forms: set[str]):
        def hook(module, args, kwargs):
            encoding = self._encoding
            if encoding is None:
                return
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            rotary = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
            if rotary is None:
                raise ValueError(f"{type(module).__name__} got no position_embeddings: this transformers version "
                                 "calls the Pixtral attention differently; mmpress cannot score its tokens")
            sizes = encoding["sizes"]
            counts = [h * w for h, w in self._patch_grids(sizes)]
            s = hidden.shape[-2]
            if hidden.dim() != 3 or hidden.shape[0] != 1 or sum(counts) != s:
                raise ValueError(f"the Pixtral tower runs {tuple(hidden.shape)} hidden states for images of {sizes} "
                                 f"px ({sum(counts)} patches): not the packed sequence mmpress scores")
            heads = module.num_heads
            q = module.q_proj(hidden[0]).view(s, heads, -1)
            k = module.k_proj(hidden[0]).view(s, heads, -1)
            cos, sin = rotary
            rope = sys.modules[type(module).__module__].apply_rotary_pos_emb
            q, k = rope(q, k, cos, sin, unsqueeze_dim=1)  # (S, H, d) against (S, d) angles
            bounds = list(accumulate(counts, initial=0))  # host ints: one sequence per image

            def record(name, score: Tensor, keys: Tensor) -> None:
                encoding["signals"][name] = (self._windows(score, sizes),
                                             [t.to(k.dtype) for t in self._windows(keys.float(), sizes)])

            if "heads" in forms:
                record(block, received_attention(q, k, bounds, module.scaling), k.float().mean(dim=1))
            if "concat" in forms:  # one softmax over the heads' concatenated q / k, scaled by C^-1/2
                qc, kc = q.reshape(s, 1, -1), k.reshape(s, 1, -1)
                record(("concat", block), received_attention(qc, kc, bounds, kc.shape[-1] ** -0.5), kc[:, 0])

        return hook

    def _projector_hook(self, module, args):
        """``vision_features``: the projector's input, each token's merge window of patches
        concatenated as the merger's ``unfold`` reads them (channel-major), in raster order."""
        encoding = self._encoding
        if encoding is None:
            return
        x = args[0].reshape(-1, args[0].shape[-1])  # (1, S, C) or (S, C)
        encoding["signals"]["features"] = [g.permute(0, 2, 4, 1, 3).reshape(g.shape[0] * g.shape[2], -1)
                                           for g in self._window_grids(x, encoding["sizes"])]

    def fill_signals(self, press: Press, ctx: VisualContext, items: list[Item]) -> None:
        encoding, needs = self._current, set(press.needs)
        signals = encoding["signals"] if encoding is not None else {}
        blocks = [self._feature_block(), *map(self._block, self._press_layers(press))] if HEADS & needs else []
        concat = ("concat", self._concat_block(press)) if CONCAT & needs else None
        wanted = [*blocks, *([concat] if concat else []), *(["features"] if "vision_features" in needs else [])]
        if encoding is None or any(name not in signals for name in wanted):
            raise ValueError("vision signals missing: encode the images inside the `with press(model):` block")
        sources, n = [item.source for item in items], items[0].length

        def stack(per_item: list[Tensor]) -> Tensor:
            if max(sources) >= len(per_item) or any(per_item[s].shape[0] != n for s in sources):
                raise ValueError(f"vision signal covers {[t.shape[0] for t in per_item]} tokens per image, the LM "
                                 f"sees {len(items)} images of {n}")
            return torch.stack([per_item[s] for s in sources])  # generate repeats images per beam / sequence

        if "vision_features" in needs:
            ctx.vision_features = stack(signals["features"])
        if concat is not None:
            ctx.cls_attn_concat, ctx.vision_keys_concat = map(stack, signals[concat])
        if blocks:
            ctx.cls_attn, ctx.vision_keys = map(stack, signals[blocks[0]])
            if len(blocks) > 1:
                ctx.cls_attn_layers = torch.stack([stack(signals[b][0]) for b in blocks[1:]], dim=1)

    # ---- cost and shapes ------------------------------------------------------------------------
    @classmethod
    def prefill_flops(cls, config, inputs: dict, seq_len: int, layer_seq_len=None) -> PrefillFlops:
        """Pixtral over every image of the batch (patch convolution; per block q, k, v, o of C x C
        and a gated MLP over every patch, attention within each image: sum of n_i^2), the projector
        (patch merger 4C -> C, then C -> D -> D over the merged tokens; its RMSNorm ignored, as all
        norms are) and ``batch`` rows of ``seq_len`` LM tokens."""
        vision, text = config.vision_config, config.text_config
        batch = inputs["input_ids"].shape[0]
        pixels = inputs.get("pixel_values")
        sizes = cls._sizes(inputs.get("image_sizes"), pixels) if pixels is not None else []
        patch, merge = vision.patch_size, config.spatial_merge_size
        grids = [(h // patch, w // patch) for h, w in sizes]
        patches = sum(h * w for h, w in grids)
        square = sum((h * w) ** 2 for h, w in grids)
        tokens = sum((h // merge) * (w // merge) for h, w in grids)
        width, inter, depth = vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers
        embed = 2.0 * patches * vision.num_channels * patch**2 * width
        tower = embed + 2.0 * depth * patches * (4 * width**2 + 3 * width * inter) + 4.0 * depth * width * square
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        projector = 2.0 * tokens * (merge**2 * width * width + layers * width * text.hidden_size + text.hidden_size**2)
        return PrefillFlops(tower, projector, language_flops(text, seq_len, batch, layer_seq_len))

    @classmethod
    def build(cls, size: str = "tiny", seed: int = 0, attn: str = "sdpa", model_type: str | None = None,
              **overrides):
        """"real": Mistral Small 3.1's Pixtral tower (24 x 1024, 16 heads, 4x gated MLP, 14 px
        patches, 2 x 2 merge) scaled for a CPU as LLaVA's CLIP-L (24 x 1024 -> 6 x 384), the shared
        12 x 896 LM (a Mistral, ``text_model_type="ministral3"`` for Ministral 3's); it runs at the
        released resolution (``bench_media``). "tiny": a 2-block tower of 32, 4 px patches, a 2 x 48
        LM. ``vision_intermediate``, ``merge`` and ``text_model_type`` override too."""
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        if model_type not in (None, *cls.model_types):
            raise ValueError(f"{cls.family} builds {cls.model_types}, not {model_type!r}")
        real = dict(vision_layers=6, vision_hidden=384, patch_size=14)
        tiny = dict(vision_layers=2, vision_hidden=32, patch_size=4)
        shape = {**lm_shape(size), **(real if size == "real" else tiny), "merge": 2, "vision_intermediate": None,
                 "text_model_type": "mistral", **overrides}
        torch.manual_seed(seed)
        width = shape["vision_hidden"]
        heads = max(1, width // 64) if size == "real" else 4
        vision = dict(model_type="pixtral", hidden_size=width, num_hidden_layers=shape["vision_layers"],
                      intermediate_size=shape["vision_intermediate"] or (4 if size == "real" else 2) * width,
                      num_attention_heads=heads, head_dim=width // heads, patch_size=shape["patch_size"],
                      image_size=1540)
        hidden, lm_heads = shape["lm_hidden"], shape["lm_heads"]
        text = {"model_type": shape["text_model_type"],
                **text_config(shape, head_dim=hidden // lm_heads, sliding_window=None)}
        config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                spatial_merge_size=shape["merge"], vision_feature_layer=-1,
                                tie_word_embeddings=False)
        config._attn_implementation = attn
        model = Mistral3ForConditionalGeneration(config).eval()
        model.generation_config.pad_token_id = 0
        return model

    @classmethod
    def image_tokens(cls, config, size: tuple[int, int]) -> list[int]:
        """The token ids the processor writes for an image of ``size`` (h, w) px: per row of merged
        tokens, its ``[IMG]`` placeholders then ``[IMG_BREAK]``; the last row ends in ``[IMG_END]``."""
        unit = config.vision_config.patch_size * config.spatial_merge_size
        rows, cols = size[0] // unit, size[1] // unit
        tokens = ([config.image_token_id] * cols + [IMAGE_BREAK]) * rows
        tokens[-1] = IMAGE_END
        return tokens

    @classmethod
    def prompts(cls, model, rows: list, kind: str = "image", seed: int = 0, first_row: int = 0) -> dict:
        """Left-padded rows as the Pixtral processor lays them out: a few system tokens, each
        image's placeholders with its [IMG_BREAK] / [IMG_END] markers, a question of ragged length;
        ``pixel_values`` the images zero-padded at the bottom / right to the batch's largest sides,
        ``image_sizes`` their (h, w). Sides must be multiples of ``patch_size * spatial_merge_size``
        (the processor resizes to them)."""
        if kind != "image":
            raise ValueError(f"Mistral 3 takes images only, not {kind!r}")
        config = model.config
        unit = config.vision_config.patch_size * config.spatial_merge_size
        vocab = config.text_config.vocab_size
        sequences, images = [], []
        for i, row in enumerate(rows):
            for size in row:
                if len(size) != 2 or size[0] % unit or size[1] % unit or min(size) < unit:
                    raise ValueError(f"a Mistral 3 image is (h, w) px, both multiples of {unit}; got {size}")
            images += [pixel_tensor((3, *size), seed, first_row + i, j) for j, size in enumerate(row)]
            sequences.append(text_around([cls.image_tokens(config, size) for size in row], first_row + i, seed,
                                         33 if vocab > 1000 else 12, vocab, low=TEXT_LOW))
        inputs = left_pad(sequences)
        if images:
            height, width = max(p.shape[1] for p in images), max(p.shape[2] for p in images)
            inputs["pixel_values"] = torch.stack([torch.nn.functional.pad(p, (0, width - p.shape[2], 0,
                                                                              height - p.shape[1])) for p in images])
            inputs["image_sizes"] = torch.tensor([p.shape[1:] for p in images])
        return inputs

    @classmethod
    def encode(cls, model, inputs: dict) -> None:
        model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
