"""Composition: a pre-LLM press followed by an in-LLM or a KV press, as AIM (merge before the LLM,
prune inside it) and MustDrop (press at every stage) do.

    with compose(VisionZipPress(keep=128), FastVPress(keep=64))(model):
        model.generate(**inputs)

The later press sees the tokens the earlier one kept (its budget counts those); ``stats``
reports the final count and the layer-averaged one.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from mmpress.presses.base import Press
from mmpress.registry import get_adapter


@dataclass
class ComposedPress:
    """Presses of successive stages applied together (see :func:`compose`)."""

    presses: tuple[Press, ...]
    stats: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.presses)

    @property
    def stage(self) -> str:
        return "+".join(p.stage for p in self.presses)

    @contextmanager
    def __call__(self, model: torch.nn.Module, **adapter_options) -> Iterator[torch.nn.Module]:
        with get_adapter(model, **adapter_options).apply(self):
            yield model


def compose(*presses: Press) -> ComposedPress:
    """Chain presses of different stages, in the order a forward meets them (pre_llm, then
    in_llm or kv); the adapter checks the order when the composition is applied."""
    if len(presses) < 2 or not all(isinstance(p, Press) for p in presses):
        raise ValueError("compose takes two or more presses, e.g. compose(VisionZipPress(keep=128), FastVPress(keep=64))")
    return ComposedPress(tuple(presses))
