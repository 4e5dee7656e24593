"""What every pressed vLLM model shares: reading the press from the model's config, refusing at
start-up what cannot run, shrinking the processor's placeholder counts, pressing the multimodal
embeddings item by item with the same press objects as the transformers path, and letting vLLM's
CPU runner call a model's ``recompute_mrope_positions``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from mmpress.presses.base import Press, VisualContext
from mmpress.presses.compose import ComposedPress
from mmpress.presses.spec import parse_press

#: the ``hf_overrides`` key holding the press: ``{"mmpress": {"press": "divprune:64", ...fields}}``
CONFIG_KEY = "mmpress"
#: signals a pressed vLLM model gives any press: the item's tokens and its patch grid
BASE_SIGNALS = frozenset({"grid"})


def press_of(hf_config) -> Press | None:
    """The press ``hf_overrides={"mmpress": ...}`` put in the model's config: a spec string
    (``"divprune:64"``) or a dict with ``press`` (the spec) and further press fields
    (``{"press": "random:64", "seed": 1}``); None when the key is absent or the press is "none"."""
    value = getattr(hf_config, CONFIG_KEY, None)
    if value is None:
        return None
    if isinstance(value, str):
        spec, fields_ = value, {}
    elif isinstance(value, dict) and isinstance(value.get("press"), str):
        spec, fields_ = value["press"], {k: v for k, v in value.items() if k != "press"}
    else:
        raise ValueError(f"hf_overrides[{CONFIG_KEY!r}] must be a press spec such as 'divprune:64' or a dict "
                         f"{{'press': 'divprune:64', ...press fields}}; got {value!r}")
    press = parse_press(spec, **fields_)
    if isinstance(press, ComposedPress):
        raise ValueError(f"{spec!r} composes presses; through vLLM mmpress runs one pre-LLM press on the "
                         "multimodal embeddings: give a single press such as 'divprune:64'")
    return None if press.name == "none" else press


def check_press(press: Press, family: str, signals: frozenset[str]) -> None:
    """Raises (at engine start-up, when the model is built) for a press this model cannot run
    through vLLM: a stage other than ``pre_llm`` or a signal its vLLM wrapper does not give."""
    if press.stage != "pre_llm":
        raise ValueError(f"mmpress/vLLM: {press.name} is an {press.stage} press; vLLM's model code runs the "
                         "language model itself, so only pre-LLM presses (which press the multimodal embeddings) "
                         "run through the plugin; use the transformers path (`with press(model):`) for it")
    missing = sorted(set(press.needs) - signals)
    if missing:
        raise ValueError(f"mmpress/vLLM: {press.name} needs {missing}, which the {family} wrapper does not read "
                         f"from vLLM's model (it gives {sorted(signals)}); choose a press needing only those, "
                         "e.g. divprune, tome, random, uniform or pool")


def kept_count(press: Press, n: int) -> int:
    """The placeholder count of an item of ``n`` tokens: what ``press.budget`` keeps, computed
    from host facts only (vLLM sizes the placeholders before the encoder runs)."""
    if press.keep is not None:
        return min(press.keep, n)
    return min(n, max(1, math.ceil(press.keep_ratio * n)))


def pressed_updates(updates, press: Press | None):
    """The processor's prompt updates with each item's placeholder run cut to the press's budget."""
    if press is None:
        return updates
    from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

    def cut(replacement, item_idx: int, **kwargs):
        content = replacement(item_idx, **kwargs) if callable(replacement) else replacement
        if isinstance(content, PromptUpdateDetails):
            raise ValueError("mmpress/vLLM: this model's placeholders carry non-embedding tokens; not supported")
        token = content[0]
        if any(t != token for t in content):
            raise ValueError("mmpress/vLLM: a placeholder run of mixed tokens cannot be cut to a budget")
        return [token] * kept_count(press, len(content))

    out = []
    for update in updates:
        if not isinstance(update, PromptReplacement):
            raise ValueError(f"mmpress/vLLM: unsupported prompt update {type(update).__name__}")
        out.append(PromptReplacement(modality=update.modality, target=update.target,
                                     replacement=partial(cut, update.replacement)))
    return out


@dataclass(frozen=True)
class ItemShape:
    """What a pressed item looks like to the press: its token count, its (t, h, w) grid (None
    when the tokens are not a grid, e.g. LLaVA's "full" strategy with [CLS] first)."""

    n: int
    grid: tuple[int, int, int] | None
    kind: str = "image"
    cls_first: bool = False


def press_items(press: Press, embeddings, shapes: list[ItemShape]) -> tuple[list[Tensor], list[Tensor]]:
    """Press each item's embeddings (N_i, D) with ``press``; returns the kept embeddings (k_i, D)
    and, per item, the (k_i,) indices of the tokens kept (ascending). Items of one shape are
    pressed together, as the transformers path presses them; a press whose draw depends on an
    item's place in the batch (``random``) presses each item alone, so what vLLM's scheduler
    batches together does not change an answer."""
    items = list(embeddings)
    if len(items) != len(shapes):
        raise RuntimeError(f"mmpress/vLLM: {len(items)} embedded items for {len(shapes)} item shapes")
    kept, indices = [None] * len(items), [None] * len(items)
    groups: dict = {}
    for i, shape in enumerate(shapes):
        if items[i].shape[0] != shape.n:
            raise RuntimeError(f"mmpress/vLLM: item {i} has {items[i].shape[0]} embeddings, expected {shape.n}")
        key = (i,) if press.name == "random" else shape
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        shape = shapes[members[0]]
        ctx = VisualContext(kind=shape.kind, cls_first=shape.cls_first)
        if shape.grid is not None:
            t, h, w = shape.grid
            ctx.grid, ctx.grid_thw = (t * h, w), shape.grid
        tokens = torch.stack([items[i] for i in members])
        out, index = press.press(tokens, ctx, kept_count(press, shape.n))
        for j, i in enumerate(members):
            kept[i], indices[i] = out[j].to(items[i].dtype), index[j]
    return kept, indices


def enable_position_recompute() -> None:
    """vLLM's CPU runner (0.32) never sets ``is_multimodal_pruning_enabled`` (its ``load_model``
    skips the GPU runner's), so a model's ``recompute_mrope_positions`` is never called there. Set
    it after loading for a model pressed by mmpress that uses M-RoPE; other models are untouched."""
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:  # a vLLM without these runners: nothing to patch
        return
    for runner in (CPUModelRunner, GPUModelRunner):
        load = runner.__dict__.get("load_model")
        if load is None or getattr(load, "_mmpress", False):
            continue

        def load_model(self, *args, _load=load, **kwargs):
            _load(self, *args, **kwargs)
            model = self.get_model() if hasattr(self, "get_model") else self.model
            if getattr(model, "mmpress_recomputes_positions", False):
                self.is_multimodal_pruning_enabled = True

        load_model._mmpress = True
        runner.load_model = load_model
