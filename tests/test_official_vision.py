"""Pre-LLM presses that read the vision tower, against re-implementations of their OFFICIAL
selection written from reading the official code (one image at a time, plain Python loops), run
end to end on the tiny LLaVA models of conftest.py in float64 (the reference reads the tower's
eager attentions and hidden states, the press the adapter's SDPA-safe signals):

- vispruner  Theia-4869/VisPruner, ``llava_arch.py: encode_images`` (+ ``clip_encoder.py:
             feature_select``): important by [CLS] attention, duplicates removed by the cosine
             of the tower's features BEFORE the projector
- cdpruner   Theia-4869/CDPruner, ``llava_arch.py: encode_images``: kernel on the projector
             outputs, relevance NEGATED and min-max scaled, the fast greedy MAP loop
- visionzip  dvlab-research/VisionZip, ``visionzip/clip_encoder.py``: head-summed [CLS] attention
             of ``attentions[-2]``, contextual targets at a stride, assignment by the head-mean
             keys of ``layers[-2]``
- vtc_cls    THU-MIG/VTC-CLS, ``clip_encoder.py: cls_token_only``: [CLS] rows summed over
             ``attentions[start_layer:-1]``
- prumerge   42Shawn/LLaVA-PruMerge, ``clip_encoder.py: token_prune_merge_advanced(_plus)``: ONE
             softmax of the heads-concatenated [CLS] query of ``layers[23]`` (the last block,
             whose input is the feature layer -2) against its concatenated keys (``q_proj`` /
             ``k_proj`` outputs, bias included, after ``layer_norm1``), scaled by C^-1/2; IQR
             outliers; the merge step (each kept token + its 32 nearest by the cosine of those
             keys, weighted by attention)
"""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_TOKEN, make_batch, tiny_llava

from mmpress.presses import get_press

TOWERS = ["clip", "dinov2"]


@pytest.fixture(scope="module", params=TOWERS)
def models(request):
    """The same tiny LLaVA (float64) with SDPA, which the press runs on, and with eager attention,
    whose attention maps the reference reads."""
    return tuple(tiny_llava(request.param, attn=attn).double() for attn in ("sdpa", "eager"))


def inputs(seed=0, rows=3, prompt_lens=(5, 3, 7)):
    batch = make_batch(prompt_lens=prompt_lens[:rows], seed=seed)
    batch["pixel_values"] = batch["pixel_values"].double()
    return batch


def run_press(model, press, batch):
    """(tokens the press returned, kept indices): one pressed forward, the press's output recorded."""
    seen = []
    pressing = press.press

    def spy(tokens, ctx, k=None):
        out, index = pressing(tokens, ctx, k)
        seen.append((out, index))
        return out, index

    press.press = spy  # an instance attribute: the adapter calls press.press(...)
    with torch.no_grad(), press(model):
        model(**batch)
    return torch.cat([o for o, _ in seen]), torch.cat([i for _, i in seen])


def tower(model, batch):
    """The eager tower's outputs for the reference: hidden states, attention maps, and each
    block's key projection (``keys[b]``: (M, N+1, C), heads concatenated), taken with forward
    hooks on ``k_proj`` as official PruMerge does."""
    from mmpress.models.vision import attention_module, encoder_layers

    keys = {}
    blocks = encoder_layers(model.model.vision_tower)
    handles = [attention_module(layer).k_proj.register_forward_hook(
        lambda m, a, out, b=b: keys.__setitem__(b, out)) for b, layer in enumerate(blocks)]
    try:
        with torch.no_grad():
            out = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    out.keys = keys
    return out


def order_by(scores):
    """Indices by descending score, ties to the lower index (the press's stable sorts)."""
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))


