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
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmpress.models.examples import left_pad, lm_shape, pixel_tensor, qwen2_text, text_around

from mmpress.flops import PrefillFlops, language_flops, transformer_flops
from mmpress.models.base import LLM_SIGNALS, VISION_SIGNALS, Adapter, Item, family
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
