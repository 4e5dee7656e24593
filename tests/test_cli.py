"""The command line: list, run (JSON record), bench (end to end, interrupted, resumed), bench-cost,
their quick default grids (--full: the whole one) and 80-column tables, and a user's mistakes: one
red line and a non-zero exit, never a traceback (unless --debug)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

import mmpress
import mmpress.cli
import mmpress.eval.bench
from mmpress.cli import BENCH_GRIDS, COST_GRIDS, app
from mmpress.eval.report import prefill_table, print_table
from mmpress.presses.base import PRESSES
from conftest import save_tiny_set

runner = CliRunner()  # click >= 8.2 keeps stderr (weight-loading bars) out of result.stdout


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model saved to a folder, an image, and a 4-sample JSONL data set beside its images."""
    root = tmp_path_factory.mktemp("cli")
    save_tiny_set(root, 4)
    (root / "not-an-image.png").write_text("plain text")
    return root


def test_list_shows_every_press():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    for name in mmpress.list_presses():
        assert name in result.output


def test_run_prints_a_json_record(files):
    result = runner.invoke(app, ["run", "--model", str(files / "tiny"), "--press", "divprune", "--keep", "16",
                                 "--image", str(files / "0.png"), "--json", "--max-new-tokens", "2",
                                 "what color is the square?"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["kept_tokens"] == 16 and record["total_tokens"] == 64
    assert record["prefill_seconds"] > 0 and 0 < record["flops_saved"] < 1


# ---- a user's mistakes ------------------------------------------------------------------------
def _jsonl(files, name: str, lines: list[str]) -> str:
    path = files / name
    path.write_text("\n".join(lines))
    return str(path)


RUN_ERRORS = {  # extra arguments of `run` -> what the one line says
    "unknown press": (["--press", "nope"], "unknown press 'nope'"),
    "keep 0": (["--press", "divprune", "--keep", "0"], "keep must be a positive int"),
    "keep abc": (["--press", "divprune", "--keep", "abc"], "'--keep'"),
    "keep and keep-ratio": (["--press", "divprune", "--keep", "8", "--keep-ratio", "0.5"], "not both"),
    "keep-ratio 2": (["--press", "divprune", "--keep-ratio", "2"], "keep_ratio must be a number in (0, 1]"),
    "budget for none": (["--keep", "8"], "press 'none' takes no budget: drop keep=8"),
    "missing model": (["--model", "{files}/no-such-model"], "no such model folder"),
    "missing image": (["--image", "{files}/missing.png"], "does not exist"),
    "image is a folder": (["--image", "{files}"], "is a directory"),
    "not an image": (["--image", "{files}/not-an-image.png"], "cannot identify image file"),
}


@pytest.mark.parametrize("case", RUN_ERRORS)
def test_run_mistakes_are_one_line(files, monkeypatch, case):
    monkeypatch.setattr(mmpress.cli, "_load", _no_model)  # every mistake is found before the model loads
    extra, says = RUN_ERRORS[case]
    args = ["run", "--image", str(files / "0.png"), *(a.format(files=files) for a in extra), "a question"]
    _assert_one_line_error(runner.invoke(app, args), says)


BENCH_ERRORS = {  # extra arguments of `bench` -> what the one line says
    "unknown press": (["--presses", "divprune,nope"], "unknown press 'nope'"),
    "empty press name": (["--presses", "divprune,"], "unknown press ''"),
    "keep 0": (["--keep", "0"], "positive ints"),
    "keep abc": (["--keep", "abc"], "positive ints"),
    "keep 16,,8": (["--keep", "16,,8"], "got '16,,8'"),
    "limit 0": (["--limit", "0"], "'--limit'"),
    "batch size 0": (["--batch-size", "0"], "'--batch-size'"),
    "missing model": (["--model", "{files}/no-such-model"], "no such model folder"),
    "missing jsonl": (["--data", "{files}/missing.jsonl"], "no such file"),
    "unknown data": (["--data", "no-such-set"], "unknown dataset"),
    "malformed jsonl": (["--data", "{bad_json}"], "bad.jsonl:2: not valid JSON"),
    "null answer": (["--data", "{null_answer}"], "null.jsonl:1: 'answer' is null"),
    "missing image": (["--data", "{no_image}"], "noimage.jsonl:1: no such image file"),
    "corrupt record to resume": (["--resume", "--out", "{files}/corrupt"], "bench.json is not JSON"),
}


@pytest.mark.parametrize("case", BENCH_ERRORS)
def test_bench_mistakes_are_one_line(files, monkeypatch, case):
    monkeypatch.setattr(mmpress.cli, "_load", _no_model)
    good = json.dumps({"image": "0.png", "question": "q", "answer": "yes"})
    paths = dict(files=files, bad_json=_jsonl(files, "bad.jsonl", [good, '{"image": "0.png",']),
                 null_answer=_jsonl(files, "null.jsonl", ['{"image": "0.png", "question": "q", "answer": null}']),
                 no_image=_jsonl(files, "noimage.jsonl", ['{"image": "nope.png", "question": "q", "answer": "a"}']))
    (files / "corrupt").mkdir(exist_ok=True)
    (files / "corrupt" / "bench.json").write_text("{truncated")
    extra, says = BENCH_ERRORS[case]
    args = ["bench", "--model", str(files / "tiny"), "--data", str(files / "set.jsonl"), "--limit", "4",
            *(a.format(**paths) for a in extra)]
    _assert_one_line_error(runner.invoke(app, args), says)


def test_bench_cost_mistakes_are_one_line():
    _assert_one_line_error(runner.invoke(app, ["bench-cost", "--presses", "nope"]), "unknown press 'nope'")
    _assert_one_line_error(runner.invoke(app, ["bench-cost", "--keeps", "64,x"]), "positive ints")


def test_debug_shows_the_traceback(files):
    args = ["run", "--press", "nope", "--image", str(files / "0.png"), "q"]
    result = runner.invoke(app, ["--debug", *args])
    assert isinstance(result.exception, ValueError) and "unknown press" in str(result.exception)
    # as a user sees it: the installed entry point, with and without --debug
    command = [sys.executable, "-c", "from mmpress.cli import main; main()"]
    plain, debug = [subprocess.Popen(command + a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for a in (args, ["--debug", *args])]
    plain_err, debug_err = plain.communicate()[1], debug.communicate()[1]
    assert plain.returncode == 2 and plain_err.count("\n") == 1 and "Traceback" not in plain_err
    assert debug.returncode != 0 and "Traceback" in debug_err and "unknown press" in debug_err


def _no_model(model_id):
    raise AssertionError("the model loaded before the arguments were checked")


def _assert_one_line_error(result, says: str) -> str:
    """A user's mistake as the CLI promises it: exit 2, one line 'error: ...', no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert says in lines[0] and "Traceback" not in result.output, lines[0]
    return lines[0]


# ---- bench end to end ---------------------------------------------------------------------------
def _bench(files, out, *extra):
    return runner.invoke(app, ["bench", "--model", str(files / "tiny"), "--data", str(files / "set.jsonl"),
                               "--presses", "random,divprune", "--keep", "16,8", "--limit", "4", "--batch-size", "4",
                               "--max-new-tokens", "2", "--repeats", "1", "--out", str(out), *extra])


def _cells(record: dict) -> list[tuple]:
    return [(row["press"], row["keep"]) for row in record["rows"]]


ALL_CELLS = {("none", None), ("random", 16), ("random", 8), ("divprune", 16), ("divprune", 8)}


def test_bench_writes_the_record_and_report(files, tmp_path):
    result = _bench(files, tmp_path)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "bench.json").read_text())
    assert set(_cells(record)) == ALL_CELLS and record["pending"] == []
    assert record["model"]["id"] == str(files / "tiny") and record["n"] == 4
    assert record["rows"][0]["press"] == "none" and all(len(row["answers"]) == 4 for row in record["rows"])
    assert {p.name for p in tmp_path.iterdir()} == {"bench.json", "bench.md", "bench.png", "bench.html"}
    assert "wrote" in result.stdout


def test_bench_interrupted_keeps_finished_cells_and_resumes(files, tmp_path, monkeypatch):
    answered, generate = [], mmpress.eval.bench._generate

    def interrupt_in_the_third(model, processor, inputs, press, max_new_tokens):  # Ctrl-C while cell 3 answers
        if len(answered) == 2:  # the unpressed reference and the first pressed cell (one batch each)
            raise KeyboardInterrupt
        answered.append(press.name)
        return generate(model, processor, inputs, press, max_new_tokens)

    monkeypatch.setattr(mmpress.eval.bench, "_generate", interrupt_in_the_third)
    result = _bench(files, tmp_path)
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output and "--resume" in result.stderr
    first = json.loads((tmp_path / "bench.json").read_text())
    finished = set(_cells(first))
    assert len(finished) == 2 and ("none", None) in finished  # the baseline, then the first pressed cell
    assert {(c["press"], c["keep"]) for c in first["pending"]} == ALL_CELLS - finished
    assert any(note.startswith("interrupted") for note in first["notes"])
    assert {"bench.md", "bench.png", "bench.html"} <= {p.name for p in tmp_path.iterdir()}
    assert "bench.json.tmp" not in {p.name for p in tmp_path.iterdir()}

    generated = []

    def recording(model, processor, inputs, press, max_new_tokens):
        generated.append((press.name or "none", press.keep))
        return generate(model, processor, inputs, press, max_new_tokens)

    monkeypatch.setattr(mmpress.eval.bench, "_generate", recording)
    result = _bench(files, tmp_path, "--resume")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "bench.json").read_text())
    assert set(_cells(record)) == ALL_CELLS and record["pending"] == []
    assert set(generated) == {("none", None)} | (ALL_CELLS - finished)  # the reference answers again, nothing else
    rows = {(row["press"], row["keep"]): row for row in record["rows"]}
    for row in first["rows"]:
        assert rows[(row["press"], row["keep"])] == row  # kept as it was, not recomputed

    monkeypatch.setattr(mmpress.cli, "_load", _no_model)  # other settings: refused before the model loads
    result = _bench(files, tmp_path, "--resume", "--max-new-tokens", "3")
    _assert_one_line_error(result, "error: cannot resume a run made with other data, model or settings: "
                                   f"max_new_tokens 2 (now 3). {tmp_path / 'bench.json'} cannot be resumed; run "
                                   "without --resume (it starts afresh), or use another --out")


def test_bench_cost_on_a_small_shape(tmp_path):
    out = tmp_path / "rows.json"
    result = runner.invoke(app, ["bench-cost", "--presses", "random,divprune", "--keeps", "64,16", "--repeats", "1",
                                 "--lm-layers", "1", "--lm-hidden", "64", "--lm-intermediate", "128", "--lm-heads", "2",
                                 "--vision-layers", "1", "--vision-hidden", "64", "--image-size", "112",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert [(r["press"], r["keep"]) for r in rows] == [("none", 64), ("random", 16), ("divprune", 16)]
    assert all(r["limit"] > 1 for r in rows[1:])
    for row in rows:  # one round: no spread to speak of, but the fields are there
        assert row["speedup_range"] == [row["speedup"]] * 2 and len(row["speedup_rounds"]) == 1
    machine = record["machine"]
    assert len(machine["load_before"]) == len(machine["load_after"]) == 3 and machine["threads"] >= 1
    assert machine["cpus"] >= 1 and "load average" in result.output


# ---- default grids: quick unless --full ---------------------------------------------------------
def test_default_grids_are_quick_and_full_is_the_whole_grid():
    quick, full = mmpress.cli.grid(BENCH_GRIDS, False), mmpress.cli.grid(BENCH_GRIDS, True)
    assert quick["presses"] == "divprune,visionzip,vispruner,random" and full["presses"] == "all"
    assert quick["keep"] == "64,16" and full["keep"] == "128,64,32,16"
    assert (quick["data"], quick["limit"], quick["timing_batch"]) == ("easy-vqa", 24, 1)
    assert (full["data"], full["limit"], full["timing_batch"]) == ("scenes", 200, None)
    assert quick["out"] != full["out"]  # a quick run never resumes from a full one, nor overwrites it
    cells = {f: len(mmpress.cli._press_names(g["presses"])) * len(g["keep"].split(",")) * g["limit"]
             for f, g in ((False, quick), (True, full))}
    assert cells[True] > 50 * cells[False]
    given = mmpress.cli.grid(BENCH_GRIDS, True, keep="8", limit=3)  # an option given wins over either grid
    assert (given["keep"], given["limit"], given["presses"]) == ("8", 3, "all")

    quick, full = mmpress.cli.grid(COST_GRIDS, False), mmpress.cli.grid(COST_GRIDS, True)
    assert quick == {"presses": "divprune,visionzip,vispruner,random", "keeps": "128,64"}
    assert full == {"presses": "all", "keeps": "576,192,128,64"}


def test_bench_passes_the_quick_grid_by_default(monkeypatch):
    """`mmpress bench` with no options: the quick grid reaches run_bench (which stops it there)."""
    called = {}

    def stop(model, processor, presses, keeps, data, **options):
        called.update(presses=presses, keeps=keeps, n=len(data), **options)
        raise ValueError("stopped before running")

    monkeypatch.setattr(mmpress.cli, "_load", lambda model_id: (None, None))
    monkeypatch.setattr(mmpress.eval.bench, "run_bench", stop)
    result = runner.invoke(app, ["bench"])
    assert result.exit_code == 2 and "stopped before running" in result.output
    assert called["presses"] == ["divprune", "visionzip", "vispruner", "random"] and called["keeps"] == [64, 16]
    assert called["n"] == 24 and called["timing_batch"] == 1 and called["dataset"] == "easy-vqa:test"


# ---- tables fit an 80-column terminal -------------------------------------------------------------
def _rendered(table_or_print) -> list[str]:
    console = Console(width=80, record=True, file=io.StringIO())
    table_or_print(console)
    return console.export_text().splitlines()


def _fits_80_columns(lines: list[str]) -> None:
    assert max(map(len, lines)) <= 80, "\n".join(lines)
    assert not any("…" in line for line in lines), "\n".join(lines)  # no cell cut


def _bench_record() -> dict:
    """A record of every registered press at two budgets (and a KV press), with wide numbers."""
    row = dict(kept_tokens=64.0, avg_tokens=160.25, accuracy=0.875, agreement=0.4375, kl=12.34567,
               flops={"total": 7.95e10}, flops_ratio=0.4545, prefill_s=12.3456, speedup=10.25, speedup_limit=12.5,
               peak_memory_bytes=2**31, kv_bytes=2**25, answers=[])
    rows = [dict(row, press="none", keep=None, stage="none", kept_tokens=256.0, avg_tokens=256.0)]
    presses = [(name, PRESSES[name].stage) for name in mmpress.list_presses() if name != "none"] + [("snapkv", "kv")]
    rows += [dict(row, press=name, keep=keep, stage=stage, layer_kept=[[12, keep]] if stage == "in_llm" else None)
             for name, stage in presses for keep in (64, 16)]
    return {"model": {"name": "/root/.cache/mmpress/demo-v1", "visual_tokens_per_image": 256},
            "dataset": "easy-vqa:test", "n": 24, "labelled": True, "quality_metric": "accuracy", "rows": rows,
            "notes": ["keep=256 skipped: not below the model's 256 visual tokens per image"],
            "settings": {"repeats": 3, "timing_batch": 1, "device": "cpu", "peak_memory": "profiler"}}


def test_bench_table_fits_80_columns():
    record = _bench_record()
    lines = _rendered(lambda console: print_table(record, console))
    _fits_80_columns(lines)
    text = "\n".join(lines)
    for header in ("avg", "accuracy", "agreement", "KL", "speedup", "limit"):  # quality and cost side by side
        assert header in text
    for cell in ("0.875", "0.438", "12.3457", "160", "10.25x", "12.50x", "vispruner", "visionzip", "64@L12",
                 "16@KV"):
        assert cell in text
    wide = Console(width=250, record=True, file=io.StringIO())
    print_table(record, wide)
    text = wide.export_text()
    assert "kept/img" in text and "avg/img" in text and "FLOPs ratio" in text and "0.455" in text
    assert "peak mem" in text and "none (unpressed)" in text  # a wide terminal: every column


def test_bench_cost_table_fits_80_columns():
    rows = [dict(press="none", keep=576, seconds=12.3456, speedup=1.0, limit=1.0, efficiency=1.0, overhead=0.0)]
    presses = [(name, PRESSES[name].stage) for name in mmpress.list_presses() if name != "none"] + [("snapkv", "kv")]
    rows += [dict(press=name, keep=keep, stage=stage, layer_kept=[[12, keep]] if stage == "in_llm" else None,
                  avg_tokens=346.7, seconds=0.4407, speedup=10.6, limit=12.04, efficiency=0.8804, overhead=0.123)
             for name, stage in presses for keep in (128, 64)]
    lines = _rendered(lambda console: console.print(prefill_table(rows, title="prefill, batch 1, 576 image tokens")))
    _fits_80_columns(lines)
    text = "\n".join(lines)
    for cell in ("speedup", "/ limit", "overhead", "12345.6", "10.60x", "12.04x", "88%", "100%", "12.3%", "347",
                 "128@L12", "64@KV"):
        assert cell in text


def test_list_shows_video_presses_and_families():
    from mmpress.registry import FAMILIES

    result = runner.invoke(app, ["list"], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 4}
    assert "yes" in rows["evs"] and "qwen_vl" in rows["evs"]
    assert "qwen_vl" in rows["visionzip"]  # Qwen-VL towers: attention received, in place of [CLS]
    assert {"llava", "qwen_vl", "qwen3_vl"} <= set(FAMILIES)
    for name, adapter in FAMILIES.items():  # each family: its classes, under the table
        assert all(c in result.output for c in adapter.classes), name
