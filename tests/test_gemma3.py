"""Gemma 3: the bidirectional image-token masks (full and sliding-window layers) stay right after
pressing, in the prefill and in decoding; the [CLS]-free signals equal eager attention's; the
random model / prompt / FLOPs helpers the family matrix runs on."""

from __future__ import annotations

import sys

import pytest
import torch

import mmpress
import mmpress.models.gemma3  # noqa: F401  (registers the family)
from mmpress.flops import language_flops, transformer_flops
from mmpress.models.gemma3 import BOI, EOI, IMAGE_TOKEN, NEWLINES, Gemma3Adapter
from mmpress.models.lm import decoder_layers
from mmpress.models.vision import encoder_layers
from mmpress.presses.base import ScorerPress
from mmpress.registry import get_adapter

SINGLE, RAGGED = Gemma3Adapter.example_rows["single"], Gemma3Adapter.example_rows["ragged"]
SIZE = (64, 64)


@pytest.fixture(scope="module")
def model():
    return Gemma3Adapter.build("tiny")


@pytest.fixture(scope="module")
def windowed():
    """A sliding window of 40 tokens: shorter than the prompts, so the sliding layers' masks and
    caches depend on which tokens the sequence holds."""
    return Gemma3Adapter.build("tiny", window=40)


def batch_of(model, rows, seed=0):
    return Gemma3Adapter.prompts(model, rows, seed=seed)


class RecordingNorm(ScorerPress):
    """Keeps each image's ``keep`` tokens of largest norm and records the kept indices (G, k)."""

    name = "test-gemma-norm"

    def score(self, tokens, ctx):
        return tokens.norm(dim=-1)

    def compress(self, tokens, ctx, k):
        kept, index = super().compress(tokens, ctx, k)
        self.kept.append(index)
        return kept, index


def recording(keep):
    press = RecordingNorm(keep=keep)
    press.kept = []
    return press


def generate(model, inputs, steps=3, **extra):
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, **extra)
    return out.sequences[:, -steps:], torch.stack(out.logits, dim=1)


# ---- the hand-built reference: the unpressed model on the prompt without the dropped tokens -----
def kept_columns(batch, index):
    """(B, L) the columns a press kept: every valid text token and the kept image tokens
    (``index`` (images, k): kept indices within each image, images in prompt order)."""
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    keep = valid & (ids != IMAGE_TOKEN)
    n = index.shape[0]
    where = (ids == IMAGE_TOKEN).reshape(-1).nonzero()[:, 0].view(n, -1)  # each image's flat columns
    flat = keep.reshape(-1).clone()
    flat[where.gather(1, index)] = True
    return flat.view_as(keep)


def reference_inputs(model, batch, keep, positions, appended=None):
    """The kept columns of each row, re-padded on the left: embeddings scattered by hand,
    token_type_ids cut, the given position ids (B, L) cut; ``appended`` (B, s) text tokens after."""
    vlm = model.model
    ids = batch["input_ids"]
    embeds = vlm.get_input_embeddings()(ids)
    features = vlm.get_image_features(batch["pixel_values"]).pooler_output
    embeds = embeds.masked_scatter((ids == IMAGE_TOKEN)[..., None], features.reshape(-1, features.shape[-1]))
    counts = keep.sum(dim=1)
    width = int(counts.max())
    b = ids.shape[0]
    out_embeds = embeds.new_zeros(b, width, embeds.shape[-1])
    mask = torch.zeros(b, width, dtype=torch.long)
    types = torch.zeros(b, width, dtype=torch.long)
    pos = torch.ones(b, width, dtype=torch.long)
    for r in range(b):
        cols = keep[r].nonzero()[:, 0]
        n = cols.numel()
        out_embeds[r, width - n:] = embeds[r, cols]
        mask[r, width - n:] = 1
        types[r, width - n:] = batch["token_type_ids"][r, cols]
        pos[r, width - n:] = positions[r, cols]
    if appended is not None and appended.shape[1]:
        s = appended.shape[1]
        out_embeds = torch.cat([out_embeds, vlm.get_input_embeddings()(appended)], dim=1)
        mask = torch.cat([mask, torch.ones(b, s, dtype=torch.long)], dim=1)
        types = torch.cat([types, torch.zeros(b, s, dtype=torch.long)], dim=1)
        pos = torch.cat([pos, pos[:, width - 1 : width] + 1 + torch.arange(s)], dim=1)
    return {"inputs_embeds": out_embeds, "attention_mask": mask, "token_type_ids": types, "position_ids": pos}


