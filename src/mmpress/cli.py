"""Command line: ``mmpress list | run | bench | bench-cost | tune``.

A user's mistake (an unknown press, a bad budget, a missing file, a malformed dataset) is one red
line on stderr and exit code 2, found before any model loads; ``mmpress --debug ...`` shows the
traceback instead.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from mmpress.presses.base import PRESSES, get_press, list_presses, press_suggestion

try:  # recent typer ships its own click, whose errors derive from TyperException
    from typer import TyperException as UsageErrors
except ImportError:  # older typer: click's
    from click import ClickException as UsageErrors

console = Console()
err_console = Console(stderr=True)
DEMO = "demo"


class _Commands(TyperGroup):
    """Runs a command; a usage error, ValueError or OSError becomes one red line on stderr."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UsageErrors, ValueError, OSError) as e:
            if ctx.params.get("debug"):
                raise
            message = e.format_message() if isinstance(e, UsageErrors) else str(e)
            err_console.print("error: " + " ".join(message.split()), style="red", markup=False, highlight=False,
                              soft_wrap=True)
            raise typer.Exit(getattr(e, "exit_code", 2)) from None


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  help="Press the visual tokens of vision-language models.")


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="on an error, show the traceback, not one line")):
    pass


def _budget(keep: Optional[int], keep_ratio: Optional[float]) -> dict:
    # both, if both are given: the press refuses the pair rather than one being silently dropped
    return {name: value for name, value in (("keep", keep), ("keep_ratio", keep_ratio)) if value is not None}


def _press_names(text: str, param_hint: str = "--presses") -> list[str]:
    """``all`` (every press but the unpressed ``none``) or comma-separated registered names."""
    if text == "all":
        return [name for name in list_presses() if name != "none"]
    names = text.split(",")
    unknown = [name for name in names if name not in PRESSES]
    if unknown:
        raise typer.BadParameter(f"unknown press {unknown[0]!r}; {press_suggestion(unknown[0])} (or all)",
                                 param_hint=param_hint)
    return names


def _budgets(text: str, param_hint: str = "--keep") -> list[int]:
    """Comma-separated positive ints: ``128,64,32``; or percentages of each item's tokens,
    ``50%,25%`` (fractions 0.5, 0.25: audio clips differ in length)."""
    try:
        keeps = [float(k[:-1]) / 100 if k.endswith("%") else int(k) for k in text.split(",")]
    except ValueError:
        keeps = []
    if any(isinstance(k, float) and not 0 < k < 1 for k in keeps):
        raise typer.BadParameter(f"percentages must lie between 0% and 100% (exclusive), got {text!r}",
                                 param_hint=param_hint)
    if not keeps or min(keeps) <= 0:
        raise typer.BadParameter(f"expected comma-separated positive ints (visual tokens per image), e.g. 128,64,32; "
                                 f"got {text!r}", param_hint=param_hint)
    return keeps


def _check_model(model_id: str) -> None:
    """Fail before loading on a model that is neither the demo, a folder, nor a hub name (org/name)."""
    from huggingface_hub.utils import validate_repo_id

    if model_id == DEMO or Path(model_id).is_dir():
        return
    if Path(model_id).exists():
        raise typer.BadParameter(f"{model_id} is not a model folder", param_hint="--model")
    try:
        validate_repo_id(model_id)  # a hub name: transformers finds it in the cache (or downloads it)
    except ValueError:
        raise typer.BadParameter(f"no such model folder: {model_id}", param_hint="--model") from None


def _load(model_id: str):
    """The embedded demo model, or any local / cached transformers LLaVA model. Never runs code
    shipped in the model's folder (``trust_remote_code=False``): a model that needs it is refused
    with transformers' ValueError, one red line, not a question on the terminal."""
    if model_id == DEMO:
        from mmpress.demo import load_demo

        return load_demo()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=False).eval()
    return model, AutoProcessor.from_pretrained(model_id, trust_remote_code=False)


