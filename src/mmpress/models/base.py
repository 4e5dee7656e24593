"""The family-neutral adapter core: hook lifecycle, pressing a prefill, compacting and re-padding
the batch, and mapping decoding and later turns onto the pressed KV cache.

A family file (``llava.py``, ``qwen_vl.py``) subclasses :class:`Adapter` and says only where the
visual tokens are (:meth:`Adapter.visual_items`: one :class:`Item` per image or video, in the
order their features fill the placeholders), which signals its vision tower gives
(:meth:`Adapter.signal_hooks` / :meth:`Adapter.fill_signals`) and how its positions work.

How a ``pre_llm`` press is applied, with hooks only (no model source is edited):
1. a forward pre-hook on the VLM records the prompt and the visual items, and checks them
   against each other (the one host read of a pressed prefill: the per-row placeholder counts,
   taken before any GPU work of the forward is queued);
2. the family's hooks on the vision tower record the signals a press declared;
3. a forward pre-hook on the language model takes each item's tokens out of ``inputs_embeds``,
   presses items of the same shape together, and rebuilds ``inputs_embeds``, ``attention_mask``
   and ``position_ids`` with the dropped tokens removed, rows re-padded on the LEFT (never
   truncated), without host syncs;
4. a forward hook on the language model remembers which KV cache holds the pressed prefill;
   later calls on that cache (decoding steps, a later turn's new tokens) get the pressed mask and
   their original position ids mapped onto it.

A pressed cache outlives its `with` block (generate returns it) but is valid only under the press
that made it: it is recorded, weakly, with that press, and a call on it from another press, or
from the bare model (a guard hook left on the model while such caches are alive), raises.

Position ids: by default (``positions=None``) a pre-LLM press gets the numbering its official
code gives the kept tokens (``Press.official_positions``): "reindex" numbers the pressed sequence
0..L'-1, as LLaVA's ``prepare_inputs_labels_for_multimodal`` does for any press that prunes before
the language model; "keep" keeps the ORIGINAL position ids (1-D, or M-RoPE's (3 or 4, B, L)), as
FastVID and EVS do. "reindex" is defined for 1-D RoPE only: a family without it (M-RoPE) keeps
the ids, as the official Qwen-VL ports do. In-LLM and KV stages start from the original ids
(PyramidDrop and SparseVLM renumber by their own ``positions`` field), so a press or composition
with such a stage resolves to "keep". ``positions="keep"`` / ``"reindex"`` overrides the default.
The choice is carried into decoding.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmpress.flops import PrefillFlops
from mmpress.models.protocol import CACHE_NAMES, cache_length, protocol
from mmpress.models.layout import input_layout
from mmpress.models.stages import KeepSelected, KVStage, LayerStage, Prefill, PreStage, Stats, VisionStage, _Prefill
from mmpress.presses.base import STAGES, Press, VisualContext
from mmpress.registry import family  # noqa: F401  (family files: ``from mmpress.models.base import family``)

CONTINUE = ("A pressed cache holds fewer entries than the tokens it stands for. Run generate on the whole "
            "conversation under the press without past_key_values, or feed only the new turn's tokens: "
            "model(input_ids=new_ids, attention_mask=full_mask, past_key_values=cache)")
STALE = ("this KV cache was pressed by mmpress: it holds only the kept tokens, so it is valid only inside the "
         "`with press(model):` block that made it (without that press's hooks the model reads it as the whole "
         "prompt and answers wrongly). Re-enter the same press on the same model with the cache "
         "(`with press(model): model.generate(..., past_key_values=cache)`), or re-run the conversation without it")
STAGE_CLASSES = {"in_vision": VisionStage, "pre_llm": PreStage, "in_llm": LayerStage, "kv": KVStage}  # in order
_PRESSED_MODELS: weakref.WeakSet = weakref.WeakSet()  # models a press is applied to right now
# Pressed KV caches outlive the `with` block that made them (generate returns them). Each is
# recorded here with what continuing it needs, weakly (a cache dropped by the user is forgotten);
# a model holding live pressed caches outside any press gets a guard hook (see ``_guard``).
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KV cache -> _Entry
_OWNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # VLM -> WeakSet of its pressed caches
_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # VLM -> its guard hook's handle


@dataclass(frozen=True)
class Part:
    """A piece of an item's pressable tokens: ``length`` tokens from ``start`` (indices over the
    pressable tokens, ``Item.fixed`` removed), their (t, h, w) grid (None if not a raster), and
    their ``role`` (e.g. LLaVA-NeXT's "base" image and its "tiles")."""

    start: int
    length: int
    grid: tuple[int, int, int] | None
    role: str


@dataclass(frozen=True)
class Item:
    """One medium (image, video, audio) as the language model sees it: ``length`` placeholder
    tokens of ``token_id``; ``grid`` the (t, h, w) grid of its pressable tokens (t = 1 for an
    image; None if they form no raster); ``source`` its index in the batch the tower encoded
    (generate repeats encoded items per beam); ``kind`` "image", "video" or "audio"; ``fixed`` the
    indices (in its ``length`` tokens) every press keeps in place and never sees (LLaVA-NeXT's
    newline tokens); ``parts`` the pieces of its pressable tokens (:class:`Part`)."""

    token_id: int
    length: int
    grid: tuple[int, int, int] | None
    source: int
    kind: str = "image"
    fixed: tuple[int, ...] = ()
    parts: tuple[Part, ...] = ()

    def __post_init__(self):
        if self.kind not in MEDIA:
            raise ValueError(f"an item's kind is one of {MEDIA}, got {self.kind!r}")

    @property
    def shape(self) -> tuple:
        """What items pressed together share."""
        return (self.token_id, self.length, self.grid, self.fixed, self.parts)


MEDIA = ("image", "video", "audio")
LLM_SIGNALS = frozenset({"llm_attn", "llm_keys", "llm_normed", "visual_inputs"})  # every family's core gives them
VISION_SIGNALS = frozenset({"grid", "cls_attn", "vision_keys", "cls_attn_concat", "vision_keys_concat",
                            "vision_features", "text"})


@dataclass
class _Entry:
    """A pressed KV cache: what continuing it needs, and who may continue it (the same press,
    with the same options, on the same model)."""

    prefill: _Prefill
    vlm: weakref.ref
    press: object
    positions: str


def _entry(cache) -> _Entry | None:
    try:
        return _CACHES.get(cache) if cache is not None else None
    except TypeError:  # not weak-referenceable (a legacy tuple cache): never pressed
        return None


def _same_press(a, b) -> bool:
    """Whether ``b`` is the press (or composition) ``a``, or an equal one (same class and fields)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    try:
        return bool(getattr(a, "presses", a) == getattr(b, "presses", b))
    except Exception:  # a field that does not compare to a bool
        return False


def _cache_in(kwargs: dict):
    return next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)


def _guard(module, args, kwargs):
    """Forward pre-hook left on a VLM while it holds live pressed caches and no press is applied:
    one dictionary lookup per call; removes itself once those caches are gone."""
    if module in _PRESSED_MODELS:
        return  # the press applied now checks the cache (Adapter._capture_inputs)
    entry = _entry(_cache_in(kwargs))
    if entry is not None:
        raise ValueError(STALE)
    if not len(_OWNED.get(module, ())):
        handle = _GUARDS.pop(module, None)
        if handle is not None:
            handle.remove()


class _Pressed:
    """The pressed KV caches an adapter continues: those its press made on its model, in this
    `with` block or an earlier one (``Adapter.pressed[cache]`` -> :class:`_Prefill`)."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    def get(self, cache, default=None):
        entry = _entry(cache)
        return entry.prefill if entry is not None and self.adapter.continues(entry) else default

    def __contains__(self, cache) -> bool:
        return self.get(cache) is not None

    def __getitem__(self, cache) -> _Prefill:
        pre = self.get(cache)
        if pre is None:
            raise KeyError(cache)
        return pre

    def __setitem__(self, cache, pre: _Prefill) -> None:
        adapter = self.adapter
        _CACHES[cache] = _Entry(pre, weakref.ref(adapter.vlm), adapter.outer, adapter.positions)
        _OWNED.setdefault(adapter.vlm, weakref.WeakSet()).add(cache)


@dataclass
class _State:
    input_ids: Tensor | None = None
    items: list[Item] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # the batch row of each item (host integers)
    row_lengths: list[int] = field(default_factory=list)  # each row's real length (host integers)
    positions_from_cache: bool = False  # the model numbers new tokens from the (pressed) cache length
    run: Prefill | None = None  # the prefill with media in flight


class Run:
    """What ``with press(model) as run:`` gives: the results of the pressed calls of the block.
    ``run.stats`` is the :class:`~mmpress.models.stages.Stats` of the last prefill with media
    (None before one), ``run.prefills`` those of every one, in order."""

    def __init__(self):
        self.prefills: list[Stats] = []

    @property
    def stats(self) -> Stats | None:
        return self.prefills[-1] if self.prefills else None

    def __repr__(self) -> str:
        return f"Run(prefills={len(self.prefills)}, stats={self.stats})"


def encoded_sources(encoded: list[Tensor]) -> list[int] | None:
    """Which encoded item each of ``encoded`` is. ``generate`` encodes the images once, then
    repeats the per-item feature views for beams and ``num_return_sequences``; the views of one
    encoder output share a storage, so an item is identified by its offset in that storage."""
    storage = encoded[0].untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() != storage for t in encoded):
        return None
    starts = sorted({t.data_ptr() for t in encoded})
    return [starts.index(t.data_ptr()) for t in encoded]