# ---- VisPruner -------------------------------------------------------------------------------
def vispruner_official(features, attn, k, ratio=0.5):
    """``encode_images`` for one image: ``features`` (N, C) the feature layer's patch features
    (``feature_select``), ``attn`` (N,) the head-mean [CLS] row over the patches."""
    important = int(k * ratio)
    order = order_by(attn)
    kept, rest = order[:important], order[important:]
    unit = features / features.norm(dim=-1, keepdim=True)
    diverse = k - important
    while diverse > 0:
        r = min(8, len(rest) - diverse)
        if r <= 0:
            break
        a, b = rest[::2], rest[1::2]
        scores = [max(float(unit[i] @ unit[j]) for j in b) for i in a]
        distinct = order_by(scores)[r:]
        rest = [a[t] for t in distinct] + b
    return sorted(kept + (rest if diverse > 0 else []))


@pytest.mark.parametrize("k", [5, 16, 33])
def test_vispruner_matches_official(models, k):
    """6 of 16 kept tokens differed when duplicates were judged on the projected tokens."""
    sdpa, eager = models
    batch = inputs()
    _, index = run_press(sdpa, get_press("vispruner", keep=k), batch)
    out = tower(eager, batch)
    features = out.hidden_states[-2][:, 1:]  # feature_select, "patch" ([CLS] dropped)
    attn = out.attentions[-2][:, :, 0, 1:].mean(dim=1)
    for i in range(len(index)):
        assert index[i].tolist() == vispruner_official(features[i], attn[i], k)


def test_vispruner_reads_the_projector_input(models):
    """The signal is what the projector receives: with the projector's input replaced, the
    selection follows it (the projected tokens are unchanged)."""
    sdpa, _ = models
    batch = inputs(seed=1)
    press = get_press("vispruner", keep=16)
    seen = {}
    handle = sdpa.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    try:
        _, index = run_press(sdpa, press, batch)
    finally:
        handle.remove()
    ctx_features = seen["x"]
    assert ctx_features.shape[1] == 64  # [CLS] dropped, as the LM sees the image
    projected = get_press("vispruner", keep=16, similarity="projected")
    assert projected.needs == ("cls_attn",)
    _, other = run_press(sdpa, projected, batch)
    assert not torch.equal(index, other)  # the two signals keep different tokens on these images


def test_vispruner_similarity_option_is_validated():
    with pytest.raises(ValueError, match="similarity"):
        get_press("vispruner", keep=8, similarity="keys")


# ---- CDPruner --------------------------------------------------------------------------------
def cdpruner_official(x, text, k):
    """``encode_images`` for one image: kernel on the projector outputs ``x`` (N, D), relevance
    the NEGATED mean cosine to ``text`` (T, D) min-max scaled, the fast greedy MAP loop. ``text``
    is our substitute for CLIP's text embeddings: the LM input embeddings of the prompt."""
    unit = x / x.norm(dim=-1, keepdim=True)
    sim = unit @ unit.T
    t = text / text.norm(dim=-1, keepdim=True)
    relevance = (-(unit @ t.T)).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * sim * relevance[None]
    n = len(x)
    cis = torch.zeros(k, n, dtype=x.dtype)
    di2s = kernel.diagonal().clone()
    picks = []
    for i in range(k):
        j = int(torch.argmax(di2s))
        picks.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s -= eis**2
        di2s[j] = -float("inf")
    return sorted(picks)


