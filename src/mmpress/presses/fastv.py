"""FastV: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
Large Vision-Language Models" (Chen et al., ECCV 2024, arXiv 2403.06764; official code
pkunlp-icler/FastV)."""

from __future__ import annotations

from dataclasses import dataclass

from mmpress.presses.base import LayerPress, register


@register
@dataclass
class FastVPress(LayerPress):
    """At decoder layer K (``layer``, default 2), keeps the visual tokens that received the most
    attention from the last token in layer K-1 (paper Sec. 4: the "attention score" of each
    image token, averaged over heads; official ``LlamaModel.forward``: ``layer_outputs[1]`` of
    layer K-1, ``mean(dim=1)[0][-1]`` over the image span, ``topk``), and drops the rest from
    layer K on. Layers 0..K-1 keep every token (and their KV cache holds them); kept tokens keep
    their original position ids (official: ``position_ids = keep_indexs``).

    Budget: ``keep`` per image (the paper's R = 50% is ``keep_ratio=0.5``). Deviations: scores
    come from layer K-1's queries and keys (no attention map is materialised); per image at
    batch > 1 (official: one image, batch 1). A later turn's question does not re-rank: the
    tokens dropped at the first prefill stay dropped from layer K on.
    """

    layer: int = 2

    name = "fastv"
    paper = "Chen et al., ECCV 2024, arXiv 2403.06764"

    def signal_layer(self, layer: int) -> int:
        return layer - 1
