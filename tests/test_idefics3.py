"""The SmolVLM / Idefics3 family: tiles + global image as one item, the text markers kept, the
padding crops left out, attention-received signals through the pixel shuffle, generate's
pre-encoded crops under beam search, the processor's layout, FLOPs. Tiny random configs of the
real classes, no download."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmpress
import mmpress.models.idefics3  # noqa: F401  (registers the family until the registry line lands)
from mmpress.flops import language_flops
from mmpress.models.idefics3 import (FAKE, GLOBAL, IMAGE, NEWLINE, ROW_COL, TEXT_LOW, Idefics3Adapter, image_crops,
                                     image_tokens, received_by_crop, tile_layout)
from mmpress.presses.base import ScorerPress

A = Idefics3Adapter
TYPES = ("smolvlm", "idefics3")
RAGGED = A.example_rows["ragged"]  # 17 crops | 5 + 9 crops | 13 crops


@pytest.fixture(scope="module", params=TYPES)
def model(request):
    return A.build("tiny", model_type=request.param)


def n_tok(model) -> int:
    cfg = model.config
    return (cfg.vision_config.image_size // cfg.vision_config.patch_size // cfg.scale_factor) ** 2


class NormPress(ScorerPress):
    name = "test-norm"

    def score(self, tokens, ctx):
        return tokens.norm(dim=-1)


class ProbePress(ScorerPress):
    """Keeps the tokens of highest ``cls_attn`` and records what it was given."""

    name = "test-probe"
    needs = ("cls_attn", "vision_keys", "cls_attn_concat", "vision_keys_concat", "vision_features")

    def score(self, tokens, ctx):
        self.seen.append((tokens, ctx))
        return ctx.cls_attn


def crop_features(model, batch) -> torch.Tensor:
    """(real crops, n, D): the connector's output per crop, as the model computes it."""
    return torch.cat(list(model.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"])
                          .pooler_output)).view(-1, n_tok(model), model.config.text_config.hidden_size)


# ---- where the images are ------------------------------------------------------------------
def test_items_are_images_with_their_crops_as_parts(model):
    """One item per image: its tiles then its global image, as parts; sources count real crops
    only (the all-zero padding crops of shorter rows are not encoded)."""
    batch, n = A.prompts(model, RAGGED), n_tok(model)
    side = int(n**0.5)
    adapter = A(model)
    items = adapter.visual_items((), batch)
    crops = [17, 5, 9, 13]
    assert [item.length for item in items] == [c * n for c in crops]
    assert [item.source for item in items] == [0, 17, 22, 31]  # 17 + 5 + 9 + 13 = 44 real crops of 3 x 17 slots
    for item, c in zip(items, crops):
        assert item.grid is None and item.kind == "image"
        assert [p.role for p in item.parts] == ["crop"] * (c - 1) + ["base"]
        assert [(p.start, p.length, p.grid) for p in item.parts] == [(k * n, n, (1, side, side)) for k in range(c)]
    # an unsplit image (a video frame, do_image_splitting=False): a plain raster, no parts
    ids = torch.tensor([[20, 21] + image_tokens(0, 0, n) + image_tokens(1, 2, n) + [22]])
    assert image_crops(ids, IMAGE, n) == [[1, 3]]
    one = A(model)._items([[1, 3]], n, side, None)
    assert (one[0].grid, one[0].parts, one[0].length) == ((1, side, side), (), n)
    assert (one[1].source, len(one[1].parts)) == (1, 3)


def test_a_prompt_not_laid_out_by_the_processor_is_refused(model):
    n = n_tok(model)
    run = [[20] + image_tokens(1, 2, n)[:-3] + [IMAGE] + image_tokens(0, 0, n)[-3:]]  # a crop of n + 1 tokens
    with pytest.raises(ValueError, match="run of"):
        image_crops(torch.tensor(run), IMAGE, n)
    rows = torch.tensor([[20, 21] + image_tokens(0, 0, n), [21, 22] + [FAKE, 30] + [IMAGE] * n + [FAKE]])
    with pytest.raises(ValueError, match="global crop"):  # the rows' last crops follow different markers
        image_crops(rows, IMAGE, n)


