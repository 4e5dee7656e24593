"""Qwen-VL family (transformers ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``): where its visual tokens are. The pressing itself is the
shared core (``models/base.py``).

Where the visual tokens are: the vision tower merges each 2x2 block of patches into one token,
so an image of ``image_grid_thw`` (t, H, W) patches gives t * H/2 * W/2 tokens, written in raster
order over (t, h, w) at the positions of ``image_token_id`` (videos: ``video_token_id``,
``video_grid_thw``), between vision-start/end tokens. Images of one batch may differ in size;
the core presses items of the same grid together.

Positions: 3-D M-RoPE ids (t, h, w) computed by the model from the unpressed prompt (as (3, B, L),
or (4, B, L) with a text row when generate prepares them). Kept tokens keep their ids, the text
after an image keeps its own, and ``rope_deltas`` (computed on the unpressed prompt) keeps
decoding in the original coordinates, consistent with the pressed cache. ``positions="reindex"``
is not offered: a renumbered 1-D sequence has no meaning for M-RoPE.

Signals: the tower has no [CLS] token. Presses needing [CLS] attention (VisionZip, VTC-CLS,
PruMerge, VisPruner) raise a ValueError naming the missing signal; presses using the tokens,
the grid or the text work.
"""

from __future__ import annotations

from mmpress.models.base import Adapter, Item, encoded_sources


class QwenVLAdapter(Adapter):
    """Applies presses to a Qwen2-VL / Qwen2.5-VL model (positions are always kept)."""

    family = "qwen_vl"
    position_modes = ("keep",)

    def __init__(self, model, positions: str = "keep"):
        super().__init__(model, positions)
        if not hasattr(self.vlm, "visual"):
            raise ValueError(f"{type(model).__name__} does not look like a transformers Qwen-VL model")
        if getattr(self.config, "model_type", "").startswith("qwen3"):
            raise ValueError("Qwen3-VL injects DeepStack visual features into early language-model layers at the "
                             "visual positions; mmpress does not press them consistently yet, so it refuses rather "
                             "than give wrong answers. Supported: qwen2_vl, qwen2_5_vl")
        self.token_ids = (self.config.image_token_id, self.config.video_token_id)
        self.merge = self.config.vision_config.spatial_merge_size
        self.grids_seen: list[list[list[int]]] = []  # grid_thw of the last vision-tower calls

    def signal_hooks(self, press) -> list:
        # generate() encodes images before the forward and passes only their features: the grids
        # are recorded where the tower sees them
        return [self.vlm.visual.register_forward_pre_hook(self._record_grids, with_kwargs=True)]

    def _record_grids(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is not None:
            self.grids_seen = [*self.grids_seen[-3:], grid.tolist()]  # before the tower's work is queued

    def numbers_from_cache(self, kwargs: dict) -> bool:
        # without a mask or positions, Qwen numbers new tokens from the (pressed) cache length
        return kwargs.get("position_ids") is None and kwargs.get("attention_mask") is None

    def visual_items(self, args, kwargs) -> list[Item]:
        items = []
        for kind, token_id in (("image", self.config.image_token_id), ("video", self.config.video_token_id)):
            pixels, grid = kwargs.get(f"pixel_values{'_videos' if kind == 'video' else ''}"), kwargs.get(f"{kind}_grid_thw")
            if pixels is not None:
                if grid is None:
                    raise ValueError(f"pressing a Qwen-VL {kind} needs {kind}_grid_thw (the processor returns it)")
                grids = grid.tolist()
                items += [Item(token_id, *self._shape(g), i) for i, g in enumerate(grids)]
                continue
            encoded = self.protocol.encoded_in(kwargs, kind)  # generate() encodes first
            if encoded:
                sources = encoded_sources(encoded) or list(range(len(encoded)))
                lengths = [encoded[sources.index(s)].shape[0] for s in range(max(sources) + 1)]
                grids = next((g for g in reversed(self.grids_seen) if [self._shape(x)[0] for x in g] == lengths), None)
                items += [Item(token_id, t.shape[0], None if grids is None else self._shape(grids[s])[1], s)
                          for t, s in zip(encoded, sources)]
        return items

    def _shape(self, grid_thw: list[int]) -> tuple[int, tuple[int, int, int]]:
        """Tokens and (t, h, w) token grid of one image / video of ``grid_thw`` patches."""
        t, h, w = grid_thw
        h, w = h // self.merge, w // self.merge
        return t * h * w, (t, h, w)
