"""Model adapters: all model knowledge lives here, one file per model family. Each family file
registers its adapter (``@family``); importing it here is the family's one registry line."""

from __future__ import annotations

from mmpress.models import llava  # noqa: F401  (one registry line per family, below)
from mmpress.models import qwen_vl  # noqa: F401
from mmpress.models import qwen3_vl  # noqa: F401
from mmpress.models import llava_next  # noqa: F401
from mmpress.models import llava_onevision  # noqa: F401
from mmpress.models import idefics3  # noqa: F401
from mmpress.models import gemma3  # noqa: F401
from mmpress.models import internvl  # noqa: F401
from mmpress.models import mistral3  # noqa: F401
from mmpress.models import qwen3_5  # noqa: F401
from mmpress.models import qwen2_5_omni  # noqa: F401
from mmpress.models import qwen2_audio  # noqa: F401
from mmpress.models.base import LLM_SIGNALS, VISION_SIGNALS
from mmpress.models.llava import LlavaAdapter
from mmpress.models.qwen3_vl import Qwen3VLAdapter
from mmpress.models.qwen_vl import QwenVLAdapter
from mmpress.registry import ADAPTERS, FAMILIES, get_adapter

__all__ = ["ADAPTERS", "FAMILIES", "LLM_SIGNALS", "VISION_SIGNALS", "LlavaAdapter", "Qwen3VLAdapter", "QwenVLAdapter",
           "get_adapter"]
