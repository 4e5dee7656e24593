"""Press specs: the text form lmms-eval's --model_args, the CLI and `mmpress tune` files share."""

import json

import pytest

import mmpress
from mmpress.presses import PRESSES, compose, get_press
from mmpress.presses.base import LayerPress
from mmpress.presses.compose import AtLayerPress
from mmpress.presses.spec import load_press, load_settings, parse_press, press_spec, save_press


@pytest.mark.parametrize("name", sorted(PRESSES))
def test_every_press_round_trips(name):
    cls = PRESSES[name]
    press = get_press(name, **({"keep": 64} if cls.needs_budget else {}))
    assert parse_press(press_spec(press)) == press
    if cls.needs_budget and name != "sparsevlm":  # SparseVLM takes only its official counts
        ratio = get_press(name, keep_ratio=0.3)
        assert parse_press(press_spec(ratio)) == ratio


def test_layer_and_composition():
    fastv = parse_press("fastv:64@3")
    assert isinstance(fastv, LayerPress) and fastv.layer == 3 and fastv.keep == 64
    inside = parse_press("divprune:64@2")
    assert isinstance(inside, AtLayerPress) and inside.layer == 2 and inside.inner.keep == 64
    both = parse_press("visionzip:128+fastv:64")
    assert both == compose(get_press("visionzip", keep=128), get_press("fastv", keep=64))
    assert press_spec(both) == "visionzip:128+fastv:64"


@pytest.mark.parametrize("bad, says", [
    ("divprun:64", "did you mean 'divprune'"), ("divprune:x", "name[:keep or ratio][@layer]"),
    ("divprune:64+", "cannot read ''"), ("snapkv:0.5@2", "kv press"), ("pdrop:0.5@2", "own fields"), ("", "non-empty"),
    ("divprune:0", "keep"), ("divprune:1.5", "keep_ratio"),
])
def test_bad_specs_say_how_to_fix(bad, says):
    with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("(", r"\(")):
        parse_press(bad)


def test_fields_reach_only_presses_that_have_them():
    assert parse_press("visionzip:128+sparsevlm:64", recycle=False).presses[1] == get_press("sparsevlm", keep=64,
                                                                                             recycle=False)
    with pytest.raises(ValueError, match="no press"):
        parse_press("divprune:64", nonsense=1)


def test_settings_file_round_trip(tmp_path):
    path = save_press(tmp_path / "press.json", parse_press("visionzip:128+fastv:64"), positions="keep", agreement=0.97)
    assert json.loads(path.read_text())["agreement"] == 0.97
    assert mmpress.load_press(path) == parse_press("visionzip:128+fastv:64")
    assert load_settings(path)["positions"] == "keep"
    (tmp_path / "bad.json").write_text('{"press": "divprune:64", "positions": "sideways"}')
    with pytest.raises(ValueError, match="positions"):
        load_settings(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="mmpress tune"):
        load_press(tmp_path / "missing.json")
