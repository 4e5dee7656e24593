"""CDPruner: "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs" (Zhang et al., NeurIPS 2025, arXiv 2506.10967; official code Theia-4869/CDPruner)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmpress.ops.dpp import greedy_dpp_map
from mmpress.ops.similarity import cosine_similarity
from mmpress.presses.base import SelectorPress, VisualContext, register


@register
@dataclass
class CDPrunerPress(SelectorPress):
    """Keeps the k tokens of a DPP's greedy MAP on instruction-conditioned similarity.

    The paper's conditional DPP, as official ``LlavaMetaForCausalLM.encode_images`` (``llava_arch.py``):
    1. Similarity: S_ij = cos(v_i, v_j) of the projected visual tokens (the projector's outputs,
       as official), float32.
    2. Relevance (:meth:`relevance`): r_i = mean over the instruction of -cos(v_i, text) -- the
       official ``(-relevance).mean``, NEGATED -- min-max normalised over the image's tokens:
       (r - min + 1e-6) / (max - min).
    3. Conditional kernel: L = diag(q) S diag(q), q = r (official default); with ``theta``,
       q = exp(alpha r), alpha = theta / (2 (1 - theta)) (the relevance/diversity trade-off of
       Chen et al. 2018, left as a commented-out option in the official code).
    4. Selection: greedy MAP inference of the DPP with kernel L (:func:`ops.dpp.greedy_dpp_map`,
       Chen et al. 2018 Algorithm 1, the official fast loop: ``argmax`` of the residuals, first
       on ties), batched over the M images.

    negate_relevance: True (default) is the official sign. ``negate_relevance=False`` (the sign
    this press used before issue 16, also OpenVINO GenAI's default for non-CLIP towers) keeps
    completely different tokens. Measured on the demo model (``benchmarks/cdpruner_sign.py``,
    ``benchmarks/results/cdpruner_sign.md``), accuracy negated vs un-negated on the same
    questions (the original position ids, the default when it was measured), with the paired 95%
    bootstrap interval of the difference:
    easy-vqa (n=96) 64/256 tokens 0.88 vs 0.83, +0.04 [-0.01, +0.09]; 16/256 0.49 vs 0.36,
    +0.13 [+0.05, +0.21]; scenes (n=64) 64/256 0.39 vs 0.41, -0.02 [-0.13, +0.08]; 16/256
    0.28 vs 0.25, +0.03 [-0.08, +0.14]. The un-negated sign is never measurably better, the
    official one is at 16 tokens on easy-vqa: the default stays official.

    Deviations: (1) text side (a missing signal): the official code embeds the question
    (answer-format instruction removed) with CLIP's text tower and compares it with the
    CLIP-projected patch features; a transformers VLM has no CLIP text tower, so we compare the
    projected visual tokens with the LM input embeddings of the prompt's real text tokens
    (``ctx.text``, padding masked), averaging the cosine over those tokens as the official code
    averages over 77-token text segments. (2) The min-max is per image (official: over the whole
    batch, which is one image at batch size 1). (3) An image with no text, or with constant
    relevance, gets q = 1: an unconditional DPP on S (official: division by zero). (4) Once the
    kernel's rank is exhausted (possible when k > D), remaining picks follow the last residuals
    (``greedy_dpp_map``; official: NaN). (5) S_ii is set to exactly 1 (official: the rounded
    self-cosine), so tokens of equal quality tie exactly and go to the lower index on every device.
    A later turn: the selection made with the first prompt's text stays (a continued cache holds
    only the kept tokens); a new question re-selects only when the conversation is re-run under
    the press without the old cache.
    """

    theta: float | None = None
    negate_relevance: bool = True

    name = "cdpruner"
    paper = "Zhang et al., NeurIPS 2025, arXiv 2506.10967"
    needs = ("text",)

    def __post_init__(self):
        super().__post_init__()
        if self.theta is not None and not 0.0 <= self.theta < 1.0:
            raise ValueError(f"theta must be in [0, 1) or None, got {self.theta!r}")

    def relevance(self, tokens: Tensor, ctx: VisualContext) -> Tensor:
        """(M, N) min-max normalised relevance of every visual token to its image's prompt."""
        text, mask = ctx.require("text"), ctx.require("text_mask")
        cos = cosine_similarity(tokens, text)  # (M, N, T), float32 at least
        real = mask.unsqueeze(1).to(cos.dtype)  # (M, 1, T)
        r = (cos * real).sum(dim=-1) / real.sum(dim=-1).clamp_min(1)
        r = -r if self.negate_relevance else r
        low, high = r.amin(dim=-1, keepdim=True), r.amax(dim=-1, keepdim=True)
        span = high - low
        return torch.where(span > 0, (r - low + 1e-6) / span.clamp_min(torch.finfo(r.dtype).tiny), 1.0)

    def kernel(self, tokens: Tensor, ctx: VisualContext) -> Tensor:
        """(M, N, N) conditional DPP kernel L = diag(q) S diag(q) (steps 1-3)."""
        quality = self.relevance(tokens, ctx)
        if self.theta is not None:
            quality = torch.exp(self.theta / (2 * (1 - self.theta)) * quality)
        sim = cosine_similarity(tokens)
        sim.diagonal(dim1=1, dim2=2).fill_(1.0)  # cos(v, v) = 1 exactly: equal qualities tie on every device
        return quality.unsqueeze(-1) * sim * quality.unsqueeze(-2)

    def select(self, tokens: Tensor, ctx: VisualContext, k: int) -> Tensor:
        return greedy_dpp_map(self.kernel(tokens, ctx), k)
