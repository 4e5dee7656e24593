"""``mmpress bench``: every press x budget on a dataset, quality and cost in one JSON-able record.

The unpressed model first answers every batch once; its answers and first-token logits are the
reference every pressed run is compared with. Then each (press, budget) cell answers the whole
dataset, with ``output_logits``, which gives both its answers (accuracy, agreement) and its
first-answer-token distribution (KL to the unpressed model), and its row is final: a caller can
save the record after each cell (``checkpoint``), and resume an interrupted run (``previous``).

Cost comes from the same runs: the adapter's token counts of each pressed prefill give the
visual tokens per image (kept after the last stage, and averaged over the LM's layers), the
analytical FLOPs per stage (``eval/cost.py``, each decoder layer at its own length, so an in-LLM
press is charged its full first layers) and the KV-cache bytes (per layer: an in-LLM press's
early layers keep every token; a KV press evicts after an unpressed prefill). Prefill time (time
to first token: one forward with ``logits_to_keep=1``, as generate's prefill) and peak memory are
measured on the first batch (or the first ``timing_batch`` samples) before the presses answer:
every cell left over several rounds, round-robin with the unpressed model, each speedup with its
range over the rounds and flagged ``noisy`` when it is not to be trusted
(:func:`~mmpress.eval.cost.speedup_spread`); the record says how busy the machine was.

Under ``accelerate launch`` (several processes, :class:`Processes`) each process answers its
share of the batches (:func:`shard`) and the parts meet in batch order (:func:`merge_parts`):
the record is the one process's, answer for answer; every process times the same batch, and
the timings are pooled (:func:`pool_timings`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
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
from typing import Callable

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmpress.api import ANSWER_HINT, check_inputs, encode
from mmpress.eval.cost import (machine_done, machine_state, pressed_flops, prompt_cache_bytes, round_robin,
                               speedup_spread, time_call)
from mmpress.eval.metrics import (LEVEL, RESAMPLES, accuracy, agreements, bootstrap_ci, correctness, is_labelled,
                                  kl_divergence)
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
    kept: int = 0  # visual tokens kept after the last stage, summed over images
    avg: float = 0.0  # visual tokens averaged over the LM's layers, summed over images
    layer_kept: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # in_llm: layer -> kept, summed
    images: int = 0

    def make(self) -> Press:
        """A fresh press instance; the identity press (keep all) for the unpressed reference."""
        if self.press == BASELINE:
            # keep_ratio=1 keeps every token: the adapter leaves the forward untouched (bit-identical
            # to the unpressed model) but still records the token counts the cost model needs
            return Press(keep_ratio=1.0)
        if self.keep is None:
            return get_press(self.press)
        if isinstance(self.keep, float):  # a fraction of each item's tokens (audio clips differ in length)
            return get_press(self.press, keep_ratio=self.keep)
        return get_press(self.press, keep=self.keep)

    def add(self, answers: list[str], stats: dict, flops, kv: int, kl: torch.Tensor | None = None) -> None:
        self.answers += answers
        if kl is not None:
            self.kl.append(kl)
        self.kv_bytes += kv
        self.kept += stats["kept_visual_tokens"]
        self.avg += stats.get("layer_avg_visual_tokens", stats["kept_visual_tokens"])
        for layer, kept in stats.get("layer_kept") or ():
            self.layer_kept[layer] += kept
        self.images += stats["items"]
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
    repeats: int = 5,
    timing_batch: int | None = None,
    dataset: str | None = None,
    hint: str | None = ANSWER_HINT,
    seed: int = 0,
    model_id: str | None = None,
    previous: dict | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    processes: "Processes | None" = None,
) -> dict:
    """Run every press in ``presses`` at every budget in ``keeps`` (visual tokens kept per image)
    on ``data`` (dicts with ``image``, ``question`` and optionally ``answer``, ``choices``, ``kind``,
    as ``eval.data.load_dataset`` returns), plus the unpressed baseline (press ``"none"``).

    Greedy decoding, ``max_new_tokens`` per answer, prompts as :func:`mmpress.api.ask` builds them
    (``hint`` appended). Prefill time: ``repeats`` timing rounds on the first ``timing_batch``
    samples (None: the first batch), each round timing the unpressed model and every cell once
    (round-robin); each speedup is the median of its per-round ratios, with their range
    (``speedup_range``) and ``noisy`` (None, or why it is no result: its rounds spread over 10% of
    it, or it beats its FLOPs limit by more than that spread). ``record["machine"]``: the CPUs,
    torch threads and load average before and after. Budgets not below the model's visual-token
    count are skipped with a note; a press that takes no budget runs once. ``torch.manual_seed(seed)``
    is set first so stochastic presses are reproducible. Progress and a final table go to ``console``.

    Cells run one after the other; when one finishes, ``checkpoint(record)`` receives the record
    so far (its ``pending`` lists the cells still to run), e.g. to save it, so an interrupted run
    loses only the cell in progress. ``previous``: the record of an earlier run on the same data,
    model and settings: its rows are kept and their cells not run again; the unpressed model
    still answers once, as the reference of the cells left. The record's ``fingerprint``
    (:func:`fingerprint`: hashes of the data's content and the model's weights, the settings) and
    each row's ``press_settings`` must equal this run's, else :class:`ResumeError` (a ValueError)
    names what differs: a row scored against an edited answer, or by a press whose default has
    changed, is never reused.

    ``processes`` (default :meth:`Processes.current`: one, or those of an ``accelerate launch``):
    each answers its contiguous share of the batches, the batches exactly as one process makes
    them, so every answer is the one process's; every process returns the whole record, the first
    alone prints it and calls ``checkpoint``.

    Returns a JSON-serialisable record: ``model`` (config summary, ``id`` = ``model_id``),
    ``dataset``, ``n``, ``settings``, ``quality_metric``, ``rows`` (one dict per press x budget,
    the baseline first), ``best`` (winning press per budget), ``pending`` and ``notes``. Raises
    ValueError for an unknown press, bad budgets or an empty dataset.
    """
    from mmpress.eval.report import best_per_budget, ordered_rows, paired_comparisons, print_table

    if not data:
        raise ValueError("the dataset is empty: nothing to benchmark")
    medium = "audio" if "audio" in data[0] else "image"  # spoken rows carry 16 kHz clips (eval.spoken)
    for i, sample in enumerate(data):
        if medium not in sample or "question" not in sample:
            raise ValueError(f"sample {i} needs {medium!r} and 'question' keys, got {sorted(sample)}")
    check_inputs([s[medium] for s in data], [s["question"] for s in data])
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("repeats", repeats),
                        ("timing_batch", 1 if timing_batch is None else timing_batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if any(isinstance(k, bool) or not (isinstance(k, int) and k >= 1 or isinstance(k, float) and 0 < k < 1)
           for k in keeps):
        raise ValueError(f"budgets must be positive ints (visual tokens per image) or fractions in (0, 1) (of "
                         f"each item's tokens), got {keeps!r}")
    presses, keeps = list(dict.fromkeys(presses)), sorted(set(keeps), reverse=True)
    notes: list[str] = []
    if BASELINE in presses:
        presses.remove(BASELINE)
        notes.append(f"'{BASELINE}' is the unpressed baseline, always reported once")
    budgeted = [name for name in presses if _takes_budget(name)]  # unknown names raise here
    if budgeted and not keeps:
        raise ValueError(f"presses {budgeted} need budgets: pass keeps, e.g. [128, 64, 32]")

    processes = processes or Processes.current()
    console = console if console is not None and processes.main else Console(file=io.StringIO())
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    machine = machine_state()
    if processes.world > 1:
        machine["threads_per_process"] = processes.gather(machine["threads"])
    batches = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
    mine = shard(len(batches), processes.rank, processes.world)  # this process's batches
    timed = data[: timing_batch or batch_size]
    labelled = any(is_labelled(s) for s in data)
    record = {
        "model": _model_summary(model, model_id),
        "dataset": dataset,
        "n": len(data),
        "labelled": labelled,
        "quality_metric": "accuracy" if labelled else "agreement",
        "settings": {
            "batch_size": batch_size, "max_new_tokens": max_new_tokens, "rounds": repeats, "hint": hint,
            "seed": seed, "timing_batch": len(timed), "device": str(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None, "processes": processes.world,
            "peak_memory": _memory_method(device), "torch": torch.__version__, "python": platform.python_version(),
        },
        "timing": _timing_text(repeats, processes.world),
        "ci": {"level": LEVEL, "resamples": RESAMPLES, "seed": seed,
               "method": "percentile bootstrap over the questions; vs_best: paired, the same resampled questions "
                         "for both presses"},
        "rows": [],
        "pending": [],
        "notes": notes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    record["fingerprint"] = fingerprint(data, dataset=dataset, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                        hint=hint, seed=seed, timing_batch=timing_batch, model=model,
                                        model_id=model_id)
    rows = resumable_rows(previous, record["fingerprint"])  # (press, keep) -> row

    def inputs_of(samples: list[dict]) -> dict:
        if medium == "audio":
            from mmpress.demo.audio import encode_audio

            return encode_audio(model, processor, [s["audio"] for s in samples], [s["question"] for s in samples], hint)
        return encode(model, processor, [s["image"] for s in samples], [s["question"] for s in samples], hint)

    def update(pending: list[_Cell]) -> None:
        record["rows"] = ordered_rows({"rows": list(rows.values())})
        record["pending"] = [{"press": cell.press, "keep": cell.keep} for cell in pending]
        record["best"] = {str(k): v for k, v in best_per_budget(record).items()}
        paired_comparisons(record)  # each row's paired difference to its budget's winner

    def answer(cell: _Cell, references: dict | None) -> None:
        """``cell`` answers this process's batches; every process's parts are merged into it, in
        batch order, as one process answering them all would have added them."""
        parts = []
        for i in mine:
            inputs = inputs_of(batches[i])
            answers, logits, stats = _generate(model, processor, inputs, cell.make(), max_new_tokens)
            if references is None:  # the unpressed reference itself
                kl = None
                references_of[i] = logits
            else:
                kl = kl_divergence(references[i], logits)
            parts.append(dict(batch=i, answers=answers, stats=stats, flops=_flops(model.config, inputs, stats),
                              kv=prompt_cache_bytes(model, stats, len(batches[i])), kl=kl))
            if references is None and i == 0 and len(timed) == len(batches[0]):
                first.append((inputs, stats))  # the timing batch, and its token counts unpressed
            progress.advance(task)
        for part in merge_parts(processes.gather(parts), len(batches)):
            cell.add(part["answers"], part["stats"], part["flops"], part["kv"], kl=part["kl"])

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("answering: none (unpressed reference)", total=len(mine))
        baseline, references_of, first = _Cell(BASELINE, None), {}, []
        answer(baseline, None)
        if not first:  # another timing batch, or batch 0 answered by another process
            inputs = inputs_of(timed)
            first.append((inputs, _unpressed_stats(model, inputs)))
        first = first[0]

        n_visual = first[1]["visual_tokens"] // first[1]["items"]  # known once the adapter has seen a batch
        record["model"]["visual_tokens_per_image"] = n_visual
        cells = [baseline, *_plan(presses, keeps, n_visual, notes)]
        todo = [cell for cell in cells if (cell.press, cell.keep) not in rows]
        pressed = [cell for cell in todo if cell is not baseline]
        progress.update(task, total=len(mine) * (1 + len(pressed)))

        # every cell left is timed first, round-robin with the unpressed model (the baseline is
        # the reference of every round, also when its row is already in a resumed record)
        timings = {}
        if todo:  # (the same on every process: they all hold the same record)
            progress.update(task, description=f"timing: {len(pressed)} presses x {repeats} rounds")
            clock = progress.add_task("timing rounds", total=1 + repeats)
            timings = _time_cells(model, *first, [baseline, *pressed], repeats, lambda: progress.advance(clock))
            timings = pool_timings(processes.gather(timings))
            progress.remove_task(clock)
        for i, cell in enumerate(todo):
            label = f"{cell.press} keep={cell.keep or 'own'}"
            if cell is not baseline:  # the baseline has answered above
                progress.update(task, description=f"answering: {label}")
                answer(cell, references_of)
            rows[(cell.press, cell.keep)] = _row(cell, data, baseline, timings[(cell.press, cell.keep)], seed)
            record["machine"] = _machine(machine, processes)
            update(pending=todo[i + 1 :])
            if checkpoint is not None and processes.main:
                checkpoint(record)

    record["machine"] = _machine(machine, processes)
    if record["machine"].get("busy"):
        notes.append("the machine was busy (its load average exceeded its CPUs: see machine): the timings shared "
                     "them with other work, slower and noisier than on an idle machine; rerun there for figures to "
                     "quote")
    update(pending=[])
    print_table(record, console)
    return record


def _timing_text(rounds: int, processes: int) -> str:
    text = (f"prefill of the timing batch, {rounds} rounds after a warm-up round, each round timing the unpressed "
            "model and every press once (round-robin, each round starting one cell further on); speedup: the median "
            "of the per-round ratios (unpressed / pressed, the same round), range: their min and max")
    if processes > 1:
        text += (f"; {processes} processes timed the same batch at once, each its own rounds, pooled: the median and "
                 "range over every process's rounds (per process: timing_ranks)")
    return text


def _machine(machine: dict, processes: "Processes") -> dict:
    """The machine's load (:func:`~mmpress.eval.cost.machine_state`) before the run and now."""
    return machine_done(dict(machine, processes=processes.world))


