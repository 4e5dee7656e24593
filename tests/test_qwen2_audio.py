"""Qwen2-Audio: one item per audio clip, its token count from ``feature_attention_mask`` as
transformers counts it, the audio signals (the encoder's features as the projector receives them,
the log-mel energy of each token's frames), 1-D positions kept or re-indexed, presses needing a
patch grid or [CLS] refused, bad input refused; the cost model against torch's FLOP counter.
Tiny random configs (no downloads); the family matrix (tests/test_families.py) runs every press."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mmpress
from mmpress.eval.cost import prefill_flops
from mmpress.eval.prefill import encode_visuals, run_prefill, shaped
from mmpress.models.qwen2_audio import (AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, Qwen2AudioAdapter as A, audio_tokens,
                                        clip_frames, token_energy)
from mmpress.presses.base import ScorerPress
from mmpress.registry import get_adapter

RAGGED = A.example_rows["ragged"]  # 16 | 12 + 9 | 13 tokens | text only
SAME = [[(0.48,)], [(0.36,), (0.48,)]]  # two 12-token clips in different rows: one group, sources 0 and 2


@dataclass
class NormPress(ScorerPress):
    name = "test-norm"

    def score(self, tokens, ctx):
        return tokens.norm(dim=-1)


SEEN: list = []


@dataclass
class RecordPress(ScorerPress):
    """Records the audio signals each group gets; keeps the loudest tokens."""

    name = "test-record"
    needs = ("audio_features", "audio_energy")

    def score(self, tokens, ctx):
        SEEN.append(ctx)
        return ctx.require("audio_energy")


@pytest.fixture(scope="module")
def model():
    return A.build("tiny")


def lm_inputs(model, batch) -> dict:
    """The language model's call in an unpressed forward."""
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen


# ---- where the audio tokens are --------------------------------------------------------------
def test_token_counts_are_transformers_own(model):
    """Tokens per clip of L real frames: exactly ``_get_feat_extract_output_lengths`` (the
    ``audio_output_lengths`` the forward scatters, the processor's expansion), every L of 30 s."""
    frames = torch.arange(3001)
    _, expected = model.model.audio_tower._get_feat_extract_output_lengths(frames)
    assert [audio_tokens(n) for n in frames.tolist()] == expected.tolist()
    assert audio_tokens(3000) == 750


@pytest.mark.parametrize("seconds", [0.01, 0.36, 0.5, 1.2345, 29.99, 30.0])
def test_clip_frames_and_silence_floor_are_whisper_feature_extractors(seconds):
    """``clip_frames`` is the feature extractor's real-frame count (as Qwen2AudioProcessor calls it:
    padded to 30 s, its sample mask read every hop), and its padding sits at the clip's loudest
    value less 2 (what ``prompts`` pads with)."""
    from transformers import WhisperFeatureExtractor

    samples = round(seconds * 16000)
    wave = np.random.default_rng(0).standard_normal(samples).astype(np.float32) * 0.1
    out = WhisperFeatureExtractor(feature_size=8)(wave, sampling_rate=16000, padding="max_length",
                                                   return_attention_mask=True, return_tensors="pt")
    features, mask = out["input_features"], out["attention_mask"]
    assert int(mask.sum()) == clip_frames(seconds)
    if clip_frames(seconds) + 2 < 3000:  # the STFT window of the first padded frames still holds sound
        silence = features[0, :, clip_frames(seconds) + 2:]
        torch.testing.assert_close(silence, (features.max() - 2).expand_as(silence))


