"""The press API: what a press is, where it acts, and how it is applied to a model.

A press is a small dataclass. It says WHAT to keep (``compress``: score, select or merge the
visual tokens of each image) and WHERE it acts (``stage``). Model knowledge lives in the
adapters (``mmpress.models``): a press never looks at a model class, it receives a batch of
visual tokens and a :class:`VisualContext` holding only the signals it declared in ``needs``.

    press = DivPrunePress(keep=64)
    with press(model):            # hooks registered ...
        model.generate(**inputs)  # ... and always removed on exit, exception or not

Stages: ``in_vision`` (:class:`VisionPress`) removes or merges tokens before or inside the vision
tower, so the tower itself runs on fewer; ``pre_llm`` presses the visual tokens before the language model; ``in_llm``
(:class:`LayerPress`) drops visual hidden states entering a decoder layer; ``kv``
(:class:`KVPress`) evicts visual KV-cache entries after prefill; ``mmpress.compose`` chains a
pre-LLM press with a later one. Later turns: a conversation continued on a pressed cache keeps
the first turn's selection (the cache holds only the kept tokens); a press whose selection reads
the prompt's text says so in its docstring.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mmpress.ops.select import gather_tokens, topk_indices
from mmpress.registry import get_adapter

#: signals a press may declare in ``needs``; adapters compute only the declared ones
SIGNALS = ("grid", "cls_attn", "vision_keys", "cls_attn_concat", "vision_keys_concat", "vision_features", "text",
           "llm_attn", "llm_keys", "llm_normed", "visual_inputs", "audio_features", "audio_energy",
           "audio_attn")
#: where a press acts, in the order a forward meets them (a composition follows this order)
STAGES = ("in_vision", "pre_llm", "in_llm", "kv")


@dataclass
class VisualContext:
    """Signals for one batch of M images with N visual tokens each.

    kind:         "image", "video" or "audio": what the M items are. Structural.
    parts:        the items' pieces (``models.base.Part``: start, length, (t, h, w) grid or None,
                  role), e.g. LLaVA-NeXT's "base" image then its "tiles"; () for a single piece.
                  Structural: the same for every item of a group.
    grid:         (h, w) patch grid of the N tokens, raster order (h * w == N).
    grid_thw:     (t, h, w) of a video: t frames (after the model's temporal patching), each an
                  h x w grid (after its spatial merge), tokens in raster order over (t, h, w),
                  t * h * w == N; M videos of the same grid. None for an image (read as t = 1
                  with ``grid``). Structural, like ``grid``: cheap, not a declared signal.
    cls_first:    True when token 0 of each image is the vision tower's [CLS] token (LLaVA's "full"
                  feature strategy), set with the vision signals. Structural, like ``grid``.
    cls_attn:     (M, N) softmax attention of the vision tower's [CLS] query over the patch
                  tokens, averaged over heads, in the layer whose output feeds the projector.
    cls_attn_layers: (M, L, N) the same at the vision layers a press lists in its ``layers`` field
                  (hidden-state indices, as ``vision_feature_layer``; VTC-CLS's ensemble).
    vision_keys:  (M, N, d) that layer's attention keys, averaged over heads (VisionZip's metric).
    cls_attn_concat: (M, N) the [CLS] row of ONE softmax over the heads-concatenated (full-width C)
                  query and keys, scaled by C^-1/2 (official PruMerge's attention), at the press's
                  vision layer: the one hidden-state index in its ``vision_layers``, else the
                  feature layer. Qwen-VL (no [CLS]): the attention each token receives, the same
                  full-width single softmax (see ``models/qwen_vl.py``).
    vision_keys_concat: (M, N, C) that layer's full-width keys (all heads concatenated, with the
                  bias: the ``k_proj`` output; official PruMerge's merge keys).
    vision_features: (M, N, d_vision) the vision tower's features as the projector receives them, one
                  row per visual token (LLaVA: the feature layer's hidden states, [CLS] dropped with
                  the "default" strategy; Qwen-VL: each token's merge group of patches, concatenated,
                  as the merger reads them). VisPruner's official similarity.
    text:         (M, T, D) input embeddings of the text tokens of the sample owning each image.
    text_mask:    (M, T) True where ``text`` holds a real token (prompts are ragged).
    token_index, text_index: (M, N), (M, T) each visual / text token's index in the sequence its row
                  runs on (0: the row's first token). Structural, given with ``text``.

    Language-model signals (``in_llm`` and ``kv`` presses), at the press's signal layer:
    llm_attn:     (M, N) softmax attention the tokens receive from the press's query rows (last
                  token, text tokens, an observation window or every prompt row), mean over
                  query rows and heads;
                  for a per-head KV press, M = images x KV heads and the mean is over the query
                  heads sharing each KV head.
    llm_attn_rows: (M, T, N) in-LLM presses whose query rows are the text tokens: each text row's
                  attention over the tokens (head mean); rows as in ``text_mask``.
    llm_keys:     (M, N, d) the tokens' rotated keys at that layer (per KV head for a per-head KV
                  press, else concatenated over KV heads); ``llm_text_keys`` (M, T, d) the text's.
    text_hidden:  (M, T, D) in-LLM: the text tokens' hidden states entering the pressed layer
                  (``text`` stays their input embeddings, as for a pre-LLM press).
    llm_normed:   (M, N, D) in-LLM: the tokens' hidden states entering the pressed layer after the
                  language model's final norm (DART's duplication space); ``llm_text_normed`` the text's.
    visual_inputs: (M, N0, D) in-LLM: the input embeddings of every visual token of the image as
                  it entered the language model (before any in-LLM stage dropped some).

    Audio signals (``kind == "audio"``; N tokens in time order, the audio encoder's output frames):
    audio_features: (M, N, d_audio) the audio encoder's output per token, as the projector receives it.
    audio_energy: (M, N) the mean log-mel energy of the input frames each token covers (silence is
                  low), from the feature extractor's input features.
    audio_attn:   (M, 2, N, N) the audio encoder's last-layer softmax attention between the clip's
                  frames, pooled to tokens as SA-MAP pools it (a query token: the mean of its
                  frames' rows; a key token: the sum of its frames' columns), after the max over
                  heads ([:, 0]) and after the mean over heads ([:, 1]).
    """

    grid: tuple[int, int] | None = None
    parts: tuple = ()
    kind: str = "image"
    grid_thw: tuple[int, int, int] | None = None
    cls_first: bool = False
    cls_attn: Tensor | None = None
    cls_attn_layers: Tensor | None = None
    vision_keys: Tensor | None = None
    cls_attn_concat: Tensor | None = None
    vision_keys_concat: Tensor | None = None
    vision_features: Tensor | None = None
    text: Tensor | None = None
    text_mask: Tensor | None = None
    token_index: Tensor | None = None
    text_index: Tensor | None = None
    llm_attn: Tensor | None = None
    llm_attn_rows: Tensor | None = None
    llm_keys: Tensor | None = None
    llm_text_keys: Tensor | None = None
    text_hidden: Tensor | None = None
    llm_normed: Tensor | None = None
    llm_text_normed: Tensor | None = None
    visual_inputs: Tensor | None = None
    audio_features: Tensor | None = None
    audio_energy: Tensor | None = None
    audio_attn: Tensor | None = None

    def require(self, name: str) -> Tensor | tuple[int, int]:
        value = getattr(self, name)
        if value is None:
            raise ValueError(
                f"this press needs the '{name}' signal, which the model's adapter could not provide "
                f"(e.g. a tiled image has no single grid); choose another press"
            )
        return value


@dataclass
class Press:
    """Base press. Budget: ``keep`` visual tokens per image, or ``keep_ratio`` of them."""

    keep: int | None = None
    keep_ratio: float | None = None

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "pre_llm"
    needs: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[str] = ""
    needs_budget: ClassVar[bool] = True
    #: video-aware: uses the temporal structure of ``VisualContext.grid_thw`` (``mmpress list``)
    video: ClassVar[bool] = False
    #: reads an audio clip as a 1 x N raster of its frames in time order where it needs "grid"
    #: (uniform, pool): a family with audio runs it without a patch grid
    audio_line: ClassVar[bool] = False
    #: the position ids the official code gives a pre-LLM press's kept tokens on a 1-D RoPE model,
    #: the adapter's default (``positions=None``): "reindex" (0..L'-1, what LLaVA's
    #: ``prepare_inputs_labels_for_multimodal`` gives any sequence pruned before the language model)
    #: or "keep" (the original ids, e.g. FastVID's ``position_ids = keep_indexs``)
    official_positions: ClassVar[str] = "reindex"

    def __post_init__(self):
        budget = {k: v for k, v in (("keep", self.keep), ("keep_ratio", self.keep_ratio)) if v is not None}
        if not self.needs_budget:
            if budget:
                given = ", ".join(f"{k}={v!r}" for k, v in budget.items())
                raise ValueError(f"press {self.name or type(self).__name__!r} takes no budget: drop {given}, "
                                 "or pick a press that compresses to a budget")
            return
        if not budget:
            raise ValueError(f"{type(self).__name__} needs a budget: pass keep=64 or keep_ratio=0.25")
        if len(budget) == 2:
            raise ValueError("pass either keep= or keep_ratio=, not both")
        if self.keep is not None and (not isinstance(self.keep, int) or isinstance(self.keep, bool) or self.keep <= 0):
            raise ValueError(f"keep must be a positive int (tokens per image), e.g. keep=64; got {self.keep!r}")
        if self.keep_ratio is not None and (not isinstance(self.keep_ratio, (int, float))
                                            or isinstance(self.keep_ratio, bool) or not 0 < self.keep_ratio <= 1):
            raise ValueError(f"keep_ratio must be a number in (0, 1], e.g. keep_ratio=0.25; got {self.keep_ratio!r}")

    @property
    def vision_layers(self) -> tuple[int, ...]:
        """Vision layers (hidden-state indices) whose [CLS] attention the press reads in
        ``ctx.cls_attn_layers`` beyond the feature layer; none by default."""
        return ()

    # ---- budget -------------------------------------------------------------------------
    def budget(self, n: int) -> int:
        """Tokens to keep out of ``n``; ``n`` (a no-op) when the budget is not below it."""
        if not self.needs_budget:
            return n
        k = self.keep if self.keep is not None else max(1, math.ceil(self.keep_ratio * n))
        if k >= n:
            if self.keep is not None and k > n:
                warnings.warn(
                    f"{type(self).__name__}(keep={k}) keeps every one of the {n} visual tokens: no-op",
                    stacklevel=3,
                )
            return n
        return k

    # ---- what to keep -------------------------------------------------------------------
    def press(self, tokens: Tensor, ctx: VisualContext, k: int | None = None) -> tuple[Tensor, Tensor]:
        """Compress ``tokens`` (M, N, D) to (M, k, D) (``k``: the budget unless a stage gives one).
        Returns the tokens and, per kept token, the index (M, k) of the original token whose
        position it takes (sorted ascending)."""
        m, n, _ = tokens.shape
        k = self.budget(n) if k is None else k
        if k >= n:
            return tokens, torch.arange(n, device=tokens.device).expand(m, n)
        if k == 0:
            return tokens[:, :0], torch.zeros(m, 0, dtype=torch.long, device=tokens.device)
        out, index = self.compress(tokens, ctx, k)
        if out.shape[:2] != (m, k) or index.shape != (m, k):
            raise RuntimeError(f"{type(self).__name__} returned {tuple(out.shape)}, expected ({m}, {k}, D)")
        index, order = index.sort(dim=1)
        return gather_tokens(out, order), index

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # ---- where: applying to a model -----------------------------------------------------
    def __call__(self, model: torch.nn.Module, **adapter_options):
        """Hooks this press into ``model`` for a `with` block; ``adapter_options`` go to the model's
        adapter (e.g. ``positions="reindex"``). Hooks are removed on exit, exception or not; the
        returned context may be entered again after it exits (``models.base.Applied``)."""
        return get_adapter(model, **adapter_options).context(self)


@dataclass
class ScorerPress(Press):
    """Keeps the k highest-scoring tokens of each image; subclasses write ``score`` only."""

    def score(self, tokens: Tensor, ctx: VisualContext) -> Tensor:  # (M, N), higher is kept
        raise NotImplementedError

    def compress(self, tokens, ctx, k):
        index = topk_indices(self.score(tokens, ctx), k)
        return gather_tokens(tokens, index), index


@dataclass
class SelectorPress(Press):
    """Keeps the tokens an algorithm selects (greedy diversity, coverage, ...)."""

    def select(self, tokens: Tensor, ctx: VisualContext, k: int) -> Tensor:  # (M, k) indices
        raise NotImplementedError

    def compress(self, tokens, ctx, k):
        index = self.select(tokens, ctx, k)
        return gather_tokens(tokens, index), index


@dataclass
class VisionPress(Press):
    """An ``in_vision`` press: fewer tokens before or inside the vision tower, so the tower, the
    projector and the language model all run on fewer. How it acts on a tower is its ``mode``:
    "merge" (merges tokens inside the tower's blocks: ToMe), "drop" (removes patches before the
    tower: duplicate video patches) or "resize" (a smaller input: downsampling). The family's
    adapter runs it (``Adapter.vision_modes`` says which modes it supports, ``vision_hooks`` does
    it) and reports, per item, which of its placeholder tokens the features the language model
    receives stand for (a merged token takes the position of its representative); the core then
    drops the other placeholders before the language model, keeping the kept tokens' original
    position ids. A later pre-LLM press (``compose``) sees only the kept tokens.

    The press says WHAT: ``merge_plan`` / ``drop_plan`` / ``target_size``, as its mode needs; the
    family says WHERE (its blocks, its patch layout)."""

    stage = "in_vision"
    mode: ClassVar[str] = "merge"
    official_positions = "keep"


@dataclass
class LayerPress(ScorerPress):
    """An ``in_llm`` press: drops visual hidden states entering decoder layer ``layer`` (or each
    layer of ``layers()``); the dropped tokens are gone for every later layer and from those
    layers' KV cache, layers before keep their full cache. Kept tokens keep their position ids.

    ``score`` reads ``ctx.llm_attn``: the attention the visual tokens receive from the ``query``
    rows ("last": the last token; "text": every text token; "window": the last ``window`` tokens;
    "all": every prompt token)
    at decoder layer ``signal_layer(layer)``, from its queries and keys (the model keeps running
    with SDPA). The budget counts visual tokens per image from ``layer`` on; the bench reports
    it with the layer-averaged count.
    """

    stage = "in_llm"
    needs = ("llm_attn",)
    query: ClassVar[str] = "last"
    window: ClassVar[int] = 1

    def __post_init__(self):
        super().__post_init__()
        self._check_layers()

    @staticmethod
    def _check_positions(positions) -> None:
        """The values of an in-LLM press's own ``positions`` field (PyramidDrop, SparseVLM)."""
        if positions not in (None, "reindex", "keep"):
            raise ValueError("positions must be None (the official numbering where positions are 1-D), 'reindex' "
                             f"(official: renumbered 0..L'-1) or 'keep' (original ids); got {positions!r}")

    def _check_layers(self) -> None:
        layers = self.layers()
        if not layers or any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in layers) \
                or list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be ascending ints >= 1 (decoder layers; layer 0 is the pre_llm stage), "
                             f"got {layers!r}")

    def layers(self) -> tuple[int, ...]:
        """Decoder layers whose input this press presses, ascending (default: ``self.layer``)."""
        return (self.layer,)

    def budgets(self, n: int) -> tuple[int, ...]:
        """Visual tokens of an image of ``n`` (as it enters the LM) kept at each of ``layers()``."""
        return (self.budget(n),)

    def signal_layer(self, layer: int) -> int:
        """The decoder layer whose attention scores the tokens pressed at ``layer``."""
        return layer

    def score(self, tokens: Tensor, ctx: VisualContext) -> Tensor:
        return ctx.require("llm_attn")


