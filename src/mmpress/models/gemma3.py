"""Gemma 3 family (transformers ``Gemma3ForConditionalGeneration``): where its visual tokens are,
which signals its SigLIP tower gives, and how its attention masks stay right after pressing.

Where the visual tokens are: each image (or pan-and-scan crop: one ``pixel_values`` entry each) is
resized to the tower's ``image_size`` (896 px released), cut into (896 / 14)^2 = 64 x 64 SigLIP
patches, and the projector average-pools each k x k window (k = 4 released) into
``mm_tokens_per_image`` = 256 tokens (a 16 x 16 raster), written at ``image_token_id``
placeholders between the text markers ``\\n\\n<start_of_image>`` and ``<end_of_image>\\n\\n``,
which are text and stay. Positions are 1-D RoPE, so both "keep" and "reindex" apply.

Masks (the family-specific part): an image's tokens attend to each other bidirectionally.
``Gemma3Model.forward`` builds, before calling its language model, one mask per layer type from
the 2-D mask and ``token_type_ids`` (1 at image tokens): full-attention layers
OR(causal, same image block), sliding-window layers AND(window, OR(causal, same block)); the
language model then receives that dict. A pressed call changes the sequence after the masks are
built, so while a press is applied the model is handed a stand-in dict (the VLM then skips
building them), the core sees the 2-D mask as for every family, and a hook after the core's
builds the dict with Gemma 3's own functions (``create_masks_for_vision_model`` /
``create_masks_for_generate``) from what the language model runs on: the pressed 2-D mask and
position ids, and ``token_type_ids`` cut to the kept columns, so kept image tokens still attend
bidirectionally among themselves (and dropped ones are gone from every block). An unpressed call
(keep-all included) gets the same functions on the same arguments: bit-identical masks. A
decoding step on a pressed cache gets the core's mapped 2-D mask (the cache is shorter) and no
``token_type_ids`` (generate passes none after the prefill), as the unpressed model would
continue a prompt that held only the kept tokens. The sliding window then counts the kept
sequence, as for a prompt without the dropped tokens.

Signals: the SigLIP tower has no [CLS], so ``cls_attn`` is the attention each patch RECEIVES in
the last encoder block (the one feeding the projector: ``last_hidden_state`` after the
post-layernorm), averaged over the image's queries and the heads,
``score_j = mean_{h, i} softmax_j(q_i . k_j * scale)`` (HiPrune's no-[CLS] saliency, arXiv
2508.00553, as ``qwen_vl.py`` computes it: ``models.vision.received_attention``, no attention map
materialised, the tower keeps SDPA), then averaged over each k x k pooling window, the window the
projector averages into that token. ``vision_keys``: that block's keys averaged over heads and the
window. ``*_concat``: the same from one softmax over the heads-concatenated q / k scaled by
C^-1/2 (official PruMerge's form) and the full-width keys. ``layers`` of a press name further
blocks, scored the same way. ``vision_features``: the pooled tower output each token is projected
from (the input of the projector's ``mm_soft_emb_norm``).

In-LLM and KV presses: the language model is Gemma 3's (q / k RMS-norms, ``query_pre_attn_scalar``
scaling, both read by ``models.lm.queries_keys``), each layer getting the rotary embedding of its
type (local base 10k on sliding layers, global 1M on full ones) from the model loop, which the
stages read per layer. Not supported, with a ValueError: renumbering positions inside the
language model (``positions='reindex'`` of an in-LLM press: one ``rotary_emb`` serves both layer
types by a ``layer_type`` argument the core's stages do not pass), KV presses (the sliding layers'
cache is a ``DynamicSlidingWindowLayer``, which the core's KV stage does not compact), attention
logit soft-capping (Gemma 2's; Gemma 3 has none), and an in-LLM pressed cache growing past the
sliding window (the sliding layers then drop entries the cut mask still indexes).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor
from transformers import masking_utils

from mmpress.flops import PrefillFlops, language_flops, transformer_flops
from mmpress.models.base import LLM_SIGNALS, VISION_SIGNALS, Adapter, Item, family
from mmpress.models.examples import left_pad, lm_shape, pixel_tensor, text_around
from mmpress.models.protocol import cache_length
from mmpress.models.vision import (CONCAT, HEADS, fill_cls_signals, attention_module, concat_layer, encoder_layers, hook_forms,
                                   layer_index, press_layers, received_attention)
from mmpress.ops.sequence import gather_rows
from mmpress.presses.base import Press, VisualContext

# token ids of the random models below (the released tokenizer's are 262144, 255999, 256000, 108)
IMAGE_TOKEN, BOI, EOI, NEWLINES = 3, 4, 5, 6
BOS = 2


class _Deferred(dict):
    """Stands for Gemma 3's per-layer-type mask dict while a press is applied: ``Gemma3Model``
    takes any dict as masks already built and skips building them; the language-model hooks
    build the real ones. Empty: were it ever read as masks, every layer's lookup fails loudly."""

    def __init__(self, mask: Tensor | None):
        super().__init__()
        self.mask = mask


