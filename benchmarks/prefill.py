"""Prefill speed of every press vs its FLOPs-ratio limit (issue 2's performance target).

Builds the LLaVA-1.5-shaped random model (mmpress.eval.prefill.Shape: CLIP 6x384 @ 336 px,
Qwen2 12x896, 576 image + ~33 text tokens), times the prefill (median of --repeats) unpressed and
for every press x budget, at batch 1 and batch 8 with ragged prompts, and writes
benchmarks/results/prefill.json and prefill.md.

Targets: at 64/576 tokens, measured speedup >= 90% of the FLOPs-ratio limit; press overhead
<= 3% of the unpressed prefill.

    python benchmarks/prefill.py [--repeats 5] [--batches 1,8] [--keeps 192,128,64]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

import mmpress
from mmpress.eval.prefill import Shape, bench_prefill, llava_shaped, prompt_batch

RESULTS = Path(__file__).parent / "results"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--keeps", default="192,128,64")
    parser.add_argument("--batch8-keeps", default="64", help="budgets timed at batch > 1 (slow on CPU)")
    parser.add_argument("--presses", default="all")
    args = parser.parse_args()

    presses = [p for p in mmpress.list_presses() if p != "none"] if args.presses == "all" else args.presses.split(",")
    shape = Shape()
    model = llava_shaped(shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    record = {"shape": shape.__dict__, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats, "runs": []}
    for batch in map(int, args.batches.split(",")):
        keeps = args.keeps if batch == 1 else args.batch8_keeps
        inputs = {k: v.to(device) for k, v in prompt_batch(shape, batch=batch).items()}
        rows = bench_prefill(model, inputs, presses, [int(k) for k in keeps.split(",")], repeats=args.repeats)
        record["runs"].append({"batch": batch, "rows": rows})
        print(f"batch {batch}: done")

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prefill.json").write_text(json.dumps(record, indent=2))
    lines = [f"# Prefill: LLaVA-1.5-shaped random model, {record['device']}, {record['threads']} threads, "
             f"median of {args.repeats}", ""]
    for run in record["runs"]:
        lines += [f"## batch {run['batch']} (ragged prompts)", "",
                  "| press | keep | prefill ms | speedup | FLOPs limit | speedup/limit | press overhead |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in run["rows"]:
            lines.append(f"| {r['press']} | {r['keep']} | {r['seconds'] * 1e3:.1f} | {r['speedup']:.2f}x | "
                         f"{r['limit']:.2f}x | {r['efficiency']:.0%} | {r['overhead']:.1%} |")
        lines.append("")
    (RESULTS / "prefill.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
