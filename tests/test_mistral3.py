"""The Mistral 3 adapter (Pixtral tower at native resolution, patch merger, [IMG_BREAK] / [IMG_END]
markers, 1-D RoPE): markers kept in place, raster order, the no-[CLS] signals against eager
attention, generate's pre-encoded images, the processor's layout, FLOPs. Tiny random configs."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import mmpress
import mmpress.models.mistral3  # noqa: F401  (registers the family until the registry line lands)
from mmpress.models.mistral3 import IMAGE_BREAK, IMAGE_END, Mistral3Adapter
from mmpress.presses.base import ScorerPress

IMAGE = 10
RAGGED = Mistral3Adapter.example_rows["ragged"]  # (32, 48) | (48, 32), (32, 32) | text only
TWO = [[(32, 48), (48, 32)]]  # one row, two images of different shapes


@pytest.fixture(scope="module")
def model():
    return Mistral3Adapter.build("tiny")


def prompts(model, rows, first_row=0):
    return Mistral3Adapter.prompts(model, rows, first_row=first_row)


def generate(model, inputs, steps=3, **options):
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, **options)
    return out.sequences[:, -steps:], torch.stack(out.logits, dim=1)


@dataclass
class NormPress(ScorerPress):
    """Unregistered test press: keeps the tokens of largest norm (deterministic, scattered)."""

    name = "test-norm"

    def score(self, tokens, ctx):
        return tokens.norm(dim=-1)


@dataclass
class ProbePress(ScorerPress):
    """Keeps the tokens of highest ``cls_attn`` and records every signal it was given."""

    name = "test-probe"
    needs = ("cls_attn", "vision_keys", "cls_attn_concat", "vision_keys_concat", "vision_features")
    vision_layers: tuple = (-2,)

    def score(self, tokens, ctx):
        self.seen.append(ctx)
        return ctx.cls_attn


# ---- layout: markers, raster order ---------------------------------------------------------------
def test_prompts_lay_out_rows_of_placeholders_then_break_and_end(model):
    """Each image: R rows of C [IMG] placeholders, each row closed by [IMG_BREAK], the last by
    [IMG_END]; the items the adapter finds are (1, R, C) grids of R * C tokens."""
    batch = prompts(model, TWO)
    ids = batch["input_ids"][0].tolist()
    markers = [i for i, t in enumerate(ids) if t in (IMAGE_BREAK, IMAGE_END)]
    runs = [markers[0] - ids.index(IMAGE)] + [b - a - 1 for a, b in zip(markers, markers[1:])]
    assert runs == [6] * 4 + [4] * 6  # (32, 48) px: 4 rows of 6; (48, 32) px: 6 rows of 4
    assert [ids[m] for m in markers] == [IMAGE_BREAK] * 3 + [IMAGE_END] + [IMAGE_BREAK] * 5 + [IMAGE_END]
    adapter = Mistral3Adapter(model)
    items = adapter.visual_items((), batch)
    assert [(i.length, i.grid, i.source) for i in items] == [(24, (1, 4, 6), 0), (24, (1, 6, 4), 1)]


def test_placeholder_k_holds_the_merged_window_in_raster_order(model):
    """The k-th placeholder of an image gets the projector's output for patch window (k // C, k % C):
    recomputed here window by window from the tower's patches, so the markers between rows do not
    shift the grid the presses see."""
    batch = prompts(model, TWO)
    vlm = model.model
    with torch.no_grad():
        feats = vlm.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
        hidden = feats.hidden_states[-1][0]
        proj = vlm.multi_modal_projector
        normed, start = proj.norm(hidden), 0
        for (h, w), pooled in zip(batch["image_sizes"].tolist(), feats.pooler_output):
            ph, pw = h // 4, w // 4
            patches = normed[start : start + ph * pw].view(ph, pw, -1)
            start += ph * pw
            for k in range(pooled.shape[0]):
                r, c = divmod(k, pw // 2)
                window = patches[2 * r : 2 * r + 2, 2 * c : 2 * c + 2]  # (2, 2, C): unfold's channel-major order
                x = proj.patch_merger.merging_layer(window.permute(2, 0, 1).reshape(-1))
                expected = proj.linear_2(proj.act(proj.linear_1(x)))
                torch.testing.assert_close(pooled[k], expected, atol=1e-5, rtol=1e-5)


def oracle_logits(model, inputs, kept, positions):
    """The pressed sequence by hand (batch 1): every text token ([IMG_BREAK] / [IMG_END] included)
    and the placeholders at ``kept`` (flat positions), with the original 1-D ids ("keep") or
    0..L'-1 ("reindex")."""
    vlm, ids = model.model, inputs["input_ids"]
    feats = vlm.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    embeds = vlm.get_input_embeddings()(ids).masked_scatter((ids == IMAGE)[..., None], torch.cat(feats.pooler_output))
    keep = ids[0] != IMAGE
    keep[kept] = True
    pos = torch.arange(ids.shape[1])[keep] if positions == "keep" else torch.arange(int(keep.sum()))
    hidden = vlm.language_model(inputs_embeds=embeds[:, keep], position_ids=pos[None]).last_hidden_state
    return model.lm_head(hidden), keep


