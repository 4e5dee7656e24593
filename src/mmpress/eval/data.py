"""Labelled visual-question data for measuring what a press costs in answer quality.

Built in:

* ``"scenes"``: a seeded procedural generator of 224x224 scenes with 2-6 small shapes. Its
  questions need *detail* (is a particular small object there, what colour is it, how many, which
  is left of which), so dropping the wrong visual tokens costs answers; whole-image gist does not
  suffice. No downloads; train and test come from disjoint seed streams, so test is never trained on.
* ``"easy-vqa"``: the ``easy-vqa`` package (one shape per 64x64 image), upsampled to 224.

Plus loaders for a local JSONL file of ``{image, question, answer}`` (image path relative to the
file; ``answer`` a string or a list of acceptable answers) and a ``datasets`` dataset saved with
``save_to_disk``. Every loader returns a list of dicts
``{image: PIL.Image, question, answer, kind, image_id}``; ``image_id`` lets callers cache per-image
work (e.g. vision features) when several questions share an image.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
KINDS = ("exist", "color", "shape", "count", "left")

# Train and test draw scenes from different seed streams (the first entropy word), so they can
# never share a scene, whatever their sizes.
_SPLIT_STREAM = {"train": 0, "test": 1}
_DEFAULT_SIZE = {"train": 12_000, "test": 600}
QUESTIONS_PER_SCENE = 3


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    x: float  # centre, pixels
    y: float
    radius: float  # half the bounding-box side


def sample_scene(rng: np.random.Generator) -> list[SceneObject]:
    """2-6 objects with distinct (colour, shape) pairs, placed on a jittered grid so none overlap.

    Distinct pairs make every "the red square" reference unambiguous.
    """
    n = int(rng.integers(2, 7))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    cells = rng.choice(16, size=n, replace=False)  # 4x4 grid of 56 px cells
    objects = []
    for pair_idx, cell in zip(chosen, cells):
        color, shape = pairs[pair_idx]
        radius = float(rng.uniform(9, 20))
        cx = (cell % 4) * 56 + 28 + rng.uniform(-(27 - radius), 27 - radius)
        cy = (cell // 4) * 56 + 28 + rng.uniform(-(27 - radius), 27 - radius)
        objects.append(SceneObject(shape, color, float(cx), float(cy), radius))
    return objects


def render_scene(objects: list[SceneObject], rng: np.random.Generator) -> Image.Image:
    """Draw the objects on a light, slightly noisy background."""
    base = int(rng.integers(225, 256))
    noise = rng.integers(-8, 9, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for o in objects:
        fill = COLORS[o.color]
        box = (o.x - o.radius, o.y - o.radius, o.x + o.radius, o.y + o.radius)
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        elif o.shape == "triangle":
            top = (o.x, o.y - o.radius)
            draw.polygon([top, (o.x - o.radius, o.y + o.radius), (o.x + o.radius, o.y + o.radius)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return image


def _plural(shape: str) -> str:
    return shape + "s"


def ask_about_scene(objects: list[SceneObject], kind: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """One (question, answer) of ``kind`` about the scene, or None if the scene cannot pose it.

    Yes/no answers are drawn 50/50 (absent combinations and swapped pairs supply the "no"s).
    """
    present = {(o.color, o.shape) for o in objects}
    if kind == "exist":
        if rng.random() < 0.5:
            o = objects[int(rng.integers(len(objects)))]
            return f"Is there a {o.color} {o.shape}?", "yes"
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        c, s = absent[int(rng.integers(len(absent)))]
        return f"Is there a {c} {s}?", "no"
    if kind == "color":
        unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return f"What color is the {o.shape}?", o.color
    if kind == "shape":
        unique = [o for o in objects if sum(p.color == o.color for p in objects) == 1]
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return f"What shape is the {o.color} object?", o.shape
    if kind == "count":
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        count = sum(o.shape == shape for o in objects)
        return f"How many {_plural(shape)} are there?", str(count)
    if kind == "left":
        # pairs far enough apart horizontally that "left of" is unambiguous to a viewer
        pairs = [(a, b) for a in objects for b in objects if a is not b and abs(a.x - b.x) > 20]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        if rng.random() < 0.5:  # answer balanced by question wording, not by scene layout
            a, b = (a, b) if a.x < b.x else (b, a)
        else:
            a, b = (a, b) if a.x > b.x else (b, a)
        answer = "yes" if a.x < b.x else "no"
        return f"Is the {a.color} {a.shape} left of the {b.color} {b.shape}?", answer
    raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")


def scene(split: str, index: int) -> tuple[Image.Image, list[SceneObject], np.random.Generator]:
    """Scene ``index`` of ``split``: deterministic in (split, index) alone."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    rng = np.random.default_rng([_SPLIT_STREAM[split], index])
    objects = sample_scene(rng)
    return render_scene(objects, rng), objects, rng


