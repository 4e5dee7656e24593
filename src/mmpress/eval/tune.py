"""``mmpress tune``: the smallest budget whose answers stay close enough to the unpressed model's.

The question a user asks before deploying a press: how few visual tokens per image can I keep
and still give (nearly) the answers the full model gives? ``tune`` answers it on a calibration
set, with a statistical guarantee rather than a point estimate:

* **The test.** A budget passes when the one-sided bootstrap lower bound of its agreement with
  the unpressed model's answers (``metric="agreement"``; or of its accuracy against the labels,
  ``metric="accuracy"``) is at or above the target: the ``1 - level`` quantile of the means of
  ``resamples`` seeded resamples of the questions (:func:`interval`; 95% one-sided, 1000
  resamples by default). A budget whose point estimate clears the target by luck of which
  questions were drawn does not pass.
* **The search.** Budgets are the integers 1..N (N: the visual tokens an image has; where images
  differ, the most per image the adapter counted in one batch of the unpressed pass). Keeping all
  N is the unpressed model (a press whose budget is not below the count leaves the forward
  untouched), so N passes an agreement target by construction, and an accuracy target exactly
  when the unpressed model's accuracy passes it. The search bisects the bracket (lo, hi], lo the
  largest budget known to fail (0 at first), hi the smallest known to pass (N at first), probing
  ``(lo + hi) // 2``, assuming agreement grows with the budget. It stops when ``hi - lo <=
  tolerance``: with ``tolerance=1`` hi is the exact smallest passing budget, after
  ``ceil(log2 N)`` probes at most (8 for 256 tokens); a larger tolerance stops earlier with a
  budget at most ``tolerance - 1`` above it.
* **Early stop within a probe.** A probe answers the calibration set batch by batch. After each
  batch it asks whether the verdict is already decided: if even every question still unanswered
  agreeing would leave the lower bound below the target, the budget fails and the probe stops.
  This is exact, not a heuristic: with the resample indices fixed by the seed, turning a
  disagreement into an agreement can only raise every resampled mean, so the bound of that best
  case is an upper bound on the bound the full set would give. Failing probes (the small budgets
  a bisection starts with) usually stop after a batch or two. A passing probe always answers
  every question, so the budget found carries the interval of the whole set.
* **In-LLM presses** (FastV, DART, ...) press at a decoder layer, so their budget is per layer:
  one search per layer in ``layers`` (the press's own layer when None), each reported; the
  setting with the fewest prefill FLOPs (the analytical count, ``eval/cost.py``) is chosen.

The unpressed answers are computed once and every probe is compared with them. Generation is
``eval/bench.py``'s batched pressed generation (greedy, left-padded, the press's token counts).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmpress.api import ANSWER_HINT, check_inputs, encode
from mmpress.eval.metrics import LEVEL, RESAMPLES, agreements, bootstrap_ci, correctness, is_labelled
from mmpress.presses.base import PRESSES, Press
from mmpress.presses.spec import parse_press

METRICS = ("agreement", "accuracy")


class TuneError(ValueError):
    """A tuning that cannot find a budget (e.g. the unpressed model itself misses an accuracy target)."""


# ---- the test: a one-sided bootstrap lower bound ---------------------------------------------------
def interval(values: Sequence[bool | float], resamples: int = RESAMPLES, level: float = LEVEL,
             seed: int = 0) -> tuple[float, float]:
    """The ``1 - level`` and ``level`` quantiles of the means of ``resamples`` bootstrap resamples
    of ``values`` (questions drawn with replacement, from a generator seeded with ``seed``): the
    low end is the one-sided ``level`` lower bound of the mean, the pair a two-sided
    ``2 * level - 1`` interval (95% one-sided: the 5th and 95th percentiles, a 90% interval).
    It is :func:`~mmpress.eval.metrics.bootstrap_ci` at that two-sided level, so tune and bench
    resample the same way."""
    if not 0.5 < level < 1:
        raise ValueError(f"the confidence level of a one-sided bound must be in (0.5, 1), got {level!r}")
    if not len(values):
        raise ValueError("a bound over no questions is undefined")
    low, high = bootstrap_ci(values, resamples=resamples, level=2 * level - 1, seed=seed)
    return low, high


def decided(marks: Sequence[bool], total: int, target: float, resamples: int = RESAMPLES, level: float = LEVEL,
            seed: int = 0) -> bool | None:
    """The verdict on a budget whose first ``len(marks)`` of ``total`` questions gave ``marks``
    (agreed / answered right): False once it cannot pass whatever the rest give (the lower bound
    with every remaining question counted as a success is below ``target``), True or False when
    every question is marked, else None (undecided)."""
    rest = total - len(marks)
    if rest < 0:
        raise ValueError(f"{len(marks)} marks for {total} questions")
    best = interval([*map(bool, marks), *[True] * rest], resamples, level, seed)[0]
    if best < target:
        return False
    return True if rest == 0 else None


# ---- the search: bisection over budgets ----------------------------------------------------------
@dataclass
class Probe:
    """One budget measured: its verdict, the figures it rests on (over the ``answered`` first
    questions; an early-stopped probe's ``lower`` is the bound had every unanswered question
    agreed, which is below the target), and what the press kept and cost there."""

    keep: int
    passed: bool
    value: float  # agreement (or accuracy) over the questions answered
    lower: float  # the one-sided lower bound the verdict compares with the target
    upper: float
    answered: int
    total: int
    seconds: float = 0.0
    kept_tokens: float | None = None  # visual tokens kept per image (after the last stage)
    flops_ratio: float | None = None  # pressed / unpressed prefill FLOPs, on the batches answered

    @property
    def stopped_early(self) -> bool:
        return self.answered < self.total


@dataclass
class Search:
    """A bisection over budgets 1..``n``: ``lo`` fails (0: none known to), ``hi`` passes (``n``:
    keeping every token, the unpressed model), ``probes`` in the order they ran."""

    n: int
    tolerance: int = 1
    lo: int = 0
    hi: int = 0
    probes: list[Probe] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"the budget range needs n >= 1 visual tokens, got {self.n!r}")
        if not isinstance(self.tolerance, int) or isinstance(self.tolerance, bool) or self.tolerance < 1:
            raise ValueError(f"tolerance must be a positive int (tokens), got {self.tolerance!r}")
        self.hi = self.hi or self.n

    @property
    def done(self) -> bool:
        return self.hi - self.lo <= self.tolerance

    def next_keep(self) -> int | None:
        """The budget to probe next, None once the bracket is within the tolerance."""
        return None if self.done else (self.lo + self.hi) // 2

    def add(self, probe: Probe) -> None:
        if not self.lo < probe.keep < self.hi:
            raise ValueError(f"budget {probe.keep} is outside the open bracket ({self.lo}, {self.hi})")
        self.probes.append(probe)
        if probe.passed:
            self.hi = probe.keep
        else:
            self.lo = probe.keep

    def best(self) -> Probe | None:
        """The probe of the smallest budget that passed; None if only ``n`` (unprobed) is known to."""
        return next((p for p in self.probes if p.keep == self.hi), None)


def bisect(measure: Callable[[int], Probe], n: int, tolerance: int = 1, search: Search | None = None,
           on_probe: Callable[[Search], None] | None = None) -> Search:
    """Bisect the budgets 1..``n`` for the smallest one ``measure(keep).passed`` (``n`` passes
    without being measured); ``on_probe(search)`` after each probe (e.g. to save it). With
    ``tolerance=1`` and a monotone verdict the result ``search.hi`` is the exact smallest passing
    budget, after at most ``ceil(log2(n))`` probes."""
    search = search or Search(n, tolerance)
    while (keep := search.next_keep()) is not None:
        search.add(measure(keep))
        if on_probe is not None:
            on_probe(search)
    return search


# ---- on a model -------------------------------------------------------------------------------------
def press_at(name: str, keep: int, layer: int | None = None) -> Press:
    """The press ``name`` keeping ``keep`` tokens, at decoder layer ``layer`` if given (an in-LLM
    press's layer; a pre-LLM press run inside the LM): the spec ``name:keep@layer``."""
    return parse_press(f"{name}:{keep}" + ("" if layer is None else f"@{layer}"))


def check_press(name: str, layers: Sequence[int] | None = None) -> None:
    """ValueError unless press ``name`` takes a token budget (at each of ``layers``), before any
    model loads."""
    if name not in PRESSES:
        parse_press(name)  # raises, naming the close names
    if not PRESSES[name].needs_budget:
        raise ValueError(f"press {name!r} takes no budget (it sets its own), so there is nothing to tune; "
                         "pick a press with a budget (mmpress list)")
    for layer in layers or [None]:
        press_at(name, 1, layer)  # a press that refuses budgets or '@layer' says so here


def _answer(model, processor, inputs: dict, press, max_new_tokens: int) -> tuple[list[str], dict]:
    """Greedy answers of one batch under ``press`` and the press's token counts (bench's batched
    pressed generation)."""
    from mmpress.eval import bench

    answers, _, stats = bench._generate(model, processor, inputs, press, max_new_tokens)
    return answers, stats


class _WithOptions:
    """A press entered with adapter options (``positions``): what ``press(model)`` callers see."""

    def __init__(self, press: Press, **options):
        self.press, self.options = press, options

    def __call__(self, model):
        return self.press(model, **self.options)


@dataclass
class Tuning:
    """What ``tune`` has measured, kept up to date as it runs (an interrupted run keeps it)."""

    press: str
    metric: str
    target: float
    layers: list[int | None]
    n: int = 0  # calibration questions
    visual_tokens: int | None = None  # per image, the top of the budget range
    reference_value: float | None = None  # the unpressed model's accuracy (accuracy target)
    reference_interval: tuple[float, float] | None = None
    searches: dict = field(default_factory=dict)  # layer -> Search
    seconds: float = 0.0
    partial: bool = True
    settings: dict = field(default_factory=dict)

    def spec(self, layer: int | None, keep: int) -> str:
        from mmpress.presses.spec import press_spec

        return press_spec(press_at(self.press, keep, layer))

    def results(self) -> list[dict]:
        """Per layer searched: the budget found (so far), its spec and figures, the bracket. A search
        with no passing probe stands at N, the unpressed model: its figures are the reference's."""
        rows = []
        for layer, search in self.searches.items():
            best = search.best()
            if best is not None:
                value, bounds, kept, flops = best.value, [best.lower, best.upper], best.kept_tokens, best.flops_ratio
            elif self.metric == "agreement":
                value, bounds, kept, flops = 1.0, [1.0, 1.0], self.visual_tokens, 1.0
            else:
                value, bounds = self.reference_value, list(self.reference_interval)
                kept, flops = self.visual_tokens, 1.0
            rows.append({"layer": layer, "keep": search.hi, "press": self.spec(layer, search.hi),
                         "bracket": [search.lo, search.hi], "done": search.done, "probes": len(search.probes),
                         "value": value, "interval": bounds, "kept_tokens": kept, "flops_ratio": flops})
        return rows

    def chosen(self) -> dict | None:
        """The setting to write: the result with the fewest prefill FLOPs (the first layer where
        FLOPs are not counted)."""
        rows = self.results()
        if not rows:
            return None
        counted = [r for r in rows if r["flops_ratio"] is not None]
        return min(counted, key=lambda r: r["flops_ratio"]) if counted else rows[0]

    def as_record(self) -> dict:
        """JSON-able: the settings, every probe, and each layer's result."""
        return {
            "press": self.press, "partial": self.partial,
            "target": {"metric": self.metric, "value": self.target},
            "test": {"bound": "one-sided bootstrap lower bound (percentile)", "level": self.settings.get("level"),
                     "resamples": self.settings.get("resamples"), "seed": self.settings.get("seed"),
                     "interval": f"[{1 - self.settings.get('level', LEVEL):.2f}, "
                                 f"{self.settings.get('level', LEVEL):.2f}] quantiles of the resampled means"},
            "rule": "bisection over budgets 1..N (N passes unmeasured: the unpressed model); stop when hi - lo <= "
                    "tolerance; a probe stops early once its lower bound cannot reach the target",
            "n": self.n, "visual_tokens": self.visual_tokens,
            "reference": None if self.reference_value is None else
            {"value": self.reference_value, "interval": list(self.reference_interval)},
            "settings": self.settings, "seconds": self.seconds,
            "results": self.results(), "chosen": self.chosen(),
            "searches": {str(layer): {"lo": s.lo, "hi": s.hi, "tolerance": s.tolerance,
                                      "probes": [asdict(p) | {"stopped_early": p.stopped_early} for p in s.probes]}
                         for layer, s in self.searches.items()},
        }


def tune(model, processor, press: str, data: list[dict], target: float, metric: str = "agreement",
         layers: Sequence[int] | None = None, tolerance: int = 1, batch_size: int = 8, max_new_tokens: int = 8,
         positions: str | None = None, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
         hint: str | None = ANSWER_HINT, console: Console | None = None, state: Tuning | None = None,
         on_update: Callable[[Tuning], None] | None = None) -> Tuning:
    """Find the smallest budget of press ``press`` (a name) whose ``metric`` on ``data`` passes
    ``target`` (the module docstring: the test, the search, the early stop), at each decoder
    layer of ``layers`` (in-LLM presses; None: the press's own). ``state`` (a :class:`Tuning`,
    made here when None) is updated after every probe and ``on_update(state)`` called, so a
    caller interrupted (Ctrl-C) keeps what was measured: ``state.partial`` stays True until the
    end. Progress goes to ``console``.

    ``metric="accuracy"`` scores answers against the labels (exact match, as bench does) on the
    labelled samples only; ValueError if none is labelled, :class:`TuneError` if the unpressed
    model's own lower bound misses the target (no budget can reach it).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"the target must be a fraction in (0, 1], e.g. 0.95; got {target!r}")
    layers = list(layers) if layers else [None]
    check_press(press, [x for x in layers if x is not None])
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    Search(1, tolerance)  # checks the tolerance
    interval([True], resamples, level, seed)  # checks the level and resamples
    if metric == "accuracy":
        if not any(is_labelled(s) for s in data):
            raise ValueError("--target-accuracy needs labelled data (an 'answer' per question); this data has none: "
                             "use --target-agreement")
        data = [s for s in data if is_labelled(s)]
    if not data:
        raise ValueError("the calibration set is empty")
    check_inputs([s["image"] for s in data], [s["question"] for s in data])

    start = time.perf_counter()
    state = state or Tuning(press, metric, float(target), layers)
    state.press, state.metric, state.target, state.layers, state.n = press, metric, float(target), layers, len(data)
    state.settings = dict(tolerance=tolerance, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          positions=positions, resamples=resamples, level=level, seed=seed, hint=hint)
    torch.manual_seed(seed)
    batches = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
    console = console or Console()
    bound = dict(resamples=resamples, level=level, seed=seed)

    def adapt(pressor: Press):
        return pressor if positions is None else _WithOptions(pressor, positions=positions)

    def inputs_of(samples):
        return encode(model, processor, [s["image"] for s in samples], [s["question"] for s in samples], hint)

    def flops_of(inputs, stats):
        from mmpress.eval.bench import _flops

        return _flops(model.config, inputs, stats)

    def update():
        state.seconds = time.perf_counter() - start
        if on_update is not None:
            on_update(state)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        # the unpressed reference, once: its answers, the budget range's top and its FLOPs per batch
        task = progress.add_task("answering: unpressed reference", total=len(batches))
        references, base_flops, n_visual = [], [], 0
        for samples in batches:
            inputs = inputs_of(samples)
            answers, stats = _answer(model, processor, inputs, Press(keep_ratio=1.0), max_new_tokens)
            references.append(answers)
            flops = flops_of(inputs, stats)
            base_flops.append(None if flops is None else flops.total)
            n_visual = max(n_visual, math.ceil(stats["visual_tokens"] / max(stats["items"], 1)))
            progress.advance(task)
        if n_visual < 1:
            raise ValueError("the model's adapter saw no visual tokens in the calibration set: nothing to press")
        state.visual_tokens = n_visual
        if metric == "accuracy":
            marks = correctness([a for answers in references for a in answers], data)
            state.reference_value = sum(marks) / len(marks)
            state.reference_interval = interval(marks, **bound)
            if state.reference_interval[0] < target:
                update()
                raise TuneError(f"the unpressed model's accuracy on this set is {state.reference_value:.3f} (one-sided "
                                f"{level:.0%} lower bound {state.reference_interval[0]:.3f}), below the target "
                                f"{target}: no budget can reach it; lower --target-accuracy")
        for layer in layers:
            state.searches.setdefault(layer, Search(n_visual, tolerance))
        update()

        def measure(layer, keep: int) -> Probe:
            progress.update(task, description=f"probing {state.spec(layer, keep)}", completed=0, total=len(batches))
            begun, marks, kept, images, used, base = time.perf_counter(), [], 0, 0, 0.0, 0.0
            pressor = adapt(press_at(press, keep, layer))
            verdict = None
            for i, (samples, reference) in enumerate(zip(batches, references, strict=True)):
                inputs = inputs_of(samples)
                answers, stats = _answer(model, processor, inputs, pressor, max_new_tokens)
                marks += (agreements(answers, reference) if metric == "agreement"
                          else correctness(answers, samples))
                kept, images = kept + stats["kept_visual_tokens"], images + stats["items"]
                flops = flops_of(inputs, stats)
                if used is not None and flops is not None and base_flops[i] is not None:
                    used, base = used + flops.total, base + base_flops[i]
                else:
                    used = None  # a family that does not count its FLOPs
                progress.advance(task)
                verdict = decided(marks, len(data), target, **bound)
                if verdict is not None:
                    break
            # an early-stopped probe: the bounds had every unanswered question agreed (an upper
            # bound on the full set's, and already below the target)
            low, high = interval(marks + [True] * (len(data) - len(marks)), **bound)
            return Probe(keep=keep, passed=bool(verdict), value=sum(marks) / len(marks), lower=low, upper=high,
                         answered=len(marks), total=len(data), seconds=time.perf_counter() - begun,
                         kept_tokens=kept / max(images, 1), flops_ratio=None if used is None else used / base)

        for layer in layers:
            bisect(lambda keep, layer=layer: measure(layer, keep), n_visual, tolerance, search=state.searches[layer],
                   on_probe=lambda _: update())
    state.partial = False
    update()
    return state


__all__ = ["Probe", "Search", "Tuning", "TuneError", "bisect", "check_press", "decided", "interval", "press_at", "tune"]