def kept_placeholders(model, inputs, press):
    vlm, ids = model.model, inputs["input_ids"][0]
    feats = vlm.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).pooler_output
    where = (ids == IMAGE).nonzero()[:, 0].split([f.shape[0] for f in feats])
    return torch.cat([w[press.press(f[None], mmpress.VisualContext())[1][0]] for f, w in zip(feats, where)])


@pytest.mark.parametrize("positions", ["keep", "reindex"])
def test_pressed_forward_and_decoding_match_hand_built_sequence(model, positions):
    """Two images of different shapes: the pressed forward keeps every marker where it was (only
    placeholders go), numbers positions as asked, and greedy decoding continues it."""
    inputs = prompts(model, TWO)
    press = NormPress(keep=5)
    with torch.no_grad():
        kept = kept_placeholders(model, inputs, press)
        expected, keep = oracle_logits(model, inputs, kept, positions)
        with press(model, positions=positions):
            got = model(**inputs).logits
            tokens, scores = generate(model, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    ids = inputs["input_ids"][0]
    assert torch.equal(ids[keep][ids[keep] != IMAGE], ids[ids != IMAGE])  # every marker and word, in order
    assert int((ids[keep] == IMAGE).sum()) == 10
    with torch.no_grad():  # cache-free oracle of the first decoded token
        whole = {**inputs, "input_ids": torch.cat([inputs["input_ids"], tokens[:, :1]], dim=1)}
        expected_next, _ = oracle_logits(model, whole, kept, positions)
    torch.testing.assert_close(scores[0, 1], expected_next[0, -1], atol=1e-4, rtol=1e-4)


# ---- batches ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", ["single", "ragged"])
def test_keep_all_reproduces_unpressed(model, rows):
    batch = prompts(model, Mistral3Adapter.example_rows[rows])
    with torch.no_grad():
        reference, (ref_tokens, ref_scores) = model(**batch).logits, generate(model, batch)
        with mmpress.get_press("none")(model):
            assert torch.equal(model(**batch).logits, reference)
            tokens, scores = generate(model, batch)
    assert torch.equal(tokens, ref_tokens) and torch.equal(scores, ref_scores)


@pytest.mark.parametrize("name", ["visionzip", "divprune", "vispruner", "prumerge"])
def test_ragged_batch_equals_each_row_alone(model, name):
    """Images of different sizes and counts per row (and a text-only row): forward and greedy
    generate equal each row alone; generate encodes the images before the forward, so the
    signal presses find theirs by the encoder output they came with."""
    batch = prompts(model, RAGGED)
    press = mmpress.get_press(name, keep_ratio=0.5)
    with torch.no_grad(), press(model):
        logits = model(**batch).logits
        tokens, scores = generate(model, batch)
        for i, row in enumerate(RAGGED):
            alone = prompts(model, [row], first_row=i)
            torch.testing.assert_close(logits[i, -1], model(**alone).logits[0, -1], atol=1e-4, rtol=1e-4)
            row_tokens, row_scores = generate(model, alone)
            torch.testing.assert_close(scores[i], row_scores[0], atol=1e-4, rtol=1e-4)
            assert torch.equal(tokens[i], row_tokens[0])


def test_visionzip_under_beam_search_equals_each_row_alone(model):
    """generate(num_beams=2) repeats each encoded image per beam: every beam gets its own image's
    signal (rows 0 and 2 have images of one shape, pressed as one group)."""
    rows = [[(32, 48)], [(48, 32)], [(32, 48)], []]
    batch = prompts(model, rows)
    press = mmpress.get_press("visionzip", keep_ratio=0.5)
    options = dict(max_new_tokens=3, min_new_tokens=3, num_beams=2, do_sample=False)
    with torch.no_grad(), press(model):
        tokens = model.generate(**batch, **options)[:, -3:]
        for i, row in enumerate(rows):
            assert torch.equal(tokens[i], model.generate(**prompts(model, [row], first_row=i), **options)[0, -3:])


@pytest.mark.parametrize("name", ["fastv", "pdrop", "snapkv", "lookm"])
def test_in_llm_and_kv_presses_leave_the_markers(name):
    """In-LLM and KV presses act on the placeholders only: a ragged batch runs forward and
    generate, and keeps as many visual tokens as the press says."""
    model = Mistral3Adapter.build("tiny", lm_layers=4)
    options = {"fastv": dict(keep_ratio=0.5, layer=2), "pdrop": dict(stages=(1, 2, 3))}
    press = mmpress.get_press(name, **options.get(name, dict(keep_ratio=0.5)))
    batch = prompts(model, RAGGED)
    with torch.no_grad(), press(model) as run:
        logits = model(**batch).logits
        tokens, scores = generate(model, batch)
    assert run.stats.visual_tokens == 64 and run.stats.kept_visual_tokens < 64
    assert torch.isfinite(logits).all() and torch.isfinite(scores).all()


def test_later_turn_on_pressed_cache_equals_rerunning_the_conversation(model):
    batch, new_ids = prompts(model, [[(32, 48)]]), torch.tensor([[20, 21, 22]])
    press = mmpress.get_press("divprune", keep=6)  # text-independent: both runs keep the same tokens
    whole = {**batch, "input_ids": torch.cat([batch["input_ids"], new_ids], dim=1)}
    whole["attention_mask"] = torch.ones_like(whole["input_ids"])
    with torch.no_grad(), press(model):
        out = model(**batch, use_cache=True)
        got = model(input_ids=new_ids, attention_mask=whole["attention_mask"],
                    past_key_values=out.past_key_values).logits
        expected = model(**whole).logits[:, -3:]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_ministral3_language_model():
    """Ministral 3's language model (YaRN, Llama-4 query scaling): keep-all is exact, a pre-LLM and
    an in-LLM press run."""
    model = Mistral3Adapter.build("tiny", text_model_type="ministral3", lm_layers=3)
    assert model.config.text_config.model_type == "ministral3"
    batch = prompts(model, RAGGED)
    with torch.no_grad():
        reference = model(**batch).logits
        with mmpress.get_press("none")(model):
            assert torch.equal(model(**batch).logits, reference)
        for press in (mmpress.get_press("visionzip", keep=8), mmpress.get_press("fastv", keep=8, layer=2)):
            with press(model):
                assert torch.isfinite(model(**batch).logits).all()
                generate(model, batch)


# ---- no [CLS]: the attention each token receives ---------------------------------------------------
def eager_reference(model, inputs, monkeypatch, blocks):
    """Per image, from the tower run with eager attention: the attention each patch receives in
    each of ``blocks`` (mean over the image's queries, then heads), the head-mean rotated keys (of the
    feature block, the last of ``blocks``), the full-width single-softmax form and its keys (of the
    press's one listed block, the first of ``blocks``), each averaged over the
    2 x 2 merge windows by explicit loops; and the projector's input as the merger unfolds it."""
    tower = model.model.vision_tower
    modeling = sys.modules[type(tower).__module__]
    eager, calls = modeling.eager_attention_forward, {}
    targets = {tower.transformer.layers[b].attention: b for b in blocks}

    def recording(module, query, key, value, *args, **kwargs):
        out, weights = eager(module, query, key, value, *args, **kwargs)
        if module in targets:
            calls[targets[module]] = (weights[0], query[0], key[0])  # (H, S, S), (H, S, d), (H, S, d)
        return out, weights

    monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    monkeypatch.setattr(tower.config, "_attn_implementation", "eager")
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    monkeypatch.undo()
    projector_input = feats.hidden_states[-1][0]

    def windows(per_patch, ph, pw):  # (ph * pw, ...) -> (ph/2 * pw/2, ...) window means, raster order
        grid = per_patch.view(ph, pw, *per_patch.shape[1:])
        return torch.stack([grid[2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean(dim=(0, 1))
                            for r in range(ph // 2) for c in range(pw // 2)])

    out, start = [], 0
    for h, w in inputs["image_sizes"].tolist():
        ph, pw = h // 4, w // 4
        seg = slice(start, start + ph * pw)
        start += ph * pw
        image = {}
        for b, (probs, q, k) in calls.items():
            image[b] = windows(probs[:, seg, seg].mean(dim=1).mean(dim=0), ph, pw)
        image["keys"] = windows(calls[blocks[-1]][2][:, seg].mean(dim=0), ph, pw)
        _, q, k = calls[blocks[0]]
        qc, kc = q[:, seg].transpose(0, 1).reshape(ph * pw, -1), k[:, seg].transpose(0, 1).reshape(ph * pw, -1)
        full = ((qc @ kc.T) * kc.shape[-1] ** -0.5).softmax(dim=-1)
        image["concat"], image["concat_keys"] = windows(full.mean(dim=0), ph, pw), windows(kc, ph, pw)
        unfold = torch.nn.functional.unfold(projector_input[seg].view(ph, pw, -1).permute(2, 0, 1)[None], 2, stride=2)
        image["features"] = unfold[0].T
        out.append(image)
    return out


def test_signals_equal_eager_attention_received(monkeypatch):
    """Three images of two shapes over two rows: while the tower runs with SDPA, a press gets, per
    image and in the LM's token order, eager attention's mean attention received within the image
    (feature block and a listed block), the head-mean rotated keys, the heads-concatenated form (at
    the press's one listed block, as ``VisualContext`` says), and the projector's input as the
    merger unfolds it."""
    model = Mistral3Adapter.build("tiny", vision_layers=3)
    inputs = prompts(model, [[(32, 48)], [(48, 32), (32, 48)]])
    press = ProbePress(keep=3, vision_layers=(-2,))
    press.seen = []
    with torch.no_grad():
        with press(model):
            model(**inputs)
        expected = eager_reference(model, inputs, monkeypatch, blocks=[1, 2])
    by_grid = {ctx.grid: ctx for ctx in press.seen}
    assert sorted(by_grid) == [(4, 6), (6, 4)] and by_grid[(4, 6)].cls_attn.shape[0] == 2
    grids, index = [(4, 6), (6, 4), (4, 6)], [0, 0, 1]
    for image, grid, i in zip(expected, grids, index):
        ctx = by_grid[grid]
        torch.testing.assert_close(ctx.cls_attn[i], image[2], atol=1e-5, rtol=0)
        torch.testing.assert_close(ctx.cls_attn_layers[i, 0], image[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(ctx.vision_keys[i], image["keys"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ctx.cls_attn_concat[i], image["concat"], atol=1e-5, rtol=0)
        torch.testing.assert_close(ctx.vision_keys_concat[i], image["concat_keys"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ctx.vision_features[i], image["features"], atol=1e-6, rtol=0)
        assert abs(float(ctx.cls_attn[i].sum()) * 4 - 1) < 1e-5  # an image's patches share one softmax mass


def test_signals_missing_and_feature_layer_lists_raise(model):
    batch = prompts(model, [[(32, 48)]])
    press = mmpress.get_press("visionzip", keep=4)
    vlm = model.model
    with torch.no_grad():
        encoded = vlm.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
        with press(model), pytest.raises(ValueError, match="encode the images inside"):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  mm_encoder_outputs={"image": encoded})
    with pytest.raises(ValueError, match="image_sizes"), press(model):
        model(**{k: v for k, v in batch.items() if k != "image_sizes"})
    listed = Mistral3Adapter.build("tiny")
    listed.config.vision_feature_layer = [-1]
    with pytest.raises(ValueError, match="single vision_feature_layer"), press(listed):
        listed(**batch)


# ---- the processor's layout, FLOPs ------------------------------------------------------------------
def pixtral_processor_class(monkeypatch):
    """PixtralProcessor, importable without torchvision (not installed here: its torchvision image
    processor module is stood in for by the PIL one, which the class does not use)."""
    import importlib

    from transformers.models.pixtral import image_processing_pil_pixtral as pil

    prefix = "transformers.models.pixtral."
    if importlib.util.find_spec("torchvision") is None:
        monkeypatch.setitem(sys.modules, prefix + "image_processing_pixtral", pil)
        monkeypatch.delitem(sys.modules, prefix + "processing_pixtral", raising=False)
    return importlib.import_module(prefix + "processing_pixtral").PixtralProcessor


STAND_IN = SimpleNamespace(patch_size=4, spatial_merge_size=2, image_token="[IMG]", image_break_token="[IMG_BREAK]",
                           image_end_token="[IMG_END]")
NAMES = {IMAGE: "[IMG]", IMAGE_BREAK: "[IMG_BREAK]", IMAGE_END: "[IMG_END]"}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 12), cols=st.integers(1, 12))
def test_image_layout_is_the_processors_for_any_size(model, monkeypatch, rows, cols):
    """For any image of R x C tokens: the processor's token layout, and an item of R * C tokens on
    the (1, R, C) grid."""
    processor = pixtral_processor_class(monkeypatch)
    size = (8 * rows, 8 * cols)
    text = processor.replace_image_token(STAND_IN, {"image_sizes": [size]}, 0)
    assert "".join(NAMES[t] for t in Mistral3Adapter.image_tokens(model.config, size)) == text
    items = Mistral3Adapter(model).visual_items((), prompts(model, [[size]]))
    assert [(i.length, i.grid) for i in items] == [(rows * cols, (1, rows, cols))]


def test_prompts_match_the_pixtral_processor(model, monkeypatch):
    """The token layout of each image is the real processor's ``replace_image_token`` (run on a
    stand-in: PixtralProcessor needs torchvision, which is not installed, to be built or even
    imported, so its torchvision image processor module is stood in for by the PIL one), and
    pixel_values / image_sizes are what its PIL image processor gives for images already at a
    multiple of 8 px: zero-padded at the bottom / right to the largest sides."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    processor = pixtral_processor_class(monkeypatch)
    sizes = [(32, 48), (48, 32), (16, 8)]
    for i, size in enumerate(sizes):
        text = processor.replace_image_token(STAND_IN, {"image_sizes": sizes}, i)
        assert "".join(NAMES[t] for t in Mistral3Adapter.image_tokens(model.config, size)) == text
    batch = prompts(model, [sizes])
    images = [(batch["pixel_values"][j, :, :h, :w].permute(1, 2, 0).numpy() * 40 + 128).round().clip(0, 255)
              for j, (h, w) in enumerate(sizes)]
    processed = PixtralImageProcessorPil(patch_size=8, size={"longest_edge": 64}, do_rescale=False,
                                         do_normalize=False)([[im.astype("uint8") for im in images]],
                                                             return_tensors="pt")
    assert processed["image_sizes"].tolist() == batch["image_sizes"].tolist()
    assert processed["pixel_values"].shape == batch["pixel_values"].shape
    padding = processed["pixel_values"] == 0
    assert torch.equal(padding.all(dim=1), (batch["pixel_values"] == 0).all(dim=1))
    with pytest.raises(ValueError, match="multiples of 8"):
        prompts(model, [[(30, 48)]])


def counted_tower_and_projector(model, inputs) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        Mistral3Adapter.encode(model, inputs)
    return counter.get_total_flops()


def test_prefill_flops_equal_counted_tower_and_projector():
    """One image: the analytical tower + projector FLOPs equal torch's count of the matmuls and
    the patch convolution (eager attention: torch counts no CPU SDPA kernel), exactly but for an
    older transformers' RoPE-angle matmul. Two images:
    the sum of each alone (attention stays within an image; a packed SDPA call computes the whole
    masked map, a varlen kernel does not)."""
    model = Mistral3Adapter.build("tiny", attn="eager")
    one = prompts(model, [[(32, 48)]])
    counted = Mistral3Adapter.prefill_flops(model.config, one, one["input_ids"].shape[1])
    # transformers < 5.24 computes the RoPE angles with a (patches x 1) @ (1 x head_dim / 2) matmul: 0.02%
    assert counted.vision + counted.projector == pytest.approx(counted_tower_and_projector(model, one), rel=1e-3)
    two = prompts(model, [[(32, 48)], [(48, 32)]])
    alone = [Mistral3Adapter.prefill_flops(model.config, prompts(model, [r], first_row=i), 1) for i, r in
             enumerate([[(32, 48)], [(48, 32)]])]
    both = Mistral3Adapter.prefill_flops(model.config, two, 1)
    assert both.vision == sum(a.vision for a in alone) and both.projector == sum(a.projector for a in alone)
    assert both.language == Mistral3Adapter.prefill_flops(model.config, {"input_ids": two["input_ids"]}, 1).language


def test_real_shape():
    """The real CPU shape: Pixtral 6 x 384 with 14 px patches, 1024 tokens for the bench image."""
    model = Mistral3Adapter.build("real", vision_layers=1, lm_layers=1)
    assert model.config.vision_config.patch_size == 14 and model.config.vision_config.hidden_size == 384
    h, w = Mistral3Adapter.bench_media["image"]
    inputs = Mistral3Adapter.prompts(model, [[(h, w)]])
    assert int((inputs["input_ids"] == IMAGE).sum()) == (h // 28) * (w // 28) == 1024
    flops = Mistral3Adapter.prefill_flops(model.config, inputs, inputs["input_ids"].shape[1])
    assert flops.vision > 0 and flops.projector > 0 and flops.language > 0


@pytest.mark.parametrize("name", ["visionzip", "vispruner", "prumerge", "divprune"])
def test_pressed_generate_adds_no_host_syncs(model, name):
    """Reading the image sizes on the host and scoring each image's patches add no syncing op to
    generate (transformers reads ``image_sizes`` itself)."""
    from test_llava import count_syncs

    batch = prompts(model, RAGGED)
    with torch.no_grad():
        unpressed = count_syncs(lambda: model.generate(**batch, max_new_tokens=2, do_sample=False))
        with mmpress.get_press(name, keep_ratio=0.5)(model):
            pressed = count_syncs(lambda: model.generate(**batch, max_new_tokens=2, do_sample=False))
    assert pressed == unpressed
