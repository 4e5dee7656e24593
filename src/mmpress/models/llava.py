"""LLaVA adapter (transformers ``LlavaForConditionalGeneration`` / ``LlavaModel``).

Where the visual tokens are: LLaVA writes the projected image features into the input
embeddings at the positions of ``config.image_token_id`` (``masked_scatter``, image after image,
row-major), then calls ``language_model(inputs_embeds=..., attention_mask=..., position_ids=...)``.

How a ``pre_llm`` press is applied, with hooks only (no model source is edited):
1. a forward pre-hook on the LlavaModel records ``input_ids`` and the number of images;
2. if the press needs vision signals, a forward pre-hook on the attention module of the vision
   layer feeding the projector computes the [CLS] attention row and the keys (``models.vision``);
3. a forward pre-hook on the language model takes the image features out of ``inputs_embeds``
   (M images x N tokens), presses them to k per image, and rebuilds ``inputs_embeds``,
   ``attention_mask`` and ``position_ids`` with the dropped tokens removed. Rows of a batch may
   end up with different lengths (different prompts, different numbers of images); they are
   re-padded on the LEFT, never truncated, so the last position is every row's last token.

Position ids (a documented choice): by default kept tokens keep their ORIGINAL position ids
(``positions="keep"``), as FastV / VisionZip / DivPrune do for LLaVA, so RoPE still encodes
where each kept patch and the text after the image sit. ``positions="reindex"`` numbers the
kept sequence 0..L'-1 instead. Either way the choice is carried into decoding: ``generate``
keeps passing the original-length attention mask and original position ids, and the hook maps
them onto the pressed cache (prefill pressed once, decoding unchanged).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mmpress.models.vision import attention_module, cls_attention_and_keys, encoder_layers, layer_index
from mmpress.presses.base import Press, VisualContext

POSITIONS = ("keep", "reindex")


@dataclass
class _Prefill:
    """What decoding needs to know about the pressed prefill."""

    mask: Tensor  # (B, L') attention mask of the pressed prompt
    length: int  # L, the unpressed prompt length (with padding)
    shift: Tensor  # (B,) subtracted from original position ids (0 with positions="keep")


@dataclass
class _State:
    input_ids: Tensor | None = None
    num_images: int = 0
    vision: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # layer -> (attn, keys)
    prefill: _Prefill | None = None


class LlavaAdapter:
    """Applies presses to a LLaVA model. ``positions``: "keep" (default) or "reindex"."""

    family = "llava"

    def __init__(self, model: nn.Module, positions: str = "keep"):
        # after each pressed prefill, ``self.stats`` (also set as ``press.stats``) holds the
        # token counts: images, visual_tokens, kept_visual_tokens, seq_len, pressed_seq_len
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.model = model
        # LlavaForConditionalGeneration wraps a LlavaModel in .model; a bare LlavaModel is accepted too
        self.llava = model.model if hasattr(getattr(model, "model", None), "language_model") else model
        if not hasattr(self.llava, "language_model") or not hasattr(self.llava, "vision_tower"):
            raise ValueError(f"{type(model).__name__} does not look like a transformers LLaVA model")
        self.config = self.llava.config
        self.positions = positions
        self.state = _State()
        self.stats: dict[str, int] = {}

    # ---- hooks ----------------------------------------------------------------------------
    @contextmanager
    def apply(self, press: Press):
        if press.stage != "pre_llm":
            raise ValueError(f"the LLaVA adapter does not support stage {press.stage!r} yet")
        handles = [
            self.llava.register_forward_pre_hook(self._capture_inputs, with_kwargs=True),
            self.llava.language_model.register_forward_pre_hook(
                lambda m, a, kw: self._language_model_hook(press, a, kw), with_kwargs=True
            ),
        ]
        try:
            if {"cls_attn", "vision_keys"} & set(press.needs):
                layers = encoder_layers(self.llava.vision_tower)
                wanted = {self._block(self._feature_layer()), *map(self._block, getattr(press, "layers", None) or ())}
                for block in wanted:
                    attn = attention_module(layers[block])
                    handles.append(attn.register_forward_pre_hook(self._vision_hook(block), with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.state = _State()

    def _feature_layer(self) -> int:
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("presses needing [CLS] attention support a single vision_feature_layer, not a list")
        return layer

    def _capture_inputs(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        # generate() encodes images first and passes them as mm_encoder_outputs
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if pixel_values is not None:
            self.state.num_images = pixel_values.shape[0]
            self.state.vision = {}  # the tower runs inside this call and refills the signals
        else:
            self.state.num_images = 0 if encoded is None else len(encoded.pooler_output)
        if input_ids is None and self.state.num_images:
            raise ValueError("pressing needs input_ids (image tokens are located by image_token_id), not inputs_embeds")
        self.state.input_ids = input_ids

    def _block(self, hs_index: int) -> int:
        """Vision block producing hidden state ``hs_index`` (-2 and its positive twin: one hook)."""
        return layer_index(hs_index, len(encoder_layers(self.llava.vision_tower)))

    def _vision_hook(self, block: int):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self.state.vision[block] = cls_attention_and_keys(module, hidden)

        return hook

    def _language_model_hook(self, press: Press, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        ids, state = self.state.input_ids, self.state
        if embeds is None:
            return None
        has_image_tokens = ids is not None and bool((ids == self.config.image_token_id).any())
        if has_image_tokens and not state.num_images and not past:
            raise ValueError("the prompt holds image tokens but no images were given: pass pixel_values "
                             "(one image per <image> placeholder)")
        if state.num_images and has_image_tokens:
            if past:
                raise ValueError("mmpress presses a fresh prefill; continuing a non-empty cache with new images "
                                 "is not supported yet: run generate on the whole conversation")
            return args, self._press_prefill(press, kwargs, embeds, ids)
        if state.prefill is not None and past:
            return args, self._map_decoding(kwargs, embeds, past)
        state.prefill = None
        return None

    # ---- prefill --------------------------------------------------------------------------
    def _press_prefill(self, press: Press, kwargs: dict, embeds: Tensor, ids: Tensor) -> dict:
        b, length, dim = embeds.shape
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise ValueError("pressing needs a 2-D attention mask (batch, seq); got a 4-D mask")
        valid = torch.ones(b, length, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        pos = kwargs.get("position_ids")
        pos = torch.arange(length, device=embeds.device).expand(b, length) if pos is None else pos.expand(b, -1)

        image = ids == self.config.image_token_id
        per_row = image.sum(dim=1)
        m = self.state.num_images
        if int(per_row.sum()) % m:
            raise ValueError(f"{int(per_row.sum())} image tokens do not split evenly over {m} images")
        n = int(per_row.sum()) // m
        tokens = embeds[image].view(m, n, dim)

        ctx = self._context(press, embeds, image, valid, per_row // n, m, n)
        kept, index = press.press(tokens, ctx)
        k = index.shape[1]
        self.stats = press.stats = {"images": m, "visual_tokens": m * n, "kept_visual_tokens": m * k,
                      "seq_len": length, "pressed_seq_len": length - m * (n - k)}
        if k == n:  # keep-all: leave the call untouched, bit-identical to the unpressed model
            self.state.prefill = None
            return kwargs

        # image token (row, col) in the sequence, image-major, as masked_scatter filled them
        rows, cols = image.nonzero(as_tuple=True)
        rows, cols = rows.view(m, n)[:, :k].reshape(-1), cols.view(m, n).gather(1, index).reshape(-1)
        values = embeds.index_put((rows, cols), kept.reshape(-1, dim).to(embeds.dtype))
        keep = valid & ~image
        keep[rows, cols] = True

        # compact every row, re-pad on the left to the longest pressed row
        lengths = keep.sum(dim=1)
        new_len = int(lengths.max())
        pad = new_len - lengths
        src_r, src_c = keep.nonzero(as_tuple=True)
        dst_c = (keep.cumsum(dim=1) - 1 + pad[:, None])[src_r, src_c]
        new_embeds = embeds.new_zeros(b, new_len, dim)
        new_embeds[src_r, dst_c] = values[src_r, src_c]
        new_mask = torch.zeros(b, new_len, dtype=mask.dtype if mask is not None else torch.long, device=embeds.device)
        new_mask[src_r, dst_c] = 1
        new_pos = torch.zeros(b, new_len, dtype=pos.dtype, device=pos.device)
        if self.positions == "keep":
            new_pos[src_r, dst_c] = pos[src_r, src_c]
            shift = torch.zeros(b, dtype=pos.dtype, device=pos.device)
        else:
            new_pos[src_r, dst_c] = dst_c - pad[src_r]
            last = torch.arange(length, device=valid.device).masked_fill(~valid, -1).argmax(dim=1)
            shift = pos[torch.arange(b), last] - (lengths - 1)

        self.state.prefill = _Prefill(mask=new_mask, length=length, shift=shift)
        self.stats["pressed_seq_len"] = new_len
        return {**kwargs, "inputs_embeds": new_embeds, "attention_mask": new_mask, "position_ids": new_pos}

    def _context(self, press: Press, embeds, image, valid, images_per_row, m: int, n: int) -> VisualContext:
        needs = set(press.needs)
        ctx = VisualContext()
        if "grid" in needs:
            side = self.config.vision_config.image_size // self.config.vision_config.patch_size
            ctx.grid = (side, side) if side * side == n else None
        if {"cls_attn", "vision_keys"} & needs:
            drop_cls = self.config.vision_feature_select_strategy == "default"

            def patches(t: Tensor) -> Tensor:  # drop [CLS] when the LM does not see it
                t = t[:, 1:] if drop_cls else t
                if t.shape[0] != m or t.shape[1] != n:
                    raise ValueError(f"vision signal covers {tuple(t.shape[:2])} tokens, the LM sees ({m}, {n})")
                return t

            feature_block = self._block(self._feature_layer())
            if feature_block not in self.state.vision:
                raise ValueError("vision signals missing: encode the images inside the `with press(model):` block")
            attn, keys = self.state.vision[feature_block]
            ctx.cls_attn, ctx.vision_keys = patches(attn), patches(keys)
            if getattr(press, "layers", None):
                ctx.cls_attn_layers = torch.stack([patches(self.state.vision[self._block(i)][0]) for i in press.layers], dim=1)
        if "text" in needs:
            text = valid & ~image
            t = int(text.sum(dim=1).max())
            slot = text.cumsum(dim=1) - 1
            r, c = text.nonzero(as_tuple=True)
            padded = embeds.new_zeros(embeds.shape[0], t, embeds.shape[-1])
            padded[r, slot[r, c]] = embeds[r, c]
            text_mask = torch.arange(t, device=embeds.device) < text.sum(dim=1, keepdim=True)
            owner = torch.repeat_interleave(torch.arange(embeds.shape[0], device=embeds.device), images_per_row)
            ctx.text, ctx.text_mask = padded[owner], text_mask[owner]
        return ctx

    # ---- decoding -------------------------------------------------------------------------
    def _map_decoding(self, kwargs: dict, embeds: Tensor, past: int) -> dict:
        """Map generate's original-length mask / position ids onto the pressed cache."""
        pre = self.state.prefill
        b, q = embeds.shape[:2]
        new_len = pre.mask.shape[1]
        grown = past + q - new_len  # tokens appended since the prefill, this step's included
        mask = kwargs.get("attention_mask")
        if mask is None:
            tail = pre.mask.new_ones(b, grown)
        else:
            if mask.ndim != 2 or mask.shape[1] != pre.length + grown:
                raise ValueError(f"decoding attention mask has {mask.shape[-1]} columns, expected "
                                 f"{pre.length + grown} (prompt {pre.length} + {grown} new tokens)")
            tail = mask[:, pre.length:].to(pre.mask.dtype)
        pos = kwargs.get("position_ids")
        if pos is None:  # what the unpressed model would use: cache length + offset
            pos = (past + pre.length - new_len + torch.arange(q, device=embeds.device)).expand(b, q)
        pos = pos.expand(b, -1) - pre.shift[:, None]
        return {**kwargs, "attention_mask": torch.cat([pre.mask, tail], dim=1), "position_ids": pos}
