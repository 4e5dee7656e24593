"""Prefill speed of pre-LLM presses vs their FLOPs-ratio limit, for every registered family at its
real CPU shape (issue 17).

One run per family at batch 1, on a random model of the family's "real" shape
(``Adapter.build("real")``: the released tower at its resolution and token count, and the shared
12 x 896 language model) with the family's bench medium (``Adapter.bench_media``). Each press keeps
25% (and 10%) of the visual tokens. Cells (unpressed, the tower alone, each press x budget) are
timed round-robin, median of --repeats rounds after a warm-up round, on one thread; ratios are
taken within one run, so a slow drift of a shared machine hits every cell alike. The load average
before and after each run is recorded: the figures of a busy machine say so.

Writes benchmarks/results/prefill_families.json and .md after each run; ``--resume`` keeps the
runs already in the JSON (so the families can be measured in several sittings), ``--rewrite``
rewrites the .md from the JSON.

    python benchmarks/prefill_families.py [--families llava,gemma3] [--repeats 3] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from mmpress.eval.prefill import run_prefill, shaped, visual_tokens
from mmpress.registry import FAMILIES

RESULTS = Path(__file__).parent / "results"
TARGET = 0.9  # issue 17: pre-LLM presses reach at least 0.9 of the FLOPs limit


def default_runs() -> list[str]:
    """One image run per family, of its last-listed model type (the newest: qwen2_5_vl, idefics3)."""
    return [f"{cls.model_types[-1]}:image" for cls in FAMILIES.values() if cls.bench_media.get("image")]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--presses", default="divprune,random")
    parser.add_argument("--fractions", default="0.25,0.1")
    parser.add_argument("--runs", default=None, help="arch:kind,... (default: one image run per family)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the JSON")
    parser.add_argument("--rewrite", action="store_true", help="rewrite the .md from the .json, time nothing")
    args = parser.parse_args()
    path = RESULTS / "prefill_families.json"
    if args.rewrite:
        return write(json.loads(path.read_text()))
    torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.fractions.split(",")]
    record = {"device": platform.processor() or "cpu", "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "repeats": args.repeats, "batch": 1, "fractions": fractions, "runs": []}
    if args.resume and path.exists():
        record["runs"] = json.loads(path.read_text())["runs"]
    done = {(r["arch"], r["input"]) for r in record["runs"]}
    for run in (args.runs.split(",") if args.runs else default_runs()):
        arch, kind = run.split(":")
        if (arch, kind) in done:
            continue
        model, inputs = shaped(arch, kind=kind)
        n_vis = visual_tokens(model, inputs)
        keeps = [round(f * n_vis) for f in fractions]
        load_before = os.getloadavg()
        start = time.perf_counter()
        result = run_prefill(model, inputs, args.presses.split(","), keeps, repeats=args.repeats)
        minutes = (time.perf_counter() - start) / 60
        record["runs"].append({"arch": arch, "input": kind, "visual_tokens": n_vis, "seq_len": inputs["input_ids"].shape[1],
                               "shape": describe(model), "minutes": minutes, "load_before": load_before,
                               "load_after": os.getloadavg(), "summary": summary(result, keeps, fractions), **result})
        print(f"{arch} {kind}: {minutes:.1f} min, load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
        del model
        write(record)


def describe(model) -> str:
    """The tower and language model of a random model, from its config."""
    config = model.config
    vision = getattr(config, "vision_config", None)
    text = config.get_text_config()
    parts = []
    if vision is not None:
        layers = getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth", None)
        hidden = getattr(vision, "hidden_size", None) or getattr(vision, "embed_dim", None)
        parts.append(f"{type(vision).__name__.removesuffix('Config')} {layers} x {hidden}")
    parts.append(f"{type(text).__name__.removesuffix('Config')} LM {text.num_hidden_layers} x {text.hidden_size}")
    return ", ".join(parts)


def summary(result: dict, keeps: list[int], fractions: list[float]) -> dict:
    """Per budget: the FLOPs limit and the fraction of it the presses reach (median, min, max)."""
    out = {}
    for keep, fraction in zip(keeps, fractions):
        rows = [r for r in result["rows"] if r["keep"] == keep]
        if not rows:
            continue
        effs = [r["efficiency"] for r in rows]
        out[f"{fraction:.0%}"] = dict(keep=keep, limit=statistics.median(r["limit"] for r in rows),
                                      speedup=statistics.median(r["speedup"] for r in rows),
                                      fraction_median=statistics.median(effs), fraction_min=min(effs),
                                      fraction_max=max(effs))
    return out


def split_ideal(run: dict, row: dict) -> float:
    """The speedup a press reaches if the tower keeps its measured time and the language model's
    time shrinks with its FLOPs: unpressed / (vision + LM x pressed LM FLOPs / unpressed LM FLOPs).
    Where the tower runs at a lower FLOP rate than the LM, this is below the FLOPs limit, and it is
    the bound a press after the tower actually faces."""
    vision, language = run["flops"]["vision"], run["flops"]["language"]
    lm_ratio = ((vision + language) / row["limit"] - vision) / language
    base, tower = run["rows"][0]["seconds"], run["vision_seconds"]
    return base / (tower + (base - tower) * lm_ratio)


def write(record: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prefill_families.json").write_text(json.dumps(record, indent=2))
    lines = [f"# Prefill per model family: random models at each family's real CPU shape, batch 1, "
             f"{record['threads']} thread(s) of {record.get('cpus', '?')}, median of {record['repeats']} round-robin rounds",
             "", "Written by `benchmarks/prefill_families.py`. Speedup = unpressed prefill / pressed prefill; limit = "
             "FLOPs ratio (vision tower + projector + language model, unpressed vs on the kept length); fraction = "
             "speedup / limit (target: at least 90% for pre-LLM presses at 25%). Vision share: the tower + projector "
             "timed alone over the unpressed prefill; a press after the tower is bounded by 1 / vision share. Split "
             "ideal: the speedup if the tower keeps its measured time and the language model's time shrinks with its "
             "FLOPs. Load: the 1-minute load average before and after the run (2 cores: above 1 means other work "
             "shared the cores; ratios are taken within one round-robin run).", "",
             "## Fraction of the limit per family", "",
             "| family | input | visual tokens | unpressed ms | vision share (time) | vision share (FLOPs) | keep | "
             "limit | split ideal | median speedup | fraction of limit (median) | (min-max) | load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in record["runs"]:
        base = run["rows"][0]
        flops_share = run["flops"]["vision"] / (run["flops"]["vision"] + run["flops"]["language"])
        load = f"{run['load_before'][0]:.1f}-{run['load_after'][0]:.1f}" if "load_before" in run else "?"
        for label, s in run["summary"].items():
            rows = [r for r in run["rows"] if r["keep"] == s["keep"]]
            ideal = statistics.median(split_ideal(run, r) for r in rows)
            flag = "" if s["fraction_median"] >= TARGET else " (below 90%)"
            lines.append(f"| {run['arch']} | {run['input']} | {run['visual_tokens']} | {base['seconds'] * 1e3:.0f} | "
                         f"{run['vision_share']:.0%} | {flops_share:.0%} | {s['keep']} ({label}) | {s['limit']:.2f}x | "
                         f"{ideal:.2f}x | {s['speedup']:.2f}x | {s['fraction_median']:.0%}{flag} | "
                         f"{s['fraction_min']:.0%}-{s['fraction_max']:.0%} | {load} |")
    lines.append("")
    for run in record["runs"]:
        lines += [f"## {run['arch']}, {run['input']}: {run['visual_tokens']} visual tokens, {run['seq_len']} in all "
                  f"({run['minutes']:.1f} min)", "", f"{run['shape']}.", "",
                  f"Unpressed split: vision tower + projector {run['vision_seconds'] * 1e3:.0f} ms "
                  f"({run['vision_share']:.0%}), language model "
                  f"{(run['rows'][0]['seconds'] - run['vision_seconds']) * 1e3:.0f} ms ({1 - run['vision_share']:.0%}).", "",
                  "| press | keep | prefill ms | speedup | FLOPs limit | speedup/limit | split ideal | "
                  "speedup/split ideal | press overhead |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in run["rows"]:
            ideal = split_ideal(run, r)
            lines.append(f"| {r['press']} | {r['keep']} | {r['seconds'] * 1e3:.0f} | {r['speedup']:.2f}x | "
                         f"{r['limit']:.2f}x | {r['efficiency']:.0%} | {ideal:.2f}x | {r['speedup'] / ideal:.0%} | "
                         f"{r['overhead']:.1%} |")
        lines += [f"- skipped {name}: {reason}" for name, reason in run["skipped"].items()]
        lines.append("")
    (RESULTS / "prefill_families.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
