"""``--model mmpress``: any model family mmpress adapts, evaluated by lmms-eval under a press.

    lmms-eval --model mmpress --model_args pretrained=PATH,press=divprune:64 --tasks mmpress_easyvqa
    lmms-eval --model mmpress --model_args pretrained=demo,press=divprune,keep=64,positions=keep ...
    lmms-eval --model mmpress --model_args pretrained=PATH,press=visionzip:128+fastv:64@3 ...
    lmms-eval --model mmpress --model_args pretrained=PATH,press_file=settings.json ...

``press`` is a spec string (:func:`mmpress.presses.spec.parse_press`); ``keep`` / ``keep_ratio``
/ ``layer`` complete a bare press name (``press=divprune,keep=64`` is ``divprune:64``); any other
argument a press has a field for (``theta=0.5``) goes to it. ``press_file`` reads a settings file
(``mmpress.save_press``, ``mmpress tune --out``), positions included. No press (or
``press=none``) evaluates the unpressed model, still counting its visual tokens.

What a run records (lmms-eval 0.7.3 has no hook for a model's own results, so the plugin uses the
two it has):

* each logged sample's ``token_counts`` (``--log_samples``) carries, besides lmms-eval's
  input/output token counts, ``press`` (the spec), ``visual_tokens`` and ``visual_tokens_kept``
  (per image of the sample, from the prefill of the sample's batch: exact at batch 1 and for
  every press whose budget is a fixed count; a batch of images of other sizes gets the batch's
  mean), ``flops_ratio`` and ``prefill_s`` (of that batch);
* the results file's ``throughput`` block, which lmms-eval fills from ``log_metrics`` of
  ``lmms_eval.models.model_utils.gen_metrics``, gets ``avg_visual_tokens_kept`` (mean per image
  over the run), ``avg_visual_tokens``, ``avg_flops_ratio`` (the run's pressed prefill FLOPs over
  its unpressed FLOPs) and ``avg_prefill_s`` (mean seconds of one batch's prefill). Under
  ``accelerate launch`` every rank's counts are gathered first, so the figures cover the whole run.

``loglikelihood`` returns lmms-eval's convention, a loss: the continuation's summed negative log
likelihood (its ``multiple_choice`` scoring takes the argmin, as its own HF models return a loss).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from PIL import Image

from mmpress.eval.cost import prefill_flops, stats_lengths
from mmpress.presses.base import Press
from mmpress.presses.spec import load_settings, parse_press, press_spec
from mmpress.registry import family_of

DEMO = "demo"
POSITIONS = (None, "keep", "reindex")
MAX_ROUNDS = 64  # a multi-round task whose doc_to_text never ends is an error, not a hang
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


@dataclass
class PressCounts(TokenCounts):
    """lmms-eval's per-request ``TokenCounts`` (it logs ``to_dict()`` with each sample) plus what
    the press did to the sample (module docstring)."""

    press: str = "none"
    visual_tokens: float | None = None
    visual_tokens_kept: float | None = None
    flops_ratio: float | None = None
    prefill_s: float | None = None

    def to_dict(self) -> dict:
        extra = dict(press=self.press, visual_tokens=self.visual_tokens, visual_tokens_kept=self.visual_tokens_kept,
                     flops_ratio=self.flops_ratio, prefill_s=self.prefill_s)
        return {**super().to_dict(), **{k: v for k, v in extra.items() if v is not None}}


@dataclass
class _Totals:
    """Sums over a call's batches (padding requests of a data-parallel run excluded)."""

    images: int = 0
    visual: int = 0
    kept: float = 0.0
    flops: float = 0.0
    base_flops: float = 0.0
    flops_known: bool = True
    prefill_s: list = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0


class _FirstLogits:
    """A logits processor noting when generate has the first token's logits (the prefill's end)."""

    def __init__(self):
        self.time: float | None = None

    def __call__(self, input_ids, scores):
        if self.time is None:
            if scores.is_cuda:
                torch.cuda.synchronize(scores.device)
            self.time = time.perf_counter()
        return scores


