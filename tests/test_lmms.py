"""The lmms-eval plugin (``--model mmpress``) end to end, offline. Runs in the venv
``bash scripts/install_lmms.sh`` makes (``.venv-lmms/bin/python -m pytest tests/test_lmms.py``);
skipped where lmms-eval is not installed.

lmms-eval's CLI exits 0 even when the evaluation fails, so every check reads the results and
samples files it wrote, never its exit code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

import lmms_eval.models  # noqa: E402  (loads the entry points: registers the model and the task folder)
import torch  # noqa: E402

from mmpress.eval.data import exact_match, load_dataset  # noqa: E402
from mmpress.lmms import TASKS_DIR  # noqa: E402
from mmpress.lmms.model import MMPress, build_press  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
LIMIT = 8
TASK = "mmpress_easyvqa"
# name -> (model_args, batch size): unpressed and pressed, batch 1 and 4, both ways of writing a press
RUNS = {
    "none_b1": ("pretrained=demo", 1),
    "none_b4": ("pretrained=demo,press=none", 4),
    "pressed_b1": ("pretrained=demo,press=divprune:64", 1),
    "pressed_b4": ("pretrained=demo,press=divprune,keep=64", 4),
}


def read_run(folder: Path, task: str = TASK) -> tuple[dict, list[dict]]:
    """The results and the samples (ordered by doc_id) lmms-eval wrote under ``folder``; a run that
    wrote none failed, whatever its exit code said."""
    results = sorted(folder.glob("**/*_results.json"))
    samples = sorted(folder.glob(f"**/*_samples_{task}.jsonl"))
    assert results and samples, f"lmms-eval wrote no results/samples under {folder}: the evaluation failed"
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    return json.loads(results[-1].read_text()), sorted(rows, key=lambda r: r["doc_id"])


def lmms_cli(args: list[str], log: Path, launcher: list[str] | None = None, timeout: int = 1200) -> None:
    command = (launcher or [sys.executable, "-m"]) + ["lmms_eval", *args]
    env = {**os.environ, **OFFLINE}
    with log.open("w") as out:
        subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, list[dict]]]:
    """The four runs of RUNS in ONE lmms-eval process (its --config takes a list of runs)."""
    root = tmp_path_factory.mktemp("lmms")
    config = [dict(model="mmpress", model_args=args, tasks=TASK, limit=LIMIT, batch_size=batch,
                   output_path=str(root / name), log_samples=True) for name, (args, batch) in RUNS.items()]
    (root / "runs.yaml").write_text(json.dumps(config))  # JSON is YAML
    lmms_cli(["--config", str(root / "runs.yaml")], root / "log.txt")
    out = {}
    for name in RUNS:
        try:
            out[name] = read_run(root / name)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{(root / 'log.txt').read_text()[-4000:]}") from None
    return out


def answers(samples: list[dict]) -> dict[int, str]:
    return {s["doc_id"]: s["filtered_resps"] for s in samples}


@pytest.mark.parametrize("name", list(RUNS))
def test_results_file_holds_accuracy_and_kept_tokens(runs, name):
    """Each run's results file: the task's accuracy (the mean of the per-sample exact matches,
    recomputed here) over LIMIT questions, and the run's visual tokens: 64 of 256 kept pressed, all
    256 unpressed, a FLOPs ratio below 1 pressed and 1 unpressed, a positive prefill time; every
    logged sample names the press and its kept tokens."""
    results, samples = runs[name]
    pressed = name.startswith("pressed")
    assert len(samples) == LIMIT and [s["doc_id"] for s in samples] == list(range(LIMIT))
    accuracy = results["results"][TASK]["accuracy,none"]
    assert accuracy == pytest.approx(sum(exact_match(s["filtered_resps"], s["target"]) for s in samples) / LIMIT)
    figures = results["throughput"]
    assert figures["avg_visual_tokens"] == 256
    assert figures["avg_visual_tokens_kept"] == (64 if pressed else 256)
    assert (0.2 < figures["avg_flops_ratio"] < 0.7) if pressed else figures["avg_flops_ratio"] == pytest.approx(1.0)
    assert figures["avg_prefill_s"] > 0
    for s in samples:
        (counts,) = s["token_counts"]
        assert counts["press"] == ("divprune:64" if pressed else "none")
        assert (counts["visual_tokens"], counts["visual_tokens_kept"]) == (256, 64 if pressed else 256)
        assert counts["input_tokens"] > 256 and counts["output_tokens"] >= 1


def test_unpressed_accuracy_is_sane(runs):
    """The demo model answers most of the first easy-vqa questions (it reaches 0.78 on 200; the
    majority answer 0.38): a broken prompt or image path falls well below."""
    assert runs["none_b1"][0]["results"][TASK]["accuracy,none"] >= 0.5


@pytest.mark.parametrize("press", ["none", "pressed"])
def test_batch_4_answers_equal_batch_1(runs, press):
    """Ragged batches of 4 (left-padded prompts of different lengths) answer every question as
    batch 1 does, pressed and not."""
    assert answers(runs[f"{press}_b4"][1]) == answers(runs[f"{press}_b1"][1])


def test_unpressed_answers_equal_mmpress_ask(runs):
    """The plugin asks the demo model exactly what ``mmpress.ask`` asks (the prompt it was trained
    on): the same answers to the same questions."""
    import mmpress

    model, processor = mmpress.load_demo()
    data = load_dataset("easy-vqa", limit=LIMIT)
    ours = mmpress.ask(model, processor, [d["image"] for d in data], [d["question"] for d in data])
    assert [s["input"] for s in runs["none_b1"][1]] == [f"{d['question']} Answer with one word." for d in data]
    assert list(answers(runs["none_b1"][1]).values()) == ours


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_answer_as_one(runs, tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo): the ranks split the questions, the merged
    samples file answers each question as the 1-process run, and the results' kept tokens cover
    the whole run."""
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m"]
    env_cpu = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    os.environ.update(env_cpu)
    try:
        lmms_cli(["--model", "mmpress", "--model_args", RUNS["pressed_b4"][0], "--tasks", TASK, "--limit", str(LIMIT),
                  "--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"],
                 tmp_path / "log.txt", launcher=launcher)
    finally:
        for key in env_cpu:
            os.environ.pop(key)
    try:
        results, samples = read_run(tmp_path / "out")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{(tmp_path / 'log.txt').read_text()[-4000:]}") from None
    assert "rank 1" in (tmp_path / "log.txt").read_text()  # two ranks ran, not one
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))
    assert answers(samples) == answers(runs["pressed_b1"][1])
    assert results["throughput"]["avg_visual_tokens_kept"] == 64


