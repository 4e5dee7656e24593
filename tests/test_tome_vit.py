"""ToMe inside the vision tower (``tome_vit``): the pure ops (ToMe's bipartite soft matching,
size-weighted merge), our block forward for CLIP / SigLIP / DINOv2 layers, and the press on tiny
random models, each checked against a reference written from the official code
(facebookresearch/ToMe ``tome/merge.py``, ``tome/patch/timm.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmpress.ops.merge import (Matching, bipartite_soft_matching, merge, merge_representatives, merge_wavg,
                               parse_r)

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
        best, partner = [], []
        for i in range(a.shape[0]):
            if class_token and i == 0:
                best.append(-math.inf)
                partner.append(0)
                continue
            sims = [float(a[i] @ b[j]) for j in range(b.shape[0])]
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


@ops_settings
@given(metrics())
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
    states, reps = [x], []
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
        if r > 0 and min(r, (t - protected) // 2) > 0:
            rows = reference_matching(metric, r, bool(protected))
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
    return states, reps


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
        want, reps = reference_tower(tower, pixels, schedule, protected)
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
            want, _ = reference_tower(tower, pixels, [8, 8, 8], 1, prop_attn=prop)
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
