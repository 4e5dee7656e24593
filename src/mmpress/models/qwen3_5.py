"""Qwen3.5 family (transformers ``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration``):
a Qwen3-VL vision side over a hybrid language model.

Vision side: Qwen3-VL's tower without DeepStack (full attention in every block, 2x2 patch merger
as projector, no features added inside the language model), so items, signals and M-RoPE
positions are the Qwen-VL family's (``qwen_vl.py``, ``qwen3_vl.py``: images in raster order
between vision-start / vision-end, a video frame by frame after a timestamp; ``cls_attn`` the
attention each token RECEIVES in the last block; positions always kept).

Language model: Qwen3-Next's hybrid stack. Most decoder layers are linear attention (Gated
DeltaNet, Yang et al., arXiv 2412.06464: a causal depthwise conv, then the gated delta rule
``S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T``, output ``S_t^T q_t``), and every
``full_attention_interval``-th one (``layer_types == "full_attention"``) is gated softmax
attention (its ``q_proj`` gives each head's query and output gate, partial RoPE).
``attention_layers()`` lists those; the core's in-LLM and KV stages act only there:

- pre-LLM presses act before the first layer, so every layer, linear or not, runs on the pressed
  sequence. A ragged batch is re-padded on the LEFT; Gated DeltaNet honours that through the 2-D
  mask transformers hands its layers (``create_recurrent_attention_mask``: the prompt's padding
  columns when a call has more than one token and some padding): ``apply_mask_to_padding_states``
  zeroes the padded inputs, and with no bias in ``in_proj_*`` nor in the conv, a zero input gives
  zero q, k, v, so the recurrent state stays exactly zero through left padding (only decayed) and
  the conv sees the zeros its own left padding would give. Decoding feeds one token at a time
  (never padding: no mask needed) onto that state. Tested: a ragged pressed batch decodes the
  tokens (and scores) of each row run alone.
- in-LLM presses: their score (the attention visual tokens receive, or a layer's keys) exists only
  in full-attention layers, so each signal layer must be one (ValueError naming them). The press
  layer itself may be any layer after the first full-attention layer: transformers reads the
  prompt's cache length and builds every full-attention layer's decoding mask from that first
  layer (``find_first_full_attention_index`` / ``get_mask_sizes``), so it must keep the whole prompt.
  Linear-attention layers from the press layer on run on the kept sequence, with its 2-D padding mask.
- KV presses evict from the full-attention layers' caches only; a linear-attention layer's cache
  is a recurrent (conv + delta-rule) state of fixed size summarising every prompt token: untouched.
- Cache length: transformers 5.18-5.24 read ``cache.get_seq_length()`` from the first
  full-attention layer; 5.25 from layer 0, a linear-attention layer counting every token it saw (the
  UNPRESSED prompt after a KV press, which only compacts full-attention layers). Where the model
  numbers new tokens from that length (``numbers_from_cache``) the offset to the original
  coordinates depends on which count it read: checked per call.

The MoE variant (``qwen3_5_moe``) differs only in its MLP (routed experts plus a shared expert):
the same adapter, its FLOPs count the active experts.
"""

from __future__ import annotations

from itertools import groupby
from types import SimpleNamespace

from mmpress.flops import PrefillFlops, layer_lengths
from mmpress.models.base import Adapter, family
from mmpress.models.qwen3_vl import Qwen3VLAdapter
from mmpress.models.qwen_vl import vision_flops
from mmpress.presses.base import Press

ATTENTION_SIGNALS = frozenset({"llm_attn", "llm_keys"})  # what only a softmax-attention layer gives