def scenes_dataset(split: str = "test", limit: int | None = None) -> list[dict]:
    """Scene questions, ``QUESTIONS_PER_SCENE`` per image of distinct kinds, kinds rotated so each
    kind is equally frequent. Each sample also carries ``objects`` (the ground truth)."""
    size = _DEFAULT_SIZE[split] if split in _DEFAULT_SIZE else None
    n = size if limit is None else limit
    if n is None:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    samples: list[dict] = []
    index = 0
    while len(samples) < n:
        image, objects, rng = scene(split, index)
        start = index * QUESTIONS_PER_SCENE
        asked = 0
        for offset in range(len(KINDS)):
            if asked == QUESTIONS_PER_SCENE or len(samples) == n:
                break
            kind = KINDS[(start + offset) % len(KINDS)]
            qa = ask_about_scene(objects, kind, rng)
            if qa is None:
                continue
            samples.append(
                dict(image=image, question=qa[0], answer=qa[1], kind=kind,
                     image_id=f"scenes/{split}/{index}", objects=objects)
            )
            asked += 1
        index += 1
    return samples


def easy_vqa_dataset(split: str = "test", limit: int | None = None, seed: int = 0) -> list[dict]:
    """easy-vqa questions in a fixed shuffled order (so a ``limit`` covers all question types),
    images upsampled from 64x64 to 224x224."""
    import easy_vqa

    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    order = order[:limit] if limit is not None else order
    cache: dict[int, Image.Image] = {}
    samples = []
    for i in order:
        image_id = image_ids[i]
        if image_id not in cache:
            with Image.open(paths[image_id]) as im:
                cache[image_id] = im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        question = texts[i][:1].upper() + texts[i][1:]
        samples.append(dict(image=cache[image_id], question=question, answer=answers[i],
                            kind=_easy_vqa_kind(texts[i]), image_id=f"easy-vqa/{split}/{image_id}"))
    return samples


def _easy_vqa_kind(question: str) -> str:
    if question.startswith("what color"):
        return "color"
    if question.startswith("what"):
        return "shape"
    return "exist"


def jsonl_dataset(path: str | Path, limit: int | None = None) -> list[dict]:
    """Records ``{image, question, answer[, kind]}``, one JSON object a line, ``image`` a path
    relative to the file. ``answer`` is a string (a whole number is read as its digits) or a
    list of acceptable answers, any of which counts as right (as VQA scores its several human
    answers). A record that is not such an object, a field of another type, or an image that
    cannot be read, is a ValueError naming file and line; so is a file without a record."""
    path = Path(path)
    samples = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected an object {{image, question, answer}}, "
                                 f"got {type(record).__name__}")
            missing = {"image", "question", "answer"} - record.keys()
            if missing:
                raise ValueError(f"{where}: record lacks {sorted(missing)}")
            image = record["image"]
            if not isinstance(image, str) or not image.strip():
                raise ValueError(f"{where}: 'image' must be an image file's path relative to {path.name} "
                                 f"(a string), got {_shown(image)}")
            image_path = path.parent / image
            samples.append(dict(image=read_image(image_path, where), question=_question(record["question"], where),
                                answer=_answer(record["answer"], where), kind=_kind(record.get("kind", "jsonl"), where),
                                image_id=str(image_path)))
            if limit is not None and len(samples) == limit:
                break
    if not samples:
        raise ValueError(f"{path}: no records (the file is empty); one JSON object a line: "
                         '{"image": "a.png", "question": "...", "answer": "..."}')
    return samples


def _shown(value) -> str:
    """A JSON value as a user wrote it, with its JSON type: ``null``, ``number 42``, ``array [...]``."""
    kind = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)
    return kind if value is None else f"{kind} {json.dumps(value, default=repr)[:60]}"


