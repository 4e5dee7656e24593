"""Qwen3.5 (dense and MoE): a Qwen3-VL tower (no DeepStack) over a hybrid language model whose
linear-attention (Gated DeltaNet) layers hold a recurrent state and whose full-attention layers
hold a KV cache. Pre-LLM presses run through every layer on a left-re-padded sequence; in-LLM
presses score only at full-attention layers; KV presses evict only there. Tiny random configs."""

from __future__ import annotations

import pytest
import torch

import mmpress
import mmpress.models.qwen3_5  # noqa: F401  (registers the family)
from mmpress.models.qwen3_5 import Qwen3_5Adapter as A
from mmpress.models.qwen3_5 import hybrid_language_flops
from mmpress.models.lm import queries_keys
from mmpress.ops.attention import received_attention
from mmpress.presses.base import ScorerPress

ROWS = [[(32, 32)], [(32, 48), (32, 32)]]  # every row loses tokens: both rows re-padded on the left
RAGGED = A.example_rows["ragged"]  # with a text-only row, which keeps its width


class NormPress(ScorerPress):
    name = "test-norm"

    def score(self, tokens, ctx):
        return tokens.norm(dim=-1)


@pytest.fixture(scope="module", params=A.model_types)
def model(request):
    return built(request.param)


_BUILT: dict = {}


def built(model_type: str = "qwen3_5"):
    if model_type not in _BUILT:
        _BUILT[model_type] = A.build("tiny", model_type=model_type)
    return _BUILT[model_type]


@pytest.fixture(scope="module")
def eager():
    return A.build("tiny", attn="eager")


def generate(model, inputs, steps=3):
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -steps:], torch.stack(out.logits, dim=1)


def alone(model, rows, i):
    return A.prompts(model, [rows[i]], first_row=i)


def test_attention_layers_are_the_full_attention_layers(model):
    assert A(model).attention_layers() == [1, 3]
    deeper = A.build("tiny", lm_layers=6, full_attention_interval=3)
    assert A(deeper).attention_layers() == [2, 5]
    assert [type(layer.linear_attn).__name__.endswith("GatedDeltaNet") for layer in
            deeper.model.language_model.layers if hasattr(layer, "linear_attn")] == [True] * 4


def test_prompts_give_a_row_alone_the_batch_rows_tokens_and_pixels(model):
    batch = A.prompts(model, ROWS)
    for i in range(len(ROWS)):
        one, valid = alone(model, ROWS, i), batch["attention_mask"][i].bool()
        assert torch.equal(one["input_ids"][0], batch["input_ids"][i][valid])
        assert torch.equal(one["mm_token_type_ids"][0], batch["mm_token_type_ids"][i][valid])
    first = alone(model, ROWS, 0)["pixel_values"]
    assert torch.equal(batch["pixel_values"][: first.shape[0]], first)


@pytest.mark.parametrize("rows", ["single", "ragged", "video"])
def test_keep_all_reproduces_unpressed(model, rows):
    batch = A.prompts(model, A.example_rows[rows], kind="video" if rows == "video" else "image")
    with torch.no_grad():
        reference, (ref_tokens, ref_scores) = model(**batch).logits, generate(model, batch)
        with mmpress.get_press("none")(model):
            assert torch.equal(model(**batch).logits, reference)
            tokens, scores = generate(model, batch)
    assert torch.equal(tokens, ref_tokens) and torch.equal(scores, ref_scores)


