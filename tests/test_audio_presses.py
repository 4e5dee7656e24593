"""Audio presses (audio_merge, silence, fastadasp) and ``ops.audio``: each press against a
re-implementation of its official selection written from the official code (loops, float64),
exact budgets, merge weights summing to sizes, adjacency, batch = each clip alone, bad input, the
FastAdaSP merge inside a real decoder stack against the unpressed model's own hidden states,
keys and attention, and (once the adapter is in) the Qwen2-Audio family end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mmpress
from mmpress.ops.audio import (
    adjacent_similarity, alternate_in_chains, attention_to_tokens, loudest, merge_adjacent, merge_adjacent_pairs,
    runs_from_edges, top_edges,
)
from mmpress.presses import PRESSES, VisualContext, get_press

M, N, D = 3, 24, 8


def clips(m=M, n=N, d=D, seed=0, dtype=torch.float64):
    """Audio-like tokens: a random walk in time (neighbours similar), some frames repeated
    exactly (steady sound), an energy per frame with a silent stretch of equal values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, d, generator=g, dtype=torch.float64).cumsum(dim=1) * 0.3 + torch.randn(
        m, 1, d, generator=g, dtype=torch.float64)
    x[:, 5:8] = x[:, 5:6]  # a steady stretch: three identical frames
    energy = torch.randn(m, n, generator=g, dtype=torch.float64)
    energy[:, -6:] = -4.0  # silence padding: equal energies
    ctx = VisualContext(kind="audio", audio_energy=energy,
                        audio_features=torch.randn(m, n, 5, generator=g, dtype=torch.float64).cumsum(dim=1))
    return x.to(dtype), ctx


def alone(ctx: VisualContext, i: int) -> VisualContext:
    return VisualContext(kind=ctx.kind, **{k: getattr(ctx, k)[i : i + 1] for k in
                                           ("audio_energy", "audio_features", "llm_attn", "llm_keys")
                                           if getattr(ctx, k) is not None})


# ---- references written from the official code (loops, float64) --------------------------------
def stable_top(scores: list[float], r: int) -> list[int]:
    """The r best indices, ties to the lower index (what our sort pins down; torch.topk leaves
    ties unspecified), ascending (official: ``.indices.sort()``)."""
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:r])


def official_merge_hidden_states(h, cos, method, merge_token_num, weights=None, sizes=None, pos=None):
    """FastAdaSP's ``QWenBlock.merge_hidden_states`` for one row (yichen14/FastAdaSP,
    ``Qwen-Audio/modeling_qwen.py``): h (L, D), cos (L - 1,) adjacent key cosines.

    "atome": walk left to right; a selected edge idx merges (h[idx], h[idx+1]) into their mean and
    jumps past the pair. ``sizes`` generalises the mean to a size-weighted one (A-ToMe stacked:
    sizes add); all ones is the official code. "merge_weighted": a run of selected edges merges
    whole, weighted by ``weights`` (the attention each token receives; None: "merge_ave").
    Returns the new rows, their sizes (weights for merge_weighted) and the index each starts at."""
    merge = set(stable_top(cos.tolist(), merge_token_num))
    length = h.shape[0]
    sizes = [1.0] * length if sizes is None else sizes
    pos = list(range(length)) if pos is None else pos
    out, out_size, out_pos, idx = [], [], [], 0
    while idx < length:
        if method == "atome":
            if idx in merge:
                s = sizes[idx] + sizes[idx + 1]
                out.append((h[idx] * sizes[idx] + h[idx + 1] * sizes[idx + 1]) / s)
                out_size.append(s), out_pos.append(pos[idx])
                idx += 2
            else:
                out.append(h[idx]), out_size.append(sizes[idx]), out_pos.append(pos[idx])
                idx += 1
        else:
            w = float(weights[idx]) if weights is not None else 1.0
            tmp, count, begin = h[idx] * w, w, idx
            while idx in merge:
                w = float(weights[idx + 1]) if weights is not None else 1.0
                tmp = tmp + h[idx + 1] * w
                idx += 1
                count += w
            out.append(tmp / count), out_size.append(count), out_pos.append(begin)
            idx += 1
    return torch.stack(out), out_size, out_pos


