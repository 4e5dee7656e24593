"""The VQA data: deterministic scenes whose answers agree with what is drawn, loaders, metrics."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from mmpress.eval.data import (
    COLORS,
    KINDS,
    SHAPES,
    exact_match,
    load_dataset,
    normalize_answer,
    scene,
)


def _pixels(sample):
    return np.asarray(sample["image"])


def test_scenes_are_deterministic():
    a = load_dataset("scenes", "test", limit=30)
    b = load_dataset("scenes", "test", limit=30)
    assert [(s["question"], s["answer"]) for s in a] == [(s["question"], s["answer"]) for s in b]
    assert all(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(a, b))


def test_scene_images_are_224_rgb():
    sample = load_dataset("scenes", "train", limit=1)[0]
    assert sample["image"].size == (224, 224) and sample["image"].mode == "RGB"
    assert set(sample) >= {"image", "question", "answer", "kind", "image_id"}


def test_train_and_test_scenes_are_disjoint():
    train = {_pixels(s).tobytes() for s in load_dataset("scenes", "train", limit=300)}
    test = {_pixels(s).tobytes() for s in load_dataset("scenes", "test", limit=300)}
    assert not train & test
    assert len(train) == 100 and len(test) == 100  # 3 questions per scene


def test_all_question_kinds_appear_and_yes_no_is_balanced():
    samples = load_dataset("scenes", "test", limit=600)
    kinds = {s["kind"] for s in samples}
    assert kinds == set(KINDS)
    yes_no = [s["answer"] for s in samples if s["kind"] in ("exist", "left")]
    assert 0.4 < yes_no.count("yes") / len(yes_no) < 0.6


def _find(objects, color=None, shape=None):
    return [o for o in objects if (color is None or o.color == color) and (shape is None or o.shape == shape)]


@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_agree_with_the_scene(split):
    colors, shapes = "|".join(COLORS), "|".join(SHAPES)
    for s in load_dataset("scenes", split, limit=300):
        objects, q, a = s["objects"], s["question"], s["answer"]
        assert 2 <= len(objects) <= 6
        if m := re.fullmatch(rf"Is there a ({colors}) ({shapes})\?", q):
            assert a == ("yes" if _find(objects, *m.groups()) else "no")
        elif m := re.fullmatch(rf"What color is the ({shapes})\?", q):
            (o,) = _find(objects, shape=m[1])
            assert a == o.color
        elif m := re.fullmatch(rf"What shape is the ({colors}) object\?", q):
            (o,) = _find(objects, color=m[1])
            assert a == o.shape
        elif m := re.fullmatch(rf"How many ({shapes})s are there\?", q):
            assert a == str(len(_find(objects, shape=m[1])))
        elif m := re.fullmatch(rf"Is the ({colors}) ({shapes}) left of the ({colors}) ({shapes})\?", q):
            (first,) = _find(objects, m[1], m[2])
            (second,) = _find(objects, m[3], m[4])
            assert abs(first.x - second.x) > 20
            assert a == ("yes" if first.x < second.x else "no")
        else:
            pytest.fail(f"unexpected question {q!r}")


def test_objects_are_drawn_in_their_colour():
    image, objects, _ = scene("test", 7)
    pixels = np.asarray(image)
    for o in objects:
        # a triangle is widest at its base, so probe below the box centre, inside it
        y = o.y + o.radius / 3 if o.shape == "triangle" else o.y
        assert tuple(pixels[int(y), int(o.x)]) == COLORS[o.color]


def test_easy_vqa_loads_upsampled():
    samples = load_dataset("easy-vqa", "test", limit=20)
    assert len(samples) == 20
    assert all(s["image"].size == (224, 224) for s in samples)
    assert {s["kind"] for s in samples} <= {"exist", "color", "shape"}
    assert load_dataset("easy-vqa", "test", limit=5)[0]["question"] == samples[0]["question"]


def test_jsonl_loader(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    lines = [{"image": "a.png", "question": "What color?", "answer": "red"}] * 3
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    samples = load_dataset(tmp_path / "set.jsonl", limit=2)
    assert len(samples) == 2 and samples[0]["answer"] == "red"
    assert samples[0]["image"].getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("line, says", [
    ('{"image": "a.png", "question": "q"', r"set.jsonl:2: not valid JSON"),
    ('["a.png", "q", "red"]', r"set.jsonl:2: expected an object"),
    ('{"image": "a.png", "question": "q"}', r"set.jsonl:2: record lacks \['answer'\]"),
    ('{"image": "a.png", "question": "q", "answer": null}', r"set.jsonl:2: 'answer' is null"),
    ('{"image": "b.png", "question": "q", "answer": "red"}', r"set.jsonl:2: no such image file .*b.png"),
    ('{"image": "notes.txt", "question": "q", "answer": "red"}', r"set.jsonl:2: cannot read image .*notes.txt"),
])
def test_jsonl_mistakes_name_file_and_line(tmp_path, line, says):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    good = json.dumps({"image": "a.png", "question": "q", "answer": "red"})
    (tmp_path / "set.jsonl").write_text(f"{good}\n{line}\n")
    with pytest.raises(ValueError, match=says):
        load_dataset(tmp_path / "set.jsonl")


def test_disk_loader(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    ds = datasets.Dataset.from_dict(
        {"image": images, "question": ["q1", "q2"], "answer": ["red", "blue"]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    samples = load_dataset(tmp_path / "ds")
    assert [s["answer"] for s in samples] == ["red", "blue"]
    assert samples[1]["image"].getpixel((0, 0)) == (0, 0, 255)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("no-such-set")
    with pytest.raises(ValueError, match="split"):
        load_dataset("scenes", "validation")
    for limit in (-1, 0):  # 0 is a mistake, not "everything"
        with pytest.raises(ValueError, match="limit must be >= 1"):
            load_dataset("scenes", limit=limit)
    with pytest.raises(ValueError, match="no such file"):
        load_dataset("missing.jsonl")


@pytest.mark.parametrize(
    "raw, normal",
    [("Yes.", "yes"), ("  The Circle!", "circle"), ("Two", "2"), ("an apple", "apple"), ("three  cats", "3 cats")],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_exact_match():
    assert exact_match("Yes.", "yes")
    assert exact_match("two", "2")
    assert not exact_match("yes, there is", "yes")
    assert not exact_match("red", "blue")
