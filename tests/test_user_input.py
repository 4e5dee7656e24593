"""A new user's inputs (issue 16): a resumed bench never reuses a row scored on other data, model
or press settings; JSONL fields are type-checked (a list of gold answers: any counts); a bad
input is one clear error, found before the model loads; models load without running their
folder's code; a mistyped press name gets the closest names."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

import mmpress
import mmpress.cli
from mmpress.cli import app
from mmpress.eval.bench import ResumeError, run_bench
from mmpress.eval.data import load_dataset
from mmpress.eval.metrics import accuracy, correctness, is_correct
from mmpress.presses.base import PRESSES, ScorerPress, get_press
from conftest import samples, tiny_llava, tiny_processor
from test_cli import _assert_one_line_error as _one_red_line
from test_cli import _no_model

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def _write_set(folder, records: list[dict]) -> str:
    for i, sample in enumerate(samples(len(records))):
        sample["image"].save(folder / f"{i}.png")
    path = folder / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ---- 1. resume: only rows of the same data, model and press settings ---------------------------
def _bench_args(data: str, out, *extra):
    return ["bench", "--model", "tiny", "--data", data, "--presses", "random", "--keep", "8", "--limit", "2",
            "--batch-size", "2", "--max-new-tokens", "1", "--repeats", "1", "--out", str(out), *extra]


@pytest.mark.parametrize("edit, says", [
    ("answer", "the data's answers (or choices) differ"),
    ("question", "the data's questions differ"),
    ("image", "the data's images differ"),
])
def test_cli_resume_refuses_rows_of_edited_data(tmp_path, monkeypatch, edit, says):
    """The earlier run's rows were scored against the data as it was: an edited answer, question or
    image (same file names, same n) is refused before the model loads, naming the part."""
    monkeypatch.setattr(mmpress.cli, "_load", lambda model_id: (tiny_llava(), tiny_processor()))
    records = [{"image": f"{i}.png", "question": "what color is the square?", "answer": a}
               for i, a in enumerate(["red", "blue"])]
    data = _write_set(tmp_path, records)
    assert runner.invoke(app, _bench_args(data, tmp_path / "out")).exit_code == 0
    if edit == "image":
        Image.new("RGB", (32, 32), "white").save(tmp_path / "1.png")
    else:
        records[1][edit] = "green" if edit == "answer" else "is there a circle?"
        (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(mmpress.cli, "_load", _no_model)
    line = _one_red_line(runner.invoke(app, _bench_args(data, tmp_path / "out", "--resume")), says)
    assert "run without --resume" in line and "another --out" in line


@dataclass
class _Norm(ScorerPress):
    name = "test-resume-norm"
    power: int = 1

    def score(self, tokens, ctx):
        return tokens.norm(dim=-1) ** self.power


@pytest.fixture(scope="module")
def earlier():
    """One finished bench run, as a JSON record, and what it ran."""
    PRESSES[_Norm.name] = _Norm
    try:
        data = samples(2)
        record = run_bench(tiny_llava(), tiny_processor(), [_Norm.name], [8], data, batch_size=2, max_new_tokens=1,
                           repeats=1, console=Console(file=io.StringIO()), dataset="tiny")
        yield json.loads(json.dumps(record)), data
    finally:
        PRESSES.pop(_Norm.name, None)


def _resume(previous, data, model=None, press=_Norm):
    PRESSES[_Norm.name] = press
    try:
        return run_bench(model or tiny_llava(), tiny_processor(), [_Norm.name], [8], data, batch_size=2,
                         max_new_tokens=1, repeats=1, console=Console(file=io.StringIO()), dataset="tiny",
                         previous=previous)
    finally:
        PRESSES.pop(_Norm.name, None)


def test_resume_of_the_same_run_reuses_its_rows(earlier):
    previous, data = earlier
    assert _resume(previous, data)["rows"] == previous["rows"]


def test_resume_refuses_another_model_of_the_same_shape(earlier):
    """Same class, config and parameter count (another seed: retrained weights): refused."""
    previous, data = earlier
    with pytest.raises(ResumeError, match="the model's weights differ"):
        _resume(previous, data, model=tiny_llava(seed=1))


def test_resume_refuses_rows_of_edited_data(earlier):
    previous, data = earlier
    edited = [dict(s) for s in data]
    edited[1]["answer"] = ["red", "crimson"]
    with pytest.raises(ResumeError, match="the data's answers"):
        _resume(previous, edited)
    edited = [dict(s) for s in data]
    edited[0]["image"] = Image.fromarray(255 - np.asarray(data[0]["image"]))
    with pytest.raises(ResumeError, match="the data's images differ"):
        _resume(previous, edited)


def test_resume_refuses_a_row_whose_press_settings_changed(earlier):
    """A press whose default changed since (e.g. another layer or sign) made the row's figures."""
    @dataclass
    class Squared(_Norm):
        power: int = 2

    previous, data = earlier
    with pytest.raises(ResumeError, match=r"press test-resume-norm keep=8: .*power 1 \(now 2\)"):
        _resume(previous, data, press=Squared)