class Adapter:
    """Applies presses to a vision-language model. ``positions``: None (default: the press's
    official numbering, see the module docstring), "keep" or "reindex"."""

    family: ClassVar[str] = ""
    #: transformers ``config.model_type`` values this adapter applies to (the registry's keys)
    model_types: ClassVar[tuple[str, ...]] = ()
    #: the transformers classes it adapts (error messages, README)
    classes: ClassVar[tuple[str, ...]] = ()
    #: the ``VisualContext`` signals it provides (a press runs where all it ``needs`` are)
    signals: ClassVar[frozenset] = LLM_SIGNALS
    #: what its signals are, where not what their name says (``mmpress list``)
    notes: ClassVar[str] = ""
    #: media sizes per prompt row of the tests' batches: {"single": [[(h, w)]], "ragged": ...}; a medium is
    #: (h, w) px (an image), (frames, h, w) (a video) or (seconds,) (an audio clip): its tuple's length says its kind
    example_rows: ClassVar[dict] = {}
    #: the medium of each kind a "real" bench prompt holds: {"image": (336, 336), "video": (16, 448, 448)}
    bench_media: ClassVar[dict] = {}
    #: the VLM's attribute holding its language model (SmolVLM / Idefics3: "text_model")
    language_model_attr: ClassVar[str] = "language_model"
    position_modes: ClassVar[tuple[str, ...]] = ("keep", "reindex")
    #: how its vision tower runs an in-vision press (``VisionPress.mode``: "merge", "drop", "resize")
    vision_modes: ClassVar[frozenset] = frozenset()
    #: generate(whole conversation, past_key_values=pressed cache) continues it (see _continue_generate)
    continues_generate: ClassVar[bool] = True
    #: how a later turn continues a pressed cache (error messages)
    continue_hint: ClassVar[str] = CONTINUE

    def __init__(self, model: nn.Module, positions: str | None = None):
        if positions is not None and positions not in self.position_modes:
            raise ValueError(f"positions must be one of {self.position_modes} for {self.family} models, "
                             f"got {positions!r}")
        self.model = model
        # *ForConditionalGeneration wraps the VLM in .model; a bare VLM is accepted too
        inner, name = getattr(model, "model", None), self.language_model_attr
        self.vlm = inner if hasattr(inner, name) else model
        if not hasattr(self.vlm, name):
            raise ValueError(f"{type(model).__name__} does not look like a transformers {self.family} model")
        # every weight on meta: never loaded, unless accelerate offloads them (a device map, or
        # disk_offload / cpu_offload, whose hooks (`_hf_hook`) load each module's weights for its forward)
        first = next(model.parameters(), None)
        if first is not None and first.is_meta and all(p.is_meta for p in model.parameters()) \
                and not hasattr(model, "hf_device_map") and not any(hasattr(m, "_hf_hook") for m in model.modules()):
            raise ValueError(f"the {type(model).__name__}'s weights are on the meta device (built without loading "
                             "them, e.g. under torch.device('meta') or init_empty_weights): load real weights before "
                             "pressing, e.g. from_pretrained(path, device_map='auto'), or model.to_empty(device=...) "
                             "then load_state_dict(...)")
        self.config = self.vlm.config
        self.lm = getattr(self.vlm, name)  # the language model every stage hooks
        self.protocol = protocol(self.vlm, self.lm)
        self.requested_positions = positions  # None: each press's official numbering (``resolve_positions``)
        self.positions = positions or "keep"
        self.state = _State()
        self.pressed = _Pressed(self)  # KV cache -> _Prefill, for the caches this press made on this model
        self.results = Run()  # the results of the `with` block applied now
        self.stage_objs: list = []  # the stages of the press applied now, in stage order
        self.outer = None  # the press (or composition) applied now
        self.stages: dict[str, Press] = {}
        self._uncached: tuple | None = None  # (B, L) of the last prefill run without a KV cache
        self._warned = False

    # ---- what a family file says ------------------------------------------------------------
    token_ids: tuple[int, ...] = ()  # placeholder ids of the visual tokens (set by the family)

    def visual_items(self, args, kwargs) -> list[Item]:
        """The images / videos of this VLM forward, in placeholder order (host facts only)."""
        raise NotImplementedError

    def signal_hooks(self, press: Press) -> list:
        """Hooks on the vision tower recording the signals ``press.needs`` (default: none)."""
        return []

    def fill_signals(self, press: Press, ctx: VisualContext, items: list[Item]) -> None:
        """Put the vision signals of ``items`` (one group of equal shape) into ``ctx``."""

    def vision_hooks(self, press: Press, stage) -> list:
        """Hooks running the in-vision ``press`` in the tower, reporting to ``stage``
        (:class:`~mmpress.models.stages.VisionStage`): its ``new_call()`` per tower call, ``record``
        per encoded item, ``count_blocks``. The features must still fill every placeholder."""
        raise ValueError(f"the {self.family} adapter runs no press inside its vision tower: pick a pre_llm press")

    def press_extras(self, kwargs: dict, keep: Tensor, visual: Tensor, src: Tensor, new_mask: Tensor,
                     kept_visual: int) -> dict:
        """Press what else the language model receives per visual token (e.g. Qwen3-VL's DeepStack
        features) with the same kept tokens. ``keep``/``visual`` (B, L) masks of the unpressed
        prompt, ``src``/``new_mask`` the compaction, ``kept_visual`` kept visual tokens in all."""
        return kwargs

    def check_stages(self, stages: dict[str, Press]) -> None:
        """Raise if this family cannot run a press at its stage (default: every stage runs)."""

    @classmethod
    def runs(cls, press: type[Press] | Press) -> bool:
        """Whether this family provides every signal ``press`` needs (``mmpress list``) and, for an
        in-vision press, runs its mode."""
        if press.stage == "in_vision" and press.mode not in cls.vision_modes:
            return False
        return set(press.needs) - cls.line_signals(press) <= cls.signals

    @classmethod
    def line_signals(cls, press: type[Press] | Press) -> set[str]:
        """Signals ``press`` needs that this family's audio clips stand in for: "grid", for a press
        that reads a clip as a 1 x N raster (``Press.audio_line``) on a family with audio."""
        return {"grid"} if press.audio_line and "audio_features" in cls.signals else set()

    def attention_layers(self) -> list[int]:
        """The decoder layers with softmax attention (default: all): in-LLM presses read their
        signal there and KV presses evict only there (Qwen3.5's linear-attention layers have none)."""
        return list(range(len(self.lm.layers)))

    def encoded_items(self, kwargs: dict, kind: str, token_id: int, describe) -> list[Item]:
        """The items of ``kind`` that ``generate`` encoded before this forward (``mm_encoder_outputs``),
        each once per beam / returned sequence: ``describe(features, source)`` -> a dict of the Item
        fields ``length``, ``grid`` (and ``fixed``, ``parts`` where the family has them) of one item,
        from its feature tensor and its index in the encoded batch. [] when there are none."""
        features, sources = self.encoded_media(kwargs, kind)
        described = {s: describe(t, s) for s, t in enumerate(features)}
        return [Item(token_id=token_id, source=s, kind=kind, **described[s]) for s in sources]

    def encoded_media(self, kwargs: dict, kind: str) -> tuple[list[Tensor], list[int]]:
        """The features of each item of ``kind`` that ``generate`` encoded (one tensor per encoded
        item, in source order) and the source of each of the forward's items (repeated per beam /
        returned sequence); ([], []) when there are none."""
        encoded = self.protocol.encoded_in(kwargs, kind)
        if not encoded:
            return [], []
        sources = encoded_sources(encoded) or list(range(len(encoded)))
        first: dict[int, Tensor] = {}
        for t, s in zip(encoded, sources):
            first.setdefault(s, t)
        return [first[s] for s in sorted(first)], sources

    # ---- what a family file says about cost and shapes (bench-cost, mmpress run, tests) ------------
    @classmethod
    def prefill_flops(cls, config, inputs: dict, seq_len: int, layer_seq_len=None) -> PrefillFlops:
        """FLOPs of the prefill of ``inputs`` with ``seq_len`` LM tokens per row (``mmpress.flops``)."""
        raise NotImplementedError(f"the {cls.family} family does not count its FLOPs")

    @classmethod
    def build(cls, size: str = "tiny", seed: int = 0, attn: str = "sdpa", model_type: str | None = None,
              **overrides) -> nn.Module:
        """A random model of the family's real class: "tiny" (tests) or "real" (its released
        shape, scaled for a CPU: ``bench-cost --arch``); ``overrides`` change config sizes."""
        raise NotImplementedError(f"the {cls.family} family has no random model shapes")

    @classmethod
    def prompts(cls, model: nn.Module, rows: list, kind: str = "image", seed: int = 0, first_row: int = 0) -> dict:
        """A left-padded batch as the family's processor lays it out: row i (numbered ``first_row``
        + i) holds media of the sizes ``rows[i]`` ((h, w) px, a video (frames, h, w)); a medium's
        pixels and a row's text depend only on (seed, its row number, its index in the row), so
        ``prompts(model, [rows[i]], first_row=i)`` is row i alone."""
        raise NotImplementedError(f"the {cls.family} family has no example prompts")

    @classmethod
    def encode(cls, model: nn.Module, inputs: dict) -> None:
        """Run the tower and projector alone over every medium of ``inputs`` (``bench-cost``'s
        vision / language-model split)."""
        raise NotImplementedError(f"the {cls.family} family cannot run its tower alone")

    def numbers_from_cache(self, kwargs: dict) -> bool:
        """Whether the model will number this call's new tokens from the cache length (pressed
        coordinates) instead of the caller's mask / positions (original coordinates)."""
        return False

    # ---- hooks ------------------------------------------------------------------------------
    def context(self, press) -> Applied:
        """What ``press(model)`` returns: see :class:`Applied`."""
        return Applied(self, press)

    @contextmanager
    def apply(self, press):
        """Hooks ``press`` (or a composition: ``mmpress.compose``) into the model for the block."""
        if self.vlm in _PRESSED_MODELS:
            raise ValueError("a press is already applied to this model: presses do not nest (the second would "
                             "see the first's tokens or none); exit the first `with press(model):` block first; "
                             "to chain presses of different stages use mmpress.compose(...)")
        stages = self._stages(press)
        self.check_stages(stages)
        self.outer, self.stages, self._uncached, self._warned = press, stages, None, False
        lm = self.lm
        self.stage_objs = self._stage_objects(stages)
        self.positions = self.resolve_positions(stages)
        if set(stages) - {"pre_llm"} and self.positions != "keep":
            raise ValueError("in-LLM and KV presses start from the original position ids (the layers before them "
                             "saw them; PyramidDrop and SparseVLM renumber by their own `positions` field): use "
                             "positions='keep' here")
        handles = [
            self.vlm.register_forward_pre_hook(self._capture_inputs, with_kwargs=True),
            lm.register_forward_pre_hook(self._language_model_hook, with_kwargs=True),
            lm.register_forward_hook(self._capture_cache),
        ]
        _PRESSED_MODELS.add(self.vlm)
        self.results = Run()
        try:
            for stage in self.stage_objs:
                handles += stage.hooks()
            yield self.results
        finally:
            for handle in handles:
                handle.remove()
            _PRESSED_MODELS.discard(self.vlm)
            self.state = _State()
            self.stage_objs = []
            if len(_OWNED.get(self.vlm, ())) and self.vlm not in _GUARDS:  # its pressed caches outlive the block
                _GUARDS[self.vlm] = self.vlm.register_forward_pre_hook(_guard, with_kwargs=True, prepend=True)

    def _stage_objects(self, stages: dict[str, Press]) -> list:
        """One stage object per stage, in order; an in-vision press hands its selection to the
        pre-LLM stage (a pre-LLM press composed after it, or one keeping every selected token)."""
        out, vision = [], None
        for name, cls in STAGE_CLASSES.items():
            if name == "in_vision" and name in stages:
                vision = VisionStage(self, stages[name])
                out.append(vision)
            elif name == "pre_llm" and (name in stages or vision is not None):
                out.append(PreStage(self, stages.get(name) or KeepSelected(), vision))
            elif name in stages:
                out.append(cls(self, stages[name]))
        return out

    def resolve_positions(self, stages: dict[str, Press]) -> str:
        """The numbering of this application: the one asked for, else the pre-LLM press's official
        one where this family has it ("reindex" needs 1-D RoPE) and no later stage follows."""
        if self.requested_positions is not None:
            return self.requested_positions
        official = getattr(stages.get("pre_llm"), "official_positions", "keep")
        if official not in self.position_modes or len(stages) > 1:
            return "keep"
        return official

    def continues(self, entry: _Entry) -> bool:
        """Whether the press applied now may continue the pressed cache of ``entry``: the press that
        made it (or an equal one) with the same options, on this model."""
        return (entry.vlm() is self.vlm and entry.positions == self.positions
                and _same_press(entry.press, self.outer))

    def _stages(self, press) -> dict[str, Press]:
        """The presses of a press or composition, by stage (at most one each, in stage order)."""
        presses = list(getattr(press, "presses", (press,)))
        stages = {}
        for p in presses:
            if p.stage not in STAGES:
                raise ValueError(f"unknown stage {p.stage!r} of {type(p).__name__}")
            if p.stage in stages or (stages and STAGES.index(p.stage) < max(map(STAGES.index, stages))):
                raise ValueError("compose presses of different stages in the order a forward meets them: at most "
                                 "one each of pre_llm, in_llm, kv, in that order")
            stages[p.stage] = p
        if "in_llm" in stages and "kv" in stages:
            raise ValueError("an in_llm press and a kv press do not compose (their caches would differ in length "
                             "per layer); compose a pre_llm press with one of them")
        return stages

    def _capture_inputs(self, module, args, kwargs):
        """Records the prompt and checks it against the visual items, before any GPU work of this
        forward is queued: the one host read of a pressed prefill (the per-row placeholder
        counts) then finds the GPU idle, and the rest of the pressed forward never syncs."""
        state = self.state
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        items = self.visual_items(args, kwargs)
        state.input_ids, state.items, state.rows = input_ids, items, []
        cache = self.protocol.cache_of(kwargs)
        state.positions_from_cache = False
        past = cache_length(cache, self.attention_layers()[0])  # hybrid caches: a softmax layer's
        entry = _entry(cache)
        if entry is not None and not self.continues(entry):
            raise ValueError(STALE)
        if past:  # decoding or a later turn: no new images expected
            if items:
                raise ValueError("mmpress presses images in a fresh prefill; this call continues a non-empty KV "
                                 "cache with images: run generate on the whole conversation without "
                                 "past_key_values (the press then presses every image), or pass only new text")
            state.positions_from_cache = cache in self.pressed and self.numbers_from_cache(kwargs)
            if cache in self.pressed and self.protocol.starts_generate(kwargs):
                return args, self._continue_generate(self.pressed[cache], kwargs, past)
            return
        if input_ids is None:
            if items:
                raise ValueError("pressing needs input_ids (visual tokens are located by their placeholder ids), "
                                 "not inputs_embeds")
            return
        mask = kwargs.get("attention_mask")
        real = mask.sum(dim=1) if isinstance(mask, Tensor) and mask.ndim == 2 else torch.full_like(input_ids[:, 0],
                                                                                                   input_ids.shape[1])
        # the per-row placeholder counts and real lengths: one host read, before the forward queues work
        *counts, state.row_lengths = torch.stack([*((input_ids == t).sum(dim=1) for t in self.token_ids),
                                                  real.to(input_ids.device, input_ids.dtype)]).tolist()
        if not items:
            if any(map(any, counts)):  # transformers would embed the placeholders as text, silently
                raise ValueError("the prompt holds image tokens but no images were given: pass pixel_values (one "
                                 "image per <image> placeholder; videos and audio likewise)")
            return
        state.rows = self._rows(items, dict(zip(self.token_ids, counts)))
        use_cache = kwargs.get("use_cache")
        if cache is None and not (self.lm.config.use_cache if use_cache is None else use_cache):
            self._uncached_prefill(kwargs, tuple(input_ids.shape))

    def _uncached_prefill(self, kwargs: dict, shape: tuple) -> None:
        """A pressed prefill without a KV cache (``use_cache=False``). A KV press has nothing to
        evict: raise. Under ``generate`` every step then re-runs the whole sequence, so a press
        whose selection reads the prompt (in-LLM presses: the last token's attention; text-guided
        pre-LLM presses) re-selects at every step: warn, once per `with` block. ``generate`` is
        recognised by the images it encodes beforehand, or (older transformers) by a prefill one
        token longer than the last one."""
        if "kv" in self.stages:
            raise ValueError(f"{type(self.stages['kv']).__name__} is a KV press: it evicts entries of the KV cache "
                             "after the prefill, and this call runs without one (use_cache=False), so it would do "
                             "nothing. Call with use_cache=True (the default), or pick a pre_llm / in_llm press")
        last, self._uncached = self._uncached, shape
        reads_prompt = "in_llm" in self.stages or "text" in getattr(self.stages.get("pre_llm"), "needs", ())
        in_generate = self.protocol.starts_generate(kwargs) or last == (shape[0], shape[1] - 1)
        if reads_prompt and in_generate and not self._warned:
            self._warned = True
            warnings.warn("generate(use_cache=False) under a press that selects from the prompt (an in-LLM press, or "
                          "a text-guided pre-LLM press): without a KV cache every step re-runs the whole sequence, so "
                          "the press re-selects the visual tokens at every step, from the newest tokens (as FastV's "
                          "cache-less mode does), instead of selecting once at the prefill and keeping that "
                          "selection while decoding. Pass use_cache=True (the default) to select once",
                          UserWarning, stacklevel=2)

    def _continue_generate(self, pre: _Prefill, kwargs: dict, past: int) -> dict:
        """``generate(whole conversation, attention_mask, past_key_values=pressed cache)``: generate
        cut the conversation at the pressed cache's length, which is shorter than the tokens it
        stands for, so this first call also holds ``L - L'`` tokens the cache already has: drop them.
        (A call with only the new tokens and the whole mask needs nothing.)"""
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if not self.continues_generate:
            raise ValueError(f"generate() cannot continue a pressed KV cache of a {self.family} model yet. "
                             f"{self.continue_hint}")
        if ids is None or (mask is not None and mask.ndim != 2):
            raise ValueError(f"generate() was called on a pressed KV cache without input_ids and a 2-D attention "
                             f"mask. {self.continue_hint}")
        width = pre.mask.shape[1] if pre.mask is not None else pre.length  # prompt entries in layer 0's cache
        prior = pre.length + past - width  # tokens the cache stands for
        # no mask: generate dropped an all-ones one (batch 1, no padding) and cut the conversation
        # at the cache's length, numbering the ids from there: trimmed, they are the original ids
        seen = mask.shape[1] if mask is not None else past + ids.shape[1]  # the conversation's length
        trim = prior - (seen - ids.shape[1])
        if trim == 0:
            return kwargs
        if not 0 < trim < ids.shape[1]:
            raise ValueError(f"generate() continues a pressed cache standing for {prior} tokens with {ids.shape[1]} "
                             f"new input ids and a {seen}-column mask: they do not line up. {self.continue_hint}")
        out = dict(kwargs)
        for name in ("input_ids", "mm_token_type_ids", "token_type_ids"):
            if isinstance(kwargs.get(name), Tensor):
                out[name] = kwargs[name][:, trim:]
        if isinstance(kwargs.get("position_ids"), Tensor):
            out["position_ids"] = kwargs["position_ids"][..., trim:]
        self.state.input_ids = out["input_ids"]
        return out

    @staticmethod
    def _rows(items: list[Item], counts: dict[int, list[int]]) -> list[int]:
        """The batch row of each item: the items of a placeholder id fill the rows in order."""
        rows = [0] * len(items)
        for token_id, per_row in counts.items():
            queue = [i for i, item in enumerate(items) if item.token_id == token_id]
            lengths = [items[i].length for i in queue]
            fits = sum(per_row) == sum(lengths)
            for row, count in enumerate(per_row):
                while fits and count > 0:
                    i = queue.pop(0)
                    fits = items[i].length <= count
                    rows[i], count = row, count - items[i].length
            if not fits:
                raise ValueError(f"{len(lengths)} visual inputs of {lengths} tokens were given, but the prompt rows "
                                 f"hold {per_row} placeholder tokens (id {token_id}): pass one image per "
                                 f"placeholder (the processor expands each to its token count)")
        return rows

    def _language_model_hook(self, module, args, kwargs):
        for stage in self.stage_objs:
            stage.begin_call()
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        cache = self.protocol.cache_of(kwargs)
        past = cache_length(cache, self.attention_layers()[0])  # hybrid caches: a softmax layer's
        if past:  # decoding, or a later turn appended to a cache
            pre = self.pressed.get(cache)
            if pre is None:
                return None
            pos = kwargs.get("position_ids")
            if pos is not None and pos.shape[-1] != embeds.shape[1]:  # transformers' Qwen-VL: a full mask, several new tokens
                raise ValueError(f"this call continues a pressed KV cache with {embeds.shape[1]} new tokens but the model "
                                 f"made position ids for {pos.shape[-1]}. {self.continue_hint}")
            return None if pre.mask is None else (args, self._map_decoding(pre, kwargs, embeds, past))
        state = self.state
        if not state.rows:
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise ValueError("pressing needs a 2-D attention mask (batch, seq); got a 4-D mask")
        valid = torch.ones_like(state.input_ids, dtype=torch.bool) if mask is None else mask.bool()
        layout = input_layout(state.input_ids, valid, state.items, state.rows, state.row_lengths)
        n, length = sum(layout.lengths), embeds.shape[1]
        kinds: dict[str, int] = {}
        for item in state.items:
            kinds[item.kind] = kinds.get(item.kind, 0) + 1
        stats = Stats(items=len(state.items), visual_tokens=n, kept_visual_tokens=n, seq_len=length,
                      pressed_seq_len=length, kinds=kinds, fixed_tokens=sum(len(i.fixed) for i in state.items))
        run = state.run = Prefill(kwargs, layout, state.items, stats, next=self._next_positions(kwargs, embeds))
        for stage in self.stage_objs:
            stage.start(run)
        return args, run.kwargs

    def _capture_cache(self, module, args, output):
        """Runs the stages' ``finish`` and remembers which KV cache holds a pressed prefill, so that
        decoding steps and later turns on that cache (and only those) are mapped onto it."""
        run, self.state.run = self.state.run, None
        if run is None:
            return
        for stage in self.stage_objs:
            stage.finish(run)
        self.results.prefills.append(run.stats)
        cache = getattr(output, self.protocol.cache, None)  # (not the deprecated alias: it warns)
        if run.record is not None and cache is not None:
            run.record.next, run.record.mrope = run.next
            self.pressed[cache] = run.record

    @staticmethod
    def _next_positions(kwargs: dict, embeds: Tensor) -> tuple[Tensor, bool]:
        """(B,) the original position id of a token right after this prompt (the largest id of
        the row's tokens + 1, over M-RoPE's rows too: Qwen's text continues from there), and
        whether positions are M-RoPE's (``continue_positions``). No host sync."""
        b, length = embeds.shape[:2]
        pos, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
        pos = torch.arange(length, device=embeds.device).expand(b, length) if pos is None else pos
        mrope = pos.ndim == 3
        pos = pos[-3:].amax(dim=0) if mrope else pos  # (4, B, L) from generate: row 0 is the text's
        pos = pos.expand(b, length)
        if mask is not None and mask.ndim == 2:
            pos = pos.masked_fill(~mask.bool(), torch.iinfo(pos.dtype).min if not pos.is_floating_point() else -1)
        return pos.amax(dim=1) + 1, mrope

    # ---- decoding ---------------------------------------------------------------------------
    def _map_decoding(self, pre: _Prefill, kwargs: dict, embeds: Tensor, past: int) -> dict:
        """Map the original-length mask / position ids of a call continuing a pressed cache
        (generate's decoding steps, or new tokens of a later turn) onto that cache."""
        b, q = embeds.shape[:2]
        new_len = pre.mask.shape[1]
        grown = past + q - new_len  # tokens appended since the prefill, this step's included
        mask = kwargs.get("attention_mask")
        if mask is None:
            tail = pre.mask.new_ones(b, grown)
        else:
            if mask.ndim != 2 or mask.shape[1] != pre.length + grown:
                raise ValueError(
                    f"this call continues a pressed KV cache ({past} entries standing for a {pre.length}-token "
                    f"prompt + {past - new_len} later tokens) with an attention mask of {mask.shape[-1]} columns, "
                    f"expected {pre.length + grown}. {self.continue_hint}")
            tail = mask[:, pre.length:].to(pre.mask.dtype)
        pos = kwargs.get("position_ids")
        if pos is None:  # what the unpressed model would use: cache length + offset
            pos = (past + pre.length - new_len + torch.arange(q, device=embeds.device)).expand(b, q)
        elif self.state.positions_from_cache:  # the model numbered from the pressed cache length
            pos = pos + (pre.length - new_len)
        if pre.shift is not None:
            pos = pos - pre.shift[:, None]
        return {**kwargs, "attention_mask": torch.cat([pre.mask, tail], dim=1), "position_ids": pos}

    # ---- later turns ------------------------------------------------------------------------
    def text_positions(self, attention_mask: Tensor, new: int) -> Tensor:
        """Position ids of the last ``new`` tokens of a conversation (``attention_mask`` (B, L))
        continuing an UNPRESSED cache, as ``generate`` numbers them (each row from its first
        real token). A family with other positions (M-RoPE) overrides this."""
        return (attention_mask.long().cumsum(-1) - 1)[:, -new:].masked_fill(attention_mask[:, -new:] == 0, 1)