def _question(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string, got {_shown(value)}")
    return value


def _answer(value, where: str) -> str | list[str]:
    """The gold answer: a string, or a non-empty list of acceptable answers (any one counts)."""
    def one(v):
        if isinstance(v, str):
            return v
        if isinstance(v, int) and not isinstance(v, bool):  # "answer": 2 for a count: exact as digits
            return str(v)
        return None

    if value is None:
        raise ValueError(f"{where}: 'answer' is null; give the reference answer as a string")
    if isinstance(value, (list, tuple)):
        answers = [one(v) for v in value]
        if not answers or None in answers:
            raise ValueError(f"{where}: 'answer' as a list must hold one or more strings (any of them counts as "
                             f"right), got {_shown(list(value))}")
        return answers
    answer = one(value)
    if answer is None:
        raise ValueError(f"{where}: 'answer' must be a string or a list of strings (any of them counts as right), "
                         f"got {_shown(value)}")
    return answer


def _kind(value, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: 'kind' must be a string (a question type to group accuracy by), "
                         f"got {_shown(value)}")
    return value


def read_image(path: str | Path, where: str | None = None) -> Image.Image:
    """The image file at ``path`` as RGB; a file PIL cannot read is a ValueError (prefixed with
    ``where``), a decompression bomb (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` allows) too."""
    prefix = f"{where}: " if where else ""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"{prefix}no such image file {path}") from None
    except Image.DecompressionBombError as e:  # not an OSError: PIL's guard against a file that would fill memory
        raise ValueError(f"{prefix}refused image {path}: {e} Shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS "
                         "if you trust the file") from None
    except OSError as e:  # PIL's UnidentifiedImageError, a truncated file, a folder
        raise ValueError(f"{prefix}cannot read image {path} ({e})") from None


def disk_dataset(path: str | Path, split: str = "test", limit: int | None = None) -> list[dict]:
    """A ``datasets`` Dataset (or DatasetDict, indexed by ``split``) saved with ``save_to_disk``,
    with columns image (PIL image or path), question, answer and optionally kind."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path} has splits {list(ds)}, not {split!r}")
        ds = ds[split]
    missing = {"image", "question", "answer"} - set(ds.column_names)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    samples = []
    for i in range(len(ds)):
        where = f"{path}: row {i}"
        try:
            row = ds[i]  # datasets decodes the image here
        except Image.DecompressionBombError as e:
            raise ValueError(f"{where}: refused its image: {e} Shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS "
                             "if you trust the file") from None
        image = row["image"]
        if isinstance(image, str):
            image = read_image(Path(path) / image, where)
        elif isinstance(image, Image.Image):
            image = image.convert("RGB")
        else:
            raise ValueError(f"{where}: 'image' must be a PIL image or an image file's path, got {_shown(image)}")
        samples.append(dict(image=image, question=_question(row["question"], where),
                            answer=_answer(row["answer"], where), kind=_kind(row.get("kind") or "disk", where),
                            image_id=f"{path}/{split}/{i}"))
    if not samples:
        raise ValueError(f"{path}: no rows in split {split!r}")
    return samples


def load_dataset(name_or_path: str | Path, split: str = "test", limit: int | None = None) -> list[dict]:
    """Load a labelled VQA set: ``"scenes"``, ``"easy-vqa"``, a ``.jsonl`` file, or a folder saved
    by ``datasets``. Returns dicts ``{image, question, answer, kind, image_id}``."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (None: every sample), got {limit}")
    name = str(name_or_path)
    if name == "scenes":
        return scenes_dataset(split, limit)
    if name in ("easy-vqa", "easy_vqa"):
        return easy_vqa_dataset(split, limit)
    if name == "spoken":  # audio rows {audio, question, answer, kind}: mmpress.eval.spoken
        from mmpress.eval.spoken import spoken_dataset

        return spoken_dataset(split, limit)
    path = Path(name)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise ValueError(f"no such file: {path}")
        return jsonl_dataset(path, limit)
    if path.is_dir():
        return disk_dataset(path, split, limit)
    raise ValueError(
        f"unknown dataset {name!r}: expected 'scenes', 'easy-vqa', 'spoken', a .jsonl file or a folder "
        "written by datasets' save_to_disk"
    )


_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(s: str) -> str:
    """Lower-case, punctuation and articles dropped, number words as digits, spaces collapsed."""
    words = _PUNCT.sub(" ", str(s).lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def exact_match(pred: str, gold: str | Sequence[str]) -> bool:
    """True if the normalised prediction equals the normalised gold answer, or one of them when
    ``gold`` is a list of acceptable answers."""
    golds = [gold] if isinstance(gold, str) else gold
    return normalize_answer(pred) in {normalize_answer(g) for g in golds}
