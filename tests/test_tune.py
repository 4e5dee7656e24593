"""`mmpress tune`: the bisection and its early stops on synthetic verdicts, the one-sided bootstrap
lower bound against an independent computation, the search on a model (synthetic agreement through
the real generation loop), the CLI end to end (the demo model, slow), Ctrl-C keeping the partial
record, bench --config reading the file, and a user's mistakes as one red line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from typer.testing import CliRunner

import mmpress
import mmpress.cli
import mmpress.eval.tune as tune_module
import mmpress.presses.spec
from mmpress.cli import app
from mmpress.eval.tune import Probe, Search, TuneError, Tuning, bisect, decided, interval, tune
from mmpress.presses.compose import AtLayerPress
from mmpress.presses.spec import load_settings
from conftest import samples, save_tiny_set, tiny_llava, tiny_processor

runner = CliRunner()
#: the closing record of the README's run (mmpress tune --press divprune --target-agreement 0.95 --data easy-vqa
#: --limit 40 on the demo)
TUNED_DEMO = Path(__file__).parents[1] / "benchmarks" / "results" / "tune-divprune-demo.json"
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the search on a synthetic monotone verdict ----------------------------------------------------
def _threshold(smallest: int, calls: list[int]):
    """A verdict that passes from ``smallest`` on, recording every budget measured."""
    def measure(keep: int) -> Probe:
        calls.append(keep)
        passed = keep >= smallest
        return Probe(keep, passed, float(passed), float(passed), float(passed), 10, 10)
    return measure


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 256, 577])
def test_bisection_finds_the_exact_smallest_budget_in_log_probes(n):
    for smallest in sorted({1, min(2, n), n // 3 or 1, n // 2 or 1, n - 1 or 1, n}):
        calls = []
        search = bisect(_threshold(smallest, calls), n)
        assert search.hi == smallest and search.lo == smallest - 1
        assert len(calls) <= math.ceil(math.log2(n)) and len(set(calls)) == len(calls)
        assert n not in calls  # keeping every token is the unpressed model: never measured


def test_bisection_probes_halve_the_bracket():
    calls = []
    bisect(_threshold(37, calls), 256)
    assert calls == [128, 64, 32, 48, 40, 36, 38, 37]


@given(n=st.integers(2, 2000), data=st.data())
@settings(max_examples=60, deadline=None)
def test_tolerance_stops_the_search_early(n, data):
    smallest = data.draw(st.integers(1, n))
    tolerance = data.draw(st.integers(2, max(2, n)))
    exact, early = [], []
    bisect(_threshold(smallest, exact), n)
    search = bisect(_threshold(smallest, early), n, tolerance=tolerance)
    assert search.hi >= smallest and search.hi - smallest < tolerance  # passes, within the tolerance above it
    assert search.hi - search.lo <= tolerance
    assert len(early) <= len(exact) and len(early) <= max(0, math.ceil(math.log2(n / tolerance)))


def test_search_refuses_a_probe_outside_its_bracket():
    search = Search(64)
    search.add(Probe(32, True, 1, 1, 1, 4, 4))
    with pytest.raises(ValueError, match="outside the open bracket"):
        search.add(Probe(40, False, 0, 0, 0, 4, 4))
    with pytest.raises(ValueError, match="tolerance"):
        Search(64, tolerance=0)


# ---- the one-sided bootstrap lower bound ---------------------------------------------------------
def _independent_bound(values, resamples, level, seed):
    """The percentile bootstrap written out in NumPy: the same seeded draws (torch's generator),
    each resample's mean, then the quantiles by sorting and interpolating linearly by hand."""
    n = len(values)
    draws = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed)).numpy()
    means = np.sort(np.asarray(values, dtype=np.float64)[draws].mean(axis=1))

    def quantile(q):
        position = q * (resamples - 1)
        below = int(np.floor(position))
        above = min(below + 1, resamples - 1)
        return means[below] + (position - below) * (means[above] - means[below])

    return quantile(1 - level), quantile(level)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_bound_matches_an_independent_bootstrap(seed, level):
    values = (np.random.default_rng(seed).random(40) < 0.8).tolist()
    low, high = interval(values, resamples=500, level=level, seed=seed)
    want_low, want_high = _independent_bound(values, 500, level, seed)
    assert low == pytest.approx(want_low, abs=1e-12) and high == pytest.approx(want_high, abs=1e-12)