def test_resume_refuses_a_record_without_fingerprint(earlier):
    previous, data = earlier
    older = {k: v for k, v in previous.items() if k != "fingerprint"}
    with pytest.raises(ResumeError, match="holds no fingerprint"):
        _resume(older, data)


# ---- 3. JSONL types: a list of gold answers; other types refused, naming file and line -------
def test_jsonl_answer_may_be_a_list_of_gold_answers(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    lines = [{"image": "a.png", "question": "What color?", "answer": ["red", "crimson"]},
             {"image": "a.png", "question": "How many?", "answer": 2}]
    (tmp_path / "set.jsonl").write_text("\n".join(map(json.dumps, lines)))
    first, second = load_dataset(tmp_path / "set.jsonl")
    assert first["answer"] == ["red", "crimson"] and second["answer"] == "2"
    assert is_correct("Crimson.", first) and is_correct("red", first) and not is_correct("blue", first)
    assert correctness(["crimson", "two"], [first, second]) == [True, True]
    assert accuracy(["blue", "2"], [first, second]) == 0.5


def test_multiple_choice_with_a_list_of_gold_answers():
    sample = {"answer": ["B", "red circle"], "choices": ["blue square", "red circle"]}
    assert is_correct("b", sample) and not is_correct("blue square", sample)


@pytest.mark.parametrize("field, value, says", [
    ("question", 42, "'question' must be a non-empty string, got number 42"),
    ("question", None, "'question' must be a non-empty string, got null"),
    ("question", " ", "'question' must be a non-empty string"),
    ("image", 123, "'image' must be an image file's path relative to set.jsonl (a string), got number 123"),
    ("image", None, "'image' must be an image file's path relative to set.jsonl (a string), got null"),
    ("answer", {"text": "red"}, "'answer' must be a string or a list of strings"),
    ("answer", True, "'answer' must be a string or a list of strings"),
    ("answer", 1.5, "'answer' must be a string or a list of strings"),
    ("answer", [], "'answer' as a list must hold one or more strings"),
    ("answer", ["red", None], "'answer' as a list must hold one or more strings"),
    ("kind", 3, "'kind' must be a string"),
])
def test_jsonl_field_of_another_type_names_file_and_line(tmp_path, field, value, says):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = {"image": "a.png", "question": "q", "answer": "red"}
    (tmp_path / "set.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, field: value}) + "\n")
    with pytest.raises(ValueError, match="set.jsonl:2: ") as error:
        load_dataset(tmp_path / "set.jsonl")
    assert says in str(error.value)


def test_disk_dataset_with_lists_of_answers(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 2, "question": ["q1", "q2"],
                                     "answer": [["red", "crimson"], ["blue"]]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert [s["answer"] for s in load_dataset(tmp_path / "ds")] == [["red", "crimson"], ["blue"]]


# ---- 7. one red line, before the model loads --------------------------------------------------
def test_empty_jsonl_is_refused(tmp_path):
    (tmp_path / "set.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="set.jsonl: no records"):
        load_dataset(tmp_path / "set.jsonl")


@pytest.mark.parametrize("case, says", [
    ("question 42", "set.jsonl:1: 'question' must be a non-empty string, got number 42"),
    ("question null", "set.jsonl:1: 'question' must be a non-empty string, got null"),
    ("image 123", "set.jsonl:1: 'image' must be an image file's path"),
    ("image null", "set.jsonl:1: 'image' must be an image file's path"),
    ("answer object", "set.jsonl:1: 'answer' must be a string or a list of strings"),
    ("empty jsonl", "set.jsonl: no records"),
    ("out is a file", "cannot write to"),
    ("out under a file", "cannot write to"),
    ("mistyped press", "unknown press 'divprun'; did you mean 'divprune'"),
])
def test_bench_refuses_before_the_model_loads(tmp_path, monkeypatch, case, says):
    monkeypatch.setattr(mmpress.cli, "_load", _no_model)
    (tmp_path / "tiny").mkdir()  # a model folder: the model itself never loads
    good = {"image": "0.png", "question": "q", "answer": "red"}
    field, _, value = case.partition(" ")
    bad = {**good, field: {"42": 42, "null": None, "123": 123, "object": {"a": 1}}.get(value)}
    data = _write_set(tmp_path, [bad if field in good else good])
    if case == "empty jsonl":
        (tmp_path / "set.jsonl").write_text("")
    out = {"out is a file": tmp_path / "0.png", "out under a file": tmp_path / "0.png" / "report"}.get(case,
                                                                                                       tmp_path / "out")
    args = ["bench", "--model", str(tmp_path / "tiny"), "--data", data, "--out", str(out)]
    if case == "mistyped press":
        args += ["--presses", "random,divprun"]
    _one_red_line(runner.invoke(app, args), says)


def test_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    """PIL's DecompressionBombError is no OSError: still a clear ValueError / one red line."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # an 8x8 image is over twice the limit
    monkeypatch.setattr(mmpress.cli, "_load", _no_model)
    Image.new("RGB", (8, 8)).save(tmp_path / "big.png")
    (tmp_path / "set.jsonl").write_text(json.dumps({"image": "big.png", "question": "q", "answer": "a"}))
    with pytest.raises(ValueError, match=r"set.jsonl:1: refused image .*big.png.*MAX_IMAGE_PIXELS"):
        load_dataset(tmp_path / "set.jsonl")
    result = runner.invoke(app, ["run", "--image", str(tmp_path / "big.png"), "what color?"])
    _one_red_line(result, "--image: refused image")


def test_ask_refuses_a_press_name_and_a_missing_question():
    model, processor = tiny_llava(), tiny_processor()
    image = samples(1)[0]["image"]
    with pytest.raises(ValueError, match=r"press='divprune' is a name, not a press: pass "
                                         r"press=mmpress.get_press\('divprune', keep=64\)"):
        mmpress.ask(model, processor, [image], ["what color?"], press="divprune")
    with pytest.raises(ValueError, match="press must be a press object"):
        mmpress.ask(model, processor, [image], ["what color?"], press=64)
    with pytest.raises(ValueError, match="question 0 must be a non-empty string, got None"):
        mmpress.ask(model, processor, [image], [None])
    with pytest.raises(ValueError, match="image 0 is None"):
        mmpress.ask(model, processor, [None], ["what color?"])
    with pytest.raises(ValueError, match="question 1 must be a non-empty string, got 42"):
        run_bench(model, processor, [], [8], [dict(s, question=q) for s, q in zip(samples(2), ["q", 42])])


# ---- 8. no code from the model's folder -----------------------------------------------------------
def _recording(calls: list, result):
    def from_pretrained(*args, **kwargs):
        calls.append(kwargs)
        return result

    return from_pretrained


def test_cli_loads_without_remote_code(monkeypatch):
    import transformers

    class Model:
        def eval(self):
            return self

    calls = []
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", _recording(calls, Model()))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", _recording(calls, "processor"))
    mmpress.cli._load("some/folder")
    assert len(calls) == 2 and all(kwargs.get("trust_remote_code") is False for kwargs in calls)


def test_demo_loads_without_remote_code(monkeypatch, tmp_path):
    import transformers

    import mmpress.demo

    for name in ("config.json", "processor_config.json"):  # a cache already built
        (tmp_path / name).write_text("{}")
    monkeypatch.setattr(mmpress.demo, "cache_dir", lambda: tmp_path)
    calls = []
    model = tiny_llava()
    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", _recording(calls, model))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", _recording(calls, tiny_processor()))
    mmpress.demo.load_base()
    assert len(calls) == 2 and all(kwargs.get("trust_remote_code") is False for kwargs in calls)


# ---- 9. a mistyped press name ---------------------------------------------------------------------
@pytest.mark.parametrize("typo, closest", [("divprun", "divprune"), ("VisionZip", "visionzip"),
                                           ("dart-llm", "dart_llm"), ("pdorp", "pdrop")])
def test_mistyped_press_name_suggests_the_closest(typo, closest):
    with pytest.raises(ValueError, match=f"unknown press '{typo}'; did you mean '{closest}'") as error:
        get_press(typo, keep=8)
    assert "choose one of: " in str(error.value)
    with pytest.raises(ValueError, match="unknown press 'xyz'; choose one of: "):
        get_press("xyz")


def test_bench_of_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = tiny_llava()
    with pytest.raises(ValueError, match="weights on the meta device"):
        run_bench(model, tiny_processor(), [], [8], samples(1), console=Console(file=io.StringIO()))


def test_run_refuses_an_empty_question(tmp_path, monkeypatch):
    monkeypatch.setattr(mmpress.cli, "_load", _no_model)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    _one_red_line(runner.invoke(app, ["run", "--image", str(tmp_path / "a.png"), " "]), "the question is empty")


def test_cli_suggests_the_closest_press(tmp_path, monkeypatch):
    monkeypatch.setattr(mmpress.cli, "_load", _no_model)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    result = runner.invoke(app, ["run", "--press", "divprun", "--keep", "8", "--image", str(tmp_path / "a.png"), "q"])
    _one_red_line(result, "unknown press 'divprun'; did you mean 'divprune'")


def test_disk_dataset_decompression_bomb_is_a_value_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "question": ["q"], "answer": ["a"]}).save_to_disk(
        str(tmp_path / "ds"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(ValueError, match="ds: row 0: refused its image"):
        load_dataset(tmp_path / "ds")
