"""GlobalCom2: "Global Compression Commander: Plug-and-Play Inference Acceleration for High-Resolution
Large Vision-Language Models" (Liu et al., AAAI 2026, arXiv 2501.05179; official code xuyang-liu16/GlobalCom2).

Also the AnyRes layout every per-crop press reads (:func:`anyres_layout`): LLaVA-NeXT's base image
(the thumbnail) and the crops its unpadded tiles were cut from.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpress.presses.base import SelectorPress, VisualContext, register


# ---- AnyRes layout ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """One sub-image of an item as its official code sees it: the base (thumbnail), one crop, or
    the whole image when the item has no parts. ``index``: its tokens' indices among the item's
    pressable tokens, in the piece's own raster order; ``grid`` (h, w) of that raster (None if
    not one); ``crop`` (row, col) of a crop in the crop grid."""

    role: str
    index: Tensor
    grid: tuple[int, int] | None
    crop: tuple[int, int] | None = None


@dataclass(frozen=True)
class AnyRes:
    """An AnyRes item: ``pieces`` (the base, then every crop row-major, empty crops included with
    no tokens); ``crops`` (rows, cols); ``tiles`` the tiles part (None without tiles);
    ``crop_of`` (H' W',) the crop index of each tiles token in the tiles' (unpadded) raster;
    ``piece_of`` (N,) the piece of each token; ``sizes`` the pieces' token counts (``counts`` the
    same as a tensor). Tensors live on
    the device the layout was made for (made once per layout and device: no copies per call)."""

    pieces: tuple[Piece, ...]
    piece_of: Tensor
    sizes: tuple[int, ...]
    counts: Tensor
    crops: tuple[int, int] = (0, 0)
    base: object | None = None
    tiles: object | None = None
    crop_of: Tensor | None = None


def anyres_layout(parts: tuple, n: int, grid: tuple[int, int] | None, press: str, device=None) -> AnyRes:
    """The sub-images of an item of ``n`` pressable tokens from its ``ctx.parts``.

    No parts: one piece, the whole image (``grid`` from ``ctx.grid``). A "base" part: the
    thumbnail. A "tiles" part (LLaVA-NeXT's crops after unpadding, one (1, H', W') raster over the
    padded canvas of rows x cols crops, each as large as the base grid): its crops need the crop
    grid, ``crops = (rows, cols)`` (``models.llava_next.TilesPart``); the unpadding is symmetric
    (transformers' ``unpad_image`` keeps rows ``pad .. C - pad``), so the raster's offset in the
    canvas is (C - H') / 2. Tiles without a crop grid (OneVision's ``anyres_max_N`` shrink mixes
    crops) are one sub-image. Any other part (InternVL's, Idefics3's tiles) is one piece of its
    own grid.
    """
    layout = _layout(tuple(parts), n, tuple(grid) if grid is not None else None, press)
    return layout if device is None else _on(layout, torch.device(device))


@functools.lru_cache(maxsize=64)
def _on(layout: AnyRes, device: torch.device) -> AnyRes:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    pieces = tuple(Piece(p.role, move(p.index), p.grid, p.crop) for p in layout.pieces)
    return AnyRes(pieces, move(layout.piece_of), layout.sizes, move(layout.counts), layout.crops, layout.base,
                  layout.tiles, move(layout.crop_of))


@functools.lru_cache(maxsize=64)
def _layout(parts: tuple, n: int, grid, press: str) -> AnyRes:
    if not parts:
        return AnyRes((Piece("image", torch.arange(n), grid),), torch.zeros(n, dtype=torch.long), (n,),
                      torch.full((1,), n))
    starts = [sum(q.length for q in parts[:i]) for i in range(len(parts))]
    if sum(p.length for p in parts) != n or [p.start for p in parts] != starts:
        raise ValueError(f"{press}: the item's parts {parts} do not tile its {n} pressable tokens")
    pieces, base, tiles, crops, crop_of = [], None, None, (0, 0), None
    for part in parts:
        raster = part.grid[1:] if part.grid is not None and part.grid[0] == 1 else None
        if part.role == "tiles":
            if base is None or base.grid is None or raster is None:
                raise ValueError(f"{press} reads an AnyRes image as its 'base' part (a raster) then its 'tiles' part "
                                 f"(a (1, H', W') raster); got parts {parts}")
            tiles, rows_cols = part, getattr(part, "crops", None)
            if rows_cols is None:  # no crop grid (OneVision's shrunk raster): the tiles are one sub-image
                crops, crop_of = (1, 1), torch.zeros(part.length, dtype=torch.long)
                pieces.append(Piece("tiles", torch.arange(part.start, part.start + part.length), raster))
            else:
                crops = tuple(rows_cols)
                new_pieces, crop_of = _crops(part.start, raster, base.grid[1:], crops, press)
                pieces += new_pieces
        else:
            if part.role == "base":
                base = part
            pieces.append(Piece(part.role, torch.arange(part.start, part.start + part.length), raster))
    piece_of = torch.empty(n, dtype=torch.long)
    for i, piece in enumerate(pieces):
        piece_of[piece.index] = i
    sizes = tuple(p.index.numel() for p in pieces)
    return AnyRes(tuple(pieces), piece_of, sizes, torch.tensor(sizes), crops, base, tiles, crop_of)


def _crops(start: int, raster: tuple[int, int], side: tuple[int, int], crops: tuple[int, int], press: str):
    (h, w), (th, tw), (rows, cols) = raster, side, crops
    pad = (rows * th - h, cols * tw - w)
    if min(pad) < 0 or pad[0] % 2 or pad[1] % 2:
        raise ValueError(f"{press}: tiles of {raster} tokens do not fit a {rows}x{cols} grid of {side} crops with "
                         "symmetric padding (transformers' unpad_image)")
    y = torch.arange(h) + pad[0] // 2  # canvas row of each tiles row
    x = torch.arange(w) + pad[1] // 2
    crop_of = ((y // th)[:, None] * cols + (x // tw)[None, :]).flatten()  # (H' W',)
    pieces = []
    for r in range(rows):
        for c in range(cols):
            local = (crop_of == r * cols + c).nonzero().flatten()  # raster order within the crop
            hr, wc = int(((y // th) == r).sum()), int(((x // tw) == c).sum())
            pieces.append(Piece("crop", local + start, (hr, wc) if local.numel() else (0, 0), (r, c)))
    return pieces, crop_of


def split_evenly(k: int, sizes: list[int]) -> list[int]:
    """Official per-sub-image budget of HiPrune / SCOPE (``int(R / B)`` for each of B sub-images),
    made exact: k split as evenly as the sizes allow, each piece at most its size, the remainder one
    token each to the first pieces with room (the base first)."""
    quota, left = [0] * len(sizes), k
    while left > 0:
        open_ = [i for i, s in enumerate(sizes) if quota[i] < s]
        if not open_:
            raise ValueError(f"budget {k} exceeds the {sum(sizes)} tokens of the sub-images")
        share = left // len(open_)
        if share == 0:
            for i in open_[:left]:
                quota[i] += 1
            break
        for i in open_:
            add = min(share, sizes[i] - quota[i])
            quota[i] += add
            left -= add
    return quota


def apportion(target: Tensor, size: Tensor, k: int, limit: int | None = None) -> Tensor:
    """Exactly ``k`` tokens per row among P pieces from the official real-valued counts ``target``
    (M, P), each piece at most its ``size`` (P,) (``limit``: the largest, known on the host): the
    official int(target) first (so a k equal to their sum gives the official counts), then the
    difference k - sum added to (or taken from) the pieces by :func:`share`. Returns (M, P) long."""
    target = target.double().clamp_min(0)
    limit = int(size.max()) if limit is None else limit
    base = torch.minimum(target.floor().long(), size)
    left = k - base.sum(1)
    more = share(target, size - base, left.clamp_min(0), limit)
    return base + more - share(target, base, (-left).clamp_min(0), limit)


def share(weight: Tensor, room: Tensor, amount: Tensor, limit: int) -> Tensor:
    """``amount`` (M,) units per row given out among P pieces by D'Hondt's divisor method: the u-th
    unit of piece p has priority weight_p / u, units go in priority order (ties: the earlier piece),
    a piece takes at most ``room`` (M, P) units (``limit`` >= every room). Returns (M, P) long;
    no host sync."""
    m, p = weight.shape
    units = torch.arange(1, limit + 1, device=weight.device, dtype=weight.dtype)
    priority = (weight.unsqueeze(-1) / units).masked_fill(units > room.unsqueeze(-1), -1.0).flatten(1)
    order = priority.argsort(dim=1, descending=True, stable=True)
    take = torch.arange(p * limit, device=weight.device) < amount.unsqueeze(1)
    given = torch.zeros_like(take).scatter(1, order, take)
    return given.view(m, p, limit).sum(dim=-1)


def take_per_piece(score: Tensor, piece_of: Tensor, quota: Tensor, k: int) -> Tensor:
    """Each row's ``quota[:, p]`` highest-scored tokens of each piece p (ties: the lower index).
    score (M, N), piece_of (N,) the piece of each token, quota (M, P) summing to k per row ->
    (M, k) token indices ascending."""
    m, n = score.shape
    order = score.argsort(dim=1, descending=True, stable=True)
    piece = piece_of[order]  # (M, N) piece of each sorted token
    onehot = (piece.unsqueeze(-1) == torch.arange(quota.shape[1], device=score.device)).long()  # no F.one_hot: it syncs
    rank = (onehot.cumsum(dim=1) * onehot).sum(dim=-1) - 1  # rank of each sorted token within its piece
    keep_sorted = rank < quota.gather(1, piece)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return (~keep).to(torch.uint8).argsort(dim=1, stable=True)[:, :k]


# ---- GlobalCom2 -----------------------------------------------------------------------------------
@register
@dataclass
class GlobalCom2Press(SelectorPress):
    """Global guidance for the thumbnail and the crops of an AnyRes image (LLaVA-NeXT).

    The paper's steps, as official ``llava/model/llava_arch.py``:
    1. Thumbnail (``compress_thumbnail``): the base image keeps its int(N_b r) tokens of highest
       [CLS] score, r the retention ratio (official ``retention_ratio = 0.25``).
    2. Crop retention ratios (``generate_scale_for_crop_features``, Eq. "global-guided ratio"):
       the base grid is split into rows x cols regions, one per crop (region (i, j) holds base
       token (y, x) with i = min(y // (S // rows), rows - 1), likewise j), each region's scores are
       summed, ``softmax((sum - max) / T)`` with T = 10 (denominator + 1e-8), and crop c keeps the
       ratio ``r (1 + softmax_c - mean(softmax))``, at most 1 (float64, as the official numpy).
    3. Crop tokens (``interpolate_and_split_cls_attn_scores``, ``select_topk_crop_features``): the
       base scores, bilinearly resized (``align_corners=False``) to the unpadded tiles' (H', W')
       and cut along the crops, are each crop's global score; crop c keeps its int(N_c s_c) tokens
       of highest ``normalize(own [CLS] score) + normalize(global score)``, each L2-normalised over
       the crop's (unpadded) tokens.

    The crops need ``ctx.parts`` ("base" then "tiles" with their crop grid, see
    :func:`anyres_layout`); tiles without one (OneVision's shrunk raster, no official code) are one
    crop: ratio r, guided by the whole thumbnail. An item without parts or with a base only
    (LLaVA-1.5; OneVision's untiled images): official GlobalCom2 keeps a single-crop image whole
    (its ``else`` branch); here it is a thumbnail without crops, pressed by step 1 (top k by the
    score) -- the budget the user asked for. Other parts (InternVL, Idefics3: tiles without their
    positions) raise: the guidance needs where each crop lies in the thumbnail.

    Deviations, each forced:
    (1) Signal. Official: the [CLS] row of the LAST vision block's attention LOGITS (before the
    softmax), averaged over heads (``apply_customvit``: ``attn_weights.mean(dim=1)`` of q k^T scale;
    ``attn_maps[-1][:, 0, 1:]``), each crop by its own [CLS]. No signal gives logits; the closest,
    ``cls_attn_concat`` at the last block (``vision_layers = (-1,)``), is one softmax of the
    heads-concatenated q / k scaled by C^-1/2, whose log is sqrt(H) x the official head-mean logit
    minus a per-image constant. So the score here is ``log(cls_attn_concat)``: every ranking inside
    the thumbnail is official; crop ratios come from region sums sharper by sqrt(H) (the
    per-image constant cancels in the softmax where the regions are equal, as on 24x24 grids with
    1, 2 or 3 crops a side), and the crops' normalised sums see shifted scores. Proposed signal:
    ``cls_logits`` (M, N), the head-mean [CLS] logits of a listed block.
    (2) Budget. Official counts (int(N_b r), int(N_c s_c)) vary per image; a group of images shares
    one budget k here (``keep``, or ceil(keep_ratio N)), so each image takes the official counts and
    adds (or drops) the difference to k by D'Hondt's divisor method on N_b r and N_c s_c
    (:func:`apportion`), with r = ``keep_ratio`` (else k / N). A k equal to an image's official
    total gives its official counts.
    (3) Layout. Kept tokens stay in token order (official: the thumbnail's in descending score),
    and the model's newline tokens stay as the adapter keeps them (official: one per canvas row,
    padded rows included). Ties: the lower index (official ``argsort`` / ``topk`` on the device).
    """

    temperature: float = 10.0

    name = "globalcom2"
    paper = "Liu et al., AAAI 2026, arXiv 2501.05179"
    needs = ("cls_attn_concat",)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not self.temperature > 0:
            raise ValueError(f"temperature must be a positive number (official: 10), got {self.temperature!r}")

    @property
    def vision_layers(self) -> tuple[int, ...]:
        return (-1,)  # official attn_maps[-1]: the last vision block

    def select(self, tokens: Tensor, ctx: VisualContext, k: int) -> Tensor:
        m, n, _ = tokens.shape
        attn = ctx.require("cls_attn_concat").double()
        layout = anyres_layout(ctx.parts, n, ctx.grid, self.name, attn.device)
        score = attn.clamp_min(torch.finfo(attn.dtype).tiny).log()
        if layout.tiles is None:
            if len(layout.pieces) > 1 or layout.pieces[0].role not in ("image", "base"):
                raise ValueError(f"globalcom2 guides crops by where they lie in the thumbnail: it needs LLaVA-NeXT's "
                                 f"AnyRes parts ('base', then 'tiles' with their crop grid); this item's parts are "
                                 f"{ctx.parts}. Choose a press without crop guidance (e.g. hiprune, scope)")
            # a thumbnail without crops: its top k
            return score.argsort(dim=1, descending=True, stable=True)[:, :k].sort(dim=1).values
        return globalcom2_select(score, layout, k, self.keep_ratio if self.keep_ratio is not None else k / n,
                                 self.temperature)


def crop_scales(base_score: Tensor, base_grid: tuple[int, int], crops: tuple[int, int], ratio: float,
                temperature: float) -> Tensor:
    """Official ``generate_scale_for_crop_features``: (M, N_b) base scores -> (M, rows x cols)
    retention ratios, float64."""
    (h, w), (rows, cols) = base_grid, crops
    ph, pw = max(h // rows, 1), max(w // cols, 1)
    dev = base_score.device
    region = ((torch.arange(h, device=dev) // ph).clamp(max=rows - 1)[:, None] * cols
              + (torch.arange(w, device=dev) // pw).clamp(max=cols - 1)[None, :]).flatten()
    sums = base_score.new_zeros(base_score.shape[0], rows * cols, dtype=torch.float64)
    sums.scatter_add_(1, region.expand(base_score.shape[0], -1), base_score.double())
    exp = ((sums - sums.amax(dim=1, keepdim=True)) / temperature).exp()
    soft = exp / (exp.sum(dim=1, keepdim=True) + 1e-8)
    return (ratio * (1 + soft - soft.mean(dim=1, keepdim=True))).clamp(max=1.0)


def globalcom2_select(score: Tensor, layout: AnyRes, k: int, ratio: float, temperature: float = 10.0) -> Tensor:
    """GlobalCom2's selection of k tokens of an AnyRes item from its (M, N) [CLS] scores."""
    m, n = score.shape
    base, tiles, crops = layout.base, layout.tiles, layout.crops
    base_grid = base.grid[1:]
    base_score = score[:, base.start: base.start + base.length]
    scales = crop_scales(base_score, base_grid, crops, ratio, temperature)  # (M, C)

    # global guidance: the thumbnail's scores resized to the unpadded tiles, read per crop
    h, w = tiles.grid[1:]
    glob = F.interpolate(base_score.view(m, 1, *base_grid), size=(h, w), mode="bilinear",
                         align_corners=False).flatten(1)  # (M, H' W')
    own = score[:, tiles.start: tiles.start + tiles.length]
    crop_of = layout.crop_of
    c = crops[0] * crops[1]

    def normalize(x: Tensor) -> Tensor:  # F.normalize over each crop's tokens
        norm = x.new_zeros(m, c).scatter_add_(1, crop_of.expand(m, -1), x * x).sqrt().clamp_min(1e-12)
        return x / norm[:, crop_of]

    combined = score.clone()
    combined[:, tiles.start: tiles.start + tiles.length] = normalize(own) + normalize(glob)

    ratios, crop = [], 0
    for piece in layout.pieces:  # the thumbnail keeps ratio r, crop c its scale s_c
        if piece.role in ("crop", "tiles"):
            ratios.append(scales[:, crop])
            crop += 1
        else:
            ratios.append(scales.new_full((m,), float(ratio)))
    target = torch.stack(ratios, dim=1) * layout.counts  # official N_p x ratio_p
    return take_per_piece(combined, layout.piece_of, apportion(target, layout.counts, k, max(layout.sizes)), k)
