"""Command line: ``mmpress list | run | bench | bench-cost``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mmpress.presses.base import PRESSES, get_press, list_presses

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Press the visual tokens of vision-language models.")
console = Console()
DEMO = "demo"


def _budget(keep: Optional[int], keep_ratio: Optional[float]) -> dict:
    return {"keep": keep} if keep is not None else {"keep_ratio": keep_ratio} if keep_ratio is not None else {}


def _load(model_id: str):
    """The embedded demo model, or any local / cached transformers LLaVA model."""
    if model_id == DEMO:
        from mmpress.demo import load_demo

        return load_demo()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_id).eval()
    return model, AutoProcessor.from_pretrained(model_id)


@app.command("list")
def list_cmd():
    """Table of presses: name, stage, paper, signals it needs."""
    table = Table(title="mmpress presses")
    for col in ("name", "stage", "paper", "needs"):
        table.add_column(col)
    for name in list_presses():
        cls = PRESSES[name]
        table.add_row(name, cls.stage, cls.paper or "-", ", ".join(cls.needs) or "-")
    console.print(table)


@app.command()
def run(
    question: str = typer.Argument(..., help="question about the image"),
    image: Path = typer.Option(..., "--image", "-i", help="image file"),
    model: str = typer.Option(DEMO, help="local path or cached hub id of a LLaVA model; 'demo' = embedded model"),
    press: str = typer.Option("none", help="press name (mmpress list)"),
    keep: Optional[int] = typer.Option(None, help="visual tokens kept per image"),
    keep_ratio: Optional[float] = typer.Option(None, help="fraction of visual tokens kept"),
    max_new_tokens: int = typer.Option(16),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Answer a question about an image with a pressed model; report tokens kept, prefill time, FLOPs saved."""
    import torch
    from PIL import Image

    from mmpress.api import ask, encode
    from mmpress.eval.cost import llava_prefill_flops, time_call

    if not image.is_file():
        raise typer.BadParameter(f"no such image file: {image}")
    pressor = get_press(press, **_budget(keep, keep_ratio))
    vlm, processor = _load(model)
    picture = Image.open(image).convert("RGB")
    answer = ask(vlm, processor, [picture], [question], press=pressor, max_new_tokens=max_new_tokens)[0]

    inputs = encode(vlm, processor, [picture], [question])

    def prefill():
        with torch.inference_mode():
            vlm(**inputs, logits_to_keep=1)

    base_seconds = time_call(prefill, repeats=3)
    with pressor(vlm):
        seconds = time_call(prefill, repeats=3)
    stats = pressor.stats
    flops = llava_prefill_flops(vlm.config, stats["pressed_seq_len"]).total
    base_flops = llava_prefill_flops(vlm.config, stats["seq_len"]).total
    record = {
        "answer": answer,
        "press": press,
        "kept_tokens": stats["kept_visual_tokens"],
        "total_tokens": stats["visual_tokens"],
        "prefill_seconds": seconds,
        "unpressed_prefill_seconds": base_seconds,
        "flops_saved": 1 - flops / base_flops,
    }
    if as_json:
        print(json.dumps(record))
        return
    console.print(f"[bold]{answer}[/bold]")
    console.print(
        f"kept {record['kept_tokens']}/{record['total_tokens']} visual tokens · prefill {seconds * 1e3:.0f} ms "
        f"(unpressed {base_seconds * 1e3:.0f} ms) · FLOPs saved {record['flops_saved']:.0%}"
    )