def test_prompts_lay_clips_out_as_the_processor(model):
    batch = A.prompts(model, RAGGED)
    frames = batch["feature_attention_mask"].sum(-1).tolist()
    assert frames == [64, 48, 36, 52] and batch["input_features"].shape == (4, 8, 64)
    assert (batch["input_ids"] == AUDIO_TOKEN).sum(-1).tolist() == [16, 12 + 9, 13, 0]
    for i in range(len(RAGGED)):  # a row alone is the batch's row
        one, valid = A.prompts(model, [RAGGED[i]], first_row=i), batch["attention_mask"][i].bool()
        assert torch.equal(one["input_ids"][0], batch["input_ids"][i][valid])
    second = A.prompts(model, [RAGGED[1]], first_row=1)
    assert torch.equal(second["input_features"], batch["input_features"][1:3])
    with pytest.raises(ValueError, match="up to 0.64 s"):
        A.prompts(model, [[(0.65,)]])
    with pytest.raises(ValueError, match="audio clips only"):
        A.prompts(model, RAGGED, kind="image")


def tiny_processor():
    """Qwen2AudioProcessor over a word-level tokenizer whose audio tokens have the tiny model's ids,
    and Whisper's feature extractor with the tiny model's 8 mel bins (30 s: 3000 frames)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2AudioProcessor, WhisperFeatureExtractor

    specials = ["<pad>", "<s>", "</s>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    assert (vocab["<|AUDIO|>"], vocab["<|audio_bos|>"], vocab["<|audio_eos|>"]) == (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)
    vocab |= {f"w{i}": i for i in range(len(vocab), 64)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        padding_side="left", extra_special_tokens={
                                            "audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>",
                                            "audio_eos_token": "<|audio_eos|>"})
    return Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=8), tokenizer=tokenizer)


def test_the_processors_batch_is_pressed_row_by_row():
    """What Qwen2AudioProcessor makes (clips padded to 30 s, an int32 feature mask, each
    placeholder expanded as ``audio_tokens`` counts, left-padded rows) is laid out as ``prompts``
    does, keep-all is exact, and each pressed row gives its logits alone."""
    processor, model = tiny_processor(), A.build("tiny", source_positions=1500)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (5760, 8000)]  # 0.36 s, 0.5 s
    texts = ["w10 <|audio_bos|><|AUDIO|><|audio_eos|> w11 w12", "w13 <|audio_bos|><|AUDIO|><|audio_eos|> w14"]
    call = dict(sampling_rate=16000, return_tensors="pt", padding=True)
    batch = processor(text=texts, audio=clips, **call)
    assert batch["input_features"].shape == (2, 8, 3000)
    assert batch["input_ids"][1].tolist() == [13, AUDIO_BOS, *[AUDIO_TOKEN] * audio_tokens(50), AUDIO_EOS, 14]
    assert batch["feature_attention_mask"].sum(-1).tolist() == [clip_frames(0.36), clip_frames(0.5)]
    press = mmpress.get_press("divprune", keep=4)
    with torch.no_grad():
        reference = model(**batch).logits
        with NormPress(keep_ratio=1.0)(model):
            assert torch.equal(model(**batch).logits, reference)
        own = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # each row from its first token
        with press(model) as run:
            logits = model(**batch, position_ids=own).logits
        assert run.stats.kept_visual_tokens == 8 and run.stats.visual_tokens == audio_tokens(36) + audio_tokens(50)
        for i in range(2):
            with press(model):
                alone = model(**processor(text=texts[i:i + 1], audio=clips[i:i + 1], **call)).logits
            torch.testing.assert_close(logits[i, -1], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_items_are_clips_in_placeholder_order(model):
    batch = A.prompts(model, RAGGED)
    with torch.no_grad(), NormPress(keep_ratio=0.5)(model) as run:
        adapter = get_adapter(model)
        items = adapter.visual_items((), batch)
        model(**batch)
    assert [(i.length, i.source, i.kind, i.grid) for i in items] == [(16, 0, "audio", None), (12, 1, "audio", None),
                                                                      (9, 2, "audio", None), (13, 3, "audio", None)]
    assert run.stats.kinds == {"audio": 4} and run.stats.visual_tokens == 50
    assert run.stats.kept_visual_tokens == 8 + 6 + 5 + 7


# ---- signals ----------------------------------------------------------------------------------
def energy_by_loop(features: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Token j of a clip: the mel-bin mean of its real frames among 4j .. 4j + 3, averaged."""
    per_frame = features.double().mean(dim=0)
    out = []
    for j in range(n):
        frames = [t for t in range(4 * j, 4 * j + 4) if t < mask.shape[0] and mask[t]]
        out.append(per_frame[frames].mean())
    return torch.stack(out)


