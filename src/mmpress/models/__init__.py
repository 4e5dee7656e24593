"""Model adapters: all model knowledge lives here, one file per model family."""

from __future__ import annotations

from mmpress.models.llava import LlavaAdapter
from mmpress.models.qwen3_vl import Qwen3VLAdapter
from mmpress.models.qwen_vl import QwenVLAdapter
from mmpress.registry import ADAPTERS, get_adapter

ADAPTERS.update({"llava": LlavaAdapter, "qwen2_vl": QwenVLAdapter, "qwen2_5_vl": QwenVLAdapter,
                 "qwen3_vl": Qwen3VLAdapter})

# the signals each family's adapter provides (a press runs on a family that has all it needs)
LLM_SIGNALS = {"llm_attn", "llm_keys", "llm_normed", "visual_inputs"}  # the language model's: every family's core gives them
VISION_SIGNALS = {"grid", "cls_attn", "vision_keys", "cls_attn_concat", "vision_keys_concat", "vision_features", "text"}
FAMILY_SIGNALS = {"llava": VISION_SIGNALS | LLM_SIGNALS, "qwen_vl": VISION_SIGNALS | LLM_SIGNALS}
# what a family's vision signals are, where they are not what their name says (``mmpress list``)
FAMILY_NOTES = {
    "llava": "cls_attn = [CLS] row of the attention in the vision_feature_layer block; vision_keys = its keys; "
             "*_concat: the same from one softmax over the heads-concatenated q / k",
    "qwen_vl": "no [CLS]: cls_attn = mean attention each token receives in the last full-attention vision block "
               "(HiPrune's no-[CLS] saliency, arXiv 2508.00553); vision_keys = that block's rotated keys; "
               "*_concat: the same from one softmax over the heads-concatenated q / k",
}


__all__ = ["ADAPTERS", "FAMILY_NOTES", "FAMILY_SIGNALS", "LlavaAdapter", "Qwen3VLAdapter", "QwenVLAdapter", "get_adapter"]
