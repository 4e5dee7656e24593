"""The LLaVA adapter: every press x tower x batch shape, forward and generate, against oracles."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import mmpress
from mmpress.models.llava import LlavaAdapter
from mmpress.presses.base import ScorerPress
from conftest import IMAGE_TOKEN, make_batch, tiny_llava

N = 64  # visual tokens per image of the tiny model
RAGGED = dict(prompt_lens=(5, 9, 3), images_per_row=[1, 2, 1])
ROWS = [slice(0, 1), slice(1, 3), slice(3, 4)]  # images of each row in RAGGED


@dataclass
class NormPress(ScorerPress):
    """Unregistered test press: keeps the tokens of largest norm (deterministic, scattered)."""

    name = "test-norm"

    def score(self, tokens, ctx):
        return tokens.norm(dim=-1)


def single_rows(batch):
    """Each row of a left-padded batch alone, unpadded, with its own images."""
    for i, images in enumerate(ROWS):
        start = int(batch["attention_mask"][i].nonzero()[0])
        yield {"input_ids": batch["input_ids"][i : i + 1, start:],
               "attention_mask": batch["attention_mask"][i : i + 1, start:],
               "pixel_values": batch["pixel_values"][images]}


def generate(model, inputs, steps=4):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -steps:], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("name", [p for p in mmpress.list_presses("pre_llm") if LlavaAdapter.runs(mmpress.PRESSES[p])])  # later stages: test_stages.py
@pytest.mark.parametrize("batch_shape", ["single", "ragged"])
def test_press_forward_and_generate(model, name, batch_shape):
    """Every press runs at batch 1 and batch 3 (ragged prompts, 1-2 images per row) through
    forward and generate; a ragged batch gives what each row gives alone (deterministic presses)."""
    press = mmpress.get_press(name) if name == "none" else mmpress.get_press(name, keep=16)
    batch = make_batch(**RAGGED) if batch_shape == "ragged" else make_batch((5,))
    with torch.no_grad(), press(model) as run:
        logits = model(**batch).logits
        tokens, scores = generate(model, batch)
    images = batch["pixel_values"].shape[0]
    kept = N if name == "none" else 16
    assert run.stats.kept_visual_tokens == images * kept
    assert logits.shape[1] == run.stats.pressed_seq_len <= batch["input_ids"].shape[1]
    assert torch.isfinite(logits).all() and torch.isfinite(scores).all()
    if batch_shape == "ragged" and name != "random":  # random draws depend on the batch layout
        for i, row in enumerate(single_rows(batch)):
            with torch.no_grad(), press(model):
                row_logits = model(**row).logits
                row_tokens, row_scores = generate(model, row)
            torch.testing.assert_close(logits[i, -1], row_logits[0, -1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(scores[i], row_scores[0], atol=1e-4, rtol=1e-4)
            assert torch.equal(tokens[i], row_tokens[0])


@pytest.mark.parametrize("make_press", [lambda: mmpress.get_press("none"), lambda: NormPress(keep=N),
                                        lambda: NormPress(keep_ratio=1.0)])
def test_keep_all_reproduces_unpressed_logits(model, make_press):
    batch = make_batch(**RAGGED)
    with torch.no_grad():
        reference = model(**batch).logits
        ref_tokens, ref_scores = generate(model, batch)
        with make_press()(model):
            assert torch.equal(model(**batch).logits, reference)
            tokens, scores = generate(model, batch)
    assert torch.equal(tokens, ref_tokens) and torch.equal(scores, ref_scores)


def oracle_logits(model, inputs, index, positions):
    """Build the pressed sequence by hand: text tokens + the image tokens at ``index``."""
    llava = model.model
    ids = inputs["input_ids"][0]
    embeds = llava.get_input_embeddings()(ids).clone()
    feats = torch.cat(llava.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
    image = ids == IMAGE_TOKEN
    embeds[image] = feats
    keep = ~image
    keep[image.nonzero()[:, 0].view(-1, N).gather(1, index).flatten()] = True
    pos = torch.arange(len(ids))[keep] if positions == "keep" else torch.arange(int(keep.sum()))
    hidden = llava.language_model(inputs_embeds=embeds[keep][None], position_ids=pos[None]).last_hidden_state
    return model.lm_head(hidden)


@pytest.mark.parametrize("positions", ["keep", "reindex"])
def test_pressed_forward_matches_hand_built_sequence(model, positions):
    inputs = make_batch((6,), images_per_row=[2])
    press = NormPress(keep=10)
    with torch.no_grad():
        feats = torch.stack(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        _, index = press.press(feats, mmpress.VisualContext())
        expected = oracle_logits(model, inputs, index, positions)
        with press(model, positions=positions):
            got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_position_choice_is_carried_into_decoding(model):
    """Greedy decoding on the pressed model == greedy decoding by hand on the oracle sequence."""
    inputs = make_batch((4,))
    press = NormPress(keep=8)
    for positions in ("keep", "reindex"):
        with torch.no_grad(), press(model, positions=positions):
            tokens, scores = generate(model, inputs, steps=3)
        with torch.no_grad():
            feats = torch.stack(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
            index = press.press(feats, mmpress.VisualContext())[1]
            ids = inputs["input_ids"]
            for step in range(3):  # full recompute each step: the oracle uses no cache
                logits = oracle_logits(model, {**inputs, "input_ids": ids}, index, positions)
                torch.testing.assert_close(logits[0, -1], scores[0, step], atol=1e-4, rtol=1e-4)
                ids = torch.cat([ids, tokens[:, step : step + 1]], dim=1)


def test_cls_attention_matches_eager_attention():
    """The [CLS] row computed from queries/keys equals eager attention's probabilities."""
    seen = {}

    @dataclass
    class Probe(ScorerPress):
        name = "test-probe"
        needs = ("cls_attn", "vision_keys", "grid", "text")

        def score(self, tokens, ctx):
            seen["ctx"] = ctx
            return ctx.cls_attn

    for tower in ("clip", "dinov2"):
        model = tiny_llava(tower, attn="eager")
        inputs = make_batch(**RAGGED)
        with torch.no_grad():
            out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
            # vision_feature_layer=-2 -> hidden_states[-2] -> output of block num_layers-2
            eager = out.attentions[-2].mean(dim=1)[:, 0, 1:]
            with Probe(keep=16)(model):
                model(**inputs)
        ctx = seen["ctx"]
        torch.testing.assert_close(ctx.cls_attn, eager, atol=1e-6, rtol=1e-5)
        assert ctx.grid == (8, 8) and ctx.vision_keys.shape[:2] == (4, N)
        # text of the sample owning each image: rows have 2+5, 2+9 (x2 images), 2+3 text tokens
        assert ctx.text_mask.sum(1).tolist() == [7, 11, 11, 5]


