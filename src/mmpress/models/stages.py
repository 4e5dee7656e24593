"""The stages: one small class per place a press acts, each with the same lifecycle. ``hooks()``
registers what it needs on the model (for the `with` block); ``begin_call()`` runs at every call
of the language model; ``start(run)`` on a fresh prefill with media (:class:`Prefill`: the
language model's call and where its items are, which a stage may change); ``finish(run)`` after
the language model ran, adding to its :class:`Stats` and to what decoding needs. Family-neutral
(the language model is reached through ``models/lm.py``, the tower through the family's hooks);
the adapter core runs them in stage order and maps decoding onto the pressed cache.

``in_vision`` (:class:`VisionStage`): the family's hooks run the press inside or before the vision
tower (``Adapter.vision_hooks``) and report, per encoded item, which of its placeholder tokens the
features stand for (:class:`Selected`); the features still fill every placeholder (the others
with anything), and the pre-LLM stage drops the unselected placeholders before the language
model, with the pre-LLM press (if one is composed) choosing among the selected tokens only.

``pre_llm`` (:class:`PreStage`): presses each item's tokens in the language model's input
embeddings (its signals: the family's tower hooks) and compacts the rows.

``in_llm`` (:class:`LayerStage`): a forward pre-hook on decoder layer k takes the visual hidden
states out of the layer's input, presses each image's tokens (its score: the attention they
receive at the press's signal layer, from its query rows), and hands layer k and every later
layer the compacted sequence with its attention mask, rotary embeddings and position ids cut to
the kept columns (rows re-padded on the left, as the pre-LLM core does). Layers before k keep
their full KV cache, layers from k on hold only the kept entries; kept tokens keep their
position ids, so decoding runs in the original coordinates and only the mask of layers >= k is
cut to their shorter cache.

``kv`` (:class:`KVStage`): a forward hook on each decoder layer, after the layer has written the
prompt into the KV cache, scores the visual entries by the attention of the last ``window``
query rows (the layer's own queries, the cache's rotated keys), keeps or merges ``keep`` per
image (per KV head for a per-head press) and compacts that layer's cache. Every layer keeps the
same number of entries per row, so one (B, L') mask serves every layer and every head while
decoding: what the pre-LLM core already maps decoding onto.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import torch
from torch import Tensor

from mmpress.flops import layer_lengths
from mmpress.models.layout import TEXT, Layout, context, press_items
from mmpress.models.lm import cut_mask, decode_cut, decoder_layers, final_norm, queries_keys, rotary_embedding
from mmpress.ops.attention import attention_rows, received_attention
from mmpress.ops.sequence import gather_rows
from mmpress.presses.base import KVPress, LayerPress, Press


def needs_attention(press) -> bool:
    """Whether ``press`` reads a decoder layer's softmax attention (its scores or keys)."""
    return bool({"llm_attn", "llm_keys"} & set(press.needs))


@dataclass
class Stats:
    """The token counts of one pressed prefill (``run.stats`` of ``with press(model) as run``).

    items: media items pressed (images, videos, audio clips); kinds: items per kind;
    visual_tokens: their pressable tokens; kept_visual_tokens: those kept after the last stage;
    fixed_tokens: media tokens kept by every press (LLaVA-NeXT's newlines); seq_len /
    pressed_seq_len: the language model's input width, unpressed / after a pre-LLM press (the
    longest row, padding included); in-LLM: layer_kept [(layer, kept)], layer_seq_len [(layer,
    width)] and layer_avg_visual_tokens (averaged over the decoder layers); KV: kv_len, the width
    of the pressed cache. In-vision: vision_block_tokens, the tokens entering each vision block
    (summed over the encoded items; one entry more, where a block merges between its attention and
    its MLP as ToMe does: the tokens leaving the last block), vision_block_attention, each block's attention work: the sum
    over its attention sequences (an image, a frame, a window) of length squared (None where the
    family reports none: read as one sequence per item of equal length), and vision_kept_tokens,
    the pressable tokens the tower handed on (over the prompt's items, before a pre-LLM press)."""

    items: int
    visual_tokens: int
    kept_visual_tokens: int
    seq_len: int
    pressed_seq_len: int
    kinds: dict = field(default_factory=dict)
    fixed_tokens: int = 0
    layer_kept: list = field(default_factory=list)
    layer_seq_len: list = field(default_factory=list)
    layer_avg_visual_tokens: float | None = None
    kv_len: int | None = None
    vision_block_tokens: list | None = None
    vision_block_attention: list | None = None
    vision_kept_tokens: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class _Prefill:
    """What decoding needs to know about a pressed prefill (one per pressed KV cache)."""

    mask: Tensor | None  # (B, L') attention mask of the prompt every layer's cache holds; None: unpressed
    length: int  # L, the unpressed prompt length (with padding)
    shift: Tensor | None  # (B,) subtracted from original position ids (0 or None with positions="keep")
    cuts: list = field(default_factory=list)  # in_llm: from layer k on, the cache holds these columns
    width: int = 0  # prompt columns the language model's input had (what ``cuts`` index)
    next: Tensor | None = None  # (B,) the original position id of the first token after the prompt
    mrope: bool = False  # positions are M-RoPE's (t, h, w) rows (``continue_positions``)


