"""Adjacent token merging of audio frames: A-ToMe, "Accelerating Transducers through Adjacent
Token Merging" (Li, Wu, Li and Liu, Interspeech 2023, arXiv 2306.16009), applied once to the
audio tokens before the language model, as the speech-LLM token-compression comparisons do
(FastAdaSP, Lu et al., EMNLP 2024 Industry, arXiv 2410.03007; SA-MAP, Tencent/AngelSlim)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mmpress.ops.audio import merge_adjacent_pairs
from mmpress.presses.base import Press, VisualContext, register

METRICS = ("tokens", "features")


@register
@dataclass
class AudioMergePress(Press):
    """Merges the most similar ADJACENT tokens (frames in time) into one until k remain.

    A-ToMe (paper Sec. 2, Fig. 1): a module scores every pair of adjacent tokens by the cosine
    similarity of their keys, merges the pairs of highest score (fixed merge ratio) by averaging
    them, and modules stacked over the encoder's layers give an adaptive frame rate. No official
    A-ToMe code is public; the selection follows the A-ToMe baseline of the official FastAdaSP
    code (``yichen14/FastAdaSP``, ``Qwen-Audio/modeling_qwen.py: merge_hidden_states``,
    ``method="atome"``): the top-r adjacent edges (``torch.topk``), walked left to right, each
    realised as a pair merge ``(h[i] + h[i+1]) / 2`` that skips past the pair, so a token is merged
    at most once per module and a chain of selected edges realises every other edge. One round
    here is one such module with r = g - k (g tokens now); rounds repeat, as stacked modules do,
    until exactly k remain (:func:`mmpress.ops.audio.merge_adjacent_pairs`). A merged token takes
    the position of the EARLIER frame of its pair (the walk emits it at the pair's first index).

    metric: "tokens" (default) scores the projected tokens the language model receives (what the
    SA-MAP port of A-ToMe, ``atome-merge``, scores); "features" the audio encoder's output
    (``ctx.audio_features``, before the projector). A-ToMe's keys live inside an encoder layer; a
    press before the language model has neither, and the projected tokens are there for every
    family.

    Deviations: (1) the metric (above); (2) rounds on the same tokens stand in for modules in
    successive layers; (3) merged tokens are SIZE-weighted means (sizes add; ToMe's ``merge_wavg``):
    in the first round, and in the official single module, every size is 1 and this is the
    official plain mean; (4) ties between equal scores go to the lower index (official ``topk``:
    unspecified); (5) the count: the official module asks for ``int(ratio * N)`` edges and realises
    fewer where they chain, here rounds continue until exactly k tokens remain. Adjacency is the
    token order: time for audio; on an image it is the raster order (merges within rows, and
    across a row's end). Positions: renumbered 0..L'-1 by default (the ports insert the merged
    audio into a shorter placeholder run, ``official_positions``); ``positions="keep"`` keeps the
    original ids.
    """

    metric: str = "tokens"

    name = "audio_merge"
    paper = "A-ToMe: Li et al., Interspeech 2023, arXiv 2306.16009"

    def __post_init__(self):
        super().__post_init__()
        if self.metric not in METRICS:
            raise ValueError(f"metric must be 'tokens' (the projected tokens) or 'features' (the audio encoder's "
                             f"output, ctx.audio_features), got {self.metric!r}")
        if self.metric == "features":
            self.needs = ("audio_features",)  # the instance's signals

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        metric = ctx.require("audio_features") if self.metric == "features" else None
        if metric is not None and metric.shape[:2] != tokens.shape[:2]:
            raise ValueError(f"audio_features {tuple(metric.shape)} must hold one row per token of the "
                             f"{tuple(tokens.shape[:2])} tokens; the adapter gave a mismatched signal")
        merged, _, first = merge_adjacent_pairs(tokens, k, metric)
        return merged.to(tokens.dtype), first