@pytest.mark.parametrize("rows", [RAGGED, SAME])
def test_audio_signals_are_the_projector_input_and_each_tokens_energy(model, rows):
    """Each group's ``audio_features`` projected are the LM's input at its clips' placeholders (and
    ``vision_features`` is the same tensor); ``audio_energy`` is the loop re-implementation's."""
    batch = A.prompts(model, rows)
    embeds = lm_inputs(model, batch)["inputs_embeds"]
    SEEN.clear()
    with torch.no_grad(), RecordPress(keep_ratio=0.5)(model):
        model(**batch)
    clips = [(row, j) for row, media in enumerate(rows) for j in range(len(media))]
    lengths = [audio_tokens(clip_frames(rows[r][j][0])) for r, j in clips]
    groups = {}
    for source, n in enumerate(lengths):
        groups.setdefault(n, []).append(source)
    assert sorted(ctx.audio_energy.shape for ctx in SEEN) == sorted((len(g), n) for n, g in groups.items())
    audio = batch["input_ids"] == AUDIO_TOKEN
    per_clip = embeds[audio].split(lengths)  # placeholder order is clip order
    for ctx in SEEN:
        n = ctx.audio_energy.shape[1]
        assert ctx.kind == "audio" and ctx.vision_features is ctx.audio_features
        for m, source in enumerate(groups[n]):
            projected = model.model.multi_modal_projector(ctx.audio_features[m])
            torch.testing.assert_close(projected, per_clip[source], atol=1e-6, rtol=1e-6)
            expected = energy_by_loop(batch["input_features"][source], batch["feature_attention_mask"][source], n)
            torch.testing.assert_close(ctx.audio_energy[m].double(), expected, atol=1e-6, rtol=1e-6)


@dataclass
class AttnRecordPress(ScorerPress):
    name = "test-record-attn"
    needs = ("audio_attn",)

    def score(self, tokens, ctx):
        SEEN.append(ctx)
        return ctx.require("audio_attn")[:, 1].diagonal(dim1=-2, dim2=-1)


@pytest.mark.parametrize("rows", [RAGGED, SAME])
def test_audio_attn_is_the_official_pooling_of_the_eager_attention(rows):
    """``audio_attn`` against SA-MAP's own computation on an eager model: the last encoder layer's
    ``output_attentions`` weights under the padding mask Qwen2AudioModel builds (its real frames
    as keys), ``attn.max(0)`` / ``attn.mean(0)`` over heads, ``reshape(N, 2, N, 2).mean(1).sum(-1)``
    over the whole padded window, cut to the clip's tokens."""
    torch.manual_seed(0)
    eager = A.build("tiny", attn="eager")
    batch = A.prompts(eager, rows)
    weights = {}
    layer = eager.model.audio_tower.layers[-1].self_attn
    handle = layer.register_forward_hook(lambda m, a, out: weights.update(w=out[1]))
    try:
        with torch.no_grad():
            eager(**batch, output_attentions=True)
    finally:
        handle.remove()
    w = weights["w"].double()  # (clips, heads, frames, frames), padded keys at 0
    half = w.shape[-1] // 2
    official = [torch.stack([w[c].amax(dim=0), w[c].mean(dim=0)]).reshape(2, half, 2, half, 2).mean(2).sum(-1)
                for c in range(w.shape[0])]
    SEEN.clear()
    with torch.no_grad(), AttnRecordPress(keep_ratio=0.5)(eager):
        eager(**batch)
    clips = [(row, j) for row, media in enumerate(rows) for j in range(len(media))]
    lengths = [audio_tokens(clip_frames(rows[r][j][0])) for r, j in clips]
    seen = 0
    for ctx in SEEN:
        n = ctx.audio_attn.shape[-1]
        sources = [s for s, length in enumerate(lengths) if length == n]
        assert ctx.audio_attn.shape == (len(sources), 2, n, n)
        for m, source in enumerate(sources):
            torch.testing.assert_close(ctx.audio_attn[m].double(), official[source][:, :n, :n], atol=1e-5, rtol=1e-5)
            seen += 1
    assert seen == len(lengths)