# ---- a tiny random model of another family (Gemma 3), saved and loaded by path ----------------------
TEMPLATE = ("{% for m in messages %}<bos> {% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image> {% else %}{{ c['text'] }}"
            "{% endif %}{% endfor %}{% endif %} <eos> {% endfor %}{% if add_generation_prompt %}w9{% endif %}")


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    """Gemma 3's tiny random model (``build("tiny")``) and a word-level processor over its ids,
    written with save_pretrained: the plugin loads it by path like any checkpoint."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, PreTrainedTokenizerFast

    from mmpress.models.gemma3 import BOI, EOI, IMAGE_TOKEN
    from mmpress.registry import FAMILIES

    model = FAMILIES["gemma3"].build("tiny")
    specials = ["<pad>", "<eos>", "<bos>", "<image_soft_token>", "<start_of_image>", "<end_of_image>"]
    assert [specials.index(t) for t in specials[3:]] == [IMAGE_TOKEN, BOI, EOI]
    vocab = {t: i for i, t in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), 64)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                        extra_special_tokens={"image_token": "<image_soft_token>",
                                                              "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"})
    size = model.config.vision_config.image_size
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
                                tokenizer=tokenizer, image_seq_length=model.config.mm_tokens_per_image,
                                chat_template=TEMPLATE)
    folder = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def evaluate(model_args: str, task: str, batch_size: int = 2, limit: int = 4, include: Path | None = None) -> dict:
    """lmms-eval's own evaluator in this process (the CLI's code after argument parsing)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    os.environ.update(OFFLINE)
    manager = TaskManager("WARNING", include_path=str(include) if include else None)
    return simple_evaluate(model="mmpress", model_args=model_args, tasks=[task], batch_size=batch_size, limit=limit,
                           log_samples=True, task_manager=manager)


