"""Every registered press on random tokens and a synthetic VisualContext holding every signal:
shapes, valid indices, no-op budgets, per-image independence, determinism, dtypes.
Parametrised over ``list_presses()``: a new press is tested the moment it is registered."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmpress
from mmpress.presses import PRESSES, ScorerPress, SelectorPress, VisualContext, get_press, list_presses

M, H, W, D, T = 3, 6, 8, 16, 7
N = H * W
ALL = list_presses()
NAMES = list_presses("pre_llm")  # in-LLM and KV presses: tests/test_stages.py
BUDGETED = [name for name in NAMES if PRESSES[name].needs_budget]


def make_inputs(m=M, dtype=torch.float32, seed=0):
    """Tokens (m, N, D) and a context with every signal; the text rows are ragged (one image's
    prompt has 2 real tokens, one's has none)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(m, N, D, generator=g)
    text_mask = torch.arange(T) < torch.tensor([T, 2, 0] * m)[:m, None]
    ctx = VisualContext(
        grid=(H, W),
        cls_attn=torch.randn(m, N, generator=g).mul(2).softmax(dim=-1),
        cls_attn_layers=torch.randn(m, 3, N, generator=g).mul(2).softmax(dim=-1),
        vision_keys=torch.randn(m, N, 8, generator=g),
        text=torch.randn(m, T, D, generator=g) * text_mask.unsqueeze(-1),
        text_mask=text_mask,
        # the tower's features before the projector (own generator: the draws above stay as they were)
        vision_features=torch.randn(m, N, 12, generator=torch.Generator().manual_seed(seed + 1)),
    )
    g = torch.Generator().manual_seed(seed + 2)
    ctx.cls_attn_concat = torch.randn(m, N, generator=g).mul(2).softmax(dim=-1)
    ctx.vision_keys_concat = torch.randn(m, N, 16, generator=g)
    g = torch.Generator().manual_seed(seed + 3)  # the audio signals (audio presses), own draws
    ctx.audio_features, ctx.audio_energy = torch.randn(m, N, 6, generator=g), torch.randn(m, N, generator=g)
    ctx.audio_attn = torch.randn(m, 2, N, N, generator=g).softmax(dim=-1)
    return tokens.to(dtype), ctx


def image(ctx: VisualContext, i: int) -> VisualContext:
    """The context of image i alone (text padding trimmed to that image's prompt)."""
    fields = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)}
    out = {k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in fields.items()}
    t = int(out["text_mask"].sum())
    out["text"], out["text_mask"] = out["text"][:, :t], out["text_mask"][:, :t]
    return VisualContext(**out)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make(name, **budget):
    return get_press(name) if not PRESSES[name].needs_budget else get_press(name, **budget)


@pytest.mark.parametrize("name", ALL)
def test_press_declares_itself(name):
    cls = PRESSES[name]
    assert cls.name == name and cls.paper and cls.__doc__
    assert set(cls.needs) <= set(mmpress.presses.base.SIGNALS)
    assert dataclasses.is_dataclass(cls)
    assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(cls))  # official defaults


@pytest.mark.parametrize("name", BUDGETED)
@pytest.mark.parametrize("k", [1, 5, 16, N - 1])
def test_shapes_and_indices(name, k):
    tokens, ctx = make_inputs()
    press = make(name, keep=k)
    out, index = press.press(tokens, ctx)
    assert out.shape == (M, k, D) and out.dtype == tokens.dtype and torch.isfinite(out).all()
    assert index.shape == (M, k) and index.dtype == torch.long
    assert ((index >= 0) & (index < N)).all() and (index.diff(dim=1) > 0).all()  # unique, ascending
    if isinstance(press, (ScorerPress, SelectorPress)):  # pure selections: the kept tokens verbatim
        assert torch.equal(out, tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, D)))


