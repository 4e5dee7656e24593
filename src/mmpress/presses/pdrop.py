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
    --image_token_ratio_list "[0.5,0.25,0.125]"``: ``int(576 * ratio ** s)`` at stage s).

    Ranking (paper Sec. 3.2, official ``pdrop_rank_drop``): the attention of the last instruction
    token over the visual tokens, averaged over heads, computed from the hidden states entering
    stage layer k with layer k's own ``input_layernorm``, ``q_proj`` / ``k_proj`` and RoPE (a
    "lightweight attention": one query row); the top ones survive, in sequence order. Dropped
    tokens are gone from layer k on.

    Positions (``positions``): None (default) is the official numbering, "reindex", on 1-D RoPE
    models and the original ids on M-RoPE ones (Qwen-VL: PyramidDrop has no official numbering
    there). "reindex" (the official ``pdrop_forward``) numbers the
    sequence kept at each stage 0..L'-1 (consecutively from the row's first id), so stage k's
    layers, its ranking's RoPE included, see the renumbered ids; a later token (decoding, a later
    turn) gets, in stage k's layers, its original id minus the ids freed up to stage k (official
    decoding: ``position_ids - (cur_visual_length - next_visual_length)`` at each stage), which
    continues each stage's numbering. "keep" keeps the original ids (a variant: RoPE's recency
    weighting then ranks differently from stage 2 on). "reindex" asked for on M-RoPE raises.

    Deviations, forced by batching: per image at batch > 1 with left padding (official: right
    padding, one image per sample); grouped-query attention is handled (official: MHA only).
    Scores are computed in float32 (official: softmax in float32, then cast to the model's dtype
    before the head mean). A later turn's question does not re-rank.
    """

    stages: tuple[int, ...] = (8, 16, 24)
    ratio: float = 0.5
    positions: str | None = None

    name = "pdrop"
    paper = "Xing et al., CVPR 2025, arXiv 2410.17247"
    needs_budget = False

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio (lambda) must be in (0, 1], e.g. 0.5 (1 keeps every token); got {self.ratio!r}")
        self._check_positions(self.positions)
        self.stages = tuple(self.stages)
        super().__post_init__()

    def layers(self) -> tuple[int, ...]:
        return self.stages

    def budgets(self, n: int) -> tuple[int, ...]:
        return tuple(max(1, int(n * self.ratio ** (s + 1))) for s in range(len(self.stages)))