def reference_audio_merge(x, k, metric=None):
    """A-ToMe modules stacked until k tokens remain: each round the official "atome" module with
    r = (tokens now) - k, on the metric's tokens (size-weighted means, merged alongside)."""
    h, met = x, (x if metric is None else metric)
    sizes, pos = [1.0] * x.shape[0], list(range(x.shape[0]))
    while h.shape[0] > k:
        cos = F.cosine_similarity(met[:-1], met[1:], dim=-1)
        r = h.shape[0] - k
        new_h, new_sizes, new_pos = official_merge_hidden_states(h, cos, "atome", r, sizes=sizes, pos=pos)
        if metric is not None:
            met, _, _ = official_merge_hidden_states(met, cos, "atome", r, sizes=sizes, pos=pos)
        else:
            met = new_h
        h, sizes, pos = new_h, new_sizes, new_pos
    return h, torch.tensor(sizes, dtype=h.dtype), torch.tensor(pos)


def official_fastadasp_budgets(n, ratio, p, schedule, last=31):
    """Tokens left after each merging layer of the official loop (``QWenModel.forward``): layer p
    with ``ratio``; later layers by the schedule (decay: ``ratio * (1 - (i - p) / (31 - p))``)."""
    left, out = n, []
    for i in range(p, last):
        if i == p:
            r = ratio
        elif schedule == "constant":
            r = ratio
        elif schedule == "decay":
            r = ratio * (1 - (i - p) / (last - p))
        else:
            break
        left -= int(left * r)
        out.append(left)
    return tuple(out)


# ---- ops.audio --------------------------------------------------------------------------------
def test_adjacent_similarity_is_the_cosine_of_neighbours():
    x, _ = clips()
    assert torch.allclose(adjacent_similarity(x), F.cosine_similarity(x[:, :-1], x[:, 1:], dim=-1))


def test_top_edges_ties_go_to_the_lower_index_and_r_may_differ_per_row():
    score = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    assert top_edges(score, 2).tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    assert top_edges(score, torch.tensor([1, 3])).sum(1).tolist() == [1, 3]


def test_alternate_in_chains_is_the_left_to_right_pair_walk():
    sel = torch.tensor([[1, 1, 1, 0, 1, 1, 0, 0, 1]], dtype=torch.bool)
    assert alternate_in_chains(sel).int().tolist() == [[1, 0, 1, 0, 1, 0, 0, 0, 1]]
    assert runs_from_edges(sel).int().tolist() == [[1, 0, 0, 0, 1, 0, 0, 1, 1, 0]]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(bits=st.lists(st.booleans(), min_size=1, max_size=30))
def test_alternate_in_chains_realises_ceil_half_of_every_chain(bits):
    sel = torch.tensor([bits])
    got = alternate_in_chains(sel)[0].tolist()
    walk, idx = [False] * len(bits), 0  # the official walk over edges: merge (idx, idx+1), jump past
    while idx < len(bits):
        if bits[idx]:
            walk[idx] = True
            idx += 2
        else:
            idx += 1
    assert got == walk
    assert not any(a and b for a, b in zip(got, got[1:]))  # a token is merged once per round


@settings(max_examples=30, deadline=None, derandomize=True)
@given(m=st.integers(1, 3), n=st.integers(1, 40), data=st.data())
def test_merge_adjacent_pairs_properties(m, n, data):
    """Exactly k tokens; sizes (merge weights) sum to N; every token is the mean of a contiguous
    run of frames starting at its ``first`` frame (adjacency); ``first`` starts at 0, ascending."""
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(n * 7 + k)
    x = torch.randn(m, n, 4, generator=g, dtype=torch.float64).cumsum(1)
    if data.draw(st.booleans()):
        x = x.round()  # many exact ties
    merged, size, first = merge_adjacent_pairs(x, k)
    assert merged.shape == (m, k, 4) and size.shape == first.shape == (m, k)
    assert torch.equal(size.sum(1), torch.full((m,), float(n), dtype=size.dtype))
    assert (first[:, 0] == 0).all() and (first.diff(dim=1) > 0).all()
    ends = torch.cat([first[:, 1:], torch.full((m, 1), n)], dim=1)
    assert torch.equal(ends - first, size.long())  # runs tile the clip: contiguous, no gaps
    for i in range(m):
        for j in range(k):
            torch.testing.assert_close(merged[i, j], x[i, first[i, j] : ends[i, j]].mean(0))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(m=st.integers(1, 3), n=st.integers(1, 40), weighted=st.booleans(), data=st.data())
