"""``transformers.pipeline("image-text-to-text", model=model, processor=processor)`` inside
``with press(model):``: the pipeline's ``generate`` is pressed (``run.stats`` holds the kept
tokens) and gives the tokens the same press gives through ``model.generate`` on the processor's
inputs, on the embedded demo model (LLaVA: DINOv2 + SmolLM2) and a tiny Qwen2-VL (M-RoPE) with
a Hugging Face processor.

The pipeline takes a prompt string and ``images=``: the demo's chat template (SmolLM2's) takes
string contents only, so its prompt is the processor's chat template applied to a message
holding ``<image>`` (chat messages with ``{"type": "image"}`` parts fail in the template, pressed
or not)."""

from __future__ import annotations

import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen2VLProcessor

import mmpress
from mmpress.registry import FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 3  # new tokens per answer


def image(seed: int, size: tuple[int, int]) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(*size, 3, generator=g) * 255).byte().numpy())


def pipeline_ids(pipe, press, model, images, texts, **kwargs):
    """The pipeline's full sequences (prompt + answer) under ``press``, and the run's stats."""
    with press(model) as run:
        out = pipe(images=images, text=texts, max_new_tokens=NEW, generate_kwargs={"do_sample": False},
                   return_tensors=True, **kwargs)
    return [o["generated_token_ids"] for o in out], run


def generate_ids(press, model, processor, images, texts):
    """The same press through ``model.generate`` on the processor's left-padded batch."""
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with press(model) as run:
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(out[:, inputs["input_ids"].shape[1]:])], dim=1)
    return [row[m.bool()] for row, m in zip(out, mask)], run


# ---- the demo model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    model, processor = mmpress.load_demo()
    processor.tokenizer.padding_side = "left"
    return model, processor


def test_the_demo_pipeline_is_pressed_as_generate(demo):
    model, processor = demo
    press = mmpress.get_press("divprune", keep=16)
    pipe = transformers.pipeline("image-text-to-text", model=model, processor=processor)
    message = [{"role": "user", "content": "<image>\nWhat shape is in the image? Answer with one word."}]
    prompt = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    picture = image(0, (64, 64))
    (piped,), run = pipeline_ids(pipe, press, model, picture, prompt)
    (generated,), reference = generate_ids(press, model, processor, [picture], [prompt])
    assert run.stats == reference.stats and run.stats.kept_visual_tokens == 16 < run.stats.visual_tokens
    assert torch.equal(piped, generated)
    with press(model) as text_run:  # the default output (new text) works pressed too
        answer = pipe(images=picture, text=prompt, max_new_tokens=NEW, return_full_text=False)
    assert isinstance(answer[0]["generated_text"], str) and text_run.stats.kept_visual_tokens == 16


# ---- a tiny Qwen2-VL with its Hugging Face processor --------------------------------------------
def qwen2_vl_processor(model) -> Qwen2VLProcessor:
    """A word-level tokenizer over the tiny model's ids (its vision tokens at the config's ids)
    and a Qwen2-VL image processor of the tower's patch sizes."""
    config = model.config
    special = {"<pad>": 0, "<s>": 1, "</s>": 2, "<|image_pad|>": config.image_token_id,
               "<|video_pad|>": config.video_token_id, "<|vision_start|>": config.vision_start_token_id,
               "<|vision_end|>": config.vision_end_token_id}
    vocab = special | {f"w{i}": i for i in range(config.text_config.vocab_size) if i not in special.values()}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<pad>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in special if t.startswith("<|")]})
    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    images = Qwen2VLImageProcessorPil(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                      temporal_patch_size=vision.temporal_patch_size, min_pixels=unit * unit,
                                      max_pixels=unit * unit * 64)

    class Processor(Qwen2VLProcessor):  # no video processor here (it needs torchvision): images only
        def check_argument_for_proper_class(self, name, arg):
            return None

    return Processor(image_processor=images, tokenizer=tokenizer, video_processor=None)


@pytest.fixture(scope="module")
def qwen2_vl():
    model = FAMILIES["qwen_vl"].build("tiny", model_type="qwen2_vl")
    return model, qwen2_vl_processor(model)


def prompt(words: str) -> str:
    return f"w10 w11 <|vision_start|> <|image_pad|> <|vision_end|> {words}"


@pytest.mark.parametrize("name", ["divprune", "fastv", "snapkv"])
def test_a_qwen2_vl_pipeline_is_pressed_as_generate(qwen2_vl, name):
    model, processor = qwen2_vl
    press = mmpress.get_press(name, keep_ratio=0.5, **({"layer": 1} if name == "fastv" else {}))
    pipe = transformers.pipeline("image-text-to-text", model=model, processor=processor)
    picture, text = image(1, (32, 48)), prompt("w20 w21 w22")
    (piped,), run = pipeline_ids(pipe, press, model, picture, text)
    (generated,), reference = generate_ids(press, model, processor, [picture], [text])
    assert run.stats == reference.stats and run.stats.kept_visual_tokens == 12 < run.stats.visual_tokens == 24
    assert torch.equal(piped, generated)


def test_a_batched_qwen2_vl_pipeline_presses_each_row_as_alone(qwen2_vl):
    """Lists of images (of different sizes) and prompts (of different lengths) are one left-padded
    batch, one pressed ``generate``: each row's answer is the row's answer alone."""
    model, processor = qwen2_vl
    press = mmpress.get_press("divprune", keep_ratio=0.5)
    pipe = transformers.pipeline("image-text-to-text", model=model, processor=processor)
    pictures, texts = [image(2, (32, 32)), image(3, (48, 32))], [prompt("w20 w21 w22 w23 w24"), prompt("w30")]
    rows, run = pipeline_ids(pipe, press, model, pictures, texts)
    assert run.stats.items == 2 and run.stats.kept_visual_tokens == 20  # both rows in one pressed prefill
    for picture, text, row in zip(pictures, texts, rows):
        (alone,), _ = generate_ids(press, model, processor, [picture], [text])
        assert torch.equal(row[-len(alone):], alone)
