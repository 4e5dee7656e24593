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


def vllm_tokens(llm, requests) -> list[tuple[list[int], list[float]]]:
    """Each request's greedy tokens and their log-probabilities (the random models' distributions
    are nearly flat: the log-probabilities catch a wrong position or token that the argmax hides)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)
    prompts = [{"prompt_token_ids": ids, **({"multi_modal_data": {"image": imgs if len(imgs) > 1 else imgs[0]}}
                                            if imgs else {})} for ids, imgs in requests]
    outs = [out.outputs[0] for out in llm.generate(prompts, params, use_tqdm=False)]
    return [(list(o.token_ids), [step[t].logprob for step, t in zip(o.logprobs, o.token_ids)]) for o in outs]


def same(got, want, atol: float = 2e-4) -> None:
    """Same greedy tokens, log-probabilities within float32 noise."""
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
    for (_, a), (_, b) in zip(got, want):
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)


#: vLLM's own Qwen2.5-VL (unpressed) differs from transformers' by up to 8e-4 in these
#: log-probabilities on image requests (text-only: 1.5e-7), measured here: its vision tower's
#: float32 arithmetic. Qwen's positions are checked exactly by test_qwen_positions_match_transformers.
QWEN_ATOL = 3e-3


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
        kwargs = dict(max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0, output_scores=True,
                      return_dict_in_generate=True)
        if press is None or not imgs:
            generated = model.generate(**inputs, **kwargs)
        else:
            with press(model):
                generated = model.generate(**inputs, **kwargs)
        tokens = generated.sequences[0, inputs["input_ids"].shape[1]:]
        logprobs = [torch.log_softmax(score[0].double(), -1)[t].item() for score, t in zip(generated.scores, tokens)]
        out.append((tokens.tolist(), logprobs))
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
    from mmpress.vllm.core import BASE_SIGNALS as signals

    for spec in ("divprune:8", "tome:8", "random:8", "uniform:8", "pool:0.25", "dart:8", "cdpruner:8"):
        check_press(parse_press(spec), "LLaVA", signals)
    with pytest.raises(ValueError, match="vision_features"):
        check_press(parse_press("mmtok:8"), "LLaVA", signals)
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


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen2_vl"])
def test_qwen_positions_match_transformers(model_type):
    """The ids vLLM gives a pressed Qwen2.5-VL prompt (request time, then after the encoder, in one
    step and in chunks that split an image) are the transformers path's: the unpressed prompt's
    M-RoPE ids (transformers' get_rope_index) at the kept columns, and decoding continuing after
    the unpressed prompt's largest id. No engine."""
    from types import SimpleNamespace

    from mmpress.registry import FAMILIES
    from mmpress.vllm.qwen_vl import PressedQwen2_5_VL, PressedQwen2_VL, with_offsets

    model = FAMILIES["qwen_vl"].build("tiny", model_type=model_type)
    config = model.config
    grids = [(1, 8, 8), (1, 12, 16)]  # patches; tokens: 4 x 4 and 6 x 8
    keep = [5, 11]
    g = torch.Generator().manual_seed(0)
    kept = [torch.randperm(t * h * w // 4, generator=g)[:k].sort().values for (t, h, w), k in zip(grids, keep)]
    text = [[11, 12, QWEN_START], [QWEN_END, 20, QWEN_START], [QWEN_END, 30, 31]]
    full, pressed, keep_cols = [], [], []
    for i, piece in enumerate(text):
        keep_cols += range(len(full), len(full) + len(piece))
        full += piece
        pressed += piece
        if i < len(grids):
            n = grids[i][0] * grids[i][1] * grids[i][2] // 4
            keep_cols += (len(full) + kept[i]).tolist()
            full += [3] * n
            pressed += [3] * keep[i]
    ids = torch.tensor([full])
    want, _ = model.model.get_rope_index(ids, (ids == 3).int(), image_grid_thw=torch.tensor(grids),
                                         attention_mask=torch.ones_like(ids))
    want = want[:, 0, keep_cols]
    want_delta = int(want.max()) + 1 - len(pressed)

    cls = PressedQwen2_5_VL if model_type == "qwen2_5_vl" else PressedQwen2_VL
    vllm_model = cls.__new__(cls)  # its position methods only: no weights
    for name, value in (("config", config), ("mmpress", parse_press("divprune:4"))):
        object.__setattr__(vllm_model, name, value)
    offsets, features, at = [], [], 0
    for i, grid in enumerate(grids):
        at = pressed.index(3, at)
        features.append(SimpleNamespace(modality="image", mm_position=SimpleNamespace(offset=at, length=keep[i]),
                                         data={"image_grid_thw": SimpleNamespace(data=torch.tensor(grid))}))
        merged = (grid[0], grid[1] // 2, grid[2] // 2)
        offsets.append(with_offsets(torch.randn(keep[i], 8), kept[i], merged))
        at += keep[i]
    positions, delta = vllm_model.get_mrope_input_positions(pressed, features)
    assert delta == want_delta
    embeds, got, got_delta = vllm_model.recompute_mrope_positions(pressed, offsets, positions, 0)
    assert torch.equal(got, want) and got_delta == want_delta
    assert [e.shape[1] for e in embeds] == [8, 8]
    # chunked prefill: the first chunk ends inside the second image
    cut = features[1].mm_position.offset + 4
    first = [offsets[0], offsets[1][:4]]
    _, part, _ = vllm_model.recompute_mrope_positions(pressed, first, positions, 0)
    _, chunked, chunked_delta = vllm_model.recompute_mrope_positions(pressed, [offsets[1][4:]], part, cut)
    assert torch.equal(chunked, want) and chunked_delta == want_delta


# ---- LLaVA-1.5 end to end ------------------------------------------------------------------------
LLAVA_SPEC = "dart:16"  # text-guided: the prompt's text and the tokens' sequence indices reach the press


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
    llm = engine(folder, LLAVA_SPEC, mm_processor_cache_gb=0)
    yield folder, llm
    del llm


def test_llava_batch1_same_tokens_as_transformers(llava):
    folder, llm = llava
    request = LLAVA_REQUESTS[:1]
    same(vllm_tokens(llm, request), transformers_tokens(folder, LLAVA_SPEC, request, llava_expand))


def test_llava_concurrent_and_text_only_same_tokens_as_transformers(llava):
    folder, llm = llava
    got = vllm_tokens(llm, LLAVA_REQUESTS)
    same(got, transformers_tokens(folder, LLAVA_SPEC, LLAVA_REQUESTS, llava_expand))
    unpressed = transformers_tokens(folder, None, LLAVA_REQUESTS, llava_expand)
    assert [g for g, u, (_, imgs) in zip(got, unpressed, LLAVA_REQUESTS) if imgs and g != u]  # it pressed


def test_llava_tensor_parallel_2_same_tokens(llava):
    """tensor_parallel_size=2 on the CPU build: two ranks (gloo on loopback), one core each."""
    import os

    folder, _ = llava
    if (os.cpu_count() or 1) < 2:
        pytest.skip("two ranks need two CPUs")
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # vLLM's automatic binding wants a NUMA node per rank
    try:
        llm = engine(folder, LLAVA_SPEC, tensor_parallel_size=2, mm_processor_cache_gb=0)
        got = vllm_tokens(llm, LLAVA_REQUESTS)
        del llm
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old
    same(got, transformers_tokens(folder, LLAVA_SPEC, LLAVA_REQUESTS, llava_expand))


def test_refused_at_startup(llava):
    """A press the plugin cannot run raises the ValueError itself when the engine is built."""
    folder, _ = llava
    with pytest.raises(ValueError, match="in_llm press"):
        engine(folder, "fastv:8@2")
    with pytest.raises(ValueError, match="mm_processor_cache_gb=0"):
        engine(folder, "cdpruner:8")


def test_llava_same_image_other_prompt_is_pressed_again(llava):
    """A text-guided press's selection depends on the prompt: vLLM's encoder cache, keyed by the
    image, must not serve one prompt's pressing to another (the plugin salts the item's hash)."""
    folder, llm = llava
    img = image(0, 32)
    requests = [([11, 12, 13, 3, 20, 21, 22], [img]), ([11, 3, 40, 41, 42, 43, 44, 45, 46], [img])]
    got = [vllm_tokens(llm, [r])[0] for r in requests]  # one after the other: the second may hit the cache
    same(got, transformers_tokens(folder, LLAVA_SPEC, requests, llava_expand))


def test_llava_prompt_holds_the_budget(llava):
    from vllm import SamplingParams

    _, llm = llava
    ids, imgs = LLAVA_REQUESTS[3]
    out = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": imgs}}],
                       SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == len(ids) - 2 + 2 * 16
    assert out.prompt_token_ids.count(3) == 2 * 16


# ---- Qwen2.5-VL end to end (M-RoPE: kept tokens keep their ids, text keeps the unpressed ids) ----
QWEN_SPEC = "divprune:0.25"
QWEN_START, QWEN_END = 5, 6


def qwen_expand(ids, imgs, processor):
    inputs = {}
    sizes = []
    if imgs:
        pixels = processor.image_processor(images=imgs, return_tensors="pt")
        inputs = {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
        sizes = [int(g.prod()) // 4 for g in pixels["image_grid_thw"]]
    expanded, item = [], 0
    for i in ids:
        if i == 3:
            expanded += [3] * sizes[item]
            item += 1
        else:
            expanded.append(i)
    return {"input_ids": torch.tensor([expanded]), **inputs}


QWEN_REQUESTS = [
    ([11, 12, QWEN_START, 3, QWEN_END, 20, 21, 22], [image(10, 32)]),
    ([14, QWEN_START, 3, QWEN_END, 30, 31, 32, 33, 34], [image(11, 48)]),  # another grid: 6 x 6 tokens
    ([40, 41, 42, 43, 44, 45], []),  # text only
    ([15, QWEN_START, 3, QWEN_END, 17, QWEN_START, 3, QWEN_END, 50], [image(12, 32), image(13, 64)]),
]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def qwen(request, tmp_path_factory):
    from mmpress.vllm.testing import save_tiny

    folder = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    llm = engine(folder, QWEN_SPEC)
    yield folder, llm
    del llm


def test_qwen_batch1_same_tokens_as_transformers(qwen):
    folder, llm = qwen
    request = QWEN_REQUESTS[:1]
    same(vllm_tokens(llm, request), transformers_tokens(folder, QWEN_SPEC, request, qwen_expand), QWEN_ATOL)


def test_qwen_concurrent_and_text_only_same_tokens_as_transformers(qwen):
    folder, llm = qwen
    got = vllm_tokens(llm, QWEN_REQUESTS)
    same(got, transformers_tokens(folder, QWEN_SPEC, QWEN_REQUESTS, qwen_expand), QWEN_ATOL)
    unpressed = transformers_tokens(folder, None, QWEN_REQUESTS, qwen_expand)
    assert [g for g, u, (_, imgs) in zip(got, unpressed, QWEN_REQUESTS) if imgs and g != u]  # it pressed


def test_qwen_prompt_holds_the_budget(qwen):
    from vllm import SamplingParams

    _, llm = qwen
    ids, imgs = QWEN_REQUESTS[3]
    out = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": imgs}}],
                       SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert out.prompt_token_ids.count(3) == 4 + 16  # a quarter of 16 and of 64 tokens