@dataclass
class Prefill:
    """A prefill with media in flight through the stages: each stage's ``start`` reads and may
    change the language model's call (``kwargs``) and ``layout``; its ``finish`` (after the
    language model ran) adds to ``stats`` and to ``record``, what decoding needs (None: unpressed)."""

    kwargs: dict
    layout: Layout
    items: list
    stats: Stats
    record: _Prefill | None = None
    next: tuple | None = None  # (next position id per row, M-RoPE?)


@dataclass(frozen=True)
class Selected:
    """What an in-vision press left of one item: ``index`` (k,) ascending, the item's pressable
    tokens (placeholder order) its k features stand for; ``grid`` (t, h, w) when they still form
    a raster (downsampling), else None."""

    index: Tensor
    grid: tuple[int, int, int] | None = None


class KeepSelected(Press):
    """The pre-LLM stage of an in-vision press applied alone: keeps every token it selected."""

    needs_budget = False

    def __init__(self):
        super().__post_init__()


class VisionStage:
    """``in_vision``: the family runs the press in its tower (``Adapter.vision_hooks``) and reports
    to this stage: ``new_call()`` when the tower starts encoding a batch, ``record(kind, source,
    Selected)`` per item it encoded (``source``: the item's index among the encoded items of its
    kind, as ``Item.source``), ``count_blocks(kind, tokens, attention)`` the tokens entering each
    block of that call and (optional) each block's sum over its attention sequences of length
    squared (the quadratic term of its FLOPs: ``eval.cost.pressed_flops``). The pre-LLM stage
    reads ``selected`` (encoded before the language model runs, by the forward itself or by
    ``generate``'s encoding step)."""

    def __init__(self, adapter, press):
        modes = getattr(adapter, "vision_modes", frozenset())
        if press.mode not in modes:
            have = ", ".join(sorted(modes)) or "none"
            raise ValueError(f"{type(press).__name__} acts {press.mode!r} in the vision tower, which the {adapter.family} "
                             f"adapter does not support (its in-vision modes: {have}): pick a pre_llm press")
        self.adapter, self.press = adapter, press
        self.selected: dict[tuple[str, int], Selected] = {}
        self.blocks: dict[str, list[int]] = {}
        self.attention: dict[str, list[float]] = {}

    def hooks(self) -> list:
        return self.adapter.vision_hooks(self.press, self)

    def new_call(self) -> None:
        self.selected, self.blocks, self.attention = {}, {}, {}

    def record(self, kind: str, source: int, selected: Selected) -> None:
        self.selected[(kind, source)] = selected

    def count_blocks(self, kind: str, tokens: list[int], attention: list[float] | None = None) -> None:
        old = self.blocks.get(kind)
        self.blocks[kind] = list(tokens) if old is None else [a + b for a, b in zip(old, tokens)]
        if attention is not None:
            old = self.attention.get(kind)
            self.attention[kind] = list(attention) if old is None else [a + b for a, b in zip(old, attention)]

    def begin_call(self) -> None:
        pass

    def start(self, run: Prefill) -> None:
        missing = [(item.kind, item.source) for item in run.items if (item.kind, item.source) not in self.selected]
        if missing:
            raise ValueError(f"{type(self.press).__name__} acts in the vision tower, but {len(missing)} of this prompt's "
                             "media were encoded without it: encode them inside the `with press(model):` block")
        for item in run.items:
            if self.selected[(item.kind, item.source)].index.shape[0] > item.length - len(item.fixed):
                raise ValueError(f"the vision tower reported more tokens than the {item.kind}'s {item.length} placeholders")
        if self.blocks:
            width = max(len(c) for c in self.blocks.values())
            blocks = [sum(c[i] for c in self.blocks.values() if i < len(c)) for i in range(width)]
            run.stats.vision_block_tokens = blocks
            if self.attention.keys() == self.blocks.keys():  # every kind reported its attention
                run.stats.vision_block_attention = [sum(c[i] for c in self.attention.values() if i < len(c))
                                                    for i in range(max(map(len, self.attention.values())))]
        run.stats.vision_kept_tokens = sum(self.selected[(item.kind, item.source)].index.shape[0] for item in run.items)

    def finish(self, run: Prefill) -> None:
        pass


