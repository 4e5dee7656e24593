"""Vision-tower signals without eager attention: [CLS] attention and keys of one layer, and the
attention each token receives (towers without [CLS]).

The official VisionZip / VTC-CLS / PruMerge code runs the vision tower with
``output_attentions=True``, which forces eager attention and materialises every
(N+1)x(N+1) map of every layer. We only need the [CLS] row of one layer, so a forward
pre-hook on that layer's attention module takes its (already layer-normed) input and
recomputes ``softmax(q_cls . K^T * scale)`` for the [CLS] query alone: O(N d) extra work,
and the tower keeps running with SDPA / FlashAttention. Two forms: per head, averaged over heads
(VisionZip, VTC-CLS, ...), and one softmax over the heads-concatenated q / k (official PruMerge).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a CLIP / SigLIP / DINOv2-style vision tower."""
    for path in ("vision_model.encoder.layers", "encoder.layers", "encoder.layer"):
        module = vision_tower
        try:
            for attr in path.split("."):
                module = getattr(module, attr)
        except AttributeError:
            continue
        return module
    raise ValueError(f"cannot find the encoder layers of vision tower {type(vision_tower).__name__}")


def attention_module(layer: nn.Module) -> nn.Module:
    for attr in ("self_attn", "attention"):
        module = getattr(layer, attr, None)
        if module is not None and hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            return module
    raise ValueError(f"cannot find q_proj/k_proj attention in vision layer {type(layer).__name__}")


def layer_index(hidden_state_index: int, num_layers: int) -> int:
    """Map a ``hidden_states`` index (``vision_feature_layer`` convention: entry 0 is the
    embeddings, entry i the output of block i-1) to the block that produces it."""
    if not -(num_layers + 1) <= hidden_state_index <= num_layers:
        raise ValueError(f"vision layer {hidden_state_index} does not exist: the tower has {num_layers} blocks, so "
                         f"hidden-state indices run from {-num_layers - 1} to {num_layers}")
    i = hidden_state_index % (num_layers + 1)
    if i == 0:
        raise ValueError("vision_feature_layer 0 is the patch embedding: it has no attention")
    return i - 1


HEADS = {"cls_attn", "vision_keys"}  # head-averaged [CLS] signals
CONCAT = {"cls_attn_concat", "vision_keys_concat"}  # heads-concatenated [CLS] signals (official PruMerge)


def hook_forms(needs: set[str], heads_blocks, concat_block) -> dict[int, set[str]]:
    """Vision block -> the [CLS]-signal forms ("heads", "concat") its hook computes for a press
    needing ``needs``; ``heads_blocks()`` / ``concat_block()`` give the family's blocks of each
    form, called only when the press needs that form."""
    forms: dict[int, set[str]] = {}
    if HEADS & needs:
        for block in heads_blocks():
            forms.setdefault(block, set()).add("heads")
    if CONCAT & needs:
        forms.setdefault(concat_block(), set()).add("concat")
    return forms


MISSING = "vision signals missing: encode the images inside the `with press(model):` block"


def recorded(store: dict, block: int, form: str) -> tuple[Tensor, Tensor]:
    """The ``form`` ("heads" / "concat") signals a vision hook recorded for ``block`` in ``store``
    (block -> form -> (scores, keys)); a ValueError when the tower did not run under the press."""
    if form not in store.get(block, {}):
        raise ValueError(MISSING)
    return store[block][form]


def fill_cls_signals(ctx, needs: set[str], store: dict, to_tokens, heads_blocks, concat_block) -> None:
    """Put the recorded [CLS] signals a press ``needs`` into ``ctx``: ``cls_attn`` / ``vision_keys``
    of the feature block and ``cls_attn_layers`` of the press's listed blocks (``heads_blocks()`` ->
    (feature block, [listed blocks]), called only when a head-averaged signal is needed), and the
    ``*_concat`` pair of ``concat_block()``; each tensor mapped onto the LM's tokens by
    ``to_tokens`` (the family's layout)."""
    if HEADS & needs:
        feature_block, layer_blocks = heads_blocks()
        scores, keys = recorded(store, feature_block, "heads")
        ctx.cls_attn, ctx.vision_keys = to_tokens(scores), to_tokens(keys)
        if layer_blocks:
            ctx.cls_attn_layers = torch.stack([to_tokens(recorded(store, b, "heads")[0]) for b in layer_blocks], dim=1)
    if CONCAT & needs:
        scores, keys = recorded(store, concat_block(), "concat")
        ctx.cls_attn_concat, ctx.vision_keys_concat = to_tokens(scores), to_tokens(keys)


