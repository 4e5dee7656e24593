"""ToMe inside the vision tower: "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023,
arXiv 2210.09461; official code facebookresearch/ToMe: ``tome/merge.py``, ``tome/patch/timm.py``,
``tome/utils.py``), run in the blocks of a VLM's vision tower, so the tower itself, the projector
and the language model all run on fewer tokens."""

from __future__ import annotations

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

    No budget: the number of tokens left follows from r and the tower's depth (LLaVA's feature
    layer -2 of 24 blocks, r=16: 577 - 23*16 = 209 tokens). Deviation: ties between equal edge
    scores go to the lower A index (the official ``argsort`` is unstable there)."""

    r: int | tuple | list = 16
    prop_attn: bool = True

    name = "tome_vit"
    mode = "merge"
    needs_budget = False
    paper = "Bolya et al., ICLR 2023, arXiv 2210.09461"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.r, list):
            self.r = list(self.r)
        parse_r(2, self.r)  # validates every form; ValueError naming the fix
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"prop_attn must be True or False, got {self.prop_attn!r}")

    def schedule(self, blocks: int) -> list[int]:
        """r of each of a tower's ``blocks`` blocks (official ``parse_r``)."""
        return parse_r(blocks, self.r)

    def merges(self, blocks: int) -> bool:
        """Whether any block merges (r=0 everywhere: the tower runs untouched)."""
        return any(self.schedule(blocks))
