"""In-LLM and KV presses (fastv, pdrop, vtw, dart_llm, sparsevlm, snapkv, lookm, compositions) on
tiny random LLaVA and Qwen2-VL models with 4-layer language models: scores against eager attention,
keep-all identity, pressed forward / decoding / a later turn against oracles that run the unpressed
model with the dropped tokens masked out, and a ragged batch against each row alone."""

from __future__ import annotations

import pytest
import torch
from conftest import PAD, make_batch, tiny_llava
from test_qwen_vl import RAGGED, SINGLE, VIDEO_ROWS, tiny_qwen
from test_qwen_vl import make_batch as qwen_batch

import mmpress
from mmpress.models import get_adapter
from mmpress.models.lm import decoder_layers
from mmpress.models.stages import Layout
from mmpress.ops.attention import received_attention

LAYERS = 4
NEW = torch.tensor([[11, 12, 13]])
VISUAL_IDS = [7, 8]  # a generated placeholder id would make the oracle's re-run see one more image token


def deep(kind: str, attn: str = "sdpa"):
    """The tiny model of ``kind`` with a 4-layer language model (room for layers 1..3)."""
    model = tiny_llava() if kind == "llava" else tiny_qwen(kind)
    config = model.config
    config.text_config.num_hidden_layers = LAYERS
    if hasattr(config.text_config, "layer_types"):
        config.text_config.layer_types = ["full_attention"] * LAYERS
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    torch.manual_seed(0)
    out = type(model)(config).eval()
    out.generation_config.pad_token_id = PAD
    return out


def batches(kind: str, model) -> dict:
    if kind == "llava":
        return {"single": make_batch((5,)), "ragged": make_batch((5, 3, 8), images_per_row=[1, 2, 1])}
    return {"single": qwen_batch(model, SINGLE), "ragged": qwen_batch(model, RAGGED), "video": qwen_batch(model, VIDEO_ROWS)}


def presses(kind: str) -> dict:
    k = 16 if kind == "llava" else 6
    return {
        "fastv": dict(keep=k, layer=2),
        # Qwen-VL's M-RoPE has no official PyramidDrop numbering: original ids (test_official_llm.py)
        "pdrop": dict(stages=(1, 2, 3), ratio=0.5, **({} if kind == "llava" else {"positions": "keep"})),
        "vtw": dict(layer=2),
        "dart_llm": dict(keep=k, layer=2),
        "sparsevlm": dict(signal_layers=(0, 1, 2), counts=(300, 150, 60), **({} if kind == "llava" else {"positions": "keep"})),
        "snapkv": dict(keep=k, window=4),
        "lookm": dict(keep=k),
    }


NAMES = list(presses("llava"))
# pure eviction (the merging presses with merging off) at the original position ids: an attention
# mask is their oracle (PyramidDrop's official renumbering: test_official_llm.py)
DROPPING = {"fastv": {}, "pdrop": {"positions": "keep"}, "vtw": {}, "dart_llm": {}, "sparsevlm": dict(recycle=False, positions="keep"), "snapkv": {},
            "lookm": dict(merge=None), "divprune@2": {}, "mmtok@2": {}}


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "qwen2_5_vl"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def model(kind):
    return deep(kind)


def make(kind, name, **override):
    if "@" in name:  # a pre-LLM selector run in the LM: "divprune@2"
        inner, layer = name.split("@")
        hidden_only = {"similarity": "projected"} if inner == "mmtok" else {}  # no tower features in the LM
        return mmpress.at_layer(mmpress.get_press(inner, keep=presses(kind)["fastv"]["keep"], **hidden_only),
                                layer=int(layer))
    kw = {**presses(kind)[name], **override}
    return mmpress.get_press(name, **kw)


# ---- oracles ------------------------------------------------------------------------------------
def prefill_record(model, batch, press):
    """Runs the pressed prefill; returns (output, what the adapter recorded for its cache)."""
    adapter = get_adapter(model)
    with torch.no_grad(), adapter.apply(press):
        out = model(**as_generate(model, batch), use_cache=True)
        pre = adapter.pressed.get(out.past_key_values)
    return out, pre


