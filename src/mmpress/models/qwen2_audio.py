"""Qwen2-Audio family (transformers ``Qwen2AudioForConditionalGeneration``): where its audio tokens
are and which signals its audio encoder gives. The pressing itself is the shared core
(``models/base.py``).

Where the audio tokens are: the processor (``Qwen2AudioProcessor``, Whisper's feature extractor:
16 kHz, a 160-sample hop, so 100 log-mel frames a second) pads every clip to 30 s (3000 frames,
``input_features`` (clips, mel bins, 3000)) and marks its real frames in
``feature_attention_mask``. The encoder (Whisper's: ``conv1`` stride 1, ``conv2`` stride 2, the
transformer blocks, then ``avg_pooler`` of 2) turns L real frames into
``((L - 1) // 2 + 1 - 2) // 2 + 1`` tokens (transformers' ``_get_feat_extract_output_lengths``,
the ``audio_output_lengths`` its forward uses; 750 for 30 s), which the projector (one linear
layer) writes, clip after clip, at the ``audio_token_id`` placeholders the processor expanded to
that count (``<|audio_bos|>`` and ``<|audio_eos|>`` around them are text and stay). One item per
clip, its tokens in time order, no grid (``Item.grid`` None): presses needing a patch grid or a
[CLS] token are refused (``check_stages``). Positions are 1-D RoPE, so both "keep" and
"reindex" apply.

generate: the model encodes the audio inside its forward in every transformers version mmpress
supports (5.18 to 5.25: its forward takes no ``mm_encoder_outputs``; generate passes
``input_features`` on its first step only), so nothing marks generate's first step:
``generate(whole conversation, past_key_values=pressed cache)`` is told by its shapes instead
(:class:`_Protocol`). With ``num_beams`` / ``num_return_sequences`` > 1, transformers repeats
each clip (not each row's clips) per sequence: one clip per row is right; a row of several clips
gets the wrong ones (silently, unpressed), which a press refuses when their lengths differ (it
cannot see it when they are equal).

Signals: ``audio_features`` (M, N, d_audio), the encoder's output per token as the projector
receives it (after the pooling and the final layer norm), from a forward pre-hook on the
projector (also given as ``vision_features``, "the tower's features as the projector receives
them", so a press written for vision towers that reads them, MMTok, runs on audio as on images);
``audio_energy`` (M, N), the mean log-mel energy of the input frames each token stands
for: the features averaged over the mel bins, then over the token's frames, padding frames
(``feature_attention_mask`` 0) left out. Which frames: ``conv2`` (stride 2) centres output frame
i on input frame 2i and the pool averages conv frames 2j and 2j + 1, so token j is centred on
mel frames 4j and 4j + 2: it stands for frames 4j .. 4j + 3 (40 ms; the convolutions' kernels
reach a frame or two further, into its neighbours' cells). The token count never exceeds the
cells with a real frame (a last cell of 3 real frames still gets a token, one of 1 or 2 does
not), so every token averages 3 or 4 real frames. Whisper's log-mel is already a log: the
silence the feature extractor pads with sits at its floor, the clip's loudest value less 8 (2
after its (x + 4) / 4 rescaling). ``audio_attn`` (M, 2, N, N), Samp's signal: the encoder's last
layer's softmax attention, recomputed from that layer's input (``q_proj`` x ``scaling``,
``k_proj``, each clip's real frames as keys, as the padding mask gives them), max and mean over
heads, pooled to tokens as SA-MAP pools it (a query token: the mean of its 2 frames' rows; a key
token: the sum of its 2 frames' columns).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmpress.flops import PrefillFlops, language_flops, transformer_flops
from mmpress.models.base import LLM_SIGNALS, Adapter, Item, family
from mmpress.models.examples import left_pad, lm_shape, pixel_tensor, qwen2_text, text_around
from mmpress.models.protocol import Protocol, cache_length
from mmpress.ops.audio import attention_to_tokens
from mmpress.presses.base import Press, VisualContext

AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = 3, 4, 5  # the placeholder ids of the random models below
SAMPLE_RATE, HOP = 16000, 160  # Whisper's feature extractor: 100 log-mel frames a second
FRAMES_PER_TOKEN = 4  # conv2's stride 2 x the pool's 2
MISSING = "audio signals missing: encode the audio inside the `with press(model):` block"


def audio_tokens(frames: int) -> int:
    """Tokens the encoder gives a clip of ``frames`` real log-mel frames: transformers'
    ``Qwen2AudioEncoder._get_feat_extract_output_lengths`` (conv2's stride 2, then the pool's 2),
    the count its processor expands each placeholder to and its forward scatters."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def clip_frames(seconds: float) -> int:
    """Real log-mel frames of a clip of ``seconds``: Whisper's feature extractor marks every
    ``HOP``-th sample of the sample mask, so ceil(samples / HOP)."""
    return math.ceil(round(seconds * SAMPLE_RATE) / HOP)


