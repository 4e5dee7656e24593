"""Quality of the in-vision presses on the demo model (issue 20): ``tome_vit`` and ``downsample``
at 64 and 16 visual tokens per image, next to the unpressed model and ``divprune`` (the best
pre-LLM press at 64 in QUALITY.md), on easy-vqa, with ``mmpress bench``'s own code (greedy
answers, bootstrap intervals, FLOPs with the tower at its pressed length, round-robin timing).

The demo's DINOv2 tower has 12 blocks and the language model reads hidden state 8 (feature layer
-5), so ToMe's merges in blocks 0-7 set the tokens the LM gets: r=24 in every block takes the 256
patches to 256 - 8 * 24 = 64 ("tome_vit_r24": ToMe's constant schedule); 16 cannot be reached
with one r (ToMe caps r at half the tokens left, 23 -> 16 in block 7 needs r=7, block 0 r=75), so
"tome_vit_to16" merges a fixed share of each block's tokens, r = 75, 53, 37, 27, 19, 13, 9, 7
(256 -> 181 -> 128 -> 91 -> 64 -> 45 -> 32 -> 23 -> 16), none after. Both are registered here
under those names so that ``run_bench`` runs them as presses that set their own budget.

    python benchmarks/quality_vision.py [--limit 48] [--resume]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

import mmpress
from mmpress.eval.bench import run_bench
from mmpress.eval.data import load_dataset
from mmpress.eval.report import write_report
from mmpress.presses.base import register
from mmpress.presses.tome_vit import ToMeViTPress

OUT = Path(__file__).parent / "results" / "bench-vision"


@register
@dataclass
class ToMeViTR24(ToMeViTPress):
    """tome_vit with r=24 in every block: 64 of the demo's 256 patches at its feature layer."""

    r: int = 24
    name = "tome_vit_r24"


@register
@dataclass
class ToMeViTTo16(ToMeViTPress):
    """tome_vit merging about 29% of each block's tokens in blocks 0-7: 16 at the demo's feature layer."""

    r: list = field(default_factory=lambda: [75, 53, 37, 27, 19, 13, 9, 7])
    name = "tome_vit_to16"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presses", default="divprune,downsample,tome_vit_r24,tome_vit_to16")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread times steadier
    samples = load_dataset("easy-vqa", split="test", limit=args.limit)
    model, processor = mmpress.load_demo()
    path = args.out / "bench.json"
    previous = json.loads(path.read_text()) if args.resume and path.is_file() else None
    args.out.mkdir(parents=True, exist_ok=True)

    def checkpoint(record):
        path.write_text(json.dumps(record, indent=2, default=str))

    record = run_bench(model, processor, args.presses.split(","), [64, 16], samples, repeats=args.repeats,
                       timing_batch=1, dataset="easy-vqa:test", model_id="demo", previous=previous,
                       checkpoint=checkpoint)
    write_report(record, args.out)


if __name__ == "__main__":
    main()
