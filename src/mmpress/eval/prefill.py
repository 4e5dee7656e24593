"""Prefill speed of every press on real-sized random models of a family's shape.

Compute cost does not depend on the weights, so a random model of the real shape times the
same as the trained one. Each family file gives its "real" CPU shape (``Adapter.build("real")``,
``Adapter.prompts``, ``Adapter.bench_media``): the released model's tower, resolution and token
count, and a language model every family shares (a Qwen2 of 12 x 896, the peer baseline's:
shared/MEASURED.md), so figures compare like for like.
"""

from __future__ import annotations

import statistics
import time

import torch

from mmpress.eval.cost import (decode_seconds, flops_split, machine_done, machine_state, prefill_flops, pressed_flops,
                               prompt_cache_bytes, round_robin, speedup_spread, time_call)
from mmpress.presses.base import PRESSES, get_press
from mmpress.registry import ADAPTERS, family_of, get_adapter


def archs() -> list[str]:
    """The model types a random model can be built of (``bench-cost --arch``)."""
    return sorted(t for t, cls in ADAPTERS.items() if cls.bench_media)


def shaped(arch: str, kind: str = "image", batch: int = 1, seed: int = 0, size: str = "real",
           media: tuple[int, ...] | None = None, **overrides):
    """(model, inputs) of ``arch`` (a transformers model type, :func:`archs`) at ``size``: ``batch``
    rows of ragged text, each with one medium of ``kind`` of the family's bench size (``media``:
    another, e.g. (h, w) px or (frames, h, w)); ``overrides`` change the model's config sizes."""
    cls = ADAPTERS.get(arch)
    if cls is None or not cls.bench_media:
        raise ValueError(f"unknown arch {arch!r}: {', '.join(archs())}")
    if kind not in cls.bench_media:
        raise ValueError(f"the {arch} shape takes {' or '.join(cls.bench_media)}, not {kind!r}")
    model = cls.build(size, seed=seed, model_type=arch, **overrides)
    medium = tuple(media or cls.bench_media[kind])
    return model, cls.prompts(model, [[medium]] * batch, kind=kind, seed=seed)


def visual_tokens(model, inputs: dict) -> int:
    """Placeholder tokens of media (image, video, audio) of the row holding the most."""
    ids, visual = inputs["input_ids"], torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for token in get_adapter(model).token_ids:
        visual |= ids == token
    return int(visual.sum(1).max())


def encode_visuals(model, inputs: dict) -> None:
    """The tower and projector alone over every medium of ``inputs`` (``Adapter.encode``)."""
    family_of(model).encode(model, inputs)