def _check_out(out: Path) -> None:
    """Fail before loading on an ``--out`` folder that cannot be made or written into."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise typer.BadParameter(f"cannot write to {out} ({e.strerror or e}); choose a writable folder",
                                 param_hint="--out") from None


@app.command("list")
def list_cmd():
    """Table of presses: name, stage, signals it needs, video-aware, model families it runs on;
    under it, per family, what its signals are (e.g. Qwen-VL's substitute for [CLS] attention)."""
    from mmpress.registry import FAMILIES

    table = Table(title="mmpress presses")
    wide = console.width >= 120  # the paper column only where it fits on one line
    for col in ("name", "stage", "needs", "video", "families", *(["paper"] if wide else [])):
        table.add_column(col, overflow="fold")
    for name in list_presses():
        cls = PRESSES[name]
        families = [f for f, adapter in FAMILIES.items() if adapter.runs(cls)]
        table.add_row(name, cls.stage, " ".join(cls.needs) or "-", "yes" if cls.video else "-",
                      " ".join(families) or "-", *([cls.paper or "-"] if wide else []))
    console.print(table)
    for name, adapter in FAMILIES.items():
        classes = ", ".join(adapter.classes)
        console.print(f"[bold]{name}[/bold] ({classes}){': ' + adapter.notes if adapter.notes else ''}",
                      highlight=False)


@app.command()
def run(
    question: str = typer.Argument(..., help="question about the image (or the audio clip)"),
    image: Optional[Path] = typer.Option(None, "--image", "-i", exists=True, dir_okay=False, help="image file"),
    audio: Optional[Path] = typer.Option(None, "--audio", "-a", dir_okay=False,
                                         help="WAV file (8-192 kHz, resampled to 16 kHz): ask the audio demo model"),
    model: str = typer.Option(DEMO, help="local path or cached hub id of a LLaVA model; 'demo' = embedded model"),
    press: str = typer.Option("none", help="press name (mmpress list)"),
    keep: Optional[int] = typer.Option(None, help="visual tokens kept per image"),
    keep_ratio: Optional[float] = typer.Option(None, help="fraction of visual tokens kept"),
    max_new_tokens: int = typer.Option(16, min=1),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Answer a question about an image with a pressed model; report tokens kept, prefill time, FLOPs saved."""
    from mmpress.api import ask, encode
    from mmpress.eval.data import read_image

    if not question.strip():
        raise typer.BadParameter("the question is empty", param_hint="QUESTION")
    if (image is None) == (audio is None):
        raise typer.BadParameter("give one input: --image or --audio, not both", param_hint="--image / --audio")
    if audio is not None:
        return _run_audio(question, audio, model, press, keep, keep_ratio, max_new_tokens, as_json)
    pressor = get_press(press, **_budget(keep, keep_ratio))
    picture = read_image(image, "--image")  # not an image, or a decompression bomb: one line
    _check_model(model)
    vlm, processor = _load(model)
    answer = ask(vlm, processor, [picture], [question], press=pressor, max_new_tokens=max_new_tokens)[0]
    _report_run(vlm, encode(vlm, processor, [picture], [question]), pressor, answer, press, "visual tokens", as_json)


def _report_run(vlm, inputs: dict, pressor, answer: str, press: str, tokens: str, as_json: bool,
                extra: dict | None = None) -> None:
    """Time the prefill of ``inputs`` unpressed and pressed, count its FLOPs both ways (each LM
    layer, and an in-vision press's tower, at its pressed length) and print the record: one JSON
    line (``extra`` after the token counts), or the answer and a line of ``tokens`` kept, time and
    FLOPs saved."""
    import torch

    from mmpress.eval.cost import prefill_flops, pressed_flops, time_call

    def prefill():
        with torch.inference_mode():
            vlm(**inputs, logits_to_keep=1)

    base_seconds = time_call(prefill, repeats=3)
    with pressor(vlm) as pressed:
        seconds = time_call(prefill, repeats=3)
    stats = pressed.stats.as_dict()
    flops = pressed_flops(vlm.config, inputs, stats).total
    base_flops = prefill_flops(vlm.config, inputs, stats["seq_len"]).total
    record = {"answer": answer, "press": press, "kept_tokens": stats["kept_visual_tokens"],
              "total_tokens": stats["visual_tokens"], **(extra or {}), "prefill_seconds": seconds,
              "unpressed_prefill_seconds": base_seconds, "flops_saved": 1 - flops / base_flops}
    if as_json:
        print(json.dumps(record))
        return
    console.print(f"[bold]{answer}[/bold]")
    console.print(f"kept {record['kept_tokens']}/{record['total_tokens']} {tokens} · prefill {seconds * 1e3:.0f} ms "
                  f"(unpressed {base_seconds * 1e3:.0f} ms) · FLOPs saved {record['flops_saved']:.0%}", highlight=False)


def _load_audio_model(model_id: str):
    """The embedded audio demo, or a local / cached Qwen2-Audio model (no code from its folder)."""
    if model_id == DEMO:
        from mmpress.demo.audio import load_demo_audio

        return load_demo_audio()
    from transformers import AutoConfig, AutoProcessor, Qwen2AudioForConditionalGeneration

    config = AutoConfig.from_pretrained(model_id, trust_remote_code=False)
    if config.model_type != "qwen2_audio":
        raise typer.BadParameter(f"{model_id} is a {config.model_type} model; --audio runs Qwen2-Audio models "
                                 "(or 'demo')", param_hint="--model")
    model = Qwen2AudioForConditionalGeneration.from_pretrained(model_id, trust_remote_code=False).eval()
    return model, AutoProcessor.from_pretrained(model_id, trust_remote_code=False)


def _run_audio(question: str, audio: Path, model: str, press: str, keep, keep_ratio, max_new_tokens: int,
               as_json: bool) -> None:
    """``mmpress run --audio``: the audio counterpart of ``run``, on a Qwen2-Audio model. The
    clip is read and checked (a WAV, samples, a usable rate, within the demo's window) before any
    model loads."""
    from mmpress.demo.audio import CHUNK_SECONDS, SAMPLE_RATE, ask_audio, encode_audio
    from mmpress.eval.spoken import read_audio

    pressor = get_press(press, **_budget(keep, keep_ratio))
    clip = read_audio(audio, "--audio", max_seconds=CHUNK_SECONDS if model == DEMO else None)
    _check_model(model)
    alm, processor = _load_audio_model(model)
    answer = ask_audio(alm, processor, [clip], [question], press=pressor, max_new_tokens=max_new_tokens)[0]
    seconds = len(clip) / SAMPLE_RATE
    _report_run(alm, encode_audio(alm, processor, [clip], [question]), pressor, answer, press,
                f"audio tokens ({seconds:.1f} s)", as_json, extra={"seconds_of_audio": seconds})


# The default grids finish in a few minutes on a 2-core CPU; --full runs the whole comparison.
# --data spoken (the audio demo's spoken questions): these presses, at these fractions of each clip
SPOKEN_PRESSES = ("random", "uniform", "divprune", "audio_merge", "silence", "fastadasp", "samp")
SPOKEN_KEEP = "50%,25%"
QUICK_PRESSES = "divprune,visionzip,vispruner,random"
BENCH_GRIDS = {  # option -> (default, with --full); an option given on the command line wins
    "presses": (QUICK_PRESSES, "all"),
    "keep": ("64,16", "128,64,32,16"),
    "data": ("easy-vqa", "scenes"),
    "limit": (24, 200),
    "timing_batch": (1, None),  # None: the first batch
    "out": (Path("benchmarks/results/bench-quick"), Path("benchmarks/results/bench")),
}
COST_GRIDS = {"presses": (QUICK_PRESSES, "all"), "keeps": ("128,64", "576,192,128,64")}


def grid(grids: dict[str, tuple], full: bool, **given) -> dict:
    """The settings of a run: each option's default from ``grids`` (the quick one, or the full one
    with ``full``), unless ``given`` (not None)."""
    return {name: given[name] if given.get(name) is not None else pair[full] for name, pair in grids.items()}


def _grid_help(grids: dict[str, tuple], name: str, text: str) -> str:
    quick, full = (str(value).replace(",", ", ") for value in grids[name])  # a long list wraps at ", "
    return f"{text} (default: {quick}; with --full: {'the first batch' if full == 'None' else full})"


@app.command()
def bench(
    model: str = typer.Option(DEMO, help="local path or cached hub id of a LLaVA model; 'demo' = embedded model"),
    full: bool = typer.Option(False, "--full", help="the whole grid: every press x 4 budgets x 200 scenes"),
    presses: Optional[str] = typer.Option(None, help=_grid_help(BENCH_GRIDS, "presses",
                                                                "comma-separated press names, or 'all'"),
                                          show_default=False),
    keep: Optional[str] = typer.Option(None, help=_grid_help(BENCH_GRIDS, "keep", "comma-separated budgets "
                                                             "(visual tokens per image)"), show_default=False),
    data: Optional[str] = typer.Option(None, help=_grid_help(BENCH_GRIDS, "data", "'scenes', 'easy-vqa', 'spoken' "
                                                             "(the audio demo, presses at 50%,25% of each clip), a .jsonl of "
                                                             "{image, question, answer}, or a saved datasets folder"),
                                       show_default=False),
    split: str = typer.Option("test"),
    limit: Optional[int] = typer.Option(None, min=1, help=_grid_help(BENCH_GRIDS, "limit", "number of samples "
                                                                     "(the first ones)"), show_default=False),
    batch_size: int = typer.Option(8, min=1),
    max_new_tokens: int = typer.Option(8, min=1),
    repeats: int = typer.Option(5, "--rounds", "--repeats", min=1, help="timing rounds, each timing the unpressed "
                                "model and every press once (round-robin): speedups are their median, with their "
                                "range; a wide range is flagged noisy"),
    timing_batch: Optional[int] = typer.Option(None, min=1, help=_grid_help(BENCH_GRIDS, "timing_batch",
                                                                            "samples in the timed prefill"),
                                               show_default=False),
    out: Optional[Path] = typer.Option(None, help=_grid_help(BENCH_GRIDS, "out", "folder for bench.json/.md/.png/"
                                                             ".html"), show_default=False),
    resume: bool = typer.Option(False, "--resume", help="keep the cells already in OUT/bench.json, run the rest"),
    config: Optional[Path] = typer.Option(None, "--config", help="a press settings file (mmpress tune --out): bench "
                                          "its press at its budget", show_default=False),
):
    """Quality vs cost of presses x budgets on a dataset: accuracy, fidelity, FLOPs, time, memory.

    Default: 4 presses x 2 budgets on 24 easy-vqa questions, about 3 minutes on 2 CPU cores.
    --full: every press x 4 budgets on 200 scenes.
    bench.json is rewritten as each cell finishes; on Ctrl-C the report covers the finished cells."""
    from mmpress.api import ANSWER_HINT
    from mmpress.eval.bench import Processes, ResumeError, fingerprint, resumable_rows, run_bench
    from mmpress.eval.data import load_dataset
    from mmpress.eval.report import print_table, save_json, write_report

    if config is not None:  # a tuned setting: its press and budget are the grid
        if presses is not None or keep is not None:
            raise typer.BadParameter("--config sets the press and budget: drop --presses and --keep", param_hint="--config")
        presses, keep = _config_cell(config)
    if data == "spoken":  # the audio demo model on spoken questions; budgets as fractions of each clip
        presses = presses or ",".join(name for name in SPOKEN_PRESSES if name in PRESSES)
        keep = keep or SPOKEN_KEEP
    settings = grid(BENCH_GRIDS, full, presses=presses, keep=keep, data=data, limit=limit, timing_batch=timing_batch,
                    out=out)
    names, keeps = _press_names(settings["presses"]), _budgets(settings["keep"])
    data, out = settings["data"], settings["out"]
    samples = load_dataset(data, split=split, limit=settings["limit"])  # an empty data set: ValueError
    _check_model(model)
    _check_out(out)
    record_path, previous = out / "bench.json", None
    if resume and record_path.is_file():
        try:
            previous = json.loads(record_path.read_text())
        except json.JSONDecodeError as e:
            raise typer.BadParameter(f"{record_path} is not JSON ({e}): delete it, or drop --resume") from None
    elif resume:
        console.print(f"[yellow]nothing to resume in {out}: starting afresh[/yellow]")
    options = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, timing_batch=settings["timing_batch"],
                   dataset=f"{data}:{split}", hint=ANSWER_HINT, seed=0)
    refusal = f"{record_path} cannot be resumed; run without --resume (it starts afresh), or use another --out"
    if previous is not None:  # all but the model's part of the fingerprint, before the model loads
        try:
            resumable_rows(previous, fingerprint(samples, **options))
        except ResumeError as e:
            raise ValueError(f"{e}. {refusal}") from None

    processes = Processes.current()  # under `accelerate launch`: this process answers its share of the questions
    vlm, processor = (_load_audio_model if data == "spoken" else _load)(model)
    if processes.world > 1:
        from accelerate import PartialState

        vlm = vlm.to(PartialState().device)
    finished = {}

    def checkpoint(record: dict) -> None:
        finished["record"] = record
        save_json(record, record_path)

    try:
        record = run_bench(vlm, processor, names, keeps, samples, console=console, repeats=repeats, model_id=model,
                           previous=previous, checkpoint=checkpoint, processes=processes, **options)
    except ResumeError as e:  # the model's part of the fingerprint
        raise ValueError(f"{e}. {refusal}") from None
    except KeyboardInterrupt:
        if "record" not in finished:
            err_console.print("interrupted before a cell finished: nothing new written", style="yellow")
            raise typer.Exit(130) from None
        record = finished["record"]
        pending = ", ".join(f"{c['press']} keep={c['keep'] or 'own'}" for c in record["pending"])
        record["notes"].append(f"interrupted before {pending}; `mmpress bench --resume` runs them")
        print_table(record, console)
        paths = write_report(record, out)
        err_console.print(f"interrupted: wrote the finished cells to {_where(paths)}; --resume runs the rest",
                          style="yellow", soft_wrap=True)
        raise typer.Exit(130) from None
    if not processes.main:  # the first process writes the one report of them all
        return
    paths = write_report(record, out)
    console.print(f"wrote the report: {_where(paths)}", soft_wrap=True, highlight=False)
    if not full and presses is None and keep is None:
        console.print("every press and budget: mmpress bench --full", style="dim", highlight=False)


def _where(paths: dict[str, Path]) -> str:
    """``folder/bench.html, .json, .md, .png``: the page to open first, on one copyable line."""
    others = ", ".join(path.suffix for kind, path in paths.items() if kind != "html")
    return f"{paths['html']}, {others}"


@app.command("bench-cost")
def bench_cost(
    full: bool = typer.Option(False, "--full", help="the whole grid: every press x 4 budgets"),
    presses: Optional[str] = typer.Option(None, help=_grid_help(COST_GRIDS, "presses",
                                                                "comma-separated press names, or 'all'"),
                                          show_default=False),
    keeps: Optional[str] = typer.Option(None, help=_grid_help(COST_GRIDS, "keeps", "comma-separated budgets "
                                                              "(visual tokens per image)"), show_default=False),
    arch: str = typer.Option("llava", help="model type of the random model (a transformers model_type: mmpress list "
                             "shows the families)"),
    input_kind: Optional[str] = typer.Option(None, "--input", help="image, video or audio, as the family takes them "
                                             "(default: its first: image; audio for qwen2_audio)", show_default=False),
    batch: int = typer.Option(1, min=1, help="batch size (rows get ragged prompt lengths)"),
    repeats: int = typer.Option(5, "--rounds", "--repeats", min=1, help="timing rounds, each timing every cell once "
                                "(round-robin): speedups are their median, with their range"),
    lm_layers: int = typer.Option(12), lm_hidden: int = typer.Option(896), lm_intermediate: int = typer.Option(4864),
    lm_heads: int = typer.Option(14),
    vision_layers: Optional[int] = typer.Option(None, min=1, help="default: the family's (llava 6, qwen 8)",
                                                show_default=False),
    vision_hidden: Optional[int] = typer.Option(None, min=1, help="default: the family's (llava 384, qwen 640)",
                                                show_default=False),
    image_size: Optional[int] = typer.Option(None, min=1, help="image (or video frame) side in pixels; default: the "
                                             "family's released size (llava 336, qwen image 896: 1024 tokens, video "
                                             "frames 448: 256 tokens a step)", show_default=False),
    frames: Optional[int] = typer.Option(None, min=1, help="video frames (default: the family's, 16)",
                                         show_default=False),
    decode_steps: Optional[int] = typer.Option(None, min=0, help="greedy decode steps timed after each prefill "
                                               "(KV cache, decode tokens/s); default: 8 when a KV press runs, else "
                                               "0 (none)", show_default=False),
    threads: Optional[int] = typer.Option(None, help="torch threads"),
    out: Optional[Path] = typer.Option(None, help="also write the JSON record here (rows, skipped, machine load)"),
):
    """Prefill time of presses on a random model of a family's shape: speedup vs its FLOPs limit.

    Default: a LLaVA-1.5 shape, 4 presses x 2 budgets, under a minute on 2 CPU cores.
    --arch qwen2_5_vl: a scaled Qwen2.5-VL, a 1024-token image (--input video: 16 frames x 256).
    --arch qwen2_audio: a 30-second clip (750 audio tokens) on a scaled Qwen2-Audio.
    The vision tower is timed alone too: a press acting after it cannot remove its time.
    In-LLM presses (keep@Lk) show the visual tokens averaged over the LM's layers.
    KV presses (keep@KV) add a table: KV cache and decode tokens/s, pressed vs unpressed.
    --full: every press x 4 budgets."""
    import torch
    from rich.progress import Progress

    from mmpress.eval.prefill import archs, run_prefill, shaped
    from mmpress.eval.report import decode_table, machine_text, prefill_table
    from mmpress.registry import ADAPTERS

    if arch not in archs():
        raise typer.BadParameter(f"unknown arch {arch!r}; choose from {', '.join(archs())}", param_hint="--arch")
    media = ADAPTERS[arch].bench_media
    input_kind = input_kind or next(iter(media))
    if input_kind not in media:
        raise typer.BadParameter(f"the {arch} shape takes {' or '.join(media)}, not {input_kind!r}",
                                 param_hint="--input")
    settings = grid(COST_GRIDS, full, presses=presses, keeps=keeps)
    # the unpressed model is always timed
    names = [name for name in _press_names(settings["presses"]) if name != "none"]
    budgets = _budgets(settings["keeps"], param_hint="--keeps")
    if decode_steps is None:
        decode_steps = 8 if any(PRESSES[name].stage == "kv" for name in names) else 0
    if decode_steps == 1:
        raise typer.BadParameter("time 0 or >= 2 decode steps (the first token comes from the prefill)",
                                 param_hint="--decode-steps")
    if threads:
        torch.set_num_threads(threads)
    sizes = dict(lm_layers=lm_layers, lm_hidden=lm_hidden, lm_intermediate=lm_intermediate, lm_heads=lm_heads,
                 lm_kv_heads=max(1, lm_heads // 7))
    sizes |= {k: v for k, v in (("vision_layers", vision_layers), ("vision_hidden", vision_hidden)) if v is not None}
    medium = list(media[input_kind])
    if input_kind == "audio" and (image_size or frames):
        raise typer.BadParameter("an audio clip has no image size or frames (30 s clips)", param_hint="--image-size")
    if image_size:
        medium[-2:] = image_size, image_size
        sizes["image_size"] = image_size  # families that resize to one resolution build their tower at it
    if frames and len(medium) == 3:
        medium[0] = frames
    try:
        model, inputs = shaped(arch, kind=input_kind, batch=batch, media=tuple(medium), **sizes)
    except ValueError as e:  # e.g. a side the family's patching does not divide
        raise typer.BadParameter(str(e), param_hint="--image-size") from None
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"timing rounds ({len(names)} presses)", total=repeats + 1)
        record = run_prefill(model, inputs, names, budgets, repeats=repeats, progress=lambda: progress.advance(task),
                             decode_steps=decode_steps)
    rows = record["rows"]
    what = f"{input_kind} tokens, {arch}"
    setting = f"batch {batch}, {rows[0]['keep']} {what}, {torch.get_num_threads()} threads"
    console.print(prefill_table(rows, title=f"prefill, {setting}"))
    console.print(_split_line(record), highlight=False, soft_wrap=True)
    if any(PRESSES[r["press"]].stage == "in_vision" for r in rows[1:]):  # the tower shrinks: its split per row
        console.print(_flops_table(rows, title=f"FLOPs split, {setting}"))
    if decode_steps:
        console.print(decode_table(rows, title=f"KV cache and decode ({decode_steps} steps), {setting}"))
    console.print(f"machine: {machine_text(record['machine'])}", style="dim", highlight=False)
    for name, reason in record["skipped"].items():
        console.print(f"skipped {name}: {reason}", style="yellow", highlight=False, soft_wrap=True)
    if out:
        out.write_text(json.dumps(record, indent=2))
    if not full and presses is None and keeps is None:
        console.print("every press and budget: mmpress bench-cost --full", style="dim", highlight=False)


def _split_line(record: dict) -> str:
    """The vision / language-model split of the unpressed prefill, and what it leaves a press
    acting after the tower."""
    base = record["rows"][0]["seconds"]
    vision, share = record["vision_seconds"], record["vision_share"]
    flops = record["rows"][0]["flops"]
    tower, projector = flops["vision"] / flops["total"], flops["projector"] / flops["total"]
    return (f"unpressed split: vision tower + projector {vision * 1e3:.1f} ms ({share:.0%}), language model "
            f"{(base - vision) * 1e3:.1f} ms ({1 - share:.0%}); FLOPs: tower {tower:.0%}, projector {projector:.0%}, "
            f"language model {1 - tower - projector:.0%}. A press after the tower is bounded by "
            f"{1 / max(share, 1e-9):.2f}x; an in_vision press shrinks the tower too.")


def _flops_table(rows: list[dict], title: str):
    """Each row's prefill FLOPs split between vision tower, projector and language model (an
    in-vision press's tower at its pressed lengths), and the tower's own FLOPs limit."""
    from rich.table import Table

    from mmpress.eval.report import keep_text

    table = Table(title=title, caption="GFLOPs of the prefill (all rows): in_vision presses count the tower block by "
                  "block at the tokens each block took; tower limit: unpressed / pressed tower FLOPs.",
                  caption_justify="left", pad_edge=False)
    for header in ("press", "keep", "tower\nGFLOPs", "projector\nGFLOPs", "LM\nGFLOPs", "tower\nlimit",
                   "FLOPs\nlimit"):
        table.add_column(header, justify="left" if header == "press" else "right", overflow="fold")
    for r in rows:
        f = r["flops"]
        table.add_row(r["press"], keep_text(r), *(f"{f[k] / 1e9:.3g}" for k in ("vision", "projector", "language")),
                      "-" if r["vision_limit"] is None else f"{r['vision_limit']:.2f}x",
                      f"{r['limit']:.2f}x")
    return table


# ---- tune: the smallest budget that keeps the answers ---------------------------------------------
def _targets(agreement: Optional[float], accuracy: Optional[float]) -> tuple[str, float]:
    """(metric, target) from ``--target-agreement`` / ``--target-accuracy``: one of them (the
    agreement 0.95 when neither), a fraction in (0, 1]."""
    if agreement is not None and accuracy is not None:
        raise typer.BadParameter("give --target-agreement or --target-accuracy, not both", param_hint="--target-*")
    metric, value, hint = (("accuracy", accuracy, "--target-accuracy") if accuracy is not None
                           else ("agreement", 0.95 if agreement is None else agreement, "--target-agreement"))
    if not 0 < value <= 1:
        raise typer.BadParameter(f"the target is a fraction in (0, 1], e.g. 0.95; got {value}", param_hint=hint)
    return metric, value


def _layers(text: Optional[str]) -> list[int] | None:
    """``--layer 2`` or ``--layer 2,4``: decoder layers (ints >= 1), each searched apart."""
    if text is None:
        return None
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        layers = []
    if not layers or min(layers) < 1 or len(set(layers)) != len(layers):
        raise typer.BadParameter(f"expected distinct comma-separated decoder layers >= 1, e.g. 2 or 2,4; got {text!r}",
                                 param_hint="--layer")
    return layers


def _tune_table(record: dict) -> Table:
    """One row per layer searched (one for a pre-LLM press), in 80 columns; the caption says the
    test, which row was chosen, and any bracket an interruption left open."""
    metric, test, chosen = record["target"]["metric"], record["test"], record["chosen"] or {}
    notes = [f"{test['level']:.0%} one-sided bootstrap lower bound, {test['resamples']} resamples, "
             f"{record['n']} questions"]
    if len(record["results"]) > 1:
        notes.append(f"chosen: {chosen.get('press')} (fewest prefill FLOPs)")
    notes += [f"{row['press']}: interrupted, bracket ({row['bracket'][0]}, {row['bracket'][1]}] open"
              for row in record["results"] if not row["done"]]
    table = Table(title=f"smallest budget with {metric} lower bound >= {record['target']['value']}"
                        + (" (partial)" if record["partial"] else ""), caption="; ".join(notes))
    for col in ("setting", "keep", metric, "interval", "FLOPs", "probes"):
        table.add_column(col, overflow="fold")
    for row in record["results"]:
        low, high = row["interval"]
        table.add_row(row["press"], f"{row['keep']}/{record['visual_tokens']}", f"{row['value']:.3f}",
                      f"[{low:.3f}, {high:.3f}]", "-" if row["flops_ratio"] is None else f"{row['flops_ratio']:.2f}",
                      str(row["probes"]), style="bold" if row["press"] == chosen.get("press") else None)
    return table


def _model_args(model: str, spec: str, positions: Optional[str]) -> str:
    return f"pretrained={model},press={spec}" + (f",positions={positions}" if positions else "")


def _config_cell(config: Path) -> tuple[str, str]:
    """``bench --config``: the (press name, budget) of a settings file naming one press at its own
    layer (a bench cell); anything else is refused, naming where it runs."""
    from mmpress.presses.base import LayerPress
    from mmpress.presses.spec import load_settings, parse_press

    settings = load_settings(config)
    press = parse_press(settings["press"])
    default_layer = not isinstance(press, LayerPress) or getattr(press, "layer", None) == getattr(type(press),
                                                                                                   "layer", None)
    if (getattr(press, "name", None) not in PRESSES or press.keep is None or not default_layer
            or settings.get("positions") is not None):
        raise typer.BadParameter(f"bench runs one press at a token budget at its own layer; {config} holds "
                                 f"{settings['press']!r}" + (f" with positions={settings['positions']}"
                                                             if settings.get("positions") else "")
                                 + ": run it with mmpress.load_press or lmms-eval's press_file", param_hint="--config")
    return press.name, str(press.keep)


@app.command()
def tune(
    press: str = typer.Option(..., help="press name (mmpress list) whose budget is searched"),
    target_agreement: Optional[float] = typer.Option(None, help="answers agreeing with the unpressed model's: a "
                                                     "fraction in (0, 1] (default 0.95 when no target is given)",
                                                     show_default=False),
    target_accuracy: Optional[float] = typer.Option(None, help="instead: accuracy against the data's labels (exact "
                                                    "match), a fraction in (0, 1]", show_default=False),
    model: str = typer.Option(DEMO, help="local path or cached hub id of a model; 'demo' = embedded model"),
    data: str = typer.Option("easy-vqa", help="calibration set: 'scenes', 'easy-vqa', a .jsonl of {image, question, "
                             "answer}, or a saved datasets folder"),
    split: str = typer.Option("test"),
    limit: int = typer.Option(32, min=1, help="calibration questions (the first ones)"),
    layer: Optional[str] = typer.Option(None, help="in-LLM presses: decoder layer(s) to press at, comma-separated, "
                                        "each searched (default: the press's own)", show_default=False),
    tolerance: int = typer.Option(1, min=1, help="stop when the bracket is this many tokens wide (1: the exact "
                                  "smallest budget)"),
    positions: Optional[str] = typer.Option(None, help="position ids of kept tokens: keep or reindex (default: the "
                                            "adapter's)", show_default=False),
    batch_size: int = typer.Option(8, min=1),
    max_new_tokens: int = typer.Option(8, min=1),
    resamples: int = typer.Option(1000, min=1, help="bootstrap resamples of the questions"),
    level: float = typer.Option(0.95, help="confidence of the one-sided lower bound, in (0.5, 1)"),
    seed: int = typer.Option(0, help="seeds the bootstrap and stochastic presses"),
    out: Path = typer.Option(Path("tuned.json"), help="settings file to write (mmpress.load_press, bench --config, "
                             "lmms-eval press_file)"),
):
    """The smallest budget (visual tokens per image) whose answers stay at the target.

    A budget passes when the one-sided bootstrap lower bound of its agreement with the unpressed
    model (or accuracy, --target-accuracy) on the calibration set is at or above the target. The
    search bisects budgets 1..N and stops when the bracket is --tolerance wide; a budget stops
    being answered as soon as it cannot pass. Ctrl-C writes what was measured, marked partial."""
    from mmpress.eval.data import load_dataset
    from mmpress.eval.metrics import is_labelled
    from mmpress.eval.tune import Tuning, check_press, tune as run_tune
    from mmpress.presses.spec import save_press

    metric, target = _targets(target_agreement, target_accuracy)
    layers = _layers(layer)
    if press not in PRESSES:
        raise typer.BadParameter(f"unknown press {press!r}; {press_suggestion(press)}", param_hint="--press")
    check_press(press, layers)  # no budget, or refuses the layer: one line
    if positions not in (None, "keep", "reindex"):
        raise typer.BadParameter(f"positions is keep or reindex, got {positions!r}", param_hint="--positions")
    if not 0.5 < level < 1:
        raise typer.BadParameter(f"a one-sided confidence level in (0.5, 1), e.g. 0.95; got {level}",
                                 param_hint="--level")
    samples = load_dataset(data, split=split, limit=limit)
    if metric == "accuracy" and not any(is_labelled(s) for s in samples):
        raise typer.BadParameter(f"{data} has no labels (answers) to score accuracy against; use --target-agreement",
                                 param_hint="--target-accuracy")
    _check_model(model)
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a folder; name a file, e.g. {out / 'tuned.json'}", param_hint="--out")
    _check_out(out.parent)

    vlm, processor = _load(model)
    state = Tuning(press, metric, target, layers or [None])

    def write(tuning: Tuning) -> dict:  # after every probe too: a killed run leaves what it measured
        record = tuning.as_record()
        if record["chosen"] is not None:
            save_press(out, record["chosen"]["press"], positions=positions, partial=record["partial"], tune=record)
        return record

    try:
        run_tune(vlm, processor, press, samples, target, metric=metric, layers=layers, tolerance=tolerance,
                 batch_size=batch_size, max_new_tokens=max_new_tokens, positions=positions, resamples=resamples,
                 level=level, seed=seed, console=console, state=state, on_update=write)
    except KeyboardInterrupt:
        if not state.searches:
            err_console.print("interrupted before the unpressed answers finished: nothing written", style="yellow")
            raise typer.Exit(130) from None
    record = write(state)
    chosen = record["chosen"]
    console.print(_tune_table(record))
    low, high = chosen["interval"]
    console.print(f"budget {'so far' if record['partial'] else 'found'}: {chosen['press']} ({chosen['keep']} of "
                  f"{record['visual_tokens']} visual tokens per image); {metric} {chosen['value']:.3f}, interval "
                  f"[{low:.3f}, {high:.3f}] (low end: the {level:.0%} one-sided lower bound, {resamples} resamples), "
                  f"{record['n']} questions, {record['seconds']:.0f} s",
                  highlight=False, soft_wrap=True)
    console.print(f"wrote {out}: mmpress.load_press({str(out)!r}) · mmpress bench --config {out} · lmms-eval "
                  f"--model mmpress --model_args {_model_args(model, chosen['press'], positions)} (or press_file={out})",
                  highlight=False, soft_wrap=True, markup=False)
    if record["partial"]:
        err_console.print(f"interrupted: {out} holds the best budget measured so far, marked partial",
                          style="yellow", soft_wrap=True)
        raise typer.Exit(130)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # `python -m mmpress.cli`, as `accelerate launch -m mmpress.cli bench` runs it
    main()
