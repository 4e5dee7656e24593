"""ToMe inside the vision tower (``tome_vit``): the pure ops (ToMe's bipartite soft matching,
size-weighted merge), our block forward for CLIP / SigLIP / DINOv2 layers, and the press on tiny
random models, each checked against a reference written from the official code
(facebookresearch/ToMe ``tome/merge.py``, ``tome/patch/timm.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mmpress.ops.merge import bipartite_soft_matching, merge_representatives, merge_wavg, parse_r

ops_settings = settings(max_examples=40, deadline=None)


# ---- a reference of the official matching, one row at a time -----------------------------------
def reference_matching(metric: torch.Tensor, r: int, class_token: bool):
    """The official ``bipartite_soft_matching`` read line by line, per row in Python (float64):
    returns the kept A indices (in order), the merged A indices and their B partners, and the merged
    sequence order as original indices."""
    out = []
    for row in metric.double():
        n = row.shape[0]
        rr = min(r, (n - int(class_token)) // 2)
        na = (n + 1) // 2
        if rr <= 0:
            out.append((list(range(na)), [], []))
            continue
        unit = row / row.norm(dim=-1, keepdim=True)
        a, b = unit[0::2], unit[1::2]
        # the official ``scores = a @ b.transpose(-1, -2)``: one matrix product, so an exact tie
        # (two B tokens equally similar) rounds as the official (and our batched) product rounds it
        scores = a @ b.transpose(-1, -2)
        best, partner = [], []
        for i in range(a.shape[0]):
            if class_token and i == 0:
                best.append(-math.inf)
                partner.append(0)
                continue
            sims = scores[i].tolist()
            j = max(range(len(sims)), key=lambda t: (sims[t], -t))  # first maximum, as torch.max
            best.append(sims[j])
            partner.append(j)
        edges = sorted(range(na), key=lambda i: -best[i])  # stable: ties keep the lower A index
        unm, src = edges[rr:], edges[:rr]
        if class_token:
            unm = sorted(unm)
        out.append((unm, src, [partner[i] for i in src]))
    return out


@st.composite
def metrics(draw, max_n=17):
    m = draw(st.integers(1, 3))
    n = draw(st.integers(2, max_n))
    d = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    # few distinct values so ties (equal edges) happen often
    g = torch.Generator().manual_seed(seed)
    levels = draw(st.sampled_from([None, 3]))
    x = torch.randn(m, n, d, generator=g, dtype=torch.float64)
    if levels:
        x = torch.randint(-levels, levels + 1, (m, n, d), generator=g).double() + 0.1
    return x, draw(st.integers(0, n)), draw(st.integers(0, 1))


# an exact tie: the second A token is equally similar to B tokens 0 and 2 (dot 9.34, equal norms)
TIE = (torch.tensor([[[-2.9, -2.9, -2.9, 0.1], [-1.9, 1.1, 3.1, 2.1], [-2.9, 1.1, 0.1, 1.1], [1.1, 2.1, -2.9, -2.9],
                      [1.1, -2.9, -0.9, 1.1], [-1.9, 2.1, 3.1, 1.1]]], dtype=torch.float64), 1, 0)


@ops_settings
@given(metrics())
@example(TIE)
def test_matching_equals_the_official_algorithm(case):
    """Same kept / merged / destination tokens and the same output order as the official code."""
    metric, r, protected = case
    got = bipartite_soft_matching(metric, r, protected)
    want = reference_matching(metric, r, bool(protected))
    for i, (unm, src, dst) in enumerate(want):
        assert got.unm[i].tolist() == unm
        assert got.src[i].tolist() == src
        assert got.dst[i].tolist() == dst


@ops_settings
@given(metrics(), st.data())
def test_merge_wavg_conserves_sizes_and_protects(case, data):
    """Sizes sum to the original count, exactly r' = min(r, (N - p) // 2) tokens fewer, the
    size-weighted sum is conserved, protected tokens come out untouched (first, size 1)."""
    metric, r, protected = case
    m, n, _ = metric.shape
    x = torch.randn(m, n, 3, dtype=torch.float64)
    size = torch.tensor(data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)),
                        dtype=torch.float64).expand(m, n)
    match = bipartite_soft_matching(metric, r, protected)
    rr = max(0, min(r, (n - protected) // 2))
    assert match.r == rr
    merged, new_size = merge_wavg(x, match, size)
    assert merged.shape == (m, n - rr, 3) and new_size.shape == (m, n - rr)
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    torch.testing.assert_close((merged * new_size[..., None]).sum(1), (x * size[..., None]).sum(1))
    rep = merge_representatives(torch.arange(n).expand(m, n), match)
    assert (rep.sort(1).values.diff(1) > 0).all()  # each original index represents at most one token
    if protected:
        assert (rep[:, 0] == 0).all() and (new_size[:, 0] == size[:, 0]).all()
        torch.testing.assert_close(merged[:, 0], x[:, 0])
    # every token's value is the weighted mean of the originals that chose its representative
    for i in range(m):
        group = {int(t): [int(t)] for t in rep[i]}
        a_idx = torch.arange(0, n, 2)
        b_idx = torch.arange(1, n, 2)
        for s, d in zip(match.src[i].tolist(), match.dst[i].tolist()):
            group[int(b_idx[d])].append(int(a_idx[s]))
        for j, t in enumerate(rep[i].tolist()):
            w = size[i, group[t]]
            torch.testing.assert_close(merged[i, j], (x[i, group[t]] * w[:, None]).sum(0) / w.sum())


def test_merge_identity_at_r_zero_and_default_size():
    x = torch.randn(2, 7, 4)
    match = bipartite_soft_matching(x, 0)
    assert match.r == 0
    merged, size = merge_wavg(x, match)
    assert merged.shape == x.shape and (size == 1).all()
    # the identity keeps the order: A then B, which is a permutation: representatives say which
    rep = merge_representatives(torch.arange(7).expand(2, 7), match)
    torch.testing.assert_close(merged, x[:, rep[0]])


def test_matching_merges_identical_pairs():
    base = torch.randn(1, 4, 8)
    x = base.repeat_interleave(2, dim=1)  # a a b b c c d d: each A token's twin is its B neighbour
    match = bipartite_soft_matching(x, 4)
    merged, size = merge_wavg(x, match)
    torch.testing.assert_close(merged, base)
    assert size.tolist() == [[2.0] * 4]
    assert merge_representatives(torch.arange(8)[None], match).tolist() == [[1, 3, 5, 7]]


def test_parse_r_is_the_official_schedule():
    assert parse_r(4, 8) == [8, 8, 8, 8]
    assert parse_r(5, (8, -1.0)) == [16, 12, 8, 4, 0]  # the paper's decreasing schedule
    assert parse_r(5, (8, 1.0)) == [0, 4, 8, 12, 16]
    assert parse_r(3, [1, 2]) == [1, 2, 0]
    with pytest.raises(ValueError, match="non-negative int"):
        parse_r(3, -1)
    with pytest.raises(ValueError, match="inflect"):
        parse_r(3, (8, 2.0))


def test_protected_must_be_a_count():
    with pytest.raises(ValueError, match="protected"):
        bipartite_soft_matching(torch.randn(1, 4, 2), 1, protected=True)


# ---- our block forward on CLIP / SigLIP / DINOv2 towers -------------------------------------------
def tiny_tower(kind: str, layers: int = 3, seed: int = 0):
    """A tiny float64 vision tower: 32 px, 4 px patches (64 patches, + [CLS] but for SigLIP)."""
    from transformers import (CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, SiglipVisionConfig,
                              SiglipVisionModel)

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  image_size=32, patch_size=4, num_channels=3)
    if kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**common))
    elif kind == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**common))
    else:  # DINOv2 with non-trivial layer scales (and its SwiGLU MLP variant)
        model = Dinov2Model(Dinov2Config(**common, mlp_ratio=2, layerscale_value=0.7,
                                         use_swiglu_ffn=kind == "dinov2-swiglu"))
    model.config._attn_implementation = "sdpa"
    return model.double().eval()


def _layers(tower):
    from mmpress.models.vision import encoder_layers

    return encoder_layers(tower)


def _pixels(m=2, seed=1):
    return torch.randn(m, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


TOWERS = ["clip", "siglip", "dinov2", "dinov2-swiglu"]


@pytest.mark.parametrize("kind", TOWERS)
def test_block_forward_without_merging_equals_the_stock_layer(kind):
    """r = 0 in every block (sizes all 1, so log-size adds 0): our forward built from the layer's
    submodules gives the stock layer's output (float64), for every hidden state of the tower."""
    from mmpress.models.towers import TowerState, install

    tower = tiny_tower(kind)
    pixels = _pixels()
    with torch.no_grad():
        want = tower(pixels, output_hidden_states=True).hidden_states
        handles = install(_layers(tower), TowerState([0, 0, 0], protected=int(kind != "siglip")))
        assert all("forward" in layer.__dict__ for layer in _layers(tower))
        try:
            got = tower(pixels, output_hidden_states=True).hidden_states
        finally:
            for handle in handles:
                handle.remove()
    assert all("forward" not in layer.__dict__ for layer in _layers(tower))  # restored
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def official_merge(x, rows, mode="sum"):
    """The official ``merge`` closure (``torch.cat([unm, dst])`` after ``scatter_reduce``), with
    the per-row (unm, src, dst) lists of ``reference_matching``."""
    unm = torch.tensor([r[0] for r in rows])[..., None]
    src = torch.tensor([r[1] for r in rows], dtype=torch.long).view(len(rows), -1)[..., None]
    dst = torch.tensor([r[2] for r in rows], dtype=torch.long).view(len(rows), -1)[..., None]
    a, b = x[..., ::2, :], x[..., 1::2, :]
    n, t1, c = a.shape
    kept = a.gather(dim=-2, index=unm.expand(n, unm.shape[1], c))
    moved = a.gather(dim=-2, index=src.expand(n, src.shape[1], c))
    b = b.scatter_reduce(-2, dst.expand(n, dst.shape[1], c), moved, reduce=mode)
    return torch.cat([kept, b], dim=1)