def test_audio_energy_marks_silence_lowest():
    """Frames at the feature extractor's silence floor give the lowest energy; a token whose
    frames run past the clip's end averages only its real frames."""
    features = torch.randn(2, 8, 16)
    mask = torch.ones(2, 16, dtype=torch.long)
    floor = features[0].max() - 2
    features[0] = features[0].clamp(min=floor)  # Whisper's dynamic range: 8 (2 after rescaling) below the loudest
    features[0, :, 8:] = floor
    mask[1, 13:] = 0  # 13 real frames: 3 tokens, the third of frames 8 .. 11, the fourth of 12 only (dropped)
    energy = token_energy(features, mask)
    torch.testing.assert_close(energy[0, 2:], floor.expand(2))
    assert energy[0, :2].min() > floor
    torch.testing.assert_close(energy[1, 3], features[1, :, 12].mean())
    assert audio_tokens(13) == 3


def test_keep_the_loudest_tokens(model):
    """A clip whose second half is silence (the extractor's floor): an energy press keeps its first half."""
    batch = A.prompts(model, [[(0.64,)]])
    features = batch["input_features"]
    features[0, :, 32:] = features[0].max() - 2
    SEEN.clear()
    with torch.no_grad(), RecordPress(keep=8)(model) as run:
        model(**batch)
    assert run.stats.kept_visual_tokens == 8
    assert set(SEEN[0].audio_energy[0].topk(8).indices.tolist()) == set(range(8))


# ---- positions --------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["reindex", "keep"])
def test_pressed_forward_is_the_language_model_on_the_kept_tokens(model, positions):
    """One row of two clips (two groups): the pressed logits are the LM run on the unpressed input
    embeddings at the kept columns (text + each clip's 50% of largest norm), numbered 0..L'-1
    ("reindex") or by their original ids ("keep")."""
    batch = A.prompts(model, [[(0.48,), (0.36,)]])
    embeds = lm_inputs(model, batch)["inputs_embeds"]
    audio = (batch["input_ids"][0] == AUDIO_TOKEN).nonzero()[:, 0]
    keep = torch.ones(embeds.shape[1], dtype=torch.bool)
    keep[audio] = False
    for cols in audio.split([12, 9]):
        k = math.ceil(cols.numel() / 2)
        keep[cols[embeds[0, cols].norm(dim=-1).topk(k).indices]] = True
    cols = keep.nonzero()[:, 0]
    ids = torch.arange(len(cols)) if positions == "reindex" else cols
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=embeds[:, cols], position_ids=ids[None]).last_hidden_state
        expected = model.lm_head(hidden)
        with NormPress(keep_ratio=0.5)(model, positions=positions):
            logits = model(**batch).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_beam_search_and_returned_sequences_under_a_press(model):
    """generate repeats each row per beam; the model encodes the clips inside the prefill forward
    (no pre-encoded features in any supported transformers), and a keep-all press is exact."""
    batch = A.prompts(model, [[(0.64,)], [(0.52,)]])
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    with torch.no_grad():
        reference = model.generate(**batch, **kwargs)
        with NormPress(keep_ratio=1.0)(model):
            assert torch.equal(model.generate(**batch, **kwargs), reference)
        with NormPress(keep_ratio=0.5)(model) as run:
            pressed = model.generate(**batch, **kwargs)
    assert pressed.shape == reference.shape and run.stats.items == 4  # each clip once per beam
    assert run.stats.kept_visual_tokens == 2 * (8 + 7)