@family
class Qwen3_5Adapter(Qwen3VLAdapter):
    """Applies presses to a Qwen3.5 model: pre-LLM everywhere, in-LLM signals and KV eviction on
    its full-attention layers only (see the module docstring)."""

    family = "qwen3_5"
    model_types = ("qwen3_5", "qwen3_5_moe")
    classes = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
    deepstack = False
    bench_media = {"image": (1024, 1024), "video": (16, 512, 512)}  # 16 px patches: 1024 tokens; 8 steps x 256
    press_extras = Adapter.press_extras  # no DeepStack features to press along

    def attention_layers(self) -> list[int]:
        types = self.config.text_config.layer_types[: self.config.text_config.num_hidden_layers]
        return [i for i, kind in enumerate(types) if kind == "full_attention"]

    def check_stages(self, stages: dict[str, Press]) -> None:
        press = stages.get("in_llm")
        if press is None:
            return
        attention, name = self.attention_layers(), type(press).__name__
        if not attention:
            raise ValueError(f"{name} is an in-LLM press; this Qwen3.5 language model has no full-attention layer")
        if ATTENTION_SIGNALS & set(press.needs):
            signal = {s: press.signal_layer(s) for s in press.layers()}
            wrong = {s: sig for s, sig in signal.items() if sig not in attention}
            if wrong:
                raise ValueError(
                    f"{name} scores tokens by the attention of (press layer: signal layer) {wrong}, but those signal "
                    f"layers of this Qwen3.5 language model are linear attention (Gated DeltaNet), which has no "
                    f"attention map; its full-attention layers are {attention}: pick press layers whose signal "
                    f"layer is one of them (e.g. fastv layer={attention[0] + 1}, pdrop layers={tuple(attention[-3:])})")
        first = press.layers()[0]
        if first <= attention[0]:
            raise ValueError(
                f"{name} presses at layer {first}, but this Qwen3.5 model reads the prompt's cache length and builds "
                f"the decoding mask of every full-attention layer from its first one (layer {attention[0]}), which "
                f"must keep the whole prompt: press at a layer after {attention[0]}")

    def numbers_from_cache(self, kwargs: dict) -> bool:
        """The model numbers new tokens from ``cache.get_seq_length()``: pressed coordinates only
        where that count is the full-attention layers' (5.18-5.24, or a pre-LLM pressed cache); on
        5.25 after a KV press it is a linear-attention layer's count of the unpressed tokens."""
        if not super().numbers_from_cache(kwargs):
            return False
        cache = self.protocol.cache_of(kwargs)
        return cache is None or int(cache.get_seq_length()) == int(cache.get_seq_length(self.attention_layers()[0]))

    # ---- cost and shapes ------------------------------------------------------------------------
    @classmethod
    def prefill_flops(cls, config, inputs: dict, seq_len: int, layer_seq_len=None) -> PrefillFlops:
        """The tower (Qwen3-VL's, no DeepStack mergers) over every image and video of the batch, the
        merger as the projector, and ``batch`` rows of ``seq_len`` tokens through the hybrid LM."""
        grids = [g for key in ("image_grid_thw", "video_grid_thw") if inputs.get(key) is not None
                 for g in inputs[key].tolist()]
        vision = SimpleNamespace(**config.vision_config.to_dict(), deepstack_visual_indexes=[])
        tower, merger = vision_flops(vision, grids) if grids else (0.0, 0.0)
        batch = inputs["input_ids"].shape[0]
        return PrefillFlops(tower, merger, hybrid_language_flops(config.text_config, seq_len, batch, layer_seq_len))

    @classmethod
    def build(cls, size: str = "tiny", seed: int = 0, attn: str = "sdpa", model_type: str | None = None,
              **overrides):
        """"real": Qwen3.5's tower (27 x 1152, 16 px patches) scaled for a CPU as the other Qwen
        families' (8 x 640, 16 px patches) over the shared 12 x 896 LM made hybrid as released:
        3 linear-attention layers then 1 full-attention layer (14 heads of 64, 2 KV heads, RoPE on
        a quarter of each head, interleaved M-RoPE), Gated DeltaNet with 4 key heads and 8 value
        heads of 128; ``model_type="qwen3_5_moe"``: 8 experts of 1536, 2 active, and a shared one
        (the dense MLP's active width; fewer experts than released keep the weights CPU-sized).
        "tiny": 4 LM layers (linear, full, linear, full), a 2-block tower of 32, 4 px patches.
        ``full_attention_interval``, ``linear_heads`` ((key, value) heads), ``linear_head_dim``,
        ``head_dim`` and the Qwen-VL overrides change it."""
        real = size == "real"
        shape = dict(patch_size=16 if real else 4, full_attention_interval=4 if real else 2,
                     linear_heads=(4, 8) if real else (2, 4), linear_head_dim=128 if real else 8,
                     head_dim=None, experts=(8, 2, 1536) if real else (4, 2, 32))
        if not real:
            shape["lm_layers"] = 4
        return super().build(size, seed, attn, model_type or cls.model_types[0], **{**shape, **overrides})

    @staticmethod
    def _vision_config(model_type: str, shape: dict, text: dict) -> dict:
        """The tower (no DeepStack) and, in ``text``, the hybrid LM: layer types, Gated DeltaNet
        heads, partial interleaved M-RoPE, MoE experts."""
        width, layers = shape["vision_hidden"], shape["lm_layers"]
        head_dim = shape["head_dim"] or max(24, shape["lm_hidden"] // shape["lm_heads"])
        half = head_dim // 4 // 2  # RoPE on a quarter of each head (partial_rotary_factor 0.25), halves
        text.pop("rope_scaling", None)
        interval, (keys, values), linear_dim = (shape["full_attention_interval"], shape["linear_heads"],
                                                shape["linear_head_dim"])
        sections = [half // 3 + (half % 3 > 0), half // 3 + (half % 3 > 1), half // 3]  # released: 11, 11, 10 of 32
        text.update(head_dim=head_dim, layer_types=["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                                    for i in range(layers)],
                    linear_num_key_heads=keys, linear_num_value_heads=values, linear_key_head_dim=linear_dim,
                    linear_value_head_dim=linear_dim,
                    rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                                     "mrope_interleaved": True, "mrope_section": sections})
        if model_type == "qwen3_5_moe":
            experts, active, size = shape["experts"]
            text.update(num_experts=experts, num_experts_per_tok=active, moe_intermediate_size=size,
                        shared_expert_intermediate_size=size)
            text.pop("intermediate_size", None)
        return dict(hidden_size=width, intermediate_size=shape["vision_intermediate"] or round(width * 4304 / 1152),
                    out_hidden_size=shape["lm_hidden"], num_position_embeddings=2304)


def hybrid_language_flops(cfg, seq_len: int, batch: int = 1, layer_seq_len=None) -> float:
    """Prefill FLOPs of Qwen3.5's hybrid LM over ``seq_len`` tokens per row, each layer at its own
    width (``layer_seq_len``: an in-LLM press's cuts), and the LM head on the last token.

    Full-attention layer: q (with its output gate: 2 x heads), k, v, o projections and causal
    attention scores and values. Linear-attention layer (Gated DeltaNet): ``in_proj_qkv``,
    ``in_proj_z``, ``in_proj_b``, ``in_proj_a``, ``out_proj``, the depthwise conv, and per token
    and value head the delta rule's three d_k x d_v products (``S^T k``, the rank-one update,
    ``S^T q``): linear in the width, the least any implementation does (transformers' torch
    reference runs the chunked form, padded to 64-token chunks, and does more on a CPU). MLP: gated
    (3 matrices), or for MoE the router, the active experts and the shared expert (with its gate).
    Tested against torch's FLOP counter (full-attention layers, projections, MLP)."""
    d, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head = getattr(cfg, "head_dim", None) or d // heads
    k_dim, v_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    k_heads, v_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    keys, values = k_heads * k_dim, v_heads * v_dim
    if getattr(cfg, "num_experts", None):
        shared = cfg.shared_expert_intermediate_size
        mlp = d * cfg.num_experts + cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size + 3 * d * shared + d
    else:
        mlp = 3 * d * cfg.intermediate_size

    def layer(kind: str, width: int) -> float:
        if kind == "full_attention":
            proj = d * head * (3 * heads + 2 * kv)
            mix = 2 * heads * head * width * (width + 1) / 2
        else:
            proj = d * (2 * keys + 2 * values + 2 * v_heads) + values * d
            mix = width * (cfg.linear_conv_kernel_dim * (2 * keys + values) + 3 * v_heads * k_dim * v_dim)
        return 2.0 * batch * (width * (proj + mlp) + mix)

    n = cfg.num_hidden_layers
    widths = layer_lengths(n, seq_len, layer_seq_len)
    runs = groupby(zip(cfg.layer_types[:n], widths))
    flops = sum(layer(kind, width) * len(list(run)) for (kind, width), run in runs)
    return flops + 2.0 * batch * d * cfg.vocab_size
