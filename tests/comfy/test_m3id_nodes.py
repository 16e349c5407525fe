"""Tier 2: M3ID nodes inside a real in-process ComfyUI (memory manager, progress, errors)."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def vlm(comfy):
    from compartments.tiny import m3id as tiny

    torch.set_num_threads(1)
    placed = tiny.prepare(comfy.models_dir, comfy.input_dir)
    (handle,) = comfy.run("CompartmentsM3IDLoadVLM", model_folder=placed["vlm"], dtype="auto")
    return handle


def _images(n: int) -> torch.Tensor:
    import numpy as np

    from compartments.tiny import m3id as tiny

    return torch.from_numpy(np.stack([np.asarray(tiny.image(i), dtype=np.float32) / 255 for i in range(n)]))


def test_loader_goes_through_comfy_memory_manager(comfy, vlm):
    import comfy.model_management as mm

    assert vlm.vlm.family == "llava"
    vlm.ready()
    assert any(lm.model is vlm.patcher for lm in mm.current_loaded_models)
    assert vlm.vlm.model.device == mm.get_torch_device()


def test_caption_every_image_with_pdm_outputs(comfy, vlm):
    images = _images(3)
    before = images.clone()
    captions, doc, plot = comfy.run("CompartmentsM3IDCaption", vlm=vlm, images=images, prompt="Describe this image.",
                                    max_tokens=6, decoding="greedy", seed=0, chunk_size=2, lambda_=0.5, alpha=1.0,
                                    weight_cap=10.0)
    assert torch.equal(images, before)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    data = json.loads(doc)
    assert [c["caption"] for c in data["captions"]] == captions
    assert all(len(c["pdm"]) == len(c["tokens"]) for c in data["captions"])
    assert plot.shape[0] == 3 and plot.shape[-1] == 3 and float(plot.max()) <= 1.0
    plain, _, _ = comfy.run("CompartmentsM3IDCaptionPlain", vlm=vlm, images=images, prompt="Describe this image.",
                            max_tokens=6, decoding="greedy", seed=0, chunk_size=4, measure_pdm=False)
    zero, _, _ = comfy.run("CompartmentsM3IDCaption", vlm=vlm, images=images, prompt="Describe this image.",
                           max_tokens=6, decoding="greedy", seed=0, chunk_size=4, lambda_=0.0, alpha=0.3,
                           weight_cap=10.0)
    assert plain == zero


@pytest.mark.parametrize("field,value,expect", [
    ("prompt", "   ", "'prompt'"), ("max_tokens", 0, "'max_tokens'"), ("lambda_", -0.5, "'lambda'"),
])
def test_bad_inputs_name_the_input(comfy, vlm, field, value, expect):
    kw = dict(vlm=vlm, images=_images(1), prompt="Describe this image.", max_tokens=4, decoding="greedy", seed=0,
              chunk_size=1, lambda_=0.02, alpha=0.3, weight_cap=10.0)
    kw[field] = value
    with pytest.raises(ValueError, match=expect):
        comfy.run("CompartmentsM3IDCaption", **kw)


def test_loader_refuses_text_only_folder(comfy):
    import shutil

    from compartments.tiny import m3id as tiny

    shutil.copytree(tiny.vlm("text_only"), comfy.models_dir / "vlm" / "m3id-text-only", dirs_exist_ok=True)
    with pytest.raises(ValueError, match="'model_folder'.*text-only"):
        comfy.run("CompartmentsM3IDLoadVLM", model_folder="m3id-text-only", dtype="float32")
    with pytest.raises(ValueError, match="'model_folder'"):
        comfy.run("CompartmentsM3IDLoadVLM", model_folder="../checkpoints", dtype="float32")


def test_interrupt_stops_captioning(comfy, vlm):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            comfy.run("CompartmentsM3IDCaption", vlm=vlm, images=_images(2), prompt="Describe this image.",
                      max_tokens=4, decoding="greedy", seed=0, chunk_size=1, lambda_=0.02, alpha=0.3,
                      weight_cap=10.0)
    finally:
        mm.interrupt_current_processing(False)


def _folder_kw(vlm, **kw):
    base = dict(vlm=vlm, folder="datasets/tiny", prompt="Describe this image.", method="M3ID", prefix="ohwx, ",
                output_folder="", recursive=True, overwrite=False, max_tokens=4, decoding="greedy", seed=0,
                chunk_size=2, lambda_=0.02, alpha=0.3)
    base.update(kw)
    return base


def test_caption_folder_writes_txt_resumes_and_reports(comfy, vlm):
    from compartments.tiny import m3id as tiny

    ds = comfy.input_dir / "datasets" / "tiny"
    (ds / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        tiny.image(20 + i).save(ds / f"{i}.png")
    tiny.image(30).save(ds / "sub" / "deep.png")
    (ds / "bad.png").write_bytes(b"not a png")
    report, captions = comfy.run("CompartmentsM3IDCaptionFolder", **_folder_kw(vlm))
    data = json.loads(report)
    assert data["n_captioned"] == 4 and list(data["failed"]) == ["bad.png"]
    assert len(captions) == 4 and all(c.startswith("ohwx, ") for c in captions)
    assert (ds / "sub" / "deep.txt").read_text().startswith("ohwx, ")
    records = [json.loads(line) for line in (ds / "captions.jsonl").read_text().splitlines()]
    assert {r["image"] for r in records} == {"0.png", "1.png", "2.png", "sub/deep.png", "bad.png"}
    again, _ = comfy.run("CompartmentsM3IDCaptionFolder", **_folder_kw(vlm))
    assert json.loads(again)["n_skipped"] == 4 and json.loads(again)["n_captioned"] == 0
    out, caps = comfy.run("CompartmentsM3IDCaptionFolder", **_folder_kw(vlm, output_folder="captions/tiny",
                                                                         method="plain"))
    assert (comfy.output_dir / "captions" / "tiny" / "sub" / "deep.txt").exists()
    assert json.loads(out)["n_captioned"] == 4


@pytest.mark.parametrize("field,value,expect", [
    ("folder", "../../etc", "'folder'"), ("folder", "no/such/folder", "'folder'"),
    ("output_folder", "../escape", "'output_folder'"), ("prompt", " ", "'prompt'"),
])
def test_caption_folder_bad_inputs_name_the_input(comfy, vlm, field, value, expect):
    (comfy.input_dir / "datasets" / "tiny").mkdir(parents=True, exist_ok=True)
    from compartments.tiny import m3id as tiny

    tiny.image(40).save(comfy.input_dir / "datasets" / "tiny" / "x.png")
    with pytest.raises(ValueError, match=expect):
        comfy.run("CompartmentsM3IDCaptionFolder", **_folder_kw(vlm, overwrite=True, **{field: value}))


def test_unload_after_frees_the_model_and_the_next_run_reloads(comfy, vlm):
    import comfy.model_management as mm

    kw = dict(vlm=vlm, images=_images(1), prompt="Describe this image.", max_tokens=4, decoding="greedy", seed=0,
              chunk_size=1, lambda_=0.02, alpha=0.3, weight_cap=10.0)
    first, _, _ = comfy.run("CompartmentsM3IDCaption", **kw, unload_after=True)
    assert vlm.vlm is None and vlm.patcher is None
    assert not any(getattr(lm.model, "model", None).__class__.__name__ == "_Holder" for lm in mm.current_loaded_models)
    second, _, _ = comfy.run("CompartmentsM3IDCaption", **kw)  # the cached handle reads the folder again
    assert second == first and vlm.vlm is not None
