"""Position ids by default follow each press's official code (``Press.official_positions``):
LLaVA's codebase numbers a sequence pruned before the language model 0..L'-1, FastVID and EVS
keep the original ids; M-RoPE families and compositions with a later stage keep them."""

from __future__ import annotations

import pytest
import torch

import mmpress
from mmpress.models.llava import LlavaAdapter
from mmpress.presses.base import PRESSES
from conftest import make_batch
from test_llava import RAGGED

PRE_LLM = [name for name in mmpress.list_presses("pre_llm") if name != "none" and LlavaAdapter.runs(PRESSES[name])]


def logits(model, press, batch, **options):
    with torch.no_grad(), press(model, **options):
        return model(**batch).logits


@pytest.mark.parametrize("name", PRE_LLM)
def test_default_positions_are_the_official_ones(model, name):
    """The default equals the press's official numbering, passed explicitly, on a ragged batch."""
    press, batch = mmpress.get_press(name, keep=16), make_batch(**RAGGED)
    official = PRESSES[name].official_positions
    assert official in ("keep", "reindex")
    torch.testing.assert_close(logits(model, press, batch), logits(model, press, batch, positions=official),
                               rtol=0, atol=0)


def test_llava_codebase_presses_reindex_and_the_others_keep():
    """Where the official code runs pre-LLM pruning inside LLaVA's prepare_inputs (the pruned
    sequence numbered 0..L'-1), the default renumbers; FastVID and EVS keep the original ids."""
    keeps = {name for name in PRE_LLM if PRESSES[name].official_positions == "keep"}
    assert keeps == {"fastvid", "evs"}


def test_default_differs_from_keep_where_official_reindexes(model):
    """Renumbering changes RoPE and so the logits: the default is not the old 'keep'."""
    press, batch = mmpress.get_press("divprune", keep=16), make_batch(**RAGGED)
    default = logits(model, press, batch)
    assert not torch.allclose(default, logits(model, press, batch, positions="keep"), atol=1e-4)
    torch.testing.assert_close(default, logits(model, press, batch, positions="reindex"), rtol=0, atol=0)


def test_a_composition_with_a_later_stage_keeps_the_ids(model):
    """In-LLM stages start from the original ids, so a composition's default is 'keep'."""
    press = mmpress.compose(mmpress.get_press("divprune", keep=32), mmpress.get_press("fastv", keep=16, layer=1))
    batch = make_batch(**RAGGED)
    torch.testing.assert_close(logits(model, press, batch), logits(model, press, batch, positions="keep"),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="positions='keep'"):
        logits(model, press, batch, positions="reindex")
