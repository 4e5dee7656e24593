"""VTW: "Boosting Multimodal Large Language Models with Visual Tokens Withdrawal for Rapid
Inference" (Lin et al., AAAI 2025, arXiv 2405.05803; official code lzhxmu/VTW)."""

from __future__ import annotations

from dataclasses import dataclass

from mmpress.presses.base import LayerPress, register


@register
@dataclass
class VTWPress(LayerPress):
    """Withdraws every visual token from the hidden states entering decoder layer K (``layer``;
    default 15, the official ``temp_cache.k`` for LLaVA-1.5-7B): layers 0..K-1 see them (and
    their KV cache keeps them), later layers run on the text alone; text keeps its original
    position ids (official ``pe_type="keep"``).

    The paper chooses K per model as the first layer whose last-token output, with the visual
    tokens withdrawn, is within KL <= eta (0.003 for LLaVA-1.5-7B) of the full model's on a few
    samples (official ``--findk``); here K is a parameter (search it with ``mmpress bench``).
    It takes no budget: it keeps no visual token from layer K on.
    A later turn: its tokens see the image in layers 0..K-1 only, as the first turn's did.
    """

    layer: int = 15

    name = "vtw"
    paper = "Lin et al., AAAI 2025, arXiv 2405.05803"
    needs = ()
    needs_budget = False

    def budgets(self, n: int) -> tuple[int, ...]:
        return (0,)