@pytest.mark.parametrize("rows", [[[(0.48,), (0.36,)]], [[(0.48,), (0.36,)], [(0.64,)]]])
@pytest.mark.parametrize("positions", ["keep", "reindex"])
def test_later_turn_on_a_pressed_cache_equals_rerunning_the_conversation(model, positions, rows):
    """A second turn fed onto the first turn's pressed cache, by ``model(new ids, full mask, cache)``
    and by ``generate(whole conversation, past_key_values=cache)`` (its first call holds some of the
    prompt's audio placeholders, without features: the cache stands for them; batch 1: without a
    mask, generate drops an all-ones one; padded rows: a 2-D mask), gives the logits of the whole
    conversation pressed afresh (DivPrune reads no text: both keep the same tokens)."""
    batch = A.prompts(model, rows)
    b = batch["input_ids"].shape[0]
    new = torch.tensor([[11, 12, 13, 14]]).expand(b, -1)
    ids = torch.cat([batch["input_ids"], new], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(new)], dim=1)
    whole = {**batch, "input_ids": ids, "attention_mask": mask}
    press = mmpress.get_press("divprune", keep=5)
    own = lambda m: (m.cumsum(-1) - 1).masked_fill(m == 0, 1)  # noqa: E731  (each row from its first token, as generate)
    with torch.no_grad(), press(model, positions=positions):
        expected = model(**whole, position_ids=own(mask)).logits[:, -4:]
        cache = model(**batch, position_ids=own(batch["attention_mask"]), use_cache=True).past_key_values
        got = model(input_ids=new, attention_mask=mask, past_key_values=cache,
                    position_ids=mmpress.continue_positions(model, cache, mask, new)).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        cache = model(**batch, position_ids=own(batch["attention_mask"]), use_cache=True).past_key_values
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2,
                             min_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
        torch.testing.assert_close(out.logits[0], expected[:, -1], atol=1e-5, rtol=1e-5)
        step, longer = torch.cat([ids, out.sequences[:, -2:-1]], dim=1), torch.cat([mask, mask[:, -1:]], dim=1)
        after = model(**{**whole, "input_ids": step, "attention_mask": longer}, position_ids=own(longer)).logits
    torch.testing.assert_close(out.logits[1], after[:, -1], atol=1e-5, rtol=1e-5)


def test_beams_over_a_row_of_several_clips_are_refused(model):
    """transformers repeats each clip per beam, not each row's clips: a row of clips of different
    lengths then gets the wrong clips (unpressed: silently); under a press, a ValueError."""
    batch = A.prompts(model, [[(0.64,)], [(0.48,), (0.36,)]])
    with torch.no_grad(), NormPress(keep_ratio=0.5)(model):
        with pytest.raises(ValueError, match="transformers repeats each clip, not each row's clips"):
            model.generate(**batch, max_new_tokens=2, num_beams=2, do_sample=False)


# ---- refused presses and bad input ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(n for n, c in mmpress.PRESSES.items() if c.stage != "in_vision"
                                        and not A.runs(c)))
def test_presses_needing_a_grid_or_cls_are_refused_on_entry(model, name):
    cls = mmpress.PRESSES[name]
    press = cls(keep_ratio=0.5) if cls.needs_budget else cls()
    missing = [s for s in cls.needs if s not in A.signals]
    with pytest.raises(ValueError, match=f"needs '{missing[0]}'.*1-D sequences of audio frames"):
        with press(model):
            pass


def test_every_press_that_needs_only_tokens_or_text_runs_on_audio():
    for name in ("random", "uniform", "pool", "divprune", "tome", "mmtok", "cdpruner", "dart", "fastv", "pdrop", "snapkv",
                 "samp", "silence", "audio_merge", "fastadasp"):
        assert A.runs(mmpress.PRESSES[name]), name