def test_merge_adjacent_properties(m, n, weighted, data):
    """One step to exactly k: weights carried sum to the total weight, each token the weighted
    mean of its contiguous run, the N - k best edges joined."""
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(n * 13 + k)
    x = torch.randn(m, n, 3, generator=g, dtype=torch.float64)
    score = torch.randn(m, max(n - 1, 0), generator=g, dtype=torch.float64).round(decimals=1)
    w = torch.rand(m, n, generator=g, dtype=torch.float64) if weighted else None
    merged, carried, first = merge_adjacent(x, score, k, w)
    assert merged.shape == (m, k, 3) and (first.diff(dim=1) > 0).all() and (first[:, 0] == 0).all()
    total = w.sum(1) if weighted else torch.full((m,), float(n), dtype=torch.float64)
    torch.testing.assert_close(carried.sum(1), total)
    ends = torch.cat([first[:, 1:], torch.full((m, 1), n)], dim=1)
    for i in range(m):
        joined = set(stable_top(score[i].tolist(), n - k))
        for j in range(k):
            run = range(int(first[i, j]), int(ends[i, j]))
            assert all(t in joined for t in run[:-1]) and (run[-1] == n - 1 or run[-1] not in joined)
            ww = w[i, run.start : run.stop] if weighted else torch.ones(len(run), dtype=torch.float64)
            torch.testing.assert_close(merged[i, j], (x[i, run.start : run.stop] * ww[:, None]).sum(0) / ww.sum())


def test_merge_adjacent_zero_weights_fall_back_to_the_plain_mean():
    x = torch.arange(8, dtype=torch.float64).view(1, 4, 2)
    merged, _, first = merge_adjacent(x, torch.tensor([[0.9, 0.1, 0.1]], dtype=torch.float64), 3, torch.zeros(1, 4))
    assert first.tolist() == [[0, 2, 3]] and torch.equal(merged[0, 0], x[0, :2].mean(0))


def test_loudest_keeps_the_earlier_of_equal_energies():
    energy = torch.tensor([[0.0, 5.0, -1.0, -1.0, -1.0, 3.0]])
    assert loudest(energy, 4).tolist() == [[0, 1, 2, 5]]


@pytest.mark.parametrize("k", [0, N + 1])
def test_ops_refuse_a_budget_out_of_range(k):
    x, _ = clips()
    with pytest.raises(ValueError, match="k must be in"):
        merge_adjacent_pairs(x, k)
    with pytest.raises(ValueError, match="k must be in"):
        merge_adjacent(x, adjacent_similarity(x), k)


# ---- audio_merge: A-ToMe -----------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["tokens", "features"])
@pytest.mark.parametrize("k", [1, 2, 7, 12, 13, N - 1])
def test_audio_merge_matches_stacked_official_atome_modules(metric, k):
    x, ctx = clips()
    out, index = get_press("audio_merge", keep=k, metric=metric).press(x, ctx)
    assert out.shape == (M, k, D) and out.dtype == x.dtype and (index.diff(dim=1) > 0).all()
    for i in range(M):
        feats = ctx.audio_features[i] if metric == "features" else None
        ref, _, pos = reference_audio_merge(x[i], k, feats)
        assert torch.equal(index[i], pos)
        torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)


def test_audio_merge_first_round_is_the_official_module_exactly():
    """With r = N - k edges asked for and no two of the best edges adjacent, one official module
    realises them all: the press then equals official "atome" (plain pair means) bit for bit."""
    x = torch.randn(1, 12, 4, dtype=torch.float64)
    x[0, 1], x[0, 6], x[0, 10] = x[0, 0], x[0, 5] * 2, x[0, 9]  # three isolated exact pairs
    out, index = get_press("audio_merge", keep=9).press(x, VisualContext(kind="audio"))
    cos = F.cosine_similarity(x[0, :-1], x[0, 1:], dim=-1)
    ref, _, pos = official_merge_hidden_states(x[0], cos, "atome", 3)
    assert index[0].tolist() == pos == [0, 2, 3, 4, 5, 7, 8, 9, 11]
    assert torch.equal(out[0], ref)


def test_audio_merge_merges_a_steady_stretch_first_and_keeps_the_earlier_frame():
    x, ctx = clips()
    out, index = get_press("audio_merge", keep=N - 2).press(x, ctx)
    assert all(6 not in row and 7 not in row and 5 in row for row in index.tolist())
    torch.testing.assert_close(out[:, 5], x[:, 5])


