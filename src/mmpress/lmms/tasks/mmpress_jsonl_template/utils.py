"""Hooks of a JSONL task (see the YAML next to this file). Edit freely in your copy."""

from pathlib import Path

from PIL import Image

from mmpress.eval.data import exact_match, read_image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The row's image: ``image`` is a path relative to this folder, or absolute (a PIL image
    when the rows come from a save_to_disk folder)."""
    image = doc["image"]
    if isinstance(image, Image.Image):
        return [image.convert("RGB")]
    return [read_image(HERE / image, f"question {doc['question']!r}")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question'].strip()}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict, results: list) -> dict:
    """accuracy: 1 if the answer equals the gold one (or one of a list) after normalisation
    (lower case, punctuation and articles dropped, number words as digits)."""
    answer = results[0] if results else ""
    return {"accuracy": float(exact_match(str(answer), doc["answer"]))}
