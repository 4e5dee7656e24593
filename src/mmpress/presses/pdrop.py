"""PyramidDrop: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction" (Xing et al., CVPR 2025, arXiv 2410.17247; official code Cooperx521/PyramidDrop)."""

from __future__ import annotations

from dataclasses import dataclass

from mmpress.presses.base import LayerPress, register


@register
@dataclass
class PyramidDropPress(LayerPress):
    """Splits the language model into stages at ``stages`` (default layers 8, 16, 24 of a 32-layer
    LLaVA-1.5) and, entering each, keeps the ``ratio`` (lambda, default 0.5) of the visual tokens
    the previous stage kept: 576 -> 288 -> 144 -> 72 (official ``--layer_list '[8,16,24]'
    --image_token_ratio_list "[0.5,0.25,0.125]"``).

    Ranking (paper Sec. 3.2, official ``pdrop_rank_drop``): the attention of the last instruction
    token over the visual tokens, averaged over heads, computed from the hidden states entering
    stage layer k with layer k's own ``input_layernorm``, ``q_proj`` / ``k_proj`` and RoPE (a
    "lightweight attention": one query row). Dropped tokens are gone from layer k on.

    Deviations: kept tokens keep their original position ids (official: renumbered 0..L'-1 at each
    stage; mmpress keeps one position convention for every in-LLM press, and the layers before k
    saw the original ids); grouped-query attention is handled (official: MHA only); per image at
    batch > 1. A later turn's question does not re-rank.
    """

    stages: tuple[int, ...] = (8, 16, 24)
    ratio: float = 0.5

    name = "pdrop"
    paper = "Xing et al., CVPR 2025, arXiv 2410.17247"
    needs_budget = False

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio (lambda) must be in (0, 1], e.g. 0.5 (1 keeps every token); got {self.ratio!r}")
        self.stages = tuple(self.stages)
        super().__post_init__()

    def layers(self) -> tuple[int, ...]:
        return self.stages

    def budgets(self, n: int) -> tuple[int, ...]:
        return tuple(max(1, int(n * self.ratio ** (s + 1))) for s in range(len(self.stages)))
