"""Cost per model family: the Qwen-VL FLOPs model (tower + merger + language model, against
torch's FLOP counter), and `mmpress bench-cost --arch/--input` on tiny shapes: the table, the
vision / language-model split, presses a family refuses skipped with a note, mistakes as one
red line."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from mmpress.cli import app
from mmpress.eval.cost import prefill_flops
from mmpress.eval.prefill import encode_visuals, run_prefill, shaped
from mmpress.models import LlavaAdapter, QwenVLAdapter
from mmpress.models.qwen_vl import vision_flops as qwen_vl_vision_flops
from mmpress.presses.base import PRESSES, Press

runner = CliRunner()
# 140 px images: 10 x 10 patches, 5 x 5 tokens, windows of 4 x 4 tokens (edges 4 + 1): ragged windows
TINY = dict(vision_layers=3, vision_hidden=64, patch_size=14, window_size=112, lm_layers=2, lm_hidden=64, lm_intermediate=128, lm_heads=2, lm_kv_heads=1,
            vocab=256)
MEDIA = {"image": (140, 140), "video": (4, 112, 112)}


def qwen_vl_prefill_flops(config, grids, seq_len, layer_seq_len=None):
    inputs = {"input_ids": torch.zeros(1, seq_len, dtype=torch.long), "image_grid_thw": torch.tensor(grids)}
    return QwenVLAdapter.prefill_flops(config, inputs, seq_len, layer_seq_len)
TINY_ARGS = ["--lm-layers", "1", "--lm-hidden", "64", "--lm-intermediate", "128", "--lm-heads", "2",
             "--vision-layers", "2", "--vision-hidden", "64", "--image-size", "112", "--frames", "4",
             "--repeats", "1", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def _counted(fn) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---- the FLOPs model ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("kind", ["image", "video"])
def test_qwen_tower_flops_equal_the_counted_ones(arch, kind):
    """Patch embedding, blocks (full attention per frame; Qwen2.5-VL: windows elsewhere, ragged at
    the edges), merger: exactly what torch counts with eager attention (SDPA's CPU kernel is not
    counted), batch of 2 included."""
    model, inputs = shaped(arch, kind=kind, batch=2, media=MEDIA[kind], size="tiny", attn="eager", **TINY)
    flops = prefill_flops(model.config, inputs, inputs["input_ids"].shape[1])
    assert flops.vision + flops.projector == _counted(lambda: encode_visuals(model, inputs))
    # the whole prefill: the LM's causal attention is counted as half a square, eager computes all of it
    assert 0.9 < flops.total / _counted(lambda: model(**inputs, logits_to_keep=1)) <= 1.0


def test_qwen_prefill_flops_count_tower_and_lm_and_pressing_lowers_only_the_lm():
    model, _ = shaped("qwen2_5_vl", size="tiny", media=MEDIA["image"], **TINY)
    config = model.config
    grids = [[1, 10, 10]]
    full, pressed = qwen_vl_prefill_flops(config, grids, 40), qwen_vl_prefill_flops(config, grids, 20)
    assert min(full.vision, full.projector, full.language) > 0
    assert (pressed.vision, pressed.projector) == (full.vision, full.projector)
    assert pressed.language < full.language and pressed.total < full.total
    assert full.total / pressed.total < full.total / (full.total - full.vision - full.projector)  # the tower bounds it
    # a video costs its frames; a second image adds its tower and nothing to the LM
    two = qwen_vl_prefill_flops(config, grids * 2, 40)
    assert two.vision == 2 * full.vision and two.language == full.language
    video = qwen_vl_vision_flops(config.vision_config, [[4, 10, 10]])
    assert video == tuple(4 * v for v in qwen_vl_vision_flops(config.vision_config, grids))


def test_windowed_blocks_cost_less_than_full_attention():
    windowed = QwenVLAdapter.build("tiny", fullatt_blocks=(2,), **TINY)
    full = QwenVLAdapter.build("tiny", fullatt_blocks=(0, 1, 2), **TINY)
    windowed, full = windowed.config.vision_config, full.config.vision_config
    grid = [[1, 22, 22]]
    assert qwen_vl_vision_flops(windowed, grid)[0] < qwen_vl_vision_flops(full, grid)[0]
    assert qwen_vl_vision_flops(windowed, grid)[1] == qwen_vl_vision_flops(full, grid)[1]  # same merger


def test_prefill_flops_of_llava_are_the_family_s():
    model, inputs = shaped("llava", batch=3, size="tiny", media=(112, 112), image_size=112,
                           **{**TINY, "vision_layers": 1})
    width = inputs["input_ids"].shape[1]
    assert prefill_flops(model.config, inputs, width) == LlavaAdapter.prefill_flops(model.config, inputs, width)
    assert LlavaAdapter.prefill_flops(model.config, inputs, width).vision > 0


# ---- the timed run ------------------------------------------------------------------------------
@dataclass
class Refuses(Press):
    """A press this family cannot run (as a [CLS]-attention press on a tower without [CLS])."""

    name = "test-refuses"

    def press(self, tokens, ctx):
        raise ValueError("this press needs a signal the model lacks")


def test_run_prefill_splits_vision_and_skips_a_refusing_press(monkeypatch):
    monkeypatch.setitem(PRESSES, Refuses.name, Refuses)
    model, inputs = shaped("qwen2_5_vl", kind="video", size="tiny", media=MEDIA["video"], **TINY)
    record = run_prefill(model, inputs, ["random", Refuses.name], [8], repeats=1)
    assert [(r["press"], r["keep"]) for r in record["rows"]] == [("none", 32), ("random", 8)]
    assert "signal the model lacks" in record["skipped"][Refuses.name]
    assert record["vision_seconds"] > 0 and record["rows"][0]["vision_share"] == record["vision_share"]
    assert record["rows"][1]["limit"] > 1 and 0 < record["flops"]["vision"]


# ---- the command --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("kind,tokens", [("image", 16), ("video", 32)])
def test_bench_cost_qwen_on_a_tiny_shape(tmp_path, kind, tokens, arch):
    out = tmp_path / "rows.json"
    result = runner.invoke(app, ["bench-cost", "--arch", arch, "--input", kind, "--presses", "random,pool",
                                 "--keeps", "8,4", *TINY_ARGS, "--out", str(out)], terminal_width=100)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["press"], r["keep"]) for r in rows] == [("none", tokens)] + [(p, k) for p in ("random", "pool")
                                                                          for k in (8, 4)]
    assert all(r["limit"] > 1 for r in rows[1:]) and 0 < rows[0]["vision_flops_share"] < 1
    text = result.output
    assert f"{tokens} {kind} tokens, {arch}" in text and "speedup" in text and "/ limit" in text
    assert "unpressed split: vision tower + projector" in text and "language model" in text


def test_bench_cost_qwen2_audio_times_a_30_second_clip_by_default(tmp_path):
    """--arch qwen2_audio takes audio without --input: a 30 s clip, 750 tokens, the audio presses
    against their limits (a narrow encoder and LM so the real clip length stays cheap)."""
    out = tmp_path / "rows.json"
    result = runner.invoke(app, ["bench-cost", "--arch", "qwen2_audio", "--presses", "silence,uniform", "--keeps", "375",
                                 *TINY_ARGS[:12], "--repeats", "1", "--threads", "1", "--out", str(out)],
                           terminal_width=100)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["press"], r["keep"]) for r in rows] == [("none", 750), ("silence", 375), ("uniform", 375)]
    assert all(r["limit"] > 1 for r in rows[1:]) and "750 audio tokens, qwen2_audio" in result.output


def test_bench_cost_notes_a_press_the_family_refuses(monkeypatch):
    monkeypatch.setitem(PRESSES, Refuses.name, Refuses)
    result = runner.invoke(app, ["bench-cost", "--arch", "qwen2_vl", "--presses", f"random,{Refuses.name}",
                                 "--keeps", "4", *TINY_ARGS], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"skipped {Refuses.name}: this press needs a signal the model lacks" in result.output


@pytest.mark.parametrize("args,says", [
    (["--arch", "qwen9_vl"], "unknown arch 'qwen9_vl'; choose from "),
    (["--input", "video"], "the llava shape takes image, not 'video'"),
    (["--arch", "qwen2_5_vl", "--input", "audio"], "the qwen2_5_vl shape takes image or video, not 'audio'"),
    (["--arch", "qwen2_audio", "--image-size", "112"], "an audio clip has no image size"),
    (["--arch", "qwen2_5_vl", "--image-size", "100", "--lm-layers", "1", "--vision-layers", "1"],
     "multiples of 28 px"),
])
def test_bench_cost_family_mistakes_are_one_red_line(args, says):
    result = runner.invoke(app, ["bench-cost", *args])
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.output