@family
class Gemma3Adapter(Adapter):
    """Applies presses to a Gemma 3 model. ``positions``: None (the press's official numbering),
    "keep" or "reindex"."""

    family = "gemma3"
    model_types = ("gemma3",)
    classes = ("Gemma3ForConditionalGeneration",)
    signals = VISION_SIGNALS | LLM_SIGNALS
    notes = ("no [CLS]: cls_attn = mean attention each SigLIP patch receives in the last vision block, averaged over "
             "the projector's pooling window (HiPrune's no-[CLS] saliency, arXiv 2508.00553); vision_keys = that "
             "block's keys, window-averaged; *_concat: the same from one softmax over the heads-concatenated q / k; "
             "vision_features = the pooled tower output each token is projected from")
    example_rows = {"single": [[(64, 64)]], "ragged": [[(64, 64)], [(64, 64), (64, 64)], [(64, 64)]]}
    bench_media = {"image": (896, 896)}

    def __init__(self, model, positions: str | None = None):
        super().__init__(model, positions)
        if not hasattr(self.vlm, "vision_tower") or not hasattr(self.vlm, "multi_modal_projector"):
            raise ValueError(f"{type(model).__name__} does not look like a transformers Gemma 3 model")
        self.token_ids = (self.config.image_token_id,)
        projector = self.vlm.multi_modal_projector
        self.patches, self.side, self.kernel = projector.patches_per_image, projector.tokens_per_side, projector.kernel_size
        if self.side * self.kernel != self.patches or self.side**2 != self.config.mm_tokens_per_image:
            raise ValueError(f"this Gemma 3 pools {self.patches}^2 patches with a {self.kernel} x {self.kernel} window "
                             f"into {self.config.mm_tokens_per_image} tokens: not a square raster mmpress can press")
        self.text_config = self.config.get_text_config()
        self._mod = sys.modules[type(self.vlm).__module__]  # Gemma 3's own mask builders
        # vision block -> {"heads" / "concat": (scores (N, T), keys (N, T, d))}, of the last tower call
        self.vision: dict[int, dict[str, tuple[Tensor, Tensor]]] = {}
        self.features: Tensor | None = None  # (N, T, C): pooled tower output of the last tower call
        self.projected: Tensor | None = None  # (N, T, D): projector output of the last tower call
        self._call: dict | None = None  # the VLM call in flight: its 2-D mask and token_type_ids
        self._cut: tuple[Tensor, Tensor] | None = None  # (src, valid) of the pressed prefill in flight

    # ---- where the visual tokens are -------------------------------------------------------------
    def visual_items(self, args, kwargs) -> list[Item]:
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        token, n, grid = self.config.image_token_id, self.side**2, (1, self.side, self.side)
        if pixel_values is not None:
            self.vision, self.features, self.projected = {}, None, None  # the tower runs in this call: new signals
            return [Item(token, n, grid, i) for i in range(pixel_values.shape[0])]
        items = self.encoded_items(kwargs, "image", token, lambda t, s: {  # generate() encodes images first
            "length": t.shape[0], "grid": grid if t.shape[0] == n else None})
        if items and self.projected is not None and max(i.source for i in items) >= self.projected.shape[0]:
            items = self._encoded_sources(items, self.protocol.encoded_in(kwargs, "image"))
        return items

    def _encoded_sources(self, items: list[Item], encoded: list[Tensor]) -> list[Item]:
        """Gemma 3's projector returns one (images, T, D) tensor, which generate repeats per beam /
        returned sequence as a copy (``Tensor.repeat``), not as views of the encoded storage: each
        copy's image is found by its features, equal to those of one image the tower encoded in
        this block (one host read, at the prefill)."""
        projected = self.projected
        found = torch.stack([t.to(projected.device) for t in encoded])
        same = (found[:, None] == projected[None]).flatten(2).all(dim=-1)  # (copies, images)
        if not bool(same.any(dim=1).all()):
            raise ValueError("generate's encoded images do not match the images the tower encoded under this press: "
                             "encode the images inside the `with press(model):` block")
        return [replace(item, source=s) for item, s in zip(items, same.long().argmax(dim=1).tolist())]

    # ---- masks: Gemma 3 builds them before its language model (see the module docstring) -----------
    @contextmanager
    def apply(self, press):
        with super().apply(press) as applied:
            lm = self.vlm.language_model
            # registered after the core's hooks: the VLM hook sees the call the core let through; the
            # first language-model hook runs before the core's (prepend), the second after it
            handles = [self.vlm.register_forward_pre_hook(self._defer_masks, with_kwargs=True),
                       lm.register_forward_pre_hook(self._flat_mask, with_kwargs=True, prepend=True),
                       lm.register_forward_pre_hook(self._build_masks, with_kwargs=True)]
            try:
                yield applied
            finally:
                for handle in handles:
                    handle.remove()
                self._call = self._cut = None

    def _defer_masks(self, module, args, kwargs):
        """Records the call's 2-D mask and ``token_type_ids`` and hands the VLM a stand-in dict."""
        self._call = self._cut = None
        mask = kwargs.get("attention_mask")
        if len(args) > 2:
            raise ValueError("pressing a Gemma 3 model needs its inputs as keywords (input_ids=..., pixel_values=..., "
                             "attention_mask=...), as generate and the ForConditionalGeneration class pass them")
        if isinstance(mask, dict):  # built beforehand (generate with a static, compilable cache)
            if self.state.rows or self._continues_pressed(kwargs) or set(self.stages) - {"pre_llm", "in_vision"}:
                raise ValueError("this Gemma 3 call brings its attention masks already built (a dict per layer type, "
                                 "as generate does for a static cache): they cannot follow the pressed sequence. "
                                 "Pass the 2-D attention mask and use the default dynamic cache")
            return None
        if mask is not None and mask.ndim != 2:
            return None  # a 4-D mask: the core refuses to press it with a clear error
        self._call = {"mask": mask, "token_type_ids": kwargs.get("token_type_ids")}
        return args, {**kwargs, "attention_mask": _Deferred(mask)}

    def _continues_pressed(self, kwargs: dict) -> bool:
        cache = self.protocol.cache_of(kwargs)
        return cache is not None and cache in self.pressed

    def _flat_mask(self, module, args, kwargs):
        """Before the core's hook: the stand-in dict becomes the call's 2-D mask again."""
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, _Deferred):
            if isinstance(mask, dict) and (self.state.rows or set(self.stages) - {"pre_llm", "in_vision"}):
                raise ValueError("the Gemma 3 language model got its masks already built (a dict per layer type): "
                                 "call the whole model (Gemma3ForConditionalGeneration) with a 2-D attention mask")
            return None
        self._check_window(kwargs)
        return args, {**kwargs, "attention_mask": mask.mask}

    def _check_window(self, kwargs: dict) -> None:
        """An in-LLM pressed cache holds each layer's kept columns; a sliding layer's cache drops its
        oldest entries once the window is full, which the cut masks do not follow: refuse."""
        if "in_llm" not in self.stages:
            return
        window = getattr(self.text_config, "sliding_window", None)
        if window is None or "sliding_attention" not in self.text_config.layer_types:
            return
        embeds = kwargs.get("inputs_embeds")
        # layer 0's cache after this call (the press cuts later layers): the whole conversation
        total = cache_length(self.protocol.cache_of(kwargs)) + (embeds.shape[1] if embeds is not None else 0)
        if total >= window:
            raise ValueError(f"an in-LLM press on Gemma 3 needs the whole conversation ({total} tokens so far) within "
                             f"the sliding window ({window}): its sliding layers' caches drop their oldest entries "
                             f"beyond it, which the pressed cache cannot follow. Use a pre-LLM press, or a shorter "
                             f"conversation")

    def _build_masks(self, module, args, kwargs):
        """After the core's hook: Gemma 3's masks, from what the language model runs on now."""
        call, cut, self._call, self._cut = self._call, self._cut, None, None
        mask = kwargs.get("attention_mask")
        if call is None or isinstance(mask, dict):
            return None
        embeds, types = kwargs["inputs_embeds"], call["token_type_ids"]
        cache, pos = self.protocol.cache_of(kwargs), kwargs.get("position_ids")
        if cut is not None and types is not None:  # the pressed prefill: the kept columns' types, text in padding
            src, valid = cut
            types = gather_rows(types.to(src.device), src).masked_fill(~valid, 0)
        pre = self.pressed.get(cache) if cache_length(cache) else None
        if pre is not None:  # continuing a pressed cache: text only (the core refuses images there)
            types = None
            if pre.cuts:
                return args, {**kwargs, "attention_mask": self._uncut_masks(embeds, mask, cache, pos, pre.cuts[0].start)}
        if types is not None:
            blocks = self._mod.get_block_sequence_ids_for_mask(types, device=embeds.device)
            masks = self._mod.create_masks_for_vision_model(self.text_config, embeds, mask, cache, pos, blocks)
        else:
            masks = self._mod.create_masks_for_generate(self.text_config, embeds, mask, cache, pos)
        return args, {**kwargs, "attention_mask": masks}

    def _uncut_masks(self, embeds: Tensor, mask: Tensor | None, cache, pos: Tensor | None, start: int) -> dict:
        """The masks of a call continuing an in-LLM pressed cache, in the prompt's original columns
        (what the stage cuts per layer): sized against layer 0, whose cache holds every column.
        (transformers sizes the full-attention mask against the first full-attention layer, whose
        cache holds only the kept columns when the press cut it.)"""
        if start == 0:
            raise ValueError("an in-LLM press at layer 0 leaves no layer holding the whole prompt; press at layer 1 or later")
        builders = {"full_attention": masking_utils.create_causal_mask,
                    "sliding_attention": masking_utils.create_sliding_window_causal_mask}
        return {kind: builders[kind](self.text_config, embeds, mask, cache, pos, layer_idx=0)
                for kind in set(self.text_config.layer_types)}

    def press_extras(self, kwargs: dict, keep: Tensor, visual: Tensor, src: Tensor, new_mask: Tensor,
                     kept_visual: int) -> dict:
        self._cut = (src, new_mask)  # ``_build_masks`` cuts the VLM's token_type_ids with it
        out = dict(kwargs)
        for name in ("token_type_ids", "mm_token_type_ids"):  # if a caller hands them to the language model
            value = kwargs.get(name)
            if isinstance(value, Tensor) and value.shape[-1] == keep.shape[1]:
                out[name] = gather_rows(value, src).masked_fill(~new_mask, 0)
        return out

    def check_stages(self, stages: dict) -> None:
        lm_stages = [stages[s] for s in ("in_llm", "kv") if s in stages]
        if lm_stages and getattr(self.text_config, "attn_logit_softcapping", None) is not None:
            raise ValueError("this Gemma model soft-caps its attention logits (attn_logit_softcapping): in-LLM and KV "
                             "presses score tokens without it; use a pre-LLM press")

    # ---- signals: attention received (no [CLS]), averaged over each pooling window ------------------
    def signal_hooks(self, press: Press) -> list:
        needs = set(press.needs)
        handles = []
        if (HEADS | CONCAT | {"vision_features"}) & needs:  # generate's repeated copies are matched against it
            handles.append(self.vlm.multi_modal_projector.register_forward_hook(self._projected_hook))
        if "vision_features" in needs:
            handles.append(self.vlm.multi_modal_projector.mm_soft_emb_norm.register_forward_pre_hook(self._pooled_hook))
        layers = encoder_layers(self.vlm.vision_tower)
        forms = hook_forms(needs, lambda: {len(layers) - 1, *map(self._block, self._press_layers(press))},
                           lambda: self._concat_block(press))
        return handles + [attention_module(layers[block]).register_forward_pre_hook(self._vision_hook(block, form),
                                                                                    with_kwargs=True)
                          for block, form in forms.items()]

    def _projected_hook(self, module, args, output):
        self.projected = output

    def _pooled_hook(self, module, args):
        self.features = args[0]

    def _pool(self, x: Tensor) -> Tensor:
        """(N, P*P, ...) per patch in raster order -> (N, T, ...) averaged over each pooling window,
        the window the projector's ``avg_pool`` averages into each token."""
        n, p, k = x.shape[0], self.patches, self.kernel
        grid = x.reshape(n, p // k, k, p // k, k, -1).float().mean(dim=(2, 4))
        return grid.reshape(n, self.side**2, *x.shape[2:])

    def _vision_hook(self, block: int, forms: set[str]):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            n, s, c = hidden.shape
            heads = module.num_heads
            q, k = module.q_proj(hidden), module.k_proj(hidden)  # (N, S, C)
            bounds = list(range(0, n * s + 1, s))  # one image per row: its patches attend among themselves
            out = {}
            if "heads" in forms:
                qh, kh = q.reshape(n * s, heads, -1), k.reshape(n * s, heads, -1)
                scores = received_attention(qh, kh, bounds, module.scale).view(n, s)
                keys = k.view(n, s, heads, -1).float().mean(dim=2)
                out["heads"] = (self._pool(scores), self._pool(keys).to(k.dtype))
            if "concat" in forms:  # one softmax over the heads' concatenated q / k, scaled by C^-1/2
                scores = received_attention(q.reshape(n * s, 1, c), k.reshape(n * s, 1, c), bounds, c**-0.5).view(n, s)
                out["concat"] = (self._pool(scores), self._pool(k).to(k.dtype))
            self.vision[block] = out

        return hook

    def fill_signals(self, press: Press, ctx: VisualContext, items: list[Item]) -> None:
        sources, n = [item.source for item in items], items[0].length

        def tokens(t: Tensor) -> Tensor:
            if max(sources) >= t.shape[0] or t.shape[1] != n:
                raise ValueError(f"vision signal covers {tuple(t.shape[:2])} tokens, the LM sees ({len(items)}, {n})")
            if sources == list(range(t.shape[0])):
                return t
            return t[sources]  # generate encodes each image once, then repeats it per beam / sequence

        needs = set(press.needs)
        if "vision_features" in needs:
            if self.features is None:
                raise ValueError("vision signals missing: encode the images inside the `with press(model):` block")
            ctx.vision_features = tokens(self.features)
        fill_cls_signals(ctx, needs, self.vision, tokens,
                         lambda: (len(encoder_layers(self.vlm.vision_tower)) - 1, [self._block(i) for i in self._press_layers(press)]),
                         lambda: self._concat_block(press))

    def _press_layers(self, press: Press) -> tuple[int, ...]:
        return press_layers(press, len(encoder_layers(self.vlm.vision_tower)))

    def _block(self, hs_index: int) -> int:
        return layer_index(hs_index, len(encoder_layers(self.vlm.vision_tower)))

    def _concat_block(self, press: Press) -> int:
        depth = len(encoder_layers(self.vlm.vision_tower))
        layer = concat_layer(press, None, depth)
        return depth - 1 if layer is None else self._block(layer)

    # ---- cost and shapes ------------------------------------------------------------------------
    @classmethod
    def prefill_flops(cls, config, inputs: dict, seq_len: int, layer_seq_len=None) -> PrefillFlops:
        """SigLIP over every image's patches (no [CLS]), the projector's matmul over the pooled tokens
        (pooling and norm ignored, as every count ignores norms), and ``batch`` rows of ``seq_len``
        LM tokens (counted causal over the whole row: exact while the row fits the sliding window,
        1024 tokens released, as a prompt of a few images and a question does)."""
        vision_cfg, text_cfg = config.vision_config, config.text_config
        batch = inputs["input_ids"].shape[0]
        images = inputs["pixel_values"].shape[0] if inputs.get("pixel_values") is not None else 0
        patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
        vision = transformer_flops(vision_cfg, patches, batch=images)
        projector = 2.0 * images * config.mm_tokens_per_image * vision_cfg.hidden_size * text_cfg.hidden_size
        return PrefillFlops(vision, projector, language_flops(text_cfg, seq_len, batch, layer_seq_len))

    @classmethod
    def build(cls, size: str = "tiny", seed: int = 0, attn: str = "sdpa", model_type: str | None = None,
              **overrides):
        """"real": Gemma 3 scaled for a CPU as the other families: its SigLIP tower at the released
        896 px and 14 px patches (4096 patches pooled 4 x 4 into 256 tokens), 6 x 384, and the shared
        12 x 896 language model as a Gemma 3 text model (sliding window 1024, 5 sliding : 1 full
        layers, local / global RoPE bases 10k / 1M, head dim 64). "tiny": 64 px, 2 px patches,
        1024 patches pooled 4 x 4 into 64 tokens; 3 LM layers, the last one full-attention."""
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

        real = dict(vision_layers=6, vision_hidden=384, image_size=896, patch_size=14, tokens=256, window=1024)
        tiny = dict(vision_layers=2, vision_hidden=32, image_size=64, patch_size=2, tokens=64, window=512,
                    lm_layers=3)
        shape = {**lm_shape(size), **(real if size == "real" else tiny), **overrides}
        torch.manual_seed(seed)
        hidden = shape["vision_hidden"]
        vision = SiglipVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden if size == "real" else 2 * hidden,
                                    num_hidden_layers=shape["vision_layers"],
                                    num_attention_heads=max(1, hidden // 64) if size == "real" else 4,
                                    image_size=shape["image_size"], patch_size=shape["patch_size"], vision_use_head=False)
        head_dim = shape["lm_hidden"] // shape["lm_heads"]
        layers = shape["lm_layers"]
        pattern = 6 if size == "real" else 3  # tiny: layers 0, 1 sliding, 2 full
        text = Gemma3TextConfig(
            vocab_size=shape["vocab"], hidden_size=shape["lm_hidden"], intermediate_size=shape["lm_intermediate"],
            num_hidden_layers=layers, num_attention_heads=shape["lm_heads"], num_key_value_heads=shape["lm_kv_heads"],
            head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=shape["window"],
            layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)],
            max_position_embeddings=32768, pad_token_id=0, bos_token_id=BOS, eos_token_id=1)
        config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=shape["tokens"],
                              image_token_index=IMAGE_TOKEN, boi_token_index=BOI, eoi_token_index=EOI)
        config._attn_implementation = attn
        for sub in (config.text_config, config.vision_config):
            sub._attn_implementation = attn
        model = Gemma3ForConditionalGeneration(config).eval()
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = 1
        if size == "tiny":  # released projectors are trained; the zero-initialised one would feed the LM zeros
            with torch.no_grad():
                model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, hidden**-0.5)
        return model

    @classmethod
    def prompts(cls, model, rows: list, kind: str = "image", seed: int = 0, first_row: int = 0) -> dict:
        """Left-padded rows as Gemma3Processor lays them out: <bos>, a few system tokens, each image as
        ``\\n\\n <start_of_image> <image>*256 <end_of_image> \\n\\n``, a question of ragged length;
        ``token_type_ids`` 1 at the image tokens (the processor's ``mm_token_type_ids``)."""
        if kind != "image":
            raise ValueError("Gemma 3 takes images only")
        config = model.config
        size, n = config.vision_config.image_size, config.mm_tokens_per_image
        for row in rows:
            if any(tuple(s) != (size, size) for s in row):
                raise ValueError(f"Gemma 3 resizes every image (and pan-and-scan crop) to {size} px: got sizes {row}")
        vocab = config.text_config.vocab_size
        text = 33 if vocab > 1000 else 12
        image = [NEWLINES, BOI, *[IMAGE_TOKEN] * n, EOI, NEWLINES]
        sequences = [[BOS, *text_around([image for _ in row], first_row + i, seed, text, vocab)]
                     for i, row in enumerate(rows)]
        batch = left_pad(sequences)
        pixels = [pixel_tensor((3, size, size), seed, first_row + i, j) for i, row in enumerate(rows)
                  for j in range(len(row))]
        return {**batch, "token_type_ids": (batch["input_ids"] == IMAGE_TOKEN).long(),
                "pixel_values": torch.stack(pixels)}

    @classmethod
    def encode(cls, model, inputs: dict) -> None:
        model.get_image_features(pixel_values=inputs["pixel_values"])


__all__ = ["Gemma3Adapter"]
