"""ToMe inside CLIP / SigLIP / DINOv2 vision towers: our own encoder-layer forward, merging
between attention and MLP (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, arXiv
2210.09461; official code facebookresearch/ToMe, ``tome/patch/timm.py``).

The official patch swaps each timm ``Block`` for a ``ToMeBlock`` and each ``Attention`` for a
``ToMeAttention``. We do the same per INSTANCE, for the duration of a `with` block: each encoder
layer and its attention module get an instance ``forward`` built from the layer's own submodules
(layer norms, q / k / v / output projections, MLP, DINOv2's layer scales), and both are restored
on exit (``install`` returns handles; ``remove()`` restores). No transformers source is edited.

One block (``ToMeBlock.forward``):
  x = x + attn(norm1(x), size)           attention with proportional attention (ToMe Eq. 1):
                                         softmax(q k^T / sqrt(d) + log s), s the token sizes
  x, s = merge_wavg(match(k_mean, r), x, s)  r tokens fewer: bipartite soft matching on the keys
                                         averaged over heads, size-weighted averages
  x = x + mlp(norm2(x))
(DINOv2: the layer scales multiply each branch, as its layer does.) Attention always runs through
``torch.nn.functional.scaled_dot_product_attention`` with log(size) as an additive float mask,
whatever the config's attention implementation (the config is left unchanged): never eager.

The token order is the official one: after a merge, the unmerged A tokens then the B tokens
(``merge`` in ``ops.merge``), which decides which tokens pair in the next block; ``TowerState``
tracks each token's original index through the merges (a merged token takes its destination's:
its representative) so a family can sort the features by position when it hands them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpress.models.vision import attention_module
from mmpress.ops.merge import (Matching, bipartite_soft_matching, merge, merge_by_threshold, merge_representatives,
                               merge_wavg, threshold_matching, threshold_representatives)


PAD = 1 << 62  # the representative of a padding token (DyMU's ragged batches): sorts after every real one


@dataclass
class TowerState:
    """One tower call under ToMe: the r of each block (``schedule``, ToMe's ``parse_r``), the
    leading tokens never merged (``protected``: 1 for [CLS]), proportional attention on/off; and,
    filled while the tower runs, per token (M, N) its ``size`` (patches it stands for) and ``index``
    (its representative's index in the tower's input sequence), the tokens entering each block
    (``entering``), and each block's matching with the sizes before it (``matchings``: block ->
    (Matching, size)) and the representatives after it (``after``: block -> (M, N') index).
    ``threshold`` (DyMU, one per block; ``inf``: no merging there) replaces ``schedule``'s r."""

    schedule: list[int]
    protected: int = 0
    prop_attn: bool = True
    threshold: list[float] | None = None
    size: Tensor | None = None
    index: Tensor | None = None
    valid: Tensor | None = None
    entering: list[int] = field(default_factory=list)
    matchings: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)

    def start(self, hidden: Tensor) -> None:
        m, n, _ = hidden.shape
        self.size = hidden.new_ones(m, n, dtype=torch.float32)
        self.index = torch.arange(n, device=hidden.device).expand(m, n)
        self.valid = torch.ones(m, n, dtype=torch.bool, device=hidden.device) if self.threshold is not None else None
        self.entering, self.matchings, self.after = [], {}, {}


@dataclass
class _Parts:
    norm1: nn.Module
    attn: nn.Module
    out: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    scale1: nn.Module | None
    scale2: nn.Module | None
    heads: int
    scaling: float


def block_parts(layer: nn.Module) -> _Parts:
    """The submodules of a CLIP / SigLIP (``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp``)
    or DINOv2 (``norm1``, ``attention``, ``layer_scale1``, ``norm2``, ``mlp``, ``layer_scale2``)
    encoder layer; a ValueError for any other layout (a wrong forward would be silent)."""
    norm1 = getattr(layer, "layer_norm1", None) or getattr(layer, "norm1", None)
    norm2 = getattr(layer, "layer_norm2", None) or getattr(layer, "norm2", None)
    attn = attention_module(layer)
    out = getattr(attn, "out_proj", None) or getattr(attn, "o_proj", None)
    mlp = getattr(layer, "mlp", None)
    heads = getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None)
    scaling = getattr(attn, "scale", None) or getattr(attn, "scaling", None)
    missing = [n for n, v in (("norm1", norm1), ("norm2", norm2), ("output projection", out), ("mlp", mlp),
                              ("heads", heads), ("scale", scaling), ("v_proj", getattr(attn, "v_proj", None))) if v is None]
    if missing:
        raise ValueError(f"tome_vit runs CLIP / SigLIP / DINOv2 encoder layers; {type(layer).__name__} has no "
                         f"{', '.join(missing)}: pick a pre_llm press for this tower")
    return _Parts(norm1, attn, out, norm2, mlp, getattr(layer, "layer_scale1", None),
                  getattr(layer, "layer_scale2", None), int(heads), float(scaling))


