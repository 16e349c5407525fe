"""M3ID evaluation harness: CHAIR_i / CHAIR_s, caption length and tokens/s, plain greedy vs M3ID.

Given a VLM folder and a COCO-style captions + instances JSON with an image folder, it
captions every image with plain greedy decoding and with M3ID and prints one JSON line per
figure. CHAIR (Rohrbach et al. 2018): an object word in a caption is hallucinated when its
COCO category is neither annotated in instances nor mentioned in the reference captions;
CHAIR_i = hallucinated / mentioned objects (unique per caption), CHAIR_s = captions with at
least one hallucinated object / captions.

``--quick`` (no paths needed) builds the tiny random LLaVA and a tiny COCO-style set: the
pipeline then runs end to end, but the CHAIR figures of a random model are meaningless;
only the timing ratio says something (about per-token overhead, not quality).

    python benchmarks/m3id.py --quick
    python benchmarks/m3id.py --vlm models/vlm/llava-1.5-7b-hf \\
        --captions captions_val2014.json --instances instances_val2014.json --images val2014/ \\
        --max-images 500 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from compartments.samplers.m3id import CaptionResult, M3IDSettings
from compartments.vlm.caption import caption_images
from compartments.vlm.models import load_vlm

# the usual CHAIR synonyms for COCO categories (subset of the original list; extend freely)
SYNONYMS: dict[str, list[str]] = {
    "person": ["person", "people", "man", "men", "woman", "women", "boy", "girl", "child", "children", "kid",
               "kids", "player", "guy", "lady", "baby", "skier", "surfer", "rider"],
    "bicycle": ["bicycle", "bike", "bikes"], "motorcycle": ["motorcycle", "motorbike", "motor bike"],
    "airplane": ["airplane", "plane", "jet", "aircraft", "airliner"], "tv": ["tv", "television"],
    "couch": ["couch", "sofa"], "cell phone": ["cell phone", "phone", "cellphone", "smartphone"],
    "dining table": ["dining table", "table"], "potted plant": ["potted plant", "plant", "houseplant"],
    "hot dog": ["hot dog", "hotdog"], "donut": ["donut", "doughnut"], "laptop": ["laptop", "computer"],
    "car": ["car", "cars", "automobile"], "cup": ["cup", "mug"], "sports ball": ["ball", "sports ball"],
    "teddy bear": ["teddy bear", "teddy"], "traffic light": ["traffic light", "stoplight"],
    "fire hydrant": ["fire hydrant", "hydrant"], "stop sign": ["stop sign"], "parking meter": ["parking meter"],
    "wine glass": ["wine glass"], "baseball bat": ["baseball bat"], "baseball glove": ["baseball glove", "mitt"],
    "tennis racket": ["tennis racket", "racket"], "hair drier": ["hair drier", "hair dryer"],
}
QUICK_NOTE = "tiny random model and synthetic set: CHAIR/length figures are meaningless; timing ratio only"


def _singular(word: str) -> str:
    for suf, rep in (("ies", "y"), ("ves", "f"), ("es", ""), ("s", "")):
        if word.endswith(suf) and len(word) > len(suf) + 2:
            return word[: -len(suf)] + rep
    return word


def object_vocab(categories: list[dict]) -> dict[str, str]:
    """Surface form (1-2 words, singular) -> COCO category name."""
    vocab: dict[str, str] = {}
    for cat in categories:
        name = cat["name"]
        for form in [name, *SYNONYMS.get(name, [])]:
            vocab[" ".join(_singular(w) for w in form.lower().split())] = name
    return vocab


def mentioned(text: str, vocab: dict[str, str]) -> set[str]:
    """COCO categories named in ``text`` (two-word forms first, so 'hot dog' is not a dog)."""
    words = [_singular(w) for w in re.findall(r"[a-z]+", text.lower())]
    found, i = set(), 0
    while i < len(words):
        pair = " ".join(words[i:i + 2])
        if i + 1 < len(words) and pair in vocab:
            found.add(vocab[pair])
            i += 2
            continue
        if words[i] in vocab:
            found.add(vocab[words[i]])
        i += 1
    return found


def chair(captions: dict[int, str], truth: dict[int, set[str]], vocab: dict[str, str]) -> dict[str, float]:
    """CHAIR_i, CHAIR_s and the object counts behind them."""
    mentions = halluc = bad_caps = 0
    for image_id, text in captions.items():
        objs = mentioned(text, vocab)
        wrong = objs - truth.get(image_id, set())
        mentions += len(objs)
        halluc += len(wrong)
        bad_caps += bool(wrong)
    n = max(len(captions), 1)
    return {"chair_i": halluc / mentions if mentions else 0.0, "chair_s": bad_caps / n,
            "objects_mentioned": mentions, "objects_hallucinated": halluc}


def load_coco(captions_path: Path, instances_path: Path, max_images: int) -> tuple[list[dict], dict, dict]:
    inst = json.loads(Path(instances_path).read_text())
    caps = json.loads(Path(captions_path).read_text())
    vocab = object_vocab(inst["categories"])
    names = {c["id"]: c["name"] for c in inst["categories"]}
    truth: dict[int, set[str]] = {}
    for ann in inst["annotations"]:
        truth.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
    for ann in caps.get("annotations", []):  # objects the reference captions name count as present too
        truth.setdefault(ann["image_id"], set()).update(mentioned(ann["caption"], vocab))
    images = sorted(inst["images"], key=lambda im: im["id"])[:max_images]
    return images, truth, vocab


def run_method(vlm, pil_images: list, prompt: str, settings: M3IDSettings, chunk: int,
               repeats: int, fused: bool) -> tuple[list[CaptionResult], float]:
    """Best-of-``repeats`` wall time (after a warm-up); ``fused`` is ignored where the family cannot fuse."""
    caption_images(vlm, pil_images[:1], prompt, settings, chunk_size=1, fused=fused)  # warm-up
    best = float("inf")
    results: list[CaptionResult] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = caption_images(vlm, pil_images, prompt, settings, chunk_size=chunk, fused=fused)
        best = min(best, time.perf_counter() - t0)
    return results, best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vlm", help="VLM folder (transformers save_pretrained, safetensors)")
    p.add_argument("--captions", help="COCO captions JSON")
    p.add_argument("--instances", help="COCO instances JSON")
    p.add_argument("--images", help="image folder")
    p.add_argument("--quick", action="store_true", help="tiny random VLMs + tiny synthetic set")
    p.add_argument("--quick-model", nargs="+", default=["llava"], metavar="FAMILY",
                   help="with --quick, one or more tiny models: any tested family (32-wide, overhead-bound), "
                        "qwen2_5_vl_small (128-wide) or llava_small (256-wide, compute-bound)")
    p.add_argument("--max-images", type=int, default=500)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default="Describe this image in detail.")
    p.add_argument("--lambda", dest="lam", type=float, default=0.02)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--weight-cap", type=float, default=10.0)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--repeats", type=int, help="best of this many timed runs (default 1; 3 with --quick)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = p.parse_args(argv)

    note, root = None, None
    if args.quick:
        from compartments.tiny import m3id as tiny

        root = Path(tempfile.mkdtemp(prefix="m3id-bench-"))
        cap_path, inst_path, img_dir = tiny.coco_set(root, n=6)
        folders = [tiny.vlm(name) for name in args.quick_model]
        args.max_tokens = min(args.max_tokens, 32)
        args.repeats = args.repeats or 3
        note = QUICK_NOTE
    else:
        if not all([args.vlm, args.captions, args.instances, args.images]):
            p.error("give --vlm, --captions, --instances and --images (or --quick)")
        folders, cap_path, inst_path, img_dir = [Path(args.vlm)], args.captions, args.instances, Path(args.images)
        args.repeats = args.repeats or 1
    failed = 0
    try:
        for folder in folders:
            failed += bench(args, Path(folder), Path(cap_path), Path(inst_path), Path(img_dir), note)
    finally:
        if root is not None:  # the generated COCO-style set
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


def bench(args: argparse.Namespace, folder: Path, cap_path: Path, inst_path: Path, img_dir: Path,
          note: str | None) -> int:
    """Every figure for one model folder (one JSON line each); returns the number of failed captions."""
    from PIL import Image

    images, truth, vocab = load_coco(cap_path, inst_path, args.max_images)
    pil = [Image.open(img_dir / im["file_name"]).convert("RGB") for im in images]
    vlm = load_vlm(folder, dtype=getattr(torch, args.dtype), device=args.device)
    params = sum(p.numel() for p in vlm.model.parameters())
    common = dict(max_new_tokens=args.max_tokens, greedy=True)
    m3id = M3IDSettings(lam=args.lam, alpha=args.alpha, weight_cap=args.weight_cap, pdm=False, **common)
    methods = {  # name -> (settings, both branches in one batch)
        "greedy": (M3IDSettings(lam=0.0, contrast=False, pdm=False, **common), True),
        "m3id": (m3id, True),
        "m3id_separate_branch": (m3id, False),
    }
    base = {"benchmark": "m3id", "model": folder.name, "family": vlm.family, "parameters": params,
            "images": len(pil), "device": args.device,
            "dtype": args.dtype, "max_tokens": args.max_tokens, "lambda": args.lam, "alpha": args.alpha}
    if note:
        base["note"] = note
    per_token: dict[str, float] = {}
    failed = 0

    def emit(method: str, figure: str, value: float, unit: str, **extra) -> None:
        print(json.dumps({**base, "method": method, "figure": figure, "value": value, "unit": unit, **extra}))

    for name, (settings, fused) in methods.items():
        results, seconds = run_method(vlm, pil, args.prompt, settings, args.chunk, args.repeats, fused)
        caps = {im["id"]: r.text for im, r in zip(images, results, strict=True)}
        scores = chair(caps, truth, vocab)
        tokens = sum(len(r.token_ids) for r in results)
        per_token[name] = seconds / max(tokens, 1)
        emit(name, "chair_i", round(scores["chair_i"], 4), "ratio", objects=scores["objects_mentioned"])
        emit(name, "chair_s", round(scores["chair_s"], 4), "ratio")
        emit(name, "caption_length", round(tokens / max(len(results), 1), 2), "tokens")
        emit(name, "caption_words", round(sum(len(r.text.split()) for r in results) / max(len(results), 1), 2),
             "words")
        emit(name, "tokens_per_second", round(tokens / seconds, 2), "tokens/s", tokens=tokens,
             seconds=round(seconds, 3))
        errors = [r.error for r in results if r.error is not None]
        emit(name, "errors", len(errors), "captions")
        if errors:  # a ratio over failed captions means nothing: say why, loudly
            print(f"{folder.name} {name}: {len(errors)} captions failed, e.g. {errors[0]}", file=sys.stderr)
            failed += len(errors)
    target = 1.3 if str(args.device).startswith("cuda") else 2.1
    for name in ("m3id", "m3id_separate_branch"):
        ratio = per_token[name] / per_token["greedy"]
        emit(name, "time_per_token_vs_greedy", round(ratio, 3), "x", target=target, meets_target=ratio <= target)
    return failed


if __name__ == "__main__":
    sys.exit(main())