def test_prompts_match_the_real_processor():
    """prompts() lays images out as transformers' Idefics3Processor (PIL image processor, a
    word-level tokenizer built offline with the random models' ids): the same marker and image
    tokens per image, the same crop counts and zero-padded crops per row."""
    np = pytest.importorskip("numpy")
    from PIL import Image
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor, PreTrainedTokenizerFast

    model = A.build("tiny", model_type="smolvlm")
    crop, n = model.config.vision_config.image_size, n_tok(model)
    vocab = {"[PAD]": 0, "[UNK]": 1, "<image>": IMAGE, "<fake_token_around_image>": FAKE, "<global-img>": GLOBAL,
             "\n": NEWLINE, "<end_of_utterance>": TEXT_LOW, "q": TEXT_LOW + 1,
             **{f"<row_{i + 1}_col_{j + 1}>": ROW_COL + 6 * i + j for i in range(6) for j in range(6)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in vocab if t.startswith("<")])
    tok.add_tokens([AddedToken("\n", normalized=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", padding_side="left")
    images = Idefics3ImageProcessorPil(size={"longest_edge": 4 * crop}, max_image_size={"longest_edge": crop})
    processor = Idefics3Processor(image_processor=images, tokenizer=fast, image_seq_len=n)
    g = np.random.default_rng(0)
    pil = [[Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in row] for row in RAGGED]
    text = [" ".join(["q"] + ["<image>"] * len(row) + ["q"]) for row in RAGGED]
    real = processor(text=text, images=pil, return_tensors="pt", padding=True)
    ours = A.prompts(model, RAGGED)
    for i, row in enumerate(RAGGED):
        ids = real["input_ids"][i][real["attention_mask"][i].bool()].tolist()
        expected = [t for h, w in row for t in image_tokens(*tile_layout(h, w, crop), n)]
        assert ids[1:-1] == expected  # between the two words
        ours_ids = ours["input_ids"][i].tolist()
        assert ours_ids[ours_ids.index(FAKE):][: len(expected)] == expected
    assert real["pixel_values"].shape == ours["pixel_values"].shape
    assert torch.equal(real["pixel_attention_mask"], ours["pixel_attention_mask"])


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 600), w=st.integers(1, 600), crop=st.sampled_from([24, 36]))
def test_tile_layout_equals_the_image_processor(h, w, crop):
    """The tiles prompts() cuts an image into are the image processor's (resize to the longest
    edge, round up to whole crops), for any size and aspect ratio."""
    from PIL import Image
    from transformers import Idefics3ImageProcessorPil

    processor = Idefics3ImageProcessorPil(size={"longest_edge": 4 * crop}, max_image_size={"longest_edge": crop})
    out = processor(Image.new("RGB", (w, h)), return_row_col_info=True)
    assert tile_layout(h, w, crop) == (out["rows"][0][0], out["cols"][0][0])


# ---- pressing ------------------------------------------------------------------------------
def test_markers_stay_in_order_under_any_press(model):
    """<fake_token_around_image>, <row_i_col_j>, <global-img> and the newlines are text: the
    language model receives every text token of every row, in order, whatever a press drops."""
    batch = A.prompts(model, RAGGED)
    table = model.get_input_embeddings().weight
    seen = []
    with torch.no_grad(), NormPress(keep=2)(model):  # the hook after the press's: it sees the pressed input
        hook = model.model.text_model.register_forward_pre_hook(
            lambda m, a, kw: seen.append((kw["inputs_embeds"], kw["attention_mask"])), with_kwargs=True)
        try:
            model(**batch)
        finally:
            hook.remove()
    embeds, mask = seen[0]
    assert embeds.shape[1] < batch["input_ids"].shape[1]
    for i in range(len(RAGGED)):
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        rows = embeds[i][mask[i].bool()]
        match = (rows[:, None, :] == table[None]).all(dim=-1)  # (L', vocab): which rows are token embeddings
        text = [int(m.nonzero()[0]) for m in match if m.any()]
        assert text == ids[ids != IMAGE].tolist()
        assert int((~match.any(dim=1)).sum()) == 2 * len(RAGGED[i])  # keep=2: two tokens of each image


def oracle_logits(model, batch, press, positions):
    """Batch 1 by hand: the prompt's embeddings with the crops' features scattered in, each
    image's k tokens of highest norm taken over ALL its crops (tiles and global together), every
    text token kept; original position ids ("keep") or 0..L'-1 ("reindex")."""
    ids = batch["input_ids"]
    feats = crop_features(model, batch).flatten(0, 1)
    embeds = model.get_input_embeddings()(ids).masked_scatter((ids == IMAGE)[..., None], feats)
    where = (ids[0] == IMAGE).nonzero()[:, 0]
    keep = ids[0] != IMAGE
    start = 0
    for crops in image_crops(ids, IMAGE, n_tok(model))[0]:
        span = where[start : start + crops * n_tok(model)]
        norms = embeds[0, span].norm(dim=-1)
        keep[span[norms.topk(press.keep).indices]] = True
        start += crops * n_tok(model)
    pos = torch.arange(ids.shape[1])[keep] if positions == "keep" else torch.arange(int(keep.sum()))
    hidden = model.model.text_model(inputs_embeds=embeds[:, keep], position_ids=pos[None]).last_hidden_state
    return model.lm_head(hidden)


@pytest.mark.parametrize("positions", ["keep", "reindex"])
def test_pressed_forward_equals_hand_built_sequence(model, positions):
    """Two images of different tile layouts in one row: each is pressed whole (its budget taken
    over its tiles and global image together) and the language model sees the kept tokens, the
    markers and the text, at the chosen positions."""
    batch = A.prompts(model, [[(36, 144), (100, 60)]])
    press = NormPress(keep=7)
    with torch.no_grad():
        expected = oracle_logits(model, batch, press, positions)
        with press(model, positions=positions):
            got = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_ragged_batch_with_padding_crops_decodes_as_each_row_alone_under_beam_search(model):
    """Rows of 17, 5 + 9 and 13 crops (shorter rows padded with all-zero crops, which the model
    drops): generate encodes the crops once and repeats them per beam; a press needing the
    tower's signals (VisionZip) gets each image's own crops, so every row decodes as it does alone."""
    batch = A.prompts(model, RAGGED)
    press = mmpress.get_press("visionzip", keep_ratio=0.3)
    options = dict(max_new_tokens=3, min_new_tokens=3, num_beams=2, do_sample=False)
    with torch.no_grad(), press(model):
        tokens = model.generate(**batch, **options)[:, -3:]
        for i in range(len(RAGGED)):
            row = A.prompts(model, [RAGGED[i]], first_row=i)  # no padding, its own crops only
            assert torch.equal(row["pixel_values"][0], batch["pixel_values"][i, : row["pixel_values"].shape[1]])
            alone = model.generate(**row, **options)[:, -3:]
            assert torch.equal(tokens[i], alone[0])


# ---- signals: no [CLS], attention received, mapped through the pixel shuffle -----------------
def eager_reference(model, batch, monkeypatch):
    """Per real crop, from the tower run with eager attention (its probabilities and keys recorded
    where transformers computes them): the mean attention each patch receives over the crop's
    real queries and the heads, the head-mean keys, the same from one softmax over the
    heads-concatenated q / k, each averaged over the s x s patches of a token; and the
    connector's pixel-shuffled input."""
    vlm = model.model
    modeling = sys.modules[type(vlm.vision_model).__module__]
    target, calls = vlm.vision_model.encoder.layers[-1].self_attn, []
    eager = modeling.eager_attention_forward

    def recording(module, query, key, value, *args, **kwargs):
        out, weights = eager(module, query, key, value, *args, **kwargs)
        if module is target:
            calls.append((weights, query, key))
        return out, weights

    monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    monkeypatch.setattr(vlm.vision_model.config, "_attn_implementation", "eager")
    pixels, mask = batch["pixel_values"], batch["pixel_attention_mask"]
    real = pixels.flatten(0, 1).ne(0).flatten(1).any(dim=1)
    p = model.config.vision_config.patch_size
    valid = mask.flatten(0, 1)[real].unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)).gt(0).flatten(1)  # (N, S)
    out = vlm.vision_model(pixels.flatten(0, 1)[real], patch_attention_mask=valid.view(-1, *[int(valid.shape[1] ** 0.5)] * 2))
    (weights, q, k), = calls
    n, h, s, d = q.shape
    v = valid.float()
    received = (weights * v[:, None, :, None]).sum(dim=2).mean(dim=1) / v.sum(dim=1, keepdim=True)
    qc, kc = q.transpose(1, 2).reshape(n, s, h * d), k.transpose(1, 2).reshape(n, s, h * d)
    logits = (qc @ kc.transpose(1, 2)) * (h * d) ** -0.5 + torch.where(valid, 0.0, float("-inf"))[:, None, :]
    concat = (logits.softmax(dim=-1) * v[:, :, None]).sum(dim=1) / v.sum(dim=1, keepdim=True)
    sc, side = model.config.scale_factor, int(s**0.5)

    def pool(x):  # (N, S, ...) -> (N, S / sc^2, ...): the mean of each token's sc x sc patches
        t = side // sc
        return x.reshape(n, t, sc, t, sc, *x.shape[2:]).mean(dim=(2, 4)).reshape(n, t * t, *x.shape[2:])

    features = vlm.connector.pixel_shuffle(out.last_hidden_state, sc)
    return dict(cls_attn=pool(received), vision_keys=pool(k.mean(dim=1)), cls_attn_concat=pool(concat),
                vision_keys_concat=pool(kc), vision_features=features)


