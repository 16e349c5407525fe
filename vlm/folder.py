"""Caption a whole folder of images (a LoRA / fine-tune dataset) with M3ID or plain decoding.

Each image gets ``name.txt`` beside it (or in a mirrored output folder), written atomically as
soon as its chunk is decoded, and one line in ``captions.jsonl`` (caption, PDM summary, settings,
model). An interrupted run resumes where it stopped: images that already have a caption are
skipped unless ``overwrite`` is set. Bad images are listed in the report and the JSONL, never
fatal; a folder with nothing captionable is refused before anything is written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..errors import CompartmentsError
from ..samplers.m3id import CaptionResult, M3IDSettings
from .caption import caption_images

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
JSONL_NAME = "captions.jsonl"
# Processors resize to a few hundred pixels at most; a 12000 px photo is decoded at this size
# (JPEG draft mode) so one chunk of images costs a bounded amount of memory.
DECODE_SIDE = 2048
FolderProgress = Callable[[int, int, int, int], None] | None  # (images done, images, tokens done, tokens)


class FolderError(CompartmentsError):
    """The folder job cannot run; ``field`` names the input (folder, output, prompt...)."""


@dataclass
class FolderReport:
    """What a run did: counts, the bad images with the reason, and where the records went."""

    captioned: list[str] = field(default_factory=list)
    captioned_txt: list[str] = field(default_factory=list)  # the caption files written, in the same order
    skipped: list[str] = field(default_factory=list)  # had a caption already
    failed: dict[str, str] = field(default_factory=dict)  # image -> why (unreadable, caption error)
    jsonl: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(n_captioned=len(self.captioned), n_skipped=len(self.skipped), n_failed=len(self.failed))
        return d


def find_images(folder: Path, recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """Image files of ``folder`` (sorted; hidden files and folders skipped; ``exclude`` not entered)."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (exclude is None or Path(root, d).resolve() != exclude)) if recursive else []
        found += [Path(root, f) for f in sorted(files)
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return found


def caption_path(image: Path, folder: Path, output: Path | None) -> Path:
    """``name.txt`` beside the image, or at the same relative place under ``output``."""
    if output is None:
        return image.with_suffix(".txt")
    return (output / image.relative_to(folder)).with_suffix(".txt")


def check_folders(folder: Path, output: Path | None) -> tuple[Path, Path | None]:
    """Resolved (folder, output); refuses a missing folder and an output inside the input."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FolderError(f"'{folder}' is not a folder.", "give the folder that holds the images.", "folder")
    if output is None:
        return folder, None
    output = Path(output).resolve()
    if output == folder or folder in output.parents:
        raise FolderError(f"the output folder '{output}' is inside the input folder '{folder}': its captions "
                          "would be scanned as part of the dataset on the next run.",
                          "choose an output folder outside the input, or leave it empty to write beside "
                          "each image.", "output")
    return folder, output


def load_image(path: Path) -> Any:
    """The image as RGB PIL, decoded at most :data:`DECODE_SIDE` on a side; raises on bad files."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.draft("RGB", (DECODE_SIDE, DECODE_SIDE))
        img.load()
        out = ImageOps.exif_transpose(img).convert("RGB")
    if max(out.size) > DECODE_SIDE:
        out.thumbnail((DECODE_SIDE, DECODE_SIDE), Image.Resampling.BICUBIC)
    return out


def pdm_summary(result: CaptionResult) -> dict:
    """Mean / min PDM, the mean over the caption's last quarter (where drift shows), gate share."""
    p = result.pdm
    if not p:
        return {"tokens": len(result.token_ids)}
    tail = p[-max(1, len(p) // 4):]
    return {"tokens": len(result.token_ids), "mean": round(sum(p) / len(p), 6), "min": round(min(p), 6),
            "last_quarter_mean": round(sum(tail) / len(tail), 6),
            "gate_open": round(sum(result.gated) / len(result.gated), 4) if result.gated else None}


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def caption_folder(vlm: Any, folder: Path, prompt: str, settings: M3IDSettings, *, output: Path | None = None,
                   recursive: bool = False, overwrite: bool = False, prefix: str = "", chunk_size: int = 4,
                   progress: FolderProgress = None, fatal: tuple[type[BaseException], ...] = (),
                   model_name: str = "") -> FolderReport:
    """Caption every image of ``folder``; see the module doc for what is written where."""
    start = time.monotonic()
    folder, output = check_folders(folder, output)
    if not prompt or not prompt.strip():
        raise FolderError("the prompt is empty.", "write what the caption should answer, e.g. 'Describe this "
                          "image in detail.'", "prompt")
    images = find_images(folder, recursive, exclude=output)
    if not images:
        where = "or its subfolders " if recursive else ""
        raise FolderError(f"'{folder}' {where}has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).",
                          "point it at the dataset folder" + ("" if recursive else ", or turn recursive on")
                          + ".", "folder")
    report = FolderReport(jsonl=str((output or folder) / JSONL_NAME))
    todo, owner_of = [], {}
    for img in images:
        target = caption_path(img, folder, output)
        if target in owner_of:  # a.png and a.jpg would both write a.txt: caption the first only
            report.failed[str(img.relative_to(folder))] = (
                f"shares {target.name} with {owner_of[target].name}: rename one of them")
            continue
        owner_of[target] = img
        if target.exists() and not overwrite:
            report.skipped.append(str(img.relative_to(folder)))
        else:
            todo.append(img)
    step_tokens = settings.max_new_tokens
    total_tokens = len(todo) * step_tokens
    records: list[dict] = []  # written with the first caption: a run that captions nothing writes nothing
    base = {"model": model_name, "family": getattr(vlm, "family", ""), "prompt": prompt, "prefix": prefix,
            "settings": asdict(settings)}
    done = 0

    def flush() -> None:
        path = Path(report.jsonl)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:  # one whole line per record; last record per image wins
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            fh.flush()
            os.fsync(fh.fileno())
        records.clear()

    for chunk in _chunks(todo, max(1, int(chunk_size))):
        pil, ok = [], []
        for img in chunk:
            try:
                pil.append(load_image(img))
                ok.append(img)
            except Exception as exc:  # noqa: BLE001 - any decoder failure: this image is bad, the others go on
                why = f"not a readable image: {type(exc).__name__}: {exc}"
                report.failed[str(img.relative_to(folder))] = why
                records.append({"image": str(img.relative_to(folder)), "error": why, **base})
        offset = done * step_tokens

        def tokens(k: int, _n: int, offset: int = offset, done: int = done) -> None:
            if progress is not None:  # k counts this chunk's tokens, every image's
                progress(done, len(todo), min(offset + k, total_tokens), total_tokens)

        results = caption_images(vlm, pil, prompt, settings, chunk_size=len(pil), progress=tokens,
                                 fatal=fatal) if pil else []
        for img, res in zip(ok, results, strict=True):
            rel = str(img.relative_to(folder))
            if res.error is not None:
                report.failed[rel] = res.error
                records.append({"image": rel, "error": res.error, **base})
                continue
            text = prefix + res.text
            target = caption_path(img, folder, output)
            records.append({"image": rel, "caption": text, "txt": str(target), "pdm": pdm_summary(res), **base})
            flush()  # the record first: a crash before the .txt re-captions the image on resume
            write_text(target, text + "\n")
            report.captioned.append(rel)
            report.captioned_txt.append(str(target))
        if report.captioned and records:
            flush()
        done += len(chunk)
        if progress is not None:
            progress(done, len(todo), done * step_tokens, total_tokens)
    if records and (report.captioned or report.skipped):  # bad images of a resumed run get their lines too
        flush()
    if todo and not report.captioned and not report.skipped:
        raise FolderError(f"no image of '{folder}' could be captioned: "
                          + "; ".join(f"{k}: {v}" for k, v in list(report.failed.items())[:5]),
                          "check that the files are images the model can read.", "folder")
    report.seconds = round(time.monotonic() - start, 3)
    return report
