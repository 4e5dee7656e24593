"""``mmpress bench``: every press x budget on a dataset, quality and cost in one JSON-able record.

For each batch of samples the unpressed model generates once; its answers and first-token
logits are the reference every pressed run of that batch is compared with. Each (press, budget)
then generates once per batch, with ``output_logits``, which gives both its answers (accuracy,
agreement) and its first-answer-token distribution (KL to the unpressed model).

Cost comes from the same runs: the adapter's token counts of each pressed prefill give the
analytical FLOPs per stage (``eval/cost.py``) and the KV-cache bytes; prefill time (time to first
token: one forward with ``logits_to_keep=1``, as generate's prefill) and peak memory are measured
on the first batch, with and without each press.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmpress.api import ANSWER_HINT, encode
from mmpress.eval.cost import kv_cache_bytes, llava_prefill_flops, time_call
from mmpress.eval.metrics import accuracy, agreement, is_labelled, kl_divergence
from mmpress.presses.base import PRESSES, Press, get_press

BASELINE = "none"
STAGES = ("vision", "projector", "language", "total")


@dataclass
class _Cell:
    """One press at one budget (``keep=None``: a press that sets its own budget), and what its
    runs over the dataset have added up."""

    press: str
    keep: int | None
    answers: list[str] = field(default_factory=list)
    kl: list[torch.Tensor] = field(default_factory=list)
    flops: dict[str, float] | None = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    kv_bytes: int = 0
    kept: int = 0  # visual tokens kept, summed over images
    images: int = 0

    def make(self) -> Press:
        """A fresh press instance; the identity press (keep all) for the unpressed reference."""
        if self.press == BASELINE:
            # keep_ratio=1 keeps every token: the adapter leaves the forward untouched (bit-identical
            # to the unpressed model) but still records the token counts the cost model needs
            return Press(keep_ratio=1.0)
        return get_press(self.press) if self.keep is None else get_press(self.press, keep=self.keep)

    def add(self, answers: list[str], stats: dict, flops, kv: int, kl: torch.Tensor | None = None) -> None:
        self.answers += answers
        if kl is not None:
            self.kl.append(kl)
        self.kv_bytes += kv
        self.kept += stats["kept_visual_tokens"]
        self.images += stats["images"]
        if flops is None or self.flops is None:
            self.flops = None
        else:
            for stage in STAGES:
                self.flops[stage] += getattr(flops, stage)


def run_bench(
    model,
    processor,
    presses: list[str],
    keeps: list[int],
    data: list[dict],
    batch_size: int = 8,
    max_new_tokens: int = 8,
    console: Console | None = None,
    repeats: int = 3,
    dataset: str | None = None,
    hint: str | None = ANSWER_HINT,
    seed: int = 0,
) -> dict:
    """Run every press in ``presses`` at every budget in ``keeps`` (visual tokens kept per image)
    on ``data`` (dicts with ``image``, ``question`` and optionally ``answer``, ``choices``, ``kind``,
    as ``eval.data.load_dataset`` returns), plus the unpressed baseline (press ``"none"``).

    Greedy decoding, ``max_new_tokens`` per answer, prompts as :func:`mmpress.api.ask` builds them
    (``hint`` appended). Prefill time is the median of ``repeats`` timed forwards on the first
    batch. Budgets not below the model's visual-token count are skipped with a note; a press
    that takes no budget runs once. ``torch.manual_seed(seed)`` is set first so stochastic
    presses are reproducible. Progress and a final table go to ``console``.

    Returns a JSON-serialisable record: ``model`` (config summary), ``dataset``, ``n``,
    ``settings``, ``quality_metric``, ``rows`` (one dict per press x budget, the baseline first),
    ``best`` (winning press per budget) and ``notes``. Raises ValueError for an unknown press,
    bad budgets or an empty dataset.
    """
    from mmpress.eval.report import best_per_budget, print_table

    if not data:
        raise ValueError("the dataset is empty: nothing to benchmark")
    for i, sample in enumerate(data):
        if "image" not in sample or "question" not in sample:
            raise ValueError(f"sample {i} needs 'image' and 'question' keys, got {sorted(sample)}")
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("repeats", repeats)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in keeps):
        raise ValueError(f"budgets must be positive ints (visual tokens per image), got {keeps!r}")
    presses, keeps = list(dict.fromkeys(presses)), sorted(set(keeps), reverse=True)
    notes: list[str] = []
    if BASELINE in presses:
        presses.remove(BASELINE)
        notes.append(f"'{BASELINE}' is the unpressed baseline, always reported once")
    budgeted = [name for name in presses if _takes_budget(name)]  # unknown names raise here
    if budgeted and not keeps:
        raise ValueError(f"presses {budgeted} need budgets: pass keeps, e.g. [128, 64, 32]")

    console = console or Console()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    batches = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
    baseline = _Cell(BASELINE, None)
    cells: list[_Cell] = []
    first_inputs = None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())

    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("answering", total=len(batches))
        for b, samples in enumerate(batches):
            inputs = encode(model, processor, [s["image"] for s in samples], [s["question"] for s in samples], hint)
            ref_answers, ref_logits, stats = _generate(model, processor, inputs, baseline.make(), max_new_tokens)
            baseline.add(ref_answers, stats, _flops(model.config, stats, len(samples)),
                         _kv_bytes(model, stats["seq_len"], len(samples)))
            if b == 0:  # the token count is known once the adapter has seen a batch
                first_inputs, first_stats = inputs, stats
                n_visual = stats["visual_tokens"] // stats["images"]
                cells = _plan(presses, keeps, n_visual, notes)
                progress.update(task, total=len(batches) * (1 + len(cells)))
            progress.advance(task)
            for cell in cells:
                progress.update(task, description=f"answering: {cell.press} keep={cell.keep or 'own'}")
                answers, logits, stats = _generate(model, processor, inputs, cell.make(), max_new_tokens)
                cell.add(answers, stats, _flops(model.config, stats, len(samples)),
                         _kv_bytes(model, stats["pressed_seq_len"], len(samples)), kl=kl_divergence(ref_logits, logits))
                progress.advance(task)

        timing = _time_prefill(model, first_inputs, first_stats, [baseline, *cells], repeats, progress)

    labelled = any(is_labelled(s) for s in data)
    rows = [_row(cell, data, baseline, timing, len(data)) for cell in [baseline, *cells]]
    record = {
        "model": _model_summary(model, n_visual),
        "dataset": dataset,
        "n": len(data),
        "labelled": labelled,
        "quality_metric": "accuracy" if labelled else "agreement",
        "settings": {
            "batch_size": batch_size, "max_new_tokens": max_new_tokens, "repeats": repeats, "hint": hint,
            "seed": seed, "timing_batch": len(batches[0]), "device": str(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "peak_memory": _memory_method(device), "torch": torch.__version__, "python": platform.python_version(),
        },
        "rows": rows,
        "notes": notes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    record["best"] = {str(k): v for k, v in best_per_budget(record).items()}
    print_table(record, console)
    return record


# ---- plan -------------------------------------------------------------------------------------
def _takes_budget(name: str) -> bool:
    """Whether press ``name`` takes a ``keep`` budget; ValueError (from get_press) if unknown."""
    if name not in PRESSES:
        get_press(name)  # raises, naming the registered presses
    return PRESSES[name].needs_budget


def _plan(presses: list[str], keeps: list[int], n_visual: int, notes: list[str]) -> list[_Cell]:
    usable = [k for k in keeps if k < n_visual]
    if any(map(_takes_budget, presses)):
        notes += [f"keep={k} skipped: not below the model's {n_visual} visual tokens per image"
                  for k in keeps if k >= n_visual]
    return [_Cell(name, keep) for name in presses for keep in (usable if _takes_budget(name) else [None])]


# ---- running ----------------------------------------------------------------------------------
@torch.inference_mode()
def _generate(model, processor, inputs: dict, press: Press, max_new_tokens: int):
    """Greedy answers, raw logits (B, V) of the first generated token, and the press's token counts."""
    tokenizer = processor.tokenizer
    with press(model):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
    answers = [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers, out.logits[0].float().cpu(), dict(press.stats)


def _flops(config, stats: dict, batch: int):
    """Analytical prefill FLOPs of one batch on its actual (pressed, padded) length; None for a
    model family the cost model does not cover."""
    if getattr(config, "model_type", None) != "llava":
        return None
    # images per row may differ between rows; vision and projector FLOPs scale with the total
    return llava_prefill_flops(config, stats["pressed_seq_len"], num_images=stats["images"] / batch, batch=batch)


def _kv_bytes(model, seq_len: int, batch: int) -> int:
    text_config = model.config.get_text_config()
    return kv_cache_bytes(text_config, seq_len, batch=batch, dtype=next(model.parameters()).dtype)


def _time_prefill(model, inputs: dict, base_stats: dict, cells: list[_Cell], repeats: int, progress: Progress) -> dict:
    """Per cell: median prefill seconds, peak memory and FLOPs of one batch (``base_stats``: the
    token counts the adapter recorded for it unpressed).

    Cells are timed round-robin (one forward each per round, after a warm-up round) rather than
    one after the other, so a slow spell of a shared machine spreads over every cell instead of
    biasing the speedups of whichever cells it happened to hit.
    """
    device = inputs["input_ids"].device

    def prefill():
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1)

    def under(press: Press | None, fn):
        if press is None:  # the baseline runs with no hooks at all: the true unpressed model
            return fn()
        with press(model):
            return fn()

    presses = {id(cell): None if cell.press == BASELINE else cell.make() for cell in cells}
    times = defaultdict(list)
    task = progress.add_task(f"timing prefill (batch {inputs['input_ids'].shape[0]})", total=(1 + repeats) * len(cells))
    for round_ in range(1 + repeats):
        for cell in cells:
            seconds = under(presses[id(cell)], lambda: time_call(prefill, repeats=1, warmup=0))
            if round_:  # round 0 warms up
                times[id(cell)].append(seconds)
            progress.advance(task)

    timing = {}
    for cell in cells:
        press = presses[id(cell)]
        memory = under(press, lambda: _peak_memory(prefill, device))
        flops = _flops(model.config, base_stats if press is None else press.stats, inputs["input_ids"].shape[0])
        timing[(cell.press, cell.keep)] = dict(seconds=statistics.median(times[id(cell)]), memory=memory,
                                               flops=None if flops is None else flops.total)
    return timing


