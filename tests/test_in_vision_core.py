"""The in-vision stage's core (models/stages.py ``VisionStage`` and the pre-LLM stage's use of its
selection), with a test-only family hook: the tower's features are scattered back over every
placeholder and the stage drops the unselected ones. A fixed selection made in the tower must
equal the same selection made by a pre-LLM press, alone and composed with a later press."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import mmpress
from mmpress.models.llava import LlavaAdapter
from mmpress.models.stages import Selected
from mmpress.presses.base import ScorerPress, SelectorPress, VisionPress, VisualContext
from mmpress.registry import FAMILIES


@dataclass
class EveryOther(VisionPress):
    """Test press: the tower's output keeps tokens 0, 2, 4, ... (mode "drop")."""

    name = "test-every-other"
    mode = "drop"
    needs_budget = False


@dataclass
class EveryOtherPre(ScorerPress):
    name = "test-every-other-pre"
    needs_budget = True

    def score(self, tokens, ctx):
        n = tokens.shape[1]
        return (torch.arange(n) % 2 == 0).float().expand(tokens.shape[0], n) - torch.arange(n) * 1e-6


def _hooks(adapter, press, stage):
    """Keeps every other feature of each image at the projector's output and scatters them back."""

    def projector(module, args, out):
        stage.new_call()
        m, n, d = out.shape
        index = torch.arange(0, n, 2)
        for source in range(m):
            stage.record("image", source, Selected(index))
        stage.count_blocks("image", [m * n, m * len(index)])
        full = torch.zeros_like(out)
        full[:, index] = out[:, index]
        return full

    return [adapter.vlm.multi_modal_projector.register_forward_hook(projector)]


@pytest.fixture
def llava(monkeypatch):
    monkeypatch.setattr(LlavaAdapter, "vision_modes", frozenset({"drop"}))
    monkeypatch.setattr(LlavaAdapter, "vision_hooks", _hooks)
    torch.manual_seed(0)
    return LlavaAdapter.build("tiny")


def _logits(model, inputs, press, **options):
    with torch.no_grad(), press(model, **options) as run:
        return model(**inputs).logits[:, -1], run.stats


@pytest.mark.parametrize("rows", ["single", "ragged"])
def test_selection_in_the_tower_equals_the_same_selection_before_the_llm(llava, rows):
    inputs = LlavaAdapter.prompts(llava, LlavaAdapter.example_rows[rows])
    got, stats = _logits(llava, inputs, EveryOther())
    want, want_stats = _logits(llava, inputs, EveryOtherPre(keep=32), positions="keep")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert stats.kept_visual_tokens == want_stats.kept_visual_tokens == 32 * inputs["pixel_values"].shape[0]
    assert stats.vision_block_tokens == [64 * inputs["pixel_values"].shape[0], 32 * inputs["pixel_values"].shape[0]]


@dataclass
class EvenThenDivprune(SelectorPress):
    """Oracle: divprune over the even tokens alone, mapped back to the item's tokens."""

    name = "test-even-divprune"

    def select(self, tokens, ctx, k):
        _, index = mmpress.get_press("divprune", keep=k).press(tokens[:, ::2], VisualContext(kind=ctx.kind))
        return index * 2


def test_a_later_pre_llm_press_chooses_among_the_selected_tokens(llava):
    inputs = LlavaAdapter.prompts(llava, LlavaAdapter.example_rows["ragged"])
    got, stats = _logits(llava, inputs, mmpress.compose(EveryOther(), mmpress.get_press("divprune", keep=8)))
    want, _ = _logits(llava, inputs, EvenThenDivprune(keep=8), positions="keep")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert stats.kept_visual_tokens == 8 * inputs["pixel_values"].shape[0]


def test_generate_under_an_in_vision_press_decodes_like_the_pre_llm_twin(llava):
    inputs = LlavaAdapter.prompts(llava, LlavaAdapter.example_rows["ragged"])
    with torch.no_grad(), EveryOther()(llava):
        got = llava.generate(**inputs, max_new_tokens=3, do_sample=False)
    with torch.no_grad(), EveryOtherPre(keep=32)(llava, positions="keep"):
        want = llava.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)


def test_families_without_in_vision_modes_refuse_clearly():
    model = FAMILIES["llava"].build("tiny")
    with pytest.raises(ValueError, match="does not support"):
        with EveryOther()(model):
            pass
