"""LLaVA-1.5 (vLLM's ``LlavaForConditionalGeneration``, a CLIP/SigLIP tower) pressed by mmpress.

Each image's projected features (one per patch; [CLS] first with the "full" strategy) are pressed
by the press, as mmpress's transformers LLaVA adapter presses them before the language model. The
processor writes ``press.budget(n)`` placeholders per image instead of ``n``, so the language
model reads a shorter prompt whose positions are 0..L'-1: the official numbering of LLaVA's
pre-LLM presses (``positions="reindex"``, what the transformers path gives them by default).
"""

from __future__ import annotations

from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo,
                                              _build_llava_or_pixtral_hf_info,
                                              _build_llava_or_pixtral_hf_processor)
from vllm.multimodal import MULTIMODAL_REGISTRY

from mmpress.vllm.core import (BASE_SIGNALS, ItemShape, PressedProcessor, attach_text, check_press, check_text_cache,
                               press_items, press_of, text_of)


class PressedLlavaProcessor(PressedProcessor, LlavaMultiModalProcessor):
    """vLLM's LLaVA processor writing each image's pressed placeholder count."""

    family = "LLaVA"

    def apply(self, inputs, timing_ctx):
        out = super().apply(inputs, timing_ctx)
        images = len(out["mm_placeholders"].get("image", ()))
        return attach_text(out, press_of(self.info.get_hf_config()), {"image": [self.info.get_max_image_tokens()] * images})


def _processor(info, dummy_inputs):
    if isinstance(info, LlavaProcessingInfo):
        return PressedLlavaProcessor(info, dummy_inputs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)  # Pixtral-HF: unpressed (refused below)


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_build_llava_or_pixtral_hf_info,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class PressedLlava(LlavaForConditionalGeneration):
    """vLLM's LLaVA with ``hf_overrides={"mmpress": ...}`` pressing every image's embeddings;
    vLLM's own model when the key is absent."""

    signals = BASE_SIGNALS

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.mmpress = press_of(self.config)
        if self.mmpress is not None:
            if self.config.vision_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
                raise ValueError(f"mmpress/vLLM presses LLaVA-1.5 (CLIP / SigLIP towers), not a "
                                 f"{self.config.vision_config.model_type} tower")
            check_press(self.mmpress, "LLaVA", self.signals)
            check_text_cache(self.mmpress, vllm_config.model_config)

    def embed_multimodal(self, **kwargs):
        embeddings = super().embed_multimodal(**kwargs)
        if self.mmpress is None or len(embeddings) == 0:
            return embeddings
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        full = self.config.vision_feature_select_strategy == "full"
        # LLaVA's adapter: a grid only when the tokens are exactly the patches (no [CLS] row)
        shape = ItemShape(side * side + full, None if full else (1, side, side), cls_first=full)
        text = text_of(kwargs, self.language_model.embed_input_ids, len(embeddings))
        kept, _ = press_items(self.mmpress, embeddings, [shape] * len(embeddings), text)
        return tuple(kept)
