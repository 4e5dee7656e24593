"""GPU prefill of every press against the ideal, on the LLaVA-1.5-7B shape (issue 10).

Random weights of the real shape (compute does not depend on the weights): CLIP ViT-L/14 (24 x
1024) + a 32 x 4096 Llama, bf16, SDPA. Cases: 576 image tokens (336 px) keeping 64, and 2304
image tokens (672 px) keeping 576, at batch 1 and 8 (ragged prompts, left padding).

"Ideal" is the best any pre-LLM press can do: the vision tower + projector on every image, then
the language model on exactly the kept length, timed in the same round-robin as the presses.
A press's "of ideal" is ideal time / press time (1.0 = no overhead at all).

Also records, per press, the host syncs of one pressed forward beyond the unpressed model's
(``torch.cuda.set_sync_debug_mode``) and writes benchmarks/results/prefill_gpu.{json,md}.

    python benchmarks/prefill_gpu.py [--repeats 10] [--presses all]
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch
import transformers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import mmpress
from mmpress.models.llava import IMAGE_TOKEN, LlavaAdapter

RESULTS = Path(__file__).parent / "results"
CASES = [  # (image size, keep, batch)
    (336, 64, 1), (336, 64, 8), (672, 576, 1), (672, 576, 8),
]


def llava_7b_shaped(image_size: int, layers: int = 32) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=image_size, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = LlavaForConditionalGeneration(config).eval()
        finally:
            torch.set_default_dtype(torch.float32)
    return model


def cuda_time(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def count_syncs(fn) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run_case(model, image_size: int, keep: int, batch: int, presses: list[str], repeats: int) -> dict:
    rows = [[(image_size, image_size)]] * batch  # ragged text, one image per row
    inputs = {k: v.cuda() for k, v in LlavaAdapter.prompts(model, rows).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    n = (image_size // 14) ** 2
    ideal_len = inputs["input_ids"].shape[1] - n + keep
    embeds = torch.randn(batch, ideal_len, 4096, device="cuda", dtype=torch.bfloat16)
    ideal_mask = torch.ones(batch, ideal_len, dtype=torch.long, device="cuda")

    def forward():
        model(**inputs, logits_to_keep=1)

    def ideal():
        model.model.get_image_features(pixel_values=inputs["pixel_values"])
        model(inputs_embeds=embeds, attention_mask=ideal_mask, logits_to_keep=1)

    cells = {"none": forward, "ideal": ideal}
    objs = {name: mmpress.get_press(name, keep=keep) for name in presses}
    times = {name: [] for name in [*cells, *presses]}
    with torch.inference_mode():
        for round_ in range(repeats + 2):  # two warm-up rounds
            for name in times:
                if name in objs:
                    with objs[name](model):
                        seconds = cuda_time(forward)
                else:
                    seconds = cuda_time(cells[name])
                if round_ >= 2:
                    times[name].append(seconds)
        base_syncs = count_syncs(forward)
        syncs = {}
        for name, press in objs.items():
            with press(model):
                syncs[name] = count_syncs(forward) - base_syncs
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = [dict(press=name, ms=med[name] * 1e3, of_ideal=med["ideal"] / med[name],
                 speedup=med["none"] / med[name], extra_syncs=syncs.get(name, 0)) for name in times]
    return dict(image_tokens=n, keep=keep, batch=batch, seq_len=inputs["input_ids"].shape[1], rows=rows,
                base_syncs=base_syncs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--presses", default="all")
    parser.add_argument("--layers", type=int, default=32, help="LM layers (32 = the 7B shape)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--cases", default="all", help="indices into CASES, e.g. 1,2 (default: all)")
    parser.add_argument("--name", default="prefill_gpu", help="results file stem")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("prefill_gpu.py needs a CUDA GPU (benchmarks/prefill.py times the CPU)")
    presses = [p for p in mmpress.list_presses() if p != "none"] if args.presses == "all" else args.presses.split(",")
    record = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
              "dtype": "bfloat16", "attention": "sdpa", "repeats": args.repeats, "lm_layers": args.layers, "cases": []}
    cases = CASES if args.cases == "all" else [CASES[int(i)] for i in args.cases.split(",")]
    for image_size in sorted({c[0] for c in cases}):
        model = llava_7b_shaped(image_size, args.layers)
        for size, keep, batch in cases:
            if size == image_size:
                case = run_case(model, size, keep, batch, presses, args.repeats)
                record["cases"].append(case)
                worst = min((r for r in case["rows"] if r["press"] not in ("none", "ideal")), key=lambda r: r["of_ideal"])
                print(f"{case['image_tokens']} tokens keep {keep} batch {batch}: worst {worst['press']} "
                      f"{worst['of_ideal']:.2f} of ideal", flush=True)
        del model
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=2))
    (out / f"{args.name}.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    cases = record["cases"]
    head = " | ".join(f"{c['image_tokens']}->{c['keep']} b{c['batch']}" for c in cases)
    lines = [f"# GPU prefill vs ideal: LLaVA-1.5-7B shape, {record['gpu']}, {record['dtype']}, {record['attention']}, "
             f"torch {record['torch']}, transformers {record['transformers']}, median of {record['repeats']} "
             "round-robin runs", "",
             "ms for `none` (unpressed) and `ideal` (vision + projector + LM on the kept length); for each press, "
             "its fraction of ideal (ideal ms / press ms) and, in brackets, host syncs beyond the unpressed model's.", "",
             f"| press | {head} |", "|---|" + "---:|" * len(cases)]
    names = [r["press"] for r in cases[0]["rows"]]
    for name in names:
        cells = []
        for c in cases:
            r = next(r for r in c["rows"] if r["press"] == name)
            cells.append(f"{r['ms']:.1f} ms" if name in ("none", "ideal") else f"{r['of_ideal']:.2f} ({r['extra_syncs']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
