"""LLaVA family (transformers ``LlavaForConditionalGeneration`` / ``LlavaModel``): where its
visual tokens are and which signals its vision tower gives. The pressing itself is the shared
core (``models/base.py``).

Where the visual tokens are: LLaVA writes each image's projected features (one per patch, +
[CLS] with strategy "full") into the input embeddings at the positions of
``config.image_token_id``, image after image, then calls the language model; positions are 1-D.

Signals: [CLS] attention and keys of the vision layer feeding the projector (and of the layers a
press lists in ``layers``), from a forward pre-hook on that layer's attention module
(``models.vision``), so the tower keeps running with SDPA; per head, averaged over heads
(``cls_attn``, ``vision_keys``), or from the heads-concatenated q / k at the press's one listed
layer (``cls_attn_concat``, ``vision_keys_concat``: official PruMerge's); ``vision_features``, what the projector
receives (the feature layer's hidden states, [CLS] dropped with the "default" strategy), from a
forward pre-hook on the projector.

In the vision tower (``vision_hooks``, in-vision presses): "merge" (``tome_vit``) runs ToMe in the
tower's blocks (``models/towers.py``); "resize" (``downsample``) shrinks the pixels and runs the
tower with interpolated position embeddings. LLaVA reads ``hidden_states[vision_feature_layer]``
(the [CLS] row dropped with strategy "default") and projects it: the projector's k rows per image
are sorted by the position they stand for and scattered over the image's N placeholders, so the
core can drop the others before the language model.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from mmpress.models.examples import left_pad, lm_shape, pixel_tensor, qwen2_text, text_around

from mmpress.flops import PrefillFlops, language_flops, transformer_flops
from mmpress.models.base import LLM_SIGNALS, VISION_SIGNALS, Adapter, Item, family
from mmpress.models.stages import Selected
from mmpress.models.towers import TowerState, install, map_signals
from mmpress.models.vision import (fill_cls_signals, attention_module, cls_signals, concat_layer, encoder_layers,
                                   hook_forms, layer_index, press_layers)
from mmpress.presses.base import Press, VisualContext


IMAGE_TOKEN = 3  # the placeholder id of the random models below


@family
class LlavaAdapter(Adapter):
    """Applies presses to a LLaVA model. ``positions``: None (the press's official numbering), "keep"
    or "reindex"."""

    family = "llava"
    model_types = ("llava",)
    classes = ("LlavaForConditionalGeneration",)
    signals = VISION_SIGNALS | LLM_SIGNALS
    notes = ("cls_attn = [CLS] row of the attention in the vision_feature_layer block; vision_keys = its keys; "
             "*_concat: the same from one softmax over the heads-concatenated q / k")
    example_rows = {"single": [[(32, 32)]], "ragged": [[(32, 32)], [(32, 32), (32, 32)], [(32, 32)]]}
    bench_media = {"image": (336, 336)}
    vision_modes = frozenset({"merge", "resize"})

    def __init__(self, model, positions: str | None = None):
        super().__init__(model, positions)
        if not hasattr(self.vlm, "vision_tower"):
            raise ValueError(f"{type(model).__name__} does not look like a transformers LLaVA model")
        self.token_ids = (self.config.image_token_id,)
        # vision block -> {"heads" / "concat": ([CLS] attention, keys)}
        self.vision: dict[int, dict[str, tuple[Tensor, Tensor]]] = {}
        self.features: Tensor | None = None  # the projector's input of the last tower call

    def visual_items(self, args, kwargs) -> list[Item]:
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        token = self.config.image_token_id
        if pixel_values is not None:
            self.vision, self.features = {}, None  # the tower runs inside this call and refills the signals
            patch = self.config.vision_config.patch_size
            h, w = (s // patch for s in pixel_values.shape[-2:])
            n = h * w + (self.config.vision_feature_select_strategy == "full")
            grid = (1, h, w) if n == h * w else None
            return [Item(token, n, grid, i) for i in range(pixel_values.shape[0])]
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return self.encoded_items(kwargs, "image", token, lambda t, s: {  # generate() encodes images first
            "length": t.shape[0], "grid": (1, side, side) if t.shape[0] == side * side else None})

    # ---- [CLS] signals ------------------------------------------------------------------------
    def signal_hooks(self, press: Press) -> list:
        handles = []
        if "vision_features" in press.needs:
            handles.append(self.vlm.multi_modal_projector.register_forward_pre_hook(self._projector_hook))
        needs = set(press.needs)
        layers = encoder_layers(self.vlm.vision_tower)
        forms = hook_forms(needs, lambda: {self._block(i) for i in (self._feature_layer(), *self._press_layers(press))},
                           lambda: self._concat_block(press))
        return handles + [attention_module(layers[block]).register_forward_pre_hook(self._vision_hook(block, form),
                                                                                    with_kwargs=True)
                          for block, form in forms.items()]

    def fill_signals(self, press: Press, ctx: VisualContext, items: list[Item]) -> None:
        drop_cls = self.config.vision_feature_select_strategy == "default"
        sources, n = [item.source for item in items], items[0].length

        def patches(t: Tensor, with_cls: bool = True) -> Tensor:  # drop [CLS] when the LM does not see it
            t = t[:, 1:] if drop_cls and with_cls else t
            if max(sources) >= t.shape[0] or t.shape[1] != n:
                raise ValueError(f"vision signal covers {tuple(t.shape[:2])} tokens, the LM sees "
                                 f"({len(items)}, {n})")
            if sources == list(range(t.shape[0])):
                return t  # the common case: no index tensor to copy to the device
            return t[sources]  # generate encodes each image once, then repeats it per beam / sequence

        ctx.cls_first = not drop_cls  # "full": the LM sees [CLS] as each image's token 0
        if "vision_features" in press.needs:
            if self.features is None:
                raise ValueError("vision signals missing: encode the images inside the `with press(model):` block")
            ctx.vision_features = patches(self.features, with_cls=False)  # the projector's input: [CLS] already gone
        fill_cls_signals(ctx, set(press.needs), self.vision, patches,
                         lambda: (self._block(self._feature_layer()), [self._block(i) for i in self._press_layers(press)]),
                         lambda: self._concat_block(press))

    def _concat_block(self, press: Press) -> int:
        depth = len(encoder_layers(self.vlm.vision_tower))
        return self._block(concat_layer(press, self._feature_layer(), depth))

    def _feature_layer(self) -> int:
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("presses needing [CLS] attention support a single vision_feature_layer, not a list")
        return layer

    def _press_layers(self, press: Press) -> tuple[int, ...]:
        return press_layers(press, len(encoder_layers(self.vlm.vision_tower)))

    def _block(self, hs_index: int) -> int:
        """Vision block producing hidden state ``hs_index`` (-2 and its positive twin: one hook)."""
        return layer_index(hs_index, len(encoder_layers(self.vlm.vision_tower)))

    def _projector_hook(self, module, args):
        self.features = args[0]

    def _vision_hook(self, block: int, forms: set[str]):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self.vision[block] = cls_signals(module, hidden, heads="heads" in forms, concat="concat" in forms)

        return hook

    # ---- in-vision presses: ToMe in the tower's blocks, downsampling ---------------------------
    def vision_hooks(self, press: Press, stage) -> list:
        if self.family != "llava":
            raise ValueError(f"{type(press).__name__} runs in LLaVA-1.5's single-crop tower; {self.family}'s AnyRes "
                             "crops are not supported: pick a pre_llm press")
        tower = self.vlm.vision_tower
        hooks = [tower.register_forward_pre_hook(self._resize_pixels(press, stage) if press.mode == "resize"
                                                 else lambda module, args, kwargs: stage.new_call(), with_kwargs=True)]
        if press.mode == "resize":
            return hooks + [self.vlm.multi_modal_projector.register_forward_hook(self._scatter_resized(stage))]
        if press.mode != "merge":
            raise ValueError(f"the LLaVA tower runs in-vision presses that merge or resize, not {press.mode!r}")
        layers = encoder_layers(tower)
        cls = self._has_cls(tower)
        if not cls and self.config.vision_feature_select_strategy == "default":
            raise ValueError("this LLaVA tower has no [CLS] token, and strategy 'default' drops token 0, which "
                             "merging would move: use vision_feature_select_strategy='full' or a pre_llm press")
        thresholds = press.thresholds(len(layers))
        later = self.stages.get("pre_llm")
        if thresholds is not None and later is not None and set(later.needs) - {"grid", "text"}:
            raise ValueError("tome_vit with a DyMU threshold leaves each image a different number of tokens: a "
                             f"press composed after it cannot read the tower's signals ({type(later).__name__} "
                             "needs them); pick one that reads only the tokens (e.g. divprune)")
        state = TowerState(press.schedule(len(layers)), protected=int(cls), prop_attn=press.prop_attn,
                           threshold=thresholds)
        merging = press.merges(len(layers))
        try:
            hooks += install(layers, state) if merging else []
            projector = self.vlm.multi_modal_projector
            hooks += [projector.register_forward_pre_hook(self._sort_merged(state, merging)),
                      projector.register_forward_hook(self._scatter_merged(stage, state, merging))]
        except Exception:
            for hook in hooks:
                hook.remove()
            raise
        return hooks

    @staticmethod
    def _has_cls(tower) -> bool:
        """CLIP (``class_embedding``) and DINOv2 (``cls_token``) towers lead with [CLS]; SigLIP does not."""
        embeddings = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
        return any(hasattr(embeddings, name) for name in ("class_embedding", "cls_token"))

    def _placeholders(self, index: Tensor) -> Tensor:
        """Tower token indices -> placeholder indices (strategy "default": [CLS], token 0, is dropped)."""
        return index[:, 1:] - 1 if self.config.vision_feature_select_strategy == "default" else index

    def _sort_merged(self, state: TowerState, merging: bool):
        """Projector pre-hook: the feature layer's merged tokens, in the tower's (official) order,
        sorted by the position they stand for; the [CLS] signals a composed press reads, recorded
        at that block's attention input, mapped through its merge and sorted the same way."""
        if not merging:
            return lambda module, args: None
        block = self._block(self._feature_layer())

        def hook(module, args):
            index = state.after[block]  # (M, N') tower order, [CLS] first
            order = index.argsort(dim=1)
            for b, forms in self.vision.items():
                if b != block:  # another block's tokens are not the feature layer's merged ones
                    raise ValueError("tome_vit changes the tokens from block to block: a press composed after it may "
                                     "read [CLS] signals of the feature layer only, not of other vision layers")
                if b == block:
                    match, size = state.matchings.get(block, (None, None))
                    for form, (scores, keys) in forms.items():
                        scores, keys = map_signals(match, size, scores, keys)
                        forms[form] = (scores.gather(1, order), keys.gather(1, order[..., None].expand_as(keys)))
            features = args[0]
            feature_order = self._placeholders(index).argsort(dim=1)
            sorted_features = features.gather(1, feature_order[..., None].expand_as(features))
            return (sorted_features, *args[1:])

        return hook

    def _scatter_merged(self, stage, state: TowerState, merging: bool):
        """Projector forward hook: each image's k rows (sorted) over its N placeholders, recorded
        (DyMU: each image its own k; its padding rows, sorted last, are dropped)."""
        block = self._block(self._feature_layer()) if merging else None

        def hook(module, args, out):
            m, k, d = out.shape
            if block is None:  # r = 0: the tower ran untouched; every placeholder is kept
                index = torch.arange(k, device=out.device).expand(m, k)
                n, blocks = k, [m * (k + (self.config.vision_feature_select_strategy == "default"))] \
                    * len(encoder_layers(self.vlm.vision_tower))
            else:
                index = self._placeholders(state.after[block]).sort(dim=1).values
                n = state.entering[0] - (self.config.vision_feature_select_strategy == "default")
                blocks = [m * t for t in state.entering]
            counts = (index < n).sum(dim=1).tolist() if state.valid is not None else [index.shape[1]] * m
            for source in range(m):
                stage.record("image", source, Selected(index[source, : counts[source]]))
            stage.count_blocks("image", blocks)
            if block is None:
                return None
            full = out.new_zeros(m, n + 1, d)  # DyMU's padding rows go to the spare last row, then cut
            return full.scatter(1, index.clamp(max=n)[..., None].expand(-1, -1, d), out)[:, :n]

        return hook

    def _resize_pixels(self, press, stage):
        """Tower pre-hook ("resize"): the pixels resized to the press's patch grid (``grid_for``),
        the position embeddings interpolated (CLIP / SigLIP: ``interpolate_pos_encoding=True``;
        DINOv2 always interpolates)."""
        patch = self.config.vision_config.patch_size
        tower = self.vlm.vision_tower
        takes_flag = "interpolate_pos_encoding" in inspect.signature(tower.forward).parameters

        def hook(module, args, kwargs):
            stage.new_call()
            pixels = kwargs.get("pixel_values", args[0] if args else None)
            h, w = (s // patch for s in pixels.shape[-2:])
            h2, w2 = press.grid_for(h, w)
            self._resized = (h, w, h2, w2, len(encoder_layers(tower)))
            if (h2, w2) == (h, w):
                return None
            small = press.resize(pixels, (h2 * patch, w2 * patch))
            if "pixel_values" in kwargs:
                kwargs = {**kwargs, "pixel_values": small}
            else:
                args = (small, *args[1:])
            if takes_flag:
                kwargs = {**kwargs, "interpolate_pos_encoding": True}
            return args, kwargs

        return hook

    def _scatter_resized(self, stage):
        """Projector forward hook ("resize"): each new token takes the place of the original patch
        at its centre (raster order is kept, so the indices ascend); scattered over the N placeholders."""
        full_strategy = self.config.vision_feature_select_strategy == "full"

        def hook(module, args, out):
            h, w, h2, w2, depth = self._resized
            m, k, d = out.shape
            rows = ((2 * torch.arange(h2) + 1) * h) // (2 * h2)
            cols = ((2 * torch.arange(w2) + 1) * w) // (2 * w2)
            index = (rows[:, None] * w + cols[None, :]).reshape(-1).to(out.device)
            if full_strategy:  # [CLS] is token 0 of both
                index = torch.cat([index.new_zeros(1), index + 1])
            grid = None if full_strategy else (1, h2, w2)
            for source in range(m):
                stage.record("image", source, Selected(index, grid))
            stage.count_blocks("image", [m * (h2 * w2 + self._has_cls(self.vlm.vision_tower))] * depth)
            if (h2, w2) == (h, w):
                return None
            full = out.new_zeros(m, h * w + full_strategy, d)
            return full.index_copy(1, index, out)

        return hook

    # ---- cost and shapes ------------------------------------------------------------------------
    @classmethod
    def prefill_flops(cls, config, inputs: dict, seq_len: int, layer_seq_len=None) -> PrefillFlops:
        """Tower over every image ([CLS] + patches), the 2-layer MLP projector over the tokens the
        LM sees, and ``batch`` rows of ``seq_len`` LM tokens."""
        vision_cfg, text_cfg = config.vision_config, config.text_config
        batch = inputs["input_ids"].shape[0]
        images = inputs["pixel_values"].shape[0] if inputs.get("pixel_values") is not None else 0
        patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
        vision = transformer_flops(vision_cfg, patches + 1, batch=images)
        n_visual = patches if config.vision_feature_select_strategy == "default" else patches + 1
        projector = 2.0 * images * n_visual * (vision_cfg.hidden_size * text_cfg.hidden_size + text_cfg.hidden_size**2)
        return PrefillFlops(vision, projector, language_flops(text_cfg, seq_len, batch, layer_seq_len))

    @classmethod
    def build(cls, size: str = "tiny", seed: int = 0, attn: str = "sdpa", model_type: str | None = None,
              **overrides):
        """"real": LLaVA-1.5 scaled for a CPU as the peer baseline (shared/MEASURED.md): a CLIP tower
        of 6 x 384 at 336 px (576 patches), a Qwen2 LM of 12 x 896. "tiny": 32 px, 64 tokens."""
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

        real = dict(vision_layers=6, vision_hidden=384, image_size=336, patch_size=14)
        tiny = dict(vision_layers=3, vision_hidden=32, image_size=32, patch_size=4)
        shape = {**lm_shape(size), **(real if size == "real" else tiny), **overrides}
        torch.manual_seed(seed)
        hidden = shape["vision_hidden"]
        vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden if size == "real" else 2 * hidden,
                                  num_hidden_layers=shape["vision_layers"], num_attention_heads=max(1, hidden // 64)
                                  if size == "real" else 4, image_size=shape["image_size"], patch_size=shape["patch_size"])
        config = LlavaConfig(vision_config=vision, text_config=qwen2_text(shape), image_token_id=IMAGE_TOKEN,
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
        config._attn_implementation = attn
        model = LlavaForConditionalGeneration(config).eval()
        model.generation_config.pad_token_id = 0
        return model

    @classmethod
    def prompts(cls, model, rows: list, kind: str = "image", seed: int = 0, first_row: int = 0) -> dict:
        """Left-padded rows: a few system tokens, the row's images, a question of ragged length."""
        if kind != "image":
            raise ValueError("LLaVA takes images only")
        cfg = model.config.vision_config
        n = (cfg.image_size // cfg.patch_size) ** 2
        for row in rows:
            if any(tuple(size) != (cfg.image_size, cfg.image_size) for size in row):
                raise ValueError(f"LLaVA resizes every image to {cfg.image_size} px: got sizes {row}")
        vocab = model.config.text_config.vocab_size
        text = 33 if vocab > 1000 else 12
        sequences = [text_around([[IMAGE_TOKEN] * n for _ in row], first_row + i, seed, text, vocab)
                     for i, row in enumerate(rows)]
        pixels = [pixel_tensor((3, cfg.image_size, cfg.image_size), seed, first_row + i, j)
                  for i, row in enumerate(rows) for j in range(len(row))]
        return {**left_pad(sequences), "pixel_values": torch.stack(pixels)}

    @classmethod
    def encode(cls, model, inputs: dict) -> None:
        config = model.config
        model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=config.vision_feature_layer,
                                 vision_feature_select_strategy=config.vision_feature_select_strategy)
