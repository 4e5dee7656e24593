"""HoloV: "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context
Retention" (Zou et al., NeurIPS 2025, arXiv 2510.02912; official code obananas/HoloV)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmpress.ops.similarity import at_least_float32
from mmpress.presses.base import SelectorPress, VisualContext, register

#: official constants: attention is scaled by 1e3 before the scores are mixed (the scale cancels
#: in the budget weights up to EPS), and EPS guards every division
ATTN_SCALE, EPS = 1e3, 1e-6


def crop_slots(n: int, crops: int, device=None) -> tuple[Tensor, Tensor]:
    """Cut N tokens into ``crops`` runs of the raster order, as the official code does: N // C
    tokens each, the first N % C runs one more. Returns slot (C, P): the token at each place of
    each crop (padding places repeat the crop's first token) and valid (C, P)."""
    q, rem = divmod(n, crops)
    c = torch.arange(crops, device=device)
    start, size = c * q + c.clamp(max=rem), q + (c < rem).long()
    place = torch.arange(q + (rem > 0), device=device)
    valid = place < size[:, None]
    return torch.where(valid, start[:, None] + place, start[:, None]), valid


def crop_scores(tokens: Tensor, attn: Tensor, slot: Tensor, valid: Tensor, alpha: float) -> Tensor:
    """Holistic score of every crop (official ``HoloV``, "holistic" token scores averaged per crop).

    Per token of a crop: s_i = a_i + alpha * var_i * mean|a| / (mean|var| + EPS), with a_i the
    scaled [CLS] attention and var_i the variance of its cosine similarities to the crop's other
    tokens (official: the similarity row with its diagonal zeroed, squared deviations summed over
    the whole row, both divided by n - 1) -- a token unlike its surroundings scores high. The crop
    scores mean_i s_i; a one-token crop scores its raw attention (official special case).
    tokens (M, N, D), attn (M, N) -> (M, C).
    """
    x = at_least_float32(tokens)
    x = x / (x.norm(dim=-1, keepdim=True) + EPS)
    x = x[:, slot]  # (M, C, P, D)
    pair = valid[:, :, None] & valid[:, None, :]
    sim = (x @ x.transpose(-1, -2)) * (pair & ~torch.eye(slot.shape[1], dtype=torch.bool, device=slot.device))
    size = valid.sum(dim=-1).to(x.dtype)  # (C,)
    others = (size - 1).clamp_min(1)[:, None]
    mean = sim.sum(dim=-1) / others
    var = ((sim - mean.unsqueeze(-1)).square() * pair).sum(dim=-1) / others  # (M, C, P)
    a = attn[:, slot] * ATTN_SCALE * valid
    scale = a.abs().sum(dim=-1) / size / (var.abs().mul(valid).sum(dim=-1) / size + EPS)  # (M, C)
    score = (a + alpha * var * scale.unsqueeze(-1)).mul(valid).sum(dim=-1) / size
    return torch.where(size == 1, attn[:, slot[:, 0]], score)


def allocate(score: Tensor, size: Tensor, k: int) -> Tensor:
    """Per-crop budgets (official): floor(k * w_c) with w_c = score_c / (sum score + EPS), then one
    more token for each of the (k - sum of floors) crops of largest w (ties: lower crop), capped
    at the crop's size. score (M, C), size (C,) -> (M, C) long."""
    weight = score / (score.sum(dim=-1, keepdim=True) + EPS)
    budget = (weight * k).floor().long()
    rank = weight.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    budget = budget + (rank < k - budget.sum(dim=-1, keepdim=True)).long()
    return torch.minimum(budget, size)


@register
@dataclass
class HoloVPress(SelectorPress):
    """Budgets spread over crops by holistic score; within each crop, the top [CLS]-attention tokens.

    Official ``HoloV(image_tokens, attention, num_patches, new_image_token_num)``
    (``llava/model/utils.py``; the same in ``qwen-model-HoloV/utils.py``) -- the paper's crop-wise
    holistic scoring and adaptive budget allocation:
    1. Crops: the N tokens cut into C runs of the raster order (:func:`crop_slots`; with a
       square grid, bands of rows -- the official code's "patches", not 2-D tiles).
    2. Holistic crop score: attention plus the crop-normalised variance of each token's
       similarity to its crop, averaged over the crop (:func:`crop_scores`).
    3. Budget: k split over the crops in proportion to their scores (:func:`allocate`).
    4. Within a crop: its ``budget`` tokens of highest [CLS] attention (official: ``topk``).

    crops: C. None uses the official Qwen2.5-VL rule C = floor(1024 N / (576 k)) (at least 1),
    which gives the official LLaVA-1.5 setting C = 16 at 64 of 576 tokens (the LLaVA code
    hard-codes C = 16 and k = 64). alpha: weight of the variance term, official 0.09 (the Qwen
    code's ``beta``). Signals: head-averaged [CLS] attention of the feature layer
    (``ctx.cls_attn``) and the projected visual tokens, as official.

    Deviations: (1) a crop whose budget exceeds its size keeps all its tokens and the surplus
    (official: lost, the output zero-padded to k) goes to the highest-attention tokens not yet
    kept, so exactly k real tokens are kept; (2) kept tokens stay in raster order (official:
    crop by crop, each by descending attention); (3) C is capped at N (official: empty crops
    skipped, the same); (4) ties go to the lower index (official ``topk``: unspecified);
    (5) batched over M images without a loop over images or crops. (1) and (2) are forced by
    the token contract: every kept token is a real token with an original position, handed back
    in position order. Positions: official LLaVA inserts the kept tokens at consecutive
    positions (the default on LLaVA, ``official_positions``); the Qwen2.5-VL code keeps their
    original M-RoPE ids (what M-RoPE families always do). Tested against the official loop: ``holov_reference`` in
    tests/test_new_presses.py, with tied attention in tests/test_official_pre.py.
    """

    crops: int | None = None
    alpha: float = 0.09

    name = "holov"
    paper = "Zou et al., NeurIPS 2025, arXiv 2510.02912"
    needs = ("cls_attn",)

    def __post_init__(self):
        super().__post_init__()
        if self.crops is not None and (not isinstance(self.crops, int) or self.crops < 1):
            raise ValueError(f"crops must be a positive int or None, got {self.crops!r}")

    def select(self, tokens: Tensor, ctx: VisualContext, k: int) -> Tensor:
        attn = at_least_float32(ctx.require("cls_attn"))
        m, n, _ = tokens.shape
        crops = min(self.crops or max(1, 1024 * n // (576 * k)), n)
        slot, valid = crop_slots(n, crops, tokens.device)
        budget = allocate(crop_scores(tokens, attn, slot, valid, self.alpha), valid.sum(dim=-1), k)

        # rank of every token within its crop by attention; keep ranks below the crop's budget
        crop_attn = attn[:, slot].masked_fill(~valid, -torch.inf)  # (M, C, P)
        rank = crop_attn.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        keep = valid & (rank < budget.unsqueeze(-1))
        # back to token order; a padding place repeats a real token with keep False, so sum
        kept = torch.zeros(m, n, dtype=torch.long, device=tokens.device)
        kept = kept.scatter_add_(1, slot.flatten().expand(m, -1), keep.flatten(1).long()) > 0

        # exactly k: the kept tokens first, then (surplus of full crops) the best-attended others
        priority = attn.masked_fill(kept, torch.inf)
        return priority.argsort(dim=-1, descending=True, stable=True)[:, :k]
