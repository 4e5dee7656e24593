"""ToMe inside the vision tower: "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023,
arXiv 2210.09461; official code facebookresearch/ToMe: ``tome/merge.py``, ``tome/patch/timm.py``,
``tome/utils.py``), run in the blocks of a VLM's vision tower, so the tower itself, the projector
and the language model all run on fewer tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmpress.ops.merge import parse_r
from mmpress.presses.base import VisionPress, register


@register
@dataclass
class ToMeViTPress(VisionPress):
    """Merges ``r`` tokens in every block of the vision tower (ToMe, Sec. 3).

    In each block, after the attention residual and before the MLP (the official ``ToMeBlock``):
    bipartite soft matching on the block's attention keys averaged over heads (tokens split
    alternately into A and B in their CURRENT order; each A token's most similar B token by cosine;
    the r strongest edges merged), merged tokens as size-weighted averages, sizes added, and
    proportional attention (ToMe Eq. 1: log(size) added to the attention logits, passed to SDPA as
    an additive mask). [CLS] is protected (towers without one, SigLIP, protect nothing); r is capped
    at half the unprotected tokens. Token order between blocks is the official one (the unmerged
    A tokens, then B); the family sorts the features by position only when handing them out. A
    merged token takes its representative's position: the original index of the B token it ended in.

    r: tokens merged per block: an int (every block), ``(r, inflect)`` (ToMe's schedule, e.g.
    ``(16, -1.0)`` the paper's decreasing one), or a list of one r per block (``parse_r``). r=0
    leaves the tower untouched (bit-identical). As text: ``parse_press("tome_vit", r=16)`` (a field, no budget).
    prop_attn: proportional attention (official default True for off-the-shelf models).
    threshold: DyMU's dynamic merging instead of a fixed r (Wang et al., "DyMU: Dynamic Merging and
    Virtual Unmerging for Efficient VLMs", NeurIPS 2025, arXiv 2504.17040; official code
    MikeWangWZHL/dymu, ``src/open_clip/tome.py``, batch-level matching with a specified threshold):
    in each block every A token whose best edge (cosine of the head-mean keys) exceeds the block's
    threshold merges, so each image keeps as many tokens as its content needs. A float (every block)
    or one per block (``math.inf``: no merging there); r is then unused. DyMU finds its per-block
    thresholds by averaging, over a dataset, the edge score of the r-th merge (its threshold
    finder); pass those values. A ragged batch is padded (padding masked out of attention and
    matching, as DyMU's padding mask), each image merged as alone. Options only: not the default.

    Composed with a later pre-LLM press (``compose(tome_vit, visionzip)``), that press reads the
    feature layer's merged tokens in position order; a [CLS] signal of that block is recorded at its
    attention input (before its merge, without the log-size term, as the family's signal hooks
    compute it) and mapped onto the merged tokens: attention summed over the tokens a merged one
    stands for, keys size-weighted (no official composition exists to follow).

    No budget: the number of tokens left follows from r and the tower's depth (LLaVA's feature
    layer -2 of 24 blocks, r=16: 577 - 23*16 = 209 tokens). Deviation: ties between equal edge
    scores go to the lower A index (the official ``argsort`` is unstable there)."""

    r: int | tuple | list = 16
    prop_attn: bool = True
    threshold: float | list | None = None

    name = "tome_vit"
    mode = "merge"
    needs_budget = False
    paper = "Bolya et al., ICLR 2023, arXiv 2210.09461"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.r, list):
            self.r = list(self.r)
        parse_r(2, self.r)  # validates every form; ValueError naming the fix
        if self.threshold is not None:
            values = self.threshold if isinstance(self.threshold, list) else [self.threshold]
            if not values or any(not isinstance(v, (int, float)) or isinstance(v, bool) or v != v for v in values):
                raise ValueError("threshold must be a number (cosine similarity, e.g. 0.9) or a list of one per "
                                 f"vision block (math.inf: no merging there); got {self.threshold!r}")
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"prop_attn must be True or False, got {self.prop_attn!r}")

    def schedule(self, blocks: int) -> list[int]:
        """r of each of a tower's ``blocks`` blocks (official ``parse_r``)."""
        return parse_r(blocks, self.r)

    def thresholds(self, blocks: int) -> list[float] | None:
        """DyMU's threshold of each block (None: ToMe's fixed r)."""
        if self.threshold is None:
            return None
        if isinstance(self.threshold, list):
            return [float(v) for v in self.threshold] + [math.inf] * (blocks - len(self.threshold))
        return [float(self.threshold)] * blocks

    def merges(self, blocks: int) -> bool:
        """Whether any block merges (r=0 everywhere: the tower runs untouched)."""
        if self.threshold is not None:
            return any(t < math.inf for t in self.thresholds(blocks))
        return any(self.schedule(blocks))