def run_prefill(model, inputs: dict, presses: list[str], keeps: list[int], repeats: int = 5, progress=None,
                split: bool = True, decode_steps: int = 0) -> dict:
    """Median prefill seconds (one forward, ``logits_to_keep=1`` as generate's prefill) for the
    unpressed model and every press x budget (a press that sets its own budget: once, ``keep``
    None); speedup next to its FLOPs-ratio limit (each decoder layer at its own length: an
    ``in_llm`` press's layers after its cut count the cut width), and the press's own overhead
    (time inside ``press.press`` / ``press_kv``, summed per forward; not the attention an in-LLM or
    KV press reads) as a fraction of the unpressed prefill.

    Cells are timed round-robin (:func:`~mmpress.eval.cost.round_robin`: one warm-up round, then
    ``repeats`` rounds, each timing every cell once), so slow drifts of a shared machine hit the
    baseline and the presses alike; a speedup is the median of its per-round ratios to the
    baseline of the same round, with their range and a ``noisy`` verdict
    (:func:`~mmpress.eval.cost.speedup_spread`). With
    ``split``, the vision tower + projector alone is one more cell: the vision / language-model
    split of the unpressed prefill, which bounds every press acting after the tower. With
    ``decode_steps`` (>= 2), each round also times that many greedy decode steps after a prefill
    (:func:`~mmpress.eval.cost.decode_seconds`, under the press): decode tokens/s and its speedup
    over the unpressed model, where a ``kv`` press (its prefill unpressed) gains.

    Each row: ``press``, ``keep``, ``stage``, ``seconds`` (median; ``seconds_range``: min and max),
    ``speedup``, ``speedup_range``, ``speedup_rounds``, ``spread``, ``noisy`` (None, or why the
    speedup is not to be trusted), ``limit``, ``efficiency``, ``overhead``; ``kept_tokens``
    (visual tokens per image after the last stage), ``avg_tokens`` (per image, averaged over the
    decoder layers), ``layer_kept`` (in_llm: ``[layer, kept per image]``), ``kv_bytes`` /
    ``kv_ratio`` (the prompt's KV cache after the prefill, each layer at its own length), ``flops``
    (vision tower / projector / language model / total: an in-vision press's tower at its pressed
    lengths, ``eval.cost.pressed_flops``) and ``vision_limit`` (the tower's FLOPs ratio); with
    ``decode_steps``: ``decode_s`` (per step), ``decode_tok_s`` (all rows) and ``decode_speedup``.

    Returns ``{"rows", "skipped", "vision_seconds", "vision_share", "flops", "machine", "rounds"}``:
    ``skipped`` maps a press the family cannot run (it raised a ValueError in the warm-up, e.g. a
    [CLS]-attention press on a tower without [CLS], or an in-LLM press at a layer the model lacks),
    or ``"name keep=k"`` for a budget the press refuses, to its reason; ``flops`` is the unpressed
    split; ``machine`` (:func:`~mmpress.eval.cost.machine_state`) how busy the machine was: its
    CPUs, torch's threads, the load average before and after the timing."""
    if decode_steps and (not isinstance(decode_steps, int) or decode_steps < 2):
        raise ValueError(f"decode_steps must be 0 or an int >= 2, got {decode_steps!r}")
    config = model.config
    n_vis = visual_tokens(model, inputs)
    batch, width = inputs["input_ids"].shape
    cells = [dict(press="none", keep=n_vis, obj=None, times=[], decode=[], spent=[], stats=None)]
    skipped = {}
    for name in presses:
        own = name in PRESSES and not PRESSES[name].needs_budget  # e.g. PDrop's ratios, VTW: one cell, keep None
        for keep in [None] if own else [k for k in keeps if k < n_vis]:
            try:
                press = get_press(name) if own else get_press(name, keep=keep)
            except ValueError as e:  # a budget this press refuses (e.g. SparseVLM's official settings only)
                if name not in PRESSES:
                    raise
                skipped[f"{name} keep={keep}"] = " ".join(str(e).split())
                continue
            cells.append(dict(press=name, keep=keep, obj=_timed(press), times=[], decode=[], spent=[], stats=None))
    if split:
        cells.append(dict(press="vision", keep=n_vis, obj="vision", times=[]))

    def forward():
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1)

    def vision():
        with torch.inference_mode():
            encode_visuals(model, inputs)

    def decode():
        return decode_seconds(model, inputs, decode_steps) if decode_steps else None

    def time_one(cell: dict, timed: bool):
        press = cell["obj"]
        if press is None:  # the baseline runs with no hooks at all: the true unpressed model
            seconds, step = time_call(forward, repeats=1, warmup=0), decode()
        elif press == "vision":
            seconds, step = time_call(vision, repeats=1, warmup=0), None
        else:
            try:
                with press(model) as run:
                    spent = press.spent_s
                    seconds = time_call(forward, repeats=1, warmup=0)
                    spent, cell["stats"] = press.spent_s - spent, run.stats.as_dict()
                    step = decode()
            except ValueError as e:
                if timed:
                    raise
                skipped[cell["press"]] = " ".join(str(e).split())
                cells.remove(cell)
                return False
            if timed:
                cell["spent"].append(spent)
        if timed:
            cell["times"].append(seconds)
            if step is not None:
                cell["decode"].append(step)

    machine = machine_state()
    round_robin(list(cells), repeats, time_one, after_round=progress)
    machine_done(machine)

    vision_seconds = statistics.median(cells.pop()["times"]) if split else None
    base_times = cells[0]["times"]
    base = statistics.median(base_times)
    base_decode = statistics.median(cells[0]["decode"]) if decode_steps else None
    base_flops = prefill_flops(config, inputs, width)
    base_kv = prompt_cache_bytes(model, {"seq_len": width}, batch)
    rows = []
    for cell in cells:
        seconds = statistics.median(cell["times"])
        press, stats = cell["obj"], cell["stats"]
        flops = base_flops if press is None else pressed_flops(config, inputs, stats)  # in-vision: the tower pressed
        kv = base_kv if press is None else prompt_cache_bytes(model, stats, batch)
        limit = base_flops.total / flops.total
        timing = speedup_spread(base_times, cell["times"], limit)
        overhead = 0.0 if press is None else statistics.median(cell["spent"]) / base
        row = dict(press=cell["press"], keep=cell["keep"], stage="none" if press is None else press.stage,
                   seconds=seconds, seconds_range=[min(cell["times"]), max(cell["times"])], **timing, limit=limit,
                   efficiency=timing["speedup"] / limit, overhead=overhead, flops=flops_split(flops),
                   vision_limit=base_flops.vision / flops.vision if flops.vision else None,
                   **_tokens(cell["keep"], stats), kv_bytes=kv, kv_ratio=kv / base_kv)
        if decode_steps:
            step = statistics.median(cell["decode"])
            row.update(decode_s=step, decode_tok_s=batch / step, decode_speedup=base_decode / step)
        rows.append(row)
    split_flops = dict(vision=base_flops.vision + base_flops.projector, language=base_flops.language)
    if split:  # the unpressed row carries the split
        rows[0].update(vision_seconds=vision_seconds, vision_share=vision_seconds / base,
                       vision_flops_share=split_flops["vision"] / base_flops.total)
    return dict(rows=rows, skipped=skipped, vision_seconds=vision_seconds,
                vision_share=None if vision_seconds is None else vision_seconds / base, flops=split_flops,
                machine=machine, rounds=repeats)


