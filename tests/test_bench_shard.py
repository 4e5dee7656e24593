"""`mmpress bench` over several processes (`accelerate launch`): each answers its share of the
batches, the parts meet in batch order, and the one report answers every question as one process
does; timings are pooled over every process's rounds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from mmpress.eval.bench import _Cell, merge_parts, pool_timings, shard
from conftest import save_tiny_set


@pytest.mark.parametrize("n,world", [(7, 2), (8, 2), (5, 3), (1, 2), (0, 2), (9, 4)])
def test_shards_cover_every_batch_once_contiguously(n, world):
    shards = [shard(n, rank, world) for rank in range(world)]
    assert [i for part in shards for i in part] == list(range(n))  # in order, each once
    sizes = [len(part) for part in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # the first ranks take the extra


def test_shard_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        shard(4, 2, 2)


def _parts(n_batches: int) -> list[dict]:
    """Per-batch results as one process adds them: answers, token counts, FLOPs, KV bytes, KL."""
    g = torch.Generator().manual_seed(0)
    parts = []
    for i in range(n_batches):
        rows = 1 + i % 3
        stats = {"kept_visual_tokens": 16 * rows, "layer_avg_visual_tokens": 16.5 * rows, "items": rows,
                 "layer_kept": [[2, 8 * rows]]}
        parts.append(dict(batch=i, answers=[f"a{i}.{r}" for r in range(rows)], stats=stats, flops=None,
                          kv=1000 + i, kl=torch.rand(rows, generator=g, dtype=torch.float64)))
    return parts


def _filled(parts: list[dict]) -> _Cell:
    cell = _Cell("random", 16)
    for part in parts:
        cell.add(part["answers"], part["stats"], part["flops"], part["kv"], kl=part["kl"])
    return cell


def test_merged_parts_fill_a_cell_as_one_process_does():
    parts = _parts(7)
    one = _filled(parts)
    gathered = [[parts[i] for i in shard(7, rank, 3)] for rank in range(3)]
    gathered = [gathered[2], gathered[0], gathered[1]]  # whatever order the processes meet in
    merged = _filled(merge_parts(gathered, 7))
    assert merged.answers == one.answers and torch.equal(torch.cat(merged.kl), torch.cat(one.kl))
    assert (merged.kept, merged.avg, merged.images, merged.kv_bytes) == (one.kept, one.avg, one.images, one.kv_bytes)
    assert dict(merged.layer_kept) == dict(one.layer_kept)


@pytest.mark.parametrize("gathered", [[[0, 1], [1, 2]], [[0], [2]], [[0, 1, 2], []], [[1, 0], [2, 3]]])
def test_merge_refuses_a_batch_missing_or_answered_twice(gathered):
    batches = [[dict(batch=i) for i in process] for process in gathered]
    if sorted(i for process in gathered for i in process) == [0, 1, 2]:
        assert [p["batch"] for p in merge_parts(batches, 3)] == [0, 1, 2]
    else:
        with pytest.raises(RuntimeError, match="expected each of 0..2 once"):
            merge_parts(batches, 3)


def test_pooled_timings_take_each_round_s_ratio_within_its_process():
    """Process 1 ran twice as slow (its own load): its rounds' ratios still count as measured."""
    fast = {("random", 16): dict(base=[1.0, 1.0], times=[0.5, 0.5], limit=2.5, memory=10)}
    slow = {("random", 16): dict(base=[2.0, 2.2], times=[1.0, 1.0], limit=2.5, memory=20)}
    pooled = pool_timings([fast, slow])[("random", 16)]
    assert pooled["speedup_rounds"] == [2.0, 2.0, 2.0, 2.2] and pooled["speedup_range"] == [2.0, 2.2]
    assert pooled["speedup"] == pytest.approx(2.0) and pooled["memory"] == 10  # the first process's
    assert [r["speedup"] for r in pooled["ranks"]] == [2.0, pytest.approx(2.1)]
    assert pooled["seconds"] == pytest.approx(0.75) and pooled["seconds_range"] == [0.5, 1.0]
    assert "ranks" not in pool_timings([fast])[("random", 16)]


# ---- two processes, end to end --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    save_tiny_set(root, 5)
    return root


def _bench(files, out, launch: list[str]) -> subprocess.CompletedProcess:
    args = ["-m", "mmpress.cli", "bench", "--model", str(files / "tiny"), "--data", str(files / "set.jsonl"),
            "--presses", "random,divprune", "--keep", "16", "--batch-size", "2", "--max-new-tokens", "3",
            "--rounds", "1", "--out", str(out)]
    # one thread a process: the two share the CPUs, and the answers never depend on a thread count
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([sys.executable, *launch, *args], env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_answer_as_one(files, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): 5 questions in 3 batches,
    split 2 + 1; the one report holds every question's answer, each as the single process gives it."""
    single = _bench(files, tmp_path / "one", [])
    assert single.returncode == 0, single.stderr[-3000:]
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    double = _bench(files, tmp_path / "two", launch)
    if double.returncode != 0 and "mmpress.cli FAILED" not in double.stderr:  # no process of ours ever ran
        pytest.skip(f"accelerate's launcher could not start 2 processes here: {double.stderr[-500:]}")
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "bench.json").read_text())
    two = json.loads((tmp_path / "two" / "bench.json").read_text())
    assert one["settings"]["processes"] == 1 and two["settings"]["processes"] == 2
    assert two["machine"]["processes"] == 2 and len(two["machine"]["threads_per_process"]) == 2
    assert [(r["press"], r["keep"]) for r in two["rows"]] == [(r["press"], r["keep"]) for r in one["rows"]]
    for a, b in zip(one["rows"], two["rows"]):
        assert len(b["answers"]) == 5
        for key in ("answers", "correct", "agree", "accuracy", "accuracy_ci", "agreement", "kept_tokens",
                    "avg_tokens", "flops", "flops_ratio", "kv_bytes"):
            assert b[key] == a[key], (a["press"], key)
        assert b["kl"] == pytest.approx(a["kl"], abs=1e-6)
        assert len(b["speedup_rounds"]) == 2 and len(b["timing_ranks"]) == 2  # one round on each process
    assert two["fingerprint"] == one["fingerprint"]
    assert "2 processes timed the same batch at once" in two["timing"]
    assert (tmp_path / "two" / "bench.md").is_file() and "wrote the report" in double.stdout
    assert double.stdout.count("wrote the report") == 1  # one report, from the first process