def test_hooks_removed_after_exception(model):
    with torch.no_grad():  # transformers installs its own output-capturing hooks on a first forward
        model(**make_batch((3,)))
    before = {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="boom"):
        with mmpress.get_press("visionzip", keep=8)(model):  # vision hooks too
            model(**make_batch((3,)))
            raise RuntimeError("boom")
    after = {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.named_modules()}
    assert before == after


def test_budget_validation():
    for bad in (dict(keep=0), dict(keep=-3), dict(keep_ratio=0.0), dict(keep_ratio=1.5), dict(keep=4, keep_ratio=0.5), {}):
        with pytest.raises(ValueError):
            mmpress.get_press("random", **bad)
    with pytest.raises(ValueError, match="divprune"):
        mmpress.get_press("no-such-press", keep=3)


def test_budget_above_token_count_is_a_noop_with_warning(model):
    batch = make_batch((5,))
    with torch.no_grad():
        reference = model(**batch).logits
        with pytest.warns(UserWarning, match="no-op"), NormPress(keep=N + 100)(model):
            assert torch.equal(model(**batch).logits, reference)


def test_unsupported_model_names_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2))
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration, .*Qwen2VLForConditionalGeneration"):
        with NormPress(keep=4)(lm):
            pass


@pytest.mark.parametrize("images", [0.5, 2])
def test_image_count_mismatch_is_an_error(model, images):
    """mmpress's own check, before transformers' (which the unpressed model would raise)."""
    batch = make_batch((5, 4), images_per_row=[1, 1])
    batch["pixel_values"] = torch.cat([batch["pixel_values"]] * 2) if images == 2 else batch["pixel_values"][:1]
    with pytest.raises(ValueError, match=r"visual inputs of \[64(, 64)*\] tokens were given, but the prompt rows hold \[64, 64\] placeholder"):
        with NormPress(keep=4)(model):
            model(**batch)


def test_image_tokens_without_images_is_an_error(model):
    batch = make_batch((5,))
    del batch["pixel_values"]
    with pytest.raises(ValueError, match="no images"):
        with NormPress(keep=4)(model):
            model(**batch)


# ---- transformers protocol, later turns, nesting, sampling / beams, syncs (issue 7, 10) ----------
def continue_turn(model, batch, new_ids, **press_options):
    """Logits of a second turn fed onto the first turn's (pressed) KV cache."""
    out = model(**batch, use_cache=True)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(new_ids)], dim=1)
    return model(input_ids=new_ids, attention_mask=mask, past_key_values=out.past_key_values).logits


