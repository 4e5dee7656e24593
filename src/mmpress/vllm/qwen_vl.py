"""Qwen2.5-VL and Qwen2-VL (vLLM's ``Qwen2_5_VLForConditionalGeneration``,
``Qwen2VLForConditionalGeneration``) pressed by mmpress.

Each image's merged tokens (raster order over its (t, h, w) grid after the 2x2 merge) are pressed
by the press, as mmpress's transformers Qwen-VL adapter presses them. The processor writes
``press.budget(n)`` image placeholders per image.

Positions are those of the transformers path (``models/qwen_vl.py``): a kept token keeps its 3-D
M-RoPE id, the text keeps the ids it has in the unpressed prompt, and decoding continues from the
unpressed prompt's largest id (its ``rope_deltas``). vLLM numbers a prompt before the encoder
runs, so this happens in two steps, as vLLM's EVS does it:

1. ``get_mrope_input_positions`` (at request time) gives the text its unpressed ids and the delta
   of the unpressed prompt; the placeholders get provisional ids;
2. ``embed_multimodal`` appends to each kept token its (t, h, w) offsets within the image (3
   channels), and ``recompute_mrope_positions`` (called by the model runner on the gathered
   embeddings, chunked prefill included) strips them and writes each placeholder's id: the id of
   the token before its image (``<|vision_start|>``) + 1 + its offsets.

Videos are not pressed through vLLM yet: a pressed model refuses a video request.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.model_executor.models.qwen2_vl import (Qwen2VLDummyInputsBuilder, Qwen2VLForConditionalGeneration,
                                                 Qwen2VLMultiModalProcessor, Qwen2VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from mmpress.vllm.core import (BASE_SIGNALS, ItemShape, PressedProcessor, attach_text, check_press, check_text_cache,
                               press_items, press_of, text_of)

#: channels appended to a pressed image's embeddings: the kept token's (t, h, w) offsets
_OFFSETS = 3


class _QwenProcessor(PressedProcessor):
    """A Qwen-VL processor writing each image's pressed placeholder count."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        if press_of(self.info.get_hf_config()) is not None and mm_items.get_count("video", strict=False):
            raise ValueError(f"mmpress/vLLM presses {self.family}'s images, not its videos yet: send images, or serve "
                             "this model without the 'mmpress' hf_override for video requests")
        return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)

    def apply(self, inputs, timing_ctx):
        out = super().apply(inputs, timing_ctx)
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        counts = {"image": [int(item["image_grid_thw"].data.prod()) // merge**2
                            for item in out["mm_kwargs"].get("image", ()) if item is not None]}
        return attach_text(out, press_of(self.info.get_hf_config()), counts)