def attention(parts: _Parts, hidden: Tensor, size: Tensor | None, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Multi-head attention of one layer with proportional attention (ToMe Eq. 1: log s added to
    every logit of key s, the official ``attn + size.log()``), through SDPA with log(size) as an
    additive (M, 1, 1, N) float mask. Returns the output projection and the keys averaged over
    heads (M, N, d_head), ToMe's similarity metric (the official ``k.mean(1)``)."""
    attn = parts.attn
    b, n, _ = hidden.shape
    q, k, v = (proj(hidden).view(b, n, parts.heads, -1).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    mask = None if size is None else size.to(q.dtype).log()[:, None, None, :]
    if valid is not None:
        pad = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill(~valid, -math.inf)[:, None, None, :]
        mask = pad if mask is None else mask + pad
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=parts.scaling)
    return parts.out(out.transpose(1, 2).reshape(b, n, -1)), k.mean(dim=1)


def _check(layer: nn.Module, attention_mask, kwargs) -> None:
    if layer.training:
        raise ValueError("tome_vit merges tokens at inference: call model.eval() first")
    if attention_mask is not None:
        raise ValueError("tome_vit cannot merge a vision tower called with an attention mask (padded patches): "
                         "pick a pre_llm press for this model")
    if kwargs.get("output_attentions"):
        raise ValueError("tome_vit runs the tower with SDPA and returns no attention maps: drop output_attentions")


class _Restore:
    """A handle restoring a module's own ``forward`` (the instance attribute we set) on ``remove``."""

    def __init__(self, module: nn.Module, forward):
        self.module = module
        self.had = "forward" in module.__dict__
        self.previous = module.__dict__.get("forward")
        module.forward = forward

    def remove(self) -> None:
        if self.module is None:
            return
        if self.had:
            self.module.forward = self.previous
        else:
            self.module.__dict__.pop("forward", None)
        self.module = None


def install(layers, state: TowerState, on_merge=None) -> list:
    """Swaps every layer of ``layers`` (a tower's encoder layers, in order) and its attention module
    for ToMe's forwards reading and updating ``state``; returns handles whose ``remove()`` restores
    them. ``on_merge(block, matching)`` is called after each block's matching (a family's hook)."""
    handles = []
    try:
        for i, layer in enumerate(layers):
            parts = block_parts(layer)
            handles.append(_Restore(parts.attn, _attention_forward(parts)))
            handles.append(_Restore(layer, _block_forward(layer, parts, i, state, on_merge)))
    except Exception:
        for handle in handles:
            handle.remove()
        raise
    return handles


def _attention_forward(parts: _Parts):
    def forward(hidden_states: Tensor, size: Tensor | None = None, valid: Tensor | None = None,
                **kwargs) -> tuple[Tensor, Tensor]:
        return attention(parts, hidden_states, size, valid)

    return forward


def _block_forward(layer: nn.Module, parts: _Parts, block: int, state: TowerState, on_merge):
    def forward(hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs) -> Tensor:
        _check(layer, attention_mask, kwargs)
        if block == 0:
            state.start(hidden_states)
        x = hidden_states
        state.entering.append(x.shape[1])
        # through the module's __call__ so its hooks (a composed press's [CLS] signals) still see the input
        a, metric = parts.attn(parts.norm1(x), size=state.size if state.prop_attn else None, valid=state.valid)
        x = x + (parts.scale1(a) if parts.scale1 is not None else a)
        r = state.schedule[block] if block < len(state.schedule) else 0
        if state.threshold is not None:  # DyMU: every edge above the block's threshold merges
            threshold = state.threshold[block] if block < len(state.threshold) else math.inf
            if threshold < math.inf:
                match = threshold_matching(metric, threshold, state.protected, state.valid)
                state.matchings[block] = (match, state.size)
                x, state.size = merge_by_threshold(x, match, state.size)
                state.index = threshold_representatives(state.index, match)
                state.valid = match.valid
        elif r > 0:
            match = bipartite_soft_matching(metric, r, state.protected)
            if match.r:
                state.matchings[block] = (match, state.size)
                x, state.size = merge_wavg(x, match, state.size)  # sizes stay float32: exact counts
                state.index = merge_representatives(state.index, match)
                if on_merge is not None:
                    on_merge(block, match)
        state.after[block] = state.index if state.valid is None else state.index.masked_fill(~state.valid, PAD)
        y = parts.mlp(parts.norm2(x))
        return x + (parts.scale2(y) if parts.scale2 is not None else y)

    return forward


def map_signals(match: Matching | None, size: Tensor | None, scores: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """A block's [CLS] signals recorded at its attention input (before its merge), mapped onto the
    tokens its merge leaves, in the tower's order: a merged token's [CLS] attention is the sum over
    the tokens it stands for (the mass proportional attention gives it), its key the size-weighted
    mean (as its hidden state). ``match`` None: the block merged nothing."""
    if match is None:
        return scores, keys
    merged_keys, _ = merge_wavg(keys, match, size)
    return merge(scores, match, "sum"), merged_keys
