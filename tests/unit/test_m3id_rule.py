"""The M3ID rule, PDM and the batch driver's error handling (tier 1, no ComfyUI)."""

from __future__ import annotations

import math

import pytest
import torch

from compartments.samplers import m3id as M
from compartments.tiny import m3id as tiny
from compartments.vlm import models as mm
from compartments.vlm.caption import caption_images


def test_weight_schedule_and_cap():
    assert M.m3id_weight(5, 0.0, 10.0) == 0.0
    g = math.exp(-0.02 * 10)
    assert M.m3id_weight(10, 0.02, 10.0) == pytest.approx((1 - g) / g)
    assert M.m3id_weight(10_000, 0.02, 4.0) == 4.0


def test_combine_gate_and_formula():
    l_c = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [9.0, 0.0, 0.0]]), -1)
    l_u = torch.log_softmax(torch.tensor([[0.0, 2.0, 0.0], [0.0, 9.0, 0.0]]), -1)
    out = M.m3id_combine(l_c, l_u, t=20, lam=0.05, alpha=0.9, cap=100.0)
    w = math.expm1(0.05 * 20)
    torch.testing.assert_close(out[0], l_c[0] + w * (l_c[0] - l_u[0]))  # top-1 p < alpha: contrasted
    torch.testing.assert_close(out[1], l_c[1])  # confident row: gate closed, unchanged


def test_hellinger_bounds():
    a = torch.log_softmax(torch.randn(3, 11), -1)
    torch.testing.assert_close(M.hellinger(a, a), torch.zeros(3), atol=1e-3, rtol=0)
    disjoint_c = torch.log(torch.tensor([[1.0, 1e-30]]))
    disjoint_u = torch.log(torch.tensor([[1e-30, 1.0]]))
    assert M.hellinger(disjoint_c, disjoint_u).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("field,value", [("lam", -0.1), ("max_new_tokens", 0), ("alpha", 1.5)])
def test_bad_settings_are_refused(field, value):
    s = M.M3IDSettings(**{field: value})
    with pytest.raises(ValueError, match=field.replace("lam", "lambda")):
        s.validate()


def test_unsupported_folders_are_named(tmp_path):
    with pytest.raises(mm.VLMFolderError, match="text-only"):
        mm.detect_family(tiny.vlm("text_only"))
    with pytest.raises(mm.VLMFolderError, match="no config.json"):
        mm.detect_family(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "florence2", "vision_config": {}}')
    with pytest.raises(mm.VLMFolderError, match="image-free branch"):
        mm.detect_family(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "blip", "vision_config": {}}')
    with pytest.raises(mm.VLMFolderError, match="image-free language model"):
        mm.detect_family(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "made_up_vlm", "vision_config": {}}')
    with pytest.raises(mm.VLMFolderError, match="vlm-families"):
        mm.detect_family(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl", "text_config": {}}')
    with pytest.raises(mm.VLMFolderError, match="no .safetensors"):
        mm.detect_family(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "some_t5_vlm", "is_encoder_decoder": true}')
    with pytest.raises(mm.VLMFolderError, match="encoder-decoder"):
        mm.detect_family(tmp_path)


def test_families_lists_every_image_text_type_but_the_refused(capsys):
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as known

    from compartments.cli import main

    assert main(["vlm-families"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = dict(line.split("\t") for line in lines)
    assert set(rows) == set(known) - set(mm.REFUSED) and set(rows.values()) <= {"tested", "untested"}
    assert {k for k, v in rows.items() if v == "tested"} == set(mm.TESTED)
    assert lines == sorted(lines)


def test_a_prompt_longer_than_the_context_is_refused_up_front():
    vlm = mm.load_vlm(tiny.vlm("llava"))
    long = " ".join(["cat"] * (vlm.context_length + 1))
    with pytest.raises(mm.PromptError, match="context is 512 tokens"):
        caption_images(vlm, [tiny.image(1)], long, M.M3IDSettings(max_new_tokens=4))
    with pytest.raises(mm.PromptError, match="max_tokens"):  # the prompt fits, the caption would not
        caption_images(vlm, [tiny.image(1)], "a cat", M.M3IDSettings(max_new_tokens=600))


def test_batch_driver_keeps_good_captions_when_one_fails():
    torch.set_num_threads(1)
    vlm = mm.load_vlm(tiny.vlm("llava"))
    good = [tiny.image(3), tiny.image(4)]
    s = M.M3IDSettings(max_new_tokens=6)
    ref = caption_images(vlm, good, "Describe this image.", s, chunk_size=2)
    mixed = caption_images(vlm, [good[0], "not an image", good[1]], "Describe this image.", s, chunk_size=3)
    assert mixed[1].error and not mixed[0].error and not mixed[2].error
    assert [mixed[0].token_ids, mixed[2].token_ids] == [ref[0].token_ids, ref[1].token_ids]
    assert len(mixed[0].pdm) == len(mixed[0].token_ids)
    with pytest.raises(ValueError, match="prompt is empty"):
        caption_images(vlm, good, "  ", s)


def test_progress_reaches_total_and_cancel_propagates():
    vlm = mm.load_vlm(tiny.vlm("llava"))
    seen: list[tuple[int, int]] = []
    s = M.M3IDSettings(max_new_tokens=4)
    caption_images(vlm, [tiny.image(5)] * 3, "Describe this image.", s, chunk_size=2,
                     progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (12, 12) and all(t == 12 for _, t in seen)

    class Cancelled(Exception):
        pass

    def cancel(done: int, total: int) -> None:
        if done >= 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        caption_images(vlm, [tiny.image(5)] * 2, "Describe this image.", s, progress=cancel, fatal=(Cancelled,))
