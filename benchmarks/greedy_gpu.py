"""GPU time of the greedy selections: PyTorch reference loop vs the Triton kernels.

``max_min_diversity`` (DivPrune), ``greedy_coverage`` (MMTok) and ``greedy_dpp_map`` (CDPruner) at N=576 / k=64 and
N=2304 / k=576, M in {1, 8} images of D=4096 bf16 tokens, each timed with the similarity step
included (tokens -> picks, what a press pays) and excluded (precomputed distance / coverage
matrix -> picks). CUDA events, warm-up, median of --repeats. Checks that both paths pick the
same tokens (diversity: identical; coverage and DPP: the share of identical picks and the value
f(S) of the Triton picks relative to the reference's -- coverage, or det(L_S) for the DPP -- since
they sum in another order). Targets (issue "At the speed limit on a GPU"): <= 1 ms at N=576/k=64, <= 3 ms at
N=2304/k=576. Writes benchmarks/results/greedy_gpu.json and greedy_gpu.md.

    python benchmarks/greedy_gpu.py [--repeats 20] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from mmpress.ops import triton_greedy
from mmpress.ops.coverage import greedy_coverage, greedy_coverage_torch
from mmpress.ops.diversity import farthest_nearest_neighbour, greedy_max_min, max_min_diversity
from mmpress.ops.dpp import greedy_dpp_map, greedy_dpp_map_torch
from mmpress.ops.similarity import cosine_distance, cosine_similarity
from mmpress.presses.base import VisualContext
from mmpress.presses.cdpruner import CDPrunerPress

RESULTS = Path(__file__).parent / "results"
SHAPES = ((576, 64), (2304, 576))
TARGET_MS = {576: 1.0, 2304: 3.0}
D, TEXT = 4096, 32


def cuda_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median over ``repeats`` calls of CUDA-event time (each call timed on its own)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def mmtok_cover(tokens, text):
    """MMTok's [P; alpha Q] coverage matrix (presses/mmtok.py defaults), (M, T + N, N)."""
    n = tokens.shape[1]
    p = (cosine_similarity(text, tokens) / 0.02).softmax(dim=-1) / text.shape[1]
    q = (cosine_similarity(tokens) / 0.2).softmax(dim=-1) / n
    return torch.cat([p, 0.5 * q], dim=1)


def cdpruner_kernel(tokens, text):
    """CDPruner's conditional kernel diag(q) S diag(q) with the press's defaults, (M, N, N)."""
    mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    return CDPrunerPress(keep=1).kernel(tokens, VisualContext(text=text, text_mask=mask))


def det_ratio(kernel, got, ref):
    """min over images of det(L_got) / det(L_ref), from float64 log-determinants."""
    def logdet(index):
        sub = kernel.gather(1, index.unsqueeze(-1).expand(-1, -1, kernel.shape[2]))
        sub = sub.gather(2, index.unsqueeze(1).expand(-1, index.shape[1], -1))
        return torch.linalg.slogdet(sub.double())[1]
    return (logdet(got) - logdet(ref)).exp().min().item()


def coverage_value(cover, index):
    picked = cover.gather(2, index.unsqueeze(1).expand(-1, cover.shape[1], -1))
    return picked.amax(dim=2).clamp_min(0).sum(dim=1).double()


def with_triton(flag: bool, fn):
    def run():
        previous = triton_greedy.set_enabled(flag)
        try:
            return fn()
        finally:
            triton_greedy.set_enabled(previous)
    return run


def bench(n: int, k: int, m: int, repeats: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randn(m, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    text = torch.randn(m, TEXT, D, device="cuda", dtype=torch.bfloat16, generator=g)
    dist = cosine_distance(tokens)
    first = farthest_nearest_neighbour(dist)
    cover = mmtok_cover(tokens, text)
    kernel = cdpruner_kernel(tokens, text)
    cases = {
        ("diversity", True): (lambda: greedy_max_min(dist, k, first), lambda: triton_greedy.max_min(dist, first, k)),
        ("diversity", False): (with_triton(False, lambda: max_min_diversity(tokens, k)),
                               with_triton(True, lambda: max_min_diversity(tokens, k))),
        ("coverage", True): (lambda: greedy_coverage_torch(cover, k), lambda: triton_greedy.greedy_coverage(cover, k)),
        ("coverage", False): (with_triton(False, lambda: greedy_coverage(mmtok_cover(tokens, text), k)),
                              with_triton(True, lambda: greedy_coverage(mmtok_cover(tokens, text), k))),
        ("dpp", True): (lambda: greedy_dpp_map_torch(kernel, k), lambda: triton_greedy.greedy_dpp(kernel, k)),
        ("dpp", False): (with_triton(False, lambda: greedy_dpp_map(cdpruner_kernel(tokens, text), k)),
                         with_triton(True, lambda: greedy_dpp_map(cdpruner_kernel(tokens, text), k))),
    }
    rows = []
    for (op, excluded), (ref_fn, tri_fn) in cases.items():
        ref, tri = ref_fn(), tri_fn()
        row = {"op": op, "n": n, "k": k, "m": m, "similarity": "excluded" if excluded else "included",
               "torch_ms": cuda_ms(ref_fn, repeats), "triton_ms": cuda_ms(tri_fn, repeats),
               "same_picks": (ref == tri).float().mean().item(), "target_ms": TARGET_MS[n]}
        if op == "coverage":
            row["value_ratio"] = (coverage_value(cover, tri) / coverage_value(cover, ref)).min().item()
        elif op == "dpp":
            row["value_ratio"] = det_ratio(kernel, tri, ref)
        row["speedup"] = row["torch_ms"] / row["triton_ms"]
        rows.append(row)
        print(f"{op:9s} N={n:4d} k={k:3d} M={m} similarity {row['similarity']:8s}: torch {row['torch_ms']:8.2f} ms, "
              f"triton {row['triton_ms']:7.3f} ms, same picks {row['same_picks']:.3f}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("greedy_gpu.py times CUDA kernels: no CUDA device is visible (torch.cuda.is_available() is False).")
    if not triton_greedy.available():
        sys.exit("greedy_gpu.py compares against the Triton kernels: triton is not installed (pip install 'triton>=3.0').")
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False  # similarities in full float32, as on CPU
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "repeats": args.repeats, "d": D, "text_tokens": TEXT, "rows": []}
    for n, k in SHAPES:
        for m in map(int, args.batches.split(",")):
            record["rows"] += bench(n, k, m, args.repeats)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "greedy_gpu.json").write_text(json.dumps(record, indent=2))
    lines = [f"# Greedy selections on {record['device']}: PyTorch loop vs Triton kernel", "",
             f"torch {record['torch']}, triton {record['triton']}; tokens (M, N, {D}) bf16, MMTok coverage with "
             f"{TEXT} text rows, CDPruner's kernel from the same text; CUDA events, median of {args.repeats}. 'included': tokens -> picks (similarity "
             "matrix built inside); 'excluded': precomputed matrix -> picks.", "",
             "| op | N | k | M | similarity | torch ms | triton ms | speedup | target ms | same picks | f(S) ratio |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in record["rows"]:
        ratio = f"{r['value_ratio']:.6f}" if "value_ratio" in r else ""
        lines.append(f"| {r['op']} | {r['n']} | {r['k']} | {r['m']} | {r['similarity']} | {r['torch_ms']:.2f} | "
                     f"{r['triton_ms']:.3f} | {r['speedup']:.1f}x | {r['target_ms']:.0f} | {r['same_picks']:.3f} | {ratio} |")
    (args.out / "greedy_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
