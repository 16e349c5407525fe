"""CHAIR scoring of the M3ID evaluation harness, on hand-made cases with exact answers."""

from __future__ import annotations

import json

import pytest

from compartments.benchmarks import m3id as bench
from compartments.samplers.m3id import CaptionResult
from compartments.vlm.report import pdm_json, pdm_plot

CATS = [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "hot dog"},
        {"id": 4, "name": "couch"}, {"id": 5, "name": "car"}]


def test_mentions_use_synonyms_plurals_and_two_word_names():
    vocab = bench.object_vocab(CATS)
    assert bench.mentioned("Two men eat hot dogs on a sofa.", vocab) == {"person", "hot dog", "couch"}
    assert bench.mentioned("A dog next to cars", vocab) == {"dog", "car"}


def test_chair_counts_exactly():
    vocab = bench.object_vocab(CATS)
    truth = {1: {"person", "dog"}, 2: {"car"}}
    caps = {1: "a man with his dog on a couch", 2: "a car"}
    scores = bench.chair(caps, truth, vocab)
    assert scores["objects_mentioned"] == 4 and scores["objects_hallucinated"] == 1
    assert scores["chair_i"] == pytest.approx(0.25) and scores["chair_s"] == pytest.approx(0.5)


def test_reference_captions_count_as_ground_truth(tmp_path):
    inst = {"images": [{"id": 7, "file_name": "a.png"}], "categories": CATS,
            "annotations": [{"id": 1, "image_id": 7, "category_id": 2}]}
    caps = {"images": inst["images"], "annotations": [{"id": 1, "image_id": 7, "caption": "a woman and a dog"}]}
    (tmp_path / "i.json").write_text(json.dumps(inst))
    (tmp_path / "c.json").write_text(json.dumps(caps))
    images, truth, _ = bench.load_coco(tmp_path / "c.json", tmp_path / "i.json", 10)
    assert [im["id"] for im in images] == [7] and truth[7] == {"dog", "person"}


def test_pdm_report_and_plot():
    r = [CaptionResult("a dog", [5, 6], [0.2, 0.4], [True, False]), CaptionResult("", [], error="boom")]
    doc = json.loads(pdm_json(r, None, {"lam": 0.02}))
    assert doc["captions"][0]["mean_pdm"] == pytest.approx(0.3) and doc["captions"][1]["error"] == "boom"
    img = pdm_plot(r[0])
    assert img.shape == (192, 384, 3) and 0.0 <= img.min() and img.max() <= 1.0
    assert (img < 0.5).any()  # something was drawn


def test_harness_runs_on_several_families(capsys):
    """The CHAIR harness takes any supported family (here a LLaVA and the cross-attention mllama)."""
    assert bench.main(["--quick", "--quick-model", "llava", "mllama", "--max-images", "2", "--max-tokens", "4",
                       "--repeats", "1"]) == 0
    import json

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ratios = {ln["family"]: ln["value"] for ln in lines
              if ln["figure"] == "time_per_token_vs_greedy" and ln["method"] == "m3id"}
    assert set(ratios) == {"llava", "mllama"} and all(r > 0 for r in ratios.values())
    assert all(ln["value"] == 0 for ln in lines if ln["figure"] == "errors")
