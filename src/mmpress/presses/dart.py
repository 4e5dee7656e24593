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
       ``image_pivots`` visual tokens and ``text_pivots`` text tokens of largest L-``norm_p``
       norm (official: L1 norm of the keys of LM layer K=2; defaults 4 + 4 pivots, L1).
       Image pivots are kept; text pivots only guide.
    2. Duplication (paper: duplication-aware retention): pivot after pivot, the tokens of
       lowest cosine similarity to it among the not-yet-kept visual tokens join the kept set;
       the k - image_pivots slots are split evenly over the pivots (official: ``budget //
       #pivots`` each, so it keeps image_pivots + a multiple of #pivots, not the budget).

    Pre-LLM variant (``dart_llm`` is DART at its official placement, layer 2 inside the language
    model; this press acts on the LM input, before any layer runs): norms and cosines are taken on the
    projected visual tokens and the text input embeddings instead of layer-2 keys and
    normalised hidden states. Pivots are visited image pivots first (by norm), then text pivots
    (official: the iteration order of a Python set). Text pivots are drawn from every real text
    token of the prompt (``ctx.text``, ragged rows masked; official: the text after the image);
    an image whose prompt has fewer text tokens than ``text_pivots`` spreads its budget over
    fewer pivots. Batched over M images with per-image budgets (official: batch 1).
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
        return dart_select(tokens, tokens, text, text, mask, k, self.image_pivots, self.text_pivots, self.norm_p)


def dart_select(tokens: Tensor, token_keys: Tensor, text: Tensor | None, text_keys: Tensor | None,
                text_mask: Tensor | None, k: int, image_pivots: int, text_pivots: int, norm_p: float) -> Tensor:
    """DART's selection for M images: pivots are the ``image_pivots`` tokens and ``text_pivots``
    text tokens of largest L-``norm_p`` norm of their ``*_keys``; then each pivot claims its
    quota of the tokens least cosine-similar to it (on ``tokens`` / ``text``). Returns (M, k)."""
    m, n, _ = tokens.shape
    kept = token_keys.float().norm(p=norm_p, dim=-1).topk(min(image_pivots, k), dim=-1).indices
    if kept.shape[1] == k:
        return kept
    pivots, valid = gather_tokens(tokens, kept).float(), torch.ones_like(kept, dtype=torch.bool)
    if text_pivots:
        norm = text_keys.float().norm(p=norm_p, dim=-1).masked_fill(~text_mask, -torch.inf)
        top = norm.topk(min(text_pivots, text.shape[1]), dim=-1).indices
        pivots = torch.cat([pivots, gather_tokens(text.float(), top)], dim=1)
        valid = torch.cat([valid, text_mask.gather(1, top)], dim=1)

    # per-image quota of each valid pivot: k - image pivots spread as evenly as possible
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


@register
@dataclass
class DARTLLMPress(LayerPress):
    """DART at its official placement: inside the language model, before decoder layer K
    (``layer``, default 2; official ``--pruned_layer 2``).

    Signals (official ``DART_K_norm``): pivots are the 4 visual and 4 text tokens of largest L1
    norm of their key states in layer K-1 (rotated keys, flattened over heads: ``ctx.llm_keys``,
    ``ctx.llm_text_keys``); duplication is the cosine similarity of the hidden states entering
    layer K (``tokens`` and ``ctx.text_hidden``); each pivot claims its share of the least
    duplicated tokens (``dart_select``). Dropped tokens are gone from layer K on; kept ones keep
    their position ids.

    Deviations: the official cosine runs on the hidden states after the model's final RMSNorm,
    which only rescales each channel; text pivots come from every text token of the prompt
    (official: the text after the image); the budget is ``keep`` per image (official
    ``max_num_trunction // 8`` per pivot + the 4 visual pivots). ``dart`` is the pre-LLM variant.
    A later turn's question does not re-select: the tokens dropped at layer K stay dropped there.
    """

    layer: int = 2
    image_pivots: int = 4
    text_pivots: int = 4
    norm_p: float = 1.0

    name = "dart_llm"
    paper = "Wen et al., arXiv 2025, arXiv 2502.11494 (official placement, layer 2)"
    needs = ("llm_keys", "text")

    def signal_layer(self, layer: int) -> int:
        return layer - 1

    def compress(self, tokens, ctx, k):
        index = dart_select(tokens, ctx.require("llm_keys"), ctx.require("text_hidden"), ctx.require("llm_text_keys"),
                            ctx.require("text_mask"), k, self.image_pivots, self.text_pivots, self.norm_p)
        return gather_tokens(tokens, index), index
