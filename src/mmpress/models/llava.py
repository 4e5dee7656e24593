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

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mmpress.models.protocol import CACHE_NAMES, cache_length, protocol
from mmpress.models.vision import attention_module, cls_attention_and_keys, encoder_layers, layer_index
from mmpress.ops.sequence import compact_index, flat_positions, gather_rows
from mmpress.presses.base import Press, VisualContext

POSITIONS = ("keep", "reindex")
CONTINUE = ("A pressed cache holds fewer entries than the tokens it stands for, so generate(past_key_values=...) "
            "on the whole conversation would feed the wrong tokens. Run generate on the whole conversation under "
            "the press without past_key_values, or feed only the new turn's tokens: "
            "model(input_ids=new_ids, attention_mask=full_mask, past_key_values=cache)")
_PRESSED_MODELS: weakref.WeakSet = weakref.WeakSet()  # models a press is applied to right now


@dataclass
class _Prefill:
    """What decoding needs to know about a pressed prefill (one per pressed KV cache)."""

    mask: Tensor  # (B, L') attention mask of the pressed prompt
    length: int  # L, the unpressed prompt length (with padding)
    shift: Tensor  # (B,) subtracted from original position ids (0 with positions="keep")


@dataclass
class _State:
    input_ids: Tensor | None = None
    num_images: int = 0
    tokens_per_image: int = 0
    images_per_row: list[int] | None = None  # host integers, read once per pressed prefill
    sources: list[int] | None = None  # encoded image each LM image repeats (beam search expands them)
    vision: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # layer -> (attn, keys)
    pending: _Prefill | None = None  # a pressed prefill whose KV cache the language model returns


