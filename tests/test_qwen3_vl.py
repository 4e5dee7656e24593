"""Qwen3-VL: DeepStack features pressed with the same kept tokens as the input embeddings.
Images only: Qwen3-VL lays a video out frame by frame with timestamp text between the frames,
which these tiny hand-made prompts do not reproduce."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

import mmpress
from test_qwen_vl import IMAGE, PAD, RAGGED, SINGLE, VIDEO, NormPress, check_keep_all, generate, make_batch

TEXT = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1,
            eos_token_id=2, rope_scaling={"rope_type": "default", "mrope_section": [2, 2, 2], "mrope_interleaved": True})


def tiny_qwen3(layers: int = TEXT["num_hidden_layers"]) -> Qwen3VLForConditionalGeneration:
    """A tiny random Qwen3-VL (seed 0) with ``layers`` LM layers; DeepStack feeds layers 0 and 1."""
    torch.manual_seed(0)
    config = Qwen3VLConfig(vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4,
                                              out_hidden_size=48, patch_size=4, spatial_merge_size=2,
                                              temporal_patch_size=2, in_channels=3, num_position_embeddings=64,
                                              deepstack_visual_indexes=[0, 1]),
                           text_config={**TEXT, "num_hidden_layers": layers}, image_token_id=IMAGE,
                           video_token_id=VIDEO, vision_start_token_id=5, vision_end_token_id=6)
    config._attn_implementation = "sdpa"
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3()


@pytest.mark.parametrize("rows", [SINGLE, RAGGED], ids=["single", "ragged"])
def test_keep_all_reproduces_unpressed(model, rows):
    check_keep_all(model, make_batch(model, rows))


def test_pressed_forward_matches_hand_built_sequence_with_deepstack(model):
    """Kept tokens, their M-RoPE ids, and each DeepStack layer's features of the kept tokens."""
    inputs = make_batch(model, [([("image", (1, 8, 8)), ("image", (1, 8, 12))], 6)])
    press = NormPress(keep=5)
    seen = {}

    def record(module, args, kwargs):  # the unpressed call's language-model inputs
        seen.update(kwargs)

    vlm = model.model
    with torch.no_grad():
        handle = vlm.language_model.register_forward_pre_hook(record, with_kwargs=True)
        model(**inputs)
        handle.remove()
        ids = inputs["input_ids"][0]
        feats = vlm.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        where = (ids == IMAGE).nonzero()[:, 0].split([f.shape[0] for f in feats])
        kept = torch.cat([w[press.press(f[None], mmpress.VisualContext())[1][0]] for f, w in zip(feats, where)])
        keep = ids != IMAGE
        keep[kept] = True
        visual_rank = (ids == IMAGE).cumsum(0) - 1
        deepstack = [f[visual_rank[kept.sort().values]] for f in seen["deepstack_visual_embeds"]]
        hidden = vlm.language_model(inputs_embeds=seen["inputs_embeds"][:, keep], position_ids=seen["position_ids"][..., keep],
                                    visual_pos_masks=(ids == IMAGE)[keep][None], deepstack_visual_embeds=deepstack)
        expected = model.lm_head(hidden.last_hidden_state)
        with press(model):
            got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["divprune", "random", "tome", "pool", "mmtok"])
def test_presses_run_with_deepstack(model, name):
    batch, press = make_batch(model, RAGGED), mmpress.get_press(name, keep_ratio=0.5)
    with torch.no_grad(), press(model) as run:
        logits = model(**batch).logits
        tokens, scores = generate(model, batch)
    assert run.stats.kept_visual_tokens < run.stats.visual_tokens
    assert torch.isfinite(logits).all() and torch.isfinite(scores).all()


@pytest.mark.parametrize("name", ["visionzip", "vtc_cls"])
def test_attention_presses_run_on_qwen3(model, name):
    """The [CLS] substitute (attention received in the last vision block) on Qwen3-VL's tower."""
    batch, press = make_batch(model, RAGGED), mmpress.get_press(name, keep_ratio=0.5)
    with torch.no_grad(), press(model) as run:
        logits = model(**batch).logits
    assert run.stats.kept_visual_tokens < run.stats.visual_tokens and torch.isfinite(logits).all()


def test_in_llm_press_after_deepstack_and_kv_press(model):
    """An in-LLM press runs once DeepStack has added its features (layer >= injected layers; earlier
    raises); a KV press runs at any layer. Keep-all is the unpressed model."""
    batch = make_batch(model, RAGGED)
    with pytest.raises(ValueError, match="DeepStack"):
        with mmpress.get_press("fastv", keep=4, layer=1)(model):
            pass
    with torch.no_grad():
        reference = model(**batch).logits
        for press in (mmpress.get_press("fastv", keep=4, layer=2), mmpress.get_press("snapkv", keep=4, window=4)):
            with press(model) as run:
                logits = model(**batch).logits
                tokens, _ = generate(model, batch)
            assert logits.isfinite().all() and tokens.shape[0] == batch["input_ids"].shape[0]
            assert run.stats.kept_visual_tokens < run.stats.visual_tokens
        with pytest.warns(UserWarning), mmpress.get_press("fastv", keep=1000, layer=2)(model):
            assert torch.equal(model(**batch).logits, reference)
