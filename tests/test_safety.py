"""No silent wrong answer, one clear error (issue 16): a pressed KV cache used after its `with`
block, presses without a KV cache, later turns through generate at batch 1 and on Qwen-VL (M-RoPE
ids of the new tokens), press contexts entered twice, a model on the meta device, and presses
under autograd. Tiny random models, against the oracles of tests/test_stages.py."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from conftest import make_batch, tiny_llava
from test_qwen3_vl import tiny_qwen3
from test_stages import (NEW, VISUAL_IDS, batches, deep, full_inputs, kv_allowed, layer_allowed, make, oracle_logits,
                         prefill_record, presses)

import mmpress

STALE = "valid only inside the `with press\\(model\\):` block"


@pytest.fixture(scope="module")
def llava():
    return deep("llava")


def later_turn(model, batch, cache):
    """Logits of three new text tokens fed onto ``cache`` (LLaVA), numbered as generate numbers."""
    new = NEW.expand(batch["input_ids"].shape[0], -1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(new)], dim=1)
    return model(input_ids=new, attention_mask=mask, past_key_values=cache,
                 position_ids=batch["attention_mask"].sum(1, keepdim=True) + torch.arange(new.shape[1])).logits


# ---- 2. a pressed cache outside the block that made it ------------------------------------------
@pytest.mark.parametrize("name", ["divprune", "fastv", "snapkv"])
def test_a_pressed_cache_after_its_block_raises(llava, name):
    """Outside its `with` block the model would read the pressed cache as the whole prompt (wrong
    logits, no error before): a forward and a generate on it raise, and so does another press."""
    batch = batches("llava", None)["ragged"]
    press = mmpress.get_press("divprune", keep=16) if name == "divprune" else make("llava", name)
    with torch.no_grad():
        with press(llava):
            cache = llava(**batch, use_cache=True).past_key_values
        with pytest.raises(ValueError, match=STALE):
            later_turn(llava, batch, cache)
        ids = torch.cat([batch["input_ids"], NEW.expand(3, -1)], dim=1)
        mask = torch.cat([batch["attention_mask"], torch.ones(3, 3, dtype=torch.long)], dim=1)
        with pytest.raises(ValueError, match=STALE):
            llava.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2)
        with pytest.raises(ValueError, match=STALE), mmpress.get_press("random", keep=16)(llava):
            later_turn(llava, batch, cache)


@pytest.mark.parametrize("name", ["divprune", "fastv", "snapkv"])
def test_re_entering_the_same_press_continues_its_cache(llava, name):
    """The message's fix works: a later turn in a new `with` block of the same press (the same
    object, or an equal one) gives the logits of the later turn inside the first block."""
    batch = batches("llava", None)["ragged"]
    press = mmpress.get_press("divprune", keep=16) if name == "divprune" else make("llava", name)
    with torch.no_grad():
        with press(llava):
            inside = later_turn(llava, batch, llava(**batch, use_cache=True).past_key_values)
        for again in (press, make("llava", name) if name != "divprune" else mmpress.get_press("divprune", keep=16)):
            with again(llava):
                cache = llava(**batch, use_cache=True).past_key_values
            with again(llava):
                torch.testing.assert_close(later_turn(llava, batch, cache), inside, atol=0, rtol=0)


def test_the_guard_costs_nothing_once_the_caches_are_gone():
    """No reference to a pressed cache is kept, and the guard hook left on the model removes
    itself at the first call after the last pressed cache is gone; a model that never made a
    pressed cache gets no hook."""
    model, batch = tiny_llava(), make_batch((5,))
    hooks = dict(model.model._forward_pre_hooks)
    press = mmpress.get_press("divprune", keep=8)
    with torch.no_grad():
        with press(model):
            model(**batch, use_cache=False)  # no cache: nothing to guard
        assert dict(model.model._forward_pre_hooks) == hooks
        with press(model):
            cache = model(**batch, use_cache=True).past_key_values
        assert len(model.model._forward_pre_hooks) == len(hooks) + 1
        alive = weakref.ref(cache)
        del cache
        gc.collect()
        assert alive() is None
        model(**batch)
    assert dict(model.model._forward_pre_hooks) == hooks


# ---- 4. presses without a KV cache --------------------------------------------------------------
@pytest.mark.parametrize("name", ["snapkv", "lookm"])
def test_a_kv_press_without_a_cache_raises(llava, name):
    batch = batches("llava", None)["single"]
    with torch.no_grad(), make("llava", name)(llava):
        with pytest.raises(ValueError, match="use_cache=False"):
            llava(**batch, use_cache=False)
        with pytest.raises(ValueError, match="use_cache=False"):
            llava.generate(**batch, use_cache=False, max_new_tokens=2)
        llava(**make_batch((4,)) | {"pixel_values": None, "input_ids": torch.tensor([[11, 12, 13]]),
                                     "attention_mask": torch.ones(1, 3, dtype=torch.long)}, use_cache=False)


@pytest.mark.parametrize("name", ["fastv", "pdrop", "mmtok"])
def test_generate_without_a_cache_warns_that_the_press_reselects(llava, name):
    """generate(use_cache=False) re-runs the whole sequence at each step: an in-LLM press (and a
    text-guided pre-LLM one) re-selects at every step; say so once. One forward without a cache
    (training, scoring) and a cached generate stay silent."""
    batch = batches("llava", None)["ragged"]
    press = mmpress.get_press("mmtok", keep=16) if name == "mmtok" else make("llava", name)
    with torch.no_grad(), press(llava):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            llava(**batch, use_cache=False)
            llava.generate(**batch, max_new_tokens=2, do_sample=False)
        with pytest.warns(UserWarning, match="re-selects the visual tokens at every step") as record:
            llava.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=False)
    assert sum("re-selects" in str(w.message) for w in record) == 1
    with warnings.catch_warnings(), torch.no_grad(), mmpress.get_press("divprune", keep=16)(llava):
        warnings.simplefilter("error")  # a text-independent pre-LLM press selects the same tokens at every step
        llava.generate(**batch, max_new_tokens=2, do_sample=False, use_cache=False)


# ---- 5. generate(past_key_values=...) at batch 1 (transformers drops an all-ones mask) ----------
def _first_turn(model, batch):
    out = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                         suppress_tokens=VISUAL_IDS)
    rows = batch["input_ids"].shape[0]
    ids = torch.cat([out.sequences, NEW.expand(rows, -1)], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones(rows, ids.shape[1] - batch["input_ids"].shape[1],
                                                          dtype=torch.long)], dim=1)
    return out.past_key_values, ids, mask


@pytest.mark.parametrize("rows", ["single", "ragged"])
@pytest.mark.parametrize("name", ["divprune", "fastv", "snapkv"])
def test_generate_continues_a_pressed_cache_at_batch_1_and_padded(llava, name, rows):
    """The README idiom ``generate(input_ids=ids, attention_mask=ones, past_key_values=cache)``:
    each step's logits equal the oracle, the unpressed model whose layers see only the kept prompt
    keys (in-LLM, KV), or the whole conversation pressed afresh (DivPrune keeps the same tokens:
    its selection reads no text)."""
    batch = batches("llava", None)[rows]
    press = mmpress.get_press("divprune", keep=16) if name == "divprune" else make("llava", name)
    steps = 3
    with torch.no_grad(), press(llava):
        cache, ids, mask = _first_turn(llava, batch)
        if rows == "single":
            mask = torch.ones_like(ids)  # what the README writes
        got = llava.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             suppress_tokens=VISUAL_IDS)
    logits, tokens = torch.stack(got.logits, 1), got.sequences[:, ids.shape[1]:]
    appended = ids[:, batch["input_ids"].shape[1]:]
    if name == "divprune":
        whole = full_inputs(llava, batch, torch.cat([appended, tokens[:, :-1]], dim=1))
        with torch.no_grad(), press(llava):
            expected = llava.generate(**whole, max_new_tokens=1, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True).logits[0]
            torch.testing.assert_close(logits[:, -1], expected, atol=1e-4, rtol=1e-4)
        return
    out, pre = prefill_record(llava, batch, press)
    allowed = layer_allowed(pre, batch["input_ids"].shape[1]) if name == "fastv" else \
        kv_allowed(llava, batch, out.past_key_values)
    for t in range(steps):
        expected = oracle_logits(llava, batch, allowed, torch.cat([appended, tokens[:, :t]], dim=1),
                                 kv=name == "snapkv")[:, -1]
        torch.testing.assert_close(logits[:, t], expected, atol=1e-4, rtol=1e-4)


# ---- 6. Qwen-VL later turns: the new tokens' M-RoPE ids -----------------------------------------
def deep_qwen3():
    """Qwen3-VL with a 4-layer language model; DeepStack feeds layers 0 and 1."""
    return tiny_qwen3(layers=4)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def qwen(request):
    return request.param, deep_qwen3() if request.param == "qwen3_vl" else deep(request.param)


@pytest.mark.parametrize("rows", ["single", "ragged"])
@pytest.mark.parametrize("name", [None, "divprune", "fastv"])
def test_qwen_later_turn_with_continue_positions(qwen, name, rows):
    """Several new tokens with the whole conversation's mask on a Qwen-VL cache, unpressed or
    pressed, batch 1 or a ragged batch: their M-RoPE ids from ``continue_positions`` give the
    oracle's logits (the unpressed model on the whole conversation; with the dropped tokens
    masked out for an in-LLM press; the whole conversation pressed afresh for DivPrune)."""
    kind, model = qwen
    batch = batches(kind, model)[rows]
    new = NEW.expand(batch["input_ids"].shape[0], -1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(new)], dim=1)
    press = None if name is None else mmpress.get_press(name, keep=6, **({"layer": 2} if name == "fastv" else {}))

    def turn_two(cache):
        ids = mmpress.continue_positions(model, cache, mask, new)
        assert ids.shape == (3, *new.shape)
        return model(input_ids=new, attention_mask=mask, past_key_values=cache, position_ids=ids).logits

    with torch.no_grad():
        if press is None:
            got = turn_two(model(**batch, use_cache=True).past_key_values)
            expected = model(**full_inputs(model, batch, new)).logits[:, -3:]
        else:
            with press(model):
                got = turn_two(model(**batch, use_cache=True).past_key_values)
                if name == "divprune":
                    expected = model(**full_inputs(model, batch, new)).logits[:, -3:]
            if name == "fastv":
                _, pre = prefill_record(model, batch, press)
                expected = oracle_logits(model, batch, layer_allowed(pre, batch["input_ids"].shape[1]), new)[:, -3:]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_qwen_later_turn_without_positions_names_the_helper(qwen):
    """transformers' Qwen-VL numbers several new tokens over the whole mask's width and crashes in
    its rotary code; under a press the call raises first, naming the working call."""
    kind, model = qwen
    batch = batches(kind, model)["ragged"]
    new = NEW.expand(3, -1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(new)], dim=1)
    with torch.no_grad(), mmpress.get_press("fastv", keep=6, layer=2)(model):
        cache = model(**batch, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="mmpress.continue_positions\\(model, cache, full_mask, new_ids\\)"):
            model(input_ids=new, attention_mask=mask, past_key_values=cache)
        with pytest.raises(ValueError, match="continue_positions"):
            model.generate(input_ids=torch.cat([batch["input_ids"], new], dim=1), attention_mask=mask,
                           past_key_values=cache, max_new_tokens=2)


# ---- 7. one clear error ------------------------------------------------------------------------
def test_a_press_context_is_reusable_but_does_not_nest():
    """``ctx = press(model)`` may be entered again after it exits; entered inside itself it raises
    the nesting error, not an AttributeError from contextlib."""
    model, batch = tiny_llava(), make_batch((5,))
    press = mmpress.get_press("divprune", keep=8)
    ctx = press(model)
    with torch.no_grad():
        with ctx as run:
            first = model(**batch).logits
        assert run.stats.kept_visual_tokens == 8 and run.stats.items == 1  # the block's results
        with ctx:
            assert torch.equal(model(**batch).logits, first)
        with pytest.raises(ValueError, match="already applied"):
            with ctx, ctx:
                pass
        with ctx:  # the failed attempt left nothing behind
            assert torch.equal(model(**batch).logits, first)
        composed = mmpress.compose(press, mmpress.get_press("snapkv", keep=8))(model)
        with composed, pytest.raises(ValueError, match="already applied"), composed:
            pass


def test_one_press_on_two_models_at_once():
    """Legal: each model gets its own hooks; the press holds no per-model state (``stats``: the
    last pressed prefill's)."""
    a, b = tiny_llava(seed=0), tiny_llava(seed=1)
    batch = make_batch((5,))
    press = mmpress.get_press("divprune", keep=8)
    with torch.no_grad():
        with press(a):
            alone_a = a(**batch).logits
        with press(b):
            alone_b = b(**batch).logits
        with press(a), press(b):
            both = a(**batch).logits, b(**batch).logits
    assert torch.equal(both[0], alone_a) and torch.equal(both[1], alone_b)


def test_a_model_on_the_meta_device_names_the_fix():
    with torch.device("meta"):
        model = tiny_llava()
    with pytest.raises(ValueError, match="meta device.*device_map"):
        with mmpress.get_press("divprune", keep=8)(model):
            pass


# ---- 10. presses under autograd ------------------------------------------------------------------
def press_kwargs(name: str) -> dict:
    table = presses("llava")
    if name in table:
        return table[name]
    return dict(keep=16) if mmpress.PRESSES[name].needs_budget else {}


@pytest.mark.parametrize("name", [n for n in mmpress.list_presses() if mmpress.models.LlavaAdapter.runs(mmpress.PRESSES[n])])
def test_every_press_runs_under_autograd(llava, name):
    """Fine-tuning or attribution through a press: a forward with grad enabled gives the logits of
    the no-grad forward (selection reads values, not gradients), and backward reaches the projector
    and the language model with finite gradients (selection indices carry none; kept values do)."""
    batch = batches("llava", None)["ragged"]
    press = mmpress.get_press(name, **press_kwargs(name))
    with torch.no_grad(), press(llava):
        reference = llava(**batch).logits
    llava.zero_grad(set_to_none=True)
    with press(llava):
        logits = llava(**batch).logits
    torch.testing.assert_close(logits.detach(), reference, atol=1e-5, rtol=1e-5)
    logits.sum().backward()
    for param in (llava.model.multi_modal_projector.linear_1.weight, llava.model.language_model.layers[-1].mlp.down_proj.weight):
        assert param.grad is not None and param.grad.isfinite().all() and param.grad.abs().sum() > 0
    llava.zero_grad(set_to_none=True)