def test_bound_is_one_sided_and_near_the_normal_approximation():
    p, n = 0.9, 2000
    values = [True] * int(p * n) + [False] * int((1 - p) * n)
    low, high = interval(values, resamples=4000, level=0.95)
    normal = 1.6449 * math.sqrt(p * (1 - p) / n)  # a one-sided 95% bound sits 1.645 standard errors below
    assert low == pytest.approx(p - normal, abs=0.003) and high == pytest.approx(p + normal, abs=0.003)
    assert interval([True] * 5)[0] == 1.0
    with pytest.raises(ValueError, match=r"\(0.5, 1\)"):
        interval(values, level=0.4)


@given(prefix=st.lists(st.booleans(), min_size=1, max_size=24), rest=st.lists(st.booleans(), max_size=24),
       target=st.floats(0.3, 1.0))
@settings(max_examples=80, deadline=None)
def test_an_early_verdict_is_never_overturned(prefix, rest, target):
    total = len(prefix) + len(rest)
    verdict = decided(prefix, total, target, resamples=200)
    final = interval(prefix + rest, resamples=200)[0] >= target
    if verdict is not None:
        assert verdict == final  # early fail: no completion passes
    if not rest:
        assert verdict == final


def test_a_failing_budget_is_decided_before_its_last_question():
    assert decided([False], 20, 0.95) is False  # one disagreement in 20 already puts 0.95 out of reach
    assert decided([True, False], 20, 0.8) is None
    assert decided([True] * 3, 20, 0.95) is None  # could still pass
    assert decided([True] * 20, 20, 0.95) is True


def test_a_search_with_no_pass_yet_stands_at_the_unpressed_model():
    state = Tuning("divprune", "agreement", 0.9, [None], visual_tokens=64, searches={None: Search(64)})
    row = state.as_record()["chosen"]
    assert (row["press"], row["value"], row["interval"], row["flops_ratio"]) == ("divprune:64", 1.0, [1.0, 1.0], 1.0)
    state.searches[None].add(Probe(32, False, 0.5, 0.3, 0.7, 4, 8, flops_ratio=0.6))
    assert state.as_record()["chosen"]["bracket"] == [32, 64]
    state = Tuning("divprune", "accuracy", 0.5, [None], visual_tokens=64, searches={None: Search(64)},
                   reference_value=0.8, reference_interval=(0.7, 0.9))
    assert state.as_record()["chosen"]["interval"] == [0.7, 0.9]


# ---- the search on a model: synthetic agreement through the real generation ----------------------
def _synthetic(monkeypatch, smallest: dict, log: list):
    """Answers: the real model's (so every press runs), then replaced: a pressed answer agrees
    with the reference exactly when its budget is at least ``smallest[layer]``."""
    real = tune_module._answer

    def answer(model, processor, inputs, press, max_new_tokens):
        answers, stats = real(model, processor, inputs, press, max_new_tokens)
        if press.keep_ratio == 1.0:  # the unpressed reference
            log.append(("reference", None))
            return [f"ref{i}" for i in range(len(answers))], stats
        inner = press.inner if isinstance(press, AtLayerPress) else press
        layer = getattr(inner, "layer", None)
        log.append((layer, inner.keep))
        agree = inner.keep >= smallest[layer]
        return [f"ref{i}" if agree else "other" for i in range(len(answers))], stats

    monkeypatch.setattr(tune_module, "_answer", answer)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava(), tiny_processor()