@dataclass
class KVPress(ScorerPress):
    """A ``kv`` press: after prefill, evicts (or merges) the visual entries of every layer's KV
    cache, keeping ``keep`` per image in each layer (per KV head when ``per_head``); decoding then
    reads the shorter cache. The prefill itself (and so the first generated token) is unpressed.

    ``press_kv`` receives one layer's keys and values of the visual tokens, (M, N, d) with M =
    images x KV heads (per-head) and ``ctx.llm_attn`` (M, N) from the last ``window`` tokens.
    """

    window: int = 32

    stage = "kv"
    needs = ("llm_attn",)
    query: ClassVar[str] = "window"
    per_head: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"window must be a positive int (query rows), got {self.window!r}")

    def score(self, tokens: Tensor, ctx: VisualContext) -> Tensor:
        return ctx.require("llm_attn")

    def press_kv(self, keys: Tensor, values: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """(M, N, d) keys and values -> (M, k, d) each and the (M, k) index of the entry each
        takes the place of (sorted ascending). Default: the k best-scored entries."""
        index = topk_indices(self.score(keys, ctx), k)
        return gather_tokens(keys, index), gather_tokens(values, index), index


# ---- registry ---------------------------------------------------------------------------
PRESSES: dict[str, type[Press]] = {}


def register(cls: type[Press]) -> type[Press]:
    if not cls.name or cls.name in PRESSES:
        raise ValueError(f"press name {cls.name!r} is empty or already registered")
    PRESSES[cls.name] = cls
    return cls


def list_presses(stage: str | None = None) -> list[str]:
    """Sorted names of every registered press (of ``stage`` only, if given)."""
    return sorted(name for name, cls in PRESSES.items() if stage in (None, cls.stage))


def get_press(name: str, **kwargs) -> Press:
    """Instantiate a press by name: ``get_press("divprune", keep=64)``."""
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}; {press_suggestion(name)}")
    return PRESSES[name](**kwargs)


def press_suggestion(name) -> str:
    """``did you mean 'divprune'? choose one of: ...``: the registered names closest to a mistyped
    one (difflib's ratio, case ignored) first, then every name."""
    import difflib

    names = list_presses()
    lowered = {n.lower(): n for n in names}
    close = [lowered[n] for n in difflib.get_close_matches(str(name).lower(), lowered, n=3, cutoff=0.6)]
    every = f"choose one of: {', '.join(names)}"
    if not close:
        return every
    *first, last = map(repr, close)
    return f"did you mean {', '.join(first) + ' or ' if first else ''}{last}? {every}"
