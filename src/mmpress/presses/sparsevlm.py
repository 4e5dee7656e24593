"""SparseVLM: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference" (Zhang et al., ICML 2025, arXiv 2410.04417; official code Gumpest/SparseVLMs), its
training-free core as the official v1.5 code runs it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmpress.ops.select import gather_tokens
from mmpress.ops.video import density_peak_score
from mmpress.presses.base import LayerPress, VisualContext, register

#: official v1.5 kept visual tokens at its three pruning layers, per target average (of 576)
COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}


def recycled(n: int, kept: int) -> int:
    """Merged tokens SparseVLM adds back when it deletes n - kept tokens: the top 30% of the
    deleted (``int(0.3 * deleted) + 1``) clustered into one cluster per 10, plus one."""
    return (int(0.3 * (n - kept)) + 1) // 10 + 1 if kept < n else 0


@register
@dataclass
class SparseVLMPress(LayerPress):
    """Text-guided visual-token sparsification at several layers, with token recycling.

    1. Raters (paper Sec. 3.2, official ``LlamaDynamicvitModel.forward``): from the language
       model's input embeddings, the relevance of each text token after the image to the image,
       ``softmax_text(V T^T)`` averaged over the visual tokens; raters are the text tokens above
       the mean relevance.
    2. At each pruning layer l in ``signal_layers`` (default 2, 6, 15), layer l's own attention
       (head mean) from the raters to the visual tokens, averaged over raters, ranks the visual
       tokens; the top ``counts`` survive into layer l + 1 (official v1.5: layer l's output is
       pruned, so the tokens disappear from layer l + 1 on).
    3. Recycling (Sec. 3.4): the top 30% of the deleted tokens by that score are clustered
       (DPC-kNN, one cluster per 10) and each cluster's average becomes one token.

    Positions (``positions``): None (default) is the official numbering, "reindex", on 1-D RoPE
    models and the original ids on M-RoPE ones (Qwen-VL has no official SparseVLM numbering).
    "reindex" (the official v1.0 code: ``position_ids[:, :L']``
    after each pruning layer) numbers the pressed sequence 0..L'-1 from each pruning layer on,
    the merged tokens placed right after the image's kept tokens; a later token continues each
    layer's numbering (official: its layer's cache length). "keep" keeps the original ids, a
    merged token taking its cluster peak's column and id. "reindex" asked for on M-RoPE raises.

    Budget: ``keep`` in {64, 96, 128, 192} picks the official counts for that average
    (e.g. 64: 66, 30, 17 of 576), scaled to the image's token count; or pass ``counts``.
    Raters are drawn from the text after the image (official ``t_t = hidden_states[:,
    text_token_start:]``). Deviations: per image at batch > 1 (official: batch 1); the official
    clustering adds random noise (1e-6) to the densities, so its merged tokens are not
    reproducible exactly. A later turn's question does not re-rank.
    """

    signal_layers: tuple[int, ...] = (2, 6, 15)
    counts: tuple[int, ...] | None = None
    recycle: bool = True
    positions: str | None = None

    name = "sparsevlm"
    paper = "Zhang et al., ICML 2025, arXiv 2410.04417"
    needs = ("llm_attn", "text", "visual_inputs")
    query = "text"

    def __post_init__(self):
        self.signal_layers = tuple(self.signal_layers)
        if self.counts is None:
            if self.keep_ratio is not None or self.keep not in COUNTS:  # (an int keep is what COUNTS holds)
                raise ValueError(f"sparsevlm takes keep in {sorted(COUNTS)} (the official settings) or counts=(...) "
                                 f"per layer, e.g. counts=(66, 30, 17) of 576; got keep={self.keep!r}")
            self.counts = COUNTS[self.keep]
        self._check_positions(self.positions)
        self.counts = tuple(self.counts)
        if len(self.counts) != len(self.signal_layers) or any(not isinstance(c, int) or c < 1 for c in self.counts):
            raise ValueError("give one positive count (of 576) per signal layer")
        self._check_layers()  # the budget is the counts (``keep`` only picked them)

    def layers(self) -> tuple[int, ...]:
        return tuple(layer + 1 for layer in self.signal_layers)

    def signal_layer(self, layer: int) -> int:
        return layer - 1

    def budgets(self, n: int) -> tuple[int, ...]:
        out, prev = [], n
        for c in self.counts:
            kept = max(1, min(prev, round(c * n / 576)))
            total = kept + (recycled(prev, kept) if self.recycle else 0)
            out.append(min(prev, total))
            prev = out[-1]
        return tuple(out)

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        m, n, _ = tokens.shape
        score = self.rater_attention(ctx)  # (M, N)
        kept_n = next((c for c in range(k, 0, -1) if c + (recycled(n, c) if self.recycle else 0) == k), k)
        clusters = k - kept_n
        order = score.argsort(dim=-1, descending=True)
        keep = order[:, :kept_n]
        if not clusters:
            return gather_tokens(tokens, keep), keep
        deleted = order[:, kept_n:kept_n + int(0.3 * (n - kept_n)) + 1]  # the best-scored deleted tokens
        x = gather_tokens(tokens, deleted).float()
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        peaks = density_peak_score(x, valid, k=clusters).topk(clusters, dim=-1).indices  # (M, C)
        assign = torch.cdist(x, gather_tokens(x, peaks)).argmin(dim=-1)  # (M, R) nearest centre
        sums = torch.zeros(m, clusters, x.shape[-1], device=x.device).scatter_add_(
            1, assign[..., None].expand_as(x), x)
        size = torch.zeros(m, clusters, device=x.device).scatter_add_(1, assign, torch.ones_like(assign, dtype=x.dtype))
        merged = (sums / size.clamp(min=1)[..., None]).to(tokens.dtype)
        if self.positions != "keep":  # official order: the kept tokens, then the merged ones (slots 0..k-1)
            keep = keep.sort(dim=1).values
            return torch.cat([gather_tokens(tokens, keep), merged], dim=1), torch.arange(k, device=keep.device).expand(m, k)
        index = torch.cat([keep, deleted.gather(1, peaks)], dim=1)
        return torch.cat([gather_tokens(tokens, keep), merged], dim=1), index

    def rater_attention(self, ctx: VisualContext) -> Tensor:
        """(M, N) the raters' mean attention over the visual tokens (steps 1-2)."""
        text, mask = ctx.require("text").float(), ctx.require("text_mask")
        if ctx.text_index is not None:  # official: the text after the image (``text_token_start:``)
            mask = mask & (ctx.text_index > ctx.token_index[:, -1:])
        visual = ctx.require("visual_inputs").float()
        relevance = (visual @ text.transpose(1, 2)).masked_fill(~mask[:, None], -torch.inf).softmax(dim=-1).mean(1)
        mean = (relevance * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        raters = mask & (relevance > mean)
        raters = torch.where(raters.any(-1, keepdim=True), raters, mask)  # no rater above the mean: all
        rows = ctx.require("llm_attn_rows")  # (M, T, N)
        return (rows * raters[..., None]).sum(1) / raters.sum(-1, keepdim=True).clamp(min=1)