@pytest.mark.parametrize("k", [4, 12, 24])
def test_cdpruner_matches_official(models, k):
    sdpa, _ = models
    batch = inputs(seed=2)
    tokens, index = run_press(sdpa, get_press("cdpruner", keep=k), batch)
    with torch.no_grad():
        projected = sdpa.model.get_image_features(batch["pixel_values"], vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output
        embeds = sdpa.get_input_embeddings()(batch["input_ids"])
    text_rows = (batch["input_ids"] != IMAGE_TOKEN) & batch["attention_mask"].bool()
    for i in range(len(index)):
        assert index[i].tolist() == cdpruner_official(projected[i], embeds[i][text_rows[i]], k)


def test_cdpruner_sign_option():
    """``negate_relevance=False`` is the un-negated variant (an option): it ranks relevance in
    reverse, so the most relevant token of one sign is the least relevant of the other."""
    from test_new_presses import make_inputs

    tokens, ctx = make_inputs()
    official, flipped = get_press("cdpruner", keep=8), get_press("cdpruner", keep=8, negate_relevance=False)
    assert official.negate_relevance is True
    r, q = official.relevance(tokens, ctx), flipped.relevance(tokens, ctx)
    assert torch.equal(r[0].argmax(), q[0].argmin()) and torch.equal(r[0].argmin(), q[0].argmax())


# ---- VisionZip -------------------------------------------------------------------------------
def visionzip_official(hidden, attn, metric, dominant_num, contextual_num):
    """``CLIPVisionTower_VisionZip.forward`` for one image: ``hidden`` (N+1, C) the feature layer
    with [CLS], ``attn`` (H, N+1, N+1) that block's attention, ``metric`` (N+1, d) its head-mean
    keys. Returns (dominant patch indices, target patch indices, {target: merged members}) with
    patch indices counted without [CLS], as the LM's tokens are."""
    cls_attention = attn[:, 0, 1:].sum(dim=0)
    top = [i + 1 for i in order_by(cls_attention)[:dominant_num]]
    keep = [0] + top
    rest = [i for i in range(len(hidden)) if i not in keep]  # token order, as metric[mask]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, len(rest) // contextual_num)
    targets = list(range(0, len(rest), step))[:contextual_num]
    others = [j for j in range(len(rest)) if j not in targets]
    members = {t: [] for t in targets}
    for j in others:
        sims = [float(unit[rest[j]] @ unit[rest[t]]) for t in targets]
        members[targets[max(range(len(targets)), key=lambda s: (sims[s], -s))]].append(j)
    return ([i - 1 for i in top], [rest[t] - 1 for t in targets],
            {rest[t] - 1: [rest[j] - 1 for j in members[t]] for t in targets})


@pytest.mark.parametrize("k", [12, 32])
def test_visionzip_matches_official(models, k):
    """keep=k: c = round(k * 10/64) contextual tokens and k - c dominant PATCHES (official: the
    [CLS] token + dominant - 1 patches; LLaVA's "default" LM input has no [CLS] slot, so it goes to
    the next patch: official ``dominant = k - c + 1``). Contextual tokens are merged on the
    projected tokens (our stage), ``proj(target) + mean(proj(members))``."""
    sdpa, eager = models
    batch = inputs(seed=3)
    out, index = run_press(sdpa, get_press("visionzip", keep=k), batch)
    c = round(k * 10 / 64)
    t = tower(eager, batch)
    heads = eager.config.vision_config.num_attention_heads
    keys = t.keys[len(t.attentions) - 2]  # layers[-2], the block whose output is the feature layer
    metric = keys.view(*keys.shape[:-1], heads, -1).mean(dim=-2)  # official raw_key_states.mean(1)
    with torch.no_grad():
        projected = sdpa.model.multi_modal_projector(t.hidden_states[-2][:, 1:])
    for i in range(len(index)):
        dominant, targets, members = visionzip_official(t.hidden_states[-2][i], t.attentions[-2][i], metric[i],
                                                        k - c, c)
        assert index[i].tolist() == sorted(dominant + targets)
        for slot, position in enumerate(index[i].tolist()):
            expected = projected[i, position]
            if position in members:
                group = members[position]
                expected = expected + (projected[i, group].mean(dim=0) if group else 0)
            torch.testing.assert_close(out[i, slot], expected)


def test_visionzip_full_strategy_keeps_cls_as_official():
    """With vision_feature_select_strategy="full" the LM sees [CLS] as each image's token 0:
    official VisionZip always keeps it (``all_indices`` starts with index 0), so keep=k is [CLS] +
    the k - c - 1 dominant patches + c contextual tokens (official dominant_num = k - c - 1).
    [CLS] ranked by its own attention like a patch (the earlier behaviour) drops it here."""
    models = []
    for attn in ("sdpa", "eager"):
        model = tiny_llava("clip", attn=attn).double()
        model.config.vision_feature_select_strategy = "full"
        models.append(model)
    sdpa, eager = models
    batch = make_batch(prompt_lens=(5, 3, 7), n_tokens=65, seed=3)
    batch["pixel_values"] = batch["pixel_values"].double()
    k = 12
    c = round(k * 10 / 64)
    _, index = run_press(sdpa, get_press("visionzip", keep=k), batch)
    t = tower(eager, batch)
    heads = eager.config.vision_config.num_attention_heads
    keys = t.keys[len(t.attentions) - 2]
    metric = keys.view(*keys.shape[:-1], heads, -1).mean(dim=-2)
    for i in range(len(index)):
        dominant, targets, _ = visionzip_official(t.hidden_states[-2][i], t.attentions[-2][i], metric[i],
                                                  k - c - 1, c)
        assert index[i].tolist() == sorted([0] + [j + 1 for j in dominant + targets])  # LM index = patch + 1


# ---- VTC-CLS ---------------------------------------------------------------------------------
def vtc_cls_official(attentions, start_layer, k):
    """``cls_token_only`` + ``topk``: [CLS] rows (head mean, patches) summed over
    ``attentions[start_layer:-1]``."""
    total = sum(a[:, 0, 1:].mean(dim=0) for a in attentions[start_layer:-1])
    return sorted(order_by(total)[:k])


@pytest.mark.parametrize("depth,start_layer", [(20, None), (6, 2), (6, 0), (3, None)])
def test_vtc_cls_matches_official(depth, start_layer):
    """Default start_layer=16 (official ``--layer``) on a 20-block tower sums blocks 16..18; on a
    3-block tower (no block 16) the sum starts at block L-2 = 1, the named fallback."""

    torch.manual_seed(0)
    models = []
    for attn in ("sdpa", "eager"):
        model = tiny_llava("clip", attn=attn)
        if depth != 3:
            model = _deeper(model, depth, attn)
        models.append(model.double())
    sdpa, eager = models
    batch = inputs(seed=4)
    kwargs = {} if start_layer is None else {"start_layer": start_layer}
    _, index = run_press(sdpa, get_press("vtc_cls", keep=10, **kwargs), batch)
    attentions = tower(eager, batch).attentions
    start = 16 if start_layer is None else start_layer
    start = min(start, depth - 2)
    for i in range(len(index)):
        assert index[i].tolist() == vtc_cls_official([a[i] for a in attentions], start, 10)


def _deeper(model, depth, attn):
    """A tiny LLaVA whose CLIP tower has ``depth`` blocks (same seed for both attentions)."""
    from transformers import LlavaForConditionalGeneration

    config = model.config
    config.vision_config.num_hidden_layers = depth
    config._attn_implementation = attn
    torch.manual_seed(depth)
    deeper = LlavaForConditionalGeneration(config).eval()
    deeper.generation_config.pad_token_id = 0
    return deeper


def test_vtc_cls_layers_and_validation():
    press = get_press("vtc_cls", keep=4)
    assert press.vision_layers_for(24) == tuple(range(17, 24))  # blocks 16..22 of CLIP-L
    assert press.vision_layers_for(12) == (11,)
    assert get_press("vtc_cls", keep=4, start_layer=None).vision_layers_for(24) == ()
    assert get_press("vtc_cls", keep=4, layers=(-3, -2)).vision_layers_for(24) == (-3, -2)
    with pytest.raises(ValueError, match="start_layer"):
        get_press("vtc_cls", keep=4, start_layer=-1)


def test_out_of_range_vision_layer_raises():
    """A layer the tower does not have is an error, not an index wrapped around the tower."""
    from mmpress.models.vision import layer_index

    assert layer_index(-2, 3) == 1 and layer_index(3, 3) == 2
    for bad in (-5, 4, -8):
        with pytest.raises(ValueError, match="does not exist"):
            layer_index(bad, 3)


# ---- PruMerge --------------------------------------------------------------------------------
def prumerge_official_merge(x, attn, keys, idx, neighbours=32):
    """The merge loop of ``token_prune_merge_advanced_plus`` for one image: each kept token i
    (``idx``, in the official topk order) becomes x_i + sum_j a_j x_j over its ``neighbours``
    nearest tokens by key cosine among the other kept tokens and the pruned ones."""
    unit = keys / keys.norm(dim=-1, keepdim=True)
    compl = sorted(set(range(len(x))) - set(idx))
    merged = {}
    for pos, i in enumerate(idx):
        rest = idx[:pos] + idx[pos + 1 :] + compl
        sims = [float(unit[i] @ unit[j]) for j in rest]
        near = [rest[t] for t in sorted(range(len(rest)), key=lambda t: (-sims[t], t))[:neighbours]]
        merged[i] = x[i] + sum(attn[j] * x[j] for j in near)
    return merged


def outliers_official(attn):
    """``outlier_dectection``: the tokens above Q3 + 1.5 IQR (numpy's linear percentiles)."""
    values = sorted(float(a) for a in attn)

    def percentile(q):
        pos = q * (len(values) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(values) - 1)
        return values[lo] + (pos - lo) * (values[hi] - values[lo])

    q1, q3 = percentile(0.25), percentile(0.75)
    return [i for i, a in enumerate(attn) if float(a) > q3 + 1.5 * (q3 - q1)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("neighbours", [32, 5])
def test_prumerge_outliers_and_merge_match_official(seed, neighbours):
    """With the budget equal to the number of IQR outliers (the official adaptive budget), the
    kept tokens are the official ones and each is merged as the official loop merges it."""
    from mmpress.presses import VisualContext

    g = torch.Generator().manual_seed(seed)
    m, n, d = 3, 48, 16
    x = torch.randn(m, n, d, generator=g, dtype=torch.float64)
    attn = torch.randn(m, n, generator=g, dtype=torch.float64).softmax(dim=-1)
    spikes = torch.randperm(n, generator=g)[:5]
    attn[:, spikes] += torch.rand(m, 5, generator=g, dtype=torch.float64)  # a few clear outliers
    attn = attn / attn.sum(dim=-1, keepdim=True)
    keys = torch.randn(m, n, 8, generator=g, dtype=torch.float64)
    for i in range(m):
        kept = outliers_official(attn[i])
        press = get_press("prumerge", keep=len(kept), plus=False, neighbours=neighbours)
        ctx = VisualContext(cls_attn_concat=attn[i : i + 1], vision_keys_concat=keys[i : i + 1])
        out, index = press.press(x[i : i + 1], ctx)
        assert index[0].tolist() == sorted(kept)
        idx = order_by(attn[i])[: len(kept)]  # official topk(int(N * ratio)) order
        merged = prumerge_official_merge(x[i], attn[i], keys[i], idx, neighbours)
        for slot, position in enumerate(index[0].tolist()):
            torch.testing.assert_close(out[0, slot], merged[position])


def prumerge_official_signals(model, batch):
    """Official PruMerge's attention (M, N) and merge keys (M, N, C), in float64, computed here
    from the eager tower's weights: ``layers[23]`` of CLIP-L is its last block, whose input is the
    feature layer (``hidden_states[-2]``); its ``q_proj`` / ``k_proj`` outputs (heads
    concatenated, bias included) of the layer-normed input, ``softmax(q k^T * C^-1/2)``, the
    [CLS] row over the patches; keys without [CLS] (``Key_wo_cls``)."""
    from mmpress.models.vision import attention_module, encoder_layers

    last = encoder_layers(model.model.vision_tower)[-1]
    norm = getattr(last, "layer_norm1", None) or last.norm1  # CLIP / DINOv2: the norm before attention
    attn = attention_module(last)
    with torch.no_grad():
        hidden = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2]
        x = norm(hidden).double()
        q = x @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()
        k = x @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()
    c = hidden.shape[-1]  # official C: the width of image_features
    probs = ((q @ k.transpose(-1, -2)) * c**-0.5).softmax(dim=-1)
    return probs[:, 0, 1:], k[:, 1:]


def projected_patches(model, batch):
    with torch.no_grad():
        return model.model.get_image_features(batch["pixel_values"], vision_feature_layer=-2,
                                              vision_feature_select_strategy="default").pooler_output


def test_prumerge_signals_are_official(models):
    """``cls_attn_concat`` / ``vision_keys_concat`` the adapter computes (SDPA tower, pre-hook)
    equal the official attention and keys; the head-averaged ``cls_attn`` differs from them."""
    sdpa, eager = models
    batch = inputs(seed=6)
    attn, keys = prumerge_official_signals(eager, batch)
    seen = spy_context(sdpa, get_press("prumerge", keep=8), batch)
    got_attn = torch.cat([ctx.cls_attn_concat for _, ctx in seen])
    torch.testing.assert_close(got_attn, attn, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(torch.cat([ctx.vision_keys_concat for _, ctx in seen]), keys, atol=1e-7, rtol=1e-6)
    heads = spy_context(sdpa, get_press("prumerge", keep=8, attention="heads_mean"), batch)
    assert not torch.allclose(torch.cat([ctx.cls_attn_layers[:, 0] for _, ctx in heads]).double(), attn)


@pytest.mark.parametrize("k", [3, 8, 20])
def test_prumerge_matches_official(models, k):
    """``plus=False`` with keep=k is official ``token_prune_merge_advanced`` at a fixed ratio
    (``topk(cls_attn, int(N * ratio))`` with int(N * ratio) = k): the k tokens of highest official
    attention, each merged with its 32 nearest by the cosine of the official keys, weighted by the
    official attention. Merged values are the projected tokens (our stage; official: the features
    before the projector). Fails with the head-averaged attention or keys."""
    sdpa, eager = models
    batch = inputs(seed=7)
    out, index = run_press(sdpa, get_press("prumerge", keep=k, plus=False), batch)
    attn, keys = prumerge_official_signals(eager, batch)
    x = projected_patches(sdpa, batch)
    for i in range(len(index)):
        idx = order_by(attn[i])[:k]  # official topk order
        assert index[i].tolist() == sorted(idx)
        merged = prumerge_official_merge(x[i], attn[i], keys[i], idx)
        for slot, position in enumerate(index[i].tolist()):
            torch.testing.assert_close(out[i, slot], merged[position])


@pytest.mark.parametrize("k", [6, 16])
def test_prumerge_plus_keeps_the_official_outliers(models, k):
    """Default PruMerge+: the official IQR outliers of the official attention are kept (the k of
    highest attention when there are more), the rest of the budget spaced in raster order among
    the others (our fixed budget); every kept token is merged as the official loop merges it,
    the kept tokens in official order (outliers by attention, then the added ones ascending)."""
    sdpa, eager = models
    batch = inputs(seed=8)
    out, index = run_press(sdpa, get_press("prumerge", keep=k), batch)
    attn, keys = prumerge_official_signals(eager, batch)
    x = projected_patches(sdpa, batch)
    for i in range(len(index)):
        outliers = order_by(attn[i])[: len(outliers_official(attn[i]))][:k]
        kept = index[i].tolist()
        assert set(outliers) <= set(kept)
        idx = outliers + [j for j in kept if j not in outliers]
        merged = prumerge_official_merge(x[i], attn[i], keys[i], idx)
        for slot, position in enumerate(kept):
            torch.testing.assert_close(out[i, slot], merged[position])


# ---- vision_features: what the projector receives ----------------------------------------------
def spy_context(model, press, batch):
    """(tokens, ctx) of every group the press was called on in one pressed forward."""
    seen, pressing = [], press.press

    def spy(tokens, ctx, k=None):
        seen.append((tokens, ctx))
        return pressing(tokens, ctx, k)

    press.press = spy
    with torch.no_grad(), press(model):
        model(**batch)
    return seen


def qwen_models():
    from test_qwen3_vl import tiny_qwen3
    from test_qwen_vl import tiny_qwen

    qwen3 = tiny_qwen3()
    return {"qwen2_vl": tiny_qwen("qwen2_vl"), "qwen2_5_vl": tiny_qwen("qwen2_5_vl"), "qwen3_vl": qwen3}


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_vision_features_are_the_merger_input_in_raster_order(kind):
    """Each token's row of ``vision_features`` is its 2x2 patches as the merger reads them: the
    merger applied to the rows gives exactly the token the LM receives (Qwen2.5-VL: after the
    window order is undone), for images of different sizes in one batch."""
    from test_qwen_vl import RAGGED, make_batch as qwen_batch

    model = qwen_models()[kind]
    seen = spy_context(model, get_press("vispruner", keep=3), qwen_batch(model, RAGGED))
    merger = model.model.visual.merger
    assert len(seen) >= 2  # two image sizes: two groups
    for tokens, ctx in seen:
        features = ctx.vision_features
        assert features.shape[:2] == tokens.shape[:2]
        with torch.no_grad():
            merged = merger(features.reshape(-1, features.shape[-1] // 4)).view(tokens.shape)
        torch.testing.assert_close(merged, tokens)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_concat_signals_are_the_received_attention_of_one_softmax(kind):
    """Qwen-VL has no [CLS]: ``cls_attn_concat`` is the attention each token receives from one
    softmax over the heads-concatenated q / k (scaled by C^-1/2), so each frame's tokens share a
    mass of 1 / merge**2 per patch; the keys are the full-width rotated keys. With a one-head
    tower the concatenated form IS the per-head form: equal to ``cls_attn`` / ``vision_keys``."""
    from test_qwen_vl import MERGE, make_batch as qwen_batch

    model = qwen_models()[kind]
    video = [("video", (2, 8, 8))] if kind != "qwen3_vl" else []  # Qwen3-VL's video prompt: timestamps
    rows = [([("image", (1, 8, 8)), *video], 5), ([("image", (1, 8, 12))], 3)]
    batch = qwen_batch(model, rows)
    width = model.config.vision_config.hidden_size if kind != "qwen2_vl" else model.config.vision_config.embed_dim
    seen = spy_context(model, get_press("prumerge", keep=3), batch)
    assert sorted(t.shape[1] for t, _ in seen) == [16, 24, 32][: 3 if video else 2]
    for tokens, ctx in seen:
        frames = 2 if tokens.shape[1] == 32 else 1
        assert ctx.vision_keys_concat.shape == (*tokens.shape[:2], width)
        torch.testing.assert_close(ctx.cls_attn_concat.sum(dim=1) * MERGE**2,
                                   torch.full((len(tokens),), float(frames)), atol=1e-5, rtol=0)
    if kind != "qwen2_vl":
        return
    from transformers import Qwen2VLForConditionalGeneration

    config = model.config
    config.vision_config.num_heads = 1
    torch.manual_seed(0)
    one_head = Qwen2VLForConditionalGeneration(config).eval()
    for press in (get_press("prumerge", keep=3), get_press("prumerge", keep=3, attention="heads_mean")):
        seen.append(spy_context(one_head, press, batch))
    for (_, concat), (_, heads) in zip(*seen[-2:]):
        torch.testing.assert_close(concat.cls_attn_concat, heads.cls_attn, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(concat.vision_keys_concat, heads.vision_keys, atol=1e-6, rtol=1e-5)


def test_llava_vision_features_are_the_projector_input(models):
    sdpa, _ = models
    for tokens, ctx in spy_context(sdpa, get_press("vispruner", keep=8), inputs(seed=5)):
        assert ctx.vision_features.shape[:2] == tokens.shape[:2]
        with torch.no_grad():
            torch.testing.assert_close(sdpa.model.multi_modal_projector(ctx.vision_features), tokens)
