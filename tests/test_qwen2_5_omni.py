"""Qwen2.5-Omni's thinker: audio clips, images and videos in one prompt, a video's audio
interleaved with its frames (``use_audio_in_video``), TMRoPE positions kept. Tiny random models of
the real transformers class (``QwenOmniAdapter.build("tiny")``), prompts laid out as its processor
lays them out (``QwenOmniAdapter.prompts``), against hand-built oracles. The family matrix
(test_families.py) runs every press on its image rows; this file runs the audio, mixed and
audio-in-video rows."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mmpress
from mmpress.models.layout import input_layout
from mmpress.models.qwen2_5_omni import AUDIO_TOKEN, VIDEO_TOKEN, QwenOmniAdapter, audio_flops, clip_energy
from mmpress.models.qwen2_audio import audio_tokens
from mmpress.presses.base import ScorerPress
from mmpress.registry import get_adapter

STEPS = 2
ROWS = ["audio", "mixed", "video_audio"]  # QwenOmniAdapter.example_rows: each a ragged batch
pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class NormPress(ScorerPress):
    """Keeps the tokens of largest norm (deterministic, scattered)."""

    name = "test-norm"

    def score(self, tokens, ctx):
        return tokens.norm(dim=-1)


@dataclass
class Recording(ScorerPress):
    """Keeps the loudest tokens and records the audio contexts it saw."""

    name = "test-recording"
    needs = ("audio_energy", "audio_features")

    def __post_init__(self):
        super().__post_init__()
        self.seen = []

    def score(self, tokens, ctx):
        self.seen.append(ctx)
        return ctx.audio_energy


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return QwenOmniAdapter.build("tiny")


def batch(model, rows: str):
    return QwenOmniAdapter.prompts(model, QwenOmniAdapter.example_rows[rows])


def alone(model, rows: str, i: int):
    return QwenOmniAdapter.prompts(model, [QwenOmniAdapter.example_rows[rows][i]], first_row=i)


def generate(model, inputs):
    out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -STEPS:], torch.stack(out.logits, dim=1)


def rope_index(model, inputs):
    """transformers' TMRoPE ids (3, B, L) of the unpressed prompt."""
    owner = model.model if hasattr(model.model, "get_rope_index") else model  # 5.24+ / 5.18
    mask = inputs.get("feature_attention_mask")
    pos, _ = owner.get_rope_index(inputs["input_ids"], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                                  inputs["attention_mask"], inputs.get("use_audio_in_video", False),
                                  None if mask is None else mask.sum(-1), inputs.get("video_second_per_grid"))
    return pos


