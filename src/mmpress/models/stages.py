"""The ``in_llm`` and ``kv`` stages: small classes that own their hooks on the language model's
decoder layers. Family-neutral (the language model is reached through ``models/lm.py``); the
adapter core starts them on a fresh prefill with visual tokens and keeps what decoding needs.

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

from collections import defaultdict
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import Tensor

from mmpress.models.lm import cut_mask, decode_cut, decoder_layers, final_norm, queries_keys, rotary_embedding
from mmpress.ops.attention import attention_rows, received_attention
from mmpress.ops.sequence import compact_index, flat_positions, gather_rows
from mmpress.presses.base import KVPress, LayerPress, VisualContext


@dataclass
class Layout:
    """Where the visual tokens of a prompt sit in the sequence the language model runs on.

    ids (B, W): the placeholder id of each visual column, -1 elsewhere; valid (B, W): False in
    padding; token_ids / lengths: per item (placeholder order), its id and token count (host)."""

    ids: Tensor
    valid: Tensor
    token_ids: list[int]
    lengths: list[int]
    rows: list[int]
    uniform: bool  # no row is padded (the model's mask may be None: SDPA runs causal)

    def flats(self) -> list[Tensor]:
        """Flat index into (B * W) of each item's tokens, in order (no host sync)."""
        out: list[Tensor] = [None] * len(self.lengths)  # type: ignore[list-item]
        for token_id in dict.fromkeys(self.token_ids):
            mine = [i for i, t in enumerate(self.token_ids) if t == token_id]
            sizes = [self.lengths[i] for i in mine]
            for i, chunk in zip(mine, flat_positions(self.ids == token_id, sum(sizes)).split(sizes)):
                out[i] = chunk
        return out

    def query_rows(self, query: str, window: int) -> tuple[Tensor, Tensor]:
        """(B, R) columns of the query rows and (B, R) their validity: the last token ("last"),
        the last ``window`` tokens ("window"), every text token ("text") or every token ("all")."""
        b, w = self.valid.shape
        cols = torch.arange(w, device=self.valid.device)
        if query == "all":
            return cols.expand(b, w), self.valid
        last = cols.masked_fill(~self.valid, -1).amax(dim=1, keepdim=True)  # (B, 1)
        if query in ("last", "window"):
            size = 1 if query == "last" else min(window, w)
            rows = last - torch.arange(size - 1, -1, -1, device=last.device)
            ok = rows >= 0
            rows = rows.clamp(min=0)
            return rows, ok & self.valid.gather(1, rows)
        if query == "text":
            return self.text_rows()
        raise ValueError(f"unknown query rows {query!r}: use 'last', 'window', 'text' or 'all'")

    def text_rows(self) -> tuple[Tensor, Tensor]:
        """(B, T) columns of each row's text tokens, left-aligned in T = the most any row holds
        (a host fact: the row with the fewest visual tokens), and (B, T) their validity."""
        visual_per_row = [0] * self.valid.shape[0]
        for row, n in zip(self.rows, self.lengths):
            visual_per_row[row] += n
        return compact_index(self.valid & (self.ids < 0), self.valid.shape[1] - min(visual_per_row))

    def attention(self, layer, hidden: Tensor, position_embeddings, query: str, window: int,
                  keys: Tensor | None = None, projected: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, Hkv, W) attention each column receives from the query rows at ``layer``, and the
        (B, Hkv, W, d) rotated keys (``keys``, if the cache holds them, else recomputed;
        ``projected``: the layer's own ``q_proj`` output, if kept)."""
        rows, ok = self.query_rows(query, window)
        q, k, scaling = queries_keys(layer, hidden, position_embeddings, rows, keys=keys is None, projected=projected)
        k = keys if keys is not None else k
        return received_attention(q, k, rows, ok, self.valid, scaling), k


def sequence_index(layout: Layout, flat: Tensor, text_cols: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
    """The index in the sequence its row runs on (0: the row's first token) of each item's tokens
    (``flat`` (G, n): their flat positions) and of its row's text tokens (``text_cols`` (B, T),
    ``owner`` (G,): the row of each item): what a batch-1 official implementation indexes by."""
    index = layout.valid.long().cumsum(dim=1) - 1
    return index.view(-1)[flat], index.gather(1, text_cols)[owner]


def _group(layout: Layout, extra: list | None = None) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (token_id, n) in enumerate(zip(layout.token_ids, layout.lengths)):
        groups[(token_id, n, *(extra[i] if extra else ()))].append(i)
    return groups


@dataclass
class Compacted:
    """A batch after its items were pressed: ``x`` (B, W', D) the kept tokens, re-padded on the
    left; ``src`` (B, W') the input column each holds; ``keep`` (B, W) the input columns kept;
    ``layout`` the visual tokens of the compacted sequence."""

    x: Tensor
    src: Tensor
    keep: Tensor
    layout: Layout


def press_items(x: Tensor, layout: Layout, groups, press_group) -> tuple[Compacted | None, list[int]]:
    """Press the items of ``x`` (B, W, D) group by group and compact the rows, without host syncs
    (the width follows from host facts: item lengths and rows). ``groups``: lists of items of equal
    shape; ``press_group(members, flat, tokens)`` -> (kept (G, k, D), index (G, k)) for one group
    (``flat`` (G, n): the flat positions of its tokens in ``x``). Returns the compacted batch (None
    when every token is kept: the caller leaves its call untouched) and the kept tokens per item."""
    b, w, dim = x.shape
    flats, values = layout.flats(), x.reshape(b * w, dim)
    lengths, dropped = list(layout.lengths), [0] * b
    kept_flat, kept_values = [], []
    for members in groups:
        flat = torch.stack([flats[i] for i in members])  # (G, n)
        kept, index = press_group(members, flat, values[flat])
        n, k = flat.shape[1], index.shape[1]
        for i in members:
            dropped[layout.rows[i]] += n - k
            lengths[i] = k
        kept_flat.append(flat.gather(1, index).reshape(-1))  # whole items too: their tokens stay
        kept_values.append(kept.reshape(-1, dim).to(x.dtype))
    if not any(dropped):
        return None, lengths
    kept_all = torch.cat(kept_flat)
    values = values.index_copy(0, kept_all, torch.cat(kept_values))
    keep = (layout.valid & (layout.ids < 0)).view(-1).index_fill(0, kept_all, True).view(b, w)
    src, valid = compact_index(keep, w - min(dropped))  # the row losing fewest tokens sets the width
    ids = gather_rows(layout.ids.masked_fill(~keep, -1), src).masked_fill(~valid, -1)
    # rows lost equal counts from an unpadded sequence: still unpadded (the model's mask may stay None)
    uniform = layout.uniform and len(set(dropped)) == 1
    out = Layout(ids, valid, layout.token_ids, lengths, layout.rows, uniform)
    return Compacted(gather_rows(values.view(b, w, dim), src), src, keep, out), lengths


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


class LayerStage:
    """``in_llm``: presses the hidden states entering the press's layers (see the module doc)."""

    def __init__(self, adapter, press: LayerPress):
        if getattr(press, "positions", "keep") is None:  # the official numbering where the family has 1-D RoPE
            press = replace(press, positions="reindex" if "reindex" in adapter.position_modes else "keep")
        self.adapter, self.press = adapter, press
        self.layers = decoder_layers(adapter.vlm.language_model)
        starts = press.layers()
        n = len(self.layers)
        if list(starts) != sorted(set(starts)) or starts[-1] >= n:
            raise ValueError(f"{type(press).__name__} presses at layers {starts}, but the language model has {n} "
                             f"decoder layers (0..{n - 1}): pick ascending layers below {n}")
        self.signal = {s: press.signal_layer(s) for s in starts}
        for prev, s in zip((-1, *starts), starts):
            if not max(prev, 0) <= self.signal[s] <= s:
                raise ValueError(f"the signal layer of layer {s} must lie in [{max(prev, 0)}, {s}]")
        self.starts = starts
        # a press renumbering the kept sequence (PyramidDrop's official numbering) needs 1-D RoPE
        self.rotary = None
        if getattr(press, "positions", "keep") == "reindex":
            if "reindex" not in adapter.position_modes:
                raise ValueError(f"{type(press).__name__}(positions='reindex') renumbers the kept tokens 0..L'-1, "
                                 f"which is defined for 1-D RoPE only; this {adapter.family} model numbers "
                                 "positions with M-RoPE (t, h, w): pass positions='keep' (original ids)")
            self.rotary = rotary_embedding(adapter.vlm.language_model)
        impl = getattr(adapter.vlm.language_model.config, "_attn_implementation", "sdpa") or "sdpa"
        self.flash = "flash" in impl
        self.run: _Run | None = None
        self.memo: dict = {}

    def hooks(self) -> list:
        watch = sorted(set(range(self.starts[0], len(self.layers))) | set(self.signal.values()))
        return [self.layers[i].register_forward_pre_hook(partial(self._hook, i), with_kwargs=True) for i in watch]

    def start(self, layout: Layout, embeds: Tensor) -> None:
        b, w = layout.ids.shape
        cols = torch.arange(w, device=layout.ids.device).expand(b, w)
        self.run = _Run(layout, list(layout.lengths), layout.flats(), embeds, cols, input_valid=layout.valid)
        self.memo = {}

    def begin_call(self) -> None:
        self.run, self.memo = None, {}

    def finish(self) -> tuple[list[_Cut], list[tuple[int, int]]]:
        run, self.run = self.run, None
        return ([], []) if run is None else (run.cuts, run.counts)

    # ---- the hook ---------------------------------------------------------------------------
    def _hook(self, i: int, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.run is None:
            return self._decoding(i, args, hidden, kwargs)
        run, given = self.run, kwargs
        kwargs = self._cut_inputs(run, given)
        if i in self.starts:
            hidden = self._press_at(i, run, hidden, kwargs, given)
            kwargs = self._cut_inputs(run, given)
        if any(sig == i != start for start, sig in self.signal.items()):  # a later stage scores with layer i
            run.recorded[i] = (hidden, kwargs["position_embeddings"])
        if not run.cuts:
            return None
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _cut_inputs(self, run: _Run, kwargs: dict) -> dict:
        """The layer's mask / rotary embeddings / position ids (as the model loop passes every
        layer: for its input's full width) cut to the current columns, once per stage."""
        if not run.cuts:
            return kwargs
        cut, out = run.cuts[-1], dict(kwargs)
        b = cut.cols.shape[0]
        for name, value in kwargs.items():
            key = (name, id(value), len(run.cuts))
            if key not in run.memo:
                if name == "attention_mask":
                    run.memo[key] = cut_mask(value, cut.cols, cut.valid, cut.cols, self.flash,
                                             square_causal_ok=run.layout.uniform)
                elif name == "position_embeddings" and value is not None:  # (cos, sin): (B, W, d)
                    if cut.positions is not None:
                        run.memo[key] = self.rotary(value[0], cut.positions)
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
            out["text_hidden"], out["text_cols"] = gather_rows(hidden, rows), rows
            if "keys" in out:
                out["text_keys"] = gather_rows(out["keys"].view(b, w, -1), rows)
        if "llm_normed" in needs:
            out["normed"] = final_norm(self.adapter.vlm.language_model)(hidden)
        return out

    def _context(self, signals: dict, run: _Run, flat: Tensor, first: Tensor, w: int) -> VisualContext:
        ctx, owner = VisualContext(), flat[:, 0] // w
        if "attn" in signals:
            ctx.llm_attn = signals["attn"][flat]
        if "keys" in signals:
            ctx.llm_keys = signals["keys"][flat]
        if "rows" in signals:  # (G, R, n)
            ctx.llm_attn_rows = signals["rows"][owner].gather(2, (flat % w)[:, None].expand(-1, signals["rows"].shape[1], -1))
        if "text" in signals:
            ctx.text, ctx.text_mask = signals["text"][owner], signals["text_mask"][owner]
            ctx.text_hidden = signals["text_hidden"][owner]
            if "text_keys" in signals:
                ctx.llm_text_keys = signals["text_keys"][owner]
            ctx.token_index, ctx.text_index = sequence_index(run.layout, flat, signals["text_cols"], owner)
        if "normed" in signals:
            normed = signals["normed"]
            ctx.llm_normed = normed.reshape(-1, normed.shape[-1])[flat]
            ctx.llm_text_normed = gather_rows(normed, signals["text_cols"])[owner]
        if "visual_inputs" in self.press.needs:
            ctx.visual_inputs = run.embeds.reshape(-1, run.embeds.shape[-1])[first]
        return ctx

    def _press_at(self, i: int, run: _Run, hidden: Tensor, kwargs: dict, given: dict) -> Tensor:
        """Press every item at layer ``i``; returns the compacted hidden states (``kwargs``: the
        layer's inputs cut to the current columns, ``given``: as the model passed them)."""
        press, layout = self.press, run.layout
        signals = self._signals(i, run, hidden, kwargs)
        stage, w = self.starts.index(i), hidden.shape[1]
        groups = _group(layout, [(f,) for f in run.first])

        def press_group(members, flat, tokens):
            first = torch.stack([run.first_flats[m] for m in members])
            k = min(press.budgets(run.first[members[0]])[stage], flat.shape[1])
            return press.press(tokens, self._context(signals, run, flat, first, w), k)

        out, lengths = press_items(hidden, layout, groups.values(), press_group)
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
            key = ("positions", id(pos), cut.start)
            if key not in self.memo:
                if not isinstance(pos, Tensor) or pos.ndim != 2:
                    raise ValueError("positions='reindex' needs the 1-D position ids of the new tokens")
                new = pos.expand(cut.shift.shape[0], q) - cut.shift[:, None]
                self.memo[key] = (new, self.rotary(kwargs["position_embeddings"][0], new))
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
        self.layers = decoder_layers(adapter.vlm.language_model)
        self.run: _KVRun | None = None

    def hooks(self) -> list:
        out = []
        for i, layer in enumerate(self.layers):
            out.append(layer.register_forward_pre_hook(partial(self._record, i), with_kwargs=True))
            out.append(layer.register_forward_hook(partial(self._evict, i), with_kwargs=True))
            if self.press.query == "all":  # every prompt row queries: keep the queries the layer projects
                out.append(layer.self_attn.q_proj.register_forward_hook(self._record_queries))
        return out

    def start(self, layout: Layout, embeds: Tensor) -> None:
        self.run = _KVRun(layout)

    def _record_queries(self, module, args, output):
        if self.run is not None:
            self.run.queries = output

    def begin_call(self) -> None:
        self.run = None

    def finish(self):
        run, self.run = self.run, None
        return run

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
        if type(entry).__name__ != "DynamicLayer":
            raise ValueError(f"KV presses evict from a DynamicCache (the default cache); this cache's layer is a "
                             f"{type(entry).__name__}: pass no cache_implementation / past_key_values")
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

        groups = _group(layout).values()
        row_wise = press.per_head and hasattr(press, "press_kv_row")
        if row_wise:  # LOOK-M merges into its row's text entries: one image of a row per group, in turn
            text_ok = layout.valid & (layout.ids < 0)  # (B', W): its text entries, whole rows (no host sync)
            length, seq = layout.valid.sum(dim=1), layout.valid.long().cumsum(dim=1) - 1
            # a row's images in their order (the second sees the text the first merged into), and
            # never two of one row in a group: the group's rank among its row's images joins the key
            rank = _rank_in_row(layout.rows)
            groups = [g for _, g in sorted(_group(layout, [(r,) for r in rank]).items(), key=lambda kv: kv[0][-1])]

        def press_group(members, flat, tokens):
            g, n = flat.shape
            parts = tokens.view(g, n, -1, 2 * d)  # (G, n, heads or 1, 2d)
            ctx = VisualContext(llm_attn=scores[flat], llm_keys=parts[..., :d].flatten(2))
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
                  [layout.lengths[i] for _, _, i in order], [row * heads + h for row, h, _ in order], layout.uniform)
