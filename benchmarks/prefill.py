"""Prefill speed of every press vs its FLOPs-ratio limit (issue 2's performance target).

Builds the LLaVA-1.5-shaped random model (the llava family's "real" shape: CLIP 6x384 @ 336 px,
Qwen2 12x896, 576 image + ~33 text tokens), times the prefill (median of --repeats) unpressed and
for every press x budget, at batch 1 and batch 8 with ragged prompts, and writes
benchmarks/results/prefill.json and prefill.md. In-LLM presses (keep@Lk) are listed with the
visual tokens averaged over the LM's layers, and their FLOPs limit counts each layer at its own
length; with --decode-steps (default: 8 when a KV press runs), the KV cache each press leaves and
greedy decode tokens/s, pressed vs unpressed, from the same rounds.

Targets: at 64/576 tokens, measured speedup >= 90% of the FLOPs-ratio limit; press overhead
<= 3% of the unpressed prefill.

    python benchmarks/prefill.py [--repeats 5] [--batches 1,8] [--keeps 192,128,64] [--decode-steps 8]
    python benchmarks/prefill.py --name prefill_stages --lm-layers 32 --lm-hidden 512 --lm-intermediate 1536 \
        --lm-heads 8 --presses fastv,pdrop,vtw,dart_llm,sparsevlm,snapkv,lookm,divprune --keeps 64 --batches 1,4 \
        --batch8-keeps 64 --repeats 3   # the in-LLM and KV presses at their default layers
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

import mmpress
from mmpress.eval.prefill import bench_prefill, shaped
from mmpress.models.examples import lm_shape
from mmpress.registry import ADAPTERS
from mmpress.eval.report import keep_text

RESULTS = Path(__file__).parent / "results"
LM = lm_shape("real")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--keeps", default="192,128,64")
    parser.add_argument("--batch8-keeps", default="64", help="budgets timed at batch > 1 (slow on CPU)")
    parser.add_argument("--presses", default="all")
    parser.add_argument("--decode-steps", type=int, default=None,
                        help="greedy decode steps timed after each prefill (default: 8 with a KV press, else 0)")
    parser.add_argument("--lm-layers", type=int, default=LM["lm_layers"], help="e.g. 32 (LLaVA-1.5-7B's depth) "
                        "for the in-LLM presses' default layers")
    parser.add_argument("--lm-hidden", type=int, default=LM["lm_hidden"])
    parser.add_argument("--lm-intermediate", type=int, default=LM["lm_intermediate"])
    parser.add_argument("--lm-heads", type=int, default=LM["lm_heads"])
    parser.add_argument("--name", default="prefill", help="results/<name>.json and .md")
    args = parser.parse_args()

    presses = [p for p in mmpress.list_presses() if p != "none"] if args.presses == "all" else args.presses.split(",")
    decode_steps = args.decode_steps
    if decode_steps is None:
        decode_steps = 8 if any(mmpress.PRESSES[p].stage == "kv" for p in presses) else 0
    shape = dict(LM, lm_layers=args.lm_layers, lm_hidden=args.lm_hidden, lm_intermediate=args.lm_intermediate,
                 lm_heads=args.lm_heads)
    model, _ = shaped("llava", **shape)
    vision = model.config.vision_config
    shape.update(vision_layers=vision.num_hidden_layers, vision_hidden=vision.hidden_size, image_size=vision.image_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    record = {"shape": shape, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats,
              "decode_steps": decode_steps, "runs": []}
    for batch in map(int, args.batches.split(",")):
        keeps = args.keeps if batch == 1 else args.batch8_keeps
        rows = [[(shape["image_size"], shape["image_size"])]] * batch  # ragged text, one image per row
        inputs = {k: v.to(device) for k, v in ADAPTERS["llava"].prompts(model, rows).items()}
        rows = bench_prefill(model, inputs, presses, [int(k) for k in keeps.split(",")], repeats=args.repeats,
                             decode_steps=decode_steps)
        record["runs"].append({"batch": batch, "rows": rows})
        print(f"batch {batch}: done")

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=2))
    lines = [f"# Prefill: LLaVA-1.5-shaped random model, {record['device']}, {record['threads']} threads, "
             f"median of {args.repeats}", "",
             f"LM: {shape['lm_layers']} layers x {shape['lm_hidden']} (Qwen2, {shape['lm_heads']} heads / "
             f"{shape['lm_kv_heads']} KV heads); CLIP {shape['vision_layers']} x {shape['vision_hidden']} @ "
             f"{shape['image_size']} px.", ""]
    decode = decode_steps > 0
    for run in record["runs"]:
        lines += [f"## batch {run['batch']} (ragged prompts)", "",
                  "| press | keep | avg tokens | prefill ms | speedup | FLOPs limit | speedup/limit | press overhead |"
                  + (" KV cache | decode tok/s | decode speedup |" if decode else ""),
                  "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if decode else "")]
        for r in run["rows"]:
            line = (f"| {r['press']} | {keep_text(r)} | {r['avg_tokens']:.0f} | {r['seconds'] * 1e3:.1f} | "
                    f"{r['speedup']:.2f}x | {r['limit']:.2f}x | {r['efficiency']:.0%} | {r['overhead']:.1%} |")
            if decode:
                line += f" {r['kv_bytes'] / 2**20:.2f} MiB | {r['decode_tok_s']:.1f} | {r['decode_speedup']:.2f}x |"
            lines.append(line)
        lines += ["", "keep@Lk: an in-LLM press, from decoder layer k on (avg tokens: over the LM's layers); "
                  "keep@KV: a KV-cache press (its prefill unpressed).", ""]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