def test_tune_on_a_model_finds_the_budget_and_stops_failing_probes_early(tiny, monkeypatch):
    log = []
    _synthetic(monkeypatch, {None: 23}, log)
    data = samples(8)
    state = tune(*tiny, "divprune", data, 0.9, batch_size=2, max_new_tokens=1)
    search = state.searches[None]
    assert not state.partial and state.visual_tokens == 64 and search.hi == 23 and search.lo == 22
    assert len(search.probes) <= 6
    for probe in search.probes:
        assert probe.passed == (probe.keep >= 23)
        # a failing probe stops after its first batch (two disagreements); a passing one answers all
        assert probe.answered == (8 if probe.passed else 2), probe
        assert sum(1 for layer, keep in log if keep == probe.keep) == probe.answered // 2
    assert log.count(("reference", None)) == 4  # the unpressed answers: once per batch, for every probe
    chosen = state.as_record()["chosen"]
    assert chosen["press"] == "divprune:23" and chosen["interval"] == [1.0, 1.0] and 0 < chosen["flops_ratio"] < 1


def test_positions_reach_the_adapter(tiny):
    with pytest.raises(ValueError, match="positions"):  # the adapter, not tune, refuses it: it was passed on
        tune(*tiny, "divprune", samples(2), 0.5, positions="shift", batch_size=2, max_new_tokens=1)


def test_in_llm_budgets_are_searched_per_layer(monkeypatch):
    from transformers import LlavaForConditionalGeneration

    model = tiny_llava()
    config = model.config
    config.text_config.num_hidden_layers = 4
    model = LlavaForConditionalGeneration(config).eval()
    _synthetic(monkeypatch, {1: 40, 3: 12}, [])
    state = tune(model, tiny_processor(), "fastv", samples(4), 0.8, layers=[1, 3], batch_size=4, max_new_tokens=1)
    rows = {row["layer"]: row for row in state.as_record()["results"]}
    assert rows[1]["press"] == "fastv:40@1" and rows[3]["press"] == "fastv:12@3"
    # fastv:12@3 keeps 64 tokens through 3 of 4 layers; fastv:40@1 keeps 40 from layer 1: fewer FLOPs
    assert rows[1]["flops_ratio"] < rows[3]["flops_ratio"]
    assert state.as_record()["chosen"]["press"] == "fastv:40@1"


def test_accuracy_target_uses_the_labels(tiny):
    data = samples(4)
    data[0]["answer"] = None  # scored on the labelled questions only
    state = Tuning("divprune", "accuracy", 0.5, [None])
    with pytest.raises(TuneError, match="unpressed model's accuracy"):  # a random model answers nothing right
        tune(*tiny, "divprune", data, 0.5, metric="accuracy", batch_size=4, max_new_tokens=1, state=state)
    assert state.n == 3 and state.reference_value == 0.0 and state.partial
    for sample in data:
        sample["answer"] = None
    with pytest.raises(ValueError, match="needs labelled data"):
        tune(*tiny, "divprune", data, 0.5, metric="accuracy")


# ---- the CLI --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model in a folder and a 6-question JSONL set beside its images."""
    root = tmp_path_factory.mktemp("tune")
    records = save_tiny_set(root, 6)
    (root / "unlabelled.jsonl").write_text("\n".join(json.dumps({**r, "answer": ""}) for r in records))
    return root


def _tune(files, out, *extra):
    return runner.invoke(app, ["tune", "--press", "divprune", "--model", str(files / "tiny"), "--data",
                               str(files / "set.jsonl"), "--batch-size", "3", "--max-new-tokens", "1",
                               "--out", str(out), *extra])