def full_inputs(model, batch, appended: torch.Tensor | None):
    """The batch with ``appended`` (B, q) text tokens after the prompt (a later turn / decoding)."""
    if appended is None or appended.shape[1] == 0:
        return batch
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], appended], dim=1)
    out["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(appended)], dim=1)
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(appended)], dim=1)
    return out


def as_generate(model, batch):
    """LLaVA numbers a left-padded row from its first real token when generating (forward: from
    column 0); a press reading a position-dependent signal (DART's key norms) sees the difference,
    so the oracles number positions as generate does."""
    if model.config.model_type != "llava":
        return batch
    mask = batch["attention_mask"]
    return {**batch, "position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)}


def oracle_logits(model, batch, allowed, appended=None, kv=False):
    """Unpressed forward over prompt + ``appended`` where layer i's queries see only the keys
    ``allowed(i)`` (B, H or 1, L_prompt) of the prompt (+ every appended token, causally);
    ``kv``: only the appended queries are restricted (the prefill ran unpressed)."""
    inputs = as_generate(model, full_inputs(model, batch, appended))
    valid = inputs["attention_mask"].bool()
    b, total = valid.shape
    length = batch["input_ids"].shape[1]
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    handles = []

    def hook(i):
        def pre(module, args, kwargs):
            keys = valid.clone()[:, None, :].repeat(1, 1, 1)
            extra = allowed(i)
            if extra is not None:
                heads = extra.shape[1]
                keys = keys.expand(b, heads, total).clone()
                keys[:, :, :length] &= extra
            mask = causal[None, None] & keys[:, :, None, :]
            if kv:
                mask[:, :, :length] = (causal[None, None] & valid[:, None, None, :])[:, :, :length]
            mask = mask | torch.eye(total, dtype=torch.bool)[None, None] & ~mask.any(-1, keepdim=True)
            return args, {**kwargs, "attention_mask": mask}
        return pre

    for i, layer in enumerate(decoder_layers(model.model.language_model)):
        handles.append(layer.register_forward_pre_hook(hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        for h in handles:
            h.remove()


def layer_allowed(pre, length):
    """in_llm: from each cut's layer on, the prompt keys are the cut's columns."""
    def allowed(i):
        cut = next((c for c in reversed(pre.cuts) if c.start <= i), None)
        if cut is None:
            return None
        keep = torch.zeros(cut.cols.shape[0], length, dtype=torch.bool)
        keep.scatter_(1, cut.cols, cut.valid)
        return keep[:, None]
    return allowed


def kv_allowed(model, batch, cache):
    """kv: per layer and KV head, the prompt entries the pressed cache kept, found by matching its
    keys with the unpressed prefill's (the prefill is unpressed, so they are bitwise equal)."""
    with torch.no_grad():
        full = model(**as_generate(model, batch), use_cache=True).past_key_values
    heads = model.config.text_config.num_attention_heads
    masks = []
    for layer, ref in zip(cache.layers, full.layers):
        eq = (layer.keys[:, :, :, None, :] == ref.keys[:, :, None, :, :]).all(-1)  # (B, Hkv, W, L)
        keep = eq.any(2)
        masks.append(keep.repeat_interleave(heads // keep.shape[1], dim=1))
    return lambda i: masks[i]


def last_cols(pre, batch):
    cut = pre.cuts[-1]
    return cut.cols, cut.valid


# ---- scores against eager attention -------------------------------------------------------------
@pytest.mark.parametrize("query", ["last", "window", "text", "all"])
def test_scores_equal_eager_attention(kind, query):
    model = deep(kind, attn="eager")
    batch = batches(kind, model)["ragged"]
    layer = 2
    seen = {}
    lm_layer = decoder_layers(model.model.language_model)[layer]
    handle = lm_layer.register_forward_pre_hook(
        lambda m, a, kw: seen.update(hidden=a[0] if a else kw["hidden_states"], pe=kw["position_embeddings"]),
        with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
    finally:
        handle.remove()
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    visual = (ids == model.config.image_token_id) | (ids == getattr(model.config, "video_token_id", -1))
    layout = Layout(ids.masked_fill(~visual, -1), valid, [], [], [], valid.sum(1).tolist())
    if query == "text":  # query_rows sizes the text width from the items: give it the rows' counts
        layout.rows, layout.lengths = list(range(ids.shape[0])), visual.sum(1).tolist()
    got, _ = layout.attention(lm_layer, seen["hidden"], seen["pe"], query, 4)
    rows, ok = layout.query_rows(query, 4)
    eager = out.attentions[layer].float()  # (B, H, L, L)
    picked = eager.gather(2, rows[:, None, :, None].expand(-1, eager.shape[1], -1, eager.shape[3]))
    weight = ok.float() / ok.sum(1, keepdim=True)
    expected = (picked.mean(1) * weight[..., None]).sum(1)  # (B, L)
    torch.testing.assert_close(got.mean(1), expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the layer's own q_proj output, kept by a hook, gives the same scores
        projected = lm_layer.self_attn.q_proj(lm_layer.input_layernorm(seen["hidden"]))
        again, _ = layout.attention(lm_layer, seen["hidden"], seen["pe"], query, 4, projected=projected)
    torch.testing.assert_close(again, got)


def test_received_attention_chunks_equal_one_pass():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    rows = torch.randint(0, 12, (2, 9), generator=g)
    ok, kv = torch.rand(2, 9, generator=g) > 0.2, torch.rand(2, 12, generator=g) > 0.1
    torch.testing.assert_close(received_attention(q, k, rows, ok, kv, 0.3, chunk=2),
                               received_attention(q, k, rows, ok, kv, 0.3, chunk=64))


# ---- every press x batch x call -----------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_keep_all_reproduces_unpressed(kind, model, name):
    batch = batches(kind, model)["ragged"]
    keep_all = {"pdrop": dict(ratio=1.0), "vtw": None, "sparsevlm": dict(counts=(100000,) * 3)}.get(name, dict(keep=1000))
    if keep_all is None:
        pytest.skip("vtw keeps no visual token by definition")
    with torch.no_grad():
        ref = model(**batch).logits
        with pytest.warns(UserWarning) if "keep" in keep_all else _nothing(), make(kind, name, **keep_all)(model):
            got = model(**batch).logits
    assert torch.equal(got, ref)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("rows", ["single", "ragged", "video"])
@pytest.mark.parametrize("name", DROPPING)
def test_pressed_forward_generate_and_later_turn_match_oracle(kind, model, name, rows):
    """Prefill, greedy decoding and new text on the pressed cache all equal the unpressed model
    whose layers see only the kept prompt keys (from the press's layer on / per KV head); for
    Qwen-VL also on a video (M-RoPE ids over (t, h, w))."""
    if rows == "video" and kind == "llava":
        pytest.skip("LLaVA takes images only")
    batch = batches(kind, model)[rows]
    press = make(kind, name, **DROPPING[name])
    out, pre = prefill_record(model, batch, press)
    length = batch["input_ids"].shape[1]
    if press.stage == "in_llm":
        allowed = layer_allowed(pre, length)
        cols, valid = last_cols(pre, batch)
        oracle = oracle_logits(model, batch, allowed).gather(1, cols[..., None].expand(-1, -1, out.logits.shape[-1]))
        torch.testing.assert_close(out.logits[valid], oracle[valid], atol=1e-4, rtol=1e-4)
    else:
        allowed = kv_allowed(model, batch, out.past_key_values)
        with torch.no_grad():
            torch.testing.assert_close(out.logits, model(**as_generate(model, batch)).logits)  # prefill unpressed

    # greedy decoding == the oracle re-run on prompt + generated tokens at every step
    steps = 3
    with torch.no_grad(), press(model):
        gen = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, suppress_tokens=VISUAL_IDS)
    tokens, logits = gen.sequences[:, -steps:], torch.stack(gen.logits, dim=1)
    for t in range(steps):
        expected = oracle_logits(model, batch, allowed, tokens[:, :t], kv=press.stage == "kv")[:, -1]
        torch.testing.assert_close(logits[:, t], expected, atol=1e-4, rtol=1e-4)

    # a later turn: new text fed onto the pressed cache (Qwen-VL: without a mask, numbered from the
    # cache; transformers' Qwen fails with a full-length mask and several new tokens, pressed or not)
    if kind != "llava" and rows == "ragged":
        return
    new = NEW.expand(batch["input_ids"].shape[0], -1)
    with torch.no_grad(), press(model):
        out = model(**as_generate(model, batch), use_cache=True)
        kw = {}
        if kind == "llava":  # continue each row's numbering, as the oracle does
            kw["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(new)], dim=1)
            kw["position_ids"] = batch["attention_mask"].sum(1, keepdim=True) + torch.arange(new.shape[1])
        got = model(input_ids=new, past_key_values=out.past_key_values, **kw).logits
    expected = oracle_logits(model, batch, allowed, new, kv=press.stage == "kv")[:, -3:]  # same prompt: same keys
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", ["single", "ragged"])
@pytest.mark.parametrize("name", ["sparsevlm", "lookm"])
def test_merging_presses_forward_generate_and_later_turn(kind, model, name, rows):
    """The merging variants (SparseVLM's recycled tokens, LOOK-M's pivot merge) change values, so
    no mask is their oracle: they run every call, change the logits, and keep them finite."""
    batch = batches(kind, model)[rows]
    press = make(kind, name)
    with torch.no_grad():
        reference = model(**batch, use_cache=True)
        with press(model) as run:
            out = model(**batch, use_cache=True)
            tokens = model.generate(**batch, max_new_tokens=3, do_sample=False)
            single = batches(kind, model)["single"]
            first = model(**single, use_cache=True) if kind != "llava" else out
            kw = {} if kind != "llava" else {"attention_mask": torch.cat(
                [batch["attention_mask"], torch.ones(batch["input_ids"].shape[0], 3, dtype=torch.long)], dim=1)}
            new = NEW if kind != "llava" else NEW.expand(batch["input_ids"].shape[0], -1)
            later = model(input_ids=new, past_key_values=first.past_key_values, **kw).logits
    assert tokens.shape[1] == batch["input_ids"].shape[1] + 3 and later.isfinite().all()
    if name == "sparsevlm":  # pressed in the prefill (a text-only row keeps the batch's width)
        assert run.stats.kept_visual_tokens < run.stats.visual_tokens
        assert out.logits.shape[1] <= reference.logits.shape[1]
    else:  # KV: the prefill is unpressed, the cache is not
        torch.testing.assert_close(out.logits, reference.logits)
        assert out.past_key_values.get_seq_length() <= reference.past_key_values.get_seq_length()
        assert run.stats.kept_visual_tokens < run.stats.visual_tokens


def test_a_second_generate_on_the_longer_conversation_re_prefills(kind, model):
    """Turn 2 as a fresh generate on the whole conversation (no cache) under the same press gives
    what a fresh `with` block gives: nothing of turn 1 leaks into it."""
    batch = batches(kind, model)["single"]
    for name in ("fastv", "snapkv"):
        press = make(kind, name)
        with torch.no_grad(), press(model):
            first = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                                   suppress_tokens=VISUAL_IDS)
            longer = full_inputs(model, batch, torch.cat([first[:, -2:], NEW], dim=1))
            again = model.generate(**longer, max_new_tokens=3, do_sample=False, suppress_tokens=VISUAL_IDS)
        with torch.no_grad(), press(model):
            fresh = model.generate(**longer, max_new_tokens=3, do_sample=False, suppress_tokens=VISUAL_IDS)
        assert torch.equal(again, fresh)


@pytest.mark.parametrize("name", NAMES)
def test_ragged_batch_equals_each_row_alone(kind, model, name):
    batch = batches(kind, model)["ragged"]
    press = make(kind, name)
    with torch.no_grad(), press(model):
        together = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
    for i in range(batch["input_ids"].shape[0]):
        alone = _row(kind, model, batch, i)
        with torch.no_grad(), press(model):
            one = model.generate(**alone, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        torch.testing.assert_close(torch.stack(together.logits, 1)[i], torch.stack(one.logits, 1)[0],
                                   atol=1e-4, rtol=1e-4)
        assert torch.equal(together.sequences[i, -3:], one.sequences[0, -3:])


def _row(kind, model, batch, i):
    """Row i of a left-padded batch, unpadded, with its own images."""
    keep = batch["attention_mask"][i].bool()
    ids = batch["input_ids"][i][keep][None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "llava":
        per_row = (batch["input_ids"] == model.config.image_token_id).sum(1) // 64
        start = int(per_row[:i].sum())
        out["pixel_values"] = batch["pixel_values"][start:start + int(per_row[i])]
        return out
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = batch["mm_token_type_ids"][i][keep][None]
    grid = batch["image_grid_thw"]
    counts = grid.prod(-1)
    tokens = counts // 4
    per_row = [(batch["input_ids"][r] == model.config.image_token_id).sum().item() for r in range(len(batch["input_ids"]))]
    # the images of row i: consume items in order until each row's token count is met
    owners, r, left = [], 0, per_row[0]
    for n in tokens.tolist():
        while left == 0:
            r += 1
            left = per_row[r]
        owners.append(r)
        left -= n
    mine = [j for j, o in enumerate(owners) if o == i]
    if mine:
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        out["pixel_values"] = torch.cat([batch["pixel_values"][offsets[j]:offsets[j + 1]] for j in mine])
        out["image_grid_thw"] = grid[mine]
    return out


def test_lookm_pivot_merge_is_the_official_mean():
    """Each kept entry becomes mean(itself, (evicted + it) / 2 for every evicted entry whose most
    similar kept key it is), keys and values alike."""
    press = mmpress.get_press("lookm", keep=2)
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]]])
    values = torch.arange(8.0).view(1, 4, 2)
    ctx = mmpress.VisualContext(llm_attn=torch.tensor([[4.0, 3.0, 1.0, 2.0]]))
    k, v, index = press.press_kv(keys, values, ctx, 2)
    assert index.tolist() == [[0, 1]]
    torch.testing.assert_close(k[0, 0], (keys[0, 0] + (keys[0, 2] + keys[0, 0]) / 2) / 2)
    torch.testing.assert_close(v[0, 1], (values[0, 1] + (values[0, 3] + values[0, 1]) / 2) / 2)


def test_lookm_row_keeps_the_recent_window_and_merges_into_text():
    """Official ``TextPivotMerge_LayerWise``: an image entry in the prompt's last
    floor(0.1 L) is kept whatever its score; an evicted entry's pivot may be a text entry, and a
    cosine tie goes to the entry earliest in the sequence (``max``'s first index)."""
    press = mmpress.get_press("lookm", keep=2)
    # image entries at sequence 1..4 of a 20-entry prompt (window: 18, 19); text at 0, 5 and 19
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 3.0]]])
    values = torch.arange(8.0).view(1, 4, 2)
    ctx = mmpress.VisualContext(llm_attn=torch.tensor([[4.0, 3.0, 2.0, 1.0]]),
                                token_index=torch.tensor([[1, 2, 3, 18]]), text_index=torch.tensor([[0, 5, 19]]))
    text_k = torch.tensor([[[0.0, 2.0], [5.0, 5.0], [3.0, 0.0]]])
    text_v = torch.tensor([[[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]]])
    ok = torch.tensor([[True, True, False]])  # the last text slot is padding: never a pivot
    k, v, index, tk, tv = press.press_kv_row(keys, values, ctx, 2, text_k, text_v, ok, torch.tensor([20]))
    assert index.tolist() == [[0, 3]]  # entry 3 (sequence 18) is in the window, entry 1 outscores 2
    # evicted 1 and 2 (keys (0, 1)) are as close to text 0 (sequence 0, key (0, 2)) as to the kept
    # entry 3 (sequence 18, key (0, 3)): the earlier, text 0, absorbs both
    expected = (text_v[0, 0] + 2 * (values[0, 1] + values[0, 2] + 2 * text_v[0, 0]) / 4) / 3
    torch.testing.assert_close(tv[0, 0], expected)
    torch.testing.assert_close(tv[0, 1:], text_v[0, 1:])
    torch.testing.assert_close(v, values[:, [0, 3]])
    visual_only = mmpress.get_press("lookm", keep=2, pivots="visual", recent_ratio=0.0)
    assert visual_only.press_kv_row(keys, values, ctx, 2, text_k, text_v, ok, torch.tensor([20]))[2].tolist() == [[0, 1]]