@pytest.mark.parametrize("positions", ["keep", "reindex"])
def test_later_turn_on_pressed_cache_equals_rerunning_the_conversation(model, positions):
    batch, new_ids = make_batch((6,), images_per_row=[2]), torch.tensor([[11, 12, 13, 14]])
    press = mmpress.get_press("divprune", keep=12)  # text-independent: both runs keep the same tokens
    with torch.no_grad(), press(model, positions=positions):
        got = continue_turn(model, batch, new_ids)
        whole = {**batch, "input_ids": torch.cat([batch["input_ids"], new_ids], dim=1),
                 "attention_mask": torch.ones(1, batch["input_ids"].shape[1] + 4, dtype=torch.long)}
        expected = model(**whole).logits[:, -4:]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_generate_on_a_pressed_cache_with_images_again_raises(model):
    """Continuing a pressed cache works with text (tests/test_stages.py); passing the first
    turn's images again would have them pressed into a cache that already holds them."""
    batch = make_batch((4,))
    with torch.no_grad(), NormPress(keep=8)(model):
        out = model.generate(**batch, max_new_tokens=2, return_dict_in_generate=True)
        ids = torch.cat([out.sequences, torch.tensor([[11, 12, 13]])], dim=1)
        with pytest.raises(ValueError, match="without past_key_values"):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"],
                           past_key_values=out.past_key_values, max_new_tokens=2)


def test_generated_image_token_does_not_crash_decoding(model):
    from transformers import LogitsProcessor, LogitsProcessorList

    class ForceImageToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return torch.full_like(scores, -1e9).index_fill(1, torch.tensor([IMAGE_TOKEN]), 0.0)

    with torch.no_grad(), NormPress(keep=8)(model):
        out = model.generate(**make_batch((4, 6)), max_new_tokens=3, logits_processor=LogitsProcessorList([ForceImageToken()]))
    assert (out[:, -3:] == IMAGE_TOKEN).all()


def test_presses_do_not_nest(model):
    a, b = NormPress(keep=8), mmpress.get_press("divprune", keep=8)
    with pytest.raises(ValueError, match="already applied"):
        with a(model), b(model):
            pass
    with pytest.raises(ValueError, match="already applied"):
        with a(model), a(model):
            pass
    with a(model):  # the failed attempts left nothing behind
        pass


@pytest.mark.parametrize("name", ["divprune", "visionzip", "mmtok"])
def test_beam_search_and_sampling_under_a_press(model, name):
    """Beams: generate encodes each image once and repeats it per beam; the vision signals follow."""
    press, batch = mmpress.get_press(name, keep=16), make_batch(**RAGGED)
    with torch.no_grad(), press(model):
        beams = model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)[:, -3:]
        torch.manual_seed(0)
        sampled = model.generate(**batch, max_new_tokens=3, do_sample=True, top_k=5)
        for i, row in enumerate(single_rows(batch)):
            alone = model.generate(**row, max_new_tokens=3, num_beams=2, do_sample=False)[:, -3:]
            assert torch.equal(beams[i], alone[0])
    assert sampled.shape == (3, batch["input_ids"].shape[1] + 3)


def count_syncs(fn) -> dict[str, int]:
    """Ops that make the host wait for the device (item(), nonzero, boolean indexing, ...)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    # on CUDA these wait for the device too: bincount sizes its output from the max; quantile checks
    # a tensor q on the host; lift_fresh is a tensor made from Python data (a blocking host copy)
    syncing = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "bincount",
               "quantile", "lift_fresh"}

    class Counting(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            bool_index = name in ("index", "index_put", "index_put_") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] or ()) if t is not None)
            repeat = name == "repeat_interleave" and (kwargs or {}).get("output_size") is None and len(args) == 1
            if name in syncing or bool_index or repeat:
                self.seen[name] += 1
            return func(*args, **(kwargs or {}))

    with Counting() as mode:
        fn()
    return dict(mode.seen)


@pytest.mark.parametrize("name", [p for p in [p for p in mmpress.list_presses("pre_llm") if LlavaAdapter.runs(mmpress.PRESSES[p])] if p != "none"])
def test_pressed_forward_adds_no_host_syncs(name):
    """The pressed prefill and decoding sync no more than the unpressed model (transformers' own
    checks); the prompt check's one read of per-row counts (``tolist``) is the only addition."""
    model, batch = tiny_llava("clip"), make_batch(**RAGGED)
    with torch.no_grad():
        unpressed = count_syncs(lambda: model.generate(**batch, max_new_tokens=2, do_sample=False))
        with mmpress.get_press(name, keep=16)(model):
            pressed = count_syncs(lambda: model.generate(**batch, max_new_tokens=2, do_sample=False))
    assert pressed == unpressed, name


def test_text_only_row_in_an_image_batch(model):
    """A row without images keeps every token and gives what it gives alone, unpressed."""
    batch = make_batch((5, 7), images_per_row=[1, 0])
    batch["pixel_values"] = batch["pixel_values"][:1]
    start = int(batch["attention_mask"][1].nonzero()[0])
    alone = {"input_ids": batch["input_ids"][1:, start:], "attention_mask": batch["attention_mask"][1:, start:]}
    with torch.no_grad():
        reference = model(**alone).logits[0, -1]
        ref_tokens, _ = generate(model, alone)
        with NormPress(keep=8)(model):
            logits = model(**batch).logits
            tokens, _ = generate(model, batch)
    torch.testing.assert_close(logits[1, -1], reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens[1], ref_tokens[0])