def test_interrupted_tune_keeps_the_partial_record(files, tmp_path, monkeypatch):
    log = []
    _synthetic(monkeypatch, {None: 10}, log)
    synthetic = tune_module._answer

    def interrupt_third_probe(model, processor, inputs, press, max_new_tokens):
        probed = {keep for layer, keep in log if layer != "reference"}
        if press.keep_ratio != 1.0 and len(probed) == 2 and press.keep not in probed:
            raise KeyboardInterrupt  # Ctrl-C as the third budget starts
        return synthetic(model, processor, inputs, press, max_new_tokens)

    monkeypatch.setattr(tune_module, "_answer", interrupt_third_probe)
    written, save = [], mmpress.presses.spec.save_press

    def recording(path, press, **extra):
        written.append(len(extra["tune"]["searches"]["None"]["probes"]))
        return save(path, press, **extra)

    monkeypatch.setattr(mmpress.presses.spec, "save_press", recording)
    out = tmp_path / "tuned.json"
    result = _tune(files, out, "--target-agreement", "0.8")
    assert result.exit_code == 130, result.output
    assert written == [0, 1, 2, 2]  # after the reference, after each probe (a killed run keeps them), at the end
    assert "Traceback" not in result.output and "partial" in result.stderr
    saved = json.loads(out.read_text())
    probes = saved["tune"]["searches"]["None"]["probes"]
    assert saved["partial"] is True and saved["tune"]["partial"] is True
    assert [(p["keep"], p["passed"]) for p in probes] == [(32, True), (16, True)]  # what was measured, kept
    assert saved["press"] == "divprune:16" and mmpress.load_press(out) == mmpress.get_press("divprune", keep=16)
    assert saved["tune"]["results"][0]["bracket"] == [0, 16] and not saved["tune"]["results"][0]["done"]


def test_tune_writes_positions_and_the_file_loads(files, tmp_path):
    out = tmp_path / "tuned.json"
    result = _tune(files, out, "--positions", "keep", "--tolerance", "32", "--target-agreement", "0.5")
    assert result.exit_code == 0, result.output
    settings = load_settings(out)
    chosen = settings["tune"]["chosen"]
    assert settings["positions"] == "keep" and settings["partial"] is False and settings["press"] == chosen["press"]
    assert mmpress.load_press(out) == mmpress.get_press("divprune", keep=chosen["keep"])
    assert f"press={chosen['press']},positions=keep" in result.stdout
    assert [p["keep"] for p in settings["tune"]["searches"]["None"]["probes"]] == [32]


def test_tune_table_fits_80_columns():
    import io

    from rich.console import Console

    record = json.loads(TUNED_DEMO.read_text())["tune"]
    record["results"].append(dict(record["results"][0], press="divprune:250@12", layer=12, done=False,
                                  bracket=[0, 250], flops_ratio=0.99))
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(mmpress.cli._tune_table(record))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    text = " ".join(" ".join(lines).split())  # the caption may wrap
    for cell in ("divprune:250 ", "250/256", "[1.000, 1.000]", "0.98", "95% one-sided", "1000 resamples",
                 "chosen: divprune:250 (fewest", "bracket (0, 250] open", "40 questions"):
        assert cell in text, cell


def test_interrupted_before_the_reference_writes_nothing(files, tmp_path, monkeypatch):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_module, "_answer", interrupt)
    out = tmp_path / "tuned.json"
    result = _tune(files, out)
    assert result.exit_code == 130 and "nothing written" in result.stderr and not out.exists()


