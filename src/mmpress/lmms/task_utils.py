"""The hooks of the shipped lmms-eval tasks (each task folder's ``utils.py`` re-exports them, as
lmms-eval's ``!function utils.X`` reads a module next to the YAML).

The built-in tasks ship their questions only (``image_id``, question, answer, kind, as
``mmpress.eval.data`` gives them); each image is rebuilt from the ``scenes`` generator or read
from the ``easy-vqa`` package by its ``image_id``, so the package holds no image copies and the
questions are exactly those of ``mmpress bench --data scenes / easy-vqa``.
"""

from __future__ import annotations

from functools import lru_cache

from PIL import Image

from mmpress.api import ANSWER_HINT
from mmpress.eval.data import IMAGE_SIZE, exact_match, scene


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question and the one-word hint, as ``mmpress.api.build_prompt`` writes them (the demo
    model was trained on exactly this text)."""
    kwargs = lmms_eval_specific_kwargs or {}
    post = kwargs.get("post_prompt", f" {ANSWER_HINT}")
    return f"{kwargs.get('pre_prompt', '')}{doc['question'].strip()}{post}"


@lru_cache(maxsize=64)
def _image(image_id: str) -> Image.Image:
    source, split, index = image_id.split("/")
    if source == "scenes":
        return scene(split, int(index))[0]
    if source == "easy-vqa":
        import easy_vqa

        paths = easy_vqa.get_test_image_paths() if split == "test" else easy_vqa.get_train_image_paths()
        with Image.open(paths[int(index)]) as im:
            return im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    raise ValueError(f"unknown image_id {image_id!r}: expected scenes/<split>/<n> or easy-vqa/<split>/<n>")


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [_image(doc["image_id"])]


def process_results(doc: dict, results: list) -> dict:
    """``accuracy``: 1 if the answer matches the gold one after ``normalize_answer`` (as ``mmpress
    bench`` scores), else 0."""
    answer = results[0] if results else ""
    return {"accuracy": float(exact_match(answer if isinstance(answer, str) else str(answer), doc["answer"]))}