def test_audio_merge_batch_equals_each_clip_alone_and_half_precision():
    x, ctx = clips()
    press = get_press("audio_merge", keep_ratio=0.4)
    out, index = press.press(x, ctx)
    for i in range(M):
        one, idx = press.press(x[i : i + 1], alone(ctx, i))
        assert torch.equal(idx[0], index[i]) and torch.equal(one[0], out[i])
    half, idx = press.press(x.to(torch.bfloat16), ctx)
    assert half.dtype == torch.bfloat16 and idx.shape == index.shape and torch.isfinite(half.float()).all()


# ---- silence: energy VAD with a budget ---------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5, N - 6, N - 3, N - 1])
def test_silence_keeps_the_loudest_frames_verbatim(k):
    x, ctx = clips()
    out, index = get_press("silence", keep=k).press(x, ctx)
    for i in range(M):
        energy = ctx.audio_energy[i].tolist()
        assert index[i].tolist() == stable_top(energy, k)
    assert torch.equal(out, x.gather(1, index.unsqueeze(-1).expand(-1, -1, D)))
    if k <= N - 6:  # the silent stretch goes first
        assert (index < N - 6).all()


def test_silence_batch_equals_each_clip_alone():
    x, ctx = clips()
    press = get_press("silence", keep_ratio=0.5)
    out, index = press.press(x, ctx)
    for i in range(M):
        one, idx = press.press(x[i : i + 1], alone(ctx, i))
        assert torch.equal(idx[0], index[i]) and torch.equal(one[0], out[i])


# ---- fastadasp: the merge, the schedules ---------------------------------------------------------
def fastadasp_ctx(m=M, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(m, n, 6, generator=g, dtype=torch.float64).cumsum(1)
    attn = torch.rand(m, n, generator=g, dtype=torch.float64) / n
    return VisualContext(llm_keys=keys, llm_attn=attn)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("keep_ratio", [0.25, 0.5, 0.6, 0.9])
def test_fastadasp_merge_matches_official_merge_weighted(weighted, keep_ratio):
    x, _ = clips()
    ctx = fastadasp_ctx()
    press = get_press("fastadasp", keep_ratio=keep_ratio, weighted=weighted)
    (k,) = press.budgets(N)
    out, index = press.press(x, ctx, k)
    ratio = 1 - keep_ratio
    for i in range(M):
        cos = F.cosine_similarity(ctx.llm_keys[i, :-1], ctx.llm_keys[i, 1:], dim=-1)
        ref, _, pos = official_merge_hidden_states(x[i], cos, "merge_weighted", int(N * ratio),
                                                   weights=ctx.llm_attn[i] if weighted else None)
        assert index[i].tolist() == pos and len(pos) == k
        torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule", ["none", "constant", "decay"])
@pytest.mark.parametrize("n, ratio, p", [(750, 0.4, 2), (750, 0.5, 5), (101, 0.25, 0), (30, 0.75, 3)])
def test_fastadasp_budgets_are_the_official_schedules(schedule, n, ratio, p):
    press = get_press("fastadasp", keep_ratio=1 - ratio, layer=p + 1, schedule=schedule)
    assert press.budgets(n) == official_fastadasp_budgets(n, ratio, p, schedule)
    assert len(press.layers()) == len(press.budgets(n)) and press.layers()[0] == p + 1
    assert all(press.signal_layer(j) == j - 1 for j in press.layers())


def test_fastadasp_keep_count_budget_and_a_short_model():
    press = get_press("fastadasp", keep=300, schedule="constant", last_layer=5)
    assert press.layers() == (3, 4, 5)
    assert press.budgets(750) == (300, 300 - int(300 * 0.6), 120 - int(120 * 0.6))


def test_fastadasp_batch_equals_each_item_alone():
    x, _ = clips()
    ctx, press = fastadasp_ctx(), get_press("fastadasp", keep=9)
    out, index = press.press(x, ctx, 9)
    for i in range(M):
        one, idx = press.press(x[i : i + 1], alone(ctx, i), 9)
        assert torch.equal(idx[0], index[i]) and torch.equal(one[0], out[i])


# ---- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs, says", [
    ("audio_merge", dict(keep=4, metric="keys"), "metric must be 'tokens'"),
    ("audio_merge", dict(), "needs a budget"),
    ("silence", dict(keep=0), "keep must be a positive int"),
    ("silence", dict(keep_ratio=1.5), "keep_ratio must be a number in"),
    ("fastadasp", dict(keep=4, schedule="linear"), "schedule must be one of"),
    ("fastadasp", dict(keep=4, schedule="decay", last_layer=2), "last_layer must be an int >= layer"),
    ("fastadasp", dict(keep=4, layer=0), "layers must be ascending ints >= 1"),
    ("fastadasp", dict(keep=4, positions="first"), "positions must be None"),
    ("fastadasp", dict(keep=4, keep_ratio=0.5), "either keep= or keep_ratio="),
])
def test_bad_options_say_how_to_fix(name, kwargs, says):
    with pytest.raises(ValueError, match=says):
        get_press(name, **kwargs)


