"""Which sign of CDPruner's relevance to use in the language model's embedding space (issue 16).

Official CDPruner (Theia-4869/CDPruner, ``llava_arch.py`` ``encode_images``) scores each image
token by the NEGATED mean cosine between its CLIP image embedding and CLIP text embeddings of the
instruction, min-max scaled. A transformers LLaVA has no CLIP text tower, so mmpress compares the
projected visual tokens with the LM input embeddings of the prompt's text instead; the two signs
keep completely different tokens. This script answers the same questions with both signs on the
demo model, with the bench's own pieces (``eval.bench``'s prompts and greedy generation,
``eval.metrics``' scoring and paired bootstrap: the same resampled questions for both signs), and
reports the paired 95% interval of accuracy(negated) - accuracy(un-negated). The unpressed
model is not re-run (its accuracy on the same questions is in benchmarks/results/QUALITY.md), nor
is the prefill timed: on this shared 2-core machine the full bench cells did not fit the time.

    python benchmarks/cdpruner_sign.py --data easy-vqa --n 96   # then --data scenes --n 64
    python benchmarks/cdpruner_sign.py --report                  # rewrite the .md from the .json

Each run adds its dataset to benchmarks/results/cdpruner_sign.json (the runs of two datasets may
go in parallel) and rewrites benchmarks/results/cdpruner_sign.md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from mmpress.api import ANSWER_HINT, encode
from mmpress.eval.bench import _generate
from mmpress.eval.data import load_dataset
from mmpress.eval.metrics import LEVEL, RESAMPLES, accuracy, bootstrap_ci, correctness, paired_bootstrap_ci
from mmpress.presses import get_press

RESULTS = Path(__file__).parent / "results"
JSON, MD = RESULTS / "cdpruner_sign.json", RESULTS / "cdpruner_sign.md"
KEEPS = (64, 16)
SIGNS = {"negated": True, "unnegated": False}  # label -> negate_relevance (negated: the official sign)
MAX_NEW_TOKENS, BATCH = 8, 8  # as mmpress bench


def measure(data: str, n: int) -> dict:
    from mmpress import load_demo

    model, processor = load_demo()
    samples = load_dataset(data, split="test", limit=n)
    answers = {(sign, keep): [] for sign in SIGNS for keep in KEEPS}
    started = time.time()
    for start in range(0, len(samples), BATCH):
        batch = samples[start : start + BATCH]
        inputs = encode(model, processor, [s["image"] for s in batch], [s["question"] for s in batch], ANSWER_HINT)
        for keep in KEEPS:
            for sign, negate in SIGNS.items():
                press = get_press("cdpruner", keep=keep, negate_relevance=negate)
                answers[(sign, keep)] += _generate(model, processor, inputs, press, MAX_NEW_TOKENS)[0]
        print(f"{data}: {start + len(batch)}/{len(samples)} questions, {time.time() - started:.0f} s", flush=True)
    block = {"n": len(samples), "seconds": round(time.time() - started), "budgets": {}}
    for keep in KEEPS:
        marks = {sign: correctness(answers[(sign, keep)], samples) for sign in SIGNS}
        low, high = paired_bootstrap_ci(marks["negated"], marks["unnegated"], seed=0)
        acc = {sign: accuracy(answers[(sign, keep)], samples) for sign in SIGNS}
        block["budgets"][str(keep)] = {
            **{sign: {"accuracy": acc[sign], "ci": list(bootstrap_ci(marks[sign], seed=0)),
                      "answers": answers[(sign, keep)], "correct": marks[sign]} for sign in SIGNS},
            "diff": acc["negated"] - acc["unnegated"], "diff_ci": [low, high],
            "favours": "negated" if low > 0 else "unnegated" if high < 0 else "neither (interval holds 0)",
        }
    return block


def markdown(result: dict) -> str:
    lines = ["# CDPruner's relevance sign on the demo model",
             "",
             "`python benchmarks/cdpruner_sign.py` (mmpress-demo, greedy answers of at most 8 tokens to the bench's "
             "prompts, CPU). Relevance is the mean cosine between each projected visual token and the prompt's "
             "text-token input embeddings, min-max scaled per image; **negated** is the official sign (CDPruner's "
             "`(-relevance).mean`), **un-negated** the other. Difference = accuracy(negated) - accuracy(un-negated) "
             f"on the same questions, with its {LEVEL:.0%} paired percentile bootstrap interval ({RESAMPLES} "
             "resamples of the questions, the same for both signs, seed 0). Each accuracy has its own "
             "percentile bootstrap interval.",
             "",
             "| data | n | keep / 256 | negated (official) | un-negated | difference [95% paired CI] | favours |",
             "|:--|--:|--:|:--|:--|:--|:--|"]
    for data, block in sorted(result["datasets"].items()):
        for keep, c in block["budgets"].items():
            def acc(sign):
                return f"{c[sign]['accuracy']:.2f} [{c[sign]['ci'][0]:.2f}, {c[sign]['ci'][1]:.2f}]"
            lines.append(f"| {data} | {block['n']} | {keep} | {acc('negated')} | {acc('unnegated')} | "
                         f"{c['diff']:+.3f} [{c['diff_ci'][0]:+.3f}, {c['diff_ci'][1]:+.3f}] | {c['favours']} |")
    lines += ["", "Reading (issue 16's rule: the official sign unless the un-negated one is clearly better, the paired "
              "interval of the difference below 0 on both datasets): the un-negated sign is never measurably better; the official "
              "negated sign is, at 16 tokens on easy-vqa. CDPruner's default stays the official sign."]
    lines += ["", "Measured with the original position ids (`positions=\"keep\"`, mmpress's default when this ran; "
              "the official renumbering is the default now: `positions_demo.md`)."]
    lines += ["", "Run time per dataset: " + ", ".join(f"{d} {b['seconds']} s" for d, b in sorted(result["datasets"].items()))
              + " (both signs, both budgets; a shared 2-core CPU)."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("easy-vqa", "scenes"))
    parser.add_argument("--n", type=int, help="the first N test questions (default: 96 easy-vqa, 64 scenes)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    if not args.report:
        if args.data is None:
            parser.error("pass --data easy-vqa or --data scenes (or --report)")
        torch.set_num_threads(args.threads)
        block = measure(args.data, args.n or {"easy-vqa": 96, "scenes": 64}[args.data])
    RESULTS.mkdir(exist_ok=True)
    with open(Path(tempfile.gettempdir()) / "mmpress_cdpruner_sign.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the two datasets' runs may finish at the same time
        result = json.loads(JSON.read_text()) if JSON.is_file() else {}
        result.setdefault("datasets", {})
        result.update({"what": "CDPruner relevance sign in the LM embedding space: negated (official) vs un-negated",
                       "model": "mmpress-demo", "keeps": list(KEEPS), "torch": torch.__version__,
                       "python": platform.python_version(),
                       "ci": {"level": LEVEL, "resamples": RESAMPLES, "seed": 0,
                              "method": "paired percentile bootstrap over the questions"}})
        if not args.report:
            result["datasets"][args.data] = block
        JSON.write_text(json.dumps(result, indent=1))
        MD.write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