def with_offsets(x: torch.Tensor, index: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """A pressed image's kept embeddings (k, D) with their (t, h, w) offsets in its ``grid``
    appended (k, D + 3): what ``recompute_mrope_positions`` reads back."""
    t, h, w = grid
    if x.dtype not in (torch.float32, torch.float64) and max(t, h, w) > 256:
        raise ValueError(f"mmpress/vLLM: a {t}x{h}x{w} grid's offsets are not exact in {x.dtype}")
    offsets = torch.stack([index // (h * w), index // w % h, index % w], dim=1)
    return torch.cat([x, offsets.to(x.dtype)], dim=1)


class _PressedQwen:
    """A vLLM Qwen-VL model with ``hf_overrides={"mmpress": ...}`` pressing every image's
    embeddings; vLLM's own model when the key is absent."""

    signals = BASE_SIGNALS
    family = ""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.mmpress = press_of(self.config)
        if self.mmpress is not None:
            check_press(self.mmpress, self.family, self.signals)
            check_text_cache(self.mmpress, vllm_config.model_config)
            if getattr(self, "is_multimodal_pruning_enabled", False):
                raise ValueError("mmpress/vLLM: a press and vLLM's own video pruning (video_pruning_rate) cannot "
                                 "run together; drop one")
        # the runner calls recompute_mrope_positions only when this is set (core.enable_position_recompute)
        self.mmpress_recomputes_positions = self.mmpress is not None

    # ---- pressing ---------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs):
        embeddings = super().embed_multimodal(**kwargs)
        if self.mmpress is None or len(embeddings) == 0:
            return embeddings
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_embeds") is not None:
            raise ValueError(f"mmpress/vLLM presses {self.family}'s images, not its videos")
        merge = self.config.vision_config.spatial_merge_size
        grids = [(t, h // merge, w // merge) for t, h, w in kwargs["image_grid_thw"].tolist()]
        shapes = [ItemShape(t * h * w, (t, h, w)) for t, h, w in grids]
        text = text_of(kwargs, self.language_model.embed_input_ids, len(embeddings))
        kept, indices = press_items(self.mmpress, embeddings, shapes, text)
        return tuple(with_offsets(x, index, grid) for x, index, grid in zip(kept, indices, grids))

    # ---- positions --------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens, mm_features):
        """vLLM's Qwen2.5-VL numbering of the UNPRESSED prompt, read at the pressed prompt's
        columns: text ids as unpressed, each image's k placeholders the first k ids of its grid
        (provisional: ``recompute_mrope_positions`` writes the kept tokens' ids), and the delta of
        the unpressed prompt (decoding continues after its largest id)."""
        if self.mmpress is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        pieces, st, next_id = [], 0, 0
        for feature, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(features)):
            text = offset - st
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_id)
            grid = np.indices((t, h, w)).reshape(3, -1)
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            base = next_id + text
            k = feature.mm_position.length
            pieces.append(grid[:, :k] + base)
            next_id = int(grid.max()) + base + 1  # the unpressed image's largest id + 1
            st = offset + k
        text = len(input_tokens) - st
        pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_id)
        positions = np.concatenate(pieces, axis=1).reshape(3, -1)
        return torch.from_numpy(positions), int(next_id + text - len(input_tokens))

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Strips the offsets ``embed_multimodal`` appended and writes each gathered placeholder's
        id: its image's base id (the id of the token before the image + 1) + its offsets. The
        gathered embeddings fill the first placeholders from ``num_computed_tokens`` on, in order."""
        if self.mmpress is None:
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                     num_computed_tokens)
        positions = mrope_positions.clone()
        stripped = [x[:, :-_OFFSETS] for x in multimodal_embeddings]
        rows = sum(x.shape[0] for x in multimodal_embeddings)
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=positions.device)
        delta = int(positions[:, -1].max()) + 1 - ids.numel()  # the prompt ends with text: its unpressed ids
        if rows == 0:
            return stripped, positions, delta
        image = ids == self.config.image_token_id
        cols = torch.arange(ids.numel(), device=ids.device)
        starts = image & ~torch.cat([image.new_zeros(1), image[:-1]])
        run_start = torch.where(starts, cols, 0).cummax(dim=0).values  # each column's run start
        targets = cols[image & (cols >= num_computed_tokens)][:rows]
        if targets.numel() != rows:
            raise RuntimeError(f"mmpress/vLLM: {rows} gathered embeddings for {targets.numel()} placeholders")
        base = positions[:, run_start[targets] - 1] + 1  # (3, R): the id after <|vision_start|>
        offsets = torch.cat([x[:, -_OFFSETS:] for x in multimodal_embeddings]).round().long().T
        positions[:, targets] = (base + offsets.to(positions.device)).to(positions.dtype)
        return stripped, positions, delta


class PressedQwen2_5_VLProcessor(_QwenProcessor, Qwen2_5_VLMultiModalProcessor):
    family = "Qwen2.5-VL"


@MULTIMODAL_REGISTRY.register_processor(PressedQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class PressedQwen2_5_VL(_PressedQwen, Qwen2_5_VLForConditionalGeneration):
    family = "Qwen2.5-VL"


class PressedQwen2VLProcessor(_QwenProcessor, Qwen2VLMultiModalProcessor):
    family = "Qwen2-VL"


@MULTIMODAL_REGISTRY.register_processor(PressedQwen2VLProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class PressedQwen2_VL(_PressedQwen, Qwen2VLForConditionalGeneration):
    family = "Qwen2-VL"