# ---- memory -----------------------------------------------------------------------------------
def _memory_method(device: torch.device) -> str | None:
    if device.type == "cuda":
        return "CUDA max_memory_allocated during the prefill, above the memory allocated before it"
    if device.type == "cpu":
        return ("peak of the tensor memory PyTorch's CPU allocator holds during the prefill, above what it "
                "held before (torch.profiler, profile_memory)")
    return None


def _peak_memory(fn, device: torch.device) -> int | None:
    """Extra memory at the peak of one call of ``fn``, in bytes; None where it cannot be measured.

    On CPU there is no ``max_memory_allocated``; the profiler's memory events carry the CPU
    allocator's running total, whose maximum is the same quantity. (Peak RSS is no substitute:
    freed pages stay in the process, so a second measurement reads close to 0.)
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type == "cpu":
        return _cpu_peak_allocated(fn)
    return None


def _cpu_peak_allocated(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # some torch builds print a line on every profiler start and stop
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                    key=lambda e: e["ts"])
    if not memory:
        return 0
    before = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] for e in memory) - before)


@contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ output included) for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---- the record -------------------------------------------------------------------------------
def _row(cell: _Cell, data: list[dict], baseline: _Cell, timing: dict, n: int) -> dict:
    t, t0 = timing[(cell.press, cell.keep)], timing[(BASELINE, None)]
    is_base = cell.press == BASELINE
    kinds = defaultdict(list)
    for answer, sample in zip(cell.answers, data):
        kinds[sample.get("kind") or "all"].append((answer, sample))
    flops = None if cell.flops is None else {s: v / n for s, v in cell.flops.items()}
    return {
        "press": cell.press,
        "keep": cell.keep,
        "kept_tokens": cell.kept / cell.images,  # mean visual tokens kept per image
        "accuracy": accuracy(cell.answers, data),
        "accuracy_by_kind": {k: accuracy(*zip(*pairs)) for k, pairs in sorted(kinds.items())},
        "agreement": 1.0 if is_base else agreement(cell.answers, baseline.answers),
        "kl": 0.0 if is_base else float(torch.cat(cell.kl).mean()),
        "flops": flops,  # per sample, per stage, on the padded batches actually run
        "flops_ratio": None if flops is None else cell.flops["total"] / baseline.flops["total"],
        "prefill_s": t["seconds"],
        "speedup": t0["seconds"] / t["seconds"],
        "speedup_limit": None if t["flops"] is None else t0["flops"] / t["flops"],
        "peak_memory_bytes": t["memory"],
        "kv_bytes": cell.kv_bytes / n,  # per sample
        "answers": cell.answers,
    }


def _model_summary(model, n_visual: int) -> dict:
    config = model.config
    vision = getattr(config, "vision_config", None)
    text = config.get_text_config()
    return {
        "name": getattr(config, "_name_or_path", "") or type(model).__name__,
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "visual_tokens_per_image": n_visual,
        "vision": None if vision is None else {
            "model_type": vision.model_type, "layers": vision.num_hidden_layers, "hidden": vision.hidden_size,
            "image_size": getattr(vision, "image_size", None), "patch_size": getattr(vision, "patch_size", None)},
        "text": {"model_type": text.model_type, "layers": text.num_hidden_layers, "hidden": text.hidden_size,
                 "vocab": text.vocab_size},
    }


__all__ = ["run_bench"]