def build_press(press: str | None = None, keep: int | None = None, keep_ratio: float | None = None,
                layer: int | None = None, press_file: str | None = None, positions: str | None = None,
                **fields) -> tuple[Any, str, str | None]:
    """``(press or None, its spec, positions)`` from lmms-eval's model arguments (module docstring).
    Conflicting or misspelt arguments are a ValueError naming the form to write."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be 'keep' or 'reindex' (or left out for the press's own), got {positions!r}")
    if press_file is not None:
        if press is not None or keep is not None or keep_ratio is not None or layer is not None:
            raise ValueError("press_file holds the press: drop press/keep/keep_ratio/layer, or drop press_file")
        settings = load_settings(press_file)
        if positions is not None and settings.get("positions") not in (None, positions):
            raise ValueError(f"positions={positions} contradicts {press_file}'s positions={settings['positions']}; "
                             "drop one of them")
        pressor = parse_press(settings["press"], **settings.get("fields", {}), **fields)
        return pressor, press_spec(pressor), positions or settings.get("positions")
    if press is None or str(press).strip().lower() == "none":
        if keep is not None or keep_ratio is not None or layer is not None or fields:
            names = sorted([k for k, v in dict(keep=keep, keep_ratio=keep_ratio, layer=layer).items() if v is not None]
                           + list(fields))
            raise ValueError(f"{names} given without a press; add press=NAME (e.g. press=divprune,keep=64)")
        return None, "none", positions
    spec = str(press).strip()
    budget = [v for v in (keep, keep_ratio) if v is not None]
    if budget or layer is not None:
        if any(c in spec for c in ":+@"):
            raise ValueError(f"press={spec!r} already holds its budget/layer: drop keep/keep_ratio/layer, or write "
                             f"press=NAME,keep=K (e.g. press=divprune,keep=64)")
        if len(budget) > 1:
            raise ValueError("give keep (visual tokens per image) or keep_ratio (a fraction), not both")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be a whole number of visual tokens >= 1, got {keep!r}")
        if keep_ratio is not None and not (isinstance(keep_ratio, float) and 0 < keep_ratio < 1):
            raise ValueError(f"keep_ratio must be a fraction strictly between 0 and 1, got {keep_ratio!r}")
        spec += f":{budget[0]}" if budget else ""
        spec += f"@{int(layer)}" if layer is not None else ""
    pressor = parse_press(spec, **fields)
    return pressor, press_spec(pressor), positions


def load_model(pretrained: str, dtype: str = "float32", device_map: str | None = None, trust_remote_code: bool = False):
    """``(model, processor)``: the embedded demo model for ``"demo"``, else a saved model whose family
    mmpress adapts (a ValueError naming the supported classes otherwise, before its weights load)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if str(pretrained) == DEMO:
        from mmpress.demo import load_demo

        return load_demo(dtype=torch.float32 if dtype == "auto" else _DTYPES[dtype])
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    family_of(config)  # unsupported: a ValueError naming what is supported
    kwargs = dict(device_map=device_map) if device_map else {}
    model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                        **kwargs)
    processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    return model.eval(), processor


