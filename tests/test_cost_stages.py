"""Cost of the three stages: the FLOPs model counts each decoder layer at its own length (an
in-LLM cut at layer k: k layers at the LM-input length, the rest at the cut width; against
torch's FLOP counter too), KV-cache bytes per layer (in-LLM: full before the cut; KV press: its
``kv_len`` everywhere), and `run_prefill` / `mmpress bench-cost` rows of in-LLM and KV presses:
the layer-averaged tokens, a FLOPs limit from the per-layer model, KV bytes and decode tokens/s."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import pytest
import torch
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2Config
from typer.testing import CliRunner

import mmpress
from mmpress.cli import app
from mmpress.eval.cost import kv_cache_bytes, language_flops, layer_lengths, prefill_flops, stats_lengths, transformer_flops
from mmpress.eval.prefill import run_prefill, shaped
from mmpress.models import LlavaAdapter, QwenVLAdapter
from mmpress.eval.report import decode_table, prefill_table
from mmpress.presses.base import PRESSES, KVPress
from mmpress.presses.pdrop import PyramidDropPress
from conftest import make_batch, tiny_llava

# a LLaVA of 64 tokens per 112 px image, and its FLOPs as the family counts them
SMALL_ARGS = dict(size="tiny", media=(112, 112), vision_layers=1, vision_hidden=64, image_size=112, patch_size=14,
                  lm_layers=4, lm_hidden=64, lm_intermediate=128, lm_heads=2, lm_kv_heads=1, vocab=256)
llava_flops = LlavaAdapter.prefill_flops

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread

N_LAYERS = 6


def lm_config(layers: int = N_LAYERS) -> Qwen2Config:
    return Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2)


def lm_head(cfg, batch: int) -> float:
    return 2.0 * batch * cfg.hidden_size * cfg.vocab_size


@dataclass
class TopAttentionKV(KVPress):
    """Test KV press: the default eviction (the entries the last ``window`` queries attend most)."""

    name = "test-kv"


@dataclass
class SmallPDrop(PyramidDropPress):
    """PyramidDrop at layers 1 and 3 of a 4-layer LM: 64 -> 32 -> 16 visual tokens, its own budget."""

    name = "test-pdrop"
    stages: tuple[int, ...] = (1, 3)


@pytest.fixture
def kv_press():
    PRESSES[TopAttentionKV.name] = TopAttentionKV
    yield TopAttentionKV.name
    PRESSES.pop(TopAttentionKV.name, None)


# ---- the FLOPs model ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", range(1, N_LAYERS))
def test_a_cut_at_layer_k_costs_k_layers_at_the_input_length_and_the_rest_at_the_cut(k):
    cfg, length, width, batch = lm_config(), 301, 45, 3
    expected = (transformer_flops(lm_config(k), length, batch=batch, causal=True)
                + transformer_flops(lm_config(N_LAYERS - k), width, batch=batch, causal=True) + lm_head(cfg, batch))
    assert language_flops(cfg, length, batch=batch, layer_seq_len=[(k, width)]) == expected
    # ... between the uncut LM and one cut before its first layer
    assert language_flops(cfg, width, batch) < expected < language_flops(cfg, length, batch)


def test_several_cuts_each_count_from_their_layer_on():
    """A press cutting at several layers (PDrop-like): each run of layers at its own width."""
    cfg, batch = lm_config(), 2
    expected = (transformer_flops(lm_config(2), 300, batch=batch, causal=True)
                + transformer_flops(lm_config(2), 120, batch=batch, causal=True)
                + transformer_flops(lm_config(2), 40, batch=batch, causal=True) + lm_head(cfg, batch))
    assert language_flops(cfg, 300, batch, layer_seq_len=[(2, 120), (4, 40)]) == expected
    assert layer_lengths(N_LAYERS, 300, [[2, 120], [4, 40]]) == [300, 300, 120, 120, 40, 40]  # JSON lists too


def test_without_cuts_the_model_is_unchanged():
    cfg = lm_config()
    assert language_flops(cfg, 77, 2) == transformer_flops(cfg, 77, batch=2, causal=True) + lm_head(cfg, 2)
    assert transformer_flops(cfg, 77, layers=N_LAYERS) == transformer_flops(cfg, 77)
    assert transformer_flops(cfg, 77, layers=2) == transformer_flops(lm_config(2), 77)


@pytest.mark.parametrize("cuts", [[(-1, 10)], [(6, 10)], [(3, 10), (2, 5)], [(3, 10), (3, 5)]])
def test_cuts_must_be_ascending_decoder_layers(cuts):
    with pytest.raises(ValueError, match=r"ascending layers in 0\.\.5"):
        layer_lengths(N_LAYERS, 100, cuts)


def test_the_prefill_flops_of_both_families_take_the_cuts():
    """LLaVA and Qwen-VL: a cut lowers only the language model, by what language_flops says."""
    model, inputs = shaped("llava", batch=2, **SMALL_ARGS)
    config, width = model.config, inputs["input_ids"].shape[1]
    full, cut = llava_flops(config, inputs, width), llava_flops(config, inputs, width, [(2, 20)])
    assert (cut.vision, cut.projector) == (full.vision, full.projector)
    assert cut.language == language_flops(config.text_config, width, 2, [(2, 20)]) < full.language
    assert prefill_flops(config, inputs, width, [(2, 20)]) == cut
    grids = [[1, 10, 10]]
    qwen = QwenVLAdapter.build("tiny", vision_layers=1, vision_hidden=64, patch_size=14, lm_layers=8, lm_hidden=64,
                               lm_intermediate=128, lm_heads=2, lm_kv_heads=1, vocab=256).config
    one = {"input_ids": torch.zeros(1, 40, dtype=torch.long), "image_grid_thw": torch.tensor(grids)}
    full, cut = (QwenVLAdapter.prefill_flops(qwen, one, 40, c) for c in (None, [(6, 12)]))
    assert (cut.vision, cut.projector) == (full.vision, full.projector)
    assert cut.language == language_flops(qwen.text_config, 40, 1, [(6, 12)]) < full.language


def _counted_lm(model, fn) -> int:
    """FLOPs torch counts inside the language model (eager attention: the whole square)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()
    return sum(counts[next(name for name in counts if name.endswith("language_model"))].values())