def renumbered(keep):
    return (keep.long().cumsum(dim=1) - 1).clamp(min=0)


@pytest.mark.parametrize("rows", [SINGLE, RAGGED], ids=["single", "ragged"])
@pytest.mark.parametrize("press", ["none", "norm-all"])
def test_keep_all_reproduces_unpressed(model, rows, press):
    """Keep-all (the "none" press, and a press keeping every token) gives the unpressed logits and
    generate scores bit for bit: the masks are rebuilt by Gemma 3's functions on the same inputs."""
    batch = batch_of(model, rows)
    press = mmpress.get_press("none") if press == "none" else recording(model.config.mm_tokens_per_image)
    with torch.no_grad():
        reference, (ref_tokens, ref_scores) = model(**batch).logits, generate(model, batch)
        with press(model):
            assert torch.equal(model(**batch).logits, reference)
            tokens, scores = generate(model, batch)
    assert torch.equal(tokens, ref_tokens) and torch.equal(scores, ref_scores)


@pytest.mark.parametrize("positions", ["keep", "reindex"])
@pytest.mark.parametrize("fixture", ["model", "windowed"])
def test_pressed_forward_and_decoding_match_hand_built_sequence(request, fixture, positions):
    """A ragged batch (rows of 1 and 2 images): the pressed forward and every greedy decoding step
    equal the unpressed model run on the prompt without the dropped tokens (embeddings scattered by
    hand, token_type_ids cut, the original or renumbered position ids), with Gemma 3's own masks:
    kept image tokens attend bidirectionally within their image, sliding layers see a window of the
    kept sequence (``windowed``: 40 tokens, shorter than the prompts), and decoding continues the
    shorter cache."""
    model = request.getfixturevalue(fixture)
    batch = batch_of(model, RAGGED)
    press = recording(keep=21)
    with torch.no_grad():
        with press(model, positions=positions):
            got = model(**batch).logits
            tokens, scores = generate(model, batch)
        index = press.kept[0]
        keep = kept_columns(batch, index)
        mask = batch["attention_mask"]
        forward_pos = torch.arange(mask.shape[1]).expand_as(mask)  # forward numbers from column 0
        generate_pos = (mask.cumsum(dim=1) - 1).clamp(min=0)  # generate from each row's first token
        if positions == "reindex":
            forward_pos = generate_pos = renumbered(keep)
        ref = reference_inputs(model, batch, keep, forward_pos)
        expected = model(**ref).logits
        valid = ref["attention_mask"].bool()  # rows right-aligned: the pressed batch may keep more padding
        torch.testing.assert_close(got[:, -valid.shape[1]:][valid], expected[valid], atol=1e-5, rtol=1e-5)
        ref = reference_inputs(model, batch, keep, generate_pos, appended=tokens)
        expected = model(**ref).logits
        width = keep.sum(dim=1).max()
        for step in range(tokens.shape[1]):
            torch.testing.assert_close(scores[:, step], expected[:, width - 1 + step], atol=1e-4, rtol=1e-4)


def test_masks_keep_kept_image_tokens_bidirectional(windowed):
    """What the pressed call's layers receive: on full-attention layers, query i sees key j iff j is
    valid and (j <= i, or i and j are kept tokens of the same image); sliding layers additionally
    i - j < window, counted over the pressed sequence."""
    model, seen = windowed, {}
    batch = batch_of(model, RAGGED)
    press = recording(keep=21)
    layers = decoder_layers(model.model.language_model)
    kinds = model.config.text_config.layer_types
    hooks = [layers[kinds.index(kind)].register_forward_pre_hook(
        lambda m, a, kw, kind=kind: [seen.setdefault(kind, kw["attention_mask"]), None][1], with_kwargs=True)
        for kind in ("sliding_attention", "full_attention")]
    try:
        with torch.no_grad(), press(model):
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    keep = kept_columns(batch, press.kept[0])
    ref = reference_inputs(model, batch, keep, renumbered(keep))
    valid, types = ref["attention_mask"].bool(), ref["token_type_ids"]
    image = (types == 1) & ~torch.nn.functional.pad(types == 1, (1, 0))[:, :-1]  # an image's first token
    block = torch.where(types == 1, image.cumsum(dim=1), -1)
    w = valid.shape[1]
    i, j = torch.arange(w)[:, None], torch.arange(w)[None, :]
    same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    full = ((j <= i) | same) & valid[:, None, :]
    sliding = full & (i - j < model.config.text_config.sliding_window)
    for kind, expected in (("full_attention", full), ("sliding_attention", sliding)):
        got = seen[kind][:, 0, -w:, -w:]  # rows right-aligned: the pressed batch may keep more padding
        assert torch.equal(got[valid], expected[valid]), kind
    assert same.any() and (same & (j > i)).any()  # kept image tokens see later ones of their image