class MMPress(lmms):
    """lmms-eval's model class for mmpress (module docstring). Data parallel under ``accelerate
    launch``: the ``Accelerator`` made here gives each rank its device, rank and world size."""

    is_simple = True

    def __init__(self, pretrained: str = DEMO, press: str | None = None, keep: int | None = None,
                 keep_ratio: float | None = None, layer: int | None = None, positions: str | None = None,
                 press_file: str | None = None, batch_size: int | str = 1, max_batch_size: int | None = None,
                 device: str | None = None, dtype: str = "float32", device_map: str | None = None,
                 max_new_tokens: int = 32, trust_remote_code: bool = False, **fields) -> None:
        super().__init__()
        self.press, self.press_spec, self.positions = build_press(press, keep, keep_ratio, layer, press_file, positions,
                                                                  **fields)
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size must be a whole number >= 1 (no 'auto'), got {batch_size!r}") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.max_new_tokens = int(max_new_tokens)
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if self._world_size > 1 or device is None:
            self._device = self.accelerator.device  # one device per rank
        else:
            self._device = torch.device(device)
        model, self.processor = load_model(pretrained, dtype, device_map, trust_remote_code)
        if not device_map:
            model = model.to(self._device)
        self._model = model
        self.pretrained = pretrained
        family_of(model)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"  # every row ends where generation starts
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_token = getattr(self.processor, "image_token", None) or "<image>"
        self._typed_content = self._template_takes_typed_content()
        self.last_summary: dict = {}

    # ---- what lmms-eval reads -------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size

    # ---- prompts --------------------------------------------------------------------------------
    def _template_owner(self):
        return self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer

    def _template_takes_typed_content(self) -> bool:
        """Whether the chat template renders ``{"type": "image"}`` parts itself (Qwen's, Gemma's,
        LLaVA-hf's do, each writing its own placeholder); a text-only template such as the demo's
        SmolLM2 one does not, and gets ``processor.image_token`` written into the text, as
        ``mmpress.api.build_prompt`` writes it."""
        owner = self._template_owner()
        if not getattr(owner, "chat_template", None):
            return False
        try:
            typed, plain = (owner.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True)
                            for content in ([{"type": "image"}, {"type": "text", "text": "q"}], "q"))
        except Exception:  # a template that cannot iterate over parts
            return False
        return typed != plain and "'type'" not in typed and '"type"' not in typed

    def prompt(self, context: str, n_images: int, answer: str | None = None) -> str:
        """The chat prompt of one request: its images' placeholders (unless the task wrote them into
        ``context``), the context, the generation prompt; ``answer`` appended as the assistant's
        turn for loglikelihood."""
        owner = self._template_owner()
        if not getattr(owner, "chat_template", None):
            raise ValueError(f"{self.pretrained}'s processor has no chat template; save one with the model "
                             "(processor.chat_template) to evaluate it with lmms-eval")
        written = context.count(self.image_token)
        if written not in (0, n_images):
            raise ValueError(f"the prompt holds {written} {self.image_token} placeholders for {n_images} images")
        if written or not n_images:
            content = context
        elif self._typed_content:
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": context}]
        else:
            content = "".join(f"{self.image_token}\n" for _ in range(n_images)) + context
        text = owner.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
        return text if answer is None else text + answer

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise NotImplementedError(f"the mmpress lmms-eval model takes images (PIL); task {task!r} gives "
                                          f"{type(v).__name__} (videos and audio are not wired into this plugin yet)")
        return [v.convert("RGB") for v in visuals]

    def _encode(self, texts: list[str], images: list[list]) -> dict:
        # one list of images per row: what every family's processor accepts (Gemma 3's requires it)
        nested = [list(row) for row in images] if any(images) else None
        inputs = self.processor(text=texts, images=nested, return_tensors="pt", padding=True)
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if torch.is_floating_point(v) else v.to(self.device)) for k, v in inputs.items()}

    # ---- the press around one model call --------------------------------------------------------
    def _pressed(self):
        """The press's context; the unpressed model runs under the identity press, which leaves
        the forward bit-identical and still counts the visual tokens."""
        press = self.press if self.press is not None else Press(keep_ratio=1.0)
        return press(self.model, positions=self.positions)

    def _account(self, run, inputs: dict, rows: int, totals: _Totals, real: list[bool], prefill_s: float | None):
        """Per-sample counts of one batch (``real``: the rows that are not data-parallel padding),
        and their sums into ``totals``."""
        stats = run.stats.as_dict() if run.stats is not None else None
        if stats is None or not stats.get("items"):
            counts = dict(visual_tokens=0.0, visual_tokens_kept=0.0, flops_ratio=None)
        else:
            items = stats["items"]
            try:
                seq_len, cuts = stats_lengths(stats)
                flops = prefill_flops(self.model.config, inputs, seq_len, layer_seq_len=cuts).total
                base = prefill_flops(self.model.config, inputs, stats["seq_len"]).total
            except NotImplementedError:
                flops = base = None
            counts = dict(visual_tokens=stats["visual_tokens"] / items, visual_tokens_kept=stats["kept_visual_tokens"] / items,
                          flops_ratio=None if flops is None else flops / base)
            share = sum(real) / rows
            totals.images += round(items * share)
            totals.visual += stats["visual_tokens"] * share
            totals.kept += stats["kept_visual_tokens"] * share
            if flops is None:
                totals.flops_known = False
            else:
                totals.flops += flops * share
                totals.base_flops += base * share
        if prefill_s is not None and any(real):
            totals.prefill_s.append(prefill_s)
        return dict(press=self.press_spec, prefill_s=prefill_s, **counts)

    def _summarize(self, totals: _Totals, kind: str) -> dict:
        """The run's figures, over every rank; logged into the results' ``throughput`` block."""
        import torch.distributed as dist

        mine = [totals]
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            mine = [None] * self.world_size
            dist.all_gather_object(mine, totals)
        images = sum(t.images for t in mine)
        prefills = [s for t in mine for s in t.prefill_s]
        summary = dict(visual_tokens=sum(t.visual for t in mine) / images if images else 0.0,
                       visual_tokens_kept=sum(t.kept for t in mine) / images if images else 0.0,
                       prefill_s=sum(prefills) / len(prefills) if prefills else 0.0)
        if all(t.flops_known for t in mine) and sum(t.base_flops for t in mine):
            summary["flops_ratio"] = sum(t.flops for t in mine) / sum(t.base_flops for t in mine)
        self.last_summary = dict(press=self.press_spec, kind=kind, images=images, **summary)
        if self.rank == 0:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics

            seconds = sum(t.seconds for t in mine)
            new = sum(t.new_tokens for t in mine)
            log_metrics(total_elapsed_time=seconds, total_gen_tokens=new, avg_speed=new / seconds if seconds else 0.0,
                        additional_metrics=summary)
        return self.last_summary

    # ---- lmms-eval's request types --------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Greedy (or the task's sampling) generation, ``batch_size`` ragged rows at a time,
        left-padded, under the press; stops at the task's ``until`` strings."""
        totals = _Totals()
        out: dict[int, GenerationResult] = {}
        for indices in self._batches(requests, [json.dumps(r.args[1] or {}, sort_keys=True, default=str) for r in requests]):
            chunk = [(requests[i].args, i) for i in indices]
            args, indices = zip(*chunk)
            contexts, gen_kwargs = [a[0] for a in args], dict(args[0][1] or {})
            images = [self._visuals(a[2], a[4], a[5], a[3]) for a in args]
            texts = [self.prompt(c, len(im)) for c, im in zip(contexts, images)]
            answers, counts = self._generate(texts, images, gen_kwargs, totals,
                                             [not requests[i].metadata.get("__padding_only__") for i in indices])
            for i, answer, count in zip(indices, answers, counts):
                out[i] = GenerationResult(text=answer, token_counts=count)
        self._summarize(totals, "generate_until")
        return [out[i] for i in range(len(requests))]

    def _batches(self, requests: list[Instance], groups: list[str]):
        """Batches of ``batch_size`` request indices of one group each (one generation setting),
        longest context first (less padding; the answers do not depend on the batching)."""
        order = sorted(range(len(requests)), key=lambda i: (groups[i], -len(requests[i].args[0]), i))
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) == self.batch_size or groups[batch[0]] != groups[i]):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _generate(self, texts: list[str], images: list[list], gen_kwargs: dict, totals: _Totals, real: list[bool]):
        from transformers import LogitsProcessorList

        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.pop("do_sample", False)) or temperature > 0
        settings = dict(max_new_tokens=int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens)),
                        num_beams=int(gen_kwargs.pop("num_beams", 1) or 1), do_sample=do_sample,
                        pad_token_id=self.tokenizer.pad_token_id)
        if do_sample:
            settings.update(temperature=temperature, top_p=gen_kwargs.pop("top_p", None))
        inputs = self._encode(texts, images)
        stamp = _FirstLogits()
        with torch.inference_mode(), self._pressed() as run:
            start = time.perf_counter()
            output = self.model.generate(**inputs, **settings, logits_processor=LogitsProcessorList([stamp]))
            seconds = time.perf_counter() - start
        new = output[:, inputs["input_ids"].shape[1]:]
        answers = []
        for text in self.tokenizer.batch_decode(new, skip_special_tokens=True):
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            answers.append(text.strip() if until else text)
        pad = self.tokenizer.pad_token_id
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        produced = [int((row != pad).sum()) for row in new]
        totals.seconds += seconds
        totals.new_tokens += sum(n for n, keep in zip(produced, real) if keep)
        shared = self._account(run, inputs, len(texts), totals, real,
                               None if stamp.time is None else stamp.time - start)
        counts = [PressCounts(input_tokens=int(length), output_tokens=n, **self._per_row(shared, len(im)))
                  for length, n, im in zip(lengths, produced, images)]
        return answers, counts

    @staticmethod
    def _per_row(shared: dict, n_images: int) -> dict:
        return {**shared, "visual_tokens": shared["visual_tokens"] * n_images,
                "visual_tokens_kept": shared["visual_tokens_kept"] * n_images}

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """``(loss, greedy)`` per request: the continuation's summed negative log likelihood after
        the prompt (module docstring), and whether greedy decoding would produce it, ``batch_size``
        rows at a time under the press. Returned wrapped in ``GenerationResult``: lmms-eval 0.7.3
        turns a bare tuple into its string, and passes a wrapped one through with its counts."""
        totals = _Totals()
        out: dict[int, GenerationResult] = {}
        for indices in self._batches(requests, [""] * len(requests)):
            prompts, fulls, images = [], [], []
            for i in indices:
                args = requests[i].args
                context, target = args[0], args[1]
                # (context, continuation) alone: multiple choice's unconditional requests (acc_mutual_info)
                doc_to_visual, doc_id, task, split = args[2:6] if len(args) >= 6 else (None, None, None, None)
                continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                if isinstance(continuation, list):
                    continuation = continuation[0]
                visuals = self._visuals(doc_to_visual, task, split, doc_id) if context and doc_to_visual else []
                images.append(visuals)
                prompts.append(self.prompt(context, len(visuals)))
                fulls.append(prompts[-1] + str(continuation))
            real = [not requests[i].metadata.get("__padding_only__") for i in indices]
            for i, result in zip(indices, self._score(prompts, fulls, images, totals, real)):
                out[i] = result
        self._summarize(totals, "loglikelihood")
        return [out[i] for i in range(len(requests))]

    def _score(self, prompts, fulls, images, totals: _Totals, real: list[bool]) -> list[GenerationResult]:
        full = self._encode(fulls, images)
        prompt_lengths = [int(self._encode([p], [im])["attention_mask"].sum()) for p, im in zip(prompts, images)]
        lengths = full["attention_mask"].sum(dim=1).tolist()
        with torch.inference_mode(), self._pressed() as run:
            start = time.perf_counter()
            logits = self.model(**full).logits.float()
            seconds = time.perf_counter() - start
        totals.seconds += seconds
        shared = self._account(run, full, len(prompts), totals, real, seconds)
        ids = full["input_ids"]
        results = []
        for row, (length, prompt_length, im) in enumerate(zip(lengths, prompt_lengths, images)):
            n = int(length) - prompt_length
            if n < 1:
                raise ValueError(f"the continuation of request {row} adds no token to its prompt")
            # left padding (and a pre-LLM press's left-aligned compaction) keeps the text's last
            # tokens in the last columns: the continuation's are the last n, predicted one earlier
            target = ids[row, -n:]
            scores = torch.log_softmax(logits[row, -n - 1:-1], dim=-1)
            loss = -scores.gather(1, target[:, None]).sum().item()
            greedy = bool((scores.argmax(dim=-1) == target).all())
            count = PressCounts(input_tokens=int(length), output_tokens=0, **self._per_row(shared, len(im)))
            results.append(GenerationResult(text=(loss, greedy), token_counts=count))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[GenerationResult]:
        """lmms-eval's multi-round protocol (``output_type: generate_until_multi_round``): round 0
        answers the request's context; then the task's ``doc_to_text(doc, previous_output=...,
        round_idx=r, previous_round_info=...)`` gives ``(visuals, context, done, round_results,
        info)`` until ``done``. Each document's rounds run in order (batch 1, under the press); the
        result is the list of its answers, one a round."""
        totals = _Totals()
        results = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args[:7]
            doc = self.task_dict[task][split][doc_id]
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            real = [not request.metadata.get("__padding_only__")]
            answers, counts, info, round_idx = [], [], None, 0
            while True:
                if round_idx >= MAX_ROUNDS:
                    raise ValueError(f"task {task!r} asked for more than {MAX_ROUNDS} rounds of document {doc_id}; its "
                                     "doc_to_text never signalled the end")
                if round_idx:
                    visuals, context, done, _, info = doc_to_text(doc, previous_output=list(answers), round_idx=round_idx,
                                                                  previous_round_info=info)
                    if done:
                        break
                    visuals = [v.convert("RGB") for v in (visuals or []) if v is not None]
                answer, count = self._generate([self.prompt(context, len(visuals))], [visuals], dict(gen_kwargs or {}),
                                               totals, real)
                answers.append(answer[0])
                counts.append(count[0])
                round_idx += 1
            results.append(GenerationResult(text=answers, token_counts=counts[0] if counts else None))
        self._summarize(totals, "generate_until_multi_round")
        return results