def test_the_layers_after_an_in_llm_cut_run_on_the_cut_width():
    """torch's count of a FastV-pressed LM: one layer at the input length, the other at the cut
    width (each a whole square, as eager computes), plus the press's own scoring (a few %)."""
    model, inputs = tiny_llava(attn="eager"), make_batch((5, 3))
    cfg = model.config.text_config
    press = mmpress.get_press("fastv", keep=8, layer=1)

    runs = []

    def pressed():
        with press(model) as run:
            model(**inputs, logits_to_keep=1)
        runs.append(run)

    counted = _counted_lm(model, pressed)
    length, cuts = stats_lengths(runs[-1].stats.as_dict())
    assert cuts and cuts[0][0] == 1 and cuts[0][1] < length
    expected = sum(transformer_flops(cfg, width, batch=2, layers=1)
                   for width in layer_lengths(cfg.num_hidden_layers, length, cuts))
    assert expected <= counted <= 1.05 * expected, counted / expected
    unpressed = _counted_lm(model, lambda: model(**inputs, logits_to_keep=1))
    # no cut: the plain model (transformers 5.18 also counts its rotary matmul: a few hundred FLOPs)
    assert unpressed == pytest.approx(transformer_flops(cfg, length, batch=2), rel=1e-3)


# ---- KV-cache bytes -------------------------------------------------------------------------------
def test_kv_cache_bytes_count_each_layer_at_its_length():
    cfg, batch = lm_config(), 2
    full = kv_cache_bytes(cfg, 300, batch=batch)
    cut = kv_cache_bytes(cfg, 300, batch=batch, layer_seq_len=[(2, 40)])  # in_llm: layers 0, 1 keep every token
    assert cut == kv_cache_bytes(lm_config(2), 300, batch=batch) + kv_cache_bytes(lm_config(4), 40, batch=batch)
    assert kv_cache_bytes(cfg, 40, batch=batch) < cut < full
    assert kv_cache_bytes(cfg, 300, batch, torch.bfloat16) * 2 == full


def test_stats_lengths_of_each_stage():
    """What the prefill runs on, and what its cache holds after, from a press's stats."""
    pre = dict(images=1, visual_tokens=64, kept_visual_tokens=16, seq_len=80, pressed_seq_len=32)
    in_llm = dict(pre, pressed_seq_len=80, layer_kept=[(2, 16)], layer_seq_len=[(2, 32)], layer_avg_visual_tokens=40.0)
    kv = dict(pre, pressed_seq_len=80, kv_len=32, layer_avg_visual_tokens=16.0)
    assert stats_lengths(pre) == stats_lengths(pre, cache=True) == (32, None)
    assert stats_lengths(in_llm) == stats_lengths(in_llm, cache=True) == (80, [(2, 32)])
    assert stats_lengths(kv) == (80, None) and stats_lengths(kv, cache=True) == (32, None)  # prefill unpressed


