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

from mmpress.models.base import Adapter, Item, encoded_sources
from mmpress.models.vision import (CONCAT, HEADS, attention_module, cls_signals, concat_layer, encoder_layers,
                                   hook_forms, layer_index, press_layers)
from mmpress.presses.base import Press, VisualContext



class LlavaAdapter(Adapter):
    """Applies presses to a LLaVA model. ``positions``: None (the press's official numbering), "keep"
    or "reindex"."""

    family = "llava"

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
        encoded = self.protocol.encoded_in(kwargs, "image")  # generate() encodes images first
        if not encoded:
            return []
        sources = encoded_sources(encoded) or list(range(len(encoded)))
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return [Item(token, t.shape[0], (1, side, side) if t.shape[0] == side * side else None, s)
                for t, s in zip(encoded, sources)]

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
        needs = set(press.needs)
        if HEADS & needs:
            attn, keys = self._recorded(self._block(self._feature_layer()), "heads")
            ctx.cls_attn, ctx.vision_keys = patches(attn), patches(keys)
            if layers := self._press_layers(press):
                ctx.cls_attn_layers = torch.stack([patches(self._recorded(self._block(i), "heads")[0])
                                                   for i in layers], dim=1)
        if CONCAT & needs:
            attn, keys = self._recorded(self._concat_block(press), "concat")
            ctx.cls_attn_concat, ctx.vision_keys_concat = patches(attn), patches(keys)

    def _recorded(self, block: int, form: str) -> tuple[Tensor, Tensor]:
        if form not in self.vision.get(block, {}):
            raise ValueError("vision signals missing: encode the images inside the `with press(model):` block")
        return self.vision[block][form]

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
