"""mmpress as vLLM's plugin, end to end on vLLM's CPU build (``scripts/install_vllm.sh`` makes
``.venv-vllm``; without vLLM this module skips). On the same tiny random weights (float32), a press
gives the same greedy tokens through vLLM as through mmpress's transformers path
(``with press(model): model.generate(...)``, one request at a time): at batch 1, for several
concurrent requests of different images and prompts, and with text-only requests mixed in.
One engine per model (start-up is most of the time), several checks per engine."""

from __future__ import annotations

import os

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed: bash scripts/install_vllm.sh makes .venv-vllm")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mmpress.presses.spec import parse_press  # noqa: E402
from mmpress.vllm.core import check_press, kept_count, press_of  # noqa: E402

MAX_TOKENS = 8
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the machine is shared
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")  # keep every engine (gloo) on loopback


def image(seed: int, side: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def engine(folder, spec: str | None, **kwargs):
    from vllm import LLM

    overrides = {} if spec is None else {"mmpress": {"press": spec}}
    return LLM(model=str(folder), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
               hf_overrides=overrides, limit_mm_per_prompt={"image": 2}, **kwargs)


def vllm_tokens(llm, requests) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": ids, **({"multi_modal_data": {"image": imgs if len(imgs) > 1 else imgs[0]}}
                                            if imgs else {})} for ids, imgs in requests]
    return [list(out.outputs[0].token_ids) for out in llm.generate(prompts, params, use_tqdm=False)]


def transformers_tokens(folder, spec: str | None, requests, expand) -> list[list[int]]:
    """mmpress's transformers path, one request at a time: ``expand(ids, images, processor)``
    gives the processor-expanded ``input_ids`` and pixel inputs."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, info = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval().generation_config.eos_token_id = None  # vLLM runs with ignore_eos
    processor = AutoProcessor.from_pretrained(folder)
    press = None if spec is None else parse_press(spec)
    out = []
    for ids, imgs in requests:
        inputs = expand(ids, imgs, processor)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        kwargs = dict(max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        if press is None or not imgs:
            generated = model.generate(**inputs, **kwargs)
        else:
            with press(model):
                generated = model.generate(**inputs, **kwargs)
        out.append(generated[0, inputs["input_ids"].shape[1]:].tolist())
    return out


# ---- no engine: reading and refusing presses -----------------------------------------------------
class _Config:
    def __init__(self, value):
        self.mmpress = value


def test_press_of_reads_spec_and_fields():
    assert press_of(_Config("divprune:64")) == parse_press("divprune:64")
    assert press_of(_Config({"press": "random:16", "seed": 3})) == parse_press("random:16", seed=3)
    assert press_of(_Config("none")) is None and press_of(object()) is None
    with pytest.raises(ValueError, match="single press"):
        press_of(_Config("visionzip:64+fastv:32@2"))
    with pytest.raises(ValueError, match="press spec"):
        press_of(_Config({"keep": 64}))


def test_check_press_refuses_what_vllm_cannot_run():
    signals = frozenset({"grid"})
    for spec in ("divprune:8", "tome:8", "random:8", "uniform:8", "pool:0.25"):
        check_press(parse_press(spec), "LLaVA", signals)
    with pytest.raises(ValueError, match="in_llm press"):
        check_press(parse_press("fastv:8@2"), "LLaVA", signals)
    with pytest.raises(ValueError, match="kv press"):
        check_press(parse_press("snapkv:8"), "LLaVA", signals)
    with pytest.raises(ValueError, match="cls_attn"):
        check_press(parse_press("visionzip:8"), "LLaVA", signals)


def test_kept_count_is_the_press_budget():
    for spec in ("divprune:16", "divprune:100", "divprune:0.25", "pool:0.3", "random:1"):
        press = parse_press(spec)
        for n in (1, 7, 64, 576):
            with pytest.warns(UserWarning) if press.keep is not None and press.keep > n else _nothing():
                assert kept_count(press, n) == press.budget(n)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---- LLaVA-1.5 end to end ------------------------------------------------------------------------
LLAVA_SPEC = "divprune:16"


def llava_expand(ids, imgs, processor):
    n = 64  # the tiny tower: 32 px / 4 px patches, "default" strategy (no [CLS])
    expanded = [t for i in ids for t in ([i] * n if i == 3 else [i])]
    inputs = {"input_ids": torch.tensor([expanded])}
    if imgs:
        inputs["pixel_values"] = processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
    return inputs


LLAVA_REQUESTS = [
    ([11, 12, 13, 3, 20, 21, 22], [image(0, 32)]),
    ([14, 3, 30, 31, 32, 33, 34, 35, 36], [image(1, 32)]),
    ([40, 41, 42, 43, 44, 45], []),  # text only
    ([15, 16, 3, 17, 3, 50, 51], [image(2, 32), image(3, 32)]),  # two images in one prompt
    ([18, 3, 19], [image(4, 32)]),
]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from mmpress.vllm.testing import save_tiny

    folder = save_tiny("llava", tmp_path_factory.mktemp("llava"))
    llm = engine(folder, LLAVA_SPEC)
    yield folder, llm
    del llm


def test_llava_batch1_same_tokens_as_transformers(llava):
    folder, llm = llava
    request = LLAVA_REQUESTS[:1]
    assert vllm_tokens(llm, request) == transformers_tokens(folder, LLAVA_SPEC, request, llava_expand)


def test_llava_concurrent_and_text_only_same_tokens_as_transformers(llava):
    folder, llm = llava
    got = vllm_tokens(llm, LLAVA_REQUESTS)
    want = transformers_tokens(folder, LLAVA_SPEC, LLAVA_REQUESTS, llava_expand)
    assert got == want
    unpressed = transformers_tokens(folder, None, LLAVA_REQUESTS[:1], llava_expand)
    assert got[0] != unpressed[0] or got[1] != transformers_tokens(folder, None, LLAVA_REQUESTS[1:2], llava_expand)[0]


def test_llava_prompt_holds_the_budget(llava):
    from vllm import SamplingParams

    _, llm = llava
    ids, imgs = LLAVA_REQUESTS[3]
    out = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": imgs}}],
                       SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == len(ids) - 2 + 2 * 16
    assert out.prompt_token_ids.count(3) == 2 * 16