def test_tiny_gemma3_through_the_plugin(gemma_dir):
    """Not LLaVA only: a Gemma 3 checkpoint by path, on the JSONL template task, ragged batch 2:
    its 16 image tokens per image pressed to 4, per run and per sample."""
    from mmpress.registry import FAMILIES

    n = FAMILIES["gemma3"].build("tiny").config.mm_tokens_per_image
    results = evaluate(f"pretrained={gemma_dir},press=divprune:4", "mmpress_jsonl_template")
    figures, samples = results["throughput"], results["samples"]["mmpress_jsonl_template"]
    assert (figures["avg_visual_tokens"], figures["avg_visual_tokens_kept"]) == (n, 4)
    assert 0 <= results["results"]["mmpress_jsonl_template"]["accuracy,none"] <= 1
    assert [s["token_counts"][0]["visual_tokens_kept"] for s in samples] == [4] * 4


def instance(kind: str, args: tuple, doc_id: int):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def test_loglikelihood_is_the_continuation_loss(gemma_dir):
    """loglikelihood: the continuation's summed negative log likelihood after the prompt, as a
    plain forward computes it, the same in a ragged batch of 2 as alone; the result passes through
    lmms-eval's unwrapping as a (loss, greedy) pair, not its string."""
    from lmms_eval.api.instance import unwrap_generation_output
    from PIL import Image

    lm = MMPress(pretrained=str(gemma_dir), batch_size=2)
    images = [Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (30, 50), (20, 20, 200))]
    lm.task_dict = {"t": {"test": [{"i": 0}, {"i": 1}]}}
    requests = [instance("loglikelihood", (ctx, cont, lambda d: [images[d["i"]]], i, "t", "test"), i)
                for i, (ctx, cont) in enumerate([("w10 w11", " w12 w13"), ("w20 w21 w22 w23", " w30")])]
    batched = [unwrap_generation_output(r)[0] for r in lm.loglikelihood(requests)]
    lm.batch_size_per_gpu = 1
    alone = [unwrap_generation_output(r)[0] for r in lm.loglikelihood(requests)]
    for (loss, greedy), (loss1, greedy1) in zip(batched, alone):
        assert isinstance(loss, float) and isinstance(greedy, bool)
        assert loss == pytest.approx(loss1, rel=1e-4) and greedy == greedy1
    for request, (loss, _) in zip(requests, batched):  # by hand: prompt + continuation, one forward
        ctx, cont = request.args[:2]
        image = [images[request.args[3]]]
        full = lm._encode([lm.prompt(ctx, 1) + cont], [image])
        n = full["input_ids"].shape[1] - lm._encode([lm.prompt(ctx, 1)], [image])["input_ids"].shape[1]
        with torch.inference_mode():
            logp = torch.log_softmax(lm.model(**full).logits[0, -n - 1:-1].float(), dim=-1)
        assert loss == pytest.approx(-logp.gather(1, full["input_ids"][0, -n:, None]).sum().item(), rel=1e-4)


