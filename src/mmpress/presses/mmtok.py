"""MMTok: "Multimodal Coverage Maximization for Efficient Inference of VLMs"
(Dong et al., ICLR 2026, arXiv 2508.18264; official code Ironieser/MMTok)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmpress.ops.coverage import greedy_coverage
from mmpress.ops.similarity import cosine_similarity
from mmpress.presses.base import SelectorPress, VisualContext, register


@register
@dataclass
class MMTokPress(SelectorPress):
    """Keeps the k visual tokens that best cover both the text tokens and all visual tokens.

    Coverage matrices (paper: multimodal coverage formulation; official
    ``SemanticTokenSelector.mm_coverage_selection``):
      P = softmax_j(cos(text_t, v_j) / tv_temperature) / T   text -> vision, (T, N)
      Q = softmax_j(cos(f_i, f_j) / vv_temperature) / N      vision -> vision, (N, N)
    with v the projected tokens (the LM input) and f the vision tower's features before the
    projector (``ctx.vision_features``; official: CLIP ``hidden_states[-2]``, [CLS] dropped);
    rows are the items to cover, columns the candidate visual tokens, each row a distribution
    over candidates. The selection maximises f(S) = sum over rows of [P; alpha Q] of
    max_{j in S} (the paper's multimodal coverage, weighted sum of the two terms) with the
    greedy of ``ops.coverage`` -- the official greedy, batched over images.

    Defaults are the official LLaVA ones (``mmtok/llava/llava_inject.py``): alpha=0.5,
    tv_temperature=0.02, vv_temperature=0.2 (the official Qwen2.5-VL script uses
    tv_temperature=0.01: pass it for Qwen-VL models; a press does not see the model family).
    The greedy is official ``greedy_merged_jit_kernel``: gains summed over the rows, picked
    candidates masked with -inf, ties to the lower index (``torch.argmax``); tested against a
    re-implementation of ``mm_coverage_selection`` (tests/test_official_pre.py).

    similarity: "vision" (default, official) computes Q on the tower's features; "projected" on
    the projected tokens instead (the option for ``at_layer``, where only hidden states exist).

    Deviations (missing signals): (1) the text is every real text token of the sample's prompt
    (``ctx.text``, input embeddings), masked where ragged; the official code embeds only the
    question's keywords (stop-words and answer-format instructions removed; Qwen: "Question: "
    + the question), which needs the question string and the tokenizer. (2) Qwen-VL: the
    official Qwen2.5-VL code averages each token's 2x2 patches of the last vision block;
    ``vision_features`` concatenates them (the merger's input), a different cosine. (3) T counts
    each image's real text tokens; with none, only the visual coverage term remains. Positions:
    the official LLaVA code selects inside the vision tower, so the LM numbers the shorter
    sequence 0..L'-1 (the default on 1-D RoPE families, ``official_positions``);
    ``positions="keep"`` keeps the original ids.
    A later turn: the selection made with the first prompt's text stays (a continued cache holds
    only the kept tokens); a new question re-selects only when the conversation is re-run under
    the press without the old cache.
    """

    alpha: float = 0.5
    tv_temperature: float = 0.02
    vv_temperature: float = 0.2
    similarity: str = "vision"

    name = "mmtok"
    paper = "Dong et al., ICLR 2026, arXiv 2508.18264"
    needs = ("text", "vision_features")

    def __post_init__(self):
        super().__post_init__()
        if self.similarity not in ("vision", "projected"):
            raise ValueError(f"similarity must be 'vision' (official: the tower's features before the projector) or "
                             f"'projected' (the LM input tokens), got {self.similarity!r}")
        if self.similarity == "projected":
            self.needs = ("text",)  # the instance's signals: no tower features to record

    def select(self, tokens: Tensor, ctx: VisualContext, k: int) -> Tensor:
        text, mask = ctx.require("text"), ctx.require("text_mask")
        n = tokens.shape[1]
        real = mask.unsqueeze(-1).float()
        p = (cosine_similarity(text, tokens) / self.tv_temperature).softmax(dim=-1)
        p = p * real / real.sum(dim=1, keepdim=True).clamp_min(1)  # padding rows cover nothing
        features = ctx.require("vision_features") if self.similarity == "vision" else tokens
        q = (cosine_similarity(features) / self.vv_temperature).softmax(dim=-1) / n
        return greedy_coverage(torch.cat([p, self.alpha * q], dim=1), k)