class Applied:
    """What ``press(model)`` returns: a context manager that hooks the press into the model on
    entry and removes the hooks on exit, exception or not; ``with press(model) as run:`` gives the
    block's results (:class:`Run`: ``run.stats``). It may be entered again after it exits (each
    `with` applies the press afresh); entering it (or any press) again on the same model while it
    is applied raises: presses do not nest."""

    def __init__(self, adapter: Adapter, press):
        self.adapter, self.press = adapter, press
        self._open: list = []

    def __enter__(self) -> Run:
        block = self.adapter.apply(self.press)
        run = block.__enter__()
        self._open.append(block)
        return run

    def __exit__(self, *exc) -> bool | None:
        return self._open.pop().__exit__(*exc)


def continue_positions(model: nn.Module, cache, attention_mask: Tensor, new_tokens) -> Tensor:
    """Position ids of the new tokens of a later turn fed onto a KV cache (pressed or not):

        ids = continue_positions(model, cache, full_mask, new_ids.shape[1])
        model(input_ids=new_ids, attention_mask=full_mask, past_key_values=cache, position_ids=ids)

    ``attention_mask`` (B, L) covers the whole conversation, its last ``new_tokens`` columns the
    new tokens (an int, or the new ids (B, q)). The ids are in the ORIGINAL coordinates of the
    unpressed conversation, as the unpressed model would number those tokens: a pressed cache's
    prefill recorded where its prompt ends (the kept tokens keep their ids, so the cache's
    length says nothing about it); an unpressed cache continues as ``generate`` does. Returns
    (B, q) for 1-D RoPE, (3, B, q) for M-RoPE (Qwen-VL: transformers' own numbering of several new
    tokens with a full-length mask fails, pressed or not)."""
    from mmpress.registry import get_adapter  # (the registry is filled by mmpress.models)

    q = new_tokens.shape[1] if isinstance(new_tokens, Tensor) else int(new_tokens)
    if attention_mask is None or attention_mask.ndim != 2 or not 0 < q <= attention_mask.shape[1]:
        raise ValueError("continue_positions needs the (batch, seq) attention mask of the whole conversation, its "
                         f"last {q} columns the new tokens; got "
                         f"{None if attention_mask is None else tuple(attention_mask.shape)}")
    adapter = get_adapter(model)
    entry = _entry(cache)
    if entry is None or entry.vlm() is not adapter.vlm:
        return adapter.text_positions(attention_mask, q)
    pre = entry.prefill
    if pre.next is None or attention_mask.shape[1] < pre.length + q:
        raise ValueError(f"the cache stands for a {pre.length}-token prompt: the attention mask must cover the prompt, "
                         f"the tokens since and the {q} new ones; got {attention_mask.shape[1]} columns")
    tail = attention_mask[:, pre.length:].long()
    pos = pre.next.to(tail.device)[:, None] + (tail.cumsum(-1) - 1)[:, -q:]
    pos = pos.masked_fill(tail[:, -q:] == 0, 1)
    return pos.expand(3, *pos.shape) if pre.mrope else pos
