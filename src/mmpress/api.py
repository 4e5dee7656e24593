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


def check_inputs(images: Sequence, questions: Sequence) -> None:
    """ValueError unless every question is a non-empty string and no image is missing (None)."""
    for i, question in enumerate(questions):
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question {i} must be a non-empty string, got {question!r}")
    for i, image in enumerate(images):
        if image is None:
            raise ValueError(f"image {i} is None; pass a PIL image, e.g. PIL.Image.open(path).convert('RGB')")


def check_press(press) -> None:
    """ValueError unless ``press`` is None or a press object (a name is not: the press needs its budget)."""
    if isinstance(press, str):
        from mmpress.presses.base import PRESSES

        budget = ", keep=64" if press in PRESSES and PRESSES[press].needs_budget else ""
        raise ValueError(f"press={press!r} is a name, not a press: pass press=mmpress.get_press({press!r}{budget}) "
                         "(mmpress.list_presses() names them all)")
    if press is not None and not callable(press):
        raise ValueError(f"press must be a press object, e.g. mmpress.get_press('divprune', keep=64), "
                         f"got {type(press).__name__}")


def encode(model, processor, images: Sequence, questions: Sequence[str], hint: str | None = ANSWER_HINT) -> dict:
    """Left-padded model inputs for one image per question, on the model's device and dtype
    (left padding: every row ends where generation starts)."""
    check_inputs(images, questions)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [build_prompt(processor, q, hint) for q in questions]
    inputs = processor(images=list(images), text=prompts, return_tensors="pt", padding=True)
    param = next(model.parameters())
    # accelerate's offloaded weights sit on meta (its hooks move the inputs): the first real device
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    inputs = {k: v.to(device) for k, v in inputs.items()}
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

    ``press`` is a press object (``mmpress.get_press("divprune", keep=64)``), not its name: a name
    alone lacks the budget, so it is a ValueError naming the call to make. A question that is not
    a non-empty string, or a None image, is a ValueError too.
    """
    check_press(press)
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
