"""In-LLM presses against independent re-implementations of their official selections, written
from the official code (tiny LLaVA with a 4-layer language model, float64 so that no near-tie
decides a pick): PyramidDrop (Cooperx521/PyramidDrop ``pdrop_forward`` / ``pdrop_rank_drop``),
FastV (pkunlp-icler/FastV ``fastv_forward``), DART (ZichenWen1/DART ``get_retained_image_token``);
KV presses by the pressed cache: SnapKV, LOOK-M (SUSTechBruce/LOOK-M ``TextPivotMerge_LayerWise``).
Each oracle runs the language model's layers by hand as the official forward does (its own
picks, its own position ids) and must give the pressed model's logits; decoding and a later turn
continue the official numbering."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import IMAGE_TOKEN, make_batch
from test_stages import NEW, VISUAL_IDS, deep

import mmpress
from mmpress.models.lm import decoder_layers

N_IMAGE = 64


@pytest.fixture(scope="module")
def model():
    """float64; the final norm's weight random (its init, all ones, would hide a missing norm:
    a uniform scale leaves cosines unchanged)."""
    model = deep("llava").double()
    with torch.no_grad():
        model.model.language_model.norm.weight.uniform_(0.2, 3.0, generator=torch.Generator().manual_seed(0))
    return model


def lm_inputs(model, batch):
    """The language model's input embeddings of an unpadded batch-1 prompt."""
    seen = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen["inputs_embeds"]


def rope(q, k, cos, sin):
    def rotate(x):
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