# ---- more than one process ---------------------------------------------------------------------
@dataclass
class Processes:
    """The processes answering one bench: this one's ``rank`` of ``world`` and how their results
    meet (``gather``: every process's object, in rank order, on every process)."""

    rank: int = 0
    world: int = 1
    gather: Callable[[object], list] = field(default=lambda obj: [obj], repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> "Processes":
        """One process, or, under ``accelerate launch`` (or torchrun: ``WORLD_SIZE`` > 1), this
        one among them: accelerate's ``PartialState`` starts the process group (gloo on CPU,
        NCCL on GPUs) and objects meet with ``all_gather_object``."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        # PartialState reads ACCELERATE_USE_CPU only through its argument (Accelerator reads the env)
        accelerator = getattr(torch, "accelerator", None)
        has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not has_accelerator)
        if state.num_processes <= 1:
            return cls()

        def gather(obj) -> list:
            out = [None] * state.num_processes
            torch.distributed.all_gather_object(out, obj)
            return out

        return cls(state.process_index, state.num_processes, gather)


def shard(n: int, rank: int, world: int) -> list[int]:
    """The indices of ``n`` items that process ``rank`` of ``world`` takes: contiguous runs, the
    first ``n % world`` processes one more (as accelerate's ``split_between_processes``)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return list(range(start, start + size + (rank < extra)))


def merge_parts(gathered: list[list[dict]], n_batches: int) -> list[dict]:
    """The batches every process answered (one list of parts per process, each part a dict with
    its ``batch`` index), in batch order; RuntimeError unless each of the ``n_batches`` batches
    was answered exactly once."""
    parts = sorted((part for process in gathered for part in process), key=lambda part: part["batch"])
    got = [part["batch"] for part in parts]
    if got != list(range(n_batches)):
        raise RuntimeError(f"the processes answered batches {got}, expected each of 0..{n_batches - 1} once")
    return parts


def pool_timings(gathered: list[dict]) -> dict[tuple, dict]:
    """Every process's timings of the same cells (:func:`_time_cells`, one dict per process)
    pooled per cell: the median speedup and its range over every process's rounds, each round's
    ratio taken within its process (:func:`~mmpress.eval.cost.speedup_spread`); the seconds over
    all rounds; the peak memory of the first process; with several processes, each one's
    median speedup and range (``ranks``)."""
    out = {}
    for key, first in gathered[0].items():
        base = [s for timing in gathered for s in timing[key]["base"]]
        times = [s for timing in gathered for s in timing[key]["times"]]
        out[key] = dict(speedup_spread(base, times, first["limit"]), seconds=statistics.median(times),
                        seconds_range=[min(times), max(times)], limit=first["limit"], memory=first["memory"])
        if len(gathered) > 1:
            out[key]["ranks"] = [{"speedup": one["speedup"], "speedup_range": one["speedup_range"]} for one in
                                 (speedup_spread(t[key]["base"], t[key]["times"], first["limit"]) for t in gathered)]
    return out


class ResumeError(ValueError):
    """An earlier record whose rows cannot stand in this run: other data, model or settings."""


#: the fingerprint's parts that are content hashes (a mismatch names the part, not two digests)
_HASHED = {"questions": "the data's questions", "answers": "the data's answers (or choices)",
           "kinds": "the data's question kinds", "images": "the data's images",
           "model config": "the model's config", "model weights": "the model's weights"}


def fingerprint(data: list[dict], *, dataset: str | None, batch_size: int, max_new_tokens: int, hint: str | None,
                seed: int, timing_batch: int | None, model=None, model_id: str | None = None) -> dict:
    """What a bench row's figures depend on besides its press (whose settings each row holds):
    the data's content (hashes of its questions, gold answers and choices, kinds, and images'
    pixels), the answering and timing settings, the mmpress, transformers and torch versions,
    and, given ``model``, its id, config, weights (a hash of every parameter and buffer: about a
    second per GB) and device. Stored in the record; :func:`resumable_rows` compares it."""
    import transformers

    import mmpress

    key = {"dataset": dataset, "n": len(data), **_data_hashes(data), "batch_size": batch_size,
           "max_new_tokens": max_new_tokens, "hint": hint, "seed": seed,
           "timing_batch": len(data[: timing_batch or batch_size]),
           "mmpress": mmpress.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    if model is not None:
        key |= {"model id": model_id, **_model_hashes(model), "device": str(next(model.parameters()).device)}
    return key


def _digest(chunks) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk if isinstance(chunk, (bytes, memoryview)) else json.dumps(chunk, default=repr).encode())
    return h.hexdigest()[:16]


def _image_bytes(image) -> list:
    """An image's pixels as bytes, after its mode (dtype) and size: a PIL image, array or tensor."""
    if isinstance(image, Image.Image):
        return [[image.mode, list(image.size)], image.tobytes()]
    if isinstance(image, torch.Tensor):
        return [[str(image.dtype), list(image.shape)], _tensor_bytes(image)]
    if isinstance(image, np.ndarray):
        return [[str(image.dtype), list(image.shape)], image.tobytes(order="C")]
    return [repr(image)]  # a path or URL the processor opens: its name is all there is to compare


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's raw bytes (on the host, C order)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def _data_hashes(data: list[dict]) -> dict[str, str]:
    per_image: dict[int, list] = {}  # questions sharing an image object read its pixels once

    def pixels(image) -> list:
        if id(image) not in per_image:
            per_image[id(image)] = _image_bytes(image)
        return per_image[id(image)]

    images = (pixels(s["image"]) if "image" in s else _image_bytes(np.asarray(s["audio"])) for s in data)
    return {"questions": _digest(s["question"] for s in data),
            "answers": _digest([s.get("answer"), s.get("choices")] for s in data),
            "kinds": _digest(s.get("kind") for s in data),
            "images": _digest(chunk for parts in images for chunk in parts)}


def _model_hashes(model) -> dict[str, str]:
    config = model.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path"):  # where it was loaded from, not what it is
        config.pop(volatile, None)
    config["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    if any(tensor.is_meta for tensor in tensors.values()):
        raise ValueError("the model has weights on the meta device (not loaded, or offloaded by a device_map): "
                         "load it onto a device first")

    def weights():
        for name, tensor in tensors.items():
            yield [name, str(tensor.dtype), list(tensor.shape)]
            yield _tensor_bytes(tensor)

    described = json.dumps(config, sort_keys=True, default=repr)
    return {"model class": type(model).__name__, "model config": _digest([described]),
            "model weights": _digest(weights())}


def press_settings(name: str, keep: int | None) -> dict:
    """The settings of the press a bench cell ``(name, keep)`` runs: its class and every field
    (a changed default changes a row's figures); ValueError if the press cannot be made."""
    press = _Cell(name, keep).make()
    fields = {f.name: getattr(press, f.name) for f in dataclasses.fields(press) if f.init}
    return json.loads(json.dumps({"class": type(press).__name__, **fields}, default=repr))


def resumable_rows(previous: dict | None, key: dict) -> dict[tuple, dict]:
    """The rows of ``previous`` (an earlier record) by (press, keep), to stand in the run whose
    :func:`fingerprint` is ``key``; :class:`ResumeError` naming what differs if any part of
    ``key`` or any row's press settings (:func:`press_settings`) differ. Only the parts in
    ``key`` are compared: a caller without the model yet can check the rest early."""
    if previous is None:
        return {}
    if not isinstance(previous, dict) or not isinstance(previous.get("rows"), list):
        raise ResumeError("cannot resume: the earlier record is not a bench record (a JSON object with rows)")
    was = previous.get("fingerprint")
    if was is None or any("press_settings" not in row for row in previous["rows"]):
        raise ResumeError("cannot resume: the earlier record holds no fingerprint of its data, model and presses "
                          "(written by an older mmpress), so its rows may not hold for this run")
    differ = [_HASHED[part] + " differ" if part in _HASHED else f"{part} {was.get(part)!r} (now {now!r})"
              for part, now in key.items() if was.get(part) != now]
    for row in previous["rows"]:
        try:
            now = press_settings(row["press"], row["keep"])
        except ValueError as e:
            differ.append(f"press {row['press']} keep={row['keep']} cannot run now ({' '.join(str(e).split())})")
            continue
        if now != row["press_settings"]:
            changed = ", ".join(f"{k} {row['press_settings'].get(k)!r} (now {v!r})" for k, v in now.items()
                                if row["press_settings"].get(k) != v)
            differ.append(f"press {row['press']} keep={row['keep']}: {changed}")
    if differ:
        raise ResumeError(f"cannot resume a run made with other data, model or settings: {'; '.join(differ)}")
    return {(row["press"], row["keep"]): row for row in previous["rows"]}


# ---- plan -------------------------------------------------------------------------------------
def _takes_budget(name: str) -> bool:
    """Whether press ``name`` takes a ``keep`` budget; ValueError (from get_press) if unknown."""
    if name not in PRESSES:
        get_press(name)  # raises, naming the registered presses
    return PRESSES[name].needs_budget


def _plan(presses: list[str], keeps: list[int], n_visual: int, notes: list[str]) -> list[_Cell]:
    usable = [k for k in keeps if k < n_visual]  # a fraction (float < 1) always is
    if any(map(_takes_budget, presses)):
        notes += [f"keep={k} skipped: not below the model's {n_visual} visual tokens per image"
                  for k in keeps if k >= n_visual]
    kv = [name for name in presses if PRESSES[name].stage == "kv"]
    if kv:
        notes.append(f"{', '.join(kv)}: KV presses evict after an unpressed prefill, so their first answer token "
                     "(KL 0) and prefill FLOPs are the unpressed model's (eviction adds time); they act from the "
                     "second token on")
    cells = []
    for cell in (_Cell(name, keep) for name in presses for keep in (usable if _takes_budget(name) else [None])):
        try:
            cell.make()
        except ValueError as e:  # a budget this press refuses (e.g. SparseVLM's official settings only)
            notes.append(f"{cell.press} keep={cell.keep} skipped: {' '.join(str(e).split())}")
            continue
        cells.append(cell)
    return cells


# ---- running ----------------------------------------------------------------------------------
@torch.inference_mode()
def _generate(model, processor, inputs: dict, press: Press, max_new_tokens: int):
    """Greedy answers, raw logits (B, V) of the first generated token, and the press's token counts."""
    tokenizer = processor.tokenizer
    with press(model) as run:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
    answers = [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers, out.logits[0].float().cpu(), run.stats.as_dict()


@torch.inference_mode()
def _unpressed_stats(model, inputs: dict) -> dict:
    """The token counts of one unpressed prefill of ``inputs`` (the identity press records them)."""
    press = _Cell(BASELINE, None).make()
    with press(model) as run:
        model(**inputs, logits_to_keep=1)
    return run.stats.as_dict()


def _flops(config, inputs: dict, stats: dict):
    """Analytical prefill FLOPs of one batch on its actual (pressed, padded) lengths, each decoder
    layer at its own and an in-vision press's tower at its pressed lengths (``pressed_flops``);
    None for a family that does not count its FLOPs."""
    try:
        return pressed_flops(config, inputs, stats)
    except NotImplementedError:
        return None


def _time_cells(model, inputs: dict, base_stats: dict, cells: list[_Cell], rounds: int,
                after_round: Callable[[], None] | None = None) -> dict[tuple, dict]:
    """Prefill seconds of every cell on one batch over ``rounds`` rounds, round-robin
    (:func:`~mmpress.eval.cost.round_robin`; ``cells[0]``: the unpressed baseline), with each
    cell's FLOPs limit and peak memory (``base_stats``: the token counts the adapter recorded for
    the batch unpressed). By (press, keep): ``base`` and ``times`` (the baseline's and the cell's
    seconds, round by round), ``limit``, ``memory``.

    Round-robin, a slow spell of a shared machine slows every cell of the rounds it lasts, the
    unpressed model included, instead of biasing the speedups of the cells timed during it; a
    speedup is taken per round (:func:`pool_timings`), so it stands on its own in a resumed run
    too."""
    def prefill():
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1)

    presses = [None if cell.press == BASELINE else cell.make() for cell in cells]
    times = {id(cell): [] for cell in cells}
    stats: dict[int, dict] = {}

    def time_one(i: int, timed: bool) -> None:
        press = presses[i]
        if press is None:  # the baseline runs with no hooks at all: the true unpressed model
            seconds = time_call(prefill, repeats=1, warmup=0)
        else:
            with press(model) as run:
                seconds = time_call(prefill, repeats=1, warmup=0)
            stats[i] = run.stats.as_dict()
        if timed:
            times[id(cells[i])].append(seconds)

    round_robin(list(range(len(cells))), rounds, time_one, after_round=after_round)

    def memory(press):
        if press is None:
            return _peak_memory(prefill, device)
        with press(model):
            return _peak_memory(prefill, device)

    device = inputs["input_ids"].device
    base_flops = _flops(model.config, inputs, base_stats)
    out = {}
    for i, (cell, press) in enumerate(zip(cells, presses)):
        flops = base_flops if press is None else _flops(model.config, inputs, stats[i])
        out[(cell.press, cell.keep)] = dict(base=times[id(cells[0])], times=times[id(cell)], memory=memory(press),
                                            limit=None if flops is None else base_flops.total / flops.total)
    return out


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
def _row(cell: _Cell, data: list[dict], baseline: _Cell, timed: dict, seed: int = 0) -> dict:
    """One cell's row; ``correct`` and ``agree`` (per question, in data order) are what the
    bootstrap intervals ``accuracy_ci`` and ``agreement_ci`` (seeded with ``seed``) resample."""
    n, is_base = len(data), cell.press == BASELINE
    correct, agree = correctness(cell.answers, data), agreements(cell.answers, baseline.answers)
    kinds = defaultdict(list)
    for answer, sample in zip(cell.answers, data):
        kinds[sample.get("kind") or "all"].append((answer, sample))
    flops = None if cell.flops is None else {s: v / n for s, v in cell.flops.items()}
    return {
        "press": cell.press,
        "keep": cell.keep,
        "press_settings": press_settings(cell.press, cell.keep),
        "stage": "none" if is_base else PRESSES[cell.press].stage,
        "kept_tokens": cell.kept / cell.images,  # mean visual tokens kept per image, after the last stage
        "avg_tokens": cell.avg / cell.images,  # the same, averaged over the LM's layers
        "layer_kept": [[layer, kept / cell.images] for layer, kept in sorted(cell.layer_kept.items())] or None,
        "accuracy": accuracy(cell.answers, data),
        "accuracy_ci": _interval(bootstrap_ci(correct, seed=seed)),
        "n_labelled": sum(c is not None for c in correct),
        "accuracy_by_kind": {k: accuracy(*zip(*pairs)) for k, pairs in sorted(kinds.items())},
        "agreement": 1.0 if is_base else sum(agree) / n,
        "agreement_ci": [1.0, 1.0] if is_base else _interval(bootstrap_ci(agree, seed=seed)),
        "kl": 0.0 if is_base else float(torch.cat(cell.kl).mean()),
        "flops": flops,  # per sample, per stage, on the padded batches actually run
        "flops_ratio": None if flops is None else cell.flops["total"] / baseline.flops["total"],
        "prefill_s": timed["seconds"],  # median over the rounds
        "prefill_s_range": timed["seconds_range"],
        "speedup": timed["speedup"],  # the median over rounds of unpressed / pressed, timed round-robin
        "speedup_range": timed["speedup_range"],  # [min, max] over the rounds
        "speedup_rounds": timed["speedup_rounds"],
        "noisy": timed["noisy"],  # None, or why the speedup is not a result (cost.speedup_spread)
        **({"timing_ranks": timed["ranks"]} if "ranks" in timed else {}),
        "speedup_limit": timed["limit"],
        "peak_memory_bytes": timed["memory"],
        "kv_bytes": cell.kv_bytes / n,  # per sample: the prompt's cache after the prefill
        "answers": cell.answers,
        "correct": correct,  # per question: True, False, or None (no label)
        "agree": agree,  # per question: the same answer as the unpressed model
    }


def _interval(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [float(ci[0]), float(ci[1])]


def _model_summary(model, model_id: str | None) -> dict:
    config = model.config
    vision = getattr(config, "vision_config", None)
    text = config.get_text_config()
    return {
        "id": model_id,
        "name": getattr(config, "_name_or_path", "") or type(model).__name__,
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "visual_tokens_per_image": None,  # set once the adapter has seen a batch
        "vision": None if vision is None else {
            "model_type": vision.model_type, "layers": vision.num_hidden_layers, "hidden": vision.hidden_size,
            "image_size": getattr(vision, "image_size", None), "patch_size": getattr(vision, "patch_size", None)},
        "text": {"model_type": text.model_type, "layers": text.num_hidden_layers, "hidden": text.hidden_size,
                 "vocab": text.vocab_size},
    }


__all__ = ["Processes", "ResumeError", "fingerprint", "merge_parts", "pool_timings", "press_settings",
           "resumable_rows", "run_bench", "shard"]
