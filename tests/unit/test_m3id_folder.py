"""Captioning a dataset folder: .txt beside each image, JSONL, resume, bad images (tier 1, no ComfyUI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compartments.cli import main
from compartments.samplers.m3id import M3IDSettings
from compartments.tiny import m3id as tiny
from compartments.vlm import folder as F
from compartments.vlm import models as mm
from compartments.vlm.caption import caption_images

PROMPT = "Describe this image."
S = M3IDSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def vlm():
    torch.set_num_threads(1)
    return mm.load_vlm(tiny.vlm("llava"))


def _dataset(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(3):
        tiny.image(i).save(root / f"img{i}.png")
    tiny.image(7).convert("RGB").save(root / "sub" / "deep.jpg", quality=95)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "notes.md").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    return root


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_captions_beside_each_image_match_the_batch_captioner(vlm, tmp_path):
    ds = _dataset(tmp_path / "ds")
    report = F.caption_folder(vlm, ds, PROMPT, S, prefix="ohwx, ", chunk_size=2)
    assert sorted(report.captioned) == ["img0.png", "img1.png", "img2.png"]
    assert list(report.failed) == ["broken.png"] and "not a readable image" in report.failed["broken.png"]
    assert not (ds / "sub" / "deep.txt").exists()  # not recursive
    ref = caption_images(vlm, [F.load_image(ds / f"img{i}.png") for i in range(3)], PROMPT, S, chunk_size=3)
    for i in range(3):
        assert (ds / f"img{i}.txt").read_text() == "ohwx, " + ref[i].text + "\n"
    records = _jsonl(ds / F.JSONL_NAME)
    by_image = {r["image"]: r for r in records}
    assert set(by_image) == {"img0.png", "img1.png", "img2.png", "broken.png"}
    rec = by_image["img0.png"]
    assert rec["caption"] == "ohwx, " + ref[0].text and rec["family"] == "llava"
    assert rec["settings"]["lam"] == S.lam and rec["prefix"] == "ohwx, " and rec["prompt"] == PROMPT
    assert rec["pdm"]["tokens"] == len(ref[0].token_ids) and 0 <= rec["pdm"]["mean"] <= 1
    assert "error" in by_image["broken.png"]


def test_resume_skips_captioned_images_and_overwrite_redoes_them(vlm, tmp_path):
    ds = _dataset(tmp_path / "ds")
    first = F.caption_folder(vlm, ds, PROMPT, S, recursive=True)
    assert "sub/deep.jpg" in first.captioned and (ds / "sub" / "deep.txt").exists()
    (ds / "img1.txt").unlink()  # as if the run had been interrupted before img1
    before = (ds / "img0.txt").stat().st_mtime_ns
    again = F.caption_folder(vlm, ds, PROMPT, S, recursive=True)
    assert again.captioned == ["img1.png"] and "img0.png" in again.skipped
    assert (ds / "img0.txt").stat().st_mtime_ns == before
    quiet = F.caption_folder(vlm, ds, PROMPT, S, recursive=True)  # only the bad image is left: not an error
    assert quiet.captioned == [] and list(quiet.failed) == ["broken.png"]
    redo = F.caption_folder(vlm, ds, PROMPT, M3IDSettings(max_new_tokens=6, lam=0.0, contrast=False),
                            recursive=True, overwrite=True)
    assert len(redo.captioned) == 4 and not redo.skipped


def test_output_folder_mirrors_subfolders_and_leaves_the_dataset_alone(vlm, tmp_path):
    ds = _dataset(tmp_path / "ds")
    listing = sorted(p.relative_to(ds) for p in ds.rglob("*"))
    out = tmp_path / "captions"
    report = F.caption_folder(vlm, ds, PROMPT, S, output=out, recursive=True)
    assert sorted(p.relative_to(ds) for p in ds.rglob("*")) == listing
    assert (out / "img0.txt").exists() and (out / "sub" / "deep.txt").exists()
    assert report.jsonl == str(out / F.JSONL_NAME)


@pytest.mark.parametrize("case", ["empty", "only bad images", "output inside input", "not a folder", "empty prompt"])
def test_bad_folders_are_refused_and_nothing_is_written(vlm, tmp_path, case):
    ds = tmp_path / "ds"
    ds.mkdir()
    output, prompt = None, PROMPT
    if case == "only bad images":
        (ds / "a.png").write_bytes(b"nope")
        (ds / "b.jpg").write_bytes(b"\xff\xd8\xff")
    elif case == "output inside input":
        tiny.image(1).save(ds / "a.png")
        output = ds / "captions"
    elif case == "not a folder":
        ds = tmp_path / "missing"
    elif case == "empty prompt":
        tiny.image(1).save(ds / "a.png")
        prompt = "  "
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(F.FolderError) as err:
        F.caption_folder(vlm, ds, prompt, S, output=output)
    assert err.value.field in {"folder", "output", "prompt"} and str(err.value)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_failing_write_leaves_no_partial_caption(vlm, tmp_path, monkeypatch):
    """The disk fills up after the caption's bytes were written to the temporary file: the rename never
    happens, the temporary file is removed, and no .txt exists."""
    import compartments.atomic as atomic

    ds = _dataset(tmp_path / "ds")

    def disk_full(src, dst):
        assert Path(src).read_text(encoding="utf-8")  # the bytes reached the temporary file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        F.caption_folder(vlm, ds, PROMPT, S)
    assert not list(ds.glob("*.txt")) and not [p for p in ds.iterdir() if p.name.startswith(".")
                                               and p.name != ".hidden.png"]


def test_two_images_with_one_caption_name_are_not_mixed_up(vlm, tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    tiny.image(1).save(ds / "a.png")
    tiny.image(2).save(ds / "a.jpg")
    report = F.caption_folder(vlm, ds, PROMPT, S)
    assert report.captioned == ["a.jpg"] and "shares a.txt with a.jpg" in report.failed["a.png"]


def test_cli_caption_and_progress(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds")
    code = main(["caption", str(ds), "--vlm", str(tiny.vlm("llava")), "--max-tokens", "4", "--recursive",
                 "--prefix", "sks, ", "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = json.loads(out.out)
    assert summary["n_captioned"] == 4 and summary["n_failed"] == 1
    assert "images 5/5" in out.err and "tokens" in out.err
    assert (ds / "sub" / "deep.txt").read_text().startswith("sks, ")
    assert main(["caption", str(tmp_path / "nowhere"), "--vlm", str(tiny.vlm("llava"))]) == 2
    assert "is not a folder" in capsys.readouterr().err