def test_bad_input_raises_naming_the_fix(model):
    batch = A.prompts(model, [[(0.48,), (0.36,)]])
    press = NormPress(keep_ratio=0.5)
    no_audio = {k: v for k, v in batch.items() if k not in ("input_features", "feature_attention_mask")}
    with torch.no_grad():
        model(**no_audio)  # transformers embeds the placeholders as text, silently
        with press(model):
            with pytest.raises(ValueError, match="no audio was given: pass input_features"):
                model(**no_audio)
            with pytest.raises(ValueError, match="feature_attention_mask"):
                model(**{k: v for k, v in batch.items() if k != "feature_attention_mask"})
            with pytest.raises(ValueError, match="do not match"):
                model(**{**batch, "feature_attention_mask": batch["feature_attention_mask"][:, :32]})
            short = batch["feature_attention_mask"].clone()
            short[1, 32:] = 0  # the second clip: 8 tokens for its 9 placeholders
            with pytest.raises(ValueError, match=r"\[12, 8\] tokens were given, but the prompt rows hold \[21\]"):
                model(**{**batch, "feature_attention_mask": short})
            ids = batch["input_ids"]  # one placeholder per clip: not expanded as the processor does
            first = [t for t in ids[0].tolist() if t != AUDIO_TOKEN]
            at = ids[0].tolist().index(AUDIO_TOKEN)
            legacy = torch.tensor([first[:at] + [AUDIO_TOKEN] + first[at:at + 2] + [AUDIO_TOKEN] + first[at + 2:]])
            with pytest.raises(ValueError, match="placeholder"):
                model(input_ids=legacy, input_features=batch["input_features"],
                      feature_attention_mask=batch["feature_attention_mask"])
            embeds = model.get_input_embeddings()(ids)
            with pytest.raises(ValueError, match="pass input_ids"):
                model(inputs_embeds=embeds, input_features=batch["input_features"],
                      feature_attention_mask=batch["feature_attention_mask"])


# ---- cost -------------------------------------------------------------------------------------
def _counted(fn) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_encoder_flops_equal_the_counted_ones():
    """Convolutions, blocks over every clip's whole padded input, projector over its pooled
    tokens: exactly what torch counts with eager attention; the whole prefill within 10%."""
    model, inputs = shaped("qwen2_audio", kind="audio", batch=2, size="tiny", media=(0.4,), attn="eager")
    flops = prefill_flops(model.config, inputs, inputs["input_ids"].shape[1])
    assert flops.vision + flops.projector == _counted(lambda: encode_visuals(model, inputs))
    assert 0.9 < flops.total / _counted(lambda: model(**inputs, logits_to_keep=1)) <= 1.0
    pressed = prefill_flops(model.config, inputs, inputs["input_ids"].shape[1] - 5)
    assert (pressed.vision, pressed.projector) == (flops.vision, flops.projector) and pressed.language < flops.language


def test_real_shape_is_a_30_second_clip_of_750_tokens():
    """``bench-cost --arch qwen2_audio``: Whisper-large-v3's encoder (32 x 1280, 128 mel bins, 1500
    positions) scaled as the vision towers (8 x 640), a 30 s clip as the processor pads it."""
    model, inputs = shaped("qwen2_audio", kind="audio", lm_layers=1, vision_layers=1)
    audio = model.config.audio_config
    assert (audio.d_model, audio.encoder_attention_heads, audio.encoder_ffn_dim) == (640, 10, 2560)
    assert (audio.num_mel_bins, audio.max_source_positions) == (128, 1500)
    assert A.build("real", lm_layers=1).config.audio_config.encoder_layers == 8
    assert model.config.text_config.hidden_size == 896
    assert inputs["input_features"].shape == (1, 128, 3000) and int(inputs["feature_attention_mask"].sum()) == 3000
    assert int((inputs["input_ids"] == AUDIO_TOKEN).sum()) == 750
    record = run_prefill(model, inputs, ["divprune"], [375], repeats=1, split=True)
    assert record["rows"][0]["keep"] == 750 and record["rows"][1]["kept_tokens"] == 375