@pytest.mark.parametrize("model_type", TYPES)
def test_signals_equal_eager_attention_received(model_type, monkeypatch):
    """While the tower runs with SDPA, every image's signals equal eager attention's, crop by crop
    in the LM's token order (tiles, then the global image), the padding crops of shorter rows
    skipped; one crop has padded patches (pixel_attention_mask): masked as keys, left out of the
    mean over queries, exactly as the tower masks them."""
    model = A.build("tiny", model_type=model_type)
    batch = A.prompts(model, [[(36, 144)], [(144, 72)]])
    crop, p = model.config.vision_config.image_size, model.config.vision_config.patch_size
    batch["pixel_attention_mask"][0, 1, crop - 2 * p :] = 0  # the last two patch rows of a tile: padding
    press = ProbePress(keep=3)
    press.seen = []
    with torch.no_grad():
        with press(model):
            model(**batch)
        expected = eager_reference(model, batch, monkeypatch)
    assert len(press.seen) == 2  # two layouts: 5 and 9 crops
    start = 0
    for tokens, ctx in press.seen:
        crops = tokens.shape[1] // n_tok(model)
        for name, ref in expected.items():
            got = getattr(ctx, name)[0]
            torch.testing.assert_close(got, ref[start : start + crops].flatten(0, 1), atol=1e-5, rtol=1e-5,
                                       msg=lambda m, name=name: f"{name}: {m}")
        start += crops
    padded = expected["cls_attn"][1].view(3, 3)  # the padded tile: its last token row covers the padded patches
    assert padded[-1].max() < padded[:-1].min()


