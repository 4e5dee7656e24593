"""FastAdaSP: "FastAdaSP: Multitask-Adapted Efficient Inference for Large Speech Language Model"
(Lu, Song, Yang and Watanabe, EMNLP 2024 Industry Track, arXiv 2410.03007; official code
yichen14/FastAdaSP, ``Qwen-Audio/modeling_qwen.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from mmpress.ops.audio import adjacent_similarity, merge_adjacent
from mmpress.presses.base import LayerPress, VisualContext, register

SCHEDULES = ("none", "constant", "decay")


@register
@dataclass
class FastAdaSPPress(LayerPress):
    """Weighted merging of adjacent audio tokens inside the language model.

    Official selection (``QWenBlock.forward`` / ``merge_hidden_states``, ``method="merge_weighted"``),
    in decoder layer p (the official ``perform_layer``), after its attention:
    1. score: cosine similarity of ADJACENT audio tokens' keys (layer p's rotated keys, every head
       concatenated): ``cos(key[i], key[i+1])``, N - 1 edges;
    2. the top ``int(N * ratio)`` edges (``torch.topk``) are merged: every run of tokens the
       selected edges join becomes ONE token (a chain merges whole);
    3. weights: the attention each audio token receives in layer p, summed over every query row of
       the prompt and over the heads; a run becomes the weight-averaged mean of its hidden states
       ``sum_i w_i h_i / sum_i w_i``, in the place of its first token;
    4. schedule: "none" (official default) merges at layer p only (the paper's sparse-task mode, at a
       layer it picks by transfer entropy); "constant" merges ``int(L * ratio)`` of the current L
       tokens again in every later layer, "decay" with ``ratio * (1 - (i - p) / (31 - p))`` in
       layer i (the paper's dense-task modes; 31: the last layer of Qwen-Audio's 32, here
       ``last_layer``).
    Later layers number the shorter sequence consecutively (official: each layer's RoPE takes the
    last L' positions of the prompt, and decoding continues at the original next id; relative to
    the decoded tokens this is our ``positions="reindex"``, the default on 1-D RoPE).

    Here: ``layer`` is the decoder layer whose INPUT gets the merged tokens (p + 1, as every
    in-LLM press names the layer it presses; default 3, official p = 2: the official code ships
    no default, ``perform_layer=33`` disables it); the keys and attention come from layer
    ``layer - 1`` (``signal_layer``), from its queries and keys (the model keeps running with SDPA).
    Budget: the tokens kept at ``layer`` (``keep`` or ``keep_ratio``); ``keep_ratio = 1 - ratio``
    gives the official ``N - int(N * ratio)`` exactly, and ratio = 1 - keep_ratio (or (N - keep) / N)
    drives the later layers of "constant" / "decay".
    weighted: False is the official "merge_ave" (plain means).

    Deviations: (1) the merge lands after layer p's MLP, not between its attention and MLP (the
    stage presses a layer's input; layer p's MLP runs on the unmerged tokens, each alone); (2) the
    span is the item's tokens (official: from the ``<audio>`` start token to before the end
    token, the start token included); (3) ties between equal edge scores go to the lower index
    (official ``topk``: unspecified); (4) attention in float32, as a mean over the query rows and
    heads (official: a sum in the model dtype; a constant factor per item, the same weights);
    (5) batched, ragged rows (official: batch 1). A later turn's question does not re-merge.
    """

    layer: int = 3
    schedule: str = "none"
    last_layer: int = 31
    weighted: bool = True
    positions: str | None = None

    name = "fastadasp"
    paper = "Lu et al., EMNLP 2024 Industry, arXiv 2410.03007"
    needs = ("llm_attn", "llm_keys")
    query: ClassVar[str] = "all"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} (official: 'none' merges once, at layer - 1; "
                             f"'constant'/'decay' merge again in every later layer), got {self.schedule!r}")
        if self.schedule != "none" and (not isinstance(self.last_layer, int) or isinstance(self.last_layer, bool)
                                        or self.last_layer < self.layer):
            raise ValueError(f"last_layer must be an int >= layer ({self.layer}): the language model's last decoder "
                             f"layer (official 31, Qwen-Audio's 32 layers); got {self.last_layer!r}")
        self._check_positions(self.positions)
        if not self.weighted:
            self.needs = ("llm_keys",)  # the instance's signals: no attention weights to compute
        super().__post_init__()

    def layers(self) -> tuple[int, ...]:
        if self.schedule == "none":
            return (self.layer,)
        return tuple(range(self.layer, self.last_layer + 1))

    def signal_layer(self, layer: int) -> int:
        return layer - 1

    def ratio(self, n: int) -> float:
        """The official merge ratio at the first merging layer, for n tokens entering it."""
        if self.keep_ratio is not None:
            return 1.0 - self.keep_ratio
        return (n - min(self.keep, n)) / n

    def budgets(self, n: int) -> tuple[int, ...]:
        ratio, p = self.ratio(n), self.layer - 1
        left = n - int(n * ratio) if self.keep_ratio is not None else self.budget(n)
        out = [left]
        for j in self.layers()[1:]:  # our layer j is the official merge in layer i = j - 1
            i = j - 1
            r = ratio if self.schedule == "constant" else ratio * (1 - (i - p) / (self.last_layer - p))
            left -= int(left * r)
            out.append(left)
        return tuple(out)

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        keys = ctx.require("llm_keys")
        weight = ctx.require("llm_attn") if self.weighted else None
        merged, _, first = merge_adjacent(tokens, adjacent_similarity(keys), k, weight)
        return merged.to(tokens.dtype), first