def test_bench_config_runs_the_tuned_setting(files, tmp_path):
    out = tmp_path / "tuned.json"
    mmpress.save_press(out, "divprune:16", partial=False, tune={"search": "ignored by the loaders"})
    result = runner.invoke(app, ["bench", "--config", str(out), "--model", str(files / "tiny"), "--data",
                                 str(files / "set.jsonl"), "--limit", "3", "--batch-size", "3", "--max-new-tokens",
                                 "1", "--repeats", "1", "--out", str(tmp_path / "bench")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [(row["press"], row["keep"]) for row in record["rows"]] == [("none", None), ("divprune", 16)]


def _no_model(model_id):
    raise AssertionError("the model loaded before the arguments were checked")


TUNE_ERRORS = {  # arguments after `tune` -> what the one line says
    "unknown press": (["--press", "divprun"], "did you mean 'divprune'"),
    "press without a budget": (["--press", "pdrop"], "takes no budget"),
    "the unpressed press": (["--press", "none"], "takes no budget"),
    "target 0": (["--press", "divprune", "--target-agreement", "0"], "(0, 1]"),
    "target above 1": (["--press", "divprune", "--target-agreement", "1.5"], "(0, 1]"),
    "accuracy target above 1": (["--press", "divprune", "--target-accuracy", "2"], "(0, 1]"),
    "two targets": (["--press", "divprune", "--target-agreement", "0.9", "--target-accuracy", "0.5"], "not both"),
    "missing data": (["--press", "divprune", "--data", "{files}/missing.jsonl"], "no such file"),
    "unknown data": (["--press", "divprune", "--data", "no-such-set"], "unknown dataset"),
    "no labels": (["--press", "divprune", "--data", "{files}/unlabelled.jsonl", "--target-accuracy", "0.5"],
                  "no labels"),
    "bad layer": (["--press", "fastv", "--layer", "two"], "decoder layers"),
    "layer of a kv press": (["--press", "snapkv", "--layer", "2"], "kv press"),
    "level": (["--press", "divprune", "--level", "0.3"], "(0.5, 1)"),
    "positions": (["--press", "divprune", "--positions", "shift"], "keep or reindex"),
    "out is a folder": (["--press", "divprune", "--out", "{files}"], "is a folder"),
    "missing model": (["--press", "divprune", "--model", "{files}/no-such-model"], "no such model folder"),
}


@pytest.mark.parametrize("case", TUNE_ERRORS)
def test_tune_mistakes_are_one_line(files, monkeypatch, case):
    monkeypatch.setattr(mmpress.cli, "_load", _no_model)  # every mistake is found before the model loads
    extra, says = TUNE_ERRORS[case]
    args = ["tune", "--model", str(files / "tiny"), "--data", str(files / "set.jsonl"),
            *(a.format(files=files) for a in extra)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.output


def test_bench_config_refuses_what_bench_cannot_run(files, tmp_path, monkeypatch):
    from mmpress.presses.spec import save_press

    monkeypatch.setattr(mmpress.cli, "_load", _no_model)
    out = tmp_path / "fastv.json"
    save_press(out, "fastv:16@1")
    result = runner.invoke(app, ["bench", "--config", str(out), "--model", str(files / "tiny")])
    assert result.exit_code == 2 and "press_file" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_tune_on_the_demo_model_end_to_end(tmp_path):
    """The real demo, four easy-vqa questions, a coarse tolerance: one probe."""
    from mmpress.demo import PROJECTOR_PATH

    if not PROJECTOR_PATH.is_file():
        pytest.skip("no trained demo projector")
    out = tmp_path / "tuned.json"
    result = runner.invoke(app, ["tune", "--press", "divprune", "--target-agreement", "0.75", "--data", "easy-vqa",
                                 "--limit", "4", "--batch-size", "4", "--max-new-tokens", "2", "--tolerance", "128",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    chosen = saved["tune"]["chosen"]
    press = mmpress.load_press(out)
    assert press == mmpress.get_press("divprune", keep=chosen["keep"]) and saved["press"] == chosen["press"]
    assert saved["partial"] is False and saved["tune"]["visual_tokens"] == 256
    assert chosen["interval"][0] >= 0.75 and f"budget found: {chosen['press']}" in result.stdout
    assert f"press={chosen['press']}" in result.stdout
    search = saved["tune"]["searches"]["None"]
    assert [p["keep"] for p in search["probes"]] == [128] and search["hi"] - search["lo"] <= 128