@contextmanager
def lm_input(model):
    """The language model's prefill kwargs of the calls in the block (to register inside a press's
    block: hooks run in order, so this one sees what the press passes on)."""
    seen = []

    def record(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None and kwargs["inputs_embeds"].shape[1] > 1:
            seen.append(dict(kwargs))

    handle = get_adapter(model).lm.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def kept_columns(original, pressed, valid) -> list[int]:
    """The columns of ``original`` (L, D) a pressed row (W, D; ``valid`` its real slots) holds, in
    order: every text token is kept and media features are distinct, so an in-order match finds them."""
    rows, out, j = pressed[valid], [], 0
    for col in range(original.shape[0]):
        if j < rows.shape[0] and torch.equal(original[col], rows[j]):
            out.append(col)
            j += 1
    assert j == rows.shape[0], "the pressed row is not a subsequence of the prompt"
    return out


# ---- the matrix on audio, mixed and audio-in-video rows -------------------------------------------
@pytest.mark.parametrize("rows", ["single", "video", *ROWS])
def test_keep_all_reproduces_the_unpressed_model(model, rows):
    inputs = batch(model, rows)
    with torch.no_grad():
        reference = model(**inputs).logits
        ref_tokens, ref_scores = generate(model, inputs)
        for press in (mmpress.get_press("none"), NormPress(keep_ratio=1.0)):
            with press(model) as run:
                assert torch.equal(model(**inputs).logits, reference)
                tokens, scores = generate(model, inputs)
            assert torch.equal(tokens, ref_tokens) and torch.equal(scores, ref_scores)
            assert run.stats.kept_visual_tokens == run.stats.visual_tokens > 0


PRESSES = {"test-norm": lambda: NormPress(keep_ratio=0.5), "cdpruner": lambda: mmpress.get_press("cdpruner", keep=4),
           "fastv": lambda: mmpress.get_press("fastv", keep_ratio=0.5, layer=1),
           "fastadasp": lambda: mmpress.get_press("fastadasp", keep_ratio=0.5, layer=1),
           "snapkv": lambda: mmpress.get_press("snapkv", keep_ratio=0.5, window=4)}
ANY_KIND = ["divprune", "test-norm", "tome", "mmtok", "cdpruner", "audio_merge", "fastv", "fastadasp", "snapkv"]


@pytest.mark.parametrize("rows, name", [(rows, name) for rows in ROWS for name in ANY_KIND] + [("audio", "silence"), ("audio", "samp")])
def test_ragged_batch_decodes_like_each_row_alone(model, rows, name):
    """Forward and generate under a press on clips of different lengths (with images, videos and
    a video's interleaved audio), each row as it decodes alone. Silence (audio_energy) and Samp
    (audio_attn) on clips only (test_bad_input_raises: with images they refuse)."""
    press = PRESSES.get(name, lambda: mmpress.get_press(name, keep_ratio=0.5))()
    inputs = batch(model, rows)
    with torch.no_grad(), press(model) as run:
        logits = model(**inputs).logits
        tokens, scores = generate(model, inputs)
    stats = run.stats
    assert stats.kept_visual_tokens < stats.visual_tokens and torch.isfinite(scores).all()
    assert stats.kinds["audio"] == len(inputs["feature_attention_mask"])
    for i in range(inputs["input_ids"].shape[0]):
        row = alone(model, rows, i)
        with torch.no_grad(), press(model):
            row_logits = model(**row).logits
            row_tokens, row_scores = generate(model, row)
        torch.testing.assert_close(logits[i, -1], row_logits[0, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(scores[i], row_scores[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens[i], row_tokens[0]), (name, i)


@pytest.mark.parametrize("options", [dict(num_beams=2), dict(num_return_sequences=2, do_sample=True)],
                         ids=["beams", "sequences"])
def test_generate_repeats_clips_per_beam(model, options):
    """generate repeats each row's clips (input_features) per beam / returned sequence: keep-all is
    the unpressed model's output, and a press presses every repeated item."""
    inputs = QwenOmniAdapter.prompts(model, [[(32, 32), (0.64,)], [(0.3,)]])

    def run_generate():
        torch.manual_seed(0)
        return model.generate(**inputs, max_new_tokens=STEPS, **options)

    with torch.no_grad():
        reference = run_generate()
        with mmpress.get_press("none")(model):
            assert torch.equal(run_generate(), reference)
        press = mmpress.get_press("divprune", keep_ratio=0.5)
        with press(model) as run:
            run_generate()
    assert run.stats.kinds == {"image": 2, "audio": 4}
    assert run.stats.kept_visual_tokens == 2 * sum(press.budget(n) for n in (16, 16, 7))  # image, clip, clip


def test_one_press_on_audio_image_and_video_in_one_prompt(model):
    """DivPrune at 50% halves every item of every kind: 2 images, a video, 2 clips; a ragged batch."""
    inputs = batch(model, "mixed")
    items = get_adapter(model).visual_items((), inputs)
    assert sorted(i.kind for i in items) == ["audio", "audio", "image", "image", "video"]
    press = mmpress.get_press("divprune", keep_ratio=0.5)
    with torch.no_grad(), press(model) as run:
        logits = model(**inputs).logits
        tokens, _ = generate(model, inputs)
    assert run.stats.kinds == {"image": 2, "video": 1, "audio": 2}
    assert run.stats.kept_visual_tokens == sum(press.budget(i.length) for i in items)
    assert logits.shape[1] == run.stats.pressed_seq_len < inputs["input_ids"].shape[1]
    assert tokens.shape == (3, STEPS)


# ---- positions and the pressed sequence, against oracles -------------------------------------------
@pytest.mark.parametrize("rows", ROWS)
def test_kept_tokens_keep_their_tmrope_ids(model, rows):
    """Every kept token (text, image, video, audio; interleaved or not) enters the language model
    with the TMRoPE ids transformers' get_rope_index gives it in the unpressed prompt."""
    inputs = batch(model, rows)
    with torch.no_grad():
        with lm_input(model) as seen:
            model(**inputs)
        with NormPress(keep_ratio=0.4)(model), lm_input(model) as pressed_seen:
            model(**inputs)
    (original,), (pressed,), expected = seen, pressed_seen, rope_index(model, inputs)
    embeds, pos, valid = pressed["inputs_embeds"], pressed["position_ids"], pressed["attention_mask"].bool()
    assert valid.sum() < inputs["attention_mask"].sum()
    for b in range(embeds.shape[0]):
        cols = kept_columns(original["inputs_embeds"][b], embeds[b], valid[b])
        assert torch.equal(pos[-3:, b][:, valid[b]], expected[:, b, cols])


@pytest.mark.parametrize("rows, i", [("mixed", 0), ("video_audio", 1)])
def test_pressed_logits_equal_the_hand_built_sequence(model, rows, i):
    """One row: the language model on the text + kept tokens at their original TMRoPE ids, by hand."""
    inputs = alone(model, rows, i)
    with torch.no_grad():
        with lm_input(model) as seen:
            model(**inputs)
        with mmpress.get_press("divprune", keep_ratio=0.5)(model), lm_input(model) as pressed_seen:
            pressed = model(**inputs).logits
    embeds, kept = seen[0]["inputs_embeds"], pressed_seen[0]["inputs_embeds"]
    keep = kept_columns(embeds[0], kept[0], torch.ones(kept.shape[1], dtype=torch.bool))
    assert len(keep) < embeds.shape[1]
    pos = rope_index(model, inputs)[:, :, keep]
    with torch.no_grad():
        hidden = get_adapter(model).lm(inputs_embeds=embeds[:, keep], position_ids=pos).last_hidden_state
        oracle = model.lm_head(hidden)
    torch.testing.assert_close(pressed, oracle, atol=1e-5, rtol=1e-5)


def test_a_later_turn_continues_the_pressed_cache_at_the_original_ids(model):
    """A second turn fed onto a pressed cache with ``mmpress.continue_positions``: the hand-built
    sequence of the kept prompt then the new tokens, the new text continuing from the prompt's
    largest TMRoPE id as the unpressed model would number it."""
    inputs = alone(model, "video_audio", 1)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    new = torch.tensor([[20, 21, 22]])
    full = torch.ones(1, inputs["input_ids"].shape[1] + new.shape[1], dtype=torch.long)
    press = mmpress.get_press("divprune", keep_ratio=0.5)
    with torch.no_grad():
        with lm_input(model) as seen:
            model(**inputs)
        with press(model), lm_input(model) as pressed_seen:
            out = model(**inputs, use_cache=True)
            cache = getattr(out, name)
            pos = mmpress.continue_positions(model, cache, full, new)
            later = model(input_ids=new, attention_mask=full, position_ids=pos, **{name: cache}).logits
    embeds, kept = seen[0]["inputs_embeds"], pressed_seen[0]["inputs_embeds"]
    keep = kept_columns(embeds[0], kept[0], torch.ones(kept.shape[1], dtype=torch.bool))
    original = rope_index(model, inputs)
    following = original.amax(dim=(0, 2))[0] + 1 + torch.arange(new.shape[1])
    assert torch.equal(pos[:, 0], following.expand(3, -1))
    lm = get_adapter(model).lm
    with torch.no_grad():
        sequence = torch.cat([embeds[:, keep], lm.get_input_embeddings()(new)], dim=1)
        ids = torch.cat([original[:, :, keep], following.expand(3, 1, -1)], dim=2)
        oracle = model.lm_head(lm(inputs_embeds=sequence, position_ids=ids).last_hidden_state)[:, -new.shape[1]:]
    torch.testing.assert_close(later, oracle, atol=1e-5, rtol=1e-5)


def test_interleaved_video_and_audio_items_find_their_tokens(model):
    """use_audio_in_video: a video's frames and its audio alternate chunk by chunk; each item's
    tokens are found by placeholder id in order: the video's in raster order, each clip's in time
    order, neither contiguous."""
    inputs = batch(model, "video_audio")
    assert inputs["use_audio_in_video"] is True
    adapter = get_adapter(model)
    items = adapter.visual_items((), inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    counts = {t: (ids == t).sum(1).tolist() for t in adapter.token_ids}
    layout = input_layout(ids, mask, items, adapter._rows(items, counts), mask.sum(1).tolist())
    flats = layout.flats()
    for token in (VIDEO_TOKEN, AUDIO_TOKEN):
        mine = [f for f, item in zip(flats, items) if item.token_id == token]
        assert torch.equal(torch.cat(mine), (ids.view(-1) == token).nonzero()[:, 0])
    video = flats[[i.kind for i in items].index("video")]
    assert (video.diff() > 1).any()  # interleaved: the video's tokens are not contiguous
    # row 0: video then its audio chunk by chunk; the audio of the first video is the first clip
    first = ids[0][mask[0]].tolist()
    v, a = first.index(VIDEO_TOKEN), first.index(AUDIO_TOKEN)
    assert v < a < len(first) - first[::-1].index(VIDEO_TOKEN)


# ---- audio signals -----------------------------------------------------------------------------------
def test_audio_signals_are_the_encoder_output_and_the_frames_energy(model):
    """audio_features: what the audio tower's proj receives for each token; audio_energy: the mean
    log-mel value of the token's frames 4j..4j+3 (loops here, one scatter in the adapter)."""
    inputs = batch(model, "audio")
    press = Recording(keep_ratio=0.5)
    with torch.no_grad(), press(model):
        model(**inputs)
    tower = (model.model if hasattr(model.model, "audio_tower") else model).audio_tower
    captured = []
    handle = tower.proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
    handle.remove()
    frames = inputs["feature_attention_mask"].sum(-1).tolist()
    lengths = [audio_tokens(f) for f in frames]
    per_clip = captured[0].split(lengths)
    seen = {ctx.audio_energy.shape[1]: ctx for ctx in press.seen}  # clips of different lengths: own groups
    assert sorted(seen) == sorted(lengths)
    for c, (n, f) in enumerate(zip(lengths, frames)):
        ctx = seen[n]
        assert ctx.kind == "audio" and ctx.grid is None
        torch.testing.assert_close(ctx.audio_features[0], per_clip[c])
        x = inputs["input_features"][c, :, :f].mean(0)
        expected = torch.stack([x[4 * j: 4 * j + 4].mean() for j in range(n)])
        torch.testing.assert_close(ctx.audio_energy[0], expected)


@dataclass
class AttentionRecording(Recording):
    name = "test-attention-recording"
    needs = ("audio_attn",)

    def score(self, tokens, ctx):
        self.seen.append(ctx)
        return ctx.audio_attn[:, 1].diagonal(dim1=1, dim2=2)


def test_audio_attn_is_the_last_layer_attention_pooled_as_samp_pools_it(model):
    """audio_attn (SA-MAP's signal): the last audio layer's softmax attention within each chunk
    (zero across chunks), max / mean over heads, rows averaged and columns summed over each
    token's 2 frames; here by loops in float64 from that layer's input."""
    inputs = batch(model, "audio")
    press = AttentionRecording(keep_ratio=0.5)
    with torch.no_grad(), press(model):
        model(**inputs)
    tower = (model.model if hasattr(model.model, "audio_tower") else model).audio_tower
    attention, seen = tower.layers[-1].self_attn, []
    handle = attention.register_forward_pre_hook(lambda m, a, k: seen.append((k["hidden_states"], k["cu_seqlens"])),
                                                 with_kwargs=True)
    with torch.no_grad():
        model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
    handle.remove()
    hidden, cu = seen[0]
    heads = attention.num_heads
    with torch.no_grad():
        q = attention.q_proj(hidden).double().view(hidden.shape[0], heads, -1)
        k = attention.k_proj(hidden).double().view(hidden.shape[0], heads, -1)
    chunks = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    frames = inputs["feature_attention_mask"].sum(-1).tolist()
    per_clip = [-(-f // (2 * tower.n_window)) for f in frames]
    by_length = {ctx.audio_attn.shape[-1]: ctx.audio_attn[0] for ctx in press.seen}
    assert len(chunks) == sum(per_clip) and max(per_clip) > 1
    for c, f in enumerate(frames):
        mine = chunks[sum(per_clip[:c]):sum(per_clip[:c + 1])]
        start, end = mine[0][0], mine[-1][1]
        full = torch.zeros(heads, end - start, end - start, dtype=torch.float64)
        for a, b in mine:
            for h in range(heads):
                full[h, a - start:b - start, a - start:b - start] = torch.softmax(
                    q[a:b, h] @ k[a:b, h].T * attention.scaling, dim=-1)
        n = audio_tokens(f)
        expected = torch.zeros(2, n, n, dtype=torch.float64)
        for form, reduced in enumerate((full.amax(0), full.mean(0))):
            for i in range(n):
                for j in range(n):
                    expected[form, i, j] = reduced[2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(0).sum()
        torch.testing.assert_close(by_length[n].double(), expected, atol=1e-5, rtol=1e-4)


def test_token_energy_skips_padding_wherever_the_mask_holds_it():
    features = torch.arange(2 * 3 * 10, dtype=torch.float).view(2, 3, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 7:] = 0
    mask[1, :2] = 0  # frames are taken in order wherever the mask has them, as the encoder does
    energy = clip_energy(features, mask, 2)
    frame = features.mean(1)
    assert torch.allclose(energy[0], torch.stack([frame[0, :4].mean(), frame[0, 4:7].mean()]))
    assert torch.allclose(energy[1], torch.stack([frame[1, 2:6].mean(), frame[1, 6:10].mean()]))


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_input_raises(model):
    inputs = batch(model, "mixed")
    press = mmpress.get_press("divprune", keep_ratio=0.5)
    no_features = {k: v for k, v in inputs.items() if k not in ("input_features", "feature_attention_mask")}
    with press(model), pytest.raises(ValueError, match="no audio was given"):
        model(**no_features)
    no_mask = {k: v for k, v in inputs.items() if k != "feature_attention_mask"}
    with press(model), pytest.raises(ValueError, match="feature_attention_mask"):
        model(**no_mask)
    short = {**inputs, "feature_attention_mask": inputs["feature_attention_mask"].clone()}
    short["feature_attention_mask"][0, 2:] = 0
    with press(model), pytest.raises(ValueError, match="2 mel frames gives no audio token"):
        model(**short)
    with mmpress.get_press("visionzip", keep_ratio=0.5)(model), pytest.raises(ValueError, match="audio clips do not"):
        model(**inputs)
    with Recording(keep_ratio=0.5)(model), pytest.raises(ValueError, match="audio signals, which"):
        model(**inputs)
    for name in ("silence", "samp"):
        with mmpress.get_press(name, keep_ratio=0.5)(model), pytest.raises(ValueError, match="audio signals, which"):
            model(**batch(model, "video_audio"))
    with pytest.raises(ValueError, match="positions"):
        QwenOmniAdapter(model, positions="reindex")
    with pytest.raises(ValueError, match="qwen2_5_omni adapter does not support"):
        with mmpress.get_press("static_patches")(model):
            model(**inputs)
    two_clips = QwenOmniAdapter.prompts(model, [[(0.64,), (0.3,)]])  # transformers repeats clips, not rows' clips
    with press(model), pytest.raises(ValueError, match="one clip each, or generate with one beam"):
        model.generate(**two_clips, max_new_tokens=1, num_beams=2)
    with pytest.raises(ValueError, match="one flag per call"):
        QwenOmniAdapter.prompts(model, [[(4, 32, 32, 0.4), (4, 32, 32)]])
    with pytest.raises(ValueError, match="no token"):
        QwenOmniAdapter.prompts(model, [[(0.01,)]])
    with pytest.raises(ValueError, match="medium is"):
        QwenOmniAdapter.prompts(model, [[(1, 2, 3, 4, 5)]])


def test_vision_presses_run_on_its_images_and_videos(model):
    """The Qwen2.5-VL signals (attention received, keys, merger input) from the Omni tower (q / k
    projected separately), on images and a video."""
    for name in ("visionzip", "vispruner", "prumerge"):
        for rows in ("single", "video"):
            with torch.no_grad(), mmpress.get_press(name, keep_ratio=0.5)(model) as run:
                logits = model(**batch(model, rows)).logits
            assert torch.isfinite(logits).all() and run.stats.kept_visual_tokens < run.stats.visual_tokens


# ---- cost ----------------------------------------------------------------------------------------
def _counted(fn) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_prefill_flops_count_both_towers_as_torch_does():
    """The vision tower, the audio encoder (chunks padded to the call's longest for the
    convolutions, attention within each chunk) and both projectors: what torch counts with eager
    attention, on clips of several chunks."""
    model = QwenOmniAdapter.build("tiny", attn="eager")
    inputs = QwenOmniAdapter.prompts(model, [[(32, 32), (0.5,)], [(4, 32, 32), (0.23,)]])
    flops = QwenOmniAdapter.prefill_flops(model.config, inputs, inputs["input_ids"].shape[1])
    assert flops.vision + flops.projector == _counted(lambda: QwenOmniAdapter.encode(model, inputs))
    assert audio_flops(model.config.audio_config, [50])[0] > 0
    pressed = QwenOmniAdapter.prefill_flops(model.config, inputs, inputs["input_ids"].shape[1] - 20)
    assert (pressed.vision, pressed.projector) == (flops.vision, flops.projector) and pressed.language < flops.language
