"""VisionZip: "Longer is Better but Not Necessary in Vision Language Models"
(Yang et al., CVPR 2025, arXiv 2412.04467; official code dvlab-research/VisionZip)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpress.ops.select import gather_tokens, topk_indices
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

    Deviations: we act on the projector outputs (LM embeddings), the official code on the CLIP
    features before the projector; the LM sees no [CLS] token in LLaVA (``default`` feature
    strategy), so all k slots go to patch tokens (official: 54 dominant = [CLS] + 53 patches).
    Contextual tokens take the position of their target token.
    """

    contextual_ratio: float = 10 / 64

    name = "visionzip"
    paper = "Yang et al., CVPR 2025, arXiv 2412.04467"
    needs = ("cls_attn", "vision_keys")

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        m, n, d = tokens.shape
        c = min(max(round(k * self.contextual_ratio), 0), k)
        dominant = topk_indices(ctx.require("cls_attn"), k - c)  # (M, k - c)
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

        keys = F.normalize(ctx.require("vision_keys").float(), dim=-1)
        sim = gather_tokens(keys, others) @ gather_tokens(keys, targets).transpose(1, 2)  # (M, R-c, c)
        assign = sim.argmax(dim=-1)  # (M, R - c): the target each other token joins
        x = tokens.float()
        members = gather_tokens(x, others)
        total = x.new_zeros(m, c, d).scatter_add_(1, assign.unsqueeze(-1).expand_as(members), members)
        count = x.new_zeros(m, c).scatter_add_(1, assign, x.new_ones(assign.shape)).clamp_min(1)
        contextual = gather_tokens(x, targets) + total / count.unsqueeze(-1)

        out = torch.cat([gather_tokens(tokens, dominant), contextual.to(tokens.dtype)], dim=1)
        return out, torch.cat([dominant, targets], dim=1)