@pytest.mark.parametrize("name, kwargs, signal", [
    ("silence", dict(keep=4), "audio_energy"), ("audio_merge", dict(keep=4, metric="features"), "audio_features"),
    ("fastadasp", dict(keep=4), "llm_keys"),
])
def test_a_missing_signal_names_it(name, kwargs, signal):
    x, _ = clips()
    with pytest.raises(ValueError, match=f"needs the '{signal}' signal"):
        get_press(name, **kwargs).press(x, VisualContext(kind="audio"), 4)


def test_a_mismatched_signal_is_refused():
    x, ctx = clips()
    ctx.audio_energy = ctx.audio_energy[:, :-1]
    with pytest.raises(ValueError, match="one value per token"):
        get_press("silence", keep=4).press(x, ctx)
    ctx.audio_features = ctx.audio_features[:, :-1]
    with pytest.raises(ValueError, match="one row per token"):
        get_press("audio_merge", keep=4, metric="features").press(x, ctx)


def test_registered_declared_and_spec_round_trip():
    for name in ("audio_merge", "silence", "fastadasp", "samp"):
        cls = PRESSES[name]
        assert cls.paper and cls.__doc__ and name in mmpress.list_presses()
    assert PRESSES["silence"].needs == ("audio_energy",) and PRESSES["audio_merge"].needs == ()
    assert PRESSES["samp"].needs == ("audio_attn",) and "audio_attn" in mmpress.presses.base.SIGNALS
    assert get_press("audio_merge", keep=4, metric="features").needs == ("audio_features",)
    assert get_press("fastadasp", keep=4, weighted=False).needs == ("llm_keys",)
    assert PRESSES["fastadasp"].stage == "in_llm" and PRESSES["fastadasp"].query == "all"
    assert mmpress.parse_press("fastadasp:0.6@4") == get_press("fastadasp", keep_ratio=0.6, layer=4)
    assert mmpress.parse_press("silence:32") == get_press("silence", keep=32)


# ---- FastAdaSP inside a decoder stack: the stage's merge against the unpressed model ------------
@pytest.mark.parametrize("schedule", ["none", "constant"])
def test_fastadasp_adds_no_host_syncs(schedule):
    """A pressed generate syncs no more than the unpressed one (counted as for every press)."""
    from test_llava import count_syncs
    from test_stages import batches, deep

    model, batch = deep("llava"), batches("llava", None)["ragged"]
    press = get_press("fastadasp", keep_ratio=0.5, layer=1, schedule=schedule, last_layer=3)
    with torch.no_grad():
        with get_press("none")(model):
            baseline = count_syncs(lambda: model.generate(**batch, max_new_tokens=2, do_sample=False))
        with press(model):
            pressed = count_syncs(lambda: model.generate(**batch, max_new_tokens=2, do_sample=False))
    assert pressed == baseline


