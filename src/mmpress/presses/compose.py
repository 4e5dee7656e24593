"""Composition across stages: a pre-LLM press followed by an in-LLM or a KV press, as AIM (merge
before the LLM, prune inside it) and MustDrop (press at every stage) do; and ``at_layer``, which
runs a pre-LLM selector at the in-LLM stage.

    with compose(VisionZipPress(keep=128), FastVPress(keep=64))(model):
        model.generate(**inputs)

The later press sees the tokens the earlier one kept (its budget counts those); ``stats``
reports the final count and the layer-averaged one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import Tensor

from mmpress.presses.base import LayerPress, Press, VisualContext


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

    __call__ = Press.__call__


def compose(*presses: Press) -> ComposedPress:
    """Chain presses of different stages, in the order a forward meets them (pre_llm, then
    in_llm or kv); the adapter checks the order when the composition is applied."""
    if len(presses) < 2 or not all(isinstance(p, Press) for p in presses):
        raise ValueError("compose takes two or more presses, e.g. compose(VisionZipPress(keep=128), FastVPress(keep=64))")
    return ComposedPress(tuple(presses))


@dataclass
class AtLayerPress(LayerPress):
    """A pre-LLM selector run at the ``in_llm`` stage: ``inner`` picks, per image, among the hidden
    states entering decoder layer ``layer`` (what it keeps, as at the LM input; where, inside the
    model), with its own budget. ``ctx.text`` holds the text tokens' hidden states entering that
    layer, so a text-conditioned selector compares tokens of one space. Selectors needing the
    vision tower's signals or the image grid do not apply there (raises)."""

    inner: Press | None = None
    layer: int = 2

    needs_budget = False

    def __post_init__(self):
        if not isinstance(self.inner, Press) or self.inner.stage != "pre_llm":
            raise ValueError("at_layer takes a pre-LLM press, e.g. at_layer(DivPrunePress(keep=64), layer=2)")
        missing = set(self.inner.needs) - {"text"}
        if missing:
            raise ValueError(f"{self.inner.name} needs {sorted(missing)}, which the hidden states inside the language "
                             f"model do not come with; pick a selector that needs only the tokens (or text)")
        self.needs = tuple(self.inner.needs)
        self._check_layers()

    @property
    def name(self) -> str:
        return f"{self.inner.name}@L{self.layer}"

    @property
    def paper(self) -> str:
        return self.inner.paper

    def budgets(self, n: int) -> tuple[int, ...]:
        return (self.inner.budget(n),)

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        if ctx.text_hidden is not None:
            ctx = replace(ctx, text=ctx.text_hidden)
        return self.inner.compress(tokens, ctx, k)


def at_layer(press: Press, layer: int = 2) -> AtLayerPress:
    """Run a pre-LLM selector inside the language model, on the hidden states entering ``layer``:
    the same selector at another stage (``at_layer(get_press("divprune", keep=64), layer=2)``)."""
    return AtLayerPress(inner=press, layer=layer)
