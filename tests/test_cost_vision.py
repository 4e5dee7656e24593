"""Cost of an in-vision press: the tower counted block by block at the tokens each block took
(``flops.tower_flops``: linear work per token, attention per sequence squared), the projector over
the tokens the tower handed on, the language model at its pressed length (``eval.cost.pressed_flops``),
and ``mmpress bench-cost``'s split between tower, projector and language model.

The unpressed per-block counts, written out here independently (every block sees every token;
attention per image, per frame, or per Qwen2.5-VL window as transformers partitions it), must give
each family's own tower count: the two FLOPs models agree, so a limit compares like with like."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, Dinov2Config
from transformers.vision_utils import get_vision_window_index
from typer.testing import CliRunner

import mmpress
from mmpress.cli import app
from mmpress.eval.cost import flops_split, prefill_flops, pressed_flops
from mmpress.flops import PrefillFlops, language_flops, tower_flops, transformer_flops, vision_block_costs
from mmpress.models import LlavaAdapter, QwenVLAdapter
from mmpress.presses.base import PRESSES

pytestmark = pytest.mark.usefixtures("one_thread")


def _unpressed_qwen_blocks(vision_cfg, grids) -> tuple[list[int], list[float]]:
    """Every block of a Qwen-VL tower on every patch; attention per frame (full blocks) or per
    window (Qwen2.5-VL's other blocks: the lengths of transformers' own window partition)."""
    depth, patches = vision_cfg.depth, sum(t * h * w for t, h, w in grids)
    frame = sum(t * (h * w) ** 2 for t, h, w in grids)
    full = set(getattr(vision_cfg, "fullatt_block_indexes", range(depth)))
    window = frame
    if len(full) < depth:
        _, cu = get_vision_window_index(torch.tensor(grids), vision_cfg.spatial_merge_size, vision_cfg.window_size,
                                        vision_cfg.patch_size)
        lengths = torch.as_tensor(cu).diff()
        window = float((lengths[lengths > 0].double() ** 2).sum())
    return [patches] * depth, [frame if i in full else window for i in range(depth)]


# ---- the block model reproduces each family's own tower count --------------------------------------
@pytest.mark.parametrize("tower", ["clip", "dinov2"])
def test_unpressed_blocks_give_the_llava_tower_count(tower):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=4)
    vision = CLIPVisionConfig(**common) if tower == "clip" else Dinov2Config(**common, mlp_ratio=2)
    model = LlavaAdapter.build("tiny", vision_layers=3)
    config = model.config
    config.vision_config = vision
    images, tokens = 3, 64 + 1  # [CLS] + 8 x 8 patches
    inputs = {"input_ids": torch.zeros(2, 90, dtype=torch.long), "pixel_values": torch.zeros(images, 3, 32, 32)}
    family = LlavaAdapter.prefill_flops(config, inputs, 90).vision
    assert family == transformer_flops(vision, tokens, batch=images) > 0
    assert tower_flops(vision, [images * tokens] * 3, [images * tokens**2] * 3) == pytest.approx(family, rel=1e-12)


@pytest.mark.parametrize("model_type, grids", [
    ("qwen2_5_vl", [[1, 24, 36]]), ("qwen2_5_vl", [[4, 16, 16], [1, 8, 12]]), ("qwen2_vl", [[2, 8, 8], [1, 12, 8]]),
])
def test_unpressed_blocks_give_the_qwen_tower_count(model_type, grids):
    """Qwen2-VL (full attention per frame) and Qwen2.5-VL (windows of 112 px but every 4th block):
    the windows as transformers partitions them, edge windows smaller."""
    model = QwenVLAdapter.build("tiny", model_type=model_type, vision_layers=4, vision_hidden=32, patch_size=14,
                                window_size=112)
    vision = model.config.vision_config
    inputs = {"input_ids": torch.zeros(1, 10, dtype=torch.long), "video_grid_thw": torch.tensor(grids)}
    family = QwenVLAdapter.prefill_flops(model.config, inputs, 10).vision
    blocks, attention = _unpressed_qwen_blocks(vision, grids)
    if model_type == "qwen2_5_vl":
        assert attention[0] < attention[-1]  # windowed blocks attend over less
    assert tower_flops(vision, blocks, attention) == pytest.approx(family, rel=1e-12)


def test_block_costs_read_the_tower_shapes():
    clip = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4)
    assert vision_block_costs(clip) == (2.0 * 4 * 64**2, 2.0 * 2 * 64 * 256, 256.0, 0.0)
    swiglu = Dinov2Config(hidden_size=64, num_attention_heads=4, mlp_ratio=4, use_swiglu_ffn=True)
    assert vision_block_costs(swiglu)[1] == 2.0 * 3 * 64 * 256
    with pytest.raises(ValueError, match="one attention count per block"):
        tower_flops(clip, [10, 10, 10, 10], [100, 100])


def test_a_block_s_mlp_runs_on_the_tokens_leaving_it():
    """ToMe merges between a block's attention and its MLP: 20 tokens enter block 0, 12 leave it
    (and enter block 1), 4 leave block 1 (the extra last entry)."""
    clip = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4)
    proj, mlp, attn, _ = vision_block_costs(clip)
    want = proj * 20 + mlp * 12 + attn * 400 + proj * 12 + mlp * 4 + attn * 144
    assert tower_flops(clip, [20, 12, 4], [400, 144]) == want
    assert tower_flops(clip, [20, 12], [400, 144]) == want + mlp * (12 - 4)  # the last block's MLP on its input


# ---- pressed_flops on recorded counts ----------------------------------------------------------------
def _llava():
    model = LlavaAdapter.build("tiny")
    inputs = LlavaAdapter.prompts(model, LlavaAdapter.example_rows["ragged"])
    return model.config, inputs, inputs["pixel_values"].shape[0]


def _stats(images, seq_len, pressed_len, **extra):
    return dict(items=images, visual_tokens=64 * images, kept_visual_tokens=extra.pop("kept", 64 * images),
                seq_len=seq_len, pressed_seq_len=pressed_len, **extra)


def test_a_merging_tower_counts_each_block_at_its_length():
    """ToMe-like: 65 -> 49 -> 33 tokens per image over the 3 blocks; each block costs what one
    block of that length costs; the projector runs on the 33 - 1 tokens handed on, the language
    model on the pressed sequence."""
    config, inputs, images = _llava()
    width = inputs["input_ids"].shape[1]
    lengths = [65, 49, 33]
    stats = _stats(images, width, width - 32, kept=32 * images, vision_block_tokens=[images * n for n in lengths],
                   vision_block_attention=[images * n * n for n in lengths], vision_kept_tokens=32 * images)
    got = pressed_flops(config, inputs, stats)
    base = prefill_flops(config, inputs, width)
    vision = config.vision_config
    proj, mlp, _, _ = vision_block_costs(vision)
    # each block as a whole block at its length, then its MLP moved to the tokens leaving it
    whole = sum(transformer_flops(vision, n, batch=images, layers=1) for n in lengths)
    assert got.vision == pytest.approx(whole - mlp * images * (65 - 49 + 49 - 33))
    assert got.projector == pytest.approx(base.projector / 2)
    assert got.language == language_flops(config.text_config, width - 32, inputs["input_ids"].shape[0])
    assert got.vision < base.vision and got.total < base.total
    # without a recorded attention count: each item one sequence of equal length, the same here
    stats.pop("vision_block_attention")
    assert pressed_flops(config, inputs, stats).vision == pytest.approx(got.vision)
    assert flops_split(got) == dict(vision=got.vision, projector=got.projector, language=got.language, total=got.total)


def test_recorded_attention_is_what_counts():
    """Two items of unequal lengths in one block: the sum of squares, not the square of the mean."""
    config, inputs, images = _llava()
    width = inputs["input_ids"].shape[1]
    stats = _stats(images, width, width, vision_block_tokens=[100] * 3, vision_block_attention=[60**2 + 40**2] * 3)
    even = dict(stats, vision_block_attention=[2 * 50**2] * 3)
    gap = pressed_flops(config, inputs, stats).vision - pressed_flops(config, inputs, even).vision
    assert gap == pytest.approx(3 * 4 * config.vision_config.hidden_size * (60**2 + 40**2 - 2 * 50**2))


def test_presses_after_the_tower_keep_the_family_count():
    config, inputs, images = _llava()
    width = inputs["input_ids"].shape[1]
    stats = _stats(images, width, width - 20, kept=44 * images)
    assert pressed_flops(config, inputs, stats) == prefill_flops(config, inputs, width - 20)
    assert pressed_flops(config, inputs, None) == prefill_flops(config, inputs, width)
    assert isinstance(pressed_flops(config, inputs, {}), PrefillFlops)


# ---- on the tiny models, under the real presses -------------------------------------------------------
def _needs(name):
    if name not in PRESSES:
        pytest.skip(f"the {name} press is not registered yet")


def _run(model, inputs, press):
    with torch.inference_mode(), press(model) as run:
        model(**inputs, logits_to_keep=1)
    return run.stats.as_dict()


def test_tome_vit_keep_all_counts_the_unpressed_tower_and_merging_counts_less():
    _needs("tome_vit")
    model = LlavaAdapter.build("tiny")
    inputs = LlavaAdapter.prompts(model, LlavaAdapter.example_rows["ragged"])
    config, width = model.config, inputs["input_ids"].shape[1]
    base = prefill_flops(config, inputs, width)
    kept = pressed_flops(config, inputs, _run(model, inputs, mmpress.get_press("tome_vit", r=0)))
    assert kept.vision == pytest.approx(base.vision, rel=1e-12) and kept.total == pytest.approx(base.total, rel=1e-12)
    stats = _run(model, inputs, mmpress.get_press("tome_vit", r=8))
    merged = pressed_flops(config, inputs, stats)
    blocks = stats["vision_block_tokens"]
    assert blocks[0] > blocks[-1] and merged.vision < base.vision and merged.total < base.total


def test_tome_vit_tower_flops_against_torch_counter():
    """torch's FLOP counter over the tower of a ToMe-merged run (SDPA counted as its two matmuls),
    against the block model: equal up to ToMe's own matching (about 1% here) and, where the family
    reports only the tokens entering each block, the last block's MLP counted on those (2% here)."""
    _needs("tome_vit")
    model = LlavaAdapter.build("tiny", attn="eager")
    inputs = LlavaAdapter.prompts(model, LlavaAdapter.example_rows["single"])
    press = mmpress.get_press("tome_vit", r=8)
    sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}  # torch counts CPU SDPA as 0
    with torch.inference_mode(), press(model) as run, FlopCounterMode(display=False, custom_mapping=sdpa) as counter:
        model(**inputs, logits_to_keep=1)
    counts = counter.get_flop_counts()
    tower = sum(counts[next(name for name in counts if name.endswith("vision_tower.encoder"))].values())
    expected = pressed_flops(model.config, inputs, run.stats.as_dict()).vision
    assert 0.97 * expected <= tower <= 1.05 * expected, tower / expected


