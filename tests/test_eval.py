"""Quality metrics, the bench (every press x budget: quality and cost), and its reports."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import pytest
import torch
from rich.console import Console

from mmpress.eval.bench import _plan, run_bench
from mmpress.eval.metrics import (accuracy, agreement, bootstrap_ci, correctness, is_correct, kl_divergence,
                                  match_choice, paired_bootstrap_ci)
from mmpress.eval.report import best_per_budget, paired_comparisons, print_table, to_markdown, with_ci, write_report
from mmpress.presses.base import PRESSES, KVPress, Press, ScorerPress
from mmpress.presses.fastv import FastVPress
from conftest import samples, tiny_llava, tiny_processor

N = 64  # visual tokens per image of the tiny model


# ---- metrics ----------------------------------------------------------------------------------
def test_exact_match_after_normalisation():
    samples = [{"answer": "two"}, {"answer": "Red"}, {"answer": "a circle"}, {"answer": "yes"}]
    assert accuracy(["2", "red.", "The circle", "no"], samples) == 0.75
    assert is_correct("anything", {"answer": ""}) is None
    assert accuracy(["x"], [{"question": "unlabelled"}]) is None


def test_multiple_choice():
    choices = ["red circle", "blue square", "green triangle"]
    assert match_choice("Blue square.", choices) == 1
    assert match_choice("(C)", choices) == 2
    assert match_choice("it is a red circle", choices) == 0
    assert match_choice("red circle or blue square", choices) is None  # names two options
    sample = {"answer": "B", "choices": choices}
    assert is_correct("blue square", sample) and is_correct("b", sample)
    assert not is_correct("red circle", sample)
    with pytest.raises(ValueError, match="not one of"):
        is_correct("x", {"answer": "purple", "choices": choices})


def test_agreement():
    assert agreement(["Yes", "two", "red"], ["yes", "2", "blue"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        agreement(["a"], [])


def test_kl():
    logits = torch.randn(3, 50)
    assert torch.equal(kl_divergence(logits, logits.clone()), torch.zeros(3, dtype=torch.float64))
    other = logits + torch.randn(3, 50)
    kl = kl_divergence(logits, other)
    assert (kl > 0).all()
    p, q = logits.double().softmax(-1), other.double().softmax(-1)
    assert torch.allclose(kl, (p * (p / q).log()).sum(-1))
    hard = torch.full((1, 4), -math.inf)  # p_ref with zero-mass entries: 0 * log 0 counts 0
    hard[0, 0] = 0.0
    assert torch.isfinite(kl_divergence(hard, torch.zeros(1, 4))).all()


# ---- confidence intervals ---------------------------------------------------------------------
def _marks(n: int, right: float, seed: int = 1) -> list[bool]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=generator) < right).tolist()


def test_bootstrap_ci_holds_the_estimate_and_shrinks_with_n():
    widths = []
    for n in (24, 96, 384, 1536):
        marks = _marks(n, 0.7)
        low, high = bootstrap_ci(marks)
        assert 0 <= low <= sum(marks) / n <= high <= 1
        widths.append(high - low)
    assert all(a > b for a, b in zip(widths, widths[1:])), widths
    assert widths[-1] < widths[0] / 4  # ~1/sqrt(n): 64 times the questions, ~8 times narrower
    # a binomial proportion's 95% interval is about +-1.96 sqrt(p(1-p)/n)
    marks = _marks(1536, 0.7)
    p = sum(marks) / len(marks)
    assert widths[-1] == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / len(marks)), rel=0.15)


def test_bootstrap_ci_is_deterministic_with_its_seed():
    marks = _marks(96, 0.6)
    assert bootstrap_ci(marks) == bootstrap_ci(marks) == bootstrap_ci(marks, seed=0)
    assert bootstrap_ci(marks, seed=1) != bootstrap_ci(marks, seed=0)  # another draw, about the same interval
    assert bootstrap_ci(marks, seed=1) == pytest.approx(bootstrap_ci(marks), abs=0.05)
    assert bootstrap_ci([True] * 10) == (1.0, 1.0)  # no spread to resample
    assert bootstrap_ci([None, True, False, None]) == bootstrap_ci([True, False])  # unlabelled samples left out
    assert bootstrap_ci([None]) is None
    with pytest.raises(ValueError):
        bootstrap_ci(marks, level=1.5)
    low, high = bootstrap_ci(marks, level=0.5)
    assert bootstrap_ci(marks)[0] <= low <= high <= bootstrap_ci(marks)[1]  # a lower level, a narrower interval


def test_paired_bootstrap_ci_of_a_difference():
    a = _marks(96, 0.6)
    low, high = paired_bootstrap_ci(a, a)
    assert low == high == 0.0  # the same answers: no difference at all
    better = [True] * 96
    low, high = paired_bootstrap_ci(better, a)
    assert 0 < low <= 1 - sum(a) / 96 <= high  # a clear difference: the interval excludes 0
    # one question of 96 apart: the paired interval holds 0
    b = list(a)
    b[a.index(False)] = True
    low, high = paired_bootstrap_ci(b, a)
    assert low <= 0 <= high and low >= -1e-12
    # pairing cancels the questions both get right or wrong: narrower than the unpaired intervals' overlap
    ci_a, ci_b = bootstrap_ci(a), bootstrap_ci(b)
    assert high - low < min(ci_a[1] - ci_a[0], ci_b[1] - ci_b[0])
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap_ci(a, a[:-1])


def test_correctness_per_question():
    assert correctness(["2", "blue", "x"], [{"answer": "two"}, {"answer": "red"}, {"question": "?"}]) == [True, False,
                                                                                                         None]


def test_with_ci_formats():
    assert with_ci(0.8333, [0.75, 0.9062]) == "0.83 [0.75, 0.91]"
    assert with_ci(0.8333, [0.75, 0.9062], "pm") == "0.83±0.08"
    assert with_ci(0.875, None) == "0.875" and with_ci(None, None) == "n/a"
    assert with_ci(0.0, [0.0, 0.0]) == "0.00 [0.00, 0.00]"


def test_paired_comparisons_mark_the_presses_tied_with_the_best():
    n = 48
    good = _marks(n, 0.8, seed=3)
    close = list(good)
    close[good.index(True)] = False  # one question worse: within the noise
    bad = [False] * n  # every question worse: a real difference
    rows = [dict(press=p, keep=k, accuracy=sum(c) / n, agreement=0.5, kl=0.1, correct=c)
            for p, k, c in (("none", None, good), ("a", 16, good), ("b", 16, close), ("c", 16, bad))]
    record = {"labelled": True, "quality_metric": "accuracy", "rows": rows, "ci": {"seed": 0}}
    assert paired_comparisons(record) == {16: ["a", "b"]}
    vs_best = record["vs_best"]["16"]
    assert vs_best["a"] == {"press": "a", "diff": 0.0, "ci": [0.0, 0.0], "tied": True}
    assert vs_best["b"]["diff"] == pytest.approx(-1 / n) and vs_best["b"]["tied"]
    assert not vs_best["c"]["tied"] and vs_best["c"]["ci"][1] < 0
    assert record["vs_unpressed"]["16"]["c"]["diff"] == pytest.approx(-sum(good) / n)
    assert all("vs_best" not in row for row in rows)  # the rows stay as measured
    assert record["tied_with_best"] == {"16": ["a", "b"]}


@dataclass
class NormPress(ScorerPress):
    """Test press: keeps the tokens of largest norm."""

    name = "test-bench-norm"

    def score(self, tokens, ctx):
        return tokens.norm(dim=-1)


@dataclass
class FirstPress(ScorerPress):
    """Test press: keeps the first k tokens (the top rows of the image)."""

    name = "test-bench-first"

    def score(self, tokens, ctx):
        return -torch.arange(tokens.shape[1], dtype=tokens.dtype).expand(tokens.shape[:2])


@dataclass
class KeepAllPress(Press):
    """Test press without a budget that keeps every token: must match the baseline exactly."""

    name = "test-bench-keepall"
    needs_budget = False


TEST_PRESSES = (NormPress, FirstPress, KeepAllPress)


@pytest.fixture(scope="module")
def bench_record():
    """One bench run shared by the tests below: 6 samples, batches of 4 (ragged last batch)."""
    for cls in TEST_PRESSES:  # registered for this run only, not at import time
        PRESSES[cls.name] = cls
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model only loses to thread synchronisation on a shared machine
    try:
        console = Console(file=io.StringIO(), width=200)
        checkpoints = []  # (rows, pending) as each cell finished, from a JSON copy of the record then
        record = run_bench(tiny_llava(), tiny_processor(), [NormPress.name, FirstPress.name, KeepAllPress.name, "none"],
                           [32, 8, 64], samples(6), batch_size=4, max_new_tokens=3, console=console, repeats=2,
                           dataset="tiny", checkpoint=lambda r: checkpoints.append(json.loads(json.dumps(r))))
        record["_console"] = console.file.getvalue()
        record["_checkpoints"] = checkpoints
        yield record
    finally:
        torch.set_num_threads(threads)
        for cls in TEST_PRESSES:
            PRESSES.pop(cls.name, None)


def _numbers(row: dict):
    for key in ("kept_tokens", "accuracy", "agreement", "kl", "flops_ratio", "prefill_s", "speedup",
                "speedup_limit", "kv_bytes"):
        yield key, row[key]
    yield from row["flops"].items()


def test_bench_rows(bench_record):
    rows = {(r["press"], r["keep"]): r for r in bench_record["rows"]}
    pressed = {(name, keep) for name in ("test-bench-norm", "test-bench-first") for keep in (32, 8)}
    assert set(rows) == {("none", None), ("test-bench-keepall", None), *pressed}
    assert bench_record["rows"][0]["press"] == "none"
    assert bench_record["n"] == 6 and bench_record["model"]["visual_tokens_per_image"] == N
    for row in rows.values():
        assert len(row["answers"]) == 6
        assert isinstance(row["peak_memory_bytes"], int) and row["peak_memory_bytes"] > 0  # CPU: measured too
        for key, value in _numbers(row):
            assert isinstance(value, float) and math.isfinite(value), (row["press"], row["keep"], key, value)
    keep_all = rows[("test-bench-keepall", None)]
    assert keep_all["agreement"] == 1.0 and keep_all["kl"] == pytest.approx(0.0, abs=1e-9)
    assert keep_all["answers"] == rows[("none", None)]["answers"]
    assert keep_all["flops_ratio"] == 1.0 and keep_all["kept_tokens"] == N
    for name, keep in pressed:
        row = rows[(name, keep)]
        assert row["kept_tokens"] == keep and row["kl"] >= 0
        assert row["flops_ratio"] < 1 and row["speedup_limit"] > 1
        assert row["kv_bytes"] < rows[("none", None)]["kv_bytes"]
        assert row["flops"]["vision"] == rows[("none", None)]["flops"]["vision"]  # every image still encoded
    assert rows[("test-bench-norm", 8)]["flops_ratio"] < rows[("test-bench-norm", 32)]["flops_ratio"]
    assert any(note.startswith("keep=64 skipped") for note in bench_record["notes"])
    assert any("baseline" in note for note in bench_record["notes"])
    assert bench_record["best"].keys() == {"32", "8"}  # budgets two presses competed at
    assert set(bench_record["best"].values()) <= {"test-bench-norm", "test-bench-first"}
    assert "test-bench-norm" in bench_record["_console"]
    assert bench_record["pending"] == [] and bench_record["model"]["id"] is None
    json.dumps(bench_record)  # JSON-serialisable as returned


def test_bench_rows_carry_bootstrap_intervals(bench_record):
    assert bench_record["ci"]["level"] == 0.95 and bench_record["ci"]["resamples"] == 1000
    for row in bench_record["rows"]:
        assert len(row["correct"]) == len(row["agree"]) == 6 and row["n_labelled"] == 6
        for key in ("accuracy", "agreement"):
            low, high = row[f"{key}_ci"]
            assert low <= row[key] <= high, (row["press"], key)
            assert (low, high) == bootstrap_ci(row["correct" if key == "accuracy" else "agree"])
        assert row["accuracy"] == sum(row["correct"]) / 6
    assert bench_record["rows"][0]["agreement_ci"] == [1.0, 1.0]
    for keep, winner in bench_record["best"].items():
        presses = {row["press"] for row in bench_record["rows"] if str(row["keep"]) == keep}
        assert bench_record["vs_best"][keep].keys() == presses
        for comparison in bench_record["vs_best"][keep].values():
            low, high = comparison["ci"]
            assert comparison["press"] == winner and low <= comparison["diff"] <= high
        assert bench_record["tied_with_best"][keep][0] == winner


def test_tables_show_the_intervals(bench_record):
    markdown = to_markdown(bench_record)
    assert "n=6 questions" in markdown.splitlines()[0]
    for row in bench_record["rows"]:
        assert with_ci(row["accuracy"], row["accuracy_ci"]) in markdown
        if row["press"] != "none":
            low, high = row["accuracy_ci"]
            assert f"{row['accuracy']:.2f} [{low:.2f}, {high:.2f}]" in markdown
    assert "percentile bootstrap interval over the n=6 questions (1000 resamples, seed 0)" in markdown
    console = Console(width=80, record=True, file=io.StringIO())
    print_table(bench_record, console)  # the compact table: value ± half the interval
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80 and "±" in text and "n=6" in text


def test_bench_checkpoints_each_finished_cell(bench_record):
    checkpoints = bench_record["_checkpoints"]
    assert len(checkpoints) == len(bench_record["rows"]) == 6  # baseline, keep-all, 2 presses x 2 budgets
    for i, record in enumerate(checkpoints, 1):
        assert len(record["rows"]) == i and len(record["pending"]) == 6 - i
        assert record["rows"][0]["press"] == "none" and record["model"]["visual_tokens_per_image"] == N
    assert checkpoints[-1]["rows"] == json.loads(json.dumps(bench_record["rows"]))


def test_bench_resumes_from_a_record(bench_record):
    """Every cell already in the record: the rows come back as they were; other settings: refused."""
    args = (tiny_llava(), tiny_processor(), [NormPress.name, FirstPress.name, KeepAllPress.name], [32, 8], samples(6))
    previous = json.loads(json.dumps(bench_record))
    again = run_bench(*args, batch_size=4, max_new_tokens=3, console=Console(file=io.StringIO()), repeats=1,
                      dataset="tiny", previous=previous)
    assert again["rows"] == previous["rows"] and again["pending"] == []
    with pytest.raises(ValueError, match=r"cannot resume .*max_new_tokens 3 \(now 2\)"):
        run_bench(*args, batch_size=4, max_new_tokens=2, dataset="tiny", previous=previous)


def test_report_files(bench_record, tmp_path):
    paths = write_report(bench_record, tmp_path / "out")
    assert sorted(p.name for p in paths.values()) == ["bench.html", "bench.json", "bench.md", "bench.png"]
    assert json.loads(paths["json"].read_text())["rows"][0]["press"] == "none"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    page = paths["html"].read_text()
    assert "data:image/png;base64," in page and 'class="best"' in page
    winner = bench_record["best"]["8"]
    assert f"| **{winner}** | **8** |" in paths["md"].read_text()
    assert not (tmp_path / "out" / "bench.json.tmp").exists()  # written atomically: tmp file, then os.replace


def test_report_of_an_interrupted_run(bench_record, tmp_path):
    """Interrupted after the baseline: a report of that row alone, and the cells left as a note."""
    partial = dict(bench_record, rows=bench_record["rows"][:1], best={}, notes=["interrupted before ..."])
    paths = write_report(partial, tmp_path)
    assert paths["png"].stat().st_size > 10_000 and "interrupted before" in paths["md"].read_text()


def test_best_per_budget_prefers_quality_then_agreement_then_kl():
    row = dict(keep=16, accuracy=0.5, agreement=0.5, kl=0.2)
    record = {"labelled": True, "rows": [
        dict(row, press="a"),
        dict(row, press="b", accuracy=0.6, agreement=0.7, kl=0.9),
        dict(row, press="c", accuracy=0.6, agreement=0.7, kl=0.1),
        dict(row, press="d", accuracy=0.6, agreement=0.6, kl=0.0),
        dict(row, press="a", keep=8),
    ]}
    assert best_per_budget(record) == {16: "c"}  # keep=8: one press, nothing to win


def test_bench_bad_input():
    model, processor = tiny_llava(), tiny_processor()
    with pytest.raises(ValueError, match="empty"):
        run_bench(model, processor, ["none"], [8], [])
    with pytest.raises(ValueError, match="unknown press"):
        run_bench(model, processor, ["no-such-press"], [8], samples(1))
    with pytest.raises(ValueError, match="positive ints"):
        run_bench(model, processor, [], [0], samples(1))


def test_bench_without_labels_ranks_by_agreement(tmp_path):
    """Unlabelled data: accuracy is None (not 0), agreement becomes the quality metric and plots."""
    PRESSES[NormPress.name] = NormPress
    try:
        data = [{k: v for k, v in s.items() if k != "answer"} for s in samples(3)]
        record = run_bench(tiny_llava(), tiny_processor(), [NormPress.name], [16], data, batch_size=3,
                           max_new_tokens=2, console=Console(file=io.StringIO()), repeats=1)
    finally:
        PRESSES.pop(NormPress.name, None)
    assert record["quality_metric"] == "agreement" and not record["labelled"]
    assert all(row["accuracy"] is None for row in record["rows"])
    assert write_report(record, tmp_path)["png"].stat().st_size > 10_000


def test_bench_times_the_first_timing_batch_samples():
    """Answers in batches of 3, prefill timed on the first sample alone; a resumed run must time alike."""
    PRESSES[NormPress.name] = NormPress
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = (tiny_llava(), tiny_processor(), [NormPress.name], [16], samples(3))
        options = dict(batch_size=3, max_new_tokens=2, console=Console(file=io.StringIO()), repeats=1)
        record = run_bench(*args, timing_batch=1, **options)
        assert record["settings"]["timing_batch"] == 1
        pressed = record["rows"][1]
        assert pressed["speedup"] > 0 and pressed["speedup_limit"] > 1 and pressed["peak_memory_bytes"] > 0
        with pytest.raises(ValueError, match=r"timing_batch 1 \(now 3\)"):
            run_bench(*args, previous=json.loads(json.dumps(record)), **options)  # None: the first batch, 3
        with pytest.raises(ValueError, match="timing_batch must be a positive int"):
            run_bench(*args, timing_batch=0, **options)
    finally:
        torch.set_num_threads(threads)
        PRESSES.pop(NormPress.name, None)


# ---- in-LLM and KV presses in the bench ---------------------------------------------------------
@dataclass
class FastVAtLayer1(FastVPress):
    """FastV at the tiny LM's layer 1 of 2: layer 0 sees every token, layer 1 the kept ones."""

    name = "test-bench-fastv"
    layer: int = 1