def test_composition_runs_and_reports_both_stages(kind, model):
    batch = batches(kind, model)["ragged"]
    k = presses(kind)["fastv"]["keep"]
    for later in ("fastv", "snapkv"):
        press = mmpress.compose(mmpress.get_press("divprune", keep=2 * k), make(kind, later))
        with torch.no_grad(), press(model) as run:
            out = model(**batch, use_cache=True)
            gen = model.generate(**batch, max_new_tokens=2, do_sample=False)
            new = NEW.expand(batch["input_ids"].shape[0], -1)
            kw = {"attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(new)], dim=1)}
            if kind != "llava":  # (see the oracle test: Qwen continues without a mask)
                out, new, kw = model(**batches(kind, model)["single"], use_cache=True), NEW, {}
            later_turn = model(input_ids=new, past_key_values=out.past_key_values, **kw).logits
        assert run.stats.pressed_seq_len < run.stats.seq_len
        assert run.stats.kept_visual_tokens < run.stats.visual_tokens
        assert gen.shape[1] == batch["input_ids"].shape[1] + 2 and later_turn.isfinite().all()


def test_at_layer_refuses_what_the_layer_cannot_give():
    with pytest.raises(ValueError, match="cls_attn"):
        mmpress.at_layer(mmpress.get_press("visionzip", keep=4), layer=2)
    with pytest.raises(ValueError, match="pre-LLM press"):
        mmpress.at_layer(mmpress.get_press("fastv", keep=4), layer=2)
    with pytest.raises(ValueError, match="grid"):
        mmpress.at_layer(mmpress.get_press("uniform", keep=4), layer=2)


def test_stage_errors(model):
    with pytest.raises(ValueError, match="decoder layers"):
        with mmpress.get_press("fastv", keep=4, layer=LAYERS)(model):
            pass
    with pytest.raises(ValueError, match="layers must be ascending"):
        mmpress.get_press("fastv", keep=4, layer=0)
    with pytest.raises(ValueError, match="do not compose"):
        with mmpress.compose(mmpress.get_press("fastv", keep=4), mmpress.get_press("snapkv", keep=4))(model):
            pass
    with pytest.raises(ValueError, match="order"):
        with mmpress.compose(mmpress.get_press("fastv", keep=4), mmpress.get_press("divprune", keep=4))(model):
            pass
    with pytest.raises(ValueError, match="official settings"):
        mmpress.get_press("sparsevlm", keep=50)


@pytest.mark.parametrize("name", NAMES)
def test_pressed_generate_adds_no_host_syncs(name):
    """In-LLM and KV presses add no host synchronisation to a pressed generate (prefill and
    decoding) beyond the core's one read of per-row placeholder counts (counted the same way as
    the pre-LLM presses in test_llava.py)."""
    from test_llava import count_syncs

    model, batch = deep("llava"), batches("llava", None)["ragged"]
    with torch.no_grad():
        with mmpress.get_press("none")(model):
            baseline = count_syncs(lambda: model.generate(**batch, max_new_tokens=2, do_sample=False))
        with make("llava", name)(model):
            pressed = count_syncs(lambda: model.generate(**batch, max_new_tokens=2, do_sample=False))
    assert pressed == baseline, name


@pytest.mark.parametrize("name", ["divprune", "fastv", "pdrop", "snapkv"])
def test_generate_continues_a_pressed_cache(kind, model, name):
    """A later turn with ``generate(whole conversation, past_key_values=pressed cache)`` (the
    transformers chat idiom) equals feeding the new tokens onto the pressed cache step by step."""
    batch = batches(kind, model)["ragged"]
    press = mmpress.get_press("divprune", keep=presses(kind)["fastv"]["keep"]) if name == "divprune" else make(kind, name)
    if kind != "llava":  # Qwen-VL generate recomputes M-RoPE ids from the cache length: refused, clearly
        batch = batches(kind, model)["single"]
        with torch.no_grad(), press(model):
            out = model.generate(**batch, max_new_tokens=2, return_dict_in_generate=True, suppress_tokens=VISUAL_IDS)
            ids = torch.cat([out.sequences, NEW], dim=1)
            with pytest.raises(ValueError, match="cannot continue a pressed KV cache"):
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=out.past_key_values,
                               max_new_tokens=2)
        return
    rows = batch["input_ids"].shape[0]
    new = NEW.expand(rows, -1)

    def first_turn():
        out = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                             return_dict_in_generate=True, suppress_tokens=VISUAL_IDS)
        ids = torch.cat([out.sequences, new], dim=1)
        mask = torch.cat([batch["attention_mask"], torch.ones(rows, ids.shape[1] - batch["input_ids"].shape[1],
                                                              dtype=torch.long)], dim=1)
        return out.past_key_values, ids, mask

    with torch.no_grad(), press(model):
        cache, ids, mask = first_turn()
        got = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3,
                             min_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             suppress_tokens=VISUAL_IDS)
        cache, ids, mask = first_turn()  # the same first turn, fed by hand: last answer token + the new text
        fed = ids[:, -(new.shape[1] + 1):]
        logits = []
        for t in range(3):  # teacher-forced with generate's tokens
            step = model(input_ids=fed, attention_mask=mask, past_key_values=cache,
                         position_ids=mask.sum(1, keepdim=True) - fed.shape[1] + torch.arange(fed.shape[1]))
            logits.append(step.logits[:, -1])
            fed = got.sequences[:, ids.shape[1] + t:ids.shape[1] + t + 1]
            mask = torch.cat([mask, torch.ones_like(fed)], dim=1)
    torch.testing.assert_close(torch.stack(got.logits, 1), torch.stack(logits, 1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["fastv", "pdrop", "snapkv", "lookm"])
def test_beam_search_and_sampling_run_under_later_stages(name):
    """Beams reorder the cache rows (each beam of a prompt holds the same kept tokens); sampling
    draws from the pressed model's distribution."""
    model, batch = deep("llava"), batches("llava", None)["ragged"]
    with torch.no_grad(), make("llava", name)(model):
        beams = model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)
        sampled = model.generate(**batch, max_new_tokens=3, do_sample=True, top_k=5)
    assert beams.shape == sampled.shape == (3, batch["input_ids"].shape[1] + 3)


