"""``"spoken"``: spoken questions synthesised offline with espeak-ng, for the audio demo model.

Each row is a short clip of speech (a number, a colour or a command, said in a carrier phrase)
with a text question about it: ``{"audio": float32 array at 16 kHz, "question", "answer",
"kind"}``. Every clip is drawn from a seed: the voice (7 English accents x 6 speaker variants),
the speed (120-200 words a minute), the pitch, the silence before and after (0.1-1 s each) and
the background noise (white, 15-40 dB below the speech) all come from
``numpy.random.default_rng((split stream, index))``, and espeak-ng is deterministic, so the same
(split, index) is always the same clip. Train and test come from different seed streams, so test
is never trained on. Generated sets are cached on disk (``$MMPRESS_CACHE/spoken-v1``).

Also here: :func:`read_audio` (a WAV file -> float32 mono at 16 kHz, resampled when that is safe;
anything else one ValueError naming the fix) and :func:`resample`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
KINDS = ("number", "colour", "command")
_SPLIT_STREAM = {"train": 0, "test": 1}
_DEFAULT_SIZE = {"train": 2000, "test": 200}
_CACHE_VERSION = "v1"

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown")
COMMANDS = ("stop", "go", "left", "right", "up", "down", "yes", "no", "open", "close")

# what is said, per kind ({} is the word); several carrier phrases so the answer is not always
# at the same place in the clip
SAID = {
    "number": ("{}", "the number is {}", "I choose {}", "number {}, please", "my lucky number is {}", "{} it is"),
    "colour": ("{}", "my favourite colour is {}", "paint it {}", "I like {}", "the car is {}", "{} is the colour"),
    "command": ("{}", "{} now", "please {}", "the command is {}", "{}, quickly", "I said {}"),
}
QUESTIONS = {
    "number": ("What number did I say?", "Which number was said?", "What number do you hear?"),
    "colour": ("Which colour did I say?", "What colour was said?", "Which colour do you hear?"),
    "command": ("Which command did I give?", "What command was said?", "What is the command?"),
}
WORDS = {"number": NUMBERS, "colour": COLOURS, "command": COMMANDS}
# the answer a number question expects is its digit (normalize_answer maps the word to it too)
ANSWER = {"number": lambda w: str(NUMBERS.index(w))}

SILENCE = (0.1, 1.0)  # seconds of silence before and after the speech, each
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = ("", "+m3", "+f2", "+f4", "+m7", "+klatt")


def _espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise ValueError("espeak-ng is not installed; install it with `apt-get install -y espeak-ng` "
                         "(it synthesises the spoken data offline)")
    return path


def speak(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> np.ndarray:
    """``text`` spoken by espeak-ng: float32 mono at 16 kHz (espeak-ng writes 22,050 Hz)."""
    import scipy.io.wavfile

    with tempfile.TemporaryDirectory() as folder:
        wav = Path(folder) / "say.wav"
        subprocess.run([_espeak(), "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
                       check=True, capture_output=True)
        rate, data = scipy.io.wavfile.read(wav)
    return resample(_to_float(data), rate, SAMPLE_RATE)


def spoken_sample(split: str, index: int) -> dict:
    """Row ``index`` of ``split``: the same clip every time (see the module docstring)."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    rng = np.random.default_rng((_SPLIT_STREAM[split], index))
    kind = KINDS[int(rng.integers(len(KINDS)))]
    word = WORDS[kind][int(rng.integers(len(WORDS[kind])))]
    said = SAID[kind][int(rng.integers(len(SAID[kind])))].format(word)
    question = QUESTIONS[kind][int(rng.integers(len(QUESTIONS[kind])))]
    voice = VOICES[int(rng.integers(len(VOICES)))] + VARIANTS[int(rng.integers(len(VARIANTS)))]
    speed, pitch = int(rng.integers(120, 201)), int(rng.integers(30, 71))
    speech = speak(said, voice, speed, pitch)
    before, after = (int(rng.uniform(*SILENCE) * SAMPLE_RATE) for _ in range(2))
    audio = np.concatenate([np.zeros(before, np.float32), speech, np.zeros(after, np.float32)])
    # white noise 15-40 dB below the speech's power, over the whole clip (silence included)
    power = float(np.mean(speech ** 2)) + 1e-12
    snr_db = rng.uniform(15, 40)
    audio = audio + rng.standard_normal(len(audio)).astype(np.float32) * np.sqrt(power / 10 ** (snr_db / 10))
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    answer = ANSWER.get(kind, lambda w: w)(word)
    return {"audio": audio, "question": question, "answer": answer, "kind": kind, "said": said,
            "voice": voice, "speed": speed, "sample_id": f"{split}-{index}"}


def cache_dir() -> Path:
    root = Path(os.environ.get("MMPRESS_CACHE", Path.home() / ".cache" / "mmpress"))
    return root / f"spoken-{_CACHE_VERSION}"


