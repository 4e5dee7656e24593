"""A model split by accelerate (``device_map`` with CPU and disk offload, ``disk_offload``,
``cpu_offload``) is pressed as the same model on one device: keep-all reproduces the unpressed
logits bit for bit, and each stage's press (pre-LLM DivPrune and VisionZip, in-LLM FastV, KV
SnapKV) gives the logits and greedy tokens it gives on the plain model, at batch 1 and on a
ragged batch, for every family.

accelerate loads an offloaded module's weights only for that module's own forward (its hooks
wrap ``forward``): a press reading a weight outside it, or computing a layer's queries and keys
from weights it does not run through the module, would see the meta device. The split puts the
vision tower, the projector and every other decoder layer (FastV's signal layer among them) on
disk."""

from __future__ import annotations

import copy

import accelerate
import pytest
import torch

import mmpress
from mmpress.registry import FAMILIES, get_adapter

STEPS = 2
STAGES = ("divprune", "visionzip", "fastv", "snapkv")  # pre-LLM x2, in-LLM, KV
# accelerate hooks each weighted submodule of an offloaded block; nn.MultiheadAttention (SigLIP's
# pooling head) reads its out_proj's weight without calling it, so that tower fails offloaded even
# unpressed: it stays on the CPU
TOWER_ON_CPU = {"llava_onevision"}
# Qwen2AudioModel moves input_features to its audio tower's device, meta when the tower is offloaded
# (unpressed too): that tower stays on the CPU
TOWER_ON_CPU |= {"qwen2_audio"}
# accelerate asks for the VLM's own weights (image_newline) in the map, then warns they are no submodule
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:The following device_map keys do not match:UserWarning")]


def split_map(cls, model) -> dict[str, str]:
    """A block-level device map as ``from_pretrained(device_map=...)`` makes: the VLM's media
    modules and even decoder layers on disk, the rest (LLaVA-NeXT's ``image_newline`` too) on the CPU."""
    inner, lm_name = model.model, cls.language_model_attr
    placement = {f"model.{n}": "cpu" for n, _ in inner.named_parameters(recurse=False)}
    for name, child in inner.named_children():
        if name != lm_name:
            placement[f"model.{name}"] = "cpu" if cls.family in TOWER_ON_CPU and "tower" in name else "disk"
            continue
        for part, _ in child.named_children():
            if part != "layers":
                placement[f"model.{name}.{part}"] = "cpu"
        for i in range(len(child.layers)):
            placement[f"model.{name}.layers.{i}"] = "disk" if i % 2 == 0 else "cpu"
    placement |= {name: "cpu" for name, _ in model.named_children() if name != "model"}
    return placement


MATRIX = ("llava", "qwen_vl")  # every stage's press x {one row, a ragged batch}; the others: one composition
OTHERS = [name for name in FAMILIES if name not in MATRIX]


def split_pair(family: str, folder) -> tuple:
    """(family class, plain model, the same weights dispatched over CPU and disk)."""
    cls = FAMILIES[family]
    torch.manual_seed(0)
    plain = cls.build("tiny", **({"model_type": "qwen2_vl"} if family == "qwen_vl" else {}))
    split = accelerate.dispatch_model(copy.deepcopy(plain), split_map(cls, plain), offload_dir=str(folder))
    assert any(p.is_meta for p in split.parameters())  # really offloaded
    return cls, plain, split


@pytest.fixture(scope="module", params=MATRIX)
def pair(request, tmp_path_factory):
    return split_pair(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module", params=OTHERS)
def other(request, tmp_path_factory):
    return split_pair(request.param, tmp_path_factory.mktemp(request.param))


def generate(model, inputs):
    out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -STEPS:], torch.stack(out.logits, dim=1)


def stage_press(name: str, model):
    """``name`` at a small budget; FastV at the first layer the family lets it act (None: none)."""
    if name == "fastv":
        for layer in range(1, len(get_adapter(model).lm.layers)):
            press = mmpress.get_press("fastv", keep_ratio=0.5, layer=layer)
            try:
                with press(model):
                    return press
            except ValueError:  # e.g. Qwen3-VL's DeepStack layers, Qwen3.5's linear-attention layers
                continue
        return None
    return mmpress.get_press(name, keep_ratio=0.5, **({"window": 4} if name == "snapkv" else {}))


def check_runs(press, plain, split, batch, exact: bool):
    with torch.no_grad():
        with press(plain) as run:
            tokens, scores = generate(plain, batch)
        with press(split) as split_run:
            split_tokens, split_scores = generate(split, batch)
    assert split_run.stats == run.stats
    assert torch.equal(split_tokens, tokens)
    if exact:
        assert torch.equal(split_scores, scores)
    else:
        torch.testing.assert_close(split_scores, scores, atol=1e-5, rtol=1e-5)
    return run.stats


