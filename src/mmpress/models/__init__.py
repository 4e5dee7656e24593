"""Model adapters: all model knowledge lives here, one file per model family. Each family file
registers its adapter (``@family``); importing it here is the family's one registry line."""

from __future__ import annotations

from mmpress.models import llava, qwen3_vl, qwen_vl  # noqa: F401  (the registry lines)
from mmpress.models.base import LLM_SIGNALS, VISION_SIGNALS
from mmpress.models.llava import LlavaAdapter
from mmpress.models.qwen3_vl import Qwen3VLAdapter
from mmpress.models.qwen_vl import QwenVLAdapter
from mmpress.registry import ADAPTERS, FAMILIES, get_adapter

__all__ = ["ADAPTERS", "FAMILIES", "LLM_SIGNALS", "VISION_SIGNALS", "LlavaAdapter", "Qwen3VLAdapter", "QwenVLAdapter",
           "get_adapter"]