# ---- in-LLM presses: per-layer oracle on the unpressed masks ------------------------------------
def in_llm_oracle(model, batch, pre, appended):
    """Unpressed forward over prompt + ``appended`` where each layer keeps Gemma 3's own mask for it
    and, from each cut's layer on, its queries see only the prompt columns that cut kept."""
    full = {**batch}
    s = appended.shape[1]
    for name, pad in (("input_ids", appended), ("attention_mask", torch.ones_like(appended)),
                      ("token_type_ids", torch.zeros_like(appended))):
        full[name] = torch.cat([batch[name], pad], dim=1)
    mask = full["attention_mask"]
    full["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    length = batch["input_ids"].shape[1]

    def hook(cut):
        kept = torch.zeros(cut.cols.shape[0], length, dtype=torch.bool).scatter_(1, cut.cols, cut.valid)
        kept = torch.cat([kept, torch.ones(kept.shape[0], s, dtype=torch.bool)], dim=1)

        def restrict(module, args, kwargs):
            allowed = kwargs["attention_mask"] & kept[:, None, None, :]
            allowed = allowed | (~allowed.any(-1, keepdim=True) & torch.eye(allowed.shape[-1], dtype=torch.bool))
            return args, {**kwargs, "attention_mask": allowed}
        return restrict

    layers = decoder_layers(model.model.language_model)
    handles = []
    for i, layer in enumerate(layers):  # from each cut's layer on, the prompt keys are that cut's columns
        cut = next((c for c in reversed(pre.cuts) if c.start <= i), None)
        if cut is not None:
            handles.append(layer.register_forward_pre_hook(hook(cut), with_kwargs=True))
    try:
        return model(**full).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name", ["fastv", "pdrop"])
def test_in_llm_press_forward_and_decoding_match_oracle(model, name):
    """FastV / PyramidDrop (original position ids) on a ragged batch: the decoding steps equal the
    unpressed model where the layers from the cut on see only the kept prompt columns, every layer
    with its own mask (bidirectional image blocks, sliding window) and its own RoPE base."""
    batch = batch_of(model, RAGGED)
    options = {"keep_ratio": 0.5} if name == "fastv" else {"positions": "keep", "stages": (1, 2)}
    press = mmpress.get_press(name, **options)
    adapter = get_adapter(model)
    with torch.no_grad():
        with adapter.apply(press):
            out = model(**batch, use_cache=True)
            pre = adapter.pressed.get(out.past_key_values)
        with press(model):
            tokens, scores = generate(model, batch)
        expected = in_llm_oracle(model, batch, pre, tokens)
    assert pre is not None and pre.cuts
    width = batch["input_ids"].shape[1]
    for step in range(tokens.shape[1]):
        torch.testing.assert_close(scores[:, step], expected[:, width - 1 + step], atol=1e-4, rtol=1e-4)


def accepted(model, press) -> bool:
    """Whether the adapter runs ``press`` on Gemma 3 (KV presses and in-LLM renumbering wait for a
    core change: the KV stage compacting sliding-window cache layers, the in-LLM stage passing each
    layer's type to Gemma 3's rotary embedding)."""
    try:
        get_adapter(model).check_stages({press.stage: press})
    except ValueError:
        return False
    return True


def test_refusals_name_the_fix(model):
    batch = batch_of(model, SINGLE)
    if not accepted(model, mmpress.get_press("pdrop", stages=(1, 2))):
        with pytest.raises(ValueError, match="positions='keep'"):  # PyramidDrop's official renumbering
            with mmpress.get_press("pdrop", stages=(1, 2))(model):
                model(**batch)
    if not accepted(model, mmpress.get_press("snapkv", keep_ratio=0.5)):
        with pytest.raises(ValueError, match="DynamicSlidingWindowLayer"):
            with mmpress.get_press("snapkv", keep_ratio=0.5)(model):
                model(**batch)
    prepared = {"full_attention": None, "sliding_attention": None}
    with pytest.raises(ValueError, match="2-D attention mask"):
        with mmpress.get_press("random", keep_ratio=0.5)(model):
            model(**{**batch, "attention_mask": prepared})


def test_in_llm_press_refuses_a_conversation_past_the_sliding_window(windowed):
    """A prompt longer than the window, and decoding that grows past it, raise (the sliding layers'
    caches would drop entries the cut masks still index)."""
    batch = batch_of(windowed, SINGLE)
    with pytest.raises(ValueError, match="sliding window"):
        with torch.no_grad(), mmpress.get_press("fastv", keep_ratio=0.5)(windowed):
            windowed(**batch)
    length = batch["input_ids"].shape[1]
    model = Gemma3Adapter.build("tiny", window=length + 2)
    with torch.no_grad(), mmpress.get_press("fastv", keep_ratio=0.5)(model):
        generate(model, batch, steps=1)  # the prompt and its first token fit
        with pytest.raises(ValueError, match="sliding window"):
            generate(model, batch, steps=4)


def test_kv_press_decoding_matches_oracle(model):
    """SnapKV on a ragged batch: every layer (sliding and full) keeps the same entries per row, and
    each decoding step equals the unpressed model whose new tokens see only the kept prompt entries
    (found by matching the pressed cache's keys with the unpressed prefill's), every layer with its
    own mask."""
    press = mmpress.get_press("snapkv", keep_ratio=0.5)
    if not accepted(model, press):
        pytest.skip("KV presses on Gemma 3 wait for the core's KV stage to compact sliding-window cache layers")
    batch = batch_of(model, RAGGED)
    heads = model.config.text_config.num_attention_heads
    with torch.no_grad():
        with press(model):
            cache = model(**batch, use_cache=True).past_key_values
            tokens, scores = generate(model, batch)
        full = model(**batch, use_cache=True).past_key_values
        kept = []
        for layer, ref in zip(cache.layers, full.layers):
            same = (layer.keys[:, :, :, None, :] == ref.keys[:, :, None, :, :]).all(-1).any(2)  # (B, Hkv, L)
            kept.append(same.repeat_interleave(heads // same.shape[1], dim=1))
        length, s = batch["input_ids"].shape[1], tokens.shape[1]
        inputs = {name: torch.cat([batch[name], pad], dim=1) for name, pad in (
            ("input_ids", tokens), ("attention_mask", torch.ones_like(tokens)), ("token_type_ids", torch.zeros_like(tokens)))}
        mask = inputs["attention_mask"]
        inputs |= {"pixel_values": batch["pixel_values"], "position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)}

        def restrict(i):
            def hook(module, args, kwargs):
                allowed = kwargs["attention_mask"].expand(-1, heads, -1, -1).clone()
                allowed[:, :, length:] &= torch.cat([kept[i], torch.ones(mask.shape[0], heads, s, dtype=torch.bool)],
                                                    dim=-1)[:, :, None, :]
                return args, {**kwargs, "attention_mask": allowed}
            return hook

        layers = decoder_layers(model.model.language_model)
        handles = [layer.register_forward_pre_hook(restrict(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            expected = model(**inputs).logits
        finally:
            for h in handles:
                h.remove()
    assert all(layer.keys.shape[-2] < length for layer in cache.layers)
    for step in range(s):
        torch.testing.assert_close(scores[:, step], expected[:, length - 1 + step], atol=1e-4, rtol=1e-4)


def test_in_llm_renumbering_rotates_each_layer_by_its_type(model):
    """PyramidDrop's official renumbering: every layer, at the prefill and each decoding step,
    gets the rotary embedding of its own type (local / global base) at the ids it runs on."""
    press = mmpress.get_press("pdrop", stages=(1, 2))
    if not accepted(model, press):
        pytest.skip("in-LLM renumbering on Gemma 3 waits for the core's in-LLM stage to pass the layer type")
    lm = model.model.language_model
    types, checked = lm.config.layer_types, []

    def check(i):
        def hook(module, args, kwargs):
            x, pos = args[0] if args else kwargs["hidden_states"], kwargs["position_ids"]
            want = lm.rotary_emb(x, pos.expand(x.shape[0], -1), types[i])
            checked.append(all(torch.allclose(a.expand_as(b), b) for a, b in zip(kwargs["position_embeddings"], want)))
        return hook

    with torch.no_grad(), press(model):
        handles = [layer.register_forward_pre_hook(check(i), with_kwargs=True)
                   for i, layer in enumerate(decoder_layers(lm))]
        try:
            generate(model, batch_of(model, RAGGED))
        finally:
            for h in handles:
                h.remove()
    assert len(checked) == 3 * len(types) and all(checked)


# ---- every press, ragged rows, beams ----------------------------------------------------------
@pytest.mark.parametrize("name", [p for p in [p for p in mmpress.list_presses("pre_llm") if Gemma3Adapter.runs(mmpress.PRESSES[p])] if p != "none"])
def test_every_pre_llm_press_forward_and_generate(model, name):
    batch = batch_of(model, RAGGED)
    try:
        press = mmpress.get_press(name, keep_ratio=0.5)
    except ValueError:
        press = mmpress.get_press(name)
    with torch.no_grad(), press(model) as run:
        logits = model(**batch).logits
        _, scores = generate(model, batch, steps=2)
    assert run.stats.kept_visual_tokens < run.stats.visual_tokens
    assert torch.isfinite(logits).all() and torch.isfinite(scores).all()


def test_ragged_batch_equals_each_row_alone(model):
    batch = batch_of(model, RAGGED)
    press = mmpress.get_press("visionzip", keep_ratio=0.5)
    with torch.no_grad(), press(model):
        logits = model(**batch).logits
        tokens, _ = generate(model, batch)
        for i, row in enumerate(RAGGED):
            alone = Gemma3Adapter.prompts(model, [row], first_row=i)
            row_logits = model(**alone).logits
            torch.testing.assert_close(logits[i, -1], row_logits[0, -1], atol=1e-4, rtol=1e-4)
            row_tokens, _ = generate(model, alone)
            assert torch.equal(tokens[i], row_tokens[0])


def test_beam_search_repeats_encoded_images(model):
    """generate encodes each image once and repeats it per beam: each beam presses its row's images."""
    batch = batch_of(model, RAGGED)
    press = mmpress.get_press("visionzip", keep_ratio=0.5)
    with torch.no_grad(), press(model):
        beams = model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)
        alone = [model.generate(**Gemma3Adapter.prompts(model, [row], first_row=i), max_new_tokens=3, num_beams=2,
                                do_sample=False) for i, row in enumerate(RAGGED)]
    for i, row in enumerate(alone):
        assert torch.equal(beams[i, -3:], row[0, -3:])


# ---- signals ------------------------------------------------------------------------------------
class Probe(ScorerPress):
    name = "test-gemma-probe"
    needs = ("cls_attn", "vision_keys", "cls_attn_concat", "vision_keys_concat", "vision_features")

    def score(self, tokens, ctx):
        self.seen = ctx
        return ctx.cls_attn


def pooled(model, x):
    """(N, P*P, ...) -> (N, T, ...) averaged over the projector's pooling windows."""
    projector = model.model.multi_modal_projector
    p, k = projector.patches_per_image, projector.kernel_size
    n = x.shape[0]
    return x.reshape(n, p // k, k, p // k, k, -1).mean(dim=(2, 4)).reshape(n, (p // k) ** 2, *x.shape[2:])


def test_signals_equal_eager_attention_received(model, monkeypatch):
    """cls_attn: eager attention's mean attention received in the last SigLIP block (over queries
    and heads), averaged over each 4 x 4 pooling window; vision_keys: its keys (head-averaged,
    window-averaged); *_concat: one softmax over the heads-concatenated q / k scaled by C^-1/2;
    vision_features: the pooled tower output the projector maps."""
    batch = batch_of(model, [[SIZE, SIZE]])
    press = Probe(keep=8)
    with torch.no_grad():
        with press(model):
            model(**batch)
        tower = model.model.vision_tower
        monkeypatch.setattr(tower.config, "_attn_implementation", "eager")
        captured = {}
        attn = encoder_layers(tower)[-1].self_attn
        handles = [attn.q_proj.register_forward_hook(lambda m, a, o: captured.__setitem__("q", o)),
                   attn.k_proj.register_forward_hook(lambda m, a, o: captured.__setitem__("k", o))]
        try:
            out = tower(pixel_values=batch["pixel_values"], output_attentions=True)
        finally:
            for h in handles:
                h.remove()
    ctx = press.seen
    received = out.attentions[-1].mean(dim=1).mean(dim=1)  # (N, S): heads, then queries
    torch.testing.assert_close(ctx.cls_attn, pooled(model, received), atol=1e-6, rtol=1e-5)
    n, s, c = captured["k"].shape
    heads = attn.num_heads
    torch.testing.assert_close(ctx.vision_keys, pooled(model, captured["k"].view(n, s, heads, -1).mean(dim=2)),
                               atol=1e-6, rtol=1e-5)
    concat = (captured["q"] @ captured["k"].transpose(1, 2) * c**-0.5).softmax(dim=-1).mean(dim=1)
    torch.testing.assert_close(ctx.cls_attn_concat, pooled(model, concat), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ctx.vision_keys_concat, pooled(model, captured["k"]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ctx.vision_features, pooled(model, out.last_hidden_state), atol=1e-6, rtol=1e-5)
    assert torch.allclose(ctx.cls_attn.sum(dim=1) * 16, torch.ones(2))  # window means of a distribution


# ---- shapes and cost ------------------------------------------------------------------------------
def test_prompts_lay_out_images_as_the_processor():
    model = Gemma3Adapter.build("tiny")
    batch = batch_of(model, RAGGED)
    n = model.config.mm_tokens_per_image
    for r, row in enumerate(RAGGED):
        ids = batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()
        image = [NEWLINES, BOI, *[IMAGE_TOKEN] * n, EOI, NEWLINES]
        starts = [i for i in range(len(ids)) if ids[i : i + len(image)] == image]
        assert len(starts) == len(row)
    assert torch.equal(batch["token_type_ids"], (batch["input_ids"] == IMAGE_TOKEN).long())
    assert batch["pixel_values"].shape == (4, 3, *SIZE)
    alone = Gemma3Adapter.prompts(model, [RAGGED[1]], first_row=1)
    assert torch.equal(alone["pixel_values"], batch["pixel_values"][1:3])


def tiny_processor(model):
    """Gemma3Processor over a word-level tokenizer of the tiny model's ids and a 64 px image processor."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<image_soft_token>", "<start_of_image>", "<end_of_image>", "\n\n"]
    assert [specials.index(t) for t in ("<image_soft_token>", "<start_of_image>", "<end_of_image>", "\n\n")] == \
        [IMAGE_TOKEN, BOI, EOI, NEWLINES]
    vocab = {t: i for i, t in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), 64)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", extra_special_tokens={
                                            "image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                            "eoi_token": "<end_of_image>"})
    size = model.config.vision_config.image_size
    images = Gemma3ImageProcessorPil(size={"height": size, "width": size})
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=model.config.mm_tokens_per_image)


def test_prompts_equal_the_processor(model):
    """prompts() lays a ragged batch out as Gemma3Processor does (its text with one
    <start_of_image> per image, left padding): the same ids, mask and token_type_ids."""
    from PIL import Image

    batch = batch_of(model, RAGGED)
    n = model.config.mm_tokens_per_image
    texts = []
    for r in range(len(RAGGED)):  # each row's text, every expanded image written back as <start_of_image>
        ids, words, i = batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist(), [], 0
        while i < len(ids):
            image = ids[i] == NEWLINES and ids[i + 1] == BOI
            words.append("<start_of_image>" if image else "<bos>" if ids[i] == 2 else f"w{ids[i]}")
            i += n + 4 if image else 1
        texts.append(" ".join(words))
    images = [[Image.new("RGB", SIZE)] * len(row) for row in RAGGED]
    out = tiny_processor(model)(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt",
                                add_special_tokens=False)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(out[name], batch[name]), name
    assert out["pixel_values"].shape == batch["pixel_values"].shape


def test_prefill_flops_hand_count(model):
    batch = batch_of(model, RAGGED)
    config = model.config
    got = Gemma3Adapter.prefill_flops(config, batch, seq_len=100)
    v, t = config.vision_config, config.text_config
    patches = (v.image_size // v.patch_size) ** 2
    layer = 2 * patches * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) + 4 * patches**2 * v.hidden_size
    assert got.vision == pytest.approx(4 * v.num_hidden_layers * layer)
    assert got.vision == pytest.approx(transformer_flops(v, patches, batch=4))
    assert got.projector == 2.0 * 4 * config.mm_tokens_per_image * v.hidden_size * t.hidden_size
    assert got.language == language_flops(t, 100, 3)


def test_real_shape_is_the_released_tower_resolution():
    from transformers import Gemma3Config

    config = Gemma3Config(vision_config=dict(image_size=896, patch_size=14), mm_tokens_per_image=256)
    assert (config.vision_config.image_size // config.vision_config.patch_size) ** 2 // 16 == 256
    module = sys.modules[Gemma3Adapter.__module__]
    assert "896" in module.Gemma3Adapter.build.__doc__