# ---- the masks a cut layer gets, for every attention implementation's mask format ---------------
def test_cut_masks_agree_across_formats():
    """SDPA's bool mask, eager's additive mask and FlashAttention's 2-D mask, cut to the same
    columns, allow the same keys; a padded query row stays finite (sees every key)."""
    from mmpress.models.lm import cut_mask, decode_cut

    g = torch.Generator().manual_seed(0)
    b, length, width = 3, 9, 6
    valid_in = torch.ones(b, length, dtype=torch.bool)
    valid_in[0, :2] = False  # left padding
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    bool_mask = (causal[None, None] & valid_in[:, None, None, :])
    float_mask = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    cols = torch.sort(torch.rand(b, length, generator=g).argsort(1)[:, :width], dim=1).values
    valid = valid_in.gather(1, cols) & (torch.rand(b, width, generator=g) > 0.2)
    as_bool = cut_mask(bool_mask, cols, valid, cols, flash=False)
    as_float = cut_mask(float_mask, cols, valid, cols, flash=False)
    assert torch.equal(as_bool, as_float == 0)
    expected = (cols[:, :, None] >= cols[:, None, :]) & valid[:, None, :] & valid_in.gather(1, cols)[:, None, :]
    real = valid[:, :, None].expand_as(expected)
    assert torch.equal(as_bool[:, 0][real], expected[real])
    assert as_bool[:, 0][~real].all()  # padded query rows: every key, no NaN
    assert torch.equal(cut_mask(valid_in.long(), cols, valid, cols, flash=True), valid.long())
    built = cut_mask(None, cols, valid, cols, flash=False)  # no mask given (SDPA, no padding): built
    assert torch.equal(built[:, 0][real], ((torch.arange(width)[:, None] >= torch.arange(width)) & valid[:, None, :])[real])
    assert cut_mask(None, cols, valid, cols, flash=False, square_causal_ok=True) is None
    # decoding: q new tokens after 2 appended ones; the mask covers the prompt + appended + new
    q, grown = 1, 2
    kv = length + grown + q
    step = torch.ones(b, 1, q, kv, dtype=torch.bool)
    step[0, ..., :2] = False
    out = decode_cut(step, cols, valid, length, kv, q, flash=False)
    assert torch.equal(out[:, 0, 0], torch.cat([valid & valid_in.gather(1, cols), torch.ones(b, grown + q, dtype=torch.bool)], 1))
    assert torch.equal(decode_cut(None, cols, valid, length, kv, q, flash=False)[:, 0, 0],
                       torch.cat([valid, torch.ones(b, grown + q, dtype=torch.bool)], 1))
    assert torch.equal(decode_cut(None, cols, valid, length, kv, q, flash=True),
                       torch.cat([valid, torch.ones(b, grown + q, dtype=torch.bool)], 1).long())


