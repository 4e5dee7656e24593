"""Compacting a batch of sequences after tokens are dropped, without host synchronisation.

Rows of a batch lose different numbers of tokens (different prompts, different numbers of
images), so the pressed rows are re-padded on the LEFT to a common length, never truncated:
the last column stays every row's last token, as generation expects. Everything is computed
on the device with cumsum / scatter / gather, and the output width is a host integer the caller
knows, so a pressed prefill never waits for the GPU (``nonzero`` or boolean indexing would).
"""

from __future__ import annotations

import torch
from torch import Tensor


def compact_index(keep: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """keep (B, L) bool -> (src (B, width) long, mask (B, width) bool).

    Row b of the compacted sequence is ``x[b, src[b]]``: the kept entries of row b in their
    order, right-aligned in ``width`` columns. ``mask`` is False in the left padding, where
    ``src`` points at column 0 (any valid index; the caller masks those slots). ``width`` must be
    at least every row's kept count; a row that keeps more would be silently cut, so the caller
    derives ``width`` from counts it knows (tested: ``keep.sum(1).max() <= width``).
    """
    b, length = keep.shape
    kept = keep.sum(dim=1, keepdim=True)
    pad = width - kept  # (B, 1) left padding of each row
    # destination column of every kept entry; dropped entries go to a spare column `width`
    dst = torch.where(keep, keep.cumsum(dim=1) - 1 + pad, width)
    cols = torch.arange(length, device=keep.device).expand(b, length)
    src = torch.zeros(b, width + 1, dtype=torch.long, device=keep.device).scatter_(1, dst, cols)[:, :width]
    mask = torch.arange(width, device=keep.device) >= pad
    return src, mask


def gather_rows(x: Tensor, src: Tensor) -> Tensor:
    """x (B, L, ...) gathered along dim 1 by src (B, W) -> (B, W, ...)."""
    index = src.view(*src.shape, *([1] * (x.ndim - 2))).expand(*src.shape, *x.shape[2:])
    return x.gather(1, index)


def flat_positions(mask: Tensor, count: int) -> Tensor:
    """mask (B, L) bool with exactly ``count`` True entries -> (count,) their flat indices into
    ``mask.view(-1)`` in row-major order (what ``mask.view(-1).nonzero()`` gives, without the
    sync). The caller guarantees the count (e.g. transformers checked the image-token count)."""
    flat = mask.reshape(-1)
    slot = torch.where(flat, flat.cumsum(0) - 1, count)
    out = torch.zeros(count + 1, dtype=torch.long, device=mask.device)
    return out.scatter_(0, slot, torch.arange(flat.numel(), device=mask.device))[:count]