def reference_tower(tower, pixels, schedule, protected, prop_attn=True):
    """ToMe's patched timm ViT (``ToMeBlock`` / ``ToMeAttention`` / ``merge_wavg``) re-written over
    a transformers tower's weights, eager attention, float64: every hidden state and, per block,
    each token's representative (original index of its destination, tracked through the merges)."""
    body = getattr(tower, "vision_model", tower)
    x = body.embeddings(pixels)
    if hasattr(body, "pre_layrnorm"):  # CLIP's norm before the encoder
        x = body.pre_layrnorm(x)
    m, n, _ = x.shape
    size = torch.ones(m, n, 1, dtype=x.dtype)
    rep = torch.arange(n).expand(m, n)[..., None]
    states, reps, matches = [x], [], []
    for i, layer in enumerate(_layers(tower)):
        attn = getattr(layer, "self_attn", None) or layer.attention
        norm1 = getattr(layer, "layer_norm1", None) or layer.norm1
        norm2 = getattr(layer, "layer_norm2", None) or layer.norm2
        out = getattr(attn, "out_proj", None) or attn.o_proj
        h = norm1(x)
        b, t, c = h.shape
        heads = 4
        q, k, v = (p(h).reshape(b, t, heads, c // heads).permute(0, 2, 1, 3) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        logits = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
        if prop_attn:
            logits = logits + size.log()[:, None, None, :, 0]
        a = out((logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, c))
        if hasattr(layer, "layer_scale1"):
            a = layer.layer_scale1(a)
        x = x + a
        metric = k.mean(1)
        r = schedule[i]
        matches.append(None)
        if r > 0 and min(r, (t - protected) // 2) > 0:
            rows = matches[-1] = reference_matching(metric, r, bool(protected))
            x = official_merge(x * size, rows) / official_merge(size, rows)
            size = official_merge(size, rows)
            # a merged group sits where its destination B token was: the kept A tokens keep theirs
            unm = torch.tensor([u for u, _, _ in rows])[..., None]
            rep = torch.cat([rep[:, ::2].gather(1, unm), rep[:, 1::2]], dim=1)
        y = layer.mlp(norm2(x))
        if hasattr(layer, "layer_scale2"):
            y = layer.layer_scale2(y)
        x = x + y
        states.append(x)
        reps.append(rep[..., 0])
    return states, reps, matches


@pytest.mark.parametrize("kind", TOWERS)
@pytest.mark.parametrize("r", [5, (6, -1.0), [20, 0, 3]])
def test_merging_equals_the_official_tome_vit(kind, r):
    """Our tower under ToMe (SDPA, our ops) equals the reference re-written from the official code
    (eager attention, the official merge closure) in float64: every hidden state (shrinking, in the
    official token order) and every token's representative after each block. r=20 in a block of
    65 tokens: the cap at half the unprotected tokens (32)."""
    from mmpress.models.towers import TowerState, install
    from mmpress.presses.tome_vit import ToMeViTPress

    tower = tiny_tower(kind)
    pixels = _pixels(3)
    protected = int(kind != "siglip")
    schedule = ToMeViTPress(r=r).schedule(3)
    state = TowerState(schedule, protected=protected)
    with torch.no_grad():
        want, reps, _ = reference_tower(tower, pixels, schedule, protected)
        handles = install(_layers(tower), state)
        try:
            got = tower(pixels, output_hidden_states=True).hidden_states
        finally:
            for handle in handles:
                handle.remove()
    assert [t.shape[1] for t in got] == [t.shape[1] for t in want]
    assert got[-1].shape[1] < got[0].shape[1]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    for block, rep in enumerate(reps):
        assert torch.equal(state.after[block], rep)
    if protected:
        assert (state.after[2][:, 0] == 0).all()  # [CLS] untouched, first
    torch.testing.assert_close(state.size.sum(1), torch.full((3,), float(got[0].shape[1])))


def test_prop_attn_off_and_on_differ_and_each_matches_the_reference():
    from mmpress.models.towers import TowerState, install

    tower = tiny_tower("clip")
    pixels = _pixels(1)
    outs = {}
    for prop in (True, False):
        state = TowerState([8, 8, 8], protected=1, prop_attn=prop)
        with torch.no_grad():
            want, _, _ = reference_tower(tower, pixels, [8, 8, 8], 1, prop_attn=prop)
            handles = install(_layers(tower), state)
            try:
                outs[prop] = tower(pixels, output_hidden_states=True).hidden_states[-1]
            finally:
                for handle in handles:
                    handle.remove()
        torch.testing.assert_close(outs[prop], want[-1], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(outs[True], outs[False])


def test_a_batch_merges_each_image_independently():
    from mmpress.models.towers import TowerState, install

    tower = tiny_tower("dinov2")
    pixels = _pixels(3)
    results = []
    for batch in (pixels, *pixels.split(1)):
        state = TowerState([7, 7, 7], protected=1)
        with torch.no_grad():
            handles = install(_layers(tower), state)
            try:
                results.append((tower(batch, output_hidden_states=True).hidden_states[-1], state.after[2]))
            finally:
                for handle in handles:
                    handle.remove()
    (whole, index), alone = results[0], results[1:]
    for i, (row, row_index) in enumerate(alone):
        torch.testing.assert_close(whole[i : i + 1], row, rtol=1e-10, atol=1e-10)
        assert torch.equal(index[i : i + 1], row_index)


def test_install_refuses_other_layers_and_restores_on_error():
    from torch import nn

    from mmpress.models.towers import TowerState, install

    tower = tiny_tower("clip")
    layers = list(_layers(tower)) + [nn.Linear(2, 2)]
    with pytest.raises(ValueError, match="attention"):
        install(layers, TowerState([1, 1, 1, 1]))
    assert all("forward" not in layer.__dict__ for layer in _layers(tower))
    for layer in _layers(tower):
        assert "forward" not in layer.self_attn.__dict__


# ---- the press on LLaVA (tiny random models) ---------------------------------------------------
import mmpress  # noqa: E402
from mmpress.presses.base import Press, VisualContext  # noqa: E402
from conftest import make_batch, tiny_llava  # noqa: E402


@pytest.fixture(params=["clip", "dinov2"])
def llava(request):
    return tiny_llava(request.param)


RAGGED = dict(prompt_lens=(5, 9, 3), images_per_row=[1, 2, 1])
ROWS = [slice(0, 1), slice(1, 3), slice(3, 4)]  # images of each row in RAGGED


def _inputs(model, rows="ragged"):
    return make_batch(**RAGGED) if rows == "ragged" else make_batch((5,))


def _rows_alone(model, rows="ragged"):
    """Each row of the ragged batch alone, unpadded, with its own images."""
    batch = _inputs(model)
    for i, images in enumerate(ROWS):
        start = int(batch["attention_mask"][i].nonzero()[0])
        yield {"input_ids": batch["input_ids"][i : i + 1, start:],
               "attention_mask": batch["attention_mask"][i : i + 1, start:],
               "pixel_values": batch["pixel_values"][images]}


def oracle_logits(model, inputs, features, index):
    """The language model run by hand on one unpadded row: text embeddings, and each image's
    features (M, k, D_lm) at its placeholders ``index`` (M, k); the other placeholders dropped;
    original position ids (the in-vision stage's numbering)."""
    vlm = model.model
    ids = inputs["input_ids"][0]
    assert inputs["attention_mask"].all()
    embeds = vlm.get_input_embeddings()(ids)
    image = (ids == model.config.image_token_id).nonzero()[:, 0]
    n = image.numel() // features.shape[0]
    keep = ids != model.config.image_token_id
    embeds = embeds.clone()
    slots = image.view(-1, n).gather(1, index).flatten()
    embeds[slots] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
    keep[slots] = True
    pos = torch.arange(len(ids))[keep]
    hidden = vlm.language_model(inputs_embeds=embeds[keep][None], position_ids=pos[None]).last_hidden_state
    return model.lm_head(hidden)[0, -1]


def _reference_features(model, pixels, schedule):
    """Each image's projected features and placeholder index under the reference ToMe tower (sorted
    by representative, [CLS] dropped as LLaVA's strategy "default" does)."""
    tower = model.model.vision_tower
    states, reps, _ = reference_tower(tower, pixels, schedule, protected=1)
    layer = model.config.vision_feature_layer % (len(states))
    hidden, rep = states[layer][:, 1:], reps[layer - 1][:, 1:] - 1
    order = rep.argsort(1)
    hidden = hidden.gather(1, order[..., None].expand_as(hidden))
    return model.model.multi_modal_projector(hidden), rep.gather(1, order)


def test_fewer_tokens_reach_the_later_vision_blocks(llava):
    """r=8: 65 tokens enter block 0, 57 block 1, 49 block 2 (hooked and counted), and Stats says so;
    the LM gets the feature layer's (-2: block 1's output) 48 patches per image."""
    seen = []
    layers = _layers(llava.model.vision_tower)
    handles = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(a[0].shape[1] if a else k["hidden_states"].shape[1]),
                                               with_kwargs=True) for layer in layers]
    inputs = _inputs(llava)
    images = inputs["pixel_values"].shape[0]
    try:
        with torch.no_grad(), mmpress.get_press("tome_vit", r=8)(llava) as run:
            llava(**inputs)
    finally:
        for h in handles:
            h.remove()
    assert seen == [65, 57, 49]
    assert run.stats.vision_block_tokens == [images * 65, images * 57, images * 49]
    assert run.stats.kept_visual_tokens == images * 48


def test_sdpa_is_kept_and_eager_never_runs(llava, monkeypatch):
    import transformers.models.clip.modeling_clip as clip
    import transformers.models.dinov2.modeling_dinov2 as dinov2

    def eager(*args, **kwargs):
        raise AssertionError("eager attention ran")

    for module in (clip, dinov2):
        monkeypatch.setattr(module, "eager_attention_forward", eager)
    calls = {"tower": 0}
    inside = {"tower": False}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q, k, v, attn_mask=None, **kwargs):
        if inside["tower"]:
            calls["tower"] += 1
            assert attn_mask is None or attn_mask.dtype == q.dtype  # the log-size mask, additive float
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    tower = llava.model.vision_tower
    tower.register_forward_pre_hook(lambda *a: inside.update(tower=True))
    tower.register_forward_hook(lambda *a: inside.update(tower=False))
    before = (llava.config._attn_implementation, llava.config.vision_config._attn_implementation)
    with torch.no_grad(), mmpress.get_press("tome_vit", r=8)(llava):
        llava(**_inputs(llava, "single"))
        assert (llava.config._attn_implementation, llava.config.vision_config._attn_implementation) == before
    assert calls["tower"] == 3  # one SDPA call per vision block
    assert before[1] == "sdpa"


def test_r_zero_is_the_unpressed_model_bit_for_bit(llava):
    inputs = _inputs(llava)
    with torch.no_grad():
        want = llava(**inputs).logits
        want_tokens = llava.generate(**inputs, max_new_tokens=3, do_sample=False)
        with mmpress.get_press("tome_vit", r=0)(llava) as run:
            assert all("forward" not in layer.__dict__ for layer in _layers(llava.model.vision_tower))
            got = llava(**inputs).logits
            tokens = llava.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want) and torch.equal(tokens, want_tokens)
    assert run.stats.kept_visual_tokens == 64 * inputs["pixel_values"].shape[0]


