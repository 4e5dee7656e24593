"""Tiny random checkpoints vLLM can serve: the families' ``build("tiny")`` models saved with a
word-level tokenizer and the family's Hugging Face processor, so vLLM's multimodal processor and
mmpress's transformers path read the same weights and the same pixels (tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path

#: the tiny models' special tokens, at the ids the families' random configs use
_QWEN = {"<|image_pad|>": 3, "<|video_pad|>": 4, "<|vision_start|>": 5, "<|vision_end|>": 6}
_SPECIAL = {"llava": {"<image>": 3}, "qwen2_5_vl": _QWEN, "qwen2_vl": _QWEN}


def tokenizer(vocab: int, special: dict[str, int]):
    """A word-level tokenizer over ``vocab`` ids: ``special`` at their ids, ``w{i}`` elsewhere
    (prompts are given to vLLM as token ids; the tokenizer only has to name every id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {i: f"w{i}" for i in range(vocab)}
    names.update({0: "<pad>", 1: "<s>", 2: "</s>"})
    names.update({i: t for t, i in special.items()})
    core = Tokenizer(models.WordLevel({t: i for i, t in names.items()}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": list(special)})
    return tok


def save_tiny(family: str, folder: str | Path, seed: int = 0, size: str = "tiny", **overrides) -> Path:
    """Saves ``family``'s random model (float32) with a tokenizer and processor to ``folder``; returns it.
    ``size="real"`` and ``overrides`` go to the family's ``build`` (e.g. ``lm_layers=4``)."""
    import torch

    import mmpress.models  # noqa: F401  (registers the families)
    from mmpress.registry import FAMILIES

    folder = Path(folder)
    if size == "tiny":  # vLLM's CPU attention kernels take head sizes of 32 and up (the tiny LM's is 12)
        overrides = {"lm_hidden": 64, "lm_heads": 2, "lm_kv_heads": 1, "lm_intermediate": 128, **overrides}
    if family in ("qwen2_5_vl", "qwen2_vl"):
        overrides = {"model_type": family, **overrides}
    model = FAMILIES["qwen_vl" if family in ("qwen2_5_vl", "qwen2_vl") else family].build(
        size, seed=seed, **overrides).to(torch.float32)
    config = model.config
    vocab = config.text_config.vocab_size
    tok = tokenizer(vocab, _SPECIAL[family])
    if family == "llava":
        from transformers import CLIPImageProcessor, LlavaProcessor

        vision = config.vision_config
        side = vision.image_size
        image = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        processor = LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=vision.patch_size,
                                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                                   image_token="<image>", num_additional_image_tokens=1)
    elif family in ("qwen2_5_vl", "qwen2_vl"):
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        vision = config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        image = Qwen2VLImageProcessor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                      temporal_patch_size=vision.temporal_patch_size,
                                      min_pixels=unit * unit, max_pixels=unit * unit * 4096)
        video = Qwen2VLVideoProcessor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                      temporal_patch_size=vision.temporal_patch_size)
        kind = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor
        processor = kind(image_processor=image, tokenizer=tok, video_processor=video)
    else:
        raise ValueError(f"no tiny vLLM checkpoint for {family!r}: choose 'llava', 'qwen2_5_vl' or 'qwen2_vl'")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if family == "llava":
        _vllm_clip_names(folder / "model.safetensors")
    return folder


def _vllm_clip_names(path: Path) -> None:
    """transformers 5.x saves LLaVA's CLIP tower as ``vision_tower.*``; vLLM (and the released
    llava-hf checkpoints) name it ``vision_tower.vision_model.*``: rename the keys in place."""
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    prefix, renamed = "vision_tower.", {}
    for key, value in weights.items():
        if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
            key = prefix + "vision_model." + key[len(prefix):]
        renamed[key] = value
    save_file(renamed, path, metadata={"format": "pt"})