def rotated_qk(lm, layer, hidden, positions):
    """``layer``'s queries and keys of ``hidden`` (B, L, D): its input_layernorm, q_proj, k_proj,
    RoPE at ``positions``; keys repeated to every query head. (B, H, L, d) each."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, length, _ = x.shape
    q = attn.q_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
    q, k = rope(q, k, *lm.rotary_emb(x, positions[None]))
    return q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)


def attention_from_last(lm, layer, hidden, positions):
    """Official ``pdrop_rank_drop`` / FastV's attention map row: softmax attention of the last
    token over every token at ``layer`` (``rotated_qk``), averaged over heads."""
    q, k = rotated_qk(lm, layer, hidden, positions)
    weights = (q[:, :, -1:] @ k.transpose(2, 3) / math.sqrt(q.shape[-1])).softmax(dim=-1)  # the last row sees every key
    return weights.mean(dim=1)[0, 0]  # (L,)


def run_layer(lm, layer, hidden, positions):
    n = hidden.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    out = layer(hidden, attention_mask=mask, position_embeddings=lm.rotary_emb(hidden, positions[None]),
                position_ids=positions[None])
    return out[0] if isinstance(out, tuple) else out


# ---- PyramidDrop ------------------------------------------------------------------------------
def official_pdrop(model, embeds, image_start, layer_list, ratios, kept=None, appended=0):
    """``pdrop_forward``: entering layer ``layer_list[s]``, rank the image tokens of the current
    sequence by the last instruction token's attention (layer's own projections, RoPE at the
    current ids), keep ``int(N * ratios[s + 1])``, and renumber the sequence 0..L'-1. Returns the
    logits and the kept image indices (into the original image) per stage. ``kept``: reuse these
    picks and run ``appended`` extra tokens at the end of ``embeds`` (decoding / a later turn:
    each continues its stage's numbering, as the official decoding shift does)."""
    lm = model.model.language_model
    hidden, picks = embeds, []
    image = torch.arange(N_IMAGE)  # the original image index of each image token still present
    length = embeds.shape[1]
    for i, layer in enumerate(decoder_layers(lm)):
        if i in layer_list:
            s = layer_list.index(i)
            cur, keep = int(N_IMAGE * ratios[s]), int(N_IMAGE * ratios[s + 1])
            assert cur == image.shape[0]
            if kept is None:
                prompt = hidden[:, :hidden.shape[1] - appended]
                score = attention_from_last(lm, layer, prompt, torch.arange(prompt.shape[1]))
                top = score[image_start:image_start + cur].topk(keep).indices.sort().values
            else:
                top = torch.searchsorted(image, kept[s])
            hidden = torch.cat([hidden[:, :image_start], hidden[:, image_start + top], hidden[:, image_start + cur:]], 1)
            image = image[top]
            picks.append(image)
        hidden = run_layer(lm, layer, hidden, torch.arange(hidden.shape[1]))
    assert hidden.shape[1] <= length
    return model.lm_head(lm.norm(hidden)), picks


def pressed_picks(pre, image_start):
    return [cut.cols[0][(cut.cols[0] >= image_start) & (cut.cols[0] < image_start + N_IMAGE)] - image_start
            for cut in pre.cuts]


def test_pdrop_default_is_the_official_selection_and_numbering(model):
    """Forward: the same picks at every stage and the same logits as the official forward
    (stages renumbered 0..L'-1). Decoding and a later turn continue each stage's numbering."""
    from test_stages import prefill_record

    batch = make_batch((8,))
    stages, ratios = (1, 2, 3), [1.0, 0.5, 0.25, 0.125]
    press = mmpress.get_press("pdrop", stages=stages)
    assert press.positions is None  # the official numbering ("reindex") wherever positions are 1-D
    image_start = int((batch["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    embeds = lm_inputs(model, batch)
    expected, picks = official_pdrop(model, embeds, image_start, stages, ratios)
    out, pre = prefill_record(model, batch, press)
    got = pressed_picks(pre, image_start)
    assert [p.tolist() for p in got] == [p.tolist() for p in picks]
    torch.testing.assert_close(out.logits, expected, atol=1e-9, rtol=1e-9)

    # greedy decoding: each step equals the official stages run on prompt + generated tokens
    steps = 3
    with torch.no_grad(), press(model):
        gen = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, suppress_tokens=VISUAL_IDS)
    tokens = gen.sequences[:, -steps:]
    embed = model.get_input_embeddings()
    for t in range(steps):
        full = torch.cat([embeds, embed(tokens[:, :t])], dim=1)
        logits, _ = official_pdrop(model, full, image_start, stages, ratios, kept=picks, appended=t)
        torch.testing.assert_close(gen.logits[t][0].double(), logits[0, -1], atol=1e-5, rtol=1e-5)  # (generate returns float32)

    # a later turn fed onto the pressed cache with its original position ids
    with torch.no_grad(), press(model):
        first = model(**batch, use_cache=True)
        length = batch["input_ids"].shape[1]
        later = model(input_ids=NEW, attention_mask=torch.ones(1, length + NEW.shape[1], dtype=torch.long),
                      position_ids=length + torch.arange(NEW.shape[1])[None], past_key_values=first.past_key_values)
    full = torch.cat([embeds, embed(NEW)], dim=1)
    logits, _ = official_pdrop(model, full, image_start, stages, ratios, kept=picks, appended=NEW.shape[1])
    torch.testing.assert_close(later.logits, logits[:, -NEW.shape[1]:], atol=1e-9, rtol=1e-9)


def test_pdrop_keep_positions_is_a_different_selection(model):
    """The option ``positions="keep"`` (original ids) is not the official numbering: on this
    prompt it ranks differently from stage 2 on, or at least gives other logits."""
    from test_stages import prefill_record

    batch = make_batch((8,))
    official, _ = prefill_record(model, batch, mmpress.get_press("pdrop", stages=(1, 2, 3)))
    kept, _ = prefill_record(model, batch, mmpress.get_press("pdrop", stages=(1, 2, 3), positions="keep"))
    assert not torch.allclose(official.logits, kept.logits)
    with pytest.raises(ValueError, match="positions must be"):
        mmpress.get_press("pdrop", positions="renumber")


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("name", ["pdrop", "sparsevlm"])
def test_renumbering_refused_on_m_rope_and_the_default_keeps_the_ids(kind, name):
    """The official code has no M-RoPE path: renumbering Qwen-VL's (t, h, w) ids when asked for is
    refused with the fix named; the default (``positions=None``) keeps the original ids there."""
    from test_qwen_vl import SINGLE
    from test_qwen_vl import make_batch as qwen_batch

    model = deep(kind)
    batch = qwen_batch(model, SINGLE)
    options = dict(stages=(1, 2, 3)) if name == "pdrop" else dict(signal_layers=(0, 1, 2), counts=(300, 150, 60))
    with pytest.raises(ValueError, match="positions='keep'"):
        with mmpress.get_press(name, positions="reindex", **options)(model):
            pass
    with torch.no_grad():
        with mmpress.get_press(name, **options)(model):
            default = model(**batch).logits
        with mmpress.get_press(name, positions="keep", **options)(model):
            kept = model(**batch).logits
    assert default.isfinite().all()
    torch.testing.assert_close(default, kept, rtol=0, atol=0)


# ---- FastV ------------------------------------------------------------------------------------
def official_fastv(model, embeds, image_start, k_layer, keep):
    """``fastv_forward``: entering layer K, the attention map of layer K-1 (``layer_outputs[1]``),
    head mean, last row, image span: its top ``keep`` image tokens and every text token go on,
    with ``position_ids = keep_indexs`` (the original ids)."""
    lm = model.model.language_model
    hidden, positions, previous = embeds, torch.arange(embeds.shape[1]), None
    for i, layer in enumerate(decoder_layers(lm)):
        if i == k_layer:
            score = attention_from_last(lm, decoder_layers(lm)[i - 1], previous, positions)
            top = score[image_start:image_start + N_IMAGE].topk(keep).indices + image_start
            keep_index = torch.cat([torch.arange(image_start), top, torch.arange(image_start + N_IMAGE, hidden.shape[1])])
            keep_index = keep_index.sort().values
            hidden, positions = hidden[:, keep_index], keep_index
        previous = hidden
        hidden = run_layer(lm, layer, hidden, positions)
    return model.lm_head(lm.norm(hidden)), positions


def test_fastv_default_is_the_official_selection(model):
    from test_stages import prefill_record

    batch = make_batch((8,))
    image_start = int((batch["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    expected, kept = official_fastv(model, lm_inputs(model, batch), image_start, 2, 16)
    out, pre = prefill_record(model, batch, mmpress.get_press("fastv", keep=16))
    assert pre.cuts[0].cols[0].tolist() == kept.tolist()
    torch.testing.assert_close(out.logits, expected, atol=1e-9, rtol=1e-9)


# ---- DART -------------------------------------------------------------------------------------
def official_dart(model, embeds, image_start, k_layer, per_pivot, image_pivots=4, text_pivots=4):
    """``DART_K_norm`` + ``get_retained_image_token``: entering layer K, pivots are the image
    tokens and the tokens after the image of largest L1 norm of layer K-1's (rotated) keys, visited
    in the order of ``list(set(image_indices + query_indices).copy())``; each takes the
    ``per_pivot`` (``max_num_trunction // 8``) remaining image tokens least cosine-similar to it on
    ``self.norm`` of the hidden states entering layer K; the text pivots are then dropped.
    Original position ids."""
    lm = model.model.language_model
    layers = decoder_layers(lm)
    hidden, positions, previous = embeds, torch.arange(embeds.shape[1]), None
    for i, layer in enumerate(layers):
        if i == k_layer:
            attn, length = layers[i - 1].self_attn, hidden.shape[1]
            x = layers[i - 1].input_layernorm(previous)
            k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
            _, k = rope(k, k, *lm.rotary_emb(x, positions[None]))
            k_states = k.permute(0, 2, 1, 3).reshape(1, length, -1)[0]
            last_layer_state = lm.norm(hidden)[0]
            end = image_start + N_IMAGE
            image_indices = (k_states[image_start:end].norm(p=1, dim=-1).topk(image_pivots).indices + image_start).tolist()
            query_indices = (k_states[end:].norm(p=1, dim=-1).topk(text_pivots).indices + end).tolist()
            indices_set = set(image_indices + query_indices)
            valid = set(range(image_start, end))
            valid.difference_update(image_indices)
            for item in list(indices_set.copy()):
                valid_list = list(valid)
                cos = -F.cosine_similarity(last_layer_state[item], last_layer_state[valid_list], dim=-1)
                real = [valid_list[j] for j in cos.topk(per_pivot).indices.tolist()]
                indices_set.update(real)
                valid.difference_update(real)
            indices_set.difference_update(query_indices)
            retained = torch.tensor(sorted(indices_set))
            keep_index = torch.cat([torch.arange(image_start), retained, torch.arange(end, length)]).sort().values
            hidden, positions = hidden[:, keep_index], keep_index
        previous = hidden
        hidden = run_layer(lm, layer, hidden, positions)
    return model.lm_head(lm.norm(hidden)), positions


@pytest.mark.parametrize("per_pivot", [1, 2, 5])
def test_dart_llm_default_is_the_official_selection(model, per_pivot):
    """keep = 4 + 8 T is the official ``max_num_trunction = 8 T``: the same kept tokens (final
    norm, text pivots after the image, the official set order) and the same logits."""
    from test_stages import prefill_record

    batch = make_batch((8,), seed=per_pivot)
    image_start = int((batch["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    expected, kept = official_dart(model, lm_inputs(model, batch), image_start, 2, per_pivot)
    out, pre = prefill_record(model, batch, mmpress.get_press("dart_llm", keep=4 + 8 * per_pivot))
    assert pre.cuts[0].cols[0].tolist() == kept.tolist()
    torch.testing.assert_close(out.logits, expected, atol=1e-9, rtol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**20), min_size=1, max_size=12, unique=True), st.data())
def test_set_order_is_cpython_set_iteration(keys, data):
    """DART visits its pivots as ``for item in list(set(indices).copy())`` does: our tensor
    version of CPython's set gives the interpreter's order, for any count of inserted keys."""
    from mmpress.presses.dart import set_order

    count = data.draw(st.integers(1, len(keys)))
    other = data.draw(st.permutations(keys))  # a second row: rows are independent
    got = set_order(torch.tensor([keys, other]), torch.tensor([count, len(keys)]))
    assert [keys[c] for c in got[0, :count].tolist()] == list(set(keys[:count]).copy())
    assert [other[c] for c in got[1].tolist()] == list(set(other).copy())
    assert sorted(got[0].tolist()) == list(range(len(keys)))


# ---- SnapKV -----------------------------------------------------------------------------------
def test_snapkv_default_is_the_official_vote(model):
    """``SnapKVCluster.update_kv``: per layer, the window's (last ``window`` prompt tokens) softmax
    attention over the prefix, summed over the window rows, ``avg_pool1d`` (kernel 5, zero-padded)
    along the whole prefix before the window; per KV head (query heads of a group averaged: the
    cache keeps entries per KV head), the top ``keep`` of the image's entries are what the pressed
    cache holds."""
    from test_stages import kv_allowed, prefill_record

    batch, keep, window = make_batch((8,)), 16, 4
    press = mmpress.get_press("snapkv", keep=keep, window=window)
    image_start = int((batch["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    out, _ = prefill_record(model, batch, press)
    kept = kv_allowed(model, batch, out.past_key_values)
    lm, seen = model.model.language_model, {}
    layers = decoder_layers(lm)
    handles = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(i, a[0] if a else kw["hidden_states"]),
                                               with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    length = batch["input_ids"].shape[1]
    positions = torch.arange(length)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            q, k = rotated_qk(lm, layer, seen[i], positions)
            group = q.shape[1] // layer.self_attn.config.num_key_value_heads
            logits = q[:, :, -window:] @ k.transpose(2, 3) / math.sqrt(q.shape[-1])
            logits[..., -window:] += torch.full((window, window), -torch.inf).triu(1)
            votes = logits.softmax(dim=-1)[..., :-window].sum(dim=-2)  # (1, H, L - window)
            pooled = F.avg_pool1d(votes, kernel_size=5, padding=2, stride=1)
            pooled = pooled.view(1, -1, group, pooled.shape[-1]).mean(dim=2)[0]  # per KV head
            top = pooled[:, image_start:image_start + N_IMAGE].topk(keep, dim=-1).indices + image_start
            expected = torch.zeros(pooled.shape[0], length, dtype=torch.bool).scatter_(1, top, True)
            image = slice(image_start, image_start + N_IMAGE)
            got = kept(i)[0, ::group]  # (Hkv, L): the entries the pressed cache holds
            assert torch.equal(got[:, image], expected[:, image]), i


# ---- VTW --------------------------------------------------------------------------------------
def test_vtw_default_is_the_official_withdrawal(model):
    """``temp_cache`` defaults (pe_type "keep"): entering layer K every image token is cut out of
    the hidden states and of the position ids; the text keeps its original ids."""
    from test_stages import prefill_record

    batch = make_batch((8,))
    image_start = int((batch["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    lm = model.model.language_model
    hidden = lm_inputs(model, batch)
    positions = torch.arange(hidden.shape[1])
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(lm)):
            if i == 2:
                hidden = torch.cat([hidden[:, :image_start], hidden[:, image_start + N_IMAGE:]], dim=1)
                positions = torch.cat([positions[:image_start], positions[image_start + N_IMAGE:]])
            hidden = run_layer(lm, layer, hidden, positions)
        expected = model.lm_head(lm.norm(hidden))
    out, _ = prefill_record(model, batch, mmpress.get_press("vtw", layer=2))
    torch.testing.assert_close(out.logits, expected, atol=1e-9, rtol=1e-9)


# ---- SparseVLM --------------------------------------------------------------------------------
def test_sparsevlm_places_merged_tokens_after_the_kept_ones_and_renumbers(model):
    """Official v1.0 (``USE_VERSION`` unset): after a pruning layer the kept visual tokens (in
    sequence order) are followed by the recycled (merged) ones, and the whole sequence is
    renumbered (``position_ids[:, :L']``); a later token continues that numbering."""
    press = mmpress.get_press("sparsevlm", keep=64)
    assert press.positions is None  # the official numbering ("reindex") wherever positions are 1-D
    g = torch.Generator().manual_seed(0)
    m, n, t, d = 2, 64, 5, 8
    ctx = mmpress.VisualContext(text=torch.randn(m, t, d, generator=g), text_mask=torch.ones(m, t, dtype=torch.bool),
                                visual_inputs=torch.randn(m, n, d, generator=g),
                                llm_attn_rows=torch.rand(m, t, n, generator=g))
    tokens = torch.randn(m, n, d, generator=g)
    k = press.budgets(n)[0]
    out, index = press.press(tokens, ctx, k)
    assert index.tolist() == [list(range(k))] * m  # slots: the order the tokens take in the sequence
    kept_n = next(c for c in range(k, 0, -1) if c + mmpress.presses.sparsevlm.recycled(n, c) == k)
    top = press.rater_attention(ctx).topk(kept_n, dim=-1).indices.sort(dim=-1).values
    torch.testing.assert_close(out[:, :kept_n], tokens.gather(1, top[..., None].expand(-1, -1, d)))
    keep_ids = mmpress.get_press("sparsevlm", keep=64, positions="keep").press(tokens, ctx, k)[1]
    assert not torch.equal(keep_ids, index)  # original ids: merged tokens at their peaks' columns


def test_sparsevlm_raters_are_the_text_after_the_image():
    """Official raters: the text tokens after the image (``hidden_states[:, text_token_start:]``)
    whose relevance ``softmax_text(V T^T)`` (over that text) beats the mean; a text token before
    the image, however relevant, never rates."""
    press = mmpress.get_press("sparsevlm", keep=64)
    g = torch.Generator().manual_seed(1)
    n, t, d = 16, 6, 8
    visual = torch.randn(1, n, d, generator=g)
    text = torch.randn(1, t, d, generator=g)
    text[0, 0] = visual[0].mean(0) * 50  # before the image: the most relevant by far
    rows = torch.rand(1, t, n, generator=g)
    rows[0, 0] = torch.arange(n, dtype=torch.float) * 10  # its attention would decide the ranking
    ctx = mmpress.VisualContext(text=text, text_mask=torch.ones(1, t, dtype=torch.bool), visual_inputs=visual,
                                llm_attn_rows=rows, token_index=torch.arange(2, 2 + n)[None],
                                text_index=torch.tensor([[0, 18, 19, 20, 21, 22]]))
    relevance = (visual @ text[:, 1:].transpose(1, 2)).softmax(dim=-1).mean(1)  # over the text after the image
    raters = relevance > relevance.mean(dim=-1, keepdim=True)
    expected = rows[:, 1:][raters[..., None].expand(-1, -1, n)].view(1, -1, n).mean(1)
    torch.testing.assert_close(press.rater_attention(ctx), expected)


# ---- LOOK-M -----------------------------------------------------------------------------------
def official_lookm(keys, values, attn, image_start, n_image, hh_ratio=0.1, recent_ratio=0.1):
    """``TextPivotMerge_LayerWise.__call__`` (SUSTechBruce/LOOK-M, ``text_prior_pivot_merge``) on
    one layer's prefill cache, batch 1: ``keys``, ``values`` (H, L, d), ``attn`` (H, L, L) the causal
    softmax of every prompt row, per head. Heavy-hitter scores summed over the query rows; the
    image's entries and the recent window pushed down by -65516, a top-``int(L * hh_ratio)`` over
    the entries before the window, then ``mask = score >= 0`` (every text entry, the picks, the
    last ``int(L * recent_ratio)``); each evicted entry averaged with its most cosine-similar kept
    entry and scatter-``mean``-ed (``include_self``) into it, keys and values alike."""
    heads, length, d = keys.shape
    hh_size, recent = int(length * hh_ratio), int(length * recent_ratio)
    score = attn.sum(dim=1)  # (H, L)
    anti = torch.zeros(heads, length, dtype=score.dtype)
    anti[:, image_start:image_start + n_image] = -65516
    anti[:, -recent:] = -65516
    score = score + anti
    top = score[:, :-recent].topk(hh_size, dim=-1).indices.sort().values
    score = score.scatter(1, top, 0)
    score[:, -recent:] = 0
    mask = score >= 0
    kept_k, kept_v = keys[mask].view(heads, -1, d), values[mask].view(heads, -1, d)
    pruned_k, pruned_v = keys[~mask].view(heads, -1, d), values[~mask].view(heads, -1, d)
    unit = lambda t: t / t.norm(dim=-1, keepdim=True)  # noqa: E731
    pivot = (unit(pruned_k) @ unit(kept_k).transpose(1, 2)).max(dim=-1).indices[..., None].expand(-1, -1, d)
    out = []
    for kept, pruned in ((kept_k, pruned_k), (kept_v, pruned_v)):
        merged = (pruned + kept.gather(1, pivot)) / 2
        out.append(kept.scatter_reduce(1, pivot, merged, reduce="mean", include_self=True))
    return out[0], out[1], mask


def test_lookm_default_is_the_official_text_prior_pivot_merge(model):
    """Per layer and KV head, the pressed cache (keys and values, every entry: text included,
    pivots may be text) equals the official ``text_prior_pivot_merge`` at its defaults
    (hh_ratio = recent_ratio = 0.1), given the official image count as ``keep``. The prompt's text
    after the image is shorter than the recent window, so the window keeps image entries too.
    Grouped-query attention (official: MHA): the score averages a KV head's query heads."""
    batch = make_batch((3,))
    ids = batch["input_ids"][0]
    image_start, length = int((ids == IMAGE_TOKEN).nonzero()[0]), ids.shape[0]
    assert length - (image_start + N_IMAGE) < int(0.1 * length)  # the window reaches into the image
    lm, seen = model.model.language_model, {}
    layers = decoder_layers(lm)
    handles = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(i, a[0] if a else kw["hidden_states"]),
                                               with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        full = model(**batch, use_cache=True).past_key_values
    for h in handles:
        h.remove()
    positions = torch.arange(length)
    expected, keeps = [], set()
    with torch.no_grad():
        for i, layer in enumerate(layers):
            q, k = rotated_qk(lm, layer, seen[i], positions)
            group = q.shape[1] // layer.self_attn.config.num_key_value_heads
            logits = q @ k.transpose(2, 3) / math.sqrt(q.shape[-1])
            weights = (logits + torch.full((length, length), -torch.inf).triu(1)).softmax(dim=-1)[0]
            weights = weights.view(-1, group, length, length).mean(dim=1)  # per KV head
            cache = full.layers[i]
            torch.testing.assert_close(cache.keys[0], k[0, ::group])  # the cache holds the rotated keys
            got = official_lookm(cache.keys[0], cache.values[0], weights, image_start, N_IMAGE)
            keeps.add(int(got[2][0, image_start:image_start + N_IMAGE].sum()))
            expected.append(got)
    assert len(keeps) == 1  # the official image count is the same in every layer and head
    keep = keeps.pop()
    assert keep < N_IMAGE
    press = mmpress.get_press("lookm", keep=keep)
    with torch.no_grad(), press(model):
        pressed = model(**batch, use_cache=True).past_key_values
    for i, (exp_k, exp_v, _) in enumerate(expected):
        torch.testing.assert_close(pressed.layers[i].keys[0], exp_k, msg=f"layer {i}")
        torch.testing.assert_close(pressed.layers[i].values[0], exp_v, msg=f"layer {i}")


def test_lookm_options_leave_the_official_cache():
    """pivots='visual' (no text pivot) and recent_ratio=0 (no window) are options, not the default;
    bad values raise."""
    press = mmpress.get_press("lookm", keep=4)
    assert (press.merge, press.pivots, press.recent_ratio) == ("pivot", "all", 0.1)
    for bad in (dict(pivots="text"), dict(recent_ratio=1.0), dict(recent_ratio=-0.1), dict(recent_ratio=True)):
        with pytest.raises(ValueError):
            mmpress.get_press("lookm", keep=4, **bad)