class PreStage:
    """``pre_llm``: presses the items in the language model's input embeddings (items of one shape
    together) and compacts the rows; the press's signals come from the family's tower hooks. After
    an in-vision stage (``vision``), each item holds only the tokens it selected: the press chooses
    among those (its budget counts them), and the others are dropped."""

    def __init__(self, adapter, press, vision: VisionStage | None = None):
        self.adapter, self.press, self.vision = adapter, press, vision

    def hooks(self) -> list:
        return self.adapter.signal_hooks(self.press)

    def begin_call(self) -> None:
        pass

    def start(self, run: Prefill) -> None:
        """Press every item and compact the rows, without host syncs: the pressed width follows
        from host facts (the rows' lengths, item lengths)."""
        adapter, press, kwargs, layout = self.adapter, self.press, run.kwargs, run.layout
        embeds = kwargs["inputs_embeds"]
        b, length, _ = embeds.shape
        items, mask = run.items, kwargs.get("attention_mask")
        pos = kwargs.get("position_ids")
        pos = torch.arange(length, device=embeds.device).expand(b, length) if pos is None else pos
        pos = pos.expand(*pos.shape[:-2], b, length)
        needs, cached = set(press.needs), {}
        vision = {"cls_attn", "vision_keys", "cls_attn_concat", "vision_keys_concat", "vision_features", "audio_features",
                  "audio_energy", "audio_attn"} & needs

        def text_signals() -> tuple[dict, dict]:  # every row's padded text, made once for all groups
            if not cached:
                cols, text_mask = layout.text_rows()
                index = layout.sequence_index()
                cached["rows"] = dict(text=gather_rows(embeds, cols), text_mask=text_mask, text_index=index.gather(1, cols))
                cached["columns"] = dict(token_index=index.view(-1))
            return cached["columns"], cached["rows"]

        selected = [None] * len(items)
        if self.vision is not None:  # the in-vision press's choice: the press picks among those tokens
            selected = [self.vision.selected[(item.kind, item.source)] for item in items]
            items = [replace(item, length=len(s.index), grid=s.grid, parts=(), fixed=())
                     for item, s in zip(items, selected)]

        def press_group(members, flat, tokens):
            chosen = None
            if selected[members[0]] is not None:
                chosen = torch.stack([selected[i].index.to(flat.device) for i in members])  # (G, k)
                flat, tokens = flat.gather(1, chosen), tokens.gather(1, chosen[..., None].expand(-1, -1, tokens.shape[-1]))
            group = [items[i] for i in members]
            columns, rows = text_signals() if "text" in needs else ({}, {})
            ctx = context(flat, length, group[0], columns=columns, rows=rows)
            if vision:
                adapter.fill_signals(press, ctx, group)
            out, index = press.press(tokens, ctx)
            return (out, index) if chosen is None else (out, chosen.gather(1, index))

        groups = layout.groups([(item.grid, item.fixed, item.parts, item.length) for item in items])
        out, kept_lengths = press_items(embeds, layout, groups, press_group)
        run.stats.kept_visual_tokens = sum(kept_lengths)
        if out is None:  # keep-all: leave the call untouched, bit-identical to the unpressed model
            return
        src, new_mask, width = out.src, out.layout.valid, out.src.shape[1]
        lengths = out.keep.sum(dim=1)
        if adapter.positions == "keep":
            new_pos = pos.gather(-1, src.expand(*pos.shape[:-2], b, width))
            shift = torch.zeros(b, dtype=pos.dtype, device=pos.device)
        else:
            new_pos = torch.arange(width, device=pos.device) - (width - lengths)[:, None]
            last = torch.arange(length, device=layout.valid.device).masked_fill(~layout.valid, -1).argmax(dim=1)
            shift = pos.gather(1, last[:, None])[:, 0] - (lengths - 1)
        new_mask_int = new_mask.to(mask.dtype if mask is not None else torch.long)
        kwargs = adapter.press_extras(kwargs, out.keep, layout.ids != TEXT, src, new_mask, run.stats.kept_visual_tokens
                                      + run.stats.fixed_tokens)
        run.kwargs = {**kwargs, "inputs_embeds": out.x, "attention_mask": new_mask_int,
                      "position_ids": new_pos.masked_fill(~new_mask, 1)}  # padding: what generate gives pad slots
        run.layout, run.stats.pressed_seq_len = out.layout, width
        run.record = _Prefill(mask=new_mask_int, length=length, shift=shift)

    def finish(self, run: Prefill) -> None:
        pass