@pytest.mark.parametrize("name", ["fastv", "pdrop", "pdrop-keep", "dart_llm", "sparsevlm", "sparsevlm-keep"])
def test_pressed_forward_equals_kept_tokens_run_through_the_remaining_layers(name):
    """The literal oracle: run the language model's layers by hand on the unpressed input, and at
    each pressed layer keep only the columns the press kept (their own position ids, or 0..L'-1
    where the press renumbers, a causal mask over them) for every later layer; final norm and LM
    head. Equals the pressed forward."""
    model, batch = deep("llava"), make_batch((5,))
    name, _, variant = name.partition("-")
    press = make("llava", name, **({"positions": variant} if variant else {}),
                 **({"recycle": False} if name == "sparsevlm" else {}))  # (merging: no literal oracle)
    renumbered = getattr(press, "positions", "keep") != "keep"  # None: the official "reindex" on LLaVA
    out, pre = prefill_record(model, batch, press)
    lm, seen = model.model.language_model, {}
    handle = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    hidden = seen["inputs_embeds"]
    cols = torch.arange(hidden.shape[1])
    starts = {cut.start: cut.cols[0] for cut in pre.cuts}
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(lm)):
            if i in starts:  # keep the kept columns, in order
                hidden = hidden[:, torch.searchsorted(cols, starts[i])]
                cols = starts[i]
            n = cols.shape[0]
            mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
            ids = torch.arange(n) if renumbered else cols
            rotary = lm.rotary_emb(hidden, ids[None])
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=ids[None])
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        expected = model.lm_head(lm.norm(hidden))
    assert len(pre.cuts) == (3 if name in ("pdrop", "sparsevlm") else 1)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)