def keep_all_matches(cls, plain, split, rows: str):
    batch = cls.prompts(plain, cls.example_rows[rows])
    with torch.no_grad():
        reference, (ref_tokens, ref_scores) = plain(**batch).logits, generate(plain, batch)
        with mmpress.get_press("none")(split) as run:
            logits, (tokens, scores) = split(**batch).logits, generate(split, batch)
    assert torch.equal(logits, reference) and torch.equal(scores, ref_scores) and torch.equal(tokens, ref_tokens)
    assert run.stats.kept_visual_tokens == run.stats.visual_tokens > 0


@pytest.mark.parametrize("rows", ["single", "ragged"])
def test_keep_all_on_a_split_model_reproduces_the_unpressed_logits(pair, rows):
    keep_all_matches(*pair, rows)


@pytest.mark.parametrize("name", STAGES)
@pytest.mark.parametrize("rows", ["single", "ragged"])
def test_a_press_on_a_split_model_acts_as_on_one_device(pair, name, rows):
    cls, plain, split = pair
    press = stage_press(name, plain)
    if press is None:
        pytest.skip(f"no layer of the tiny {cls.family} LM takes an in-LLM press (test_stages.py covers it)")
    stats = check_runs(press, plain, split, cls.prompts(plain, cls.example_rows[rows]), exact=False)
    assert stats.kept_visual_tokens < stats.visual_tokens


@pytest.mark.parametrize("family, offload", [("llava", "disk_offload"), ("qwen_vl", "cpu_offload")])
def test_a_wholly_offloaded_model_is_pressed(family, offload, tmp_path):
    """``accelerate.disk_offload`` / ``cpu_offload`` leave every weight on the meta device and no
    ``hf_device_map``: accelerate's hooks load them, so this is not an unloaded model (which raises,
    test_safety.py)."""
    cls = FAMILIES[family]
    torch.manual_seed(0)
    plain = cls.build("tiny")
    split = copy.deepcopy(plain)
    if offload == "disk_offload":
        accelerate.disk_offload(split, str(tmp_path))
    else:
        accelerate.cpu_offload(split)
    assert all(p.is_meta for p in split.parameters()) and not hasattr(split, "hf_device_map")
    batch = cls.prompts(plain, cls.example_rows["single"])
    check_runs(mmpress.get_press("none"), plain, split, batch, exact=True)
    check_runs(mmpress.get_press("divprune", keep_ratio=0.5), plain, split, batch, exact=False)


def test_every_family_split_keep_all_and_every_stage(other):
    """The other families, on a ragged batch: keep-all bit for bit, then the four presses in two
    compositions (an in-LLM and a KV press do not compose): VisionZip + FastV (where the tiny LM
    takes an in-LLM press), DivPrune + SnapKV, each as on the plain model."""
    cls, plain, split = other
    keep_all_matches(cls, plain, split, "ragged")
    batch = cls.prompts(plain, cls.example_rows["ragged"])
    for names in (("visionzip", "fastv"), ("divprune", "snapkv")):
        presses = [p for p in (stage_press(name, plain) for name in names) if p is not None and cls.runs(p)]
        press = mmpress.compose(*presses) if len(presses) > 1 else presses[0]
        stats = check_runs(press, plain, split, batch, exact=False)
        assert stats.kept_visual_tokens < stats.visual_tokens


def test_from_pretrained_with_a_device_map_and_an_offload_folder(tmp_path):
    """The user's path: a saved model loaded with ``device_map`` (tower and a decoder layer on
    disk) and ``offload_folder``, pressed as the plain model."""
    cls = FAMILIES["llava"]
    torch.manual_seed(0)
    plain = cls.build("tiny")
    plain.save_pretrained(tmp_path / "model")
    placement = split_map(cls, plain)
    split = type(plain).from_pretrained(tmp_path / "model", device_map=placement,
                                        offload_folder=str(tmp_path / "offload")).eval()
    split.generation_config.pad_token_id = plain.generation_config.pad_token_id
    assert split.hf_device_map == placement and any(p.is_meta for p in split.parameters())
    keep_all_matches(cls, plain, split, "ragged")
    check_runs(stage_press("fastv", plain), plain, split, cls.prompts(plain, cls.example_rows["ragged"]), exact=False)


def test_ask_on_a_split_model_answers_as_on_one_device(tmp_path):
    """``mmpress.ask`` puts its inputs on the model's first real device, not on the meta device
    of an offloaded first weight (the tower)."""
    from conftest import tiny_llava, tiny_processor
    from PIL import Image

    plain, processor = tiny_llava(), tiny_processor()
    split = accelerate.dispatch_model(copy.deepcopy(plain), {"model.vision_tower": "disk", "model.multi_modal_projector": "cpu",
                                                             "model.language_model": "cpu", "lm_head": "cpu"},
                                      offload_dir=str(tmp_path))
    assert next(split.parameters()).is_meta
    images = [Image.new("RGB", (32, 32), color) for color in ("red", "blue")]
    questions = ["what color is the circle", "is there a square"]
    press = mmpress.get_press("divprune", keep=8)
    assert mmpress.ask(split, processor, images, questions, press=press) == \
        mmpress.ask(plain, processor, images, questions, press=press)
