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
#: signals a pressed vLLM model gives any press: the item's tokens, its patch grid, and the text
#: of the prompt owning it (input embeddings of its text tokens and their sequence indices)
BASE_SIGNALS = frozenset({"grid", "text"})
#: the per-item fields the processor adds for a text-guided press (``attach_text``)
TEXT_FIELDS = ("mmpress_text_ids", "mmpress_text_index", "mmpress_token_start")


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
                         "e.g. divprune, tome, random, uniform, pool, dart or cdpruner")


def check_text_cache(press: Press, model_config) -> None:
    """A text-guided press reads the prompt in each item's processed fields, which vLLM's
    multi-modal processor cache would hand from one request to the next: refuse it at start-up."""
    if "text" not in press.needs:
        return
    mm = model_config.multimodal_config
    if mm is not None and getattr(mm, "mm_processor_cache_gb", 0):
        raise ValueError(f"mmpress/vLLM: {press.name} reads the prompt's text, which vLLM's multi-modal processor "
                         "cache would share between requests of one image: pass mm_processor_cache_gb=0")


class PressedProcessor:
    """Mixin of a pressed model's vLLM processor: checks the press when vLLM builds the processor
    (in the front-end process, so ``LLM(...)`` raises the ValueError itself) and cuts the
    placeholder runs to the press's budget."""

    family = ""
    signals = BASE_SIGNALS

    def __init__(self, info, *args, **kwargs):
        super().__init__(info, *args, **kwargs)
        press = press_of(info.get_hf_config())
        if press is not None:
            check_press(press, self.family, self.signals)
            check_text_cache(press, info.ctx.model_config)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        return pressed_updates(updates, press_of(self.info.get_hf_config()))


def attach_text(out: dict, press: Press | None, counts: dict[str, list[int]]) -> dict:
    """For a text-guided press: gives each item of a processed request (``out``, vLLM's
    ``MultiModalInput``) its prompt's text token ids, their indices in the UNPRESSED sequence and
    the item's first index there (``counts``: each item's unpressed token count, per modality),
    the transformers path's ``text`` / ``text_index`` / ``token_index``; and salts each item's hash
    with the prompt, so vLLM's encoder cache never serves one prompt's pressing to another."""
    if press is None or "text" not in press.needs:
        return out
    import hashlib

    from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem

    ids = torch.tensor(out["prompt_token_ids"], dtype=torch.long)
    media = torch.zeros(ids.numel(), dtype=torch.bool)
    extra = torch.zeros(ids.numel() + 1, dtype=torch.long)  # unpressed tokens the pressing removed before a column
    ranges = [(m, i, r) for m, rs in out["mm_placeholders"].items() for i, r in enumerate(rs)]
    for modality, i, r in ranges:
        media[r.offset:r.offset + r.length] = True
        extra[r.offset + r.length:] += counts[modality][i] - r.length
    cols = (~media).nonzero()[:, 0]
    text_ids, text_index = ids[cols], cols + extra[cols]
    salt = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    for modality, i, r in ranges:
        item = out["mm_kwargs"][modality][i]
        if item is None:
            raise ValueError("mmpress/vLLM: a text-guided press needs every item processed: pass mm_processor_cache_gb=0")
        start = torch.tensor([r.offset + int(extra[r.offset])])
        for name, data in zip(TEXT_FIELDS, (text_ids, text_index, start)):
            item[name] = MultiModalFieldElem(data=data, field=MultiModalBatchedField())
        out["mm_hashes"][modality][i] = f"{out['mm_hashes'][modality][i]}-mmpress-{salt}"
    return out


def text_of(kwargs: dict, embed, count: int) -> list[tuple[Tensor, Tensor, Tensor]] | None:
    """Each item's (text embeddings (T, D), their unpressed sequence indices (T,), its first
    token's index) from the fields ``attach_text`` added; ``embed`` embeds token ids."""
    if TEXT_FIELDS[0] not in kwargs:
        return None

    def rows(value):
        return [v.reshape(-1) for v in (value.unbind(0) if isinstance(value, Tensor) else value)]

    ids, index, start = (rows(kwargs[name]) for name in TEXT_FIELDS)
    if len(ids) != count:
        raise RuntimeError(f"mmpress/vLLM: text for {len(ids)} items, {count} embedded")
    return [(embed(i.long()), x.long(), s.long()[0]) for i, x, s in zip(ids, index, start)]


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


def press_items(press: Press, embeddings, shapes: list[ItemShape], text=None) -> tuple[list[Tensor], list[Tensor]]:
    """Press each item's embeddings (N_i, D) with ``press``; returns the kept embeddings (k_i, D)
    and, per item, the (k_i,) indices of the tokens kept (ascending). ``text``: per item, what
    :func:`text_of` gives (required by a text-guided press). Items of one shape are
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
        if "text" in press.needs:
            if text is None:
                raise RuntimeError("mmpress/vLLM: a text-guided press got no text (the processor adds it)")
            _text_context(ctx, [text[i] for i in members], shape.n, tokens)
        out, index = press.press(tokens, ctx, kept_count(press, shape.n))
        for j, i in enumerate(members):
            kept[i], indices[i] = out[j].to(items[i].dtype), index[j]
    return kept, indices


def _text_context(ctx: VisualContext, text: list, n: int, tokens: Tensor) -> None:
    """``ctx.text`` (M, T, D) left-aligned and padded, ``text_mask``, ``text_index`` and
    ``token_index`` (M, N): as the transformers path's pre-LLM stage gives them."""
    width = max(t.shape[0] for t, _, _ in text)
    m, device = len(text), tokens.device
    ctx.text = tokens.new_zeros(m, width, text[0][0].shape[-1])
    ctx.text_mask = torch.zeros(m, width, dtype=torch.bool, device=device)
    ctx.text_index = torch.zeros(m, width, dtype=torch.long, device=device)
    for j, (embeds, index, _) in enumerate(text):
        ctx.text[j, :embeds.shape[0]] = embeds.to(tokens.dtype)
        ctx.text_mask[j, :embeds.shape[0]] = True
        ctx.text_index[j, :index.shape[0]] = index.to(device)
    ctx.token_index = torch.stack([start.to(device) for _, _, start in text])[:, None] + torch.arange(n, device=device)


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