# ---- bench-cost rows ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_rows():
    """One run_prefill of a pre-LLM, an in-LLM and a KV press at 16 of 64 tokens and a budget-free
    in-LLM press cutting twice, with decode timing."""
    for cls in (TopAttentionKV, SmallPDrop):
        PRESSES[cls.name] = cls
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, inputs = shaped("llava", batch=2, **SMALL_ARGS)
        record = run_prefill(model, inputs, ["random", "fastv", TopAttentionKV.name, SmallPDrop.name], [16],
                             repeats=1, split=False, decode_steps=3)
        yield model, inputs, {row["press"]: row for row in record["rows"]}
    finally:
        torch.set_num_threads(threads)
        for cls in (TopAttentionKV, SmallPDrop):
            PRESSES.pop(cls.name, None)


def test_an_in_llm_row_has_its_layer_averaged_tokens_and_per_layer_limit(stage_rows):
    model, inputs, rows = stage_rows
    config, (batch, length) = model.config, inputs["input_ids"].shape
    fastv, pre = rows["fastv"], rows["random"]
    assert fastv["stage"] == "in_llm" and fastv["layer_kept"] == [[2, 16.0]] and fastv["kept_tokens"] == 16
    assert fastv["avg_tokens"] == (2 * 64 + 2 * 16) / 4  # 2 of 4 layers see every token
    # the limit: vision + projector + 2 layers at the full length + 2 at the cut width
    width = length - (64 - 16)  # each row drops 48 tokens: the cut width (per row)
    base = llava_flops(config, inputs, length)
    cut = llava_flops(config, inputs, length, [(2, width)])
    assert fastv["limit"] == pytest.approx(base.total / cut.total, rel=1e-12)
    assert 1 < fastv["limit"] < pre["limit"]  # dearer than dropping the same tokens before the LM
    assert pre["avg_tokens"] == pre["kept_tokens"] == 16 and pre["layer_kept"] is None
    # the cache: 2 layers at the full length, 2 at the cut width
    text = config.text_config
    assert fastv["kv_bytes"] == kv_cache_bytes(text, length, batch, layer_seq_len=[(2, width)])
    assert pre["kv_bytes"] < fastv["kv_bytes"] < rows["none"]["kv_bytes"]


def test_a_press_cutting_at_several_layers_is_charged_each_run_of_layers(stage_rows):
    model, inputs, rows = stage_rows
    config, (batch, length) = model.config, inputs["input_ids"].shape
    pdrop = rows[SmallPDrop.name]
    assert pdrop["keep"] is None and pdrop["layer_kept"] == [[1, 32.0], [3, 16.0]] and pdrop["kept_tokens"] == 16
    assert pdrop["avg_tokens"] == (64 + 2 * 32 + 16) / 4
    cuts = [(1, length - 32), (3, length - 48)]
    base, cut = (llava_flops(config, inputs, length, c) for c in (None, cuts))
    assert pdrop["limit"] == pytest.approx(base.total / cut.total, rel=1e-12)
    assert pdrop["kv_bytes"] == kv_cache_bytes(config.text_config, length, batch, layer_seq_len=cuts)


def test_a_kv_row_has_an_unpressed_prefill_a_pressed_cache_and_decode_timing(stage_rows):
    _, _, rows = stage_rows
    kv, pre, base = rows[TopAttentionKV.name], rows["random"], rows["none"]
    assert kv["stage"] == "kv" and kv["limit"] == 1.0 and kv["kept_tokens"] == kv["avg_tokens"] == 16
    assert kv["kv_bytes"] == pre["kv_bytes"] and kv["kv_ratio"] == pre["kv_ratio"] < 1  # 16 per image in the cache
    for row in rows.values():  # timed in the same rounds; CPU times are noisy: no claim on their order
        assert row["decode_s"] > 0 and row["decode_tok_s"] == pytest.approx(2 / row["decode_s"])
        assert row["decode_speedup"] == pytest.approx(base["decode_s"] / row["decode_s"])
    assert base["decode_speedup"] == 1.0 and base["kv_ratio"] == 1.0 and base["stage"] == "none"