def _sdpa_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """Scores and values of one SDPA call: 2 matmuls of (S x d) by (d x S'), 2 FLOPs a multiply-add."""
    *lead, s, d = q_shape
    heads = 1
    for n in lead:
        heads *= n
    return 4 * heads * s * k_shape[-2] * d


def test_static_patches_on_a_video_counts_the_kept_patches():
    """A 4-step video whose steps 1 and 3 copy the step before: the tower on the kept half."""
    _needs("static_patches")
    model = QwenVLAdapter.build("tiny")
    inputs = QwenVLAdapter.prompts(model, [[(8, 32, 32)]], kind="video")
    pixels = inputs["pixel_values_videos"]
    t, h, w = inputs["video_grid_thw"][0].tolist()
    steps = pixels.view(t, h // 2, 2, w // 2, 2, -1).permute(0, 1, 3, 2, 4, 5)  # raster of 2 x 2 units
    steps[1], steps[3] = steps[0], steps[2]
    inputs["pixel_values_videos"] = steps.permute(0, 1, 3, 2, 4, 5).reshape(pixels.shape)
    config, width = model.config, inputs["input_ids"].shape[1]
    base = prefill_flops(config, inputs, width)
    stats = _run(model, inputs, mmpress.get_press("static_patches"))
    assert stats["vision_block_tokens"] == [t * h * w // 2] * len(model.model.visual.blocks)
    got = pressed_flops(config, inputs, stats)
    assert got.projector == pytest.approx(base.projector / 2) and got.vision < base.vision
    if "vision_block_attention" in stats:  # recorded per frame / window: half the frames, each whole
        blocks, attention = _unpressed_qwen_blocks(config.vision_config, [[t // 2, h, w]])
        assert got.vision == pytest.approx(tower_flops(config.vision_config, blocks, attention))


# ---- mmpress bench-cost ------------------------------------------------------------------------------
ARGS = ["--lm-layers", "2", "--lm-hidden", "64", "--lm-intermediate", "128", "--lm-heads", "2", "--vision-layers", "3",
        "--vision-hidden", "64", "--image-size", "112", "--repeats", "1", "--threads", "1"]


def test_bench_cost_splits_tower_projector_and_language_model(tmp_path):
    """Every row carries its FLOPs split; an in-vision press's row counts its tower pressed (its
    tower limit above 1, and the whole-prefill limit from the pressed tower), and the split table
    is printed; a press after the tower leaves the tower's FLOPs as they were."""
    _needs("tome_vit")
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(app, ["bench-cost", "--presses", "tome_vit,divprune", "--keeps", "16", *ARGS,
                                      "--out", str(out)], terminal_width=80)
    assert result.exit_code == 0, result.output
    rows = {row["press"]: row for row in json.loads(out.read_text())["rows"]}
    base, tome, divprune = rows["none"], rows["tome_vit"], rows["divprune"]
    assert base["flops"]["total"] == pytest.approx(sum(base["flops"][k] for k in ("vision", "projector", "language")))
    assert divprune["flops"]["vision"] == base["flops"]["vision"] and divprune["vision_limit"] == 1
    assert tome["flops"]["vision"] < base["flops"]["vision"] and tome["vision_limit"] > 1
    assert tome["limit"] == pytest.approx(base["flops"]["total"] / tome["flops"]["total"])
    assert "FLOPs split" in result.output and "tower" in result.output
    tables = [line for line in result.output.splitlines() if not line.startswith("unpressed split")]
    assert max(map(len, tables)) <= 80


def test_mmpress_bench_counts_an_in_vision_press_s_tower_pressed():
    """``mmpress bench`` / ``tune``'s FLOPs column: an in-vision press's tower at its pressed lengths."""
    _needs("tome_vit")
    from mmpress.eval.bench import _flops

    model = LlavaAdapter.build("tiny")
    inputs = LlavaAdapter.prompts(model, LlavaAdapter.example_rows["single"])
    stats = _run(model, inputs, mmpress.get_press("tome_vit", r=8))
    got = _flops(model.config, inputs, stats)
    assert got == pressed_flops(model.config, inputs, stats)
    assert got.vision < prefill_flops(model.config, inputs, inputs["input_ids"].shape[1]).vision
