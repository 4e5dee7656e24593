"""Timings a user can trust on a shared machine: cells timed round-robin over rounds, each speedup
with its range over them, a noisy one flagged (never printed as a result), and the machine's load
recorded. Every check runs on synthetic timings: no test depends on how fast this machine is."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

import mmpress.eval.bench
import mmpress.eval.cost
from mmpress.eval.bench import run_bench
from mmpress.eval.cost import NOISE, machine_done, machine_state, round_robin, speedup_spread
from mmpress.eval.report import (machine_text, prefill_table, print_table, speedup_text, to_html, to_markdown,
                                 write_report)
from conftest import samples, tiny_llava, tiny_processor


# ---- the round-robin order ----------------------------------------------------------------------
def _order(cells, rounds, warmup=1, drop=()):
    calls = []

    def time_one(cell, timed):
        calls.append((cell, timed))
        return False if cell in drop else None

    round_robin(cells, rounds, time_one, warmup=warmup)
    return calls


def test_each_round_times_every_cell_once_starting_one_cell_further_on():
    calls = _order(["none", "a", "b"], rounds=4)
    assert [timed for _, timed in calls] == [False] * 3 + [True] * 12  # one warm-up round, untimed
    rounds = [[cell for cell, _ in calls[i : i + 3]] for i in range(0, len(calls), 3)]
    assert rounds == [["none", "a", "b"], ["a", "b", "none"], ["b", "none", "a"], ["none", "a", "b"],
                      ["a", "b", "none"]]


def test_a_cell_dropped_in_the_warm_up_is_not_timed_again():
    calls = _order(["none", "a", "b"], rounds=2, drop={"a"})
    assert [cell for cell, timed in calls if timed] == ["b", "none", "none", "b"]


def test_rounds_must_be_a_positive_int():
    with pytest.raises(ValueError, match="timing rounds must be a positive int"):
        round_robin(["none"], 0, lambda cell, timed: None)


def _drifting_clock(true_seconds: dict, drift: float):
    """A machine whose load grows steadily: call k takes true * (1 + drift * k)."""
    calls = []

    def time_one(cell, timed):
        seconds = true_seconds[cell] * (1 + drift * len(calls))
        calls.append(cell)
        if timed:
            times[cell].append(seconds)

    times = {cell: [] for cell in true_seconds}
    return time_one, times


def test_round_robin_keeps_a_steady_drift_out_of_the_speedups():
    """The machine slows to 2.2x over the run: speedups of cells timed one after the other would be
    off by far more than 10%; round-robin keeps every speedup within 6% of the true one."""
    true = {"none": 1.0, "a": 0.5, "b": 0.25, "c": 0.8}  # true speedups 2, 4, 1.25
    time_one, times = _drifting_clock(true, drift=0.05)
    round_robin(list(true), 5, time_one)
    for cell in ("a", "b", "c"):
        speedup = speedup_spread(times["none"], times[cell], limit=None)["speedup"]
        assert speedup == pytest.approx(true["none"] / true[cell], rel=0.06), cell

    time_one, sequential = _drifting_clock(true, drift=0.05)  # what timing cell after cell does
    for cell in true:
        for timed in (False, *[True] * 5):
            time_one(cell, timed)
    off = [abs(speedup_spread(sequential["none"], sequential[c], None)["speedup"] / (true["none"] / true[c]) - 1)
           for c in ("a", "b", "c")]
    assert max(off) > 0.3  # the drift this test guards against


def test_bench_times_its_cells_round_robin(monkeypatch):
    """run_bench times the unpressed model and every cell in one round-robin, before they answer."""
    seen = []
    real = mmpress.eval.bench.round_robin

    def spy(cells, rounds, time_one, **kwargs):
        def recording(cell, timed):
            seen.append((cell, timed))
            return time_one(cell, timed)
        return real(cells, rounds, recording, **kwargs)

    monkeypatch.setattr(mmpress.eval.bench, "round_robin", spy)
    record = run_bench(tiny_llava(), tiny_processor(), ["random", "divprune"], [16], samples(2), batch_size=2,
                       max_new_tokens=2, console=Console(file=io.StringIO()), repeats=3)
    timed = [cell for cell, was in seen if was]
    assert len(timed) == 9 and [timed[i : i + 3] for i in (0, 3, 6)] == [[1, 2, 0], [2, 0, 1], [0, 1, 2]]
    rows = {r["press"]: r for r in record["rows"]}
    for row in rows.values():
        assert len(row["speedup_rounds"]) == 3 and len(row["prefill_s_range"]) == 2
        low, high = row["speedup_range"]
        assert low <= row["speedup"] <= high and (row["noisy"] is None or isinstance(row["noisy"], str))
    assert rows["none"]["speedup_rounds"] == [1.0] * 3 and rows["none"]["noisy"] is None
    assert record["settings"]["rounds"] == 3 and "round-robin" in record["timing"]


# ---- noisy speedups --------------------------------------------------------------------------------
def test_a_tight_speedup_below_its_limit_is_a_result():
    out = speedup_spread([1.0, 1.02, 0.99], [0.5, 0.51, 0.5], limit=2.2)
    assert out["noisy"] is None and out["speedup"] == pytest.approx(2.0)
    assert out["speedup_range"] == [pytest.approx(1.98), pytest.approx(2.0)]
    assert out["spread"] == pytest.approx(0.01)


def test_a_wide_spread_is_noisy():
    """The motivating run: random at 64 tokens printed 0.42x, one round slowed by other work."""
    out = speedup_spread([1.0, 1.0, 1.0], [2.4, 0.55, 0.5], limit=4.0)
    assert out["speedup"] == pytest.approx(1 / 0.55) and out["spread"] > NOISE
    assert out["noisy"].startswith("its 3 rounds spread over")


def test_just_over_ten_percent_is_noisy_and_just_under_is_not():
    assert speedup_spread([1.0, 1.0, 1.0], [0.5, 0.5, 0.5 / 1.19], None)["noisy"] is not None  # 19% of 2.0
    assert speedup_spread([1.0, 1.0, 1.0], [0.5, 0.5, 0.5 / 1.09], None)["noisy"] is None  # 9%


def test_beating_the_flops_limit_by_more_than_the_spread_is_noisy():
    """VisionZip printed 3.37x above its 2.21x FLOPs limit: the unpressed rounds were slowed."""
    out = speedup_spread([3.37, 3.40, 3.35], [1.0, 1.0, 1.0], limit=2.21)
    assert out["spread"] < NOISE and "above its FLOPs limit 2.21x" in out["noisy"]
    # above the limit by less than the spread: within the noise of the measurement, a result
    assert speedup_spread([2.22, 2.16, 2.28], [1.0, 1.0, 1.0], limit=2.21)["noisy"] is None


def test_speedup_spread_needs_one_pair_per_round():
    with pytest.raises(ValueError, match="one unpressed and one pressed time per round"):
        speedup_spread([1.0, 1.0], [0.5], None)


# ---- how the tables show them ----------------------------------------------------------------------
def _row(press, keep, speedup, low, high, noisy=None, limit=2.21):
    return dict(press=press, keep=keep, stage="pre_llm" if keep else "none", kept_tokens=float(keep or 256),
                avg_tokens=float(keep or 256), layer_kept=None, accuracy=0.8, accuracy_ci=[0.7, 0.9], agreement=0.9,
                agreement_ci=[0.8, 1.0], kl=0.1, flops={"total": 1e9}, flops_ratio=1 / limit, prefill_s=0.1,
                prefill_s_range=[0.09, 0.12], speedup=speedup, speedup_range=[low, high], noisy=noisy,
                speedup_limit=limit, peak_memory_bytes=2**20, kv_bytes=2**20, answers=[])


def _record():
    machine = dict(cpus=2, usable_cpus=2, threads=2, interop_threads=2, processes=1, load_before=[6.5, 3.0, 1.0],
                   load_after=[7.25, 4.0, 2.0], busy=True)
    rows = [_row("none", None, 1.0, 1.0, 1.0, limit=1.0), _row("visionzip", 64, 3.37, 3.31, 3.42, noisy="above"),
            _row("random", 64, 1.97, 1.93, 2.01)]
    return {"model": {"name": "demo", "visual_tokens_per_image": 256, "class": "X", "model_type": "llava",
                      "dtype": "float32", "parameters": 1}, "dataset": "easy-vqa", "n": 24, "labelled": True,
            "quality_metric": "accuracy", "rows": rows, "notes": [], "machine": machine,
            "settings": {"rounds": 5, "timing_batch": 1, "device": "cpu", "peak_memory": "profiler"}}


def test_speedup_text_shows_the_range_and_never_a_noisy_figure_alone():
    clean, noisy = _row("random", 64, 1.97, 1.93, 2.01), _row("visionzip", 64, 3.37, 3.31, 3.42, noisy="above")
    assert speedup_text(clean) == "1.97x [1.93, 2.01]" and speedup_text(clean, "pm") == "1.97x±2%"
    assert speedup_text(noisy, "pm") == "noisy" and speedup_text(noisy) == "noisy (3.37x [3.31, 3.42])"
    assert speedup_text({"speedup": 1.5}) == "1.50x"  # an older record, without rounds


def test_the_terminal_table_flags_the_noisy_cell_and_says_how_busy_the_machine_was():
    console = Console(width=80, record=True, file=io.StringIO())
    print_table(_record(), console)
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80
    assert "3.37" not in text and "noisy" in text and "1.97x±2%" in text
    assert "noisy: not a result" in " ".join(text.split())  # the footnote
    assert "load average 6.50 before, 7.25 after" in " ".join(text.split()) and "2 torch threads" in text


def test_the_report_files_flag_the_noisy_cell_and_carry_the_machine(tmp_path):
    markdown = to_markdown(_record())
    assert "noisy (3.37x [3.31, 3.42])" in markdown and "1.97x [1.93, 2.01]" in markdown
    assert "| 3.37x |" not in markdown and "Noisy speedups, not results: visionzip keep=64 (above)" in markdown
    assert "Machine: 2 CPUs, 2 torch threads, load average 6.50 before, 7.25 after (1 min): busy" in markdown
    assert "load average 6.50 before" in to_html(_record())
    paths = write_report(_record(), tmp_path)
    assert json.loads(paths["json"].read_text())["machine"]["load_after"] == [7.25, 4.0, 2.0]


def test_the_bench_cost_table_flags_the_noisy_cell():
    rows = [dict(press="none", keep=576, seconds=1.0, speedup=1.0, speedup_range=[1.0, 1.0], noisy=None, limit=1.0,
                 efficiency=1.0, overhead=0.0),
            dict(press="random", keep=64, stage="pre_llm", seconds=0.3, speedup=0.42, speedup_range=[0.3, 3.1],
                 noisy="spread", limit=4.3, efficiency=0.1, overhead=0.01)]
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(prefill_table(rows, title="prefill"))
    text = console.export_text()
    assert "0.42" not in text and "noisy" in text and "10%" not in text.split("noisy")[0]
    assert "noisy: not a result" in " ".join(text.split())


# ---- the machine's load --------------------------------------------------------------------------
def test_machine_load_before_and_after(monkeypatch):
    loads = [(1.0, 0.5, 0.25), (3.0, 1.0, 0.5)]
    monkeypatch.setattr(mmpress.eval.cost.os, "getloadavg", lambda: loads.pop(0))
    machine = machine_state()
    assert machine["load_before"] == [1.0, 0.5, 0.25] and machine["threads"] == torch.get_num_threads()
    assert machine["cpus"] >= 1 and machine["usable_cpus"] >= 1
    done = machine_done(dict(machine, usable_cpus=2))
    assert done["load_after"] == [3.0, 1.0, 0.5] and done["busy"] is True  # 3 runnable on 2 CPUs
    assert "busy" in machine_text(done) and "load average 1.00 before, 3.00 after (1 min)" in machine_text(done)
    loads[:] = [(2.2, 2.0, 2.0)]  # this run's own 2 threads on 2 CPUs, a little more: not busy
    quiet = machine_done(dict(machine, usable_cpus=2, load_before=[2.0, 2.0, 2.0]))
    assert quiet["busy"] is False and "busy" not in machine_text(quiet)


def test_the_bench_record_says_how_busy_the_machine_was():
    record = run_bench(tiny_llava(), tiny_processor(), ["random"], [16], samples(2), batch_size=2, max_new_tokens=2,
                       console=Console(file=io.StringIO()), repeats=1)
    machine = record["machine"]
    assert len(machine["load_before"]) == len(machine["load_after"]) == 3
    assert machine["threads"] == torch.get_num_threads() and machine["cpus"] >= 1 and machine["processes"] == 1
    assert isinstance(machine["busy"], bool)