@dataclass
class TopAttentionKV(KVPress):
    """Test KV press: the default eviction (the entries the last ``window`` queries attend most)."""

    name = "test-bench-kv"
    window: int = 4


STAGE_PRESSES = (NormPress, FastVAtLayer1, TopAttentionKV)


@pytest.fixture(scope="module")
def stage_record():
    """A pre-LLM, an in-LLM and a KV press at 16 of 64 tokens per image, on 3 samples."""
    for cls in STAGE_PRESSES:
        PRESSES[cls.name] = cls
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield run_bench(tiny_llava(), tiny_processor(), [cls.name for cls in STAGE_PRESSES], [16], samples(3),
                        batch_size=3, max_new_tokens=3, console=Console(file=io.StringIO(), width=200), repeats=1)
    finally:
        torch.set_num_threads(threads)
        for cls in STAGE_PRESSES:
            PRESSES.pop(cls.name, None)


def test_bench_plan_skips_a_budget_a_press_refuses(monkeypatch):
    """Found when planning, as a note, before any cell runs (SparseVLM takes its paper's budgets only)."""

    @dataclass
    class OfficialBudgetsOnly(NormPress):
        name = "test-bench-official"

        def __post_init__(self):
            super().__post_init__()
            if self.keep != 32:
                raise ValueError(f"takes keep=32 only, got keep={self.keep}")

    for cls in (OfficialBudgetsOnly, TopAttentionKV):
        monkeypatch.setitem(PRESSES, cls.name, cls)
    notes = []
    cells = _plan([OfficialBudgetsOnly.name, TopAttentionKV.name], [64, 32, 16], N, notes)
    assert [(cell.press, cell.keep) for cell in cells] == [(OfficialBudgetsOnly.name, 32), (TopAttentionKV.name, 32),
                                                           (TopAttentionKV.name, 16)]
    assert f"{OfficialBudgetsOnly.name} keep=16 skipped: takes keep=32 only, got keep=16" in notes
    assert any(note.startswith("keep=64 skipped") for note in notes)
    assert any(note.startswith(f"{TopAttentionKV.name}: KV presses evict") for note in notes)


