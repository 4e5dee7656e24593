"""Qwen-VL family (transformers ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``): where its visual tokens are and which signals its
vision tower gives. The pressing itself is the shared core (``models/base.py``).

Where the visual tokens are: the vision tower merges each 2x2 block of patches into one token,
so an image of ``image_grid_thw`` (t, H, W) patches gives t * H/2 * W/2 tokens, written in raster
order over (t, h, w) at the positions of ``image_token_id`` (videos: ``video_token_id``,
``video_grid_thw``), between vision-start/end tokens. Images of one batch may differ in size;
the core presses items of the same grid together.

Positions: 3-D M-RoPE ids (t, h, w) computed by the model from the unpressed prompt (as (3, B, L),
or (4, B, L) with a text row when generate prepares them). Kept tokens keep their ids, the text
after an image keeps its own, and ``rope_deltas`` (computed on the unpressed prompt) keeps
decoding in the original coordinates, consistent with the pressed cache. ``positions="reindex"``
is not offered: a renumbered 1-D sequence has no meaning for M-RoPE. A later turn's new text
continues from the prompt's largest id on every M-RoPE row: ``mmpress.continue_positions`` builds
those ids (transformers numbers several new tokens over the whole mask's width and fails).

Signals: the tower has no [CLS] token, so ``cls_attn`` is a documented substitute: the attention
each patch RECEIVES in the last full-attention vision block (the block whose output the merger
turns into the LM's tokens), averaged over all queries of its image (of its frame, for a video:
Qwen attends within frames) and over heads,
``score_j = mean_{h, i} softmax_j(q_i . k_j / sqrt(d))``. ``cls_attn_concat`` (official PruMerge's
form, one softmax over the heads-concatenated q / k) has the same substitute in that form:
``score_j = mean_i softmax_j(q_i . k_j / sqrt(C))`` with q, k the rotated heads concatenated (width
C), and ``vision_keys_concat`` those concatenated rotated keys, averaged over each merge group. This is the no-[CLS] saliency of
HiPrune (Liu et al., arXiv 2508.00553), whose official Qwen2.5-VL code (github.com/Danielement321/
HiPrune, ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py``, ``Qwen2_5_VisionTransformerPretrainedModel.forward``)
takes each vision block's attention map, averages it over heads, sums it over queries, averages
each 2x2 merge group and undoes the window permutation with ``argsort(window_index)``; we take
the mean over queries instead of the sum (the same ranking within an image, comparable across
images of different sizes). VisionZip's and VisPruner's official repositories
(dvlab-research/VisionZip, Theia-4869/VisPruner) ship LLaVA code only; a community VisionZip
port to Qwen2-VL (Hanjiangli/VisionZip-Qwen2VL) reads the attention row of patch 0 as if it were
[CLS], which we do not follow: patch 0 is an ordinary corner patch.

How: a forward pre-hook on that block's attention module takes its input hidden states,
``cu_seqlens`` and rotary ``position_embeddings`` as transformers passes them, recomputes q and
k as the module does (``qkv``, then the module's own ``apply_rotary_pos_emb_vision``) and the
column means in query chunks (``models.vision.received_attention``): no attention map is
materialised, no eager attention is needed, the tower keeps running with SDPA / FlashAttention.
Patch scores and keys become token scores and keys by averaging each ``spatial_merge_size**2``
consecutive patches (the merger's ``view(-1, hidden * merge**2)`` groups exactly those); keys
are the module's rotated keys, averaged over the group and the heads (``vision_keys``, VisionZip's
and PruMerge's similarity metric). Qwen2.5-VL runs its blocks in window order: the tokens are
put back in raster order with ``argsort(window_index)``, as the tower does after its merger.
Qwen2-VL attends fully in every block; Qwen2.5-VL in ``fullatt_block_indexes`` only (the last
block in every released config; were it windowed, the last full-attention block is used).
``layers`` of a press (VTC-CLS, PruMerge: hidden-state indices, as ``vision_feature_layer``)
name further blocks, scored the same way within the segments that block attends over (windows,
for a windowed Qwen2.5-VL block). ``vision_features`` (VisPruner's similarity): what the merger
(Qwen's projector) receives for each token, its ``spatial_merge_size**2`` patches of the last
block concatenated (``view(-1, C * merge**2)``), from a forward pre-hook on the merger, in raster
order.

In-vision presses (``vision_hooks``; modes "drop", "merge" and "resize"): for the `with` block the tower's
``forward`` is our own, built from its submodules (``patch_embed``, ``rotary_pos_emb``, the blocks,
the merger; transformers' source untouched), and the VLM's ``get_image_features`` /
``get_video_features`` are wrapped to tell it the kind and plan each item on the processor's pixel
values; all three are restored on exit. The 4 patches of a 2x2 merge unit always travel together.
"drop" (``static_patches``): the tower runs on the kept units only, with their ORIGINAL rotary
positions, ``cu_seqlens`` per temporal step of each item (Qwen attends within a frame) and, in
Qwen2.5-VL's windowed blocks, the full grid's window partition restricted to the kept units
(empty windows removed); the merger gives one token per kept unit. "merge" (``tome_vit``): ToMe
in units, merging only within a window (``_tome_forward``). "resize" (``downsample``): each item
un-patchified, resized to ``grid_for``'s patch grid, re-patchified and encoded by the stock tower,
its tokens standing for the original tokens nearest their centres (``_resized``). Either way the output still fills
every placeholder (kept tokens at their rows) and each item's kept units are recorded
(``Selected``), so the stage core drops the others before the language model with their M-RoPE
ids kept; with nothing dropped / merged (tolerance -1, r=0) the stock forward runs (bit-identical).
A composed pre-LLM press reading the tower's attention or features is refused (they would cover the
kept patches only).
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import replace

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.vision_utils import (
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
    get_vision_window_index,
)

from mmpress.flops import PrefillFlops, language_flops
from mmpress.models.base import LLM_SIGNALS, VISION_SIGNALS, Adapter, Item, family
from mmpress.models.stages import Selected
from mmpress.ops.merge import bipartite_soft_matching, merge_representatives, merge_wavg
from mmpress.models.examples import left_pad, lm_shape, pixel_tensor, text_around, text_config
from mmpress.models.vision import CONCAT, HEADS, concat_layer, hook_forms, layer_index, press_layers, received_attention
from mmpress.presses.base import Press, VisualContext, VisionPress

# vision block -> per item (scores (n,), keys (n, d)); ("concat", block) -> per item the heads-concatenated
# (scores (n,), keys (n, C)); "features" -> per item merger input (n, merge**2 * C)
Signals = dict[int | str | tuple, tuple[list[Tensor], list[Tensor]] | list[Tensor]]


IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 3, 4, 5, 6  # of the random models below


def vision_flops(vision_cfg, grids_thw: list[list[int]]) -> tuple[float, float]:
    """FLOPs of a Qwen2-VL / Qwen2.5-VL vision tower over images / videos of ``grids_thw`` (t, h, w)
    patches: (tower, merger). Attention runs per temporal step (each of the t frames of a video is
    its own sequence); in Qwen2.5-VL only ``fullatt_block_indexes`` attend over a whole frame, the
    other blocks within windows of ``window_size`` pixels (``get_vision_window_index``)."""
    merge, patch = vision_cfg.spatial_merge_size, vision_cfg.patch_size
    qwen2_5 = hasattr(vision_cfg, "fullatt_block_indexes")
    qwen3 = hasattr(vision_cfg, "deepstack_visual_indexes")  # full attention, plain MLP, extra mergers
    width = vision_cfg.embed_dim if not (qwen2_5 or qwen3) else vision_cfg.hidden_size
    out = vision_cfg.out_hidden_size if qwen2_5 or qwen3 else vision_cfg.hidden_size
    inter = vision_cfg.intermediate_size if qwen2_5 or qwen3 else int(width * vision_cfg.mlp_ratio)
    depth = vision_cfg.depth
    full = {i % depth for i in vision_cfg.fullatt_block_indexes} if qwen2_5 else set(range(depth))
    side = max(1, vision_cfg.window_size // merge // patch) if qwen2_5 else 0  # window side, in merged tokens
    patches = sum(t * h * w for t, h, w in grids_thw)
    frame_sq = window_sq = 0.0  # sum of squared attention lengths, per block kind
    for t, h, w in grids_thw:
        frame_sq += t * (h * w) ** 2
        if qwen2_5:
            rows = [min(side, h // merge - i) for i in range(0, h // merge, side)]
            cols = [min(side, w // merge - j) for j in range(0, w // merge, side)]
            window_sq += t * sum((r * c * merge**2) ** 2 for r in rows for c in cols)
    embed = 2.0 * patches * vision_cfg.in_channels * vision_cfg.temporal_patch_size * patch**2 * width
    per_token = 4 * width**2 + (3 if qwen2_5 else 2) * width * inter  # qkv + proj, MLP (gated in 2.5)
    attn = 4.0 * width * (len(full) * frame_sq + (depth - len(full)) * window_sq)  # scores + values
    tower = embed + 2.0 * depth * patches * per_token + attn
    merged = patches / merge**2
    mergers = 1 + (len(vision_cfg.deepstack_visual_indexes) if qwen3 else 0)  # Qwen3-VL: one per DeepStack layer
    merger = 2.0 * mergers * merged * ((merge**2 * width) ** 2 + merge**2 * width * out)
    return tower, merger


@family
class QwenVLAdapter(Adapter):
    """Applies presses to a Qwen2-VL / Qwen2.5-VL model (positions are always kept)."""

    family = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    signals = VISION_SIGNALS | LLM_SIGNALS
    notes = ("no [CLS]: cls_attn = mean attention each token receives in the last full-attention vision block "
             "(HiPrune's no-[CLS] saliency, arXiv 2508.00553); vision_keys = that block's rotated keys; "
             "*_concat: the same from one softmax over the heads-concatenated q / k")
    example_rows = {"single": [[(32, 32)]], "ragged": [[(32, 32)], [(32, 48), (32, 32)], []],
                    "video": [[(4, 32, 32)]]}
    bench_media = {"image": (896, 896), "video": (16, 448, 448)}  # 1024 tokens; 8 steps x 256
    position_modes = ("keep",)
    # generate() recomputes M-RoPE ids of a continued conversation from the cache length: not
    # mapped yet, so a later turn feeds the new text with model(...) (see Adapter._continue_generate)
    # and the ids mmpress.continue_positions builds (transformers' own, from a full-length mask,
    # fail with more than one new token, pressed or not)
    continues_generate = False
    continue_hint = ("A pressed cache holds fewer entries than the tokens it stands for. Run generate on the whole "
                     "conversation under the press without past_key_values, or feed only the new turn's tokens with "
                     "their M-RoPE ids: model(input_ids=new_ids, attention_mask=full_mask, past_key_values=cache, "
                     "position_ids=mmpress.continue_positions(model, cache, full_mask, new_ids))")
    vision_modes = frozenset({"drop", "merge", "resize"})  # in-vision presses: the tower on the kept merge units (vision_hooks)
    deepstack = False  # Qwen3-VL's file (qwen3_vl.py) presses DeepStack features too

    def __init_subclass__(cls, **kwargs):
        # in-vision presses replace the tower's forward: a subclass with another tower (Qwen2.5-Omni)
        # runs them only where it says so and is tested (Qwen3-VL)
        super().__init_subclass__(**kwargs)
        if "vision_modes" not in cls.__dict__:
            cls.vision_modes = frozenset()

    def __init__(self, model, positions: str | None = None):
        super().__init__(model, positions)
        if not hasattr(self.vlm, "visual"):
            raise ValueError(f"{type(model).__name__} does not look like a transformers Qwen-VL model")
        if getattr(self.config.vision_config, "deepstack_visual_indexes", None) and not self.deepstack:
            raise ValueError("this model injects DeepStack visual features into early language-model layers at the "
                             "visual positions; use the Qwen3-VL adapter (mmpress.models.qwen3_vl), which presses "
                             "them with the same kept tokens")
        self.token_ids = (self.config.image_token_id, self.config.video_token_id)
        self.merge = self.config.vision_config.spatial_merge_size
        self.grids_seen: list[list[list[int]]] = []  # grid_thw of the last vision-tower calls
        # vision signals: of the tower call in flight, per placeholder id, and per encoder output
        # (generate encodes before the forward; its per-item features are views of one storage)
        self._encoding: dict | None = None
        self._expect: list[int] = []  # placeholder ids of the tower calls this forward will make
        self._signals: dict[int, Signals | None] = {}
        self._by_storage: dict[int, Signals] = {}

    def signal_hooks(self, press) -> list:
        # generate() encodes images before the forward and passes only their features: the grids
        # are recorded where the tower sees them
        visual = self.vlm.visual
        handles = [visual.register_forward_pre_hook(self._record_grids, with_kwargs=True)]
        needs = set(press.needs)
        if (HEADS | CONCAT | {"vision_features"}) & needs:
            handles += [visual.register_forward_pre_hook(self._start_encoding),
                        visual.register_forward_hook(self._record_output)]
        layers = press_layers(press, len(visual.blocks))
        forms = hook_forms(needs, lambda: {self._feature_block(), *map(self._block, layers)},
                           lambda: self._concat_block(press))
        handles += [visual.blocks[b].attn.register_forward_pre_hook(self._attention_hook(b, form), with_kwargs=True)
                    for b, form in forms.items()]
        if "vision_features" in needs:
            handles.append(visual.merger.register_forward_pre_hook(self._merger_hook))
        return handles

    def _merger_hook(self, module, args):
        """``vision_features``: the merger's input, each token's ``spatial_merge_size**2`` patches
        concatenated as the merger's ``view(-1, C * merge**2)`` reads them, in raster order."""
        encoding = self._encoding
        if encoding is None:
            return
        x = args[0]
        features = x.reshape(-1, self.merge**2 * x.shape[-1])
        if encoding["window"] is not None:  # window order -> raster order, as the tower does
            features = features[encoding["window"].to(x.device).argsort()]
        encoding["signals"]["features"] = list(features.split([self._shape(g)[0] for g in encoding["grid"]]))

    def _record_grids(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is not None:
            self.grids_seen = [*self.grids_seen[-3:], grid.tolist()]  # before the tower's work is queued

    def _start_encoding(self, module, args):
        """A tower call begins (after ``_record_grids``): which placeholder id its items fill (None
        when generate encodes before the forward: then its output's storage tells), and, for
        Qwen2.5-VL, the window permutation its blocks run in (host facts, no sync)."""
        if not self.grids_seen:
            return
        grid, window = self.grids_seen[-1], None
        if hasattr(module, "fullatt_block_indexes"):
            window, _ = get_vision_window_index(torch.tensor(grid), self.merge, module.window_size, module.patch_size)
        self._encoding = {"token": self._expect.pop(0) if self._expect else None, "grid": grid, "window": window,
                          "signals": {}}

    def _record_output(self, module, args, output):
        encoding, self._encoding = self._encoding, None
        features = getattr(output, "pooler_output", None)
        if features is None and isinstance(output, tuple) and len(output) > 1:
            features = output[1]
        if encoding is None or not isinstance(features, Tensor):
            return
        if encoding["token"] is not None:
            self._signals[encoding["token"]] = encoding["signals"]
        key = features.untyped_storage().data_ptr()
        self._by_storage = {**dict(list(self._by_storage.items())[-3:]), key: encoding["signals"]}

    # ---- vision signals (no [CLS]: attention received, see the module docstring) -------------
    def _feature_block(self) -> int:
        """The last full-attention block: the last block in Qwen2-VL and in every released
        Qwen2.5-VL config (``fullatt_block_indexes`` ends with depth - 1)."""
        visual = self.vlm.visual
        full = getattr(visual, "fullatt_block_indexes", None)
        return max(full) if full else len(visual.blocks) - 1

    def _block(self, hs_index: int) -> int:
        return layer_index(hs_index, len(self.vlm.visual.blocks))

    def _concat_block(self, press: Press) -> int:
        layer = concat_layer(press, None, len(self.vlm.visual.blocks))
        return self._feature_block() if layer is None else self._block(layer)

    def _attention_hook(self, block: int, forms: set[str]):
        def hook(module, args, kwargs):
            encoding = self._encoding
            if encoding is None:
                return
            names = ("hidden_states", "cu_seqlens", "position_embeddings")
            hidden, cu_seqlens, rotary = (kwargs.get(name, args[i] if len(args) > i else None)
                                          for i, name in enumerate(names))
            if cu_seqlens is None or rotary is None:
                raise ValueError(f"{type(module).__name__} got no cu_seqlens / position_embeddings: this transformers "
                                 "version calls the Qwen-VL vision attention differently; mmpress cannot score tokens")
            s = hidden.shape[0]
            q, k = self._queries_keys(module, hidden)
            q, k = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision(q, k, *rotary)
            # host boundaries: the module's own SDPA path reads cu_seqlens to the host right after
            bounds, unit = cu_seqlens.tolist(), self.merge**2
            sizes = [self._shape(g)[0] for g in encoding["grid"]]
            order = None if encoding["window"] is None else encoding["window"].to(k.device).argsort()

            def record(name, score: Tensor, keys: Tensor) -> None:
                score = score.view(-1, unit).mean(dim=1)
                keys = keys.float().view(-1, unit, keys.shape[-1]).mean(dim=1)
                if order is not None:  # window order -> raster order, as the tower does
                    score, keys = score[order], keys[order]
                encoding["signals"][name] = (list(score.split(sizes)), list(keys.to(k.dtype).split(sizes)))

            if "heads" in forms:
                record(block, received_attention(q, k, bounds, module.scaling), k.float().mean(dim=1))
            if "concat" in forms:  # one softmax over the heads' concatenated q / k, scaled by C^-1/2
                qc, kc = q.reshape(s, 1, -1), k.reshape(s, 1, -1)
                record(("concat", block), received_attention(qc, kc, bounds, kc.shape[-1] ** -0.5), kc[:, 0])

        return hook

    @staticmethod
    def _queries_keys(module, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(S, heads, d) unrotated queries and keys of a vision attention module, as its forward
        makes them (Qwen-VL: one fused ``qkv``; Qwen2.5-Omni's file: separate ``q`` / ``k``)."""
        q, k, _ = module.qkv(hidden).reshape(hidden.shape[0], 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        return q, k

    def fill_signals(self, press: Press, ctx: VisualContext, items: list[Item]) -> None:
        signals, needs = self._signals.get(items[0].token_id), set(press.needs)
        layers = press_layers(press, len(self.vlm.visual.blocks))
        blocks = [self._feature_block(), *map(self._block, layers)] if HEADS & needs else []
        concat = ("concat", self._concat_block(press)) if CONCAT & needs else None
        if not signals or any(b not in signals for b in blocks) or ("vision_features" in needs and "features" not in signals) \
                or (concat is not None and concat not in signals):
            raise ValueError("vision signals missing: encode the images inside the `with press(model):` block")
        sources, n = [item.source for item in items], items[0].length

        def stack(per_item: list[Tensor]) -> Tensor:
            if max(sources) >= len(per_item) or per_item[sources[0]].shape[0] != n:
                raise ValueError(f"vision signal covers {[t.shape[0] for t in per_item]} tokens per item, the LM "
                                 f"sees {len(items)} items of {n}")
            return torch.stack([per_item[s] for s in sources])  # generate repeats items per beam / sequence

        if "vision_features" in needs:
            ctx.vision_features = stack(signals["features"])
        if concat is not None:
            ctx.cls_attn_concat, ctx.vision_keys_concat = map(stack, signals[concat])
        if not blocks:
            return
        scores, keys = signals[blocks[0]]
        ctx.cls_attn, ctx.vision_keys = stack(scores), stack(keys)
        if layers:
            ctx.cls_attn_layers = torch.stack([stack(signals[b][0]) for b in blocks[1:]], dim=1)

    # ---- in-vision presses: the tower on a subset of merge units ---------------------------------
    def vision_hooks(self, press: VisionPress, stage) -> list:
        """Installs, for the `with` block, our own forward of the vision tower (``_tower_forward``)
        and wrappers of the VLM's ``get_image_features`` / ``get_video_features`` that tell it the
        kind and plan each item on the processor's pixel values (before the cast to the tower's
        dtype). Restored on exit (``_Installed.remove``)."""
        visual, state = self.vlm.visual, {"kind": None, "plan": None, "last": None}
        stock = visual.forward

        def features(kind, original):
            signature = inspect.signature(original)  # generate picks the kwargs it passes by these names
            pixels_name, grid_name = list(signature.parameters)[:2]

            @functools.wraps(original)
            def wrapped(*args, **kwargs):
                if state["kind"] is not None:  # called by the other wrapper (Qwen3-VL: videos encoded as images)
                    return original(*args, **kwargs)
                given = signature.bind(*args, **kwargs).arguments
                if given.get(grid_name) is None:
                    raise ValueError(f"an in-vision press on a Qwen-VL {kind} needs its {grid_name}")
                state["kind"], state["plan"] = kind, self._plan(press, given[pixels_name], given[grid_name], kind)
                try:
                    if press.mode != "resize":
                        return original(*args, **kwargs)
                    return self._resized(press, stage, kind, original, given, pixels_name, grid_name)
                finally:
                    state["kind"] = state["plan"] = None
            return wrapped

        def forward(hidden_states, grid_thw=None, **kwargs):
            kind, plan = state["kind"], state["plan"]
            if kind is None:
                raise ValueError(f"{type(press).__name__} runs in the Qwen-VL vision tower through get_image_features "
                                 "/ get_video_features (model(...) and generate call them); the tower was called "
                                 "directly")
            # transformers encodes a call's images, then its videos: a video right after images
            # continues that encoding pass, anything else starts a new one
            if kind == "image" or state["last"] != "image":
                stage.new_call()
            state["last"] = kind if kind == "image" else None
            if press.mode == "resize":  # the resized items, whole (_resized records their selection)
                plan = torch.ones(hidden_states.shape[0] // self.merge**2, dtype=torch.bool)
            elif press.mode == "merge":
                if press.merges(len(visual.blocks)):
                    return self._tome_forward(press, stage, kind, hidden_states, grid_thw)
                plan = torch.ones(hidden_states.shape[0] // self.merge**2, dtype=torch.bool)  # r = 0: the stock tower
            return self._tower_forward(stock, stage, kind, plan, hidden_states, grid_thw, kwargs)

        return [_Installed(visual, "forward", forward),
                _Installed(self.vlm, "get_image_features", features("image", self.vlm.get_image_features)),
                _Installed(self.vlm, "get_video_features", features("video", self.vlm.get_video_features))]

    def check_stages(self, stages: dict[str, Press]) -> None:
        super().check_stages(stages)
        later = stages.get("pre_llm")
        if "in_vision" in stages and later is not None and (HEADS | CONCAT | {"vision_features"}) & set(later.needs):
            raise ValueError(f"{type(later).__name__} reads the vision tower's attention / features, which a Qwen-VL "
                             f"tower running {type(stages['in_vision']).__name__} computes on the kept patches only: compose "
                             "the in-vision press with a press that reads the tokens (e.g. divprune)")

    def _plan(self, press: VisionPress, pixels: Tensor, grid_thw: Tensor, kind: str) -> Tensor:
        """(U,) bool over the call's merge units (each item's units in raster order over (t, h, w),
        items in order, as the processor lays out the patches): True where the unit is kept."""
        if press.mode in ("merge", "resize"):
            return None
        if press.mode != "drop":
            raise ValueError(f"the Qwen-VL adapter runs no in-vision mode {press.mode!r}: its modes are "
                             f"{sorted(self.vision_modes)}")
        grids = grid_thw.tolist()
        sizes = [t * (h // self.merge) * (w // self.merge) for t, h, w in grids]
        units = pixels.reshape(sum(sizes), -1)  # a unit's merge**2 patches are consecutive rows
        keep = []
        for item, (t, h, w) in zip(units.split(sizes), grids):
            plan = press.drop_plan(item.reshape(t, h // self.merge, w // self.merge, -1), kind)
            if plan.shape != (t, h // self.merge, w // self.merge) or plan.dtype != torch.bool:
                raise RuntimeError(f"{type(press).__name__}.drop_plan returned {tuple(plan.shape)} {plan.dtype}, "
                                   f"expected a bool ({t}, {h // self.merge}, {w // self.merge})")
            keep.append(plan.flatten())
        return torch.cat(keep)

    def _tower_forward(self, stock, stage, kind: str, keep: Tensor, pixels: Tensor, grid_thw: Tensor,
                       kwargs: dict) -> BaseModelOutputWithPooling:
        """The vision tower on the kept merge units only. Every kept unit keeps its 4 patches
        together, their ORIGINAL rotary (h, w) positions, attention within its own frame
        (``cu_seqlens`` counts the kept patches of each temporal step of each item) and, in
        Qwen2.5-VL's windowed blocks, within its original window (the window partition of the full
        grid, restricted to the kept units, windows left empty removed). The merger gives one
        token per kept unit; the output fills every placeholder (the kept tokens at their own
        rows, zeros elsewhere: the stage core drops those before the language model). With every
        unit kept the stock forward runs, bit for bit the unpressed tower."""
        visual, unit = self.vlm.visual, self.merge**2
        grids = grid_thw.tolist()
        sizes = [t * (h // self.merge) * (w // self.merge) for t, h, w in grids]
        keep = keep.to(pixels.device)
        kept = keep.nonzero()[:, 0]  # ascending: raster order within each item
        per_item = [k.nonzero()[:, 0] for k in keep.split(sizes)]
        for source, index in enumerate(per_item):
            stage.record(kind, source, Selected(index))
        depth = len(visual.blocks)
        full = set(getattr(visual, "fullatt_block_indexes", range(depth)))
        if kept.shape[0] == keep.shape[0]:  # nothing dropped: the stock tower
            frames = [h * w for t, h, w in grids for _ in range(t)]
            windows = frames
            if hasattr(visual, "fullatt_block_indexes"):
                _, cu = get_vision_window_index(grid_thw.cpu(), self.merge, visual.window_size, visual.patch_size)
                windows = (cu[1:] - cu[:-1]).tolist()
            stage.count_blocks(kind, [pixels.shape[0]] * depth, _attention_work(frames, windows, full, depth))
            return stock(pixels, grid_thw=grid_thw, **kwargs)
        windowed = hasattr(visual, "fullatt_block_indexes")
        if windowed:  # the kept units in window order, and the windows' kept lengths
            window_index, cu_window = get_vision_window_index(grid_thw.cpu(), self.merge, visual.window_size,
                                                              visual.patch_size)
            window_index = window_index.to(keep.device)
            kept_in_order = keep[window_index]
            order = window_index[kept_in_order]
            ends = (cu_window[1:] // unit).to(keep.device)
            window_of = torch.bucketize(kept_in_order.nonzero()[:, 0], ends, right=True)
            cu_window = _cu_lengths(window_of, len(ends), unit)
        else:
            order = kept
        frames = torch.tensor([h * w // unit for t, h, w in grids for _ in range(t)], device=keep.device)
        frame_of = torch.repeat_interleave(torch.arange(len(frames), device=keep.device), frames)
        cu_frames = _cu_lengths(frame_of[order], len(frames), unit)
        rows = (order[:, None] * unit + torch.arange(unit, device=order.device)).flatten()
        hidden = visual.patch_embed(pixels[rows])
        if hasattr(visual, "pos_embed"):  # Qwen3-VL: learned positions interpolated over the FULL grid
            index, weight = get_vision_interpolation_indices_and_weights(
                grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
                align_corners=visual.interpolation_align_corners, spatial_merge_size=self.merge)
            index, weight = index.to(rows.device)[rows], weight.to(rows.device)[rows]
            hidden = hidden + (visual.pos_embed(index) * weight[:, :, None]).sum(1).to(hidden.dtype)
        positions = get_vision_position_ids(grid_thw, self.merge).to(rows.device)[rows]
        rotary = visual.rotary_pos_emb(hidden, positions)
        deepstack = list(getattr(visual, "deepstack_visual_indexes", None) or ())
        unsort = order.argsort() if windowed else None  # window order -> raster order, as the tower does

        def scatter(features: Tensor) -> Tensor:
            features = features if unsort is None else features[unsort]
            full_out = features.new_zeros(keep.shape[0], features.shape[-1])
            full_out[kept] = features
            return full_out

        stacked = []
        for i, block in enumerate(visual.blocks):
            bounds = cu_frames if i in full else cu_window
            hidden = block(hidden, cu_seqlens=bounds, max_seqlen=None, position_embeddings=rotary)
            if i in deepstack:  # Qwen3-VL's DeepStack features, per kept unit, placed as the tokens
                stacked.append(scatter(visual.deepstack_merger_list[deepstack.index(i)](hidden)))
        out = scatter(visual.merger(hidden))
        frames = (cu_frames[1:] - cu_frames[:-1]).tolist()
        windows = (cu_window[1:] - cu_window[:-1]).tolist() if windowed else frames
        stage.count_blocks(kind, [rows.shape[0]] * depth, _attention_work(frames, windows, full, depth))
        if deepstack:
            output = sys.modules[type(visual).__module__].BaseModelOutputWithDeepstackFeatures
            return output(last_hidden_state=hidden, pooler_output=out, deepstack_features=stacked)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=out)

    def _resized(self, press, stage, kind: str, original, given: dict, pixels_name: str, grid_name: str):
        """"resize" (``downsample``): each item's pixels un-patchified to frames, resized to the
        patch grid ``press.grid_for(h, w, unit=merge, frames=t)`` gives (whole merge units) and
        re-patchified, the tower run on them; its tokens fill the placeholders of the ORIGINAL
        tokens nearest their centres (``Selected(index, grid=(t, h2, w2))``, distinct and ascending
        for a downscale), the other placeholders are dropped by the stage core."""
        vision, merge = self.config.vision_config, self.merge
        patch, temporal = vision.patch_size, vision.temporal_patch_size
        pixels, grid_thw = given[pixels_name], given[grid_name]
        grids = grid_thw.tolist()
        items, new_grids, selected = [], [], []
        for x, (t, h, w) in zip(pixels.split([t * h * w for t, h, w in grids]), grids):
            h2, w2 = press.grid_for(h, w, unit=merge, frames=t)
            frames = (x.reshape(t, h // merge, w // merge, merge, merge, -1, temporal, patch, patch)
                      .permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * temporal, -1, h * patch, w * patch))
            frames = press.resize(frames, (h2 * patch, w2 * patch))
            items.append(frames.reshape(t, temporal, -1, h2 // merge, merge, patch, w2 // merge, merge, patch)
                         .permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h2 * w2, -1))
            new_grids.append([t, h2, w2])
            hu, wu, hn, wn = h // merge, w // merge, h2 // merge, w2 // merge
            rows = ((torch.arange(hn) + 0.5) * hu / hn).floor().long()  # the original token under each centre
            cols = ((torch.arange(wn) + 0.5) * wu / wn).floor().long()
            index = torch.arange(t)[:, None, None] * hu * wu + rows[None, :, None] * wu + cols[None, None, :]
            index = index.flatten()
            selected.append((index.to(x.device), (t, hn, wn), t * hu * wu))
        args = {**given, pixels_name: torch.cat(items), grid_name: torch.tensor(new_grids, device=grid_thw.device)}
        out = original(**{k: v for k, v in args.items() if k != "kwargs"}, **given.get("kwargs", {}))
        def placed(per_item) -> tuple:  # each item's new tokens at the placeholders they stand for
            features = []
            for (index, _, n), f in zip(selected, per_item):
                full = f.new_zeros(n, f.shape[-1])
                full[index] = f
                features.append(full)
            return tuple(features)

        for source, (index, grid, _) in enumerate(selected):
            stage.record(kind, source, Selected(index, grid))
        out.pooler_output = placed(out.pooler_output)
        if getattr(out, "deepstack_features", None) is not None:  # Qwen3-VL: per DeepStack layer, per item
            out.deepstack_features = [placed(layer) for layer in out.deepstack_features]
        return out

    def _tome_forward(self, press, stage, kind: str, pixels: Tensor, grid_thw: Tensor) -> BaseModelOutputWithPooling:
        """ToMe (``tome_vit``) in the Qwen-VL tower, in units of the patch merger's 2x2 window.

        Each block: x = x + attn(norm1(x)) with proportional attention (log of each patch's unit
        size added to the logits, SDPA's additive mask); then bipartite soft matching
        (``ops.merge.bipartite_soft_matching``) on the UNITS, a unit's metric being its 4 patches'
        rotated attention keys averaged over heads and patches; r units merged (``merge_wavg``:
        the size-weighted average of the units, patch slot by slot, so a merged unit is still 4
        patches the merger reads); then x = x + mlp(norm2(x)). A merged unit takes its
        representative's (the B unit's) rotary positions and, for the language model, its token.

        Windows: merging happens only WITHIN an attention window (Qwen2.5-VL's ``window_size``
        windows, a frame for Qwen2-VL, which attends over whole frames), so the window partition
        stays valid for every later windowed block and a frame is still the union of its
        windows for the full-attention blocks; r counts units per window per block (capped at
        half of the window's units, as ToMe caps at half the tokens). Token order within a window
        is ToMe's (unmerged A, then B); the features go out in raster order."""
        visual, merge, unit = self.vlm.visual, self.merge, self.merge**2
        grids = grid_thw.tolist()
        device = pixels.device
        total = pixels.shape[0] // unit
        if hasattr(visual, "fullatt_block_indexes"):
            window_index, cu_window = get_vision_window_index(grid_thw.cpu(), merge, visual.window_size,
                                                              visual.patch_size)
            windows = (cu_window[1:] - cu_window[:-1]).div(unit, rounding_mode="floor").tolist()
            full_blocks = set(visual.fullatt_block_indexes)
        else:
            window_index, windows, full_blocks = torch.arange(total), [], set(range(len(visual.blocks)))
        frames = [h * w // unit for t, h, w in grids for _ in range(t)]
        if not windows:
            windows = list(frames)
        # the frame of each window (frames are runs of consecutive windows in window order)
        frame_of, start, f = [], 0, 0
        for n in windows:
            if start >= sum(frames[: f + 1]):
                f += 1
            frame_of.append(f)
            start += n
        order = window_index.to(device)  # original unit ids in the current order
        patches = (order[:, None] * unit + torch.arange(unit, device=device)).flatten()
        hidden = visual.patch_embed(pixels[patches])
        cos_all, sin_all = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid_thw, merge).to(device))
        cos_all, sin_all = cos_all.view(total, unit, -1), sin_all.view(total, unit, -1)
        cos, sin = cos_all[order].flatten(0, 1), sin_all[order].flatten(0, 1)
        size = torch.ones(total, dtype=torch.float32, device=device)  # units each current unit stands for
        schedule, entering, work = press.schedule(len(visual.blocks)), [], []
        for i, block in enumerate(visual.blocks):
            entering.append(hidden.shape[0])
            segments = windows if i not in full_blocks else _sum_by(windows, frame_of)
            work.append(float(sum((n * unit) ** 2 for n in segments)))
            attn, keys = self._attention(block.attn, block.norm1(hidden), (cos, sin), segments, size, press.prop_attn)
            hidden = hidden + attn
            if schedule[i]:
                metric = keys.mean(dim=1).view(-1, unit, keys.shape[-1]).mean(dim=1)  # (units, d)
                hidden, size, order, windows = _merge_windows(hidden.view(-1, unit * hidden.shape[-1]), metric, size,
                                                              order, windows, schedule[i])
                hidden = hidden.view(-1, hidden.shape[-1] // unit)
                cos, sin = cos_all[order].flatten(0, 1), sin_all[order].flatten(0, 1)
            hidden = hidden + block.mlp(block.norm2(hidden))
        merged = visual.merger(hidden)
        raster = order.argsort()
        kept, merged = order[raster], merged[raster]
        out = merged.new_zeros(total, merged.shape[-1])
        out[kept] = merged
        sizes = [t * (h // merge) * (w // merge) for t, h, w in grids]
        bounds = torch.tensor([0, *sizes], device=device).cumsum(0)
        cuts = torch.searchsorted(kept, bounds).tolist()
        for source in range(len(grids)):
            stage.record(kind, source, Selected(kept[cuts[source]:cuts[source + 1]] - bounds[source]))
        stage.count_blocks(kind, [*entering, hidden.shape[0]], work)  # ToMe merges before the MLP: + tokens leaving
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=out)

    @staticmethod
    def _attention(module, x: Tensor, rotary: tuple[Tensor, Tensor], segments: list[int], size: Tensor,
                   proportional: bool) -> tuple[Tensor, Tensor]:
        """A Qwen-VL vision attention over ``segments`` (patch rows in units of 4, consecutive),
        with ToMe's proportional attention (log of each patch's unit size added to the logits)
        through SDPA; segments of one length run as one batch. Returns the output (S, C) and the
        rotated keys (S, heads, d)."""
        s, unit = x.shape[0], x.shape[0] // size.shape[0]
        q, k, v = module.qkv(x).reshape(s, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision(q, k, *rotary)
        out = torch.empty_like(q)
        bias = size.log().repeat_interleave(unit).to(q.dtype)
        lengths = torch.tensor(segments) * unit
        starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        for length in sorted(set(lengths.tolist())):
            rows = (starts[lengths == length][:, None] + torch.arange(length)).to(x.device)  # (G, L)
            qg, kg, vg = (t[rows].transpose(1, 2) for t in (q, k, v))  # (G, heads, L, d)
            mask = bias[rows][:, None, None, :] if proportional else None
            o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=module.scaling)
            out[rows.flatten()] = o.transpose(1, 2).flatten(0, 1)
        return module.proj(out.reshape(s, -1)), k

    def numbers_from_cache(self, kwargs: dict) -> bool:
        # without a mask or positions, Qwen numbers new tokens from the (pressed) cache length
        return kwargs.get("position_ids") is None and kwargs.get("attention_mask") is None

    def text_positions(self, attention_mask: Tensor, new: int) -> Tensor:
        # text continues every M-RoPE row from the prompt's largest id: the 1-D numbering plus
        # the offset transformers recorded for the last prefill (rope_deltas), as its generate does
        deltas = getattr(self.vlm, "rope_deltas", None)
        if deltas is None:
            raise ValueError("continue_positions: this Qwen-VL model ran no prefill with images to continue (no "
                             "rope_deltas); run the first turn first")
        pos = super().text_positions(attention_mask, new) + deltas.to(attention_mask.device)
        return pos.expand(3, *pos.shape)

    def visual_items(self, args, kwargs) -> list[Item]:
        items = []
        self._expect = []
        for kind, token_id in (("image", self.config.image_token_id), ("video", self.config.video_token_id)):
            pixels, grid = kwargs.get(f"pixel_values{'_videos' if kind == 'video' else ''}"), kwargs.get(f"{kind}_grid_thw")
            if pixels is not None:
                if grid is None:
                    raise ValueError(f"pressing a Qwen-VL {kind} needs {kind}_grid_thw (the processor returns it)")
                grids = grid.tolist()
                items += [Item(token_id, *self._shape(g), i, kind=kind) for i, g in enumerate(grids)]
                # this forward encodes images, then videos (transformers' order): their signals follow
                self._expect.append(token_id)
                self._signals[token_id] = None
                continue
            encoded = self.protocol.encoded_in(kwargs, kind)  # generate() encodes first
            if encoded:
                self._signals[token_id] = self._by_storage.get(encoded[0].untyped_storage().data_ptr())
                sizes: dict[int, int] = {}

                def describe(t, s, sizes=sizes):
                    sizes[s] = t.shape[0]
                    return {"length": t.shape[0], "grid": None}

                found = self.encoded_items(kwargs, kind, token_id, describe)
                lengths = [sizes[s] for s in range(len(sizes))]
                grids = next((g for g in reversed(self.grids_seen) if [self._shape(x)[0] for x in g] == lengths), None)
                items += found if grids is None else [replace(i, grid=self._shape(grids[i.source])[1]) for i in found]
        return items

    def _shape(self, grid_thw: list[int]) -> tuple[int, tuple[int, int, int]]:
        """Tokens and (t, h, w) token grid of one image / video of ``grid_thw`` patches."""
        t, h, w = grid_thw
        h, w = h // self.merge, w // self.merge
        return t * h * w, (t, h, w)

    # ---- cost and shapes ------------------------------------------------------------------------
    @classmethod
    def prefill_flops(cls, config, inputs: dict, seq_len: int, layer_seq_len=None) -> PrefillFlops:
        """The tower over every image and video of the batch (``*_grid_thw``, all rows together),
        the merger as the projector, and ``batch`` rows of ``seq_len`` LM tokens."""
        grids = [g for key in ("image_grid_thw", "video_grid_thw") if inputs.get(key) is not None
                 for g in inputs[key].tolist()]
        tower, merger = vision_flops(config.vision_config, grids) if grids else (0.0, 0.0)
        batch = inputs["input_ids"].shape[0]
        return PrefillFlops(tower, merger, language_flops(config.text_config, seq_len, batch, layer_seq_len))

    @classmethod
    def build(cls, size: str = "tiny", seed: int = 0, attn: str = "sdpa", model_type: str | None = None,
              **overrides):
        """"real": Qwen2.5-VL-7B (vision 32 x 1280, windows of 112 px, full attention in every 8th
        block) scaled for a CPU as LLaVA's shape: vision 8 x 640 with full attention in blocks 3
        and 7 and the shared 12 x 896 LM with M-RoPE; ``model_type="qwen2_vl"``: Qwen2-VL's tower
        (full attention everywhere, plain MLP of 4 x width). "tiny": a 2-block tower of 32, 4 px
        patches. ``fullatt_blocks``, ``window_size``, ``vision_intermediate`` and ``extra`` (other
        config fields) override."""
        from transformers import AutoConfig, AutoModelForImageTextToText

        model_type = model_type or cls.model_types[-1]
        if model_type not in cls.model_types:
            raise ValueError(f"{cls.family} builds {cls.model_types}, not {model_type!r}")
        real = dict(vision_layers=8, vision_hidden=640, patch_size=14, window_size=112)
        tiny = dict(vision_layers=2, vision_hidden=32, patch_size=4, window_size=16)
        shape = {**lm_shape(size), **(real if size == "real" else tiny), "merge": 2, "temporal_patch": 2,
                 "fullatt_blocks": None, "vision_intermediate": None, "extra": {}, **overrides}
        torch.manual_seed(seed)
        hidden, heads, depth = shape["lm_hidden"], shape["lm_heads"], shape["vision_layers"]
        half = hidden // heads // 2  # M-RoPE splits the rotary half of a head as 7B does
        mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        text = text_config(shape, rope_scaling={"type": "mrope", "mrope_section": mrope})
        width = shape["vision_hidden"]
        vision = dict(depth=depth, num_heads=max(1, width // 64) if size == "real" else 4,
                      patch_size=shape["patch_size"], spatial_merge_size=shape["merge"],
                      temporal_patch_size=shape["temporal_patch"], in_channels=3)
        tokens = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                      vision_end_token_id=VISION_END)
        vision.update(cls._vision_config(model_type, shape, text))
        config = AutoConfig.for_model(model_type, vision_config=vision, text_config=text, **tokens, **shape["extra"])
        config._attn_implementation = attn
        model = AutoModelForImageTextToText.from_config(config).eval()
        model.generation_config.pad_token_id = 0
        return model

    @staticmethod
    def _vision_config(model_type: str, shape: dict, text: dict) -> dict:
        width, depth = shape["vision_hidden"], shape["vision_layers"]
        if model_type == "qwen2_vl":
            return dict(embed_dim=width, hidden_size=shape["lm_hidden"], mlp_ratio=4 if width > 64 else 2)
        full = shape["fullatt_blocks"] or tuple(range(min(3, depth - 1), depth, 4))
        inter = shape["vision_intermediate"] or round(width * 1710 / 1280)
        return dict(hidden_size=width, intermediate_size=inter, out_hidden_size=shape["lm_hidden"],
                    window_size=shape["window_size"], fullatt_block_indexes=list(full))

    @classmethod
    def prompts(cls, model, rows: list, kind: str = "image", seed: int = 0, first_row: int = 0) -> dict:
        """Left-padded rows as the Qwen-VL processor lays them out: a few system tokens, each
        medium between vision-start / vision-end, a question of ragged length; pixels as flattened
        patches with their ``{kind}_grid_thw``. A medium is (h, w) px (an image) or (frames, h, w)
        (a video, two frames per temporal step)."""
        config = model.config
        vision = config.vision_config
        patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        vocab = config.text_config.vocab_size
        sequences, media = [], {"image": [], "video": []}
        for i, row in enumerate(rows):
            tokens = []
            for j, size in enumerate(row):
                frames, (h, w) = (size[0], size[1:]) if len(size) == 3 else (1, size)
                if h % (patch * merge) or w % (patch * merge):
                    raise ValueError(f"a Qwen-VL medium's sides must be multiples of {patch * merge} px, got {size}")
                is_video = len(size) == 3
                grid = (-(-frames // temporal), h // patch, w // patch)
                pixels = pixel_tensor((grid[0] * grid[1] * grid[2], 3 * temporal * patch**2), seed, first_row + i, j)
                media["video" if is_video else "image"].append((grid, pixels))
                tokens.append(cls._medium_tokens(config, grid, is_video))
            sequences.append(text_around(tokens, first_row + i, seed, 33 if vocab > 1000 else 12, vocab))
        inputs = left_pad(sequences)
        for name, items in media.items():
            if items:
                inputs["pixel_values" if name == "image" else "pixel_values_videos"] = torch.cat([p for _, p in items])
                inputs[f"{name}_grid_thw"] = torch.tensor([g for g, _ in items])
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # transformers >= 5.24
            ids = inputs["input_ids"]
            inputs["mm_token_type_ids"] = (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()
        return inputs

    @staticmethod
    def _medium_tokens(config, grid: tuple[int, int, int], video: bool) -> list[int]:
        merge = config.vision_config.spatial_merge_size
        n = grid[0] * grid[1] * grid[2] // merge**2
        token = config.video_token_id if video else config.image_token_id
        return [config.vision_start_token_id, *[token] * n, config.vision_end_token_id]

    @classmethod
    def encode(cls, model, inputs: dict) -> None:
        if inputs.get("pixel_values") is not None:
            model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        if inputs.get("pixel_values_videos") is not None:
            model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])


def _cu_lengths(segment: Tensor, count: int, unit: int) -> Tensor:
    """Cumulative lengths (int32, from 0) of ``count`` attention segments holding the units whose
    segment ids (ascending) are ``segment``, ``unit`` patches each; empty segments removed."""
    lengths = torch.bincount(segment, minlength=count) * unit
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return torch.unique_consecutive(cu)


def _attention_work(frames: list[int], windows: list[int], full: set, depth: int) -> list[float]:
    """Each block's attention work, the sum over its sequences of length squared (patches): frames
    in full-attention blocks, windows in the others (``Stats.vision_block_attention``)."""
    per_frame, per_window = float(sum(n * n for n in frames)), float(sum(n * n for n in windows))
    return [per_frame if i in full else per_window for i in range(depth)]


def _sum_by(lengths: list[int], groups: list[int]) -> list[int]:
    """Lengths of consecutive runs of equal group ids (frames as runs of windows)."""
    out: list[int] = []
    for n, (g, prev) in zip(lengths, zip(groups, [None, *groups])):
        if g == prev:
            out[-1] += n
        else:
            out.append(n)
    return out


def _merge_windows(x: Tensor, metric: Tensor, size: Tensor, order: Tensor, windows: list[int], r: int):
    """ToMe's merge within every window: units (U, 4C) in window order, ``windows`` their counts.
    Windows of one length are matched as one batch. Returns the merged units, their sizes,
    representatives' original ids (``order``) and the new window counts, still in window order."""
    lengths = torch.tensor(windows)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    new_lengths = [n - min(r, n // 2) for n in windows]
    new_starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(new_lengths).cumsum(0)[:-1]])
    out_x = x.new_empty(sum(new_lengths), x.shape[-1])
    out_size, out_order = size.new_empty(out_x.shape[0]), order.new_empty(out_x.shape[0])
    for n in sorted(set(windows)):
        pick = lengths == n
        rows = (starts[pick][:, None] + torch.arange(n)).to(x.device)  # (G, n)
        matching = bipartite_soft_matching(metric[rows], r)
        merged, merged_size = merge_wavg(x[rows], matching, size[rows])
        reps = merge_representatives(order[rows], matching)
        dest = (new_starts[pick][:, None] + torch.arange(n - matching.r)).to(x.device).flatten()
        out_x[dest], out_size[dest], out_order[dest] = merged.flatten(0, 1), merged_size.flatten(), reps.flatten()
    return out_x, out_size, out_order, new_lengths


class _Installed:
    """An instance attribute set for a `with` block (our tower forward, a wrapped method) and
    removed on exit, like a hook handle; a value the instance held before (accelerate's wrapped
    forward) comes back."""

    def __init__(self, owner, name: str, value):
        self.owner, self.name = owner, name
        self.before = owner.__dict__.get(name, _Installed)
        setattr(owner, name, value)

    def remove(self) -> None:
        if self.before is _Installed:
            self.owner.__dict__.pop(self.name, None)
        else:
            setattr(self.owner, self.name, self.before)
