"""DART: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More" (Wen et al., 2025, arXiv 2502.11494; official code ZichenWen1/DART)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpress.ops.select import gather_tokens
from mmpress.presses.base import LayerPress, SelectorPress, VisualContext, register


@register
@dataclass
class DARTPress(SelectorPress):
    """Keeps a few pivot tokens and, for each pivot, the tokens LEAST duplicated with it.

    1. Pivots (paper: pivot token selection; official ``get_retained_image_token``): the
       ``image_pivots`` visual tokens and the ``text_pivots`` text tokens AFTER the image of
       largest L-``norm_p`` norm (official: L1 norm of the keys of LM layer K-1 = 1; defaults
       4 + 4 pivots, L1). Image pivots are kept; text pivots only guide.
    2. Duplication (paper: duplication-aware retention): pivot after pivot, in the order the
       official loop visits them (``for item in list(set(image_indices + query_indices))``:
       CPython's set order of their sequence indices, reproduced by :func:`set_order`), the
       tokens of lowest cosine similarity to it among the not-yet-kept visual tokens join the
       kept set; the k - image_pivots slots are split evenly over the pivots (official:
       ``max_num_trunction // #pivots`` each: ``keep = image_pivots + 8 T`` is the official
       ``max_num_trunction = 8 T``; another budget gives its remainder to the first visited).

    Pre-LLM variant (``dart_llm`` is DART at its official placement, layer 2 inside the language
    model; this press acts on the LM input, before any layer runs), where no layer has run: norms
    and cosines are taken on the projected visual tokens and the text input embeddings (official:
    layer-1 keys and the final-normed hidden states entering layer 2, which do not exist here).
    Everything else is the official selection. Equal norms (a repeated word of the prompt has one
    embedding) go to the earliest token (official: ``topk``'s order, which its kernel leaves
    undefined; forced by batching: a padded row must pick what it picks alone). An image with fewer text tokens after it than
    ``text_pivots`` spreads its budget over fewer pivots (official: fails). Batched over M images
    with per-image budgets (official: batch 1).
    A later turn: the selection made with the first prompt's text stays (a continued cache holds
    only the kept tokens); a new question re-selects only when the conversation is re-run under
    the press without the old cache.
    """

    image_pivots: int = 4
    text_pivots: int = 4
    norm_p: float = 1.0

    name = "dart"
    paper = "Wen et al., arXiv 2025, arXiv 2502.11494"
    needs = ("text",)

    def select(self, tokens: Tensor, ctx: VisualContext, k: int) -> Tensor:
        text, mask = (ctx.require("text"), ctx.require("text_mask")) if self.text_pivots else (None, None)
        return dart_select(tokens, tokens, text, text, mask, k, self.image_pivots, self.text_pivots, self.norm_p,
                           ctx.token_index, ctx.text_index)


def dart_select(tokens: Tensor, token_keys: Tensor, text: Tensor | None, text_keys: Tensor | None,
                text_mask: Tensor | None, k: int, image_pivots: int, text_pivots: int, norm_p: float,
                token_index: Tensor | None = None, text_index: Tensor | None = None) -> Tensor:
    """DART's selection for M images (official ``get_retained_image_token``): pivots are the
    ``image_pivots`` tokens and the ``text_pivots`` text tokens after the image (``text_index`` >
    the image's last ``token_index``; every valid text token when no index is given) of largest
    L-``norm_p`` norm of their ``*_keys``; then pivot after pivot, in the order the official code
    visits them (``list(set(image_indices + query_indices))``, the sequence indices in
    ``token_index`` / ``text_index``: :func:`set_order`), each claims its quota of the not yet
    claimed tokens least cosine-similar to it (on ``tokens`` / ``text``). Returns (M, k)."""
    m, n, _ = tokens.shape
    kept = _first_largest(token_keys.float().norm(p=norm_p, dim=-1), min(image_pivots, k))
    if kept.shape[1] == k:
        return kept
    pivots, valid = gather_tokens(tokens, kept).float(), torch.ones_like(kept, dtype=torch.bool)
    index = None if token_index is None else token_index.gather(1, kept)
    if text_pivots:
        after = text_mask if text_index is None else text_mask & (text_index > token_index[:, -1:])
        norm = text_keys.float().norm(p=norm_p, dim=-1).masked_fill(~after, -torch.inf)
        top = _first_largest(norm, min(text_pivots, text.shape[1]))
        pivots = torch.cat([pivots, gather_tokens(text.float(), top)], dim=1)
        valid = torch.cat([valid, after.gather(1, top)], dim=1)  # a valid prefix: topk puts -inf last
        if index is not None:
            index = torch.cat([index, text_index.gather(1, top)], dim=1)
    if index is not None:  # visit the pivots in the official set's iteration order
        order = set_order(index, valid.sum(dim=1))
        pivots, valid = gather_tokens(pivots, order), valid.gather(1, order)

    # per-image quota of each valid pivot: k - image pivots spread as evenly as possible, the
    # remainder to the first visited (official: budget // #pivots each)
    spare, count = k - kept.shape[1], valid.sum(dim=1, keepdim=True)
    rank = valid.long().cumsum(dim=1) - 1
    quota = torch.where(valid, spare // count + (rank < spare % count).long(), 0)

    dup = F.normalize(tokens.float(), dim=-1) @ F.normalize(pivots, dim=-1).transpose(1, 2)  # (M, N, P)
    free = torch.ones(m, n, dtype=torch.bool, device=tokens.device).scatter_(1, kept, False)
    most = -(-spare // kept.shape[1])  # a host bound on any quota (image pivots are always valid): no sync
    for j in range(pivots.shape[1]):
        least_dup = (-dup[:, :, j]).masked_fill(~free, -torch.inf).topk(most, dim=-1).indices
        take = torch.arange(most, device=tokens.device) < quota[:, j : j + 1]
        free &= ~torch.zeros_like(free).scatter_(1, least_dup, take)
    picked = (~free).scatter(1, kept, False)  # exactly `spare` per image
    chosen = picked.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :spare]
    return torch.cat([kept, chosen], dim=1)


def _first_largest(scores: Tensor, k: int) -> Tensor:
    """(M, k) indices of the k largest scores per row, largest first, equal scores to the lowest
    index (a stable sort: the same pick wherever padding puts the row)."""
    return scores.sort(dim=-1, descending=True, stable=True).indices[:, :k]


# CPython's set (Objects/setobject.c, unchanged since 3.7): LINEAR_PROBES, PERTURB_SHIFT, PySet_MINSIZE
_PROBES, _SHIFT, _MIN = 9, 5, 8


def _table_size(minused: int) -> int:
    """set_table_resize: the smallest power of two >= 8 above ``minused``."""
    size = _MIN
    while size <= minused:
        size <<= 1
    return size


def _pow5(t: Tensor, mod: int) -> Tensor:
    """5 ** t % mod elementwise, by squaring (no int64 overflow for mod < 2**31)."""
    out, base = torch.ones_like(t), torch.full_like(t, 5 % mod)
    for bit in range(max(int(mod).bit_length(), 1)):  # t < mod
        out = torch.where((t >> bit) & 1 == 1, out * base % mod, out)
        base = base * base % mod
    return out


def set_order(keys: Tensor, count: Tensor) -> Tensor:
    """The order in which CPython iterates ``set(keys[:count]).copy()`` (DART's pivot loop), per
    row: keys (M, P) distinct ints in [0, 2**31) (sequence indices), ``count`` (M,) how many of each row's leading
    keys are inserted. Returns (M, P) column indices, the inserted ones in iteration order first.

    An int hashes to itself; a set iterates its hash table slot by slot. ``set(list)`` inserts
    the keys in order into an 8-slot table (slot ``hash & mask``; an occupied slot probes the 9
    next ones while they fit in the table, then jumps to ``(5 i + 1 + perturb) & mask`` with
    ``perturb`` the hash shifted right by 5 more bits each jump), grows to the smallest power of
    two above 4 x used once ``fill * 5 >= mask * 3`` (re-inserting slot by slot), and ``copy``
    starts from 8 slots grown to twice the count (re-inserting slot by slot when the sizes differ).
    Vectorised over rows, with every probe sequence precomputed: no host sync."""
    m, p = keys.shape
    sizes, size = [], _MIN  # table size after u insertions: the same for every row that made them
    for u in range(1, p + 1):
        if u * 5 >= (size - 1) * 3:
            size = _table_size(u * 4)
        sizes.append(size)
    copies = [_table_size(2 * u) if u * 5 >= (_MIN - 1) * 3 else _MIN for u in range(1, p + 1)]
    width = max(sizes + copies)
    device, cols = keys.device, torch.arange(p, device=keys.device)
    shifts = -(-31 // _SHIFT)  # jumps until perturb is 0 (keys below 2**31)
    steps = torch.arange(width, device=device)
    # after perturb reached 0, i -> (5 i + 1) & mask visits every slot: i_t = 5^t i + (5^t - 1) / 4
    power = _pow5(steps, 4 * width)
    scale, offset = power % width, (power - 1) // 4 % width
    linear = torch.arange(_PROBES + 1, device=device)

    def probes(mask: Tensor) -> tuple[Tensor, Tensor]:
        """(M, P, S) candidate slots of every key in probe order, and whether each is probed."""
        i, perturb, starts = keys & mask, keys, []
        for _ in range(shifts):
            starts.append(i)
            perturb = perturb >> _SHIFT
            i = (i * 5 + 1 + perturb) & mask
        starts = torch.cat([torch.stack(starts, dim=-1), (scale * i[..., None] + offset) & mask[..., None]], dim=-1)
        slots = starts[..., None] + linear  # (M, P, R, 10)
        ok = (linear == 0) | (starts + _PROBES <= mask[..., None])[..., None]
        return slots.flatten(2).clamp(max=width - 1), ok.flatten(2)

    def insert(table: Tensor, cand: tuple[Tensor, Tensor], col: Tensor, active: Tensor) -> Tensor:
        slots, ok = (t.gather(1, col[:, None, None].expand(m, 1, t.shape[2]))[:, 0] for t in cand)
        free = ok & (table.gather(1, slots) < 0)
        slot = slots.gather(1, free.long().argmax(dim=1, keepdim=True))  # the first free candidate
        return torch.where(active[:, None] & (steps == slot), col[:, None], table)

    def reinsert(table: Tensor, mask: Tensor, moved: Tensor) -> Tensor:
        cand, out = probes(mask.expand(m, p)), torch.where(moved[:, None], -1, table)
        for s in range(width):
            out = insert(out, cand, table[:, s].clamp(min=0), moved & (table[:, s] >= 0))
        return out

    table, mask, prev = keys.new_full((m, width), -1), keys.new_full((m, 1), _MIN - 1), _MIN
    cand = probes(mask.expand(m, p))
    for j in range(p):
        active = count > j
        table = insert(table, cand, cols[j].expand(m), active)
        if sizes[j] != prev:  # the rows that made this insertion grow their table
            mask = torch.where(active[:, None], sizes[j] - 1, mask)
            table, prev = reinsert(table, mask, active), sizes[j]
            cand = probes(mask.expand(m, p))
    copied = torch.full_like(count, _MIN)
    for u, (before, after) in enumerate(zip([_MIN, *copies], copies), start=1):
        if after != before:
            copied = torch.where(count >= u, after, copied)
    copied = copied[:, None] - 1
    table = reinsert(table, copied, (copied != mask)[:, 0])
    order = torch.cat([cols + width, cols.new_zeros(1)]).repeat(m, 1)  # not inserted: last, in column order
    order.scatter_(1, torch.where(table >= 0, table, p), steps.expand(m, width))  # (empty slots: column p)
    return order[:, :p].argsort(dim=1, stable=True)


@register
@dataclass
class DARTLLMPress(LayerPress):
    """DART at its official placement: inside the language model, before decoder layer K
    (``layer``, default 2; official ``--pruned_layer 2``, ``DART_K_norm``).

    Signals (official ``get_retained_image_token``): pivots are the 4 visual tokens and the 4
    text tokens after the image of largest L1 norm of their key states in layer K-1 (rotated
    keys, flattened over heads: ``ctx.llm_keys``, ``ctx.llm_text_keys``); duplication is the
    cosine similarity of the hidden states entering layer K after the language model's FINAL
    norm (``self.norm(layer_outputs[0])``: ``ctx.llm_normed``, ``ctx.llm_text_normed``; the
    norm's per-channel weight changes cosines, so the raw states would select differently);
    pivots are visited in the official set order and each claims its share of the least
    duplicated tokens (``dart_select``). Dropped tokens are gone from layer K on; kept ones keep
    their position ids (official: ``position_ids = keep_indexs``).

    Budget: ``keep`` per image; ``keep = 4 + 8 T`` is the official ``max_num_trunction = 8 T``
    (T per pivot), another budget gives its remainder to the first visited pivots. Deviations,
    forced by batching: per image at batch > 1 (official: batch 1, one image); sequence
    indices (which fix the set order) count from each row's first token. Cosines are computed
    in float32. The keys are rotated at the positions the call gives, as in the official code, and
    an L1 norm of rotated keys depends on the absolute position: a left-padded batch selects per
    row what each row selects alone when its positions count from the row's first token
    (``generate`` passes such ``position_ids``; a plain forward without them numbers a padded row
    from the first column, transformers' default, and selects for those positions). ``dart`` is the pre-LLM variant. A later turn's question does not re-select: the
    tokens dropped at layer K stay dropped there.
    """

    layer: int = 2
    image_pivots: int = 4
    text_pivots: int = 4
    norm_p: float = 1.0

    name = "dart_llm"
    paper = "Wen et al., arXiv 2025, arXiv 2502.11494 (official placement, layer 2)"
    needs = ("llm_keys", "llm_normed", "text")

    def signal_layer(self, layer: int) -> int:
        return layer - 1

    def compress(self, tokens, ctx, k):
        index = dart_select(ctx.require("llm_normed"), ctx.require("llm_keys"), ctx.require("llm_text_normed"),
                            ctx.require("llm_text_keys"), ctx.require("text_mask"), k, self.image_pivots,
                            self.text_pivots, self.norm_p, ctx.token_index, ctx.text_index)
        return gather_tokens(tokens, index), index
