"""The family matrix: every registered family (its tiny random model of the real transformers
class, ``Adapter.build("tiny")``, and its processor-shaped prompts, ``Adapter.prompts``) x every
press it runs x {one row, a ragged batch of different media sizes, tile and media counts},
forward and generate. Keep-all reproduces the unpressed model bit for bit; a ragged batch gives
each row what the row gives alone; in-LLM and KV presses act where the family has softmax
attention. A new family file is tested here by registering it; its own test file adds what is
particular to it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import mmpress
from mmpress.eval.prefill import run_prefill, shaped
from mmpress.presses.base import ScorerPress
from mmpress.registry import FAMILIES, get_adapter

STEPS = 2
# presses that refuse a family's layout by design, with the reason they give (not a gap in signals)
REFUSES = {("globalcom2", "internvl"): "crop", ("globalcom2", "smolvlm"): "crop",
           # OneVision: a tiled image has no single grid (videos do: test_llava_onevision.py runs them)
           **{(n, "llava_onevision"): "grid" for n in ("evs", "fastvid", "pool", "temporal_merge", "uniform")},
           # an audio clip is a 1-D sequence of frames: no patch grid
           # (uniform and pool read a clip as a 1 x N line: Press.audio_line)
           **{(n, "qwen2_audio"): "grid" for n, cls in mmpress.PRESSES.items()
              if "grid" in cls.needs and not cls.audio_line},
           # Qwen2.5-Omni's rows here are images (test_qwen2_5_omni.py runs its audio): audio presses refuse them
           **{(n, "qwen2_5_omni"): "audio signals" for n, cls in mmpress.PRESSES.items()
              if {"audio_features", "audio_energy", "audio_attn"} & set(cls.needs)}}
# a medium's size says its kind (``Adapter.example_rows``): (seconds,) an audio clip, (h, w) px an
# image, (frames, h, w) a video
KINDS = {1: "audio", 2: "image", 3: "video"}
# draws depend on the batch layout, so a row alone draws other tokens
RANDOM = {"random"}
# a DPP's greedy MAP picks by residual noise once k exceeds the kernel's rank (the tiny LM's width):
# a budget below it keeps the comparison meaningful
RANK_LIMITED = {"cdpruner": 8}


@dataclass
class NormPress(ScorerPress):
    """Unregistered test press: keeps the tokens of largest norm (deterministic, scattered)."""

    name = "test-norm"

    def score(self, tokens, ctx):
        return tokens.norm(dim=-1)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    cls = FAMILIES[request.param]
    torch.manual_seed(0)
    return cls, cls.build("tiny")


def kind_of(rows: list) -> str:
    """The kind of the media of ``rows`` when they are of one known kind, else "image" (the default
    ``prompts`` kind; a family with mixed media lays out each medium by its size)."""
    kinds = {KINDS.get(len(medium), "other") for row in rows for medium in row}
    return kinds.pop() if len(kinds) == 1 and "other" not in kinds else "image"


def batch_of(cls, model, rows: str, first_row: int = 0):
    batch = cls.example_rows[rows]
    return cls.prompts(model, batch, kind=kind_of(batch), first_row=first_row)


def row_alone(cls, model, rows: str, i: int):
    return cls.prompts(model, [cls.example_rows[rows][i]], kind=kind_of(cls.example_rows[rows]), first_row=i)


def fastv_at_first_layer_allowed(model):
    """FastV at the first decoder layer the family lets it act at (its signal layer, the one
    before, must have softmax attention; Qwen3-VL: after DeepStack's layers), or None."""
    for layer in range(1, len(get_adapter(model).lm.layers)):
        press = mmpress.get_press("fastv", keep_ratio=0.5, layer=layer)
        try:
            with press(model):
                return press
        except ValueError:
            continue
    return None


def make(name: str, model):
    cls = mmpress.PRESSES[name]
    if cls.stage == "in_llm":
        press = fastv_at_first_layer_allowed(model) if name == "fastv" else None
        if press is None:
            pytest.skip("in-LLM presses: fastv stands for them here (test_stages.py runs each)")
        return press
    if cls.stage == "kv":
        return mmpress.get_press(name, keep_ratio=0.5, **({"window": 4} if name == "snapkv" else {}))
    if name in RANK_LIMITED:
        return mmpress.get_press(name, keep=RANK_LIMITED[name])
    if name == "static_patches":  # random pixels repeat nothing: a tolerance above any difference drops
        return mmpress.get_press(name, tolerance=1e3)
    return mmpress.get_press(name) if not cls.needs_budget else mmpress.get_press(name, keep_ratio=0.5)


def generate(model, inputs):
    out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -STEPS:], torch.stack(out.logits, dim=1)