@pytest.mark.parametrize("name", BUDGETED)
def test_keep_ratio_budget(name):
    tokens, ctx = make_inputs()
    out, index = make(name, keep_ratio=0.25).press(tokens, ctx)
    assert out.shape == (M, N // 4, D) and index.shape == (M, N // 4)


@pytest.mark.parametrize("name", NAMES)
def test_full_budget_returns_input_unchanged(name):
    tokens, ctx = make_inputs()
    for press in (make(name, keep=N), make(name, keep_ratio=1.0)):
        out, index = press.press(tokens, ctx)
        assert torch.equal(out, tokens) and torch.equal(index, torch.arange(N).expand(M, N))


def test_none_press_takes_no_budget():
    press = mmpress.get_press("none")
    assert type(press)() == press and not press.needs_budget
    tokens, ctx = make_inputs()
    out, index = press.press(tokens, VisualContext())
    assert out is tokens and torch.equal(index, torch.arange(N).expand(M, N))


@pytest.mark.parametrize("budget", [dict(keep=8), dict(keep_ratio=0.5), dict(keep_ratio=1.0)])
def test_none_press_refuses_a_budget(budget):
    with pytest.raises(ValueError, match="press 'none' takes no budget: drop keep"):
        get_press("none", **budget)


@pytest.mark.parametrize("budget, says", [
    (dict(keep_ratio="0.5"), r"keep_ratio must be a number in \(0, 1\], e.g. keep_ratio=0.25; got '0.5'"),
    (dict(keep_ratio=True), "keep_ratio must be a number"),
    (dict(keep_ratio=0.0), "keep_ratio must be a number"),
    (dict(keep_ratio=1.5), "keep_ratio must be a number"),
    (dict(keep="8"), "keep must be a positive int"),
    (dict(keep=0), "keep must be a positive int"),
    (dict(keep=8, keep_ratio=0.5), "either keep= or keep_ratio=, not both"),
    ({}, "needs a budget"),
])
@pytest.mark.parametrize("name", BUDGETED)
def test_bad_budget_fails_at_construction(name, budget, says):
    with pytest.raises(ValueError, match=says):
        get_press(name, **budget)


@pytest.mark.parametrize("name", [n for n in BUDGETED if n != "random"])  # random: one draw per batch
def test_batch_equals_each_image_alone(name):
    tokens, ctx = make_inputs()
    press = make(name, keep=12)
    out, index = press.press(tokens, ctx)
    for i in range(M):
        out_i, index_i = press.press(tokens[i : i + 1], image(ctx, i))
        assert torch.equal(index[i : i + 1], index_i)
        torch.testing.assert_close(out[i : i + 1], out_i)


@pytest.mark.parametrize("name", BUDGETED)
def test_deterministic(name):
    tokens, ctx = make_inputs()
    first, again = make(name, keep=10).press(tokens, ctx), make(name, keep=10).press(tokens, ctx)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("name", BUDGETED)
def test_half_precision_tokens(name):
    tokens, ctx = make_inputs(dtype=torch.bfloat16)
    out, index = make(name, keep=9).press(tokens, ctx)
    assert out.dtype == torch.bfloat16 and out.shape == (M, 9, D) and torch.isfinite(out.float()).all()
    assert (index.diff(dim=1) > 0).all()


@pytest.mark.parametrize("name", [n for n in BUDGETED if PRESSES[n].needs])
def test_missing_signal_is_a_clear_error(name):
    tokens, _ = make_inputs()
    with pytest.raises(ValueError, match="needs the"):
        make(name, keep=8).press(tokens, VisualContext())


# ---- behaviour of individual presses (the part each paper is about) ----------------------------
def test_random_seed_changes_the_draw():
    tokens, ctx = make_inputs()
    draw = {seed: get_press("random", keep=8, seed=seed).press(tokens, ctx)[1] for seed in (0, 1)}
    assert not torch.equal(draw[0], draw[1])


def test_vtc_cls_keeps_top_attention_and_ensembles_layers():
    tokens, ctx = make_inputs()
    index = get_press("vtc_cls", keep=6, start_layer=None).press(tokens, ctx)[1]
    assert torch.equal(index, ctx.cls_attn.topk(6).indices.sort().values)
    index = get_press("vtc_cls", keep=6).press(tokens, ctx)[1]  # official: the layers' sum
    assert torch.equal(index, ctx.cls_attn_layers.sum(1).topk(6).indices.sort().values)
    index = get_press("vtc_cls", keep=6, layers=(-4, -3, -2)).press(tokens, ctx)[1]
    assert torch.equal(index, ctx.cls_attn_layers.sum(1).topk(6).indices.sort().values)


def test_visionzip_dominant_and_contextual_split():
    tokens, ctx = make_inputs()
    out, index = get_press("visionzip", keep=32).press(tokens, ctx)  # 27 dominant + round(5) contextual
    dominant = ctx.cls_attn.topk(27).indices
    for i in range(M):
        assert set(dominant[i].tolist()) <= set(index[i].tolist())
        is_dom = torch.isin(index[i], dominant[i])
        torch.testing.assert_close(out[i, is_dom], tokens[i, index[i, is_dom]])  # kept verbatim
        assert (~is_dom).sum() == 5  # contextual tokens: merged, at their target's position


def test_pool_matches_avg_pool2d_on_divisible_grid():
    tokens, ctx = make_inputs()
    out, _ = get_press("pool", keep=12).press(tokens, ctx)  # 6x8 grid -> 3x4 cells of 2x2
    ref = torch.nn.functional.avg_pool2d(tokens.mT.reshape(M, D, H, W), 2).flatten(2).mT
    torch.testing.assert_close(out, ref)


def test_divprune_picks_one_token_per_cluster():
    centres = torch.randn(4, D) * 5
    tokens = (centres.repeat_interleave(12, 0) + 0.01 * torch.randn(N, D)).unsqueeze(0)
    index = get_press("divprune", keep=4).press(tokens, VisualContext())[1]
    assert sorted((index[0] // 12).tolist()) == [0, 1, 2, 3]


def test_mmtok_follows_the_text():
    """With text equal to some visual tokens, MMTok keeps those tokens; coverage of the text
    outweighs visual coverage at a small budget."""
    tokens, ctx = make_inputs(m=1)
    ctx.text, ctx.text_mask = tokens[:, [5, 40]], torch.ones(1, 2, dtype=torch.bool)
    index = get_press("mmtok", keep=2).press(tokens, ctx)[1]
    assert index[0].tolist() == [5, 40]


def test_prumerge_keeps_outliers_and_absorbs_neighbours():
    tokens, ctx = make_inputs(m=1)
    ctx.cls_attn_concat = torch.full((1, N), 0.01)  # default: one softmax over the concatenated heads
    ctx.cls_attn_concat[0, [3, 30]] = 0.5  # two outliers
    out, index = get_press("prumerge", keep=6).press(tokens, ctx)
    assert {3, 30} <= set(index[0].tolist())
    plain, _ = get_press("prumerge", keep=6, neighbours=1).press(tokens, ctx)
    assert not torch.allclose(out, tokens[:, index[0]]) and not torch.allclose(out, plain)
    # the merge reads the full-width keys: other keys, other neighbours
    other = dataclasses.replace(ctx, vision_keys_concat=torch.randn(1, N, 16))
    assert not torch.allclose(get_press("prumerge", keep=6).press(tokens, other)[0], out)


def test_prumerge_heads_mean_option_reads_the_head_averaged_signals():
    """attention="heads_mean" is the earlier behaviour: the head-averaged [CLS] attention of the
    listed layers (or of the feature layer with layers=None) and the head-averaged keys."""
    tokens, ctx = make_inputs(m=1)
    ctx.cls_attn_layers = torch.full((1, 1, N), 0.01)
    ctx.cls_attn_layers[0, 0, [3, 30]] = 0.5
    press = get_press("prumerge", keep=6, attention="heads_mean")
    assert press.needs == ("cls_attn", "vision_keys") and PRESSES["prumerge"].needs == ("cls_attn_concat",
                                                                                         "vision_keys_concat")
    out, index = press.press(tokens, ctx)
    assert {3, 30} <= set(index[0].tolist())
    ctx.cls_attn = ctx.cls_attn_layers[:, 0]
    assert torch.equal(get_press("prumerge", keep=6, layers=None, attention="heads_mean").press(tokens, ctx)[1], index)
    concat = dataclasses.replace(ctx, cls_attn_concat=ctx.cls_attn, vision_keys_concat=ctx.vision_keys)
    torch.testing.assert_close(get_press("prumerge", keep=6).press(tokens, concat)[0], out)


def test_prumerge_options_are_validated():
    with pytest.raises(ValueError, match="attention"):
        get_press("prumerge", keep=6, attention="mean")
    with pytest.raises(ValueError, match="one vision layer"):
        get_press("prumerge", keep=6, layers=(-1, -2))
    assert get_press("prumerge", keep=6, layers=(-1, -2), attention="heads_mean").vision_layers == (-1, -2)


def test_visionzip_always_keeps_cls_when_the_lm_sees_it():
    """ctx.cls_first (LLaVA "full"): token 0 is [CLS], kept whatever its own attention, as the
    official ``all_indices`` starts with it; the dominant patches fill the other slots."""
    tokens, ctx = make_inputs(m=1)
    ctx.cls_attn[0, 0] = 0.0  # [CLS]'s own attention is not what keeps it
    ctx.cls_first = True
    index = get_press("visionzip", keep=12, contextual_ratio=0).press(tokens, ctx)[1][0].tolist()
    patches = ctx.cls_attn[0, 1:].topk(11).indices + 1
    assert index == sorted([0, *patches.tolist()])


def test_tome_merges_duplicates_into_one():
    base = torch.randn(1, N // 2, D)
    tokens = base.repeat_interleave(2, dim=1)
    out, index = get_press("tome", keep=N // 2).press(tokens, VisualContext())
    torch.testing.assert_close(out, base)
    assert torch.equal(index[0], torch.arange(1, N, 2))


def test_dart_keeps_norm_pivots_and_spreads_budget():
    tokens, ctx = make_inputs()
    press = get_press("dart", keep=20)
    index = press.press(tokens, ctx)[1]
    pivots = tokens.norm(p=1, dim=-1).topk(press.image_pivots).indices
    assert all(set(p.tolist()) <= set(i.tolist()) for p, i in zip(pivots, index))
    # without text pivots every image pivot's least-duplicated token is kept
    index = get_press("dart", keep=20, text_pivots=0).press(tokens, ctx)[1]
    unit = torch.nn.functional.normalize(tokens, dim=-1)
    least = (unit @ unit[torch.arange(M)[:, None], pivots].transpose(1, 2)).argmin(dim=1)  # (M, P)
    assert all(set(lst.tolist()) <= set(i.tolist()) for lst, i in zip(least, index))


@pytest.mark.parametrize("name", BUDGETED)
@settings(max_examples=10, deadline=None, derandomize=True)
@given(m=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6), data=st.data())
def test_any_batch_grid_and_budget(name, m, h, w, data):
    """Any M, any (h, w) grid, any k <= N: exactly k unique in-range indices per image."""
    n = h * w
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(k)
    mask = torch.arange(3) < torch.randint(0, 4, (m, 1), generator=g)
    ctx = VisualContext(grid=(h, w), cls_attn=torch.rand(m, n, generator=g).softmax(-1),
                        cls_attn_layers=torch.rand(m, 2, n, generator=g).softmax(-1),
                        vision_keys=torch.randn(m, n, 4, generator=g), text=torch.randn(m, 3, D, generator=g),
                        text_mask=mask, vision_features=torch.randn(m, n, 5, generator=torch.Generator().manual_seed(k)))
    own = torch.Generator().manual_seed(k + 1)
    ctx.cls_attn_concat, ctx.vision_keys_concat = torch.rand(m, n, generator=own).softmax(-1), torch.randn(m, n, 6, generator=own)
    ctx.audio_features, ctx.audio_energy = torch.randn(m, n, 3, generator=own), torch.randn(m, n, generator=own)
    ctx.audio_attn = torch.rand(m, 2, n, n, generator=own).softmax(dim=-1)
    out, index = make(name, keep=k).press(torch.randn(m, n, D, generator=g), ctx)
    assert out.shape == (m, k, D) and torch.isfinite(out).all()
    assert ((index >= 0) & (index < n)).all() and (index.diff(dim=1) > 0).all()