def test_forwards_are_restored_on_exit_and_on_error(llava):
    layers = _layers(llava.model.vision_tower)
    with pytest.raises(RuntimeError, match="inside"):
        with mmpress.get_press("tome_vit", r=4)(llava):
            assert all("forward" in layer.__dict__ for layer in layers)
            raise RuntimeError("inside")
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert all("forward" not in vars(m) for layer in layers for m in layer.modules())


@pytest.mark.parametrize("r", [8, (12, -1.0)])
def test_pressed_logits_equal_the_reference_tower_fed_to_the_lm(llava, r):
    """Batch 1: the pressed model equals the LM run by hand on the reference (official) ToMe tower's
    feature-layer tokens, sorted by representative, at their representatives' placeholders."""
    inputs = _inputs(llava, "single")
    schedule = mmpress.get_press("tome_vit", r=r).schedule(3)
    with torch.no_grad():
        features, index = _reference_features(llava, inputs["pixel_values"], schedule)
        want = oracle_logits(llava, inputs, features, index)
        with mmpress.get_press("tome_vit", r=r)(llava) as run:
            got = llava(**inputs).logits[0, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert run.stats.kept_visual_tokens == index.shape[1]


def test_a_ragged_batch_decodes_like_each_row_alone(llava):
    press = mmpress.get_press("tome_vit", r=8)
    inputs = _inputs(llava)
    with torch.no_grad(), press(llava):
        logits = llava(**inputs).logits[:, -1]
        tokens = llava.generate(**inputs, max_new_tokens=4, do_sample=False)[:, -4:]
    for i, row in enumerate(_rows_alone(llava)):
        with torch.no_grad(), press(llava):
            row_logits = llava(**row).logits[:, -1]
            row_tokens = llava.generate(**row, max_new_tokens=4, do_sample=False)[:, -4:]
        torch.testing.assert_close(logits[i], row_logits[0], rtol=1e-4, atol=1e-4)
        assert torch.equal(tokens[i], row_tokens[0])


class Recorder(Press):
    """Test pre-LLM press: keeps every token and records the signals it was given."""

    name = "test-recorder"
    needs = ("cls_attn", "vision_keys", "vision_features")
    needs_budget = False

    def __init__(self):
        super().__post_init__()
        self.seen = []

    def press(self, tokens, ctx: VisualContext, k=None):
        self.seen.append((tokens.shape[1], ctx.cls_attn, ctx.vision_keys, ctx.vision_features))
        return super().press(tokens, ctx, k)


def test_a_composed_press_reads_the_merged_tokens_in_position_order():
    """compose(tome_vit, pre-LLM press): the [CLS] attention, keys and features it reads are the
    merged tokens', sorted as the features: the features equal the reference tower's; the [CLS]
    attention of a merged token is the sum over the tokens it stands for (mass kept)."""
    model = tiny_llava("clip")
    inputs = _inputs(model, "single")
    recorder = Recorder()
    with torch.no_grad(), mmpress.compose(mmpress.get_press("tome_vit", r=8), recorder)(model):
        model(**inputs)
    (k, cls_attn, keys, features), = recorder.seen
    assert k == 48 and cls_attn.shape == (1, 48) and keys.shape[:2] == (1, 48) and features.shape[:2] == (1, 48)
    with torch.no_grad():
        tower = model.model.vision_tower
        states, reps, matches = reference_tower(tower, inputs["pixel_values"], [8, 8, 8], protected=1)
        rep = reps[1][:, 1:] - 1
        order = rep.argsort(1)
        torch.testing.assert_close(features, states[2][:, 1:].gather(1, order[..., None].expand(-1, -1, 32)),
                                   rtol=1e-5, atol=1e-5)
        # the [CLS] attention at block 1's input, per head then head mean, summed into the merged groups
        layer = _layers(tower)[1]
        h = layer.layer_norm1(states[1])
        q = layer.self_attn.q_proj(h[:, :1]).view(1, 1, 4, 8).transpose(1, 2)
        kk = layer.self_attn.k_proj(h).view(1, -1, 4, 8).transpose(1, 2)
        probs = ((q @ kk.transpose(-1, -2)) * 8 ** -0.5).softmax(-1).mean(1)[:, 0]  # (1, 57)
        unm, src, dst = matches[1][0]
        a, b = probs[0, ::2], probs[0, 1::2].clone()
        b.index_add_(0, torch.tensor(dst), a[torch.tensor(src)])
        merged = torch.cat([a[torch.tensor(unm)], b])[None]  # official order, [CLS] first
        want = merged[:, 1:].gather(1, order)
    torch.testing.assert_close(cls_attn, want, rtol=1e-5, atol=1e-6)


def test_composition_with_visionzip_keeps_its_budget(llava):
    inputs = _inputs(llava)
    press = mmpress.compose(mmpress.get_press("tome_vit", r=8), mmpress.get_press("visionzip", keep=12))
    with torch.no_grad(), press(llava) as run:
        logits = llava(**inputs).logits
        llava.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.isfinite(logits).all()
    assert run.stats.kept_visual_tokens == 12 * inputs["pixel_values"].shape[0]
    assert run.stats.vision_block_tokens[-1] < run.stats.vision_block_tokens[0]


def test_llava_next_and_bad_r_refuse_clearly():
    from mmpress.registry import FAMILIES

    model = FAMILIES["llava_next"].build("tiny")
    with pytest.raises(ValueError, match="does not support"):
        with mmpress.get_press("tome_vit", r=4)(model):
            pass
    for bad in (-1, 1.5, (4, 3.0), [1, -2], "8"):
        with pytest.raises(ValueError):
            mmpress.get_press("tome_vit", r=bad)
    with pytest.raises(ValueError, match="no budget"):
        mmpress.get_press("tome_vit", keep=16)


# ---- downsample on LLaVA towers ---------------------------------------------------------------
@pytest.mark.parametrize("keep", [16, 20])
def test_downsample_runs_the_tower_on_the_resized_image(llava, keep):
    """The tower sees the resized pixels (interpolated position embeddings); the LM gets those
    features at the placeholders of the original patches at each new token's centre."""
    import torch.nn.functional as F

    press = mmpress.get_press("downsample", keep=keep)
    h2, w2 = press.grid_for(8, 8)
    inputs = _inputs(llava, "single")
    with torch.no_grad():
        small = F.interpolate(inputs["pixel_values"], size=(h2 * 4, w2 * 4), mode="bicubic", antialias=True,
                              align_corners=False)
        tower = llava.model.vision_tower
        extra = {"interpolate_pos_encoding": True} if "clip" in type(tower).__name__.lower() else {}
        hidden = tower(small, output_hidden_states=True, **extra).hidden_states[-2][:, 1:]
        features = llava.model.multi_modal_projector(hidden)
        rows = ((2 * torch.arange(h2) + 1) * 8) // (2 * h2)
        cols = ((2 * torch.arange(w2) + 1) * 8) // (2 * w2)
        index = (rows[:, None] * 8 + cols[None]).reshape(1, -1)
        want = oracle_logits(llava, inputs, features, index)
        with press(llava) as run:
            got = llava(**inputs).logits[0, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert run.stats.kept_visual_tokens == h2 * w2 <= keep
    assert run.stats.vision_block_tokens == [h2 * w2 + 1] * 3


def test_downsample_ragged_batch_decodes_like_each_row_alone(llava):
    press = mmpress.get_press("downsample", keep_ratio=0.25)
    inputs = _inputs(llava)
    with torch.no_grad(), press(llava):
        tokens = llava.generate(**inputs, max_new_tokens=3, do_sample=False)[:, -3:]
    for i, row in enumerate(_rows_alone(llava)):
        with torch.no_grad(), press(llava):
            assert torch.equal(tokens[i], llava.generate(**row, max_new_tokens=3, do_sample=False)[0, -3:])


# ---- the demo model (DINOv2 tower, vision_feature_layer -5) -------------------------------------
@pytest.mark.slow
def test_demo_runs_tome_vit_and_downsample():
    from mmpress.api import ask
    from mmpress.demo import PROJECTOR_PATH, load_demo
    from mmpress.eval.data import load_dataset

    if not PROJECTOR_PATH.is_file():
        pytest.skip("no trained projector")
    model, processor = load_demo()
    samples = load_dataset("easy-vqa", "test", limit=4)
    images, questions = [s["image"] for s in samples], [s["question"] for s in samples]
    for press in (mmpress.get_press("tome_vit", r=16), mmpress.get_press("downsample", keep=64),
                  mmpress.compose(mmpress.get_press("tome_vit", r=8), mmpress.get_press("visionzip", keep=32))):
        with press(model) as run:
            answers = ask(model, processor, images, questions)
        assert all(len(a.split()) >= 1 for a in answers), answers
        assert run.stats.kept_visual_tokens < 256 * len(samples)
        assert run.stats.vision_block_tokens[-1] <= run.stats.vision_block_tokens[0]


def test_a_composed_press_reading_other_vision_layers_is_refused():
    """VTC-CLS reads [CLS] attention at several vision layers, whose tokens ToMe changed."""
    model = tiny_llava("clip")
    press = mmpress.compose(mmpress.get_press("tome_vit", r=8), mmpress.get_press("vtc_cls", keep=8, layers=(1, 2)))
    with pytest.raises(ValueError, match="feature layer only"):
        with torch.no_grad(), press(model):
            model(**_inputs(model, "single"))


# ---- DyMU's threshold option ------------------------------------------------------------------
def reference_dymu(tower, pixels, thresholds, protected):
    """DyMU's batch-level matching with a specified threshold (official ``src/open_clip/tome.py``),
    one image at a time (float64, eager attention): every A token whose best edge exceeds the
    block's threshold is summed into its B partner; the A tokens stay in place (merged ones become
    padding, moved to the end and cut), then B. Returns each block's output."""
    body = getattr(tower, "vision_model", tower)
    outs = []
    for image in pixels.split(1):
        x = body.embeddings(image)
        if hasattr(body, "pre_layrnorm"):
            x = body.pre_layrnorm(x)
        size = torch.ones(1, x.shape[1], 1, dtype=x.dtype)
        states = []
        for i, layer in enumerate(_layers(tower)):
            attn = getattr(layer, "self_attn", None) or layer.attention
            norm1 = getattr(layer, "layer_norm1", None) or layer.norm1
            norm2 = getattr(layer, "layer_norm2", None) or layer.norm2
            out = getattr(attn, "out_proj", None) or attn.o_proj
            h = norm1(x)
            _, t, c = h.shape
            q, k, v = (p(h).reshape(1, t, 4, c // 4).permute(0, 2, 1, 3) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            logits = (q @ k.transpose(-2, -1)) * (c // 4) ** -0.5 + size.log()[:, None, None, :, 0]
            a = out((logits.softmax(-1) @ v).transpose(1, 2).reshape(1, t, c))
            x = x + (layer.layer_scale1(a) if hasattr(layer, "layer_scale1") else a)
            metric = k.mean(1)[0]
            if thresholds[i] == math.inf:  # a block DyMU does not merge in (r = 0): no merge call at all
                y = layer.mlp(norm2(x))
                x = x + (layer.layer_scale2(y) if hasattr(layer, "layer_scale2") else y)
                states.append(x)
                continue
            unit = metric / metric.norm(dim=-1, keepdim=True)
            scores = unit[::2] @ unit[1::2].T
            if protected:
                scores[0, :] = -math.inf
            best, partner = scores.max(dim=-1)
            merged = best > thresholds[i]
            xa, xb = (x * size)[0, ::2], (x * size)[0, 1::2].clone()
            sa, sb = size[0, ::2], size[0, 1::2].clone()
            for j in merged.nonzero()[:, 0].tolist():
                xb[partner[j]] += xa[j]
                sb[partner[j]] += sa[j]
            size = torch.cat([sa[~merged], sb])[None]
            x = torch.cat([xa[~merged], xb])[None] / size
            y = layer.mlp(norm2(x))
            x = x + (layer.layer_scale2(y) if hasattr(layer, "layer_scale2") else y)
            states.append(x)
        outs.append(states)
    return outs


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_dymu_threshold_equals_the_official_per_image_and_pads_a_batch(kind):
    """Each image of a batch of 3 keeps its own number of tokens, each equal to the reference
    re-written from DyMU's code run on that image alone (float64); the padding is masked."""
    from mmpress.models.towers import PAD, TowerState, install

    tower = tiny_tower(kind)
    pixels = _pixels(3)
    pixels[1] = pixels[1].mean()  # a flat image: its tokens merge much more
    protected = int(kind != "siglip")
    thresholds = [0.5, 0.7, math.inf]
    state = TowerState([0, 0, 0], protected=protected, threshold=thresholds)
    with torch.no_grad():
        want = reference_dymu(tower, pixels, thresholds, protected)
        handles = install(_layers(tower), state)
        try:
            got = tower(pixels, output_hidden_states=True).hidden_states
        finally:
            for handle in handles:
                handle.remove()
    lengths = [w[-1].shape[1] for w in want]
    assert len(set(lengths)) > 1  # ragged
    for block in range(3):
        for i in range(3):
            n = want[i][block].shape[1]
            assert int((state.after[block][i] != PAD).sum()) == n
            torch.testing.assert_close(got[block + 1][i, :n], want[i][block][0], rtol=1e-10, atol=1e-10)


def test_dymu_on_llava_decodes_rows_alone_and_refuses_signal_presses():
    model = tiny_llava("clip")
    press = mmpress.get_press("tome_vit", threshold=0.3)
    inputs = _inputs(model)
    with torch.no_grad(), press(model) as run:
        logits = model(**inputs).logits[:, -1]
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, -3:]
    assert run.stats.kept_visual_tokens < 64 * 4
    for i, row in enumerate(_rows_alone(model)):
        with torch.no_grad(), press(model):
            torch.testing.assert_close(logits[i], model(**row).logits[0, -1], rtol=1e-4, atol=1e-4)
            assert torch.equal(tokens[i], model.generate(**row, max_new_tokens=3, do_sample=False)[0, -3:])
    with pytest.raises(ValueError, match="different number of tokens"):
        with mmpress.compose(press, mmpress.get_press("visionzip", keep=8))(model):
            pass
    with torch.no_grad(), mmpress.compose(press, mmpress.get_press("divprune", keep=4))(model) as run:
        model(**inputs)
    assert run.stats.kept_visual_tokens == 4 * 4
    for bad in ("0.5", [0.5, float("nan")], []):
        with pytest.raises(ValueError, match="threshold"):
            mmpress.get_press("tome_vit", threshold=bad)