def press_layers(press, num_layers: int) -> tuple[int, ...]:
    """Hidden-state indices of the vision layers whose [CLS] attention ``press`` reads in
    ``cls_attn_layers``, for a tower of ``num_layers`` blocks: ``press.vision_layers_for(num_layers)``
    where the press's layers depend on the tower's depth (VTC-CLS: official blocks 16 .. L-2), else
    ``press.vision_layers``."""
    resolve = getattr(press, "vision_layers_for", None)
    return tuple(resolve(num_layers) if resolve is not None else press.vision_layers)


def concat_layer(press, feature_layer: int | None, num_layers: int) -> int | None:
    """Hidden-state index of the layer giving ``cls_attn_concat`` / ``vision_keys_concat``: the one
    layer the press lists in its vision layers, else ``feature_layer``."""
    layers = press_layers(press, num_layers)
    if len(layers) > 1:
        raise ValueError(f"cls_attn_concat / vision_keys_concat come from one vision layer; {press.name} lists "
                         f"{layers}: name one layer")
    return layers[0] if layers else feature_layer


def cls_attention_and_keys(attn: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """[CLS]-row attention probabilities, head-averaged (B, S), and head-averaged keys (B, S, d)
    of one attention module given its input ``hidden`` (B, S, C); token 0 is [CLS]."""
    return cls_signals(attn, hidden, heads=True, concat=False)["heads"]


def cls_signals(attn: nn.Module, hidden: Tensor, heads: bool = True, concat: bool = False) -> dict:
    """The [CLS] signals of one attention module given its (already layer-normed) input ``hidden``
    (B, S, C), token 0 being [CLS]; q and k are projected once, with their biases.

    "heads": (probs (B, S), keys (B, S, d)) -- the [CLS] row of each head's softmax
    ``softmax(q_h k_h^T * scale)`` (the module's own per-head scale), averaged over heads, and the
    keys averaged over heads (``cls_attn``, ``vision_keys``).
    "concat": (probs (B, S), keys (B, S, C)) -- ONE softmax of the full-width [CLS] query against
    the full-width keys (all heads concatenated, as the ``q_proj`` / ``k_proj`` outputs are),
    scaled by ``C ** -0.5``, and those full-width keys (``cls_attn_concat``,
    ``vision_keys_concat``): official PruMerge's attention and merge keys.
    Probabilities are softmaxed in at least float32 (float64 stays float64)."""
    b, s, _ = hidden.shape
    q, k = attn.q_proj(hidden[:, :1]), attn.k_proj(hidden)  # (B, 1, C), (B, S, C)
    out = {}
    if heads:
        h = getattr(attn, "num_heads", None) or attn.num_attention_heads
        scale = getattr(attn, "scale", None) or attn.scaling
        qh, kh = q.view(b, 1, h, -1).transpose(1, 2), k.view(b, s, h, -1).transpose(1, 2)  # (B, H, ., d)
        probs = ((qh @ kh.transpose(-1, -2)) * scale).float().softmax(dim=-1)  # (B, H, 1, S)
        out["heads"] = (probs.mean(dim=1)[:, 0], kh.mean(dim=1))
    if concat:
        logits = (q @ k.transpose(-1, -2))[:, 0] * k.shape[-1] ** -0.5  # (B, S)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        out["concat"] = (logits.to(dtype).softmax(dim=-1), k)
    return out


def received_attention(q: Tensor, k: Tensor, bounds: list[int], scale: float, budget: int = 1 << 24) -> Tensor:
    """Attention each key RECEIVES, averaged over the queries of its segment and over heads:
    ``score_j = mean_{h, i} softmax_j(q_i . k_j * scale)`` -- the column means of the attention
    map, the [CLS]-free saliency of towers without a [CLS] token (Qwen-VL; see ``qwen_vl.py``).

    q, k: (S, H, d) queries and keys of a packed sequence; ``bounds`` (host ints, like
    ``cu_seqlens``: 0, n1, n1 + n2, ..., S) splits it into segments that attend only within
    themselves (images, video frames, windows). Returns (S,) float32. The map is never
    materialised: queries go in chunks of at most ``budget`` logits (O(chunk x n) per head), and
    runs of equal-length segments (a video's frames) are batched.
    """
    heads = q.shape[1]
    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    runs: list[list[int]] = []  # [start, segment length, segments]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if runs and runs[-1][1] == b - a:
            runs[-1][2] += 1
        elif b > a:
            runs.append([a, b - a, 1])
    for start, n, count in runs:
        end = start + n * count
        qs, ks = (t[start:end].float().view(count, n, heads, -1).transpose(1, 2) for t in (q, k))  # (G, H, n, d)
        rows = max(1, budget // (count * heads * n))
        total = qs.new_zeros(count, heads, n)
        for i in range(0, n, rows):
            total += ((qs[:, :, i : i + rows] @ ks.transpose(-1, -2)) * scale).softmax(dim=-1).sum(dim=2)
        out[start:end] = total.mean(dim=1).reshape(-1) / n
    return out
