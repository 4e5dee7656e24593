"""Where the media tokens of a batch sit, how a stage presses them, and the one place a press's
context is built. Family-neutral: every stage (pre-LLM, in-LLM, KV) uses these.

A :class:`Layout` marks each column of the sequence a stage runs on: the placeholder id of a
pressable media token, ``TEXT`` (-1) for text (and padding), ``FIXED`` (-2) for a media token every
press keeps in place and never sees (LLaVA-NeXT's newline tokens). :func:`press_items` presses the
items group by group (items of one shape together) and compacts the rows: each row keeps its text,
its fixed tokens and what the press kept of its items, re-padded on the LEFT to the longest pressed
row, a width known on the host (the rows' real lengths are read once per prefill, with the
placeholder counts), so nothing syncs. :func:`context` gives a group its ``VisualContext``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from mmpress.models.lm import queries_keys
from mmpress.ops.attention import received_attention
from mmpress.ops.sequence import compact_index, flat_positions, gather_rows
from mmpress.presses.base import VisualContext

TEXT, FIXED = -1, -2


@dataclass
class Layout:
    """Where the media tokens of a prompt sit in the sequence a stage runs on.

    ids (B, W): the placeholder id of each pressable media column, ``TEXT`` or ``FIXED`` elsewhere;
    valid (B, W): False in padding; token_ids / lengths / rows: per item (placeholder order), its id,
    its pressable token count and its batch row; row_lengths: each row's real (unpadded) length.
    token_ids, lengths, rows and row_lengths are host integers."""

    ids: Tensor
    valid: Tensor
    token_ids: list[int]
    lengths: list[int]
    rows: list[int]
    row_lengths: list[int]

    @property
    def uniform(self) -> bool:
        """No row is padded (the model's mask may be None: SDPA runs causal)."""
        return all(n == self.ids.shape[1] for n in self.row_lengths)

    def flats(self) -> list[Tensor]:
        """Flat index into (B * W) of each item's pressable tokens, in order (no host sync)."""
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
        (a host bound: a row's length less its pressable media tokens), and (B, T) their validity."""
        media = [0] * len(self.row_lengths)
        for row, n in zip(self.rows, self.lengths):
            media[row] += n
        return compact_index(self.valid & (self.ids == TEXT), max(n - m for n, m in zip(self.row_lengths, media)))

    def attention(self, layer, hidden: Tensor, position_embeddings, query: str, window: int,
                  keys: Tensor | None = None, projected: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, Hkv, W) attention each column receives from the query rows at ``layer``, and the
        (B, Hkv, W, d) rotated keys (``keys``, if the cache holds them, else recomputed;
        ``projected``: the layer's own ``q_proj`` output, if kept)."""
        rows, ok = self.query_rows(query, window)
        q, k, scaling = queries_keys(layer, hidden, position_embeddings, rows, keys=keys is None, projected=projected)
        k = keys if keys is not None else k
        return received_attention(q, k, rows, ok, self.valid, scaling), k

    def sequence_index(self) -> Tensor:
        """(B, W) each column's index in the sequence its row runs on (0: the row's first token)."""
        return self.valid.long().cumsum(dim=1) - 1

    def groups(self, extra: list | None = None) -> list[list[int]]:
        """Items pressed together: those of one placeholder id and length (and ``extra[i]``)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (token_id, n) in enumerate(zip(self.token_ids, self.lengths)):
            groups[(token_id, n, *(extra[i] if extra else ()))].append(i)
        return list(groups.values())


def input_layout(input_ids: Tensor, valid: Tensor, items: list, rows: list[int], row_lengths: list[int]) -> Layout:
    """The layout of the language model's unpressed input: the placeholder columns of ``items``
    (``fixed`` ones marked FIXED), ``valid`` (B, L) False in padding (transformers checked the
    placeholder counts against the features when it scattered them)."""
    ids = torch.full_like(input_ids, TEXT)
    for token_id in {item.token_id for item in items}:
        ids = torch.where(input_ids == token_id, token_id, ids)
    lengths = [item.length for item in items]
    layout = Layout(ids, valid, [item.token_id for item in items], lengths, list(rows), list(row_lengths))
    fixed = [(flat, item.fixed) for flat, item in zip(layout.flats(), items) if item.fixed]
    if fixed:  # host indices within each item: one index_fill for the batch
        index = torch.cat([flat[list(f)] for flat, f in fixed])
        layout.ids = ids.view(-1).index_fill(0, index, FIXED).view(ids.shape)
        layout.lengths = [item.length - len(item.fixed) for item in items]
    return layout


@dataclass
class Compacted:
    """A batch after its items were pressed: ``x`` (B, W', D) the kept tokens, re-padded on the
    left to the longest row; ``src`` (B, W') the input column each holds; ``keep`` (B, W) the input
    columns kept; ``layout`` the media tokens of the compacted sequence."""

    x: Tensor
    src: Tensor
    keep: Tensor
    layout: Layout


def press_items(x: Tensor, layout: Layout, groups, press_group) -> tuple[Compacted | None, list[int]]:
    """Press the items of ``x`` (B, W, D) group by group and compact the rows, without host syncs
    (the width follows from host facts: the rows' lengths, item lengths and rows). ``groups``:
    lists of items of equal shape; ``press_group(members, flat, tokens)`` -> (kept (G, k, D),
    index (G, k)) for one group (``flat`` (G, n): the flat positions of its tokens in ``x``).
    Returns the compacted batch (None when every token is kept: the caller leaves its call
    untouched) and the kept tokens per item."""
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
    row_lengths = [n - d for n, d in zip(layout.row_lengths, dropped)]
    src, valid = compact_index(keep, max(row_lengths))  # the longest pressed row sets the width
    ids = gather_rows(layout.ids.masked_fill(~keep, TEXT), src).masked_fill(~valid, TEXT)
    out = Layout(ids, valid, layout.token_ids, lengths, layout.rows, row_lengths)
    return Compacted(gather_rows(values.view(b, w, dim), src), src, keep, out), lengths


def context(flat: Tensor, width: int, item=None, columns: dict | None = None, rows: dict | None = None,
            row_columns: dict | None = None, **given) -> VisualContext:
    """The one builder of a group's ``VisualContext``. ``flat`` (G, n): the flat positions of the
    group's tokens in a (B, ``width``) sequence; ``item`` (any of the group, whole: not yet pressed
    by an earlier stage) gives its structure (kind, grid, parts). Each entry of ``columns`` is a
    per-column tensor (B * width, ...) taken at the group's tokens; of ``rows`` a per-row tensor
    (B, ...) taken at each item's row; of ``row_columns`` a per-row tensor (B, R, width) taken at
    each item's row and its tokens' columns; ``given`` are set as they are."""
    ctx = VisualContext()
    if item is not None:
        ctx.kind, ctx.parts = item.kind, item.parts
        if item.grid is not None:
            t, h, w = item.grid
            # a video's raster order over (t, h, w) is the raster order of a (t*h) x w grid, so
            # 2-D presses (uniform, pool) run unchanged; video-aware presses read grid_thw
            ctx.grid, ctx.grid_thw = (t * h, w), item.grid
    owner = flat[:, 0] // width  # the row of each item, on the device
    for name, values in (columns or {}).items():
        setattr(ctx, name, values[flat])
    for name, values in (rows or {}).items():
        setattr(ctx, name, values[owner])
    for name, values in (row_columns or {}).items():  # (B, R, W) -> (G, R, n)
        per_row = values[owner]
        setattr(ctx, name, per_row.gather(2, (flat % width)[:, None].expand(-1, per_row.shape[1], -1)))
    for name, value in given.items():
        setattr(ctx, name, value)
    return ctx