@dataclass
class OfficialBudgetsOnly(TopAttentionKV):
    """Test press that refuses some budgets when built (as SparseVLM takes only its paper's)."""

    name = "test-official-budgets"

    def __post_init__(self):
        super().__post_init__()
        if self.keep not in (None, 32):
            raise ValueError(f"takes keep=32 only, got keep={self.keep}")


def test_a_budget_a_press_refuses_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setitem(PRESSES, OfficialBudgetsOnly.name, OfficialBudgetsOnly)
    model, inputs = shaped("llava", **SMALL_ARGS)
    record = run_prefill(model, inputs, [OfficialBudgetsOnly.name], [32, 16], repeats=1, split=False)
    assert [(row["press"], row["keep"]) for row in record["rows"]] == [("none", 64), (OfficialBudgetsOnly.name, 32)]
    assert record["skipped"] == {f"{OfficialBudgetsOnly.name} keep=16": "takes keep=32 only, got keep=16"}
    with pytest.raises(ValueError, match="unknown press"):
        run_prefill(model, inputs, ["no-such-press"], [16], repeats=1)


def test_decode_steps_must_leave_a_step_after_the_prefill():
    model, inputs = shaped("llava", **SMALL_ARGS)
    with pytest.raises(ValueError, match="decode_steps must be 0 or an int >= 2"):
        run_prefill(model, inputs, ["random"], [16], repeats=1, decode_steps=1)


def _fits(renderable) -> str:
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(renderable)
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text, text
    return text


def test_stage_tables_fit_80_columns(stage_rows):
    rows = list(stage_rows[2].values())
    text = _fits(prefill_table(rows, title="prefill, batch 2, 64 image tokens"))
    assert "16@L2" in text and "16@KV" in text and "own@L1" in text and "avg" in text and " 40 " in text
    text = _fits(decode_table(rows, title="KV cache and decode (3 steps)"))
    assert "decode" in text and "tok/s" in text and "16@KV" in text and "1.00x" in text
    # wide names and numbers: every registered press, a KV press, three-digit budgets
    wide = [dict(row, press=name, keep=128, avg_tokens=345.25, seconds=12.3456, kv_bytes=2**31 - 1, decode_s=0.01234,
                 decode_tok_s=1234.5) for name in mmpress.list_presses() for row in rows]
    _fits(prefill_table(wide, title="prefill"))
    _fits(decode_table(wide, title="decode"))


# ---- the command ----------------------------------------------------------------------------------
ARGS = ["--lm-layers", "3", "--lm-hidden", "64", "--lm-intermediate", "128", "--lm-heads", "2", "--vision-layers", "1",
        "--vision-hidden", "64", "--image-size", "112", "--repeats", "1", "--threads", "1"]


def test_bench_cost_shows_in_llm_and_kv_presses(tmp_path, kv_press):
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(app, ["bench-cost", "--presses", f"random,fastv,{kv_press}", "--keeps", "16",
                                      *ARGS, "--out", str(out)], terminal_width=80)
    assert result.exit_code == 0, result.output
    rows = {row["press"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["fastv"]["layer_kept"] == [[2, 16.0]] and rows["fastv"]["avg_tokens"] == pytest.approx(48)
    assert all("decode_s" in row for row in rows.values())  # a KV press in the grid: decode timed (8 steps)
    text = result.output
    assert "16@L2" in text and "16@KV" in text and "KV cache and decode (8 steps)" in text
    tables = [line for line in text.splitlines() if not line.startswith("unpressed split")]  # wraps softly
    assert max(map(len, tables)) <= 80


def test_bench_cost_times_decoding_only_when_asked_or_a_kv_press_runs(tmp_path):
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(app, ["bench-cost", "--presses", "fastv", "--keeps", "16", *ARGS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "KV cache and decode" not in result.output and "decode_s" not in json.loads(out.read_text())["rows"][1]
    result = CliRunner().invoke(app, ["bench-cost", "--presses", "random", "--keeps", "16", "--decode-steps", "2",
                                      *ARGS, "--out", str(out)])
    assert result.exit_code == 0 and "KV cache and decode (2 steps)" in result.output, result.output
    result = CliRunner().invoke(app, ["bench-cost", "--decode-steps", "1", *ARGS])
    assert result.exit_code == 2 and result.output.startswith("error: Invalid value for --decode-steps: time 0 or >= 2")