def renumber(position_ids: Tensor | None, input_valid: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """PyramidDrop's numbering of a pressed prompt: each row's kept columns (``valid`` (B, W'),
    False in padding) get consecutive ids from the id of the row's first token, and a token after
    the prompt (decoding, a later turn) its original id minus the returned shift (B,): the number
    of ids the pressing freed. ``position_ids`` (B or 1, W): the 1-D ids of the language model's
    input (``input_valid`` (B, W), False in padding); 0..L'-1 for a row numbered from 0."""
    if not isinstance(position_ids, Tensor) or position_ids.ndim != 2:
        raise ValueError("positions='reindex' renumbers 1-D position ids; this language model's layers get "
                         f"{None if position_ids is None else tuple(position_ids.shape)}: pass positions='keep'")
    b, w = input_valid.shape
    pos, cols = position_ids.expand(b, w), torch.arange(w, device=input_valid.device)
    first = pos.gather(1, cols.masked_fill(~input_valid, w).amin(dim=1, keepdim=True).clamp(max=w - 1))
    last = pos.gather(1, cols.masked_fill(~input_valid, -1).amax(dim=1, keepdim=True).clamp(min=0))
    kept = valid.long().cumsum(dim=1)
    positions = (first + kept - 1).masked_fill(~valid, 1)  # padding: what generate gives pad slots
    return positions, (last + 1 - first - kept[:, -1:])[:, 0]


def _heads_last(x: Tensor) -> Tensor:
    """(B, Hkv, W, ...) -> (B * W, Hkv, ...): one row per column, as flat indices address them."""
    return x.transpose(1, 2).reshape(x.shape[0] * x.shape[2], x.shape[1], *x.shape[3:])


@dataclass
class _Cut:
    """From decoder layer ``start`` on, the layers see the prompt columns ``cols`` (B, W) of the
    language model's input (``valid``: False in padding). A press renumbering positions
    (``positions="reindex"``) gives them the ids ``positions`` (B, W), and a later token (decoding,
    a later turn) its original id minus ``shift`` (B,); None when the original ids are kept."""

    start: int
    cols: Tensor
    valid: Tensor
    positions: Tensor | None = None
    shift: Tensor | None = None


@dataclass
class _Run:
    """An in-LLM prefill in flight."""

    layout: Layout
    first: list[int]  # visual tokens of each item as it entered the language model
    first_flats: list[Tensor]  # their flat positions in the language model's input
    embeds: Tensor  # the language model's input embeddings
    cols: Tensor
    recorded: dict[int, tuple] = field(default_factory=dict)  # signal layer -> (hidden, rotary)
    cuts: list[_Cut] = field(default_factory=list)
    memo: dict = field(default_factory=dict)  # (kwarg, id(value), cuts) -> its cut
    counts: list[tuple[int, int]] = field(default_factory=list)  # (layer, visual tokens kept)
    input_valid: Tensor | None = None  # (B, W) the language model's input: False in padding

    @property
    def layout_width(self) -> int:
        return self.input_valid.shape[1]


class LayerStage:
    """``in_llm``: presses the hidden states entering the press's layers (see the module doc)."""

    def __init__(self, adapter, press: LayerPress):
        if getattr(press, "positions", "keep") is None:  # the official numbering where the family has 1-D RoPE
            press = replace(press, positions="reindex" if "reindex" in adapter.position_modes else "keep")
        self.adapter, self.press = adapter, press
        self.layers = decoder_layers(adapter.lm)
        starts = press.layers()
        n = len(self.layers)
        if list(starts) != sorted(set(starts)) or starts[-1] >= n:
            raise ValueError(f"{type(press).__name__} presses at layers {starts}, but the language model has {n} "
                             f"decoder layers (0..{n - 1}): pick ascending layers below {n}")
        self.signal = {s: press.signal_layer(s) for s in starts}
        for prev, s in zip((-1, *starts), starts):
            if not max(prev, 0) <= self.signal[s] <= s:
                raise ValueError(f"the signal layer of layer {s} must lie in [{max(prev, 0)}, {s}]")
        attention = adapter.attention_layers()
        if needs_attention(press) and any(sig not in attention for sig in self.signal.values()):
            raise ValueError(f"{type(press).__name__} reads the attention of decoder layers "
                             f"{sorted(set(self.signal.values()))}, but this {adapter.family} model has softmax "
                             f"attention only in layers {attention}: press at (or score with) one of those")
        self.starts = starts
        self.linear = set(range(n)) - set(attention)  # recurrent layers: a 2-D padding mask, no KV cache
        # a press renumbering the kept sequence (PyramidDrop's official numbering) needs 1-D RoPE
        self.rotary, self.rotary_types = None, None
        if getattr(press, "positions", "keep") == "reindex":
            if "reindex" not in adapter.position_modes:
                raise ValueError(f"{type(press).__name__}(positions='reindex') renumbers the kept tokens 0..L'-1, "
                                 f"which is defined for 1-D RoPE only; this {adapter.family} model numbers "
                                 "positions with M-RoPE (t, h, w): pass positions='keep' (original ids)")
            self.rotary = rotary_embedding(adapter.lm)
            # Gemma 3: one rotary module, a RoPE base per layer type, chosen by a third argument
            takes_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
            self.rotary_types = adapter.lm.config.layer_types if takes_type else None
        impl = getattr(adapter.lm.config, "_attn_implementation", "sdpa") or "sdpa"
        self.flash = "flash" in impl
        self.run: _Run | None = None
        self.memo: dict = {}

    def hooks(self) -> list:
        watch = sorted(set(range(self.starts[0], len(self.layers))) | set(self.signal.values()))
        return [self.layers[i].register_forward_pre_hook(partial(self._hook, i), with_kwargs=True) for i in watch]

    def start(self, run: Prefill) -> None:
        layout, embeds = run.layout, run.kwargs["inputs_embeds"]
        b, w = layout.ids.shape
        cols = torch.arange(w, device=layout.ids.device).expand(b, w)
        self.run = _Run(layout, list(layout.lengths), layout.flats(), embeds, cols, input_valid=layout.valid)
        self.memo = {}

    def begin_call(self) -> None:
        self.run, self.memo = None, {}

    def finish(self, run: Prefill) -> None:
        """Adds the cuts of this prefill to what decoding needs, and its counts to the stats."""
        mine, self.run = self.run, None
        if mine is None or not mine.counts:
            return
        stats, n_layers = run.stats, len(self.layers)
        per_layer = layer_lengths(n_layers, stats.kept_visual_tokens, mine.counts)  # visual tokens each layer runs on
        stats.layer_kept, stats.kept_visual_tokens = [(layer, kept) for layer, kept in mine.counts], mine.counts[-1][1]
        stats.layer_avg_visual_tokens = sum(per_layer) / n_layers
        stats.layer_seq_len = [(c.start, c.cols.shape[1]) for c in mine.cuts]
        if mine.cuts:
            width = mine.layout_width
            record = run.record or _Prefill(mask=None, length=width, shift=None)
            record.cuts, record.width = mine.cuts, (width if record.mask is None else record.mask.shape[1])
            run.record = record

    # ---- the hook ---------------------------------------------------------------------------
    def _hook(self, i: int, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.run is None:  # a linear-attention layer's recurrent state continues as it is
            return None if i in self.linear else self._decoding(i, args, hidden, kwargs)
        run, given = self.run, kwargs
        kwargs = self._cut_inputs(run, given, i)
        if i in self.starts:
            hidden = self._press_at(i, run, hidden, kwargs, given)
            kwargs = self._cut_inputs(run, given, i)
        if any(sig == i != start for start, sig in self.signal.items()):  # a later stage scores with layer i
            run.recorded[i] = (hidden, kwargs["position_embeddings"])
        if not run.cuts:
            return None
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _rotate(self, x: Tensor, positions: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """(cos, sin) of ``positions`` for decoder layer ``i`` (its layer type's base, where the
        language model has one per type)."""
        if self.rotary_types is None:
            return self.rotary(x, positions)
        return self.rotary(x, positions, self.rotary_types[i])

    def _cut_inputs(self, run: _Run, kwargs: dict, i: int) -> dict:
        """The layer's mask / rotary embeddings / position ids (as the model loop passes every
        layer: for its input's full width) cut to the current columns, once per stage."""
        if not run.cuts:
            return kwargs
        cut, out = run.cuts[-1], dict(kwargs)
        b = cut.cols.shape[0]
        for name, value in kwargs.items():
            linear = i in self.linear and name == "attention_mask"
            key = (name, id(value), len(run.cuts), linear, self.rotary_types and self.rotary_types[i])
            if key not in run.memo:
                if name == "attention_mask":  # a linear-attention layer's is the 2-D padding mask, as flash's
                    run.memo[key] = cut_mask(value, cut.cols, cut.valid, cut.cols, self.flash or linear,
                                             square_causal_ok=run.layout.uniform)
                elif name == "position_embeddings" and value is not None:  # (cos, sin): (B, W, d)
                    if cut.positions is not None:
                        run.memo[key] = self._rotate(value[0], cut.positions, i)
                    else:
                        run.memo[key] = tuple(gather_rows(t.expand(b, *t.shape[1:]), cut.cols) for t in value)
                elif name == "position_ids" and cut.positions is not None:
                    run.memo[key] = cut.positions
                elif name == "position_ids" and isinstance(value, Tensor):  # (..., B, W)
                    lead = value.shape[:-2]
                    run.memo[key] = value.expand(*lead, b, value.shape[-1]).gather(-1, cut.cols.expand(*lead, b, -1))
                else:
                    continue
            out[name] = run.memo[key]
        return out

    def _signals(self, i: int, run: _Run, hidden: Tensor, kwargs: dict) -> dict:
        """What ``press.needs`` at layer ``i``, per column of the current sequence."""
        press, layout, needs = self.press, run.layout, set(self.press.needs)
        s = self.signal[i]
        sig_hidden, sig_pe = (hidden, kwargs["position_embeddings"]) if s == i else run.recorded.pop(s)
        b, w, _ = hidden.shape
        out: dict = {}
        if needs & {"llm_attn", "llm_keys"}:
            rows, ok = layout.query_rows(press.query, press.window)
            q, k, scaling = queries_keys(self.layers[s], sig_hidden, sig_pe, rows)
            if "llm_attn" in needs:
                out["attn"] = received_attention(q, k, rows, ok, layout.valid, scaling).mean(dim=1).reshape(-1)
                if press.query == "text":  # each text row's attention (SparseVLM's raters)
                    out["rows"] = attention_rows(q, k, rows, layout.valid, scaling)
            if "llm_keys" in needs:
                out["keys"] = _heads_last(k).flatten(1)  # (B * W, Hkv * d)
        if needs & {"text", "llm_keys", "llm_normed"}:
            rows, out["text_mask"] = layout.text_rows()
            out["text"] = gather_rows(run.embeds, run.cols.gather(1, rows))  # input embeddings, as pre_llm
            out["text_hidden"], out["text_cols"], out["index"] = gather_rows(hidden, rows), rows, layout.sequence_index()
            if "keys" in out:
                out["text_keys"] = gather_rows(out["keys"].view(b, w, -1), rows)
        if "llm_normed" in needs:
            out["normed"] = final_norm(self.adapter.lm)(hidden)
        return out

    def _context(self, signals: dict, run: _Run, flat: Tensor, first: Tensor, w: int):
        columns = {name: signals[key] for name, key in (("llm_attn", "attn"), ("llm_keys", "keys")) if key in signals}
        rows, row_columns, given = {}, {}, {}
        if "rows" in signals:
            row_columns["llm_attn_rows"] = signals["rows"]
        if "text" in signals:
            rows.update(text=signals["text"], text_mask=signals["text_mask"], text_hidden=signals["text_hidden"],
                        text_index=signals["index"].gather(1, signals["text_cols"]))
            columns["token_index"] = signals["index"].view(-1)
            if "text_keys" in signals:
                rows["llm_text_keys"] = signals["text_keys"]
        if "normed" in signals:
            normed = signals["normed"]
            columns["llm_normed"] = normed.reshape(-1, normed.shape[-1])
            rows["llm_text_normed"] = gather_rows(normed, signals["text_cols"])
        if "visual_inputs" in self.press.needs:
            given["visual_inputs"] = run.embeds.reshape(-1, run.embeds.shape[-1])[first]
        return context(flat, w, columns=columns, rows=rows, row_columns=row_columns, **given)

    def _press_at(self, i: int, run: _Run, hidden: Tensor, kwargs: dict, given: dict) -> Tensor:
        """Press every item at layer ``i``; returns the compacted hidden states (``kwargs``: the
        layer's inputs cut to the current columns, ``given``: as the model passed them)."""
        press, layout = self.press, run.layout
        signals = self._signals(i, run, hidden, kwargs)
        stage, w = self.starts.index(i), hidden.shape[1]
        groups = layout.groups([(f,) for f in run.first])

        def press_group(members, flat, tokens):
            first = torch.stack([run.first_flats[m] for m in members])
            k = min(press.budgets(run.first[members[0]])[stage], flat.shape[1])
            return press.press(tokens, self._context(signals, run, flat, first, w), k)

        out, lengths = press_items(hidden, layout, groups, press_group)
        run.counts.append((i, sum(lengths)))
        if out is None:  # keep-all: the layers run unchanged, bit-identical to the unpressed model
            return hidden
        run.layout, run.cols = out.layout, run.cols.gather(1, out.src)
        cut = _Cut(i, run.cols, out.layout.valid)
        if self.rotary is not None:
            cut.positions, cut.shift = renumber(given.get("position_ids"), run.input_valid, cut.valid)
        run.cuts.append(cut)
        return out.x

    # ---- decoding ---------------------------------------------------------------------------
    def _decoding(self, i: int, args, hidden: Tensor, kwargs: dict):
        cache = self.adapter.protocol.cache_of(kwargs)
        pre = self.adapter.pressed.get(cache) if cache is not None else None
        cut = None if pre is None else next((c for c in reversed(pre.cuts) if c.start <= i), None)
        if cut is None:
            return None
        mask, q = kwargs.get("attention_mask"), hidden.shape[1]
        if mask is not None:
            kv = mask.shape[-1]
        else:  # no mask: the prompt columns, the tokens appended since and this call's
            kv = pre.width + cache.layers[i].get_seq_length() - cut.cols.shape[1] + q
        key = (id(mask), cut.start, kv)
        if key not in self.memo:
            self.memo[key] = decode_cut(mask, cut.cols, cut.valid, pre.width, kv, q, self.flash)
        out = {**kwargs, "attention_mask": self.memo[key]}
        if cut.shift is not None:  # renumbered prompt: a later token continues its numbering
            pos = kwargs.get("position_ids")
            key = ("positions", id(pos), id(kwargs["position_embeddings"]), cut.start)
            if key not in self.memo:
                if not isinstance(pos, Tensor) or pos.ndim != 2:
                    raise ValueError("positions='reindex' needs the 1-D position ids of the new tokens")
                new = pos.expand(cut.shift.shape[0], q) - cut.shift[:, None]
                self.memo[key] = (new, self._rotate(kwargs["position_embeddings"][0], new, i))
            out["position_ids"], out["position_embeddings"] = self.memo[key]
        return args, out


@dataclass
class _KVRun:
    """A KV-pressed prefill in flight."""

    layout: Layout
    inputs: tuple | None = None  # (hidden states, rotary embeddings) entering the current layer
    queries: Tensor | None = None  # its q_proj output, when every prompt row queries
    head_layout: Layout | None = None  # ``layout`` per KV head (per-head presses), made once
    mask: Tensor | None = None  # (B, L') the pressed cache's mask, once a layer is pressed
    kept: int = 0  # visual entries kept per KV head, over the batch


class KVStage:
    """``kv``: evicts / merges the visual entries of each layer's KV cache after it is written."""

    def __init__(self, adapter, press: KVPress):
        self.adapter, self.press = adapter, press
        self.layers = decoder_layers(adapter.lm)
        self.run: _KVRun | None = None

    def hooks(self) -> list:
        out = []
        for i in self.adapter.attention_layers():  # layers without softmax attention keep their cache
            layer = self.layers[i]
            out.append(layer.register_forward_pre_hook(partial(self._record, i), with_kwargs=True))
            out.append(layer.register_forward_hook(partial(self._evict, i), with_kwargs=True))
            if self.press.query == "all":  # every prompt row queries: keep the queries the layer projects
                out.append(layer.self_attn.q_proj.register_forward_hook(self._record_queries))
        return out

    def start(self, run: Prefill) -> None:
        self.run = _KVRun(run.layout)

    def _record_queries(self, module, args, output):
        if self.run is not None:
            self.run.queries = output

    def begin_call(self) -> None:
        self.run = None

    def finish(self, run: Prefill) -> None:
        """The pressed cache's one mask (every pressed layer holds the same entries per row)."""
        mine, self.run = self.run, None
        if mine is None or mine.mask is None:
            return
        record = run.record
        length = record.length if record is not None else run.layout.ids.shape[1]
        run.record = _Prefill(mask=mine.mask.long(), length=length, shift=record.shift if record is not None else None)
        run.stats.kept_visual_tokens, run.stats.kv_len = mine.kept, mine.mask.shape[1]
        run.stats.layer_avg_visual_tokens = float(mine.kept)

    def _record(self, i: int, module, args, kwargs):
        if self.run is not None:
            self.run.inputs = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

    def _evict(self, i: int, module, args, kwargs, output):
        run = self.run
        if run is None:
            return
        cache = self.adapter.protocol.cache_of(kwargs)
        if cache is None:
            return
        entry = cache.layers[i]
        sliding = type(entry).__name__ == "DynamicSlidingWindowLayer"
        if type(entry).__name__ != "DynamicLayer" and not sliding:
            raise ValueError(f"KV presses evict from a DynamicCache (the default cache); this cache's layer is a "
                             f"{type(entry).__name__}: pass no cache_implementation / past_key_values")
        if sliding and entry.cumulative_length != entry.keys.shape[-2]:
            raise ValueError(f"a KV press compacts the whole prompt's cache, but this sliding-window layer holds only "
                             f"the last {entry.keys.shape[-2]} of the prompt's {entry.cumulative_length} entries (the "
                             "prompt is longer than the window): use a pre-LLM or in-LLM press")
        press, (hidden, pe) = self.press, run.inputs
        keys, values = entry.keys, entry.values
        b, heads, w, d = keys.shape
        attn, _ = run.layout.attention(self.layers[i], hidden, pe, press.query, press.window, keys=keys,
                                       projected=run.queries)
        run.queries = None
        smooth = getattr(press, "smooth", None)
        if smooth is not None:  # votes smoothed along the whole prompt row, before any item is cut out
            rows, ok = run.layout.query_rows(press.query, press.window)
            queried = torch.zeros_like(run.layout.valid).scatter_(1, rows, ok)
            attn = smooth(attn, run.layout.valid & ~queried)
        kv = torch.cat([keys, values], dim=-1)  # (B, Hkv, W, 2d): an entry's key and value travel together
        if press.per_head:  # each KV head's entries are an item of their own: rows (b, h)
            layout = run.head_layout or _per_head(run.layout, heads)
            run.head_layout = layout
            x, scores = kv.reshape(b * heads, w, 2 * d), attn.reshape(-1)
        else:  # one selection for all heads: an entry is its keys and values over the heads
            layout, x, scores = run.layout, kv.transpose(1, 2).reshape(b, w, heads * 2 * d), attn.mean(dim=1).reshape(-1)

        groups = layout.groups()
        row_wise = press.per_head and hasattr(press, "press_kv_row")
        if row_wise:  # LOOK-M merges into its row's text entries: one image of a row per group, in turn
            text_ok = layout.valid & (layout.ids == TEXT)  # (B', W): its text entries, whole rows (no host sync)
            length, seq = layout.valid.sum(dim=1), layout.valid.long().cumsum(dim=1) - 1
            # a row's images in their order (the second sees the text the first merged into), and
            # never two of one row in a group: the group's rank among its row's images joins the key
            rank = _rank_in_row(layout.rows)
            groups = sorted(layout.groups([(r,) for r in rank]), key=lambda g: rank[g[0]])

        def press_group(members, flat, tokens):
            g, n = flat.shape
            parts = tokens.view(g, n, -1, 2 * d)  # (G, n, heads or 1, 2d)
            ctx = context(flat, w, columns={"llm_attn": scores}, llm_keys=parts[..., :d].flatten(2))
            k = press.budget(n)
            if k >= n:
                return tokens, torch.arange(n, device=tokens.device).expand(g, n)
            if not row_wise:
                kept_k, kept_v, index = press.press_kv(ctx.llm_keys, parts[..., d:].flatten(2), ctx, k)
            else:
                owner = flat[:, 0] // w  # one item per row in a group: no row written twice
                ctx.token_index, ctx.text_index = seq.view(-1)[flat], seq[owner]
                row, ok = x[owner], text_ok[owner]  # (G, W, 2d): the row's entries, its text where ok
                kept_k, kept_v, index, tk, tv = press.press_kv_row(
                    ctx.llm_keys, parts[..., d:].flatten(2), ctx, k, row[..., :d], row[..., d:], ok, length[owner])
                # the merged text written in place: x is this call's own tensor, and press_items
                # compacts from a view of it
                x[owner] = torch.where(ok[..., None], torch.cat([tk, tv], dim=-1).to(x.dtype), row)
            kept = torch.cat([kept_k.view(g, k, -1, d), kept_v.view(g, k, -1, d)], dim=-1)
            return kept.view(g, k, -1), index

        out, lengths = press_items(x, layout, groups, press_group)
        if out is None:  # every entry kept: the cache stays as it is
            return
        width = out.src.shape[1]
        if press.per_head:
            kv, mask = out.x.view(b, heads, width, 2 * d), out.layout.valid.view(b, heads, width)[:, 0]
        else:
            kv, mask = out.x.view(b, width, heads, 2 * d).transpose(1, 2), out.layout.valid
        entry.keys, entry.values = kv[..., :d].contiguous(), kv[..., d:].contiguous()
        if sliding:  # the layer sizes its window (and its masks) by the entries it has seen
            entry.cumulative_length = entry.keys.shape[-2]
        run.mask, run.kept = mask, sum(lengths) // (heads if press.per_head else 1)


def _rank_in_row(rows: list[int]) -> list[int]:
    """Each item's rank among the items of its row (items listed in sequence order)."""
    seen: dict[int, int] = defaultdict(int)
    out = []
    for row in rows:
        out.append(seen[row])
        seen[row] += 1
    return out


def _per_head(layout: Layout, heads: int) -> Layout:
    """``layout`` with every row repeated per KV head (row b * heads + h) and every item per head,
    listed in row-major order as ``Layout.flats`` finds them."""
    b, w = layout.ids.shape
    order = sorted((row, h, i) for i, row in enumerate(layout.rows) for h in range(heads))
    per_head = lambda t: t[:, None].expand(b, heads, w).reshape(b * heads, w)  # noqa: E731
    return Layout(per_head(layout.ids), per_head(layout.valid), [layout.token_ids[i] for _, _, i in order],
                  [layout.lengths[i] for _, _, i in order], [row * heads + h for row, h, _ in order],
                  [n for n in layout.row_lengths for _ in range(heads)])
