"""Cost: analytical FLOPs per stage, KV-cache bytes, and measured prefill and decode time.

FLOPs count multiply-adds as 2 FLOPs, for the matmuls that dominate a transformer (projections,
MLP, attention scores and values); norms, activations and softmax are ignored. The prefill of
a pressed model costs vision tower + projector (unchanged: every image is still encoded) plus
the language model over the pressed sequence, so the speedup a press can reach is bounded by
``flops(unpressed) / flops(pressed)``: the "FLOPs-ratio limit" reported next to measured speedups.

Each decoder layer is counted at its own length. A ``pre_llm`` press shortens every layer's input;
an ``in_llm`` press cutting the sequence to width W at layer k leaves layers < k at the LM-input
length L and runs layers >= k on W tokens (queries and keys: the earlier layers' cache is not
read again), given as ``layer_seq_len = [(k, W), ...]`` (``run.stats`` of ``with press(model) as run``); a ``kv``
press runs the prefill unpressed and shortens only the cache decoding reads (``kv_len`` at every
layer). :func:`stats_lengths` reads both from a press's stats.

An ``in_vision`` press shrinks the tower itself: :func:`pressed_flops` counts it block by block at
the tokens each block took (``Stats.vision_block_tokens``), its attention at the recorded
quadratic work (``vision_block_attention``: per image, frame or window), the projector over the
tokens the tower handed on (``vision_kept_tokens``), and the language model as above. Its limit
is then ``flops(unpressed) / flops(pressed)`` over the whole prefill, and ``vision_limit`` that of
the tower alone.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Sequence

import torch

from mmpress.flops import (PrefillFlops, _get, language_flops, layer_lengths, tower_flops,  # noqa: F401
                           transformer_flops)
from mmpress.registry import family_of


def stats_lengths(stats: dict, cache: bool = False) -> tuple[int, list | None]:
    """``(seq_len, layer_seq_len)`` of a press's ``stats``: what the prefill's layers run on, or
    (``cache``) what the KV cache holds after it (a ``kv`` press: ``kv_len`` at every layer)."""
    if cache and "kv_len" in stats:
        return stats["kv_len"], None
    return stats.get("pressed_seq_len", stats.get("seq_len")), stats.get("layer_seq_len") or None


def prefill_flops(config, inputs: dict, seq_len: int, layer_seq_len=None) -> PrefillFlops:
    """FLOPs of the prefill of ``inputs`` (a batch as the model takes it) with ``seq_len`` LM
    tokens per row (``layer_seq_len``: :func:`~mmpress.flops.language_flops`), as the model's
    family counts them (``Adapter.prefill_flops``)."""
    return family_of(config).prefill_flops(config, inputs, seq_len, layer_seq_len)


def pressed_flops(config, inputs: dict, stats: dict | None) -> PrefillFlops:
    """FLOPs of the prefill of ``inputs`` under a press whose ``stats`` (``run.stats.as_dict()``;
    None: unpressed) say what each stage left: the language model at its pressed lengths
    (:func:`stats_lengths`) and, after an in-vision press, the vision tower block by block at the
    tokens each block took (:func:`~mmpress.flops.tower_flops`) and the projector over the tokens
    the tower handed on (its unpressed count scaled by kept / all: a projector works per token).

    Attention work per block: ``vision_block_attention`` as the family recorded it (the sum over
    its attention sequences of length squared), else each encoded item read as one attention
    sequence of equal length (block tokens^2 / items: exact for a ToMe merge of equal images on a
    ViT tower; a family whose tower attends per frame or window must record it)."""
    if not stats:
        return prefill_flops(config, inputs, inputs["input_ids"].shape[1])
    flops = prefill_flops(config, inputs, *stats_lengths(stats))
    blocks = stats.get("vision_block_tokens")
    if not blocks:
        return flops
    attention = stats.get("vision_block_attention")
    if attention is None:
        items = max(1, stats.get("items", 1))
        depth = _get(config.vision_config, "num_hidden_layers", "depth", default=len(blocks))
        attention = [n * n / items for n in blocks[:depth]]
    vision = tower_flops(config.vision_config, blocks, attention)
    pressable = stats["visual_tokens"] - stats.get("fixed_tokens", 0)
    kept = stats.get("vision_kept_tokens", pressable)
    projector = flops.projector * kept / pressable if pressable else flops.projector
    return PrefillFlops(vision, projector, flops.language)


def flops_split(flops: PrefillFlops) -> dict:
    """``{"vision", "projector", "language", "total"}`` of a prefill's FLOPs (a JSON row)."""
    return dict(vision=flops.vision, projector=flops.projector, language=flops.language, total=flops.total)


