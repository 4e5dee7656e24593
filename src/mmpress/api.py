"""The one-call entry point: ask a vision-language model questions about images, optionally pressed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

ANSWER_HINT = "Answer with one word."


def image_token(processor) -> str:
    """The processor's image placeholder (``<image>`` for LLaVA)."""
    return getattr(processor, "image_token", None) or "<image>"


def build_prompt(processor, question: str, hint: str | None = ANSWER_HINT) -> str:
    """A single-turn chat prompt holding one image placeholder, ready for generation.

    Uses the processor's (or tokenizer's) chat template so each model gets its own format; the
    demo model was trained on exactly this prompt.
    """
    text = f"{image_token(processor)}\n{question.strip()}"
    if hint:
        text = f"{text} {hint}"
    messages = [{"role": "user", "content": text}]
    template_owner = processor if getattr(processor, "chat_template", None) else processor.tokenizer
    return template_owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(model, processor, images: Sequence, questions: Sequence[str], hint: str | None = ANSWER_HINT) -> dict:
    """Left-padded model inputs for one image per question, on the model's device and dtype
    (left padding: every row ends where generation starts)."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [build_prompt(processor, q, hint) for q in questions]
    inputs = processor(images=list(images), text=prompts, return_tensors="pt", padding=True)
    param = next(model.parameters())
    inputs = {k: v.to(param.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    return inputs


@torch.inference_mode()
def ask(
    model,
    processor,
    images,
    questions,
    press=None,
    max_new_tokens: int = 8,
    hint: str | None = ANSWER_HINT,
) -> list[str]:
    """Answer ``questions`` about ``images`` (one image per question) with greedy decoding.

    The batch is left-padded so every sequence ends where generation starts. When ``press`` is
    given, generation runs inside ``with press(model):`` so its hooks are removed afterwards
    whatever happens. Returns the decoded new tokens of each answer, stripped. A single image and
    question may be passed without wrapping them in lists.
    """
    if isinstance(questions, str):
        questions = [questions]
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        images = [images]
    images, questions = list(images), list(questions)
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images but {len(questions)} questions; pass one image per question")
    if not questions:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    inputs = encode(model, processor, images, questions, hint)
    tokenizer = processor.tokenizer
    generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    if press is None:
        output = model.generate(**inputs, **generate_kwargs)
    else:
        with press(model):
            output = model.generate(**inputs, **generate_kwargs)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