def _tokens(keep: int, stats: dict | None) -> dict:
    """Visual tokens per image of a row: after the last stage, averaged over the decoder layers, and
    (in_llm) from each pressed layer on; ``stats`` None: the unpressed model (``keep``: all)."""
    if stats is None:
        return dict(kept_tokens=float(keep), avg_tokens=float(keep), layer_kept=None)
    images, kept = max(1, stats["items"]), stats["kept_visual_tokens"]
    layer_kept = [[layer, n / images] for layer, n in stats.get("layer_kept") or ()] or None
    return dict(kept_tokens=kept / images, avg_tokens=stats.get("layer_avg_visual_tokens", kept) / images,
                layer_kept=layer_kept)


def bench_prefill(model, inputs: dict, presses: list[str], keeps: list[int], repeats: int = 5, progress=None,
                  decode_steps: int = 0) -> list[dict]:
    """:func:`run_prefill`'s rows, without the vision split."""
    return run_prefill(model, inputs, presses, keeps, repeats=repeats, progress=progress, split=False,
                       decode_steps=decode_steps)["rows"]


def _timed(press):
    """Adds the seconds of the press's own work (``press.press``, and ``press_kv`` of a KV press)
    inside the real run to ``press.spent_s``; a call nested in another (a ``press_kv`` that calls
    ``press``) counts once."""
    press.spent_s, busy = 0.0, []
    for method in ("press", "press_kv"):
        inner = getattr(press, method, None)
        if inner is None:
            continue

        def timed(*args, _inner=inner, **kwargs):
            if busy:
                return _inner(*args, **kwargs)
            busy.append(True)
            start = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                press.spent_s += time.perf_counter() - start
                busy.pop()

        setattr(press, method, timed)  # an instance attribute shadows the method
    return press
