"""VisionZip: "Longer is Better but Not Necessary in Vision Language Models"
(Yang et al., CVPR 2025, arXiv 2412.04467; official code dvlab-research/VisionZip)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpress.ops.select import gather_tokens, topk_indices
from mmpress.ops.similarity import at_least_float32
from mmpress.presses.base import Press, VisualContext, register


@register
@dataclass
class VisionZipPress(Press):
    """Dominant tokens by [CLS] attention plus contextual tokens merged from the rest.

    1. Dominant (paper: "Dominant Token Selection"): the k - c tokens of highest [CLS]
       attention in the feature layer (official ``visionzip/clip_encoder.py``:
       ``attentions[-2]``, head-summed, ``topk``).
    2. Contextual (paper: "Contextual Tokens Merging"): among the R remaining tokens, in token
       order, c targets at a fixed stride (official: ``step = R // c``, ``arange(0, R, step)[:c]``);
       every other remaining token is assigned to its most similar target by cosine of the
       layer's head-averaged keys (official ``metric``), and each contextual token is
       ``target + mean(assigned tokens)`` -- the official formula (the target is added to the
       mean of the others, not averaged with them); a target with nothing assigned is kept as is.

    contextual_ratio: c = round(k * contextual_ratio). The official LLaVA-1.5 settings are
    54 + 10 (k=64), 108 + 20 (128) and 162 + 30 (192): c = k * 10/64 for all three.

    Checked against official ``CLIPVisionTower_VisionZip.forward`` (tests/test_official_vision.py):
    the same layer (the block producing ``hidden_states[-2]``), the same signals ([CLS] row of its
    attention; its keys averaged over heads, official ``raw_key_states.mean(1)``), the same
    stride, assignment (``argmax``, first on ties) and merge formula; ties in the dominant
    ``topk`` as official (head mean here, head sum there: the same order).

    Deviations, each forced: (1) the LM sees no [CLS] token in LLaVA (``default`` feature
    strategy), so all k slots go to patch tokens: keep=k equals official ``dominant = k - c + 1``
    ([CLS] + k - c patches) with its [CLS] slot given to the next patch by attention (official
    54 + 10 = [CLS] + 53 patches + 10). With the ``full`` strategy [CLS] is an LM token (the
    adapter sets ``ctx.cls_first``) and is always kept, as official: [CLS] + k - c - 1 patches. (2) The press acts after the
    projector, on the tokens the adapter hands it: contextual tokens are
    ``proj(target) + mean(proj(members))`` (official: ``proj(target + mean(members))`` on the
    tower's features; equal for a linear projector). (3) Contextual tokens take the position of
    their target token. Precision: float32 at least (official: the tower's fp16).
    """

    contextual_ratio: float = 10 / 64

    name = "visionzip"
    paper = "Yang et al., CVPR 2025, arXiv 2412.04467"
    needs = ("cls_attn", "vision_keys")

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        m, n, d = tokens.shape
        c = min(max(round(k * self.contextual_ratio), 0), k)
        attn = ctx.require("cls_attn")
        if ctx.cls_first:  # the LM sees [CLS] (LLaVA "full"): always kept, as official's all_indices[:, 0]
            attn = torch.cat([torch.full_like(attn[:, :1], torch.inf), attn[:, 1:]], dim=1)
        dominant = topk_indices(attn, k - c)  # (M, k - c)
        if c == 0:
            return gather_tokens(tokens, dominant), dominant

        # remaining tokens, in token order: a stable sort puts the unpicked (False) first
        picked = torch.zeros(m, n, dtype=torch.bool, device=tokens.device).scatter_(1, dominant, True)
        rest = picked.to(torch.uint8).argsort(dim=1, stable=True)[:, : n - k + c]  # (M, R)
        r = rest.shape[1]
        slot = torch.arange(0, r, max(1, r // c), device=tokens.device)[:c]
        is_target = torch.zeros(r, dtype=torch.bool, device=tokens.device).scatter_(0, slot, True)
        non_target = is_target.to(torch.uint8).argsort(stable=True)[: r - c]  # no boolean index: no sync
        targets, others = rest[:, slot], rest[:, non_target]  # (M, c), (M, R - c)

        keys = F.normalize(at_least_float32(ctx.require("vision_keys")), dim=-1)
        sim = gather_tokens(keys, others) @ gather_tokens(keys, targets).transpose(1, 2)  # (M, R-c, c)
        assign = sim.argmax(dim=-1)  # (M, R - c): the target each other token joins
        x = at_least_float32(tokens)
        members = gather_tokens(x, others)
        total = x.new_zeros(m, c, d).scatter_add_(1, assign.unsqueeze(-1).expand_as(members), members)
        count = x.new_zeros(m, c).scatter_add_(1, assign, x.new_ones(assign.shape)).clamp_min(1)
        contextual = gather_tokens(x, targets) + total / count.unsqueeze(-1)

        out = torch.cat([gather_tokens(tokens, dominant), contextual.to(tokens.dtype)], dim=1)
        return out, torch.cat([dominant, targets], dim=1)