def test_received_by_crop_equals_the_full_masked_map():
    """Query chunks give the column means of the full softmax map, padded queries left out."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 2, 10, 4, generator=g, dtype=torch.float64).unbind(0)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, 7:] = False
    bias = torch.zeros(3, 1, 1, 10, dtype=torch.float64).masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = ((q @ k.transpose(-1, -2)) * 0.4 + bias).softmax(dim=-1)  # (N, H, S, S)
    expected = (probs * valid[:, None, :, None]).sum(dim=2).mean(dim=1) / valid.sum(dim=1, keepdim=True)
    for budget in (1, 13, 1 << 24):
        torch.testing.assert_close(received_by_crop(q, k, 0.4, bias, valid, budget=budget), expected)


def test_cls_presses_run_on_the_family():
    cls_presses = [name for name, cls in mmpress.PRESSES.items()
                   if {"cls_attn", "vision_keys"} & set(cls.needs) and "grid" not in cls.needs]
    assert cls_presses and all(A.runs(mmpress.PRESSES[name]) for name in cls_presses)
    assert "receives" in A.notes
    assert not A.runs(mmpress.PRESSES["uniform"])  # a split image's tokens form no 2-D grid
    assert set(A.model_types) == {"smolvlm", "idefics3"}


# ---- cost and shapes ----------------------------------------------------------------------
def test_prefill_flops_count_real_crops_only(model):
    """Tower and connector over the 44 real crops (not the 51 slots of the padded pixel_values):
    exactly what torch counts with eager attention; so is the whole prefill, but for the upper
    half of the LM's causal attention square, which eager computes and the count leaves out."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = A.prompts(model, RAGGED)
    eager = A.build("tiny", model_type=model.config.model_type, attn="eager")

    def counted(fn) -> int:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    flops = A.prefill_flops(eager.config, batch, batch["input_ids"].shape[1])
    assert flops.vision + flops.projector == counted(lambda: A.encode(eager, batch))
    v, t = eager.config.vision_config, eager.config.text_config
    (b, length), width = batch["input_ids"].shape, t.num_attention_heads * t.head_dim
    square = 2.0 * b * t.num_hidden_layers * width * length * (length - 1)  # eager's masked upper half
    # (transformers 5.18's language model adds a few thousand FLOPs torch counts, 7e-6 of it)
    assert flops.total + square == pytest.approx(counted(lambda: eager(**batch, logits_to_keep=1)), rel=1e-4)
    s = (v.image_size // v.patch_size) ** 2
    assert flops.projector == 2.0 * 44 * s * v.hidden_size * t.hidden_size  # s / scale^2 tokens of scale^2 C each
    assert flops.language == pytest.approx(language_flops(t, batch["input_ids"].shape[1], 3))


@pytest.mark.parametrize("model_type, tokens", [("smolvlm", 81), ("idefics3", 169)])
def test_real_shapes_keep_the_released_token_counts(model_type, tokens):
    """bench-cost's image (768 x 1536 px) is 2 x 4 tiles + the global image, each crop as many
    tokens as the released model's (SmolVLM2: 384 px / 14, shuffle 3; Idefics3: 364 px / 14, shuffle 2)."""
    crop = {"smolvlm": 384, "idefics3": 364}[model_type]
    assert tile_layout(*A.bench_media["image"], crop) == (2, 4)
    with torch.device("meta"):
        model = A.build("real", model_type=model_type)
    assert n_tok(model) == tokens and type(model).__name__.lower().startswith(model_type)
    with pytest.raises(ValueError, match="divisible by the pixel shuffle"):  # bench-cost --image-size 112
        A.build("tiny", model_type="smolvlm", image_size=112, patch_size=14)