def test_multiple_choice_and_multi_round_tasks(gemma_dir, tmp_path):
    """Both other request types through lmms-eval's evaluator: a multiple-choice task (loglikelihood
    of each choice; accuracy in the results) and a 2-round task (generate_until_multi_round: the
    task's doc_to_text sees round 1's answer and ends after round 2)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = TASKS_DIR / "mmpress_jsonl_template" / "data.jsonl"
    common = f"""
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        doc_to_visual: !function hooks.doc_to_visual
        doc_to_target: answer
        metadata:
          version: 0.1
    """
    (folder / "mc.yaml").write_text(textwrap.dedent(common) + textwrap.dedent("""
        task: mmpress_test_mc
        output_type: multiple_choice
        doc_to_text: question
        doc_to_choice: ["yes", "no"]
        doc_to_target: 0
        metric_list:
          - metric: acc
    """))
    (folder / "rounds.yaml").write_text(textwrap.dedent(common) + textwrap.dedent("""
        task: mmpress_test_rounds
        output_type: generate_until_multi_round
        doc_to_text: !function hooks.doc_to_text
        generation_kwargs: {max_new_tokens: 3, until: ["<eos>"]}
        process_results: !function hooks.process_results
        metric_list:
          - metric: rounds
            aggregation: mean
            higher_is_better: true
    """))
    (folder / "hooks.py").write_text(textwrap.dedent(f"""
        from mmpress.eval.data import read_image

        def doc_to_visual(doc):
            return [read_image({str(data.parent)!r} + "/" + doc["image"])]

        def doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None,
                        previous_round_info=None):
            if round_idx is None:
                return doc["question"]
            assert len(previous_output) == round_idx
            if round_idx == 1:
                return None, "and then " + previous_output[0], False, previous_output, None
            return None, None, True, previous_output, None

        def process_results(doc, results):
            return {{"rounds": float(len(results[0]))}}
    """))
    mc = evaluate(f"pretrained={gemma_dir},press=divprune:4", "mmpress_test_mc", include=folder)
    assert 0 <= mc["results"]["mmpress_test_mc"]["acc,none"] <= 1
    for sample in mc["samples"]["mmpress_test_mc"]:
        assert all(isinstance(r[0], float) for r in sample["filtered_resps"])  # (loss, greedy), not a string
    assert mc["throughput"]["avg_visual_tokens_kept"] == 4
    rounds = evaluate(f"pretrained={gemma_dir},press=divprune:4", "mmpress_test_rounds", include=folder)
    assert rounds["results"]["mmpress_test_rounds"]["rounds,none"] == 2


# ---- arguments, tasks ----------------------------------------------------------------------------
def test_press_arguments():
    """Every way to name a press gives the same press; contradictions are ValueErrors naming the fix."""
    from mmpress import parse_press, save_press

    assert build_press("divprune", keep=64)[:2] == build_press("divprune:64")[:2] == (parse_press("divprune:64"),
                                                                                        "divprune:64")
    assert build_press("divprune", keep_ratio=0.25)[1] == "divprune:0.25"
    assert build_press("divprune", keep=64, layer=2)[1] == build_press("divprune:64@2")[1] == "divprune:64@2"
    assert build_press("visionzip:128+fastv:64@3", positions="keep")[1:] == ("visionzip:128+fastv:64@3", "keep")
    assert build_press(None) == build_press("none") == (None, "none", None)
    for bad in [dict(press="divprune:64", keep=32), dict(press=None, keep=64), dict(press="divprune", keep=64, keep_ratio=0.5),
                dict(press="divprune:64", positions="shift"), dict(press="nosuchpress:64")]:
        with pytest.raises(ValueError):
            build_press(**bad)


def test_press_file(tmp_path):
    """``press_file`` reads ``save_press``'s settings, positions included."""
    from mmpress import save_press

    path = save_press(tmp_path / "s.json", "divprune:48", positions="reindex")
    assert build_press(press_file=str(path))[1:] == ("divprune:48", "reindex")
    with pytest.raises(ValueError, match="contradicts"):
        build_press(press_file=str(path), positions="keep")
    with pytest.raises(ValueError, match="press_file"):
        build_press(press="divprune:64", press_file=str(path))


def test_tasks_found_without_include_path():
    """The plugin's entry point registers its task folder: a plain TaskManager (what ``--tasks``
    reads) lists the shipped tasks."""
    from lmms_eval.tasks import TaskManager

    tasks = TaskManager("WARNING").all_tasks
    assert {"mmpress_easyvqa", "mmpress_scenes", "mmpress_jsonl_template"} <= set(tasks)


@pytest.mark.parametrize("name,folder", [("easy-vqa", "mmpress_easyvqa"), ("scenes", "mmpress_scenes")])
def test_shipped_questions_are_mmpress_data(name, folder):
    """The shipped question files are ``mmpress.eval.data``'s questions, in its order, and each
    row's image is rebuilt as the loader gives it."""
    from mmpress.lmms.task_utils import doc_to_visual

    rows = [json.loads(line) for line in next((TASKS_DIR / folder).glob("*.jsonl")).read_text().splitlines()]
    data = load_dataset(name, limit=12)
    assert len(rows) == 600
    for row, d in zip(rows, data):
        assert (row["question"], row["answer"], row["kind"], row["image_id"]) == (d["question"], d["answer"], d["kind"],
                                                                                 d["image_id"])
        assert doc_to_visual(row)[0].tobytes() == d["image"].tobytes()
