"""Qwen2.5-Omni's thinker (transformers ``Qwen2_5OmniThinkerForConditionalGeneration``): images,
videos and audio clips in one prompt, TMRoPE positions, and a video's audio interleaved with its
frames. The pressing itself is the shared core (``models/base.py``); the vision tower is
Qwen2.5-VL's, so images and videos are the Qwen-VL family file's (``models/qwen_vl.py``, subclassed
here), and this file adds the audio.

Where the tokens are: an image / video fills ``image_token_id`` / ``video_token_id`` placeholders
between vision-start / vision-end as in Qwen2.5-VL; an audio clip fills ``audio_token_id``
placeholders between audio-start / audio-end. The audio encoder (Whisper-shaped) runs a
stride-2 convolution then a stride-2 average pool, so a clip of ``L`` mel frames (its row of
``feature_attention_mask``) gives ``((L - 1) // 2 + 1 - 2) // 2 + 1`` tokens, each covering 4
frames (40 ms); the clips' features fill the audio placeholders in order. With
``use_audio_in_video=True`` a video and its audio track share one vision-start / audio-start
pair, and the processor writes their placeholders in alternating chunks of
``seconds_per_chunk`` seconds: a chunk of the video's frames, then that stretch of its audio, and
so on. Neither item is contiguous then; the core finds each item's tokens by placeholder id in
order (``Layout.flats``), so a video still reads its tokens in raster order over (t, h, w) and a
clip in time order. Items: the images, then the videos (as Qwen-VL), then the audio clips, each
kind in placeholder order; an audio item has no grid (1-D, time order).

Positions: TMRoPE, transformers' ``get_rope_index``: 3-D (t, h, w) M-RoPE ids for vision tokens,
with a video's temporal id ``t * second_per_grid * position_id_per_seconds`` (its time in units
of 40 ms) and an audio token's id its own index from the clip's start (one id per 40 ms), so a
video and its audio line up in time. Positions are always kept (``positions="keep"``): kept
tokens keep their ids, and decoding continues from ``rope_deltas``, as Qwen-VL.

Signals: images and videos get Qwen-VL's (attention received in the last full-attention vision
block, its keys, the merger's input; see ``qwen_vl.py``): the Omni vision attention projects
``q`` / ``k`` separately instead of one fused ``qkv``, the only difference. Audio items get
``audio_features``, each token's encoder output as the projector receives it (the input of the
audio tower's ``proj``, after the pool and ``ln_post``: the Omni tower holds its projector), and
``audio_energy``, the mean log-mel energy of the 4 input frames (40 ms) each token stands for
(Qwen2-Audio's ``token_energy``, whose docstring says which frames; silence is low), from
``input_features``, each clip's real frames taken in order as the Omni encoder takes them;
``vision_features`` of an audio item is its ``audio_features`` (the encoder output the projector
receives, as Qwen2-Audio's file gives it, so MMTok runs on audio); ``audio_attn`` (Samp's), the
last audio layer's softmax attention pooled to tokens (``_audio_attention_hook``: the Omni
encoder attends within chunks of ``n_window`` convolved frames, 2 s, so it is zero across them).
A press needing other vision signals on an audio item, or audio signals on an image or video,
raises.

generate: images and videos are encoded before the forward (``mm_encoder_outputs``, repeated per
beam / returned sequence row by row), audio inside it from ``input_features``, which generate
repeats clip by clip (``repeat_interleave``): one clip per row is right; a row of several clips
gets the wrong ones (silently, unpressed), which a press refuses when their lengths differ (it
cannot see it when they are equal), as Qwen2-Audio's file does. In-vision presses (Qwen-VL's
tower on fewer patches) are not offered here (``vision_modes`` empty): they raise.

transformers versions: from 5.24 the thinker wraps a ``Qwen2_5OmniThinkerModel`` (``.model``,
holding ``language_model``, ``visual``, ``audio_tower``); 5.18 puts those on the thinker itself,
its text model under ``.model``. The adapter reads whichever the installed version builds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmpress.flops import PrefillFlops, language_flops
from mmpress.models.base import LLM_SIGNALS, VISION_SIGNALS, Item, family
from mmpress.models.examples import left_pad, lm_shape, pixel_tensor, text_around, text_config
from mmpress.models.qwen2_audio import audio_tokens, clip_frames, token_energy
from mmpress.models.qwen_vl import QwenVLAdapter, vision_flops
from mmpress.ops.audio import attention_to_tokens
from mmpress.presses.base import Press, VisualContext

AUDIO_SIGNALS = frozenset({"audio_features", "audio_energy", "audio_attn"})
#: vision-tower signals (an audio item has none of them)
TOWER_SIGNALS = VISION_SIGNALS - {"grid", "text"}
PADDED_FRAMES = 3000  # the processor pads every clip's features to 30 s
# placeholder and marker ids of the random models below (text ids start at 10)
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END, AUDIO_TOKEN, AUDIO_START, AUDIO_END = 3, 4, 5, 6, 7, 8, 9


def clip_energy(features: Tensor, mask: Tensor, tokens: int) -> Tensor:
    """(C, tokens) each audio token's mean log-mel energy (Qwen2-Audio's ``token_energy``: the
    frames 4j .. 4j + 3 it stands for, averaged over the mel bins and the real frames).
    ``features`` (C, mel, F), ``mask`` (C, F) the ``feature_attention_mask``. The Omni encoder
    takes each clip's real frames in order wherever the mask holds them, so they are moved to the
    front first (the processor's masks are prefixes already: then this changes nothing)."""
    order = (mask == 0).long().argsort(dim=1, stable=True)  # real frames first, in order
    front = features.gather(2, order[:, None].expand_as(features).to(features.device))
    return token_energy(front, mask.gather(1, order))[:, :tokens]


def audio_flops(audio_cfg, frames: list[int]) -> tuple[float, float]:
    """FLOPs of the Omni audio encoder over clips of ``frames`` mel frames, all encoded in one call:
    (encoder, projector). Each clip is cut into chunks of ``2 * n_window`` frames; the two
    convolutions (kernel 3, the second with stride 2) run on every chunk padded to the call's
    longest, then every encoder layer attends within each chunk's real convolved frames; the
    pooled tokens go through ``proj`` (the projector)."""
    d, ffn, mel = audio_cfg.d_model, audio_cfg.encoder_ffn_dim, audio_cfg.num_mel_bins
    window = 2 * audio_cfg.n_window
    chunks = [c for length in frames for c in [window] * (length // window) + ([length % window] if length % window
                                                                                  else [])]
    if not chunks:
        return 0.0, 0.0
    after = [(c - 1) // 2 + 1 for c in chunks]  # each chunk's frames after the stride-2 convolution
    longest = max(chunks)
    convs = 2.0 * 3 * len(chunks) * (longest * mel * d + ((longest - 1) // 2 + 1) * d * d)
    per_frame = 4 * d * d + 2 * d * ffn  # q, k, v, out; a plain 2-matrix MLP
    layers = 2.0 * audio_cfg.encoder_layers * (sum(after) * per_frame + 2 * d * sum(a * a for a in after))
    tokens = sum(map(audio_tokens, frames))
    return convs + layers, 2.0 * tokens * d * audio_cfg.output_dim


@family
class QwenOmniAdapter(QwenVLAdapter):
    """Applies presses to Qwen2.5-Omni's thinker: images, videos and audio clips (positions kept)."""

    family = "qwen2_5_omni"
    model_types = ("qwen2_5_omni_thinker",)
    classes = ("Qwen2_5OmniThinkerForConditionalGeneration",)
    signals = VISION_SIGNALS | LLM_SIGNALS | AUDIO_SIGNALS
    notes = ("images / videos: Qwen2.5-VL's signals (no [CLS]: attention received in the last full-attention "
             "block); audio: audio_features = the audio tower's output before its proj, audio_energy = mean "
             "log-mel of each token's 4 frames, audio_attn = its last layer's attention (within 2 s chunks) pooled "
             "to tokens; TMRoPE positions kept")
    # media: (h, w) px an image; (frames, h, w) a video; (seconds,) an audio clip; (frames, h, w,
    # seconds) a video with its audio track (the batch then runs with use_audio_in_video=True)
    example_rows = {"single": [[(32, 32)]], "ragged": [[(32, 32)], [(32, 48), (32, 32)], []],
                    "video": [[(4, 32, 32)]],
                    "audio": [[(0.64,)], [(0.37,), (0.24,)], []],
                    "mixed": [[(32, 32), (4, 32, 32), (0.64,)], [(0.48,), (32, 48)], []],
                    "video_audio": [[(4, 32, 32, 0.48)], [(6, 32, 32, 0.4), (0.2,)]]}
    bench_media = {"image": (896, 896), "video": (16, 448, 448), "audio": (30.0,)}  # 1024; 8 x 256; 750 tokens

    def __init__(self, model, positions: str | None = None):
        # 5.24+: thinker.model is the multimodal model (language_model, visual, audio_tower);
        # 5.18: those sit on the thinker, its text model at .model
        inner = getattr(model, "model", None)
        if not hasattr(inner, "language_model") and hasattr(model, "audio_tower"):
            self.language_model_attr = "model"
        super().__init__(model, positions)
        if not hasattr(self.vlm, "audio_tower"):
            raise ValueError(f"{type(model).__name__} does not look like a transformers Qwen2.5-Omni thinker")
        self.token_ids = (*self.token_ids, self.config.audio_token_id)
        self._audio: dict | None = None  # this forward's audio inputs and, once encoded, their features

    # ---- items --------------------------------------------------------------------------------
    def visual_items(self, args, kwargs) -> list[Item]:
        items = super().visual_items(args, kwargs)
        self._audio = None
        features, ids = kwargs.get("input_features"), kwargs.get("input_ids", args[0] if args else None)
        if features is None:  # decoding steps (generate passes only the feature mask), or no audio
            # transformers would embed audio placeholders without features as text, silently
            if isinstance(ids, Tensor) and ids.shape[-1] > 1 and bool((ids == self.config.audio_token_id).any()):
                raise ValueError("the prompt holds audio placeholder tokens but no audio was given: pass input_features "
                                 "and feature_attention_mask (the Qwen2.5-Omni processor returns them with audio=...)")
            return items
        mask = kwargs.get("feature_attention_mask")
        if mask is None or mask.shape != (features.shape[0], features.shape[-1]):
            raise ValueError("pressing Qwen2.5-Omni audio needs feature_attention_mask (clips, frames) with "
                             "input_features (clips, mel, frames): the processor returns both (its per-clip lengths "
                             "say how many audio tokens each clip fills)")
        frames = mask.sum(dim=-1).tolist()  # one host read: the clips' real frames, as the model's encoder reads them
        lengths = [audio_tokens(f) for f in frames]
        if min(lengths) < 1:
            raise ValueError(f"an audio clip of {min(frames)} mel frames gives no audio token: drop it or pass at least "
                             "3 frames")
        self._audio = {"features": features, "mask": mask, "frames": frames, "lengths": lengths, "encoded": None,
                       "attn": None}
        return items + [Item(self.config.audio_token_id, n, None, i, kind="audio") for i, n in enumerate(lengths)]

    def _rows(self, items: list[Item], counts: dict[int, list[int]]) -> list[int]:
        try:
            return super()._rows(items, counts)
        except ValueError as e:
            if items and items[-1].kind == "audio":  # (images, videos, then clips)
                raise ValueError(f"{e}. Qwen2.5-Omni: each clip fills as many audio placeholders as its "
                                 "feature_attention_mask gives tokens, clip after clip. Under generate with num_beams or "
                                 "num_return_sequences > 1, transformers repeats each clip, not each row's clips, so a row "
                                 "of several clips no longer lines up (unpressed, it fills the placeholders with the wrong "
                                 "clips): give such rows one clip each, or generate with one beam") from None
            raise

    # ---- signals ------------------------------------------------------------------------------
    @staticmethod
    def _queries_keys(module, hidden: Tensor) -> tuple[Tensor, Tensor]:
        s = hidden.shape[0]  # the Omni vision attention projects q, k, v separately
        return module.q(hidden).reshape(s, module.num_heads, -1), module.k(hidden).reshape(s, module.num_heads, -1)

    def signal_hooks(self, press) -> list:
        handles = super().signal_hooks(press)
        tower = self.vlm.audio_tower
        if {"audio_features", "vision_features"} & set(press.needs):
            handles.append(tower.proj.register_forward_pre_hook(self._audio_hook))
        if "audio_attn" in press.needs:
            handles.append(tower.layers[-1].self_attn.register_forward_pre_hook(self._audio_attention_hook,
                                                                                 with_kwargs=True))
        return handles

    def _audio_attention_hook(self, module, args, kwargs):
        """``audio_attn``: the last audio layer's softmax attention, recomputed from its input as the
        module does (``q_proj`` / ``k_proj``, ``scaling``; each chunk of ``n_window`` convolved frames
        attends within itself: ``cu_seqlens``), per clip (zero across its chunks), max and mean over
        heads, then pooled to tokens as SA-MAP pools Qwen2-Audio's: a query token the mean of its 2
        frames' rows, a key token the sum of its 2 frames' columns (the pool averages frames 2i, 2i + 1)."""
        audio = self._audio
        if audio is None:
            return
        hidden, cu = kwargs.get("hidden_states", args[0] if args else None), kwargs.get("cu_seqlens")
        if cu is None:
            raise ValueError(f"{type(module).__name__} got no cu_seqlens: this transformers version calls the Qwen2.5-Omni "
                             "audio attention differently; mmpress cannot give audio_attn")
        s, heads = hidden.shape[0], module.num_heads
        q = module.q_proj(hidden).view(s, heads, -1).transpose(0, 1).float()
        k = module.k_proj(hidden).view(s, heads, -1).transpose(0, 1).float()
        bounds = cu.tolist()  # the module's own path reads them to the host too
        window = 2 * self.vlm.audio_tower.n_window
        chunks = [-(-f // window) for f in audio["frames"]]  # each clip's chunks, in order in cu_seqlens
        if len(bounds) - 1 != sum(chunks):
            return
        out, first = [], 0
        for n, count in zip(audio["lengths"], chunks):
            start, end = bounds[first], bounds[first + count]
            full = q.new_zeros(2, end - start, end - start)
            for a, b in zip(bounds[first:first + count], bounds[first + 1:first + count + 1]):
                w = (q[:, a:b] @ k[:, a:b].transpose(1, 2) * module.scaling).softmax(dim=-1)  # (heads, c, c)
                full[:, a - start:b - start, a - start:b - start] = torch.stack([w.amax(dim=0), w.mean(dim=0)])
            out.append(attention_to_tokens(full, n))  # (2, n, n)
            first += count
        audio["attn"] = out

    def _audio_hook(self, module, args):
        """``audio_features``: what the audio tower's ``proj`` receives, the clips' tokens in order."""
        audio = self._audio
        if audio is not None and args[0].shape[0] == sum(audio["lengths"]):
            audio["encoded"] = list(args[0].split(audio["lengths"]))

    def fill_signals(self, press: Press, ctx: VisualContext, items: list[Item]) -> None:
        needs = set(press.needs)
        if items[0].kind != "audio":
            if needs & AUDIO_SIGNALS:
                raise ValueError(f"{type(press).__name__} needs {sorted(needs & AUDIO_SIGNALS)}, audio signals, which this "
                                 f"prompt's {items[0].kind}s do not have: for a prompt with images or videos, pick a "
                                 "press that needs only the tokens (random, divprune, tome, audio_merge, ...)")
            if needs & TOWER_SIGNALS:
                super().fill_signals(press, ctx, items)
            return
        lacking = needs & TOWER_SIGNALS - {"vision_features"}
        if lacking:
            raise ValueError(f"{type(press).__name__} needs {sorted(lacking)} from the vision tower, which audio clips do "
                             "not have: pick a press that needs only the tokens (random, divprune, tome, mmtok, ...) or "
                             "an audio press")
        audio, sources, n = self._audio, [item.source for item in items], items[0].length
        if audio is None:
            raise ValueError("audio signals missing: pass input_features with feature_attention_mask in the call")
        if {"audio_features", "vision_features"} & needs:
            if audio["encoded"] is None:
                raise ValueError("audio_features missing: encode the audio inside the `with press(model):` block")
            # also as vision_features, the tower's output as the projector receives it (MMTok reads it)
            ctx.audio_features = ctx.vision_features = torch.stack([audio["encoded"][s] for s in sources])
        if "audio_attn" in needs:
            if audio["attn"] is None:
                raise ValueError("audio_attn missing: encode the audio inside the `with press(model):` block")
            ctx.audio_attn = torch.stack([audio["attn"][s] for s in sources])
        if "audio_energy" in needs:
            if audio.get("energy") is None:  # once per prefill, for every clip
                audio["energy"] = clip_energy(audio["features"], audio["mask"], max(audio["lengths"]))
            energy = audio["energy"]
            ctx.audio_energy = energy[torch.tensor(sources, device=energy.device), :n]

    # ---- cost and shapes ------------------------------------------------------------------------
    @classmethod
    def prefill_flops(cls, config, inputs: dict, seq_len: int, layer_seq_len=None) -> PrefillFlops:
        """The vision tower over every image and video, the audio encoder over every clip
        (``feature_attention_mask``), the merger and the audio ``proj`` as the projector, and
        ``batch`` rows of ``seq_len`` LM tokens."""
        grids = [g for key in ("image_grid_thw", "video_grid_thw") if inputs.get(key) is not None
                 for g in inputs[key].tolist()]
        tower, merger = vision_flops(config.vision_config, grids) if grids else (0.0, 0.0)
        mask = inputs.get("feature_attention_mask")
        encoder, proj = audio_flops(config.audio_config, mask.sum(-1).tolist()) if mask is not None else (0.0, 0.0)
        batch = inputs["input_ids"].shape[0]
        return PrefillFlops(tower + encoder, merger + proj,
                            language_flops(config.text_config, seq_len, batch, layer_seq_len))

    @classmethod
    def build(cls, size: str = "tiny", seed: int = 0, attn: str = "sdpa", model_type: str | None = None,
              **overrides):
        """"real": Qwen2.5-Omni-7B's thinker scaled for a CPU as the other families: the vision
        tower as Qwen-VL's "real" (8 x 640, windows of 112 px, full attention in blocks 3 and 7), the
        audio encoder (32 x 1280, 128 mel bins, chunks of 200 frames) scaled alike to 8 x 640, the
        shared 12 x 896 LM with M-RoPE; 25 position ids per second, chunks of 2 s. "tiny": 2-block
        towers of 32, 4 px patches, 8 mel bins and chunks of 16 frames; 4 ids per second, chunks of
        1 s (so a tiny video interleaves its audio every temporal step). ``audio_layers`` /
        ``audio_hidden`` (default: the vision tower's), ``mel_bins``, ``n_window``, ``ids_per_second``,
        ``seconds_per_chunk`` and ``extra`` (other config fields) override too."""
        from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

        model_type = model_type or cls.model_types[0]
        if model_type not in cls.model_types:
            raise ValueError(f"{cls.family} builds {cls.model_types}, not {model_type!r}")
        real = dict(vision_layers=8, vision_hidden=640, patch_size=14, window_size=112, mel_bins=128, n_window=100,
                    ids_per_second=25, seconds_per_chunk=2)
        tiny = dict(vision_layers=2, vision_hidden=32, patch_size=4, window_size=16, mel_bins=8, n_window=8,
                    ids_per_second=4, seconds_per_chunk=1)
        shape = {**lm_shape(size), **(real if size == "real" else tiny), "merge": 2, "temporal_patch": 2,
                 "fullatt_blocks": None, "vision_intermediate": None, "extra": {}, **overrides}
        # both towers are 32 x 1280 in 7B: the audio encoder takes the vision tower's size (bench-cost's
        # --vision-layers / --vision-hidden size the tower of either input) unless given its own
        shape.setdefault("audio_layers", shape["vision_layers"])
        shape.setdefault("audio_hidden", shape["vision_hidden"])
        torch.manual_seed(seed)
        hidden, heads, width = shape["lm_hidden"], shape["lm_heads"], shape["vision_hidden"]
        half = hidden // heads // 2  # M-RoPE splits the rotary half of a head as 7B does
        mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        text = text_config(shape, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope})
        vision = dict(depth=shape["vision_layers"], num_heads=max(1, width // 64) if size == "real" else 4,
                      patch_size=shape["patch_size"], spatial_merge_size=shape["merge"],
                      temporal_patch_size=shape["temporal_patch"], in_channels=3,
                      **QwenVLAdapter._vision_config("qwen2_5_vl", shape, text))
        a = shape["audio_hidden"]
        audio = dict(num_mel_bins=shape["mel_bins"], encoder_layers=shape["audio_layers"],
                     encoder_attention_heads=max(1, a // 64) if size == "real" else 4, encoder_ffn_dim=4 * a, d_model=a,
                     max_source_positions=max(1500, shape["n_window"]), n_window=shape["n_window"], output_dim=hidden)
        tokens = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, audio_token_id=AUDIO_TOKEN,
                      vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                      audio_start_token_id=AUDIO_START, audio_end_token_id=AUDIO_END)
        config = Qwen2_5OmniThinkerConfig(text_config=text, vision_config=vision, audio_config=audio, **tokens,
                                          position_id_per_seconds=shape["ids_per_second"],
                                          seconds_per_chunk=shape["seconds_per_chunk"], **shape["extra"])
        config._attn_implementation = attn
        model = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
        model.generation_config.pad_token_id = 0
        return model

    @classmethod
    def prompts(cls, model, rows: list, kind: str = "image", seed: int = 0, first_row: int = 0) -> dict:
        """Left-padded rows as the Omni processor lays them out: a few system tokens, each medium
        between its markers, a question of ragged length. A medium is (h, w) px (an image),
        (frames, h, w) (a video, two frames per temporal step: the processor's default 2 fps),
        (seconds,) (an audio clip) or (frames, h, w, seconds) (a video with its audio track, the
        two interleaved chunk by chunk; every video of the batch must then have one:
        ``use_audio_in_video`` is one flag per call). Pixels as flattened patches with
        ``{kind}_grid_thw``; audio as Whisper-like log-mel ``input_features`` (clips, mel bins,
        3000: the processor pads every clip to 30 s) with the clip's silence floor (its loudest
        value less 2) in the padding, and ``feature_attention_mask`` marking the real frames."""
        config = model.config
        vision = config.vision_config
        patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        vocab = config.text_config.vocab_size
        media = [m for row in rows for m in row]
        wrong = [m for m in media if len(m) not in (1, 2, 3, 4)]
        if wrong:
            raise ValueError(f"a Qwen2.5-Omni medium is (h, w), (frames, h, w), (seconds,) or (frames, h, w, seconds); "
                             f"got {wrong}")
        with_audio = [len(m) == 4 for m in media if len(m) >= 3]
        if any(with_audio) and not all(with_audio):
            raise ValueError("use_audio_in_video is one flag per call: give every video of the batch its audio track "
                             "(frames, h, w, seconds), or none")
        sequences, pixels, clips = [], {"image": [], "video": []}, []
        for i, row in enumerate(rows):
            tokens = []
            for j, size in enumerate(row):
                if len(size) == 1:
                    clips.append(cls._clip(model, size[0], seed, first_row + i, j))
                    tokens.append([AUDIO_START, *[AUDIO_TOKEN] * clips[-1][1], AUDIO_END])
                    continue
                frames, (h, w) = (size[0], size[1:3]) if len(size) >= 3 else (1, size)
                if h % (patch * merge) or w % (patch * merge):
                    raise ValueError(f"a Qwen2.5-Omni picture's sides must be multiples of {patch * merge} px, got {size}")
                grid = (-(-frames // temporal), h // patch, w // patch)
                flat = pixel_tensor((grid[0] * grid[1] * grid[2], 3 * temporal * patch**2), seed, first_row + i, j)
                pixels["video" if len(size) >= 3 else "image"].append((grid, flat))
                if len(size) == 4:  # its audio track: a clip of its own, drawn apart from the pixels
                    clips.append(cls._clip(model, size[3], seed, first_row + i, j + 1000))
                    tokens.append(cls._video_audio_tokens(model, grid, clips[-1][1]))
                else:
                    tokens.append(QwenVLAdapter._medium_tokens(config, grid, len(size) == 3))
            sequences.append(text_around(tokens, first_row + i, seed, 33 if vocab > 1000 else 12, vocab))
        inputs = left_pad(sequences)
        for name, items in pixels.items():
            if items:
                inputs["pixel_values" if name == "image" else "pixel_values_videos"] = torch.cat([p for _, p in items])
                inputs[f"{name}_grid_thw"] = torch.tensor([g for g, _ in items])
        if pixels["video"]:  # the processor's temporal_patch_size / fps at its default 2 fps
            inputs["video_second_per_grid"] = torch.full((len(pixels["video"]),), temporal / 2.0)
        if clips:
            width = max(PADDED_FRAMES, *(c.shape[1] for c, _ in clips))
            padded = []
            for clip, _ in clips:
                floor = float(clip.max()) - 2.0  # Whisper's floor after its (x + 4) / 4 rescaling
                padded.append(torch.nn.functional.pad(clip.clamp(min=floor), (0, width - clip.shape[1]), value=floor))
            inputs["input_features"] = torch.stack(padded)
            inputs["feature_attention_mask"] = (torch.arange(width) < torch.tensor([c.shape[1] for c, _ in clips])[:, None]
                                                ).long()
        if any(with_audio):
            inputs["use_audio_in_video"] = True
        return inputs

    @staticmethod
    def _clip(model, seconds: float, seed: int, row: int, index: int) -> tuple[Tensor, int]:
        """Random log-mel features (mel bins, frames) of a clip of ``seconds`` and its token count."""
        frames = clip_frames(seconds)
        n = audio_tokens(frames)
        if n < 1:
            raise ValueError(f"an audio clip of {seconds} s ({frames} log-mel frames) gives no token: give at least "
                             "0.03 s")
        return pixel_tensor((model.config.audio_config.num_mel_bins, frames), seed, row, index), n

    @staticmethod
    def _video_audio_tokens(model, grid: tuple[int, int, int], audio: int) -> list[int]:
        """A video and its audio track as the processor writes them (``replace_video_with_audio_token``):
        vision-start, audio-start, then chunk by chunk of ``seconds_per_chunk`` the video's
        tokens and the audio's, audio-end, vision-end; the chunks by the model's own
        ``get_chunked_index`` over each token's TMRoPE time id."""
        config = model.config
        merge, temporal = config.vision_config.spatial_merge_size, config.vision_config.temporal_patch_size
        per_frame = grid[1] * grid[2] // merge**2
        seconds = temporal / 2.0  # video_second_per_grid at 2 fps
        times = (torch.arange(grid[0]) * seconds * config.position_id_per_seconds).long().repeat_interleave(per_frame)
        chunk = int(config.position_id_per_seconds * config.seconds_per_chunk)
        video = model.get_chunked_index(times, chunk, 0)
        sound = model.get_chunked_index(torch.arange(audio), chunk, 0)
        tokens = [VISION_START, AUDIO_START]
        for j in range(max(len(video), len(sound))):
            if j < len(video):
                tokens += [VIDEO_TOKEN] * (video[j][1] - video[j][0])
            if j < len(sound):
                tokens += [AUDIO_TOKEN] * (sound[j][1] - sound[j][0])
        return [*tokens, AUDIO_END, VISION_END]

    @classmethod
    def encode(cls, model, inputs: dict) -> None:
        QwenVLAdapter.encode(model, inputs)
        if inputs.get("input_features") is not None:
            model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])


__all__ = ["AUDIO_SIGNALS", "QwenOmniAdapter", "audio_flops", "clip_energy"]
