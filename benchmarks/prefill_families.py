"""Prefill speed of presses vs their FLOPs-ratio limit, per model family and input (issue 8).

Three runs at batch 1, each on a random model of the family's shape (mmpress.eval.prefill):
LLaVA-1.5 with a 576-token image; Qwen2.5-VL with a 1024-token image (896 px, 64 x 64 patches)
and with a video of 16 frames at 448 px (8 temporal steps x 256 tokens = 2048 tokens). Every
press keeps 25% and 10% of the visual tokens; cells are timed round-robin, median of --repeats,
on one thread. The vision tower + projector is timed alone in the same rounds, so each run
reports the vision / language-model split of its unpressed prefill: a press acting after the
tower cannot remove the tower's time, and on video the tower dominates (shared/MEASURED.md).

Writes benchmarks/results/prefill_families.json and .md (rewritten after each run).

    python benchmarks/prefill_families.py [--repeats 3] [--qwen-vision-layers 4] [--qwen-lm-layers 6]

The Qwen shape of the recorded run is QwenShape with depths halved (vision 4 x 640, full
attention in block 3 and windows of 112 px in blocks 0-2; language model 6 x 896) so that the
three runs fit in ~15 minutes on 2 shared CPU cores; the token counts are the realistic ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mmpress.eval.prefill import QwenShape, Shape, run_prefill, shaped

RESULTS = Path(__file__).parent / "results"
FRACTIONS = (0.25, 0.10)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-presses", default="divprune,random,pool,tome")
    parser.add_argument("--video-presses", default="divprune,random,evs,temporal_merge")
    parser.add_argument("--qwen-vision-layers", type=int, default=4)
    parser.add_argument("--qwen-lm-layers", type=int, default=6)
    parser.add_argument("--runs", default="llava:image,qwen2_5_vl:image,qwen2_5_vl:video")
    parser.add_argument("--rewrite", action="store_true", help="rewrite the .md from the .json, time nothing")
    args = parser.parse_args()
    if args.rewrite:
        return write(json.loads((RESULTS / "prefill_families.json").read_text()))
    torch.set_num_threads(args.threads)

    record = {"device": platform.processor() or "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "repeats": args.repeats, "batch": 1, "fractions": list(FRACTIONS), "runs": []}
    for run in args.runs.split(","):
        arch, kind = run.split(":")
        shape = Shape() if arch == "llava" else QwenShape(arch=arch, vision_layers=args.qwen_vision_layers,
                                                          lm_layers=args.qwen_lm_layers)
        model, inputs = shaped(arch, shape, kind=kind)
        n_vis = int(sum((inputs["input_ids"] == t).sum() for t in {model.config.image_token_id,
                                                                  getattr(model.config, "video_token_id", -1)}))
        keeps = [round(f * n_vis) for f in FRACTIONS]
        presses = (args.video_presses if kind == "video" else args.image_presses).split(",")
        start = time.perf_counter()
        result = run_prefill(model, inputs, presses, keeps, repeats=args.repeats)
        minutes = (time.perf_counter() - start) / 60
        record["runs"].append({"arch": arch, "input": kind, "visual_tokens": n_vis,
                               "seq_len": inputs["input_ids"].shape[1],
                               "shape": asdict(shape), "minutes": minutes, "summary": summary(result, keeps), **result})
        print(f"{arch} {kind}: {minutes:.1f} min", flush=True)
        del model
        write(record)


def summary(result: dict, keeps: list[int]) -> dict:
    """Per budget: the FLOPs limit and the fraction of it the presses reach (median, min, max)."""
    out = {}
    for keep, fraction in zip(keeps, FRACTIONS):
        rows = [r for r in result["rows"] if r["keep"] == keep]
        effs = [r["efficiency"] for r in rows]
        out[f"{fraction:.0%}"] = dict(keep=keep, limit=statistics.median(r["limit"] for r in rows),
                                      speedup=statistics.median(r["speedup"] for r in rows),
                                      fraction_median=statistics.median(effs), fraction_min=min(effs),
                                      fraction_max=max(effs))
    return out


def split_ideal(run: dict, row: dict) -> float:
    """The speedup a press reaches if the tower keeps its measured time and the language model's
    time shrinks with its FLOPs: unpressed / (vision + LM x pressed LM FLOPs / unpressed LM FLOPs).
    Where the tower runs at a lower FLOP rate than the LM (Qwen2.5-VL's windows), this is below
    the FLOPs limit, and it is the bound a press after the tower actually faces."""
    vision, language = run["flops"]["vision"], run["flops"]["language"]
    lm_ratio = ((vision + language) / row["limit"] - vision) / language
    base, tower = run["rows"][0]["seconds"], run["vision_seconds"]
    return base / (tower + (base - tower) * lm_ratio)


def write(record: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prefill_families.json").write_text(json.dumps(record, indent=2))
    lines = [f"# Prefill per model family: random models, batch 1, {record['device']}, {record['threads']} thread(s), "
             f"median of {record['repeats']} round-robin rounds", "",
             "Speedup = unpressed prefill / pressed prefill; limit = FLOPs ratio (vision tower + projector + "
             "language model, unpressed vs on the kept length); fraction = speedup / limit. Vision share: the "
             "tower + projector timed alone (`get_image_features` / `get_video_features`) over the unpressed "
             "prefill; a press after the tower is bounded by 1 / vision share. Split ideal: the speedup if the "
             "tower keeps its measured time and the language model's time shrinks with its FLOPs (below the FLOPs "
             "limit where the tower runs at a lower FLOP rate than the language model).", "",
             "The Qwen2.5-VL shape runs with half QwenShape's depths (vision 4 x 640, LM 6 x 896) so the three runs "
             "fit in ~15 minutes on 2 CPU cores shared with other jobs; token counts are the realistic ones. Shared "
             "cores also slow absolute times (the LLaVA prefill took 2.9 s alone in prefill.md); ratios are taken "
             "within one round-robin run.", "",
             "## Fraction of the limit per family", "",
             "| family | input | visual tokens | unpressed ms | vision ms | vision share (time) | vision share "
             "(FLOPs) | keep | limit | split ideal | median speedup | fraction of limit (median) | (min-max) | "
             "fraction of split ideal (median) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in record["runs"]:
        base = run["rows"][0]
        flops_share = run["flops"]["vision"] / (run["flops"]["vision"] + run["flops"]["language"])
        for label, s in run["summary"].items():
            rows = [r for r in run["rows"] if r["keep"] == s["keep"]]
            ideal = statistics.median(split_ideal(run, r) for r in rows)
            of_ideal = statistics.median(r["speedup"] / split_ideal(run, r) for r in rows)
            lines.append(f"| {run['arch']} | {run['input']} | {run['visual_tokens']} | {base['seconds'] * 1e3:.0f} | "
                         f"{run['vision_seconds'] * 1e3:.0f} | {run['vision_share']:.0%} | {flops_share:.0%} | "
                         f"{s['keep']} ({label}) | {s['limit']:.2f}x | {ideal:.2f}x | {s['speedup']:.2f}x | "
                         f"{s['fraction_median']:.0%} | {s['fraction_min']:.0%}-{s['fraction_max']:.0%} | "
                         f"{of_ideal:.0%} |")
    lines.append("")
    for run in record["runs"]:
        sh = run["shape"]
        if run["arch"] == "llava":
            what = (f"CLIP {sh['vision_layers']} x {sh['vision_hidden']} at {sh['image_size']} px, "
                    f"Qwen2 LM {sh['lm_layers']} x {sh['lm_hidden']}")
        else:
            what = (f"vision {sh['vision_layers']} x {sh['vision_hidden']} (windows of {sh['window_size']} px), LM "
                    f"{sh['lm_layers']} x {sh['lm_hidden']} with M-RoPE; "
                    + (f"{sh['image_size']} px image" if run["input"] == "image"
                       else f"{sh['frames']} frames at {sh['frame_size']} px"))
        lines += [f"## {run['arch']}, {run['input']}: {run['visual_tokens']} visual tokens, {run['seq_len']} in all "
                  f"({run['minutes']:.1f} min)", "", what + ".", "",
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