def token_energy(features: Tensor, mask: Tensor) -> Tensor:
    """(clips, T // 4 rounded up) the mean log-mel energy of each token's frames 4j .. 4j + 3
    (module docstring): ``features`` (clips, mel bins, T) averaged over the bins, then over the
    real frames (``mask`` (clips, T), 0 in padding) of each cell. At least float32."""
    dtype = torch.promote_types(features.dtype, torch.float32)
    m = mask.to(features.device, dtype)
    x = features.to(dtype).mean(dim=1) * m  # (clips, T)
    pad = -x.shape[1] % FRAMES_PER_TOKEN
    x, m = (torch.nn.functional.pad(t, (0, pad)).unflatten(1, (-1, FRAMES_PER_TOKEN)) for t in (x, m))
    return x.sum(dim=-1) / m.sum(dim=-1).clamp(min=1)


class _Protocol(Protocol):
    """transformers' protocol for a model whose generate encodes nothing beforehand (no
    ``mm_encoder_outputs`` marks its first step): generate's first call on a KV cache is told by its
    shapes instead. generate cuts the conversation at the cache's length and numbers the rest from
    there: a 2-D mask as wide as the cache plus the new ids (a call feeding only new tokens onto a
    pressed cache has a mask covering the whole prompt the cache stands for, which is longer than
    the cache), or, with no mask (batch 1: generate dropped an all-ones one), position ids starting
    at the cache's length (a host read, in that case only)."""

    def starts_generate(self, kwargs: dict) -> bool:
        ids, cache = kwargs.get("input_ids"), self.cache_of(kwargs)
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.shape[1] < 2 or cache is None:
            return False  # a decoding step, or a fresh prefill
        past, mask, pos = cache_length(cache), kwargs.get("attention_mask"), kwargs.get("position_ids")
        if isinstance(mask, Tensor):
            return mask.ndim == 2 and mask.shape[1] == past + ids.shape[1]
        return isinstance(pos, Tensor) and int(pos.reshape(-1)[0]) == past