def _encoded_sources(encoded: list[Tensor]) -> list[int] | None:
    """Which encoded image each of ``encoded`` is. ``generate`` encodes the images once, then
    repeats the per-image feature views for beams and ``num_return_sequences``; the views of one
    projector output share a storage, so an image's index is its offset in that storage."""
    storage = encoded[0].untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() != storage or not t.is_contiguous() for t in encoded):
        return None
    step = encoded[0].numel() * encoded[0].element_size()
    return [(t.data_ptr() - storage) // step for t in encoded]


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
        self.protocol = protocol(self.llava, self.llava.language_model)
        self.positions = positions
        self.state = _State()
        self.pressed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KV cache -> _Prefill
        self.stats: dict[str, int] = {}

    # ---- hooks ----------------------------------------------------------------------------
    @contextmanager
    def apply(self, press: Press):
        if press.stage != "pre_llm":
            raise ValueError(f"the LLaVA adapter does not support stage {press.stage!r} yet")
        if self.llava in _PRESSED_MODELS:
            raise ValueError("a press is already applied to this model: presses do not nest (the second would "
                             "see the first's tokens or none); exit the first `with press(model):` block first")
        handles = [
            self.llava.register_forward_pre_hook(self._capture_inputs, with_kwargs=True),
            self.llava.language_model.register_forward_pre_hook(
                lambda m, a, kw: self._language_model_hook(press, a, kw), with_kwargs=True
            ),
            self.llava.language_model.register_forward_hook(self._capture_cache),
        ]
        _PRESSED_MODELS.add(self.llava)
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
            _PRESSED_MODELS.discard(self.llava)
            self.state = _State()

    def _feature_layer(self) -> int:
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("presses needing [CLS] attention support a single vision_feature_layer, not a list")
        return layer

    def _capture_inputs(self, module, args, kwargs):
        """Records the prompt and checks it against the images, before any GPU work of this
        forward is queued: the one host read of a pressed prefill (the per-row image-token
        counts) then finds the GPU idle, and the rest of the pressed forward never syncs."""
        state = self.state
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        encoded = self.protocol.images_in(kwargs)  # generate() may encode images first
        if pixel_values is not None:
            state.num_images, state.tokens_per_image = pixel_values.shape[0], self._tokens_per_image(pixel_values)
            state.vision = {}  # the tower runs inside this call and refills the signals
        else:
            state.num_images = 0 if encoded is None else len(encoded)
            state.tokens_per_image = encoded[0].shape[0] if encoded else 0
        state.sources = _encoded_sources(encoded) if pixel_values is None and encoded else None
        state.input_ids, state.images_per_row = input_ids, None
        cache = self.protocol.cache_of(kwargs)
        if cache_length(cache):  # decoding or a later turn: no images expected
            if cache in self.pressed and self.protocol.starts_generate(kwargs):
                raise ValueError(f"generate() was called on a pressed KV cache. {CONTINUE}")
            if state.num_images:
                raise ValueError("mmpress presses images in a fresh prefill; this call continues a non-empty KV "
                                 "cache with images: run generate on the whole conversation without "
                                 "past_key_values (the press then presses every image), or pass only new text")
            return
        if input_ids is None:
            if state.num_images:
                raise ValueError("pressing needs input_ids (image tokens are located by image_token_id), "
                                 "not inputs_embeds")
            return
        m, n = state.num_images, state.tokens_per_image
        counts = (input_ids == self.config.image_token_id).sum(dim=1).tolist()
        if not m:
            if any(counts):  # transformers would embed the placeholders as text, silently
                raise ValueError("the prompt holds image tokens but no images were given: pass pixel_values "
                                 "(one image per <image> placeholder)")
            return
        if sum(counts) != m * n or any(c % n for c in counts):
            raise ValueError(f"{m} images of {n} tokens were given, but the prompt rows hold {counts} image tokens: "
                             f"pass one image per <image> placeholder (the processor expands each to {n} tokens)")
        state.images_per_row = [c // n for c in counts]

    def _tokens_per_image(self, pixel_values: Tensor) -> int:
        """Visual tokens the projector gives per image: one per patch (+ [CLS] with strategy "full")."""
        patch = self.config.vision_config.patch_size
        h, w = pixel_values.shape[-2:]
        return (h // patch) * (w // patch) + (self.config.vision_feature_select_strategy == "full")

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
        if embeds is None:
            return None
        cache = self.protocol.cache_of(kwargs)
        past, ids, state = cache_length(cache), self.state.input_ids, self.state
        if past:  # decoding, or a later turn appended to a cache
            pre = self.pressed.get(cache)
            return None if pre is None else (args, self._map_decoding(pre, kwargs, embeds, past))
        if not state.images_per_row:
            return None
        kwargs, self.state.pending = self._press_prefill(press, kwargs, embeds, ids)
        return args, kwargs

    def _capture_cache(self, module, args, output):
        """Remembers which KV cache holds a pressed prefill, so that decoding steps and later
        turns on that cache (and only those) are mapped onto it."""
        pre, self.state.pending = self.state.pending, None
        cache = next((c for c in (getattr(output, name, None) for name in CACHE_NAMES) if c is not None), None)
        if pre is not None and cache is not None:
            self.pressed[cache] = pre

    # ---- prefill --------------------------------------------------------------------------
    def _press_prefill(self, press: Press, kwargs: dict, embeds: Tensor, ids: Tensor) -> tuple[dict, _Prefill | None]:
        """Presses every image of the batch and compacts the rows, without host syncs: the
        pressed width follows from the per-row image counts read in ``_capture_inputs``."""
        b, length, dim = embeds.shape
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise ValueError("pressing needs a 2-D attention mask (batch, seq); got a 4-D mask")
        valid = torch.ones(b, length, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        pos = kwargs.get("position_ids")
        pos = torch.arange(length, device=embeds.device).expand(b, length) if pos is None else pos.expand(b, -1)

        m, n = self.state.num_images, self.state.tokens_per_image
        image = ids == self.config.image_token_id
        # transformers checked the prompt holds m * n image tokens when it scattered the features
        flat = flat_positions(image, m * n).view(m, n)  # image-major, as masked_scatter filled them
        tokens = embeds.view(b * length, dim)[flat]
        owner = flat[:, 0] // length  # (M,) the row holding each image
        fewest = min(self.state.images_per_row)  # the row losing fewest tokens sets the width
        ctx = self._context(press, embeds, image, valid, owner, length - n * fewest, m, n)
        kept, index = press.press(tokens, ctx)
        k = index.shape[1]
        self.stats = press.stats = {"images": m, "visual_tokens": m * n, "kept_visual_tokens": m * k,
                                    "seq_len": length, "pressed_seq_len": length}
        if k == n:  # keep-all: leave the call untouched, bit-identical to the unpressed model
            return kwargs, None

        kept_flat = flat.gather(1, index).view(-1)
        values = embeds.reshape(b * length, dim).index_copy(0, kept_flat, kept.reshape(-1, dim).to(embeds.dtype))
        keep = (valid & ~image).view(-1).index_fill(0, kept_flat, True).view(b, length)
        width = length - (n - k) * fewest
        src, new_mask = compact_index(keep, width)
        new_embeds = gather_rows(values.view(b, length, dim), src)
        lengths = keep.sum(dim=1)
        if self.positions == "keep":
            new_pos = gather_rows(pos, src)
            shift = torch.zeros(b, dtype=pos.dtype, device=pos.device)
        else:
            new_pos = torch.arange(width, device=pos.device) - (width - lengths)[:, None]
            last = torch.arange(length, device=valid.device).masked_fill(~valid, -1).argmax(dim=1)
            shift = pos.gather(1, last[:, None])[:, 0] - (lengths - 1)
        new_pos = new_pos.masked_fill(~new_mask, 1)  # padding: what generate gives pad slots
        new_mask = new_mask.to(mask.dtype if mask is not None else torch.long)
        self.stats["pressed_seq_len"] = width
        pre = _Prefill(mask=new_mask, length=length, shift=shift)
        return {**kwargs, "inputs_embeds": new_embeds, "attention_mask": new_mask, "position_ids": new_pos}, pre

    def _context(self, press: Press, embeds, image, valid, owner, text_width: int, m: int, n: int) -> VisualContext:
        needs = set(press.needs)
        ctx = VisualContext()
        if "grid" in needs:
            side = self.config.vision_config.image_size // self.config.vision_config.patch_size
            ctx.grid = (side, side) if side * side == n else None
        if {"cls_attn", "vision_keys"} & needs:
            drop_cls = self.config.vision_feature_select_strategy == "default"

            def patches(t: Tensor) -> Tensor:  # drop [CLS] when the LM does not see it
                t = t[:, 1:] if drop_cls else t
                sources = self.state.sources
                if t.shape[0] != m and sources is not None and len(sources) == m and max(sources) < t.shape[0]:
                    t = t[sources]  # generate encoded each image once, then repeated it per beam / sequence
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
            src, text_mask = compact_index(valid & ~image, text_width)
            ctx.text, ctx.text_mask = gather_rows(embeds, src)[owner], text_mask[owner]
        return ctx

    # ---- decoding -------------------------------------------------------------------------
    def _map_decoding(self, pre: _Prefill, kwargs: dict, embeds: Tensor, past: int) -> dict:
        """Map the original-length mask / position ids of a call continuing a pressed cache
        (generate's decoding steps, or new tokens of a later turn) onto that cache."""
        b, q = embeds.shape[:2]
        new_len = pre.mask.shape[1]
        grown = past + q - new_len  # tokens appended since the prefill, this step's included
        mask = kwargs.get("attention_mask")
        if mask is None:
            tail = pre.mask.new_ones(b, grown)
        else:
            if mask.ndim != 2 or mask.shape[1] != pre.length + grown:
                raise ValueError(
                    f"this call continues a pressed KV cache ({past} entries standing for a {pre.length}-token "
                    f"prompt + {past - new_len} later tokens) with an attention mask of {mask.shape[-1]} columns, "
                    f"expected {pre.length + grown}. {CONTINUE}")
            tail = mask[:, pre.length:].to(pre.mask.dtype)
        pos = kwargs.get("position_ids")
        if pos is None:  # what the unpressed model would use: cache length + offset
            pos = (past + pre.length - new_len + torch.arange(q, device=embeds.device)).expand(b, q)
        pos = pos.expand(b, -1) - pre.shift[:, None]
        return {**kwargs, "attention_mask": torch.cat([pre.mask, tail], dim=1), "position_ids": pos}