def runnable(cls, name: str) -> bool:
    return cls.runs(mmpress.PRESSES[name]) and (name, cls.family) not in REFUSES


@pytest.mark.parametrize("rows", ["single", "ragged"])
def test_keep_all_reproduces_the_unpressed_model(family, rows):
    cls, model = family
    batch = batch_of(cls, model, rows)
    with torch.no_grad():
        reference = model(**batch).logits
        ref_tokens, ref_scores = generate(model, batch)
        for press in (mmpress.get_press("none"), NormPress(keep_ratio=1.0)):
            with press(model) as run:
                assert torch.equal(model(**batch).logits, reference)
                tokens, scores = generate(model, batch)
            assert torch.equal(tokens, ref_tokens) and torch.equal(scores, ref_scores)
            assert run.stats.kept_visual_tokens == run.stats.visual_tokens > 0


@pytest.mark.parametrize("name", [n for n in mmpress.list_presses() if n != "none"])
@pytest.mark.parametrize("rows", ["single", "ragged"])
def test_every_press_forward_generate_and_rows_alone(family, name, rows):
    """Each press the family runs: forward and generate on one row and on a ragged batch; the
    ragged batch gives each row its logits and tokens alone (deterministic presses)."""
    cls, model = family
    if not runnable(cls, name):
        pytest.skip(f"{cls.family} lacks a signal {name} needs")
    press = make(name, model)
    batch = batch_of(cls, model, rows)
    with torch.no_grad(), press(model) as run:
        logits = model(**batch).logits
        stats = run.stats
        tokens, scores = generate(model, batch)
    assert torch.isfinite(logits).all() and torch.isfinite(scores).all()
    assert stats.kept_visual_tokens < stats.visual_tokens, stats
    if press.stage == "pre_llm":
        assert logits.shape[1] == stats.pressed_seq_len < stats.seq_len
    if rows != "ragged" or name in RANDOM:
        return
    for i in range(batch["input_ids"].shape[0]):
        alone = row_alone(cls, model, rows, i)
        with torch.no_grad(), press(model):
            row_logits = model(**alone).logits
            row_tokens, row_scores = generate(model, alone)
        torch.testing.assert_close(logits[i, -1], row_logits[0, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(scores[i], row_scores[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens[i], row_tokens[0]), (name, i)


def test_the_ragged_batch_is_repadded_to_its_longest_pressed_row(family):
    cls, model = family
    batch = batch_of(cls, model, "ragged")
    with torch.no_grad(), NormPress(keep_ratio=0.25)(model) as run:
        logits = model(**batch).logits
    widths = []
    for i in range(batch["input_ids"].shape[0]):
        with torch.no_grad(), NormPress(keep_ratio=0.25)(model) as alone:
            model(**row_alone(cls, model, "ragged", i))
        widths.append(alone.stats.pressed_seq_len if alone.stats else int(batch["attention_mask"][i].sum()))
    assert logits.shape[1] == run.stats.pressed_seq_len == max(widths)


def test_a_refused_press_says_why(family):
    cls, model = family
    refused = [name for name, fam in REFUSES if fam == cls.family]
    for name in refused:
        with pytest.raises(ValueError, match=REFUSES[(name, cls.family)]):
            with torch.no_grad(), make(name, model)(model):
                model(**batch_of(cls, model, "single"))


def test_bench_at_real_size_reports_speedup_against_the_flops_limit(family):
    """``bench-cost --arch`` at the family's real token count (its released tower resolution; one
    layer of tower and four of the LM to stay fast): a pressed prefill's FLOPs limit is above 1."""
    cls, _ = family
    arch = cls.model_types[0]
    kind = "image" if "image" in cls.bench_media else next(iter(cls.bench_media))  # audio: a 30 s clip
    model, inputs = shaped(arch, kind=kind, lm_layers=4, vision_layers=1)  # 4: a hybrid LM's first softmax layer
    record = run_prefill(model, inputs, ["random"], [64], repeats=1, split=False)
    base, pressed = record["rows"]
    assert base["keep"] > 64 and pressed["limit"] > 1 and pressed["speedup"] > 0