@app.command()
def bench(
    model: str = typer.Option(DEMO, help="local path or cached hub id of a LLaVA model; 'demo' = embedded model"),
    presses: str = typer.Option("all", help="comma-separated press names, or 'all'"),
    keep: str = typer.Option("128,64,32,16", help="comma-separated budgets (visual tokens per image)"),
    data: str = typer.Option("scenes", help="'scenes', 'easy-vqa', a .jsonl of {image, question, answer}, or a saved datasets folder"),
    split: str = typer.Option("test"),
    limit: Optional[int] = typer.Option(200, help="samples (None = all)"),
    batch_size: int = typer.Option(8),
    max_new_tokens: int = typer.Option(8),
    repeats: int = typer.Option(3, help="timed prefill repeats (median)"),
    out: Path = typer.Option(Path("benchmarks/results/bench"), help="folder for bench.json/.md/.png/.html"),
):
    """Quality vs cost of every press x budget on a dataset: accuracy, fidelity, FLOPs, time, memory."""
    from mmpress.eval.bench import run_bench
    from mmpress.eval.data import load_dataset
    from mmpress.eval.report import write_report

    names = [n for n in list_presses() if n != "none"] if presses == "all" else presses.split(",")
    unknown = [n for n in names if n not in PRESSES]
    if unknown:  # before loading a model: fail fast
        raise typer.BadParameter(f"unknown press {', '.join(unknown)}; choose from {', '.join(list_presses())}")
    samples = load_dataset(data, split=split, limit=limit)
    vlm, processor = _load(model)
    record = run_bench(vlm, processor, names, [int(k) for k in keep.split(",")], samples, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, console=console, repeats=repeats, dataset=f"{data}:{split}")
    record["model"]["id"] = model
    paths = write_report(record, out)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))


@app.command("bench-cost")
def bench_cost(
    presses: str = typer.Option("all", help="comma-separated press names, or 'all'"),
    keeps: str = typer.Option("576,192,128,64", help="comma-separated budgets (visual tokens per image)"),
    batch: int = typer.Option(1, help="batch size (rows get ragged prompt lengths)"),
    repeats: int = typer.Option(3, help="timed repeats per cell (median)"),
    lm_layers: int = typer.Option(12), lm_hidden: int = typer.Option(896), lm_intermediate: int = typer.Option(4864),
    lm_heads: int = typer.Option(14), vision_layers: int = typer.Option(6), vision_hidden: int = typer.Option(384),
    image_size: int = typer.Option(336), threads: Optional[int] = typer.Option(None, help="torch threads"),
    out: Optional[Path] = typer.Option(None, help="also write JSON rows here"),
):
    """Prefill time of every press on a LLaVA-1.5-shaped random model: speedup vs its FLOPs limit."""
    import torch
    from rich.progress import Progress

    from mmpress.eval.prefill import Shape, bench_prefill, llava_shaped, prompt_batch

    if threads:
        torch.set_num_threads(threads)
    names = [n for n in list_presses() if n != "none"] if presses == "all" else presses.split(",")
    budgets = [int(k) for k in keeps.split(",")]
    shape = Shape(vision_layers=vision_layers, vision_hidden=vision_hidden, image_size=image_size,
                  lm_layers=lm_layers, lm_hidden=lm_hidden, lm_intermediate=lm_intermediate, lm_heads=lm_heads,
                  lm_kv_heads=max(1, lm_heads // 7))
    model = llava_shaped(shape)
    inputs = prompt_batch(shape, batch=batch)
    n_img = (shape.image_size // shape.patch_size) ** 2
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"timing rounds ({len(names)} presses)", total=repeats + 1)
        rows = bench_prefill(model, inputs, names, budgets, repeats=repeats, progress=lambda: progress.advance(task))
    print_prefill_table(rows, title=f"prefill, batch {batch}, {n_img} image tokens, {torch.get_num_threads()} threads")
    if out:
        out.write_text(json.dumps(rows, indent=2))


def print_prefill_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("press", "keep", "prefill ms", "speedup", "FLOPs limit", "speedup/limit", "press overhead"):
        table.add_column(col, justify="right" if col != "press" else "left")
    for r in rows:
        table.add_row(r["press"], str(r["keep"]), f"{r['seconds'] * 1e3:.1f}", f"{r['speedup']:.2f}x",
                      f"{r['limit']:.2f}x", f"{r['efficiency']:.0%}", f"{r['overhead']:.1%}")
    console.print(table)


def main():  # pragma: no cover
    app()