def test_fastadasp_in_a_decoder_stack_merges_what_the_official_code_merges():
    """On a tiny 4-layer LLaVA (eager attention for the reference; the press runs on SDPA): the
    hidden states entering layer p + 1 under the press are official ``merge_weighted`` applied to
    the unpressed model's hidden states entering layer p + 1, with layer p's rotated keys and the
    attention each token receives there summed over every query row and head."""
    from conftest import make_batch
    from test_stages import deep
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    p, keep_ratio = 1, 0.5
    model, eager = deep("llava"), deep("llava", attn="eager")
    eager.load_state_dict(model.state_dict())
    batch = make_batch((5,))
    image = batch["input_ids"][0] == model.config.image_token_id
    span = image.nonzero()[:, 0]
    n = int(span.numel())
    lm = model.model.language_model
    with torch.no_grad():
        out = eager(**batch, output_hidden_states=True, output_attentions=True)
        h_p = out.hidden_states[p][0]  # entering layer p
        layer = eager.model.language_model.layers[p]
        attn = layer.self_attn
        position_ids = torch.arange(h_p.shape[0])[None]
        cos, sin = eager.model.language_model.rotary_emb(h_p[None], position_ids)
        k = attn.k_proj(layer.input_layernorm(h_p[None])).view(1, h_p.shape[0], -1, attn.head_dim).transpose(1, 2)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        keys = k[0].transpose(0, 1).reshape(h_p.shape[0], -1)[span]
        weights = out.attentions[p][0].sum(dim=1).sum(dim=0)[span]  # over query rows, then heads
        key_cos = F.cosine_similarity(keys[:-1], keys[1:], dim=-1)
        expected, _, pos = official_merge_hidden_states(out.hidden_states[p + 1][0][span].double(), key_cos.double(),
                                                        "merge_weighted", int(n * (1 - keep_ratio)),
                                                        weights=weights.double())
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).clone()

    press = get_press("fastadasp", keep_ratio=keep_ratio, layer=p + 1)
    with torch.no_grad(), press(model) as run:
        handle = lm.layers[p + 1].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**batch)
        finally:
            handle.remove()
    assert run.stats.layer_kept == [(p + 1, len(pos))]
    start = int(span[0])
    got = seen["hidden"][0, start : start + len(pos)]
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)
    text_after = seen["hidden"][0, start + len(pos):]
    torch.testing.assert_close(text_after, out.hidden_states[p + 1][0, int(span[-1]) + 1:], atol=1e-5, rtol=1e-5)