def test_gated_deltanet_ignores_left_padding_in_prefill_and_decoding(model):
    """What a left-re-padded pressed batch relies on: a row behind left padding (2-D mask) gives
    the outputs, recurrent and conv states, and next decoding step of the row alone."""
    lm, g = model.model.language_model, torch.Generator().manual_seed(0)
    d, length, pad = lm.config.hidden_size, 9, 5
    x, step = torch.randn(1, length, d, generator=g), torch.randn(1, 1, d, generator=g)
    padded = torch.cat([torch.randn(1, pad, d, generator=g), x], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, length, dtype=torch.long)], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    name = A(model).protocol.cache  # the language model's name for the cache: past_key_values, then cache
    with torch.no_grad():
        one = lm(inputs_embeds=x, use_cache=True)
        two = lm(inputs_embeds=padded, attention_mask=mask, position_ids=pos, use_cache=True)
        torch.testing.assert_close(two.last_hidden_state[:, pad:], one.last_hidden_state, atol=1e-5, rtol=1e-4)
        caches = (one.past_key_values, two.past_key_values)
        for i in range(len(lm.layers)):
            if i not in A(model).attention_layers():
                a, b = (c.layers[i] for c in caches)
                torch.testing.assert_close(b.recurrent_states[0], a.recurrent_states[0], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(b.conv_states[0], a.conv_states[0], atol=1e-5, rtol=1e-4)
        after = lm(inputs_embeds=step, position_ids=torch.tensor([[length]]), **{name: caches[0]}).last_hidden_state
        full = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        after2 = lm(inputs_embeds=step, attention_mask=full, position_ids=torch.tensor([[length]]),
                    **{name: caches[1]}).last_hidden_state
    torch.testing.assert_close(after2, after, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_pressed_forward_matches_hand_built_sequence(model, kind):
    """The kept tokens with their original M-RoPE ids, run through every layer (Gated DeltaNet
    included) on the shorter sequence; a video's frames lie apart, each after its timestamp."""
    rows = [[(32, 32), (32, 48)]] if kind == "image" else [[(4, 32, 32)]]
    inputs, press = A.prompts(model, rows, kind=kind), NormPress(keep=5)
    token = model.config.image_token_id if kind == "image" else model.config.video_token_id
    seen, vlm = {}, model.model
    with torch.no_grad():
        handle = vlm.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
        model(**inputs)
        handle.remove()
        ids = inputs["input_ids"][0]
        if kind == "image":
            feats = vlm.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        else:
            feats = vlm.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        where = (ids == token).nonzero()[:, 0].split([f.shape[0] for f in feats])
        kept = torch.cat([w[press.press(f[None], mmpress.VisualContext())[1][0]] for f, w in zip(feats, where)])
        keep = ids != token
        keep[kept] = True
        hidden = vlm.language_model(inputs_embeds=seen["inputs_embeds"][:, keep],
                                    position_ids=seen["position_ids"][..., keep])
        expected = model.lm_head(hidden.last_hidden_state)
        with press(model):
            got = model(**inputs).logits
    assert (~keep).sum() == sum(f.shape[0] for f in feats) - 5 * len(feats)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


STAGED = {  # name -> press of every stage that runs on Qwen3.5 (tiny: full attention in layers 1 and 3)
    "divprune": lambda: mmpress.get_press("divprune", keep=4),
    "visionzip": lambda: mmpress.get_press("visionzip", keep=4),
    "fastv": lambda: mmpress.get_press("fastv", keep=4, layer=2),
    "pdrop": lambda: mmpress.get_press("pdrop", stages=(3,), ratio=0.5),
    "at_layer": lambda: mmpress.at_layer(mmpress.get_press("divprune", keep=4), layer=2),
    "snapkv": lambda: mmpress.get_press("snapkv", keep=4, window=4),
    "lookm": lambda: mmpress.get_press("lookm", keep=4),
    "compose": lambda: mmpress.compose(mmpress.get_press("divprune", keep=6), mmpress.get_press("snapkv", keep=4)),
}


RAGGED_CASES = [*((name, "qwen3_5", "all-pressed") for name in STAGED),
                *((name, model_type, rows) for name in ("divprune", "fastv", "snapkv")
                  for model_type, rows in (("qwen3_5", "text-row"), ("qwen3_5_moe", "all-pressed")))]


@pytest.mark.parametrize("name, model_type, rows", RAGGED_CASES)
def test_ragged_batch_decodes_each_row_alone(name, model_type, rows):
    """Rows of different image sizes and counts, re-padded on the left after pressing (Gated
    DeltaNet behind the 2-D mask), decode the tokens and scores of each row run alone (no padding,
    no mask). "all-pressed": every row loses tokens; "text-row": a text-only row keeps its width."""
    model, rows = built(model_type), ROWS if rows == "all-pressed" else RAGGED
    press, batch = STAGED[name](), A.prompts(model, rows)
    with torch.no_grad(), press(model) as run:
        tokens, scores = generate(model, batch)
    assert run.stats.kept_visual_tokens < run.stats.visual_tokens
    for i in range(len(rows)):
        with torch.no_grad(), press(model):
            one_tokens, one_scores = generate(model, alone(model, rows, i))
        assert torch.equal(one_tokens[0], tokens[i])
        torch.testing.assert_close(one_scores[0], scores[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["divprune", "snapkv", "fastv"])
def test_a_later_turn_numbered_from_the_cache_equals_continue_positions(name):
    """New text fed onto a pressed cache without a mask (the model numbers it from the cache
    length: a full-attention layer's count in 5.18-5.24, a linear-attention layer's count of every
    token in 5.25) equals the same text with mmpress.continue_positions' ids and the whole mask."""
    model = built()
    press, batch, new = STAGED[name](), alone(model, ROWS, 1), torch.tensor([[11, 12, 13]])
    full = torch.cat([batch["attention_mask"], torch.ones_like(new)], dim=1)
    with torch.no_grad(), press(model):
        cache = model(**batch, use_cache=True).past_key_values
        got = model(input_ids=new, past_key_values=cache).logits
        cache = model(**batch, use_cache=True).past_key_values
        ids = mmpress.continue_positions(model, cache, full, new)
        expected = model(input_ids=new, attention_mask=full, past_key_values=cache, position_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_kv_press_evicts_only_from_full_attention_layers(model):
    """A KV press compacts the full-attention layers' caches; the linear-attention layers' conv
    and recurrent states are those of the unpressed prefill, bit for bit."""
    batch = A.prompts(model, ROWS)
    with torch.no_grad():
        reference = model(**batch, use_cache=True).past_key_values
        with STAGED["snapkv"]()(model) as run:
            pressed = model(**batch, use_cache=True).past_key_values
    width = batch["input_ids"].shape[1]
    for i, (ref, got) in enumerate(zip(reference.layers, pressed.layers)):
        if i in A(model).attention_layers():
            assert ref.keys.shape[2] == width and got.keys.shape[2] == run.stats.kv_len < width
        else:
            assert torch.equal(got.recurrent_states[0], ref.recurrent_states[0])
            assert torch.equal(got.conv_states[0], ref.conv_states[0])


def test_in_llm_press_scores_only_at_full_attention_layers(model):
    """A signal layer without softmax attention (Gated DeltaNet) raises, naming the full-attention
    layers; so does a press at or before the first full-attention layer (transformers reads the
    prompt's length and the decoding mask from it). A press needing no attention signal may act on
    a linear-attention layer after it."""
    for press, match in [(mmpress.get_press("fastv", keep=4, layer=1), r"\[1, 3\]"),
                         (mmpress.get_press("pdrop", stages=(2,), ratio=0.5), r"\[1, 3\]"),
                         (mmpress.get_press("dart_llm", keep=4, layer=3), r"\[1, 3\]"),
                         (mmpress.get_press("pdrop", stages=(1,), ratio=0.5), "after 1"),
                         (mmpress.at_layer(mmpress.get_press("divprune", keep=4), layer=1), "after 1")]:
        with pytest.raises(ValueError, match=match):
            with press(model):
                pass
    with mmpress.at_layer(mmpress.get_press("divprune", keep=4), layer=2)(model):
        pass


def test_llm_attention_scores_equal_eager_attention(eager):
    """The gated attention's query (each head's q_proj row is [query | gate]) scored as the
    layer's softmax attention: what in-LLM and KV presses read, against eager attention."""
    batch, layer = A.prompts(eager, RAGGED), 1
    decoder = eager.model.language_model.layers[layer]
    seen = {}
    handle = decoder.register_forward_pre_hook(
        lambda m, a, kw: seen.update(hidden=a[0] if a else kw["hidden_states"], pe=kw["position_embeddings"]),
        with_kwargs=True)
    try:
        with torch.no_grad():
            out = eager(**batch, output_attentions=True)
    finally:
        handle.remove()
    valid = batch["attention_mask"].bool()
    last = torch.full((valid.shape[0], 1), valid.shape[1] - 1)  # left padding: each row's last token
    with torch.no_grad():
        q, k, scaling = queries_keys(decoder, seen["hidden"], seen["pe"], last)
        got = received_attention(q, k, last, torch.ones_like(last, dtype=torch.bool), valid, scaling)  # (B, Hkv, L)
    maps = [a for a in out.attentions if a is not None]  # linear-attention layers record none
    expected = maps[A(eager).attention_layers().index(layer)][:, :, -1].float()  # (B, H, L): the last row's
    torch.testing.assert_close(got.mean(1), expected.mean(1), atol=1e-5, rtol=1e-4)


def test_prefill_flops_hand_computed(model):
    """The hybrid LM counted layer by layer against the formulas written out for the tiny shape,
    an in-LLM cut at layer 2, and the tower and merger over the batch's grids."""
    cfg = model.config.text_config
    d, s, b = cfg.hidden_size, 20, 2
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kdim = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    vdim = cfg.linear_num_value_heads * cfg.linear_value_head_dim
    if getattr(cfg, "num_experts", None):
        mlp = d * cfg.num_experts + cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size \
            + 3 * d * cfg.shared_expert_intermediate_size + d
    else:
        mlp = 3 * d * cfg.intermediate_size

    def full(w):  # q + gate, o, k, v; causal scores and values
        return 2 * b * (w * (d * hd * 2 * heads + d * hd * heads + 2 * d * kv * hd + mlp) + heads * hd * w * (w + 1))

    def linear(w):  # qkv, z, b, a in; out; conv; delta rule
        heads_v, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
        return 2 * b * w * (d * (2 * kdim + vdim) + d * vdim + 2 * d * heads_v + vdim * d + mlp
                            + cfg.linear_conv_kernel_dim * (2 * kdim + vdim) + 3 * heads_v * dk * dv)

    head = 2 * b * d * cfg.vocab_size
    assert hybrid_language_flops(cfg, s, b) == pytest.approx(2 * linear(s) + 2 * full(s) + head)
    assert hybrid_language_flops(cfg, s, b, [(2, 8)]) == pytest.approx(linear(s) + full(s) + linear(8) + full(8) + head)
    inputs = A.prompts(model, ROWS)
    flops = A.prefill_flops(model.config, inputs, 30)
    assert flops.language == pytest.approx(hybrid_language_flops(cfg, 30, 2))
    assert flops.vision > 0 and flops.projector > 0
    more = A.prefill_flops(model.config, A.prompts(model, [[(32, 32)], [(64, 48), (32, 32)]]), 30)
    assert more.vision > flops.vision and more.projector > flops.projector


def test_flops_equal_torch_flop_counter():
    """The tower + merger count equals torch's FLOP counter exactly (eager); the LM's, on a stack
    of full-attention layers, too, up to eager's full (not causal) score square. (Gated DeltaNet is
    counted in its recurrent form, 3 d_k x d_v products per token and value head, the least any
    implementation does; transformers' torch reference runs the chunked form, padded to 64-token
    chunks, and does more.)"""
    from torch.utils.flop_counter import FlopCounterMode

    model = A.build("tiny", attn="eager", full_attention_interval=1)
    inputs = A.prompts(model, ROWS)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    flops = A.prefill_flops(model.config, inputs, 30)
    assert counter.get_total_flops() == flops.vision + flops.projector
    cfg, s = model.config.text_config, 30
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.language_model(inputs_embeds=torch.randn(1, s, cfg.hidden_size))
    square = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * cfg.head_dim * (2 * s * s - s * (s + 1))
    expected = hybrid_language_flops(cfg, s) - 2 * cfg.hidden_size * cfg.vocab_size + square
    # transformers 5.18 computes the rotary angles with a matmul (540 counted FLOPs here)
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-4)
