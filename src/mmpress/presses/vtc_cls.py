"""VTC-CLS: "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs"
(Wang et al. 2024, arXiv 2412.05819; official code THU-MIG/VTC-CLS)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mmpress.presses.base import ScorerPress, VisualContext, register


@register
@dataclass
class VTCCLSPress(ScorerPress):
    """Keeps the k patch tokens the vision tower's [CLS] query attends to most, summed over layers.

    Score (official ``CLIPVisionTower.cls_token_only``, then ``topk`` in
    ``LlavaMetaForCausalLM.encode_images``): the [CLS] row of each block's softmax attention,
    averaged over heads, over the patch columns, SUMMED over the blocks ``attentions[start:-1]``,
    i.e. blocks ``start_layer`` .. L-2 of an L-block tower (the last block, which LLaVA-1.5's
    feature layer -2 does not use, left out). ``start_layer=16`` is the official default
    (``--layer`` in ``llava/eval/model_vqa*.py``): on CLIP-L (L = 24) blocks 16..22.

    A tower with L - 2 < ``start_layer`` (the demo's 12-block DINOv2, the tests' tiny towers) has
    no block 16: there the sum starts at block L - 2, the last block the official slice ever
    includes (the official code would sum an empty list and fail) -- a deviation forced by the
    tower, named and tested.

    Options: ``start_layer=None`` scores with the feature layer's attention alone
    (``ctx.cls_attn``: LLaVA's ``vision_feature_layer``, Qwen-VL's no-[CLS] saliency), this press's
    default before issue 16; ``layers``, a tuple of hidden-state indices (the
    ``vision_feature_layer`` convention: i = output of block i-1, negatives count from the end),
    sums exactly those layers and overrides ``start_layer``. The adapter computes
    ``ctx.cls_attn_layers`` for the layers :meth:`vision_layers_for` names.

    Ties: ``topk``, as official. Deviation: one top-k per image over a batch of M images
    (official: batch size 1).
    """

    start_layer: int | None = 16
    layers: tuple[int, ...] | None = None

    name = "vtc_cls"
    paper = "Wang et al., arXiv 2024, arXiv 2412.05819"
    needs = ("cls_attn",)

    def __post_init__(self):
        super().__post_init__()
        if self.start_layer is not None and (not isinstance(self.start_layer, int) or self.start_layer < 0):
            raise ValueError(f"start_layer must be a vision block index >= 0 (official: 16) or None, "
                             f"got {self.start_layer!r}")

    @property
    def vision_layers(self) -> tuple[int, ...]:
        return tuple(self.layers or ())

    def vision_layers_for(self, num_layers: int) -> tuple[int, ...]:
        """Hidden-state indices of the layers summed on a tower of ``num_layers`` blocks."""
        if self.layers:
            return tuple(self.layers)
        if self.start_layer is None:
            return ()
        last = max(num_layers - 2, 0)  # official attentions[start:-1] ends at block L - 2
        return tuple(block + 1 for block in range(min(self.start_layer, last), last + 1))  # block b -> index b + 1

    def score(self, tokens: Tensor, ctx: VisualContext) -> Tensor:
        if self.layers or self.start_layer is not None:
            return ctx.require("cls_attn_layers").sum(dim=1)  # (M, L, N) -> (M, N)
        return ctx.require("cls_attn")