def test_bench_rows_of_in_llm_and_kv_presses(stage_record):
    rows = {r["press"]: r for r in stage_record["rows"]}
    base, pre, fastv, kv = (rows[name] for name in ("none", NormPress.name, FastVAtLayer1.name, TopAttentionKV.name))
    assert (base["stage"], pre["stage"], fastv["stage"], kv["stage"]) == ("none", "pre_llm", "in_llm", "kv")
    # in-LLM: 16 kept from layer 1 on, 40 on average over the 2 layers; charged its full layer 0
    assert fastv["kept_tokens"] == 16 and fastv["layer_kept"] == [[1, 16.0]] and fastv["avg_tokens"] == (N + 16) / 2
    assert pre["flops_ratio"] < fastv["flops_ratio"] < 1 and 1 < fastv["speedup_limit"] < pre["speedup_limit"]
    assert fastv["flops"]["vision"] == base["flops"]["vision"]
    assert fastv["flops"]["language"] < base["flops"]["language"]
    assert pre["kv_bytes"] < fastv["kv_bytes"] < base["kv_bytes"]  # layer 0's cache holds every token
    assert pre["avg_tokens"] == pre["kept_tokens"] == 16 and base["avg_tokens"] == N
    # KV: an unpressed prefill (FLOPs, first token), a cache as short as the pre-LLM press's
    assert kv["kept_tokens"] == kv["avg_tokens"] == 16 and kv["flops_ratio"] == 1.0 and kv["speedup_limit"] == 1.0
    assert kv["kl"] == pytest.approx(0.0, abs=1e-6) and kv["kv_bytes"] == pre["kv_bytes"]
    assert any(note.startswith(f"{TopAttentionKV.name}: KV presses evict") for note in stage_record["notes"])
    json.dumps(stage_record)


def test_bench_tables_show_the_stages(stage_record, tmp_path):
    console = Console(width=80, record=True, file=io.StringIO())
    print_table(stage_record, console)  # compact: keep@stage next to the layer-averaged tokens
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80 and "16@L1" in text and "16@KV" in text and "avg" in text
    fastv_line = next(line for line in text.splitlines() if "16@L1" in line)
    assert fastv_line.split("│")[3].strip() == "40"
    markdown = to_markdown(stage_record)
    assert "| kept/img | avg/img |" in markdown and "| 16@L1 | 16 | 40 |" in markdown
    assert write_report(stage_record, tmp_path)["png"].stat().st_size > 10_000