# ---- presses that need only the tokens or the text, on audio items (kind "audio", no grid) -------
@pytest.mark.parametrize("name", ["random", "divprune", "tome", "mmtok", "cdpruner"])
def test_token_and_text_presses_run_on_audio_items(name):
    """No grid, no [CLS]: what an audio adapter gives (``vision_features``: the audio encoder's
    output, the tower features MMTok reads)."""
    x, ctx = clips(dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    ctx.text, ctx.text_mask = torch.randn(M, 4, D, generator=g), torch.arange(4) < torch.tensor([[4], [1], [0]])
    ctx.vision_features = ctx.audio_features.float()
    assert ctx.grid is None and ctx.grid_thw is None
    out, index = get_press(name, keep=7).press(x, ctx)
    assert out.shape == (M, 7, D) and torch.isfinite(out).all() and (index.diff(dim=1) > 0).all()


@given(st.integers(1, 6), st.integers(0, 3))
@settings(max_examples=20, deadline=None)
def test_attention_to_tokens_is_samps_reshape(tokens, extra):
    """The frames beyond the clip's 2T (a padded window, an odd last frame) are cut; within, SA-MAP's
    ``reshape(N, 2, N, 2).mean(1).sum(-1)``."""
    frames = 2 * tokens + extra
    attn = torch.rand(3, frames, frames, generator=torch.Generator().manual_seed(frames), dtype=torch.float64)
    inner = attn[:, : 2 * tokens, : 2 * tokens]
    expected = inner.reshape(3, tokens, 2, tokens, 2).mean(2).sum(-1)
    torch.testing.assert_close(attention_to_tokens(attn, tokens), expected)


def test_uniform_and_pool_read_an_audio_clip_as_a_line_of_frames():
    """An audio clip has no grid: uniform keeps the centres of k equal runs of frames (time order),
    pool averages those runs; an image without a grid is still refused."""
    x, ctx = clips(dtype=torch.float64)
    n = x.shape[1]
    out, index = get_press("uniform", keep=4).press(x, ctx)
    edges = [round(j * n / 4) for j in range(5)]  # 4 near-equal runs of frames
    centres = torch.tensor([(a + b - 1) // 2 for a, b in zip(edges, edges[1:])])
    assert torch.equal(index, centres.expand(x.shape[0], 4)) and torch.equal(out, x[:, centres])
    pooled, index = get_press("pool", keep=4).press(x, ctx)
    runs = torch.stack([x[:, a:b].mean(dim=1) for a, b in zip(edges, edges[1:])], dim=1)
    torch.testing.assert_close(pooled, runs)
    assert torch.equal(index[0], centres)
    with pytest.raises(ValueError, match="'grid' signal"):
        get_press("uniform", keep=4).press(x, VisualContext())


# ---- end to end: the Qwen2-Audio family (tiny random model) ------------------------------------
def qwen2_audio(layers: int = 4):
    from mmpress.registry import FAMILIES

    if "qwen2_audio" not in FAMILIES:
        pytest.skip("the Qwen2-Audio adapter is not registered")
    cls = FAMILIES["qwen2_audio"]
    torch.manual_seed(0)
    return cls, cls.build("tiny", lm_layers=layers)


def audio_presses(ratio: float) -> list:
    return [get_press("audio_merge", keep_ratio=ratio), get_press("audio_merge", keep_ratio=ratio, metric="features"),
            get_press("silence", keep_ratio=ratio), get_press("fastadasp", keep_ratio=ratio, layer=1),
            get_press("fastadasp", keep_ratio=ratio, layer=1, schedule="constant", last_layer=3),
            get_press("samp", keep_ratio=ratio)]


def greedy(model, batch, steps=2):
    out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, -steps:], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("rows", ["single", "ragged"])
def test_qwen2_audio_keep_all_is_the_unpressed_model(rows):
    cls, model = qwen2_audio()
    batch = cls.prompts(model, cls.example_rows[rows])
    with torch.no_grad():
        reference, (ref_tokens, ref_scores) = model(**batch).logits, greedy(model, batch)
        for press in audio_presses(1.0):
            with press(model) as run:
                assert torch.equal(model(**batch).logits, reference), press
                tokens, scores = greedy(model, batch)
            assert torch.equal(tokens, ref_tokens) and torch.equal(scores, ref_scores), press
            assert run.stats.kept_visual_tokens == run.stats.visual_tokens > 0


@pytest.mark.parametrize("press", audio_presses(0.5), ids=lambda p: f"{p.name}-{getattr(p, 'schedule', '')}")
def test_qwen2_audio_ragged_batch_is_each_row_alone(press):
    cls, model = qwen2_audio()
    rows = cls.example_rows["ragged"]
    batch = cls.prompts(model, rows)
    with torch.no_grad(), press(model) as run:
        logits = model(**batch).logits
        tokens, scores = greedy(model, batch)
    assert run.stats.kept_visual_tokens < run.stats.visual_tokens and torch.isfinite(scores).all()
    for i in range(len(rows)):
        alone_batch = cls.prompts(model, [rows[i]], first_row=i)
        with torch.no_grad(), press(model):
            row_logits = model(**alone_batch).logits
            row_tokens, row_scores = greedy(model, alone_batch)
        torch.testing.assert_close(logits[i, -1], row_logits[0, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(scores[i], row_scores[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens[i], row_tokens[0]), (press, i)


def test_qwen2_audio_silence_drops_the_silent_frames_first():
    """A clip whose second half is silent (log-mel at a floor below every real frame): silence at
    half the tokens keeps exactly the first half's tokens (their original position ids, under
    positions="keep", reach the language model)."""
    cls, model = qwen2_audio()
    batch = cls.prompts(model, cls.example_rows["single"])
    audio = (batch["input_ids"][0] == model.config.audio_token_id).nonzero()[:, 0]
    n = int(audio.numel())
    feats = batch["input_features"]
    silent = torch.arange(feats.shape[-1]) >= 4 * (n // 2)  # the frames of the second half's tokens
    batch["input_features"] = torch.where(silent, feats.amin() - 1.0, feats)
    seen = {}

    def grab(module, args, kwargs):
        seen["positions"] = kwargs["position_ids"].clone()

    lm = mmpress.registry.get_adapter(model).lm
    with torch.no_grad(), get_press("silence", keep=n // 2)(model, positions="keep") as run:
        handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**batch)
        finally:
            handle.remove()
    assert run.stats.kept_visual_tokens == n // 2
    positions = set(seen["positions"].reshape(-1).tolist())
    assert set(audio[: n // 2].tolist()) <= positions and not set(audio[n // 2 :].tolist()) & positions


# ---- samp (SA-MAP) -----------------------------------------------------------------------------
def official_samp(x, attn, k, threshold):
    """The official ``method == 'SA-MAP'`` loop for one clip (Tencent/AngelSlim, branch SA-MAP,
    ``qwen2_audio_pruner.py``), written from it in float64: x (N, C) projected tokens, attn (2, N, N)
    the pooled encoder attention (max over heads, mean over heads). Returns (kept tokens, the first
    token of each kept run)."""
    n = x.shape[0]
    unit = x / x.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.T
    merge_importance = attn[0].mean(0)
    prune = torch.diagonal(attn[1])
    h, prune_importance, firsts, merged, idx = [], [], [], [], 0

    def emit(members):
        w = merge_importance[members]
        h.append((w[:, None] * x[members]).sum(0) / w.sum())
        prune_importance.append(prune[members].mean())
        firsts.append(members[0])

    while idx < n:
        merged.append(idx)
        if idx == n - 1:
            emit(merged)
            break
        while idx + 1 < n:
            if similarity[merged][:, idx + 1].mean() >= threshold:
                merged.append(idx + 1)
                idx += 1
                if idx == n - 1:
                    emit(merged)
                    break
            else:
                emit(merged)
                merged = []
                break
        idx += 1
    feats, relevance = torch.stack(h), torch.stack(prune_importance)
    if feats.shape[0] < k:  # our deviation (2): the official DPP would run past its runs
        return None
    un = feats / feats.norm(dim=-1, keepdim=True)
    kernel = relevance[:, None] * (un @ un.T) * relevance[None, :]
    g = feats.shape[0]
    cis, di2s = torch.zeros(k, g, dtype=x.dtype), torch.diagonal(kernel).clone()
    select = []
    for i in range(k):
        j = int(torch.argmax(di2s))
        select.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s -= eis**2
        di2s[j] = -float("inf")
    order = sorted(select)
    return feats[order], [firsts[j] for j in order]


def samp_inputs(m=M, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, D, generator=g, dtype=torch.float64).cumsum(dim=1)  # neighbours similar: runs form
    x = x + 0.3 * torch.randn(m, n, D, generator=g, dtype=torch.float64) * x.norm(dim=-1, keepdim=True) / D**0.5
    attn = torch.randn(m, 2, n, n, generator=g, dtype=torch.float64).mul(2).softmax(dim=-1)
    return x, VisualContext(kind="audio", audio_attn=attn)


@pytest.mark.parametrize("threshold", [0.7, 0.85, 0.95])
@pytest.mark.parametrize("k", [2, 3, 5, 7])  # below the kernel rank (D = 8): past it the official loop divides by 0
def test_samp_matches_the_official_loop(threshold, k):
    x, ctx = samp_inputs()
    out, index = get_press("samp", keep=k, threshold=threshold).press(x, ctx)
    checked = 0
    for i in range(M):
        ref = official_samp(x[i], ctx.audio_attn[i], k, threshold)
        if ref is None:
            continue
        checked += 1
        assert index[i].tolist() == ref[1]
        torch.testing.assert_close(out[i], ref[0], rtol=1e-9, atol=1e-9)
    assert checked


def test_samp_merges_runs_at_the_threshold():
    """Runs form: at threshold 0.85 the clips merge to fewer runs than tokens, and a high threshold
    (nothing merges) leaves the DPP over the tokens themselves."""
    from mmpress.ops.audio import similar_runs
    from mmpress.ops.similarity import cosine_similarity

    x, ctx = samp_inputs()
    starts = similar_runs(cosine_similarity(x), 0.85).sum(1)
    assert (starts < N).all() and (starts > 1).all()
    out, index = get_press("samp", keep=5, threshold=1.0).press(x, ctx)
    torch.testing.assert_close(out, x.gather(1, index.unsqueeze(-1).expand(-1, -1, D)))  # w x / w


def test_samp_too_few_runs_falls_back_to_the_tokens():
    x, ctx = samp_inputs()
    x = x[:, :1].expand(M, N, D).clone()  # one run per clip: fewer than k
    out, index = get_press("samp", keep=4, threshold=0.5).press(x, ctx)
    assert out.shape == (M, 4, D) and (index.diff(dim=1) > 0).all()


def test_samp_batch_bad_input():
    x, ctx = samp_inputs()
    press = get_press("samp", keep_ratio=0.4)
    out, index = press.press(x, ctx)
    for i in range(M):
        one, idx = press.press(x[i : i + 1], VisualContext(kind="audio", audio_attn=ctx.audio_attn[i : i + 1]))
        assert torch.equal(idx[0], index[i]) and torch.equal(one[0], out[i])
    with pytest.raises(ValueError, match="threshold must be a cosine"):
        get_press("samp", keep=4, threshold=2.0)
    with pytest.raises(ValueError, match="needs the 'audio_attn' signal"):
        press.press(x, VisualContext(kind="audio"))
    with pytest.raises(ValueError, match=r"must be \(clips, 2, tokens, tokens\)"):
        press.press(x, VisualContext(kind="audio", audio_attn=ctx.audio_attn[:, 0]))