@family
class Qwen2AudioAdapter(Adapter):
    """Applies presses to a Qwen2-Audio model (audio clips; positions "keep" or "reindex")."""

    family = "qwen2_audio"
    model_types = ("qwen2_audio",)
    classes = ("Qwen2AudioForConditionalGeneration",)
    signals = LLM_SIGNALS | {"text", "audio_features", "audio_energy", "audio_attn", "vision_features"}
    notes = ("audio clips (1-D, no grid, no [CLS]): audio_features = encoder output per token (after its 2x pool "
             "and layer norm) as the projector receives it; audio_energy = mean log-mel of the 4 input frames "
             "(40 ms) each token stands for; audio_attn = the encoder's last-layer attention pooled to tokens "
             "(Samp's); vision_features = audio_features (the tower's output the projector receives, for presses "
             "written for vision towers: MMTok)")
    example_rows = {"single": [[(0.64,)]], "ragged": [[(0.64,)], [(0.48,), (0.36,)], [(0.52,)], []]}
    bench_media = {"audio": (30.0,)}  # 3000 frames, 750 tokens

    def __init__(self, model, positions: str | None = None):
        super().__init__(model, positions)
        if not hasattr(self.vlm, "audio_tower") or not hasattr(self.vlm, "multi_modal_projector"):
            raise ValueError(f"{type(model).__name__} does not look like a transformers Qwen2-Audio model")
        self.token_ids = (self.config.audio_token_id,)
        self.protocol = _Protocol(self.protocol.cache, self.protocol.encoded_images)
        self.features: Tensor | None = None  # the projector's input of the last encoder call
        self._inputs: tuple[Tensor, Tensor] | None = None  # (input_features, feature_attention_mask) of this prefill
        self._energy: Tensor | None = None
        self._attn: Tensor | None = None  # (clips, 2, tokens, tokens) of this prefill
        self._frames: list[int] = []  # each clip's real log-mel frames, this prefill

    def visual_items(self, args, kwargs) -> list[Item]:
        names = ("input_ids", "input_features", "attention_mask", "feature_attention_mask")
        input_ids, features, _, feature_mask = (kwargs.get(n, args[i] if len(args) > i else None)
                                                for i, n in enumerate(names))
        token = self.config.audio_token_id
        self.features, self._inputs, self._energy, self._attn = None, None, None, None
        if features is None:
            # transformers embeds placeholders without features as text, silently; a call on a KV
            # cache may hold some (generate continuing a pressed cache passes the conversation from
            # the cache's length on, which is shorter than the prompt it stands for)
            fresh = not cache_length(self.protocol.cache_of(kwargs), self.attention_layers()[0])
            if fresh and isinstance(input_ids, Tensor) and bool((input_ids == token).any()):
                raise ValueError("the prompt holds audio placeholder tokens but no audio was given: pass input_features "
                                 "and feature_attention_mask (Qwen2AudioProcessor(text=..., audio=...) returns them)")
            return []
        if isinstance(input_ids, Tensor) and input_ids.shape[-1] == 1:
            return []  # Qwen2AudioModel encodes no audio for a one-token call
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("Qwen2-Audio ignores input_features when given inputs_embeds: pass input_ids (the "
                             "processor's, its audio placeholders expanded) with input_features")
        if feature_mask is None:
            raise ValueError("Qwen2-Audio needs feature_attention_mask with input_features (the real frames of each "
                             "clip: Qwen2AudioProcessor returns it)")
        if features.ndim != 3 or tuple(feature_mask.shape) != (features.shape[0], features.shape[-1]):
            raise ValueError(f"input_features {tuple(features.shape)} (clips, mel bins, frames) and "
                             f"feature_attention_mask {tuple(feature_mask.shape)} (clips, frames) do not match")
        self._inputs = (features, feature_mask)
        # one host read (the clips' real frames), before the encoder's work is queued
        frames = self._frames = [int(f) for f in feature_mask.sum(dim=-1).tolist()]
        return [Item(token, n, None, i, kind="audio") for i, n in enumerate(map(audio_tokens, frames)) if n > 0]

    def _rows(self, items: list[Item], counts: dict[int, list[int]]) -> list[int]:
        try:
            return super()._rows(items, counts)
        except ValueError as e:
            raise ValueError(f"{e}. Qwen2-Audio: each clip gives as many tokens as its feature_attention_mask says, "
                             "clip after clip into the placeholders. Under generate with num_beams or "
                             "num_return_sequences > 1, transformers repeats each clip, not each row's clips, so a row "
                             "of several clips no longer lines up (unpressed, it fills the placeholders with the wrong "
                             "clips): give such rows one clip each, or generate with one beam") from None

    def check_stages(self, stages: dict[str, Press]) -> None:
        for press in stages.values():
            missing = [s for s in press.needs if s not in self.signals | self.line_signals(press)]
            if missing:
                raise ValueError(f"{type(press).__name__} needs {', '.join(map(repr, missing))}, which Qwen2-Audio's "
                                 "audio clips do not have: they are 1-D sequences of audio frames, with no patch grid "
                                 "and no [CLS] token or vision tower. Pick a press that runs on audio (mmpress list "
                                 "shows them per family): e.g. random, uniform, pool, divprune, tome, mmtok, cdpruner, "
                                 "fastv, snapkv")

    # ---- signals ------------------------------------------------------------------------------
    def signal_hooks(self, press: Press) -> list:
        handles = []
        if {"audio_features", "vision_features"} & set(press.needs):
            handles.append(self.vlm.multi_modal_projector.register_forward_pre_hook(self._projector_hook))
        if "audio_attn" in press.needs:
            handles.append(self.vlm.audio_tower.layers[-1].self_attn.register_forward_pre_hook(
                self._attention_hook, with_kwargs=True))
        return handles

    def _attention_hook(self, module, args, kwargs):
        """``audio_attn`` (module docstring): the last encoder layer's softmax attention over each
        clip's real frames (the keys its padding mask leaves), max and mean over heads, pooled to
        the clip's tokens; (clips, 2, T, T) for the longest clip's T tokens, zero beyond a clip's."""
        if self._inputs is None:
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # (clips, frames, d), layer-normed
        clips, frames, _ = hidden.shape
        device, mel = hidden.device, self._frames
        real = torch.tensor([(f - 1) // 2 + 1 for f in mel], device=device)  # each clip's frames after conv2
        counts = [audio_tokens(f) for f in mel]
        tokens = max(counts)
        if tokens < 1:
            return
        q = (module.q_proj(hidden) * module.scaling).view(clips, frames, module.num_heads, -1).transpose(1, 2)
        k = module.k_proj(hidden).view(clips, frames, module.num_heads, -1).transpose(1, 2)
        q, k = q[:, :, :2 * tokens].float(), k.float()
        logits = q @ k.transpose(-1, -2)  # (clips, heads, 2T, frames)
        logits = logits.masked_fill((torch.arange(frames, device=device) >= real[:, None])[:, None, None], -math.inf)
        w = logits.softmax(dim=-1)[..., :2 * tokens]
        pooled = attention_to_tokens(torch.stack([w.amax(dim=1), w.mean(dim=1)], dim=1), tokens)  # (clips, 2, T, T)
        inside = torch.arange(tokens, device=device) < torch.tensor(counts, device=device)[:, None]  # a clip's own
        self._attn = pooled * (inside[:, None, :, None] & inside[:, None, None, :])

    def _projector_hook(self, module, args):
        self.features = args[0]  # (clips, the padded input's pooled frames (750 at 30 s), d_audio)

    def fill_signals(self, press: Press, ctx: VisualContext, items: list[Item]) -> None:
        sources, n = [item.source for item in items], items[0].length
        needs = set(press.needs)
        device = self.lm.get_input_embeddings().weight.device
        device = None if device.type == "meta" else device  # offloaded: leave them where they are

        def tokens(per_clip: Tensor) -> Tensor:  # (clips, T', ...) -> (M, n, ...) for the group's clips
            if max(sources) >= per_clip.shape[0] or per_clip.shape[1] < n:
                raise ValueError(f"audio signal covers {tuple(per_clip.shape[:2])} clips x tokens, the LM sees "
                                 f"{len(items)} clips of {n}")
            out = per_clip[:, :n] if sources == list(range(per_clip.shape[0])) else per_clip[sources, :n]
            return out if device is None else out.to(device)

        if {"audio_features", "vision_features"} & needs:
            if self.features is None:
                raise ValueError(MISSING)
            ctx.audio_features = ctx.vision_features = tokens(self.features)
        if "audio_energy" in needs:
            if self._inputs is None:
                raise ValueError(MISSING)
            if self._energy is None:  # once per prefill, for every clip
                self._energy = token_energy(*self._inputs)
            ctx.audio_energy = tokens(self._energy)
        if "audio_attn" in needs:
            if self._attn is None:
                raise ValueError(MISSING)
            if max(sources) >= self._attn.shape[0] or self._attn.shape[-1] < n:
                raise ValueError(f"audio_attn covers {tuple(self._attn.shape[:1])} clips of {self._attn.shape[-1]} "
                                 f"tokens, the LM sees {len(items)} clips of {n}")
            attn = self._attn[sources][:, :, :n, :n]
            ctx.audio_attn = attn if device is None else attn.to(device)

    # ---- cost and shapes ------------------------------------------------------------------------
    @classmethod
    def prefill_flops(cls, config, inputs: dict, seq_len: int, layer_seq_len=None) -> PrefillFlops:
        """The encoder over every clip's whole padded input (30 s: 3000 log-mel frames, 1500 after
        ``conv2``; its blocks attend over all 1500, masked or not), the projector over every
        clip's ``max_source_positions / 2`` pooled tokens (padded ones too: it runs on the whole
        pooled output), and ``batch`` rows of ``seq_len`` LM tokens."""
        audio, text = config.audio_config, config.text_config
        batch = inputs["input_ids"].shape[0]
        features = inputs.get("input_features")
        clips = features.shape[0] if features is not None else 0
        frames = audio.max_source_positions  # after conv2
        width = audio.d_model
        convs = 2.0 * 3 * width * (2 * frames * audio.num_mel_bins + frames * width)  # kernel 3, conv2 at stride 2
        encoder = clips * convs + transformer_flops(audio, frames, batch=clips)
        projector = 2.0 * clips * (frames // 2) * width * text.hidden_size
        return PrefillFlops(encoder, projector, language_flops(text, seq_len, batch, layer_seq_len))

    @classmethod
    def build(cls, size: str = "tiny", seed: int = 0, attn: str = "sdpa", model_type: str | None = None,
              **overrides):
        """"real": Qwen2-Audio-7B's encoder (Whisper-large-v3's: 32 x 1280, 20 heads, 128 mel bins,
        1500 positions: a 30 s clip, 750 tokens) scaled for a CPU as the vision families' towers
        are (Qwen2.5-VL's 32 x 1280 -> 8 x 640): 8 x 640, 10 heads of 64, MLP 4 x width, with the
        shared 12 x 896 LM. "tiny": a 2 x 32 encoder of 8 mel bins and 32 positions (64 frames,
        0.64 s, 16 tokens). ``vision_layers`` / ``vision_hidden`` (``bench-cost``'s tower sizes),
        ``mel_bins`` and ``source_positions`` override."""
        from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration
        from transformers.models.qwen2_audio.configuration_qwen2_audio import Qwen2AudioEncoderConfig

        if model_type not in (None, *cls.model_types):
            raise ValueError(f"{cls.family} builds {cls.model_types}, not {model_type!r}")
        real = dict(vision_layers=8, vision_hidden=640, mel_bins=128, source_positions=1500)
        tiny = dict(vision_layers=2, vision_hidden=32, mel_bins=8, source_positions=32)
        shape = {**lm_shape(size), **(real if size == "real" else tiny), **overrides}
        torch.manual_seed(seed)
        width = shape["vision_hidden"]
        audio = Qwen2AudioEncoderConfig(d_model=width, encoder_layers=shape["vision_layers"],
                                        encoder_attention_heads=max(1, width // 64) if size == "real" else 4,
                                        encoder_ffn_dim=4 * width if size == "real" else 2 * width,
                                        num_mel_bins=shape["mel_bins"], max_source_positions=shape["source_positions"])
        config = Qwen2AudioConfig(audio_config=audio, text_config=qwen2_text(shape), audio_token_index=AUDIO_TOKEN)
        config._attn_implementation = attn
        model = Qwen2AudioForConditionalGeneration(config).eval()
        model.generation_config.pad_token_id = 0
        return model

    @classmethod
    def prompts(cls, model, rows: list, kind: str = "audio", seed: int = 0, first_row: int = 0) -> dict:
        """Left-padded rows as ``Qwen2AudioProcessor`` lays them out: a few system tokens, each clip
        as ``<|audio_bos|>`` + one placeholder per token + ``<|audio_eos|>``, a question of ragged
        length; ``input_features`` (clips, mel bins, 2 x max_source_positions) padded with the
        clip's silence floor (its loudest value less 2, Whisper's floor after rescaling) and
        ``feature_attention_mask`` marking the real frames. A clip is ``(seconds,)``."""
        if kind != "audio":
            raise ValueError(f"Qwen2-Audio takes audio clips only, not {kind!r}")
        audio = model.config.audio_config
        window = 2 * audio.max_source_positions  # the frames the encoder takes (3000: 30 s)
        vocab = model.config.text_config.vocab_size
        sequences, clips, masks = [], [], []
        for i, row in enumerate(rows):
            tokens = []
            for j, clip in enumerate(row):
                if len(clip) != 1:
                    raise ValueError(f"a Qwen2-Audio clip is (seconds,), got {clip}")
                frames = clip_frames(clip[0])
                if not 0 < frames <= window:
                    raise ValueError(f"this Qwen2-Audio encoder takes clips of up to {window / 100:g} s ({window} "
                                     f"frames), got {clip[0]} s")
                real = pixel_tensor((audio.num_mel_bins, frames), seed, first_row + i, j)
                floor = real.max() - 2.0
                padded = torch.full((audio.num_mel_bins, window), float(floor))
                padded[:, :frames] = real.clamp(min=floor)
                clips.append(padded)
                masks.append(torch.arange(window) < frames)
                tokens.append([AUDIO_BOS, *[AUDIO_TOKEN] * audio_tokens(frames), AUDIO_EOS])
            sequences.append(text_around(tokens, first_row + i, seed, 33 if vocab > 1000 else 12, vocab))
        inputs = left_pad(sequences)
        if clips:
            inputs["input_features"] = torch.stack(clips)
            inputs["feature_attention_mask"] = torch.stack(masks).long()
        return inputs

    @classmethod
    def encode(cls, model, inputs: dict) -> None:
        """The encoder and projector alone over every clip, with the encoder's attention mask over
        each clip's real conv frames, as ``Qwen2AudioModel.forward`` builds it."""
        from transformers.masking_utils import create_bidirectional_mask

        vlm = model.model
        tower, features = vlm.audio_tower, inputs["input_features"]
        lengths, _ = tower._get_feat_extract_output_lengths(inputs["feature_attention_mask"].sum(-1))
        frames = (features.shape[-1] - 2) // 2 + 1
        mask = (torch.arange(frames, device=lengths.device) < lengths[:, None]).long()
        dummy = torch.zeros(features.shape[0], frames, 1, dtype=tower.conv1.weight.dtype, device=features.device)
        mask = create_bidirectional_mask(config=tower.config, inputs_embeds=dummy, attention_mask=mask)
        vlm.multi_modal_projector(tower(features, attention_mask=mask).last_hidden_state)