def _fingerprint() -> str:
    """Changes when the generator's vocabulary or espeak-ng's version changes (a stale cache is
    rebuilt, never read)."""
    version = subprocess.run([_espeak(), "--version"], capture_output=True, text=True).stdout.strip()
    text = json.dumps([SAID, QUESTIONS, WORDS, VOICES, VARIANTS, SILENCE, version])
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def spoken_dataset(split: str = "test", limit: int | None = None, cache: bool = True) -> list[dict]:
    """The first ``limit`` rows of ``split`` (default: 2,000 train, 200 test), generated once and
    then read from the on-disk cache."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r} for 'spoken'; expected 'train' or 'test'")
    n = _DEFAULT_SIZE[split] if limit is None else limit
    if n < 1:
        raise ValueError(f"limit must be >= 1 (None: every sample), got {limit}")
    path = cache_dir() / f"{split}-{n}-{_fingerprint()}.npz"
    if cache and path.is_file():
        return _read_cache(path)
    rows = [spoken_sample(split, i) for i in range(n)]
    if cache:
        _write_cache(path, rows)
    return rows


_META = ("question", "answer", "kind", "said", "voice", "speed", "sample_id")


def _write_cache(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(r["audio"]) for r in rows])
    meta = json.dumps([{k: r[k] for k in _META} for r in rows])
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, audio=np.concatenate([r["audio"] for r in rows]), lengths=lengths, meta=np.array(meta))
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


def _read_cache(path: Path) -> list[dict]:
    with np.load(path) as f:
        audio, lengths, meta = f["audio"], f["lengths"], json.loads(str(f["meta"]))
    clips = np.split(audio, np.cumsum(lengths)[:-1])
    return [{"audio": clip, **m} for clip, m in zip(clips, meta)]


# ---------------------------------------------------------------------------------------------
# reading audio files


def _to_float(data: np.ndarray) -> np.ndarray:
    """PCM samples (int or float, mono or channels last) -> float32 mono in [-1, 1]."""
    if data.ndim == 2:
        data = data.mean(axis=1) if data.dtype.kind == "f" else data.astype(np.float64).mean(axis=1)
    if data.dtype.kind == "u":  # 8-bit WAV is unsigned, centred at 128
        data = (data.astype(np.float64) - 128) / 128
    elif data.dtype.kind == "i":
        data = data.astype(np.float64) / float(2 ** (8 * data.dtype.itemsize - 1))
    return np.asarray(data, dtype=np.float32)


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (scipy's ``resample_poly``, whose anti-alias filter suits speech)
    from ``rate`` to ``target`` Hz. Any integer rate ratio with numerator and denominator at most
    1,000 once reduced (8, 11.025, 22.05, 32, 44.1, 48, 96 kHz ... -> 16 kHz) is exact."""
    if rate == target:
        return np.asarray(audio, dtype=np.float32)
    from scipy.signal import resample_poly

    ratio = Fraction(target, rate)
    if ratio.numerator > 1000 or ratio.denominator > 1000:
        raise ValueError(f"cannot resample {rate} Hz to {target} Hz exactly; convert the file first, "
                         f"e.g. `sox in.wav -r {target} out.wav`")
    return resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)


MIN_RATE, MAX_RATE = 8000, 192000


def read_audio(path: str | Path, param: str = "--audio", max_seconds: float | None = None) -> np.ndarray:
    """A WAV file as float32 mono at 16 kHz. Rates from 8 to 192 kHz are resampled (a lower rate
    has lost the speech band the model needs); a file that is not a WAV, holds no samples or
    silence only, or is longer than ``max_seconds`` is a ValueError naming the fix."""
    import scipy.io.wavfile

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{param}: no such file: {path}")
    try:
        rate, data = scipy.io.wavfile.read(path)
    except (ValueError, EOFError, OSError, IndexError, TypeError) as e:
        raise ValueError(f"{param}: {path} is not a readable WAV file ({' '.join(str(e).split()) or type(e).__name__}); "
                         f"convert it first, e.g. `sox {path.name} -r 16000 -c 1 out.wav`") from None
    if data.ndim not in (1, 2) or data.size == 0 or data.shape[0] == 0:
        raise ValueError(f"{param}: {path} holds no audio samples")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"{param}: {path} has a sample rate of {rate} Hz; the model needs 16000 Hz and "
                         f"resamples {MIN_RATE}-{MAX_RATE} Hz itself: convert it with `sox {path.name} -r 16000 out.wav`")
    audio = _to_float(data)
    if not np.isfinite(audio).all():
        raise ValueError(f"{param}: {path} holds NaN or infinite samples")
    if float(np.abs(audio).max()) == 0.0:
        raise ValueError(f"{param}: {path} is silent (every sample is zero)")
    audio = resample(audio, int(rate))
    if max_seconds is not None and len(audio) > max_seconds * SAMPLE_RATE:
        raise ValueError(f"{param}: {path} is {len(audio) / SAMPLE_RATE:.1f} s long; the model listens to at most "
                         f"{max_seconds:g} s: trim it, e.g. `sox {path.name} out.wav trim 0 {max_seconds:g}`")
    return audio


__all__ = ["spoken_dataset", "spoken_sample", "speak", "read_audio", "resample", "KINDS", "SAMPLE_RATE"]