def kv_cache_bytes(text_cfg, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.float32,
                   layer_seq_len=None) -> int:
    """Bytes of the keys and values a decoder LM caches for ``batch`` rows of ``seq_len`` tokens
    (from each ``(layer, width)`` of ``layer_seq_len`` on, ``width``: an ``in_llm`` press's cache)."""
    heads = text_cfg.num_attention_heads
    head_dim = _get(text_cfg, "head_dim", default=text_cfg.hidden_size // heads)
    kv_heads = _get(text_cfg, "num_key_value_heads", default=heads)
    itemsize = torch.empty((), dtype=dtype).element_size()
    entries = sum(layer_lengths(text_cfg.num_hidden_layers, seq_len, layer_seq_len))
    return 2 * kv_heads * head_dim * entries * batch * itemsize


def prompt_cache_bytes(model, stats: dict, batch: int) -> int:
    """Bytes of the prompt's KV cache ``model`` holds after a (pressed) prefill of ``batch`` rows
    whose token counts are ``stats`` (a press's, or ``{"seq_len": L}`` unpressed), each layer at
    its own length."""
    seq_len, layer_seq_len = stats_lengths(stats, cache=True)
    return kv_cache_bytes(model.config.get_text_config(), seq_len, batch=batch, dtype=next(model.parameters()).dtype,
                          layer_seq_len=layer_seq_len)


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` (synchronising CUDA if it is in use)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


#: a speedup whose rounds spread over more than this share of its median is flagged noisy
NOISE = 0.10


#: a 1-minute load average above this many times the usable CPUs marks the machine busy
BUSY = 1.25


def round_robin(cells: Sequence, rounds: int, time_one: Callable[[object, bool], object], warmup: int = 1,
                after_round: Callable[[], None] | None = None) -> None:
    """Time every cell once per round, ``warmup`` untimed rounds first, then ``rounds`` timed ones:
    ``time_one(cell, timed)`` runs and records one cell once (``timed`` False in a warm-up round).

    A round visits every cell before any cell runs again, so a slow spell of a shared machine
    (another job starting, a thermal limit) slows the unpressed model and every press alike
    instead of the cells that happened to run during it; each round starts one cell further on
    (round r: cells r, r+1, ..., wrapped), so no cell always follows the same one. ``time_one``
    returning False drops its cell from later rounds (e.g. a press that refuses the model in the
    warm-up). ``after_round`` runs after each round (a progress bar)."""
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"timing rounds must be a positive int, got {rounds!r}")
    alive = list(cells)
    for round_ in range(warmup + rounds):
        shift = round_ % len(alive) if alive else 0
        for cell in alive[shift:] + alive[:shift]:
            if time_one(cell, round_ >= warmup) is False:
                alive.remove(cell)
        if after_round is not None:
            after_round()


def speedup_spread(base: Sequence[float], pressed: Sequence[float], limit: float | None,
                   tolerance: float = NOISE) -> dict:
    """A speedup measured over rounds: ``base[i]`` and ``pressed[i]`` are the unpressed and pressed
    seconds of round i (the same round, so a slow spell hits both), and ``limit`` the speedup the
    FLOPs allow (None: unknown).

    Returns ``speedup`` (the median of the per-round ratios), ``speedup_range`` ([min, max] over
    the rounds), ``speedup_rounds`` (the ratios), ``spread`` ((max - min) / median) and ``noisy``:
    None for a trustworthy speedup, else why not: its rounds spread over more than ``tolerance``
    of its median, or it beats its FLOPs limit by more than its spread (a press cannot run faster
    than the work it leaves; a gap that large means the unpressed rounds were slowed by something
    else)."""
    if len(base) != len(pressed) or not base:
        raise ValueError(f"need one unpressed and one pressed time per round, got {len(base)} and {len(pressed)}")
    ratios = [b / p for b, p in zip(base, pressed)]
    speedup, low, high = statistics.median(ratios), min(ratios), max(ratios)
    spread = (high - low) / speedup
    noisy = None
    if spread > tolerance:
        noisy = (f"its {len(ratios)} rounds spread over {spread:.0%} of the median ({low:.2f}x to {high:.2f}x), "
                 f"more than {tolerance:.0%}")
    elif limit is not None and speedup - limit > high - low:
        noisy = (f"{speedup:.2f}x is above its FLOPs limit {limit:.2f}x by more than its spread over rounds "
                 f"({low:.2f}x to {high:.2f}x)")
    return dict(speedup=speedup, speedup_range=[low, high], speedup_rounds=ratios, spread=spread, noisy=noisy)


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15-minute load averages (runnable processes; None where the OS
    keeps none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_state() -> dict:
    """How busy the machine is as timing starts: its CPUs (all, and those this process may run
    on), torch's intra- and inter-op threads, the load average; :func:`machine_done` adds the
    load average after."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpus": os.cpu_count(), "usable_cpus": usable, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "processes": 1,
            "load_before": load_average(), "load_after": None}


def machine_done(machine: dict) -> dict:
    """``machine`` (:func:`machine_state`) with the load average after the timing, and ``busy``:
    whether the 1-minute load average before or after exceeded the usable CPUs by a quarter (the
    load counts this run's own threads too, so an idle machine running it sits near the CPU count;
    above, other work shared the CPUs: timings are slower and noisier than on an idle machine)."""
    machine["load_after"] = load_average()
    peak = max((load[0] for load in (machine["load_before"], machine["load_after"]) if load), default=None)
    machine["busy"] = None if peak is None else peak > BUSY * (machine["usable_cpus"] or 1)
    return machine


class _Stamps:
    """A logits processor: ``generate`` calls it once per new token, as soon as that token's
    logits exist; it notes the time (after the device finishes) and leaves the scores alone."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        return scores


def decode_seconds(model, inputs: dict, steps: int = 8) -> float:
    """Mean seconds of one greedy decode step: ``generate`` of ``steps`` new tokens (no early
    stop) from ``inputs``, timed from the first token's logits (the prefill's) to the last's, so
    the prefill is left out. Run it under a press to time decoding on the press's cache."""
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"decode steps must be an int >= 2 (the first token comes from the prefill), got {steps!r}")
    from transformers import LogitsProcessorList

    stamps, config = _Stamps(), model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1,
                       pad_token_id=pad, logits_processor=LogitsProcessorList([stamps]))
    if len(stamps.times) != steps:
        raise RuntimeError(f"generate produced {len(stamps.times)} tokens, expected {steps}")
    return (stamps.times[-1] - stamps.times[0]) / (steps - 1)