def test_a_kv_press_sharing_one_selection_across_heads(kind, model):
    """``per_head = False``: one selection per image from the head-averaged scores, the same
    entries kept in every KV head; decoding and a later turn run on that cache."""
    from dataclasses import dataclass

    from mmpress.presses.snapkv import SnapKVPress

    @dataclass
    class SharedSnapKV(SnapKVPress):
        per_head = False

    batch = batches(kind, model)["single"]
    press = SharedSnapKV(keep=presses(kind)["snapkv"]["keep"], window=4)
    out, pre = prefill_record(model, batch, press)
    kept = kv_allowed(model, batch, out.past_key_values)
    for i in range(LAYERS):
        masks = kept(i)
        assert torch.equal(masks, masks[:, :1].expand_as(masks))  # every head keeps the same entries
    assert pre.mask.shape[1] < batch["input_ids"].shape[1]
    with torch.no_grad(), press(model):
        gen = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, suppress_tokens=VISUAL_IDS)
    expected = oracle_logits(model, batch, kept, gen.sequences[:, -3:-1], kv=True)[:, -1]
    torch.testing.assert_close(gen.logits[2], expected, atol=1e-4, rtol=1e-4)


def test_dart_llm_selects_per_row_at_each_rows_own_positions():
    """DART's pivots are the keys of largest L1 norm after RoPE, which depends on the absolute
    position: a ragged forward with each row's positions counted from its first token (what
    generate passes) gives each row its logits alone; numbered from the padded first column (a
    plain forward's default) the padded rows select for other positions."""
    from mmpress.registry import FAMILIES

    cls = FAMILIES["llava"]
    torch.manual_seed(0)
    model = cls.build("tiny", lm_layers=4)
    rows = cls.example_rows["ragged"]
    batch = cls.prompts(model, rows)
    press = mmpress.get_press("dart_llm", keep_ratio=0.5)
    own = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), press(model):
        at_own = model(**batch, position_ids=own).logits[:, -1]
        at_column = model(**batch).logits[:, -1]
        alone = [model(**cls.prompts(model, [row], first_row=i)).logits[0, -1] for i, row in enumerate(rows)]
    for i in range(len(rows)):
        torch.testing.assert_close(at_own[i], alone[i], atol=1e-5, rtol=1e-5)
    padded = batch["attention_mask"][:, 0] == 0
    assert padded.any() and any(not torch.allclose(at_column[i], alone[i], atol=1e-4) for i in padded.nonzero()[:, 0])
