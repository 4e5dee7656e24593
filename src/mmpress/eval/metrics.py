"""Quality of a pressed model: accuracy on labelled data, fidelity to the unpressed model on any data.

* accuracy: exact match after :func:`~mmpress.eval.data.normalize_answer`, to the gold answer or
  to any of a list of them (VQA's several human answers: any match counts); a sample with
  ``choices`` (multiple choice) is right when the prediction names the right option, by its
  text or by its letter (A, B, ...).
* agreement: the pressed model's answer equals the unpressed model's (normalised), so a press
  can be judged without labels.
* KL(unpressed || pressed) of the next-token distribution at the first answer token: how far
  the press moved the model's prediction, even where the argmax (and so the answer) did not move.
* confidence intervals: a percentile bootstrap over the questions (:func:`bootstrap_ci`), and a
  paired one of the difference of two presses answering the same questions
  (:func:`paired_bootstrap_ci`): with a few dozen questions, accuracies a few points apart are
  often the same within the noise of which questions were drawn.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch
from torch import Tensor

from mmpress.eval.data import exact_match, normalize_answer

_LETTERS = string.ascii_lowercase


def match_choice(prediction: str, choices: Sequence[str]) -> int | None:
    """Index of the option ``prediction`` names, or None if it names none or several.

    An option is named by its whole (normalised) text, by its letter alone ("B", "(b)", "B."),
    or, failing both, by being the only option whose text occurs in the prediction as whole words
    ("it is a red circle" names "red circle" among {"red circle", "blue square"}).
    """
    pred = normalize_answer(prediction)
    options = [normalize_answer(c) for c in choices]
    if pred in options:
        return options.index(pred)
    # a lone letter; normalize_answer drops "a" as an article, so read the letter from the raw text
    letter = re.fullmatch(r"\W*([a-z])\W*", str(prediction).strip().lower())
    if letter and _LETTERS.index(letter.group(1)) < len(options):
        return _LETTERS.index(letter.group(1))
    padded = f" {pred} "
    named = [i for i, option in enumerate(options) if option and f" {option} " in padded]
    return named[0] if len(named) == 1 else None


def gold_answers(sample: dict) -> list[str]:
    """The sample's acceptable answers: its ``answer``, or each entry of a list of them (VQA's
    several human answers); empty ones left out."""
    answer = sample.get("answer")
    answers = answer if isinstance(answer, (list, tuple)) else [answer]
    return [str(a) for a in answers if a is not None and str(a).strip() != ""]


def is_labelled(sample: dict) -> bool:
    """Whether the sample carries a (non-empty) reference answer."""
    return bool(gold_answers(sample))


def is_correct(prediction: str, sample: dict) -> bool | None:
    """Whether ``prediction`` answers ``sample`` right (any of its gold answers counts); None when
    the sample has no label."""
    golds = gold_answers(sample)
    if not golds:
        return None
    choices = sample.get("choices")
    if choices:
        indices = {match_choice(gold, choices) for gold in golds}
        if None in indices:
            raise ValueError(f"answer {sample['answer']!r} is not one of the sample's choices {list(choices)}")
        return match_choice(prediction, choices) in indices
    return exact_match(prediction, golds)


def correctness(predictions: Sequence[str], samples: Sequence[dict]) -> list[bool | None]:
    """Per sample, whether it was answered right (None: the sample has no label)."""
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    return [is_correct(p, s) for p, s in zip(predictions, samples)]


def accuracy(predictions: Sequence[str], samples: Sequence[dict]) -> float | None:
    """Fraction of the labelled samples answered right; None if no sample is labelled."""
    marks = [c for c in correctness(predictions, samples) if c is not None]
    return sum(marks) / len(marks) if marks else None


def agreements(predictions: Sequence[str], references: Sequence[str]) -> list[bool]:
    """Per answer, whether it equals (after normalisation) the reference (unpressed) answer."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]


def agreement(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of answers equal (after normalisation) to the reference (unpressed) answers."""
    same = agreements(predictions, references)
    if not same:
        raise ValueError("agreement of an empty list of answers is undefined")
    return sum(same) / len(same)


# ---- confidence intervals ---------------------------------------------------------------------
RESAMPLES = 1000
LEVEL = 0.95


def _resample_means(columns: Tensor, resamples: int, seed: int) -> Tensor:
    """Means of ``resamples`` bootstrap resamples (rows drawn with replacement) of the (n, k)
    ``columns``, the same rows for every column: (resamples, k). Vectorised: one index tensor."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(columns.shape[0], (resamples, columns.shape[0]), generator=generator)
    return columns[index].mean(dim=1)


def _percentiles(means: Tensor, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=means.dtype)).tolist()
    return low, high


def _marks(values: Sequence[bool | float | None]) -> Tensor:
    """The values as float64, the None ones (unlabelled samples) dropped."""
    return torch.tensor([float(v) for v in values if v is not None], dtype=torch.float64)


def bootstrap_ci(values: Sequence[bool | float | None], resamples: int = RESAMPLES, level: float = LEVEL,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of the mean of ``values`` (e.g. per-question
    correctness; None entries, unlabelled samples, are left out): ``resamples`` resamples of the
    questions with replacement, drawn from a generator seeded with ``seed`` (deterministic), the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of their means. None if no value is left."""
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1, got {level=}, {resamples=}")
    marks = _marks(values)
    if not len(marks):
        return None
    return _percentiles(_resample_means(marks[:, None], resamples, seed)[:, 0], level)


def paired_bootstrap_ci(values: Sequence[bool | float | None], others: Sequence[bool | float | None],
                        resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``mean(values) - mean(others)``, two systems scored on the
    same questions: each resample draws the same questions for both, so the noise of which
    questions were asked cancels out (an interval that holds 0: no real difference). Pairs where
    either value is None are left out; None if none is left."""
    if len(values) != len(others):
        raise ValueError(f"{len(values)} values paired with {len(others)}")
    pairs = [(a, b) for a, b in zip(values, others) if a is not None and b is not None]
    if not pairs:
        return None
    diff = torch.tensor([float(a) - float(b) for a, b in pairs], dtype=torch.float64)
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1, got {level=}, {resamples=}")
    return _percentiles(_resample_means(diff[:, None], resamples, seed)[:, 0], level)


def kl_divergence(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(p_ref || p) per row, in nats, of the softmax distributions of two (B, V) logit tensors.

    Computed in float64 from log-softmax, so identical logits give exactly 0. Raw logits are
    expected (generate's ``output_logits``), not processed ``scores``: a top-k or temperature
    processor would put -inf where the reference has mass and make the divergence infinite.
    """
    if reference_logits.shape != logits.shape or reference_logits.ndim != 2:
        raise ValueError(f"expected two (batch, vocab) logit tensors, got {tuple(reference_logits.shape)} "
                         f"and {tuple(logits.shape)}")
    ref = torch.log_softmax(reference_logits.double(), dim=-1)
    other = torch.log_softmax(logits.double(), dim=-1)
    # xlogy-style: rows where p_ref underflows to 0 contribute 0, not 0 * -inf = nan
    return torch.where(ref.isneginf(), 0.0, ref.exp() * (ref - other)).sum(dim=-1)


__all__ = ["accuracy", "agreement", "agreements", "bootstrap_ci", "correctness", "gold_answers", "is_correct",
           "is_labelled", "kl_divergence", "match_choice", "paired_bootstrap_ci"]
