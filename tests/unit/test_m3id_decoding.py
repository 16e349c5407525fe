"""M3ID decoding on tiny random VLMs of every supported family (tier 1, no ComfyUI)."""

from __future__ import annotations

import pytest
import torch

from compartments.samplers import m3id as M
from compartments.tiny import m3id as tiny
from compartments.vlm import models as mm

PROMPT = "Describe this image."


def test_every_tested_family_has_a_tiny_model():
    assert set(tiny.FAMILIES) == set(mm.TESTED) and len(mm.TESTED) >= 12
    accepted = dict(mm.families())
    assert all(accepted[f] == "tested" for f in mm.TESTED)


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def vlm(request):
    torch.set_num_threads(1)
    loaded = mm.load_vlm(tiny.vlm(request.param))
    assert loaded.family == request.param  # found through the Auto classes, not a hand-kept table
    return loaded


def test_the_prompt_reaches_the_model_intact(vlm):
    """Both branches carry the prompt's words (a tokenizer that drops words would pass every other check)."""
    cond, free = mm.build_inputs(vlm, [tiny.image(1)], "a cat on a table")
    for ids in (cond["input_ids"][0], free["input_ids"][0]):
        text = vlm.tokenizer.decode(ids, skip_special_tokens=True)
        assert "cat" in text and "table" in text, text


def _inputs(vlm):
    return mm.build_inputs(vlm, [tiny.image(1), tiny.image(2)], PROMPT)


def _generate(vlm, cond, uncond, settings, fused=True):
    """generate_m3id as the caption driver calls it (the family's quirks applied)."""
    return M.generate_m3id(vlm.model, cond, uncond, settings, vlm.eos_token_ids, vlm.pad_token_id,
                           fused=fused and vlm.quirk.fused, generated_type=vlm.quirk.generated_type)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_lambda_zero_equals_plain_generate(vlm, fused):
    cond, uncond = _inputs(vlm)
    settings = M.M3IDSettings(lam=0.0, alpha=1.0, max_new_tokens=10)
    new, proc = _generate(vlm, cond, uncond, settings, fused)
    ref = vlm.model.generate(**cond, max_new_tokens=10, do_sample=False, eos_token_id=vlm.eos_token_ids,
                             pad_token_id=vlm.pad_token_id)
    assert torch.equal(new, ref[:, cond["input_ids"].shape[1]:])
    assert len(proc.pdm) == new.shape[1]  # the image-free branch ran every step


def test_image_free_cache_equals_full_recomputation(vlm):
    cond, uncond = _inputs(vlm)
    settings = M.M3IDSettings(lam=0.3, alpha=1.0, max_new_tokens=8)
    new, proc = _generate(vlm, cond, uncond, settings, fused=False)
    steps = len(proc.branch.logits_trace)
    ids = torch.cat([uncond["input_ids"], new[:, : steps - 1]], dim=1)
    extra = {}
    for key in M.TOKEN_TYPE_KEYS:  # PaliGemma: prompt is prefix (0), generated tokens are suffix (1)
        if key in uncond:
            extra[key] = torch.cat([uncond[key], torch.full_like(new[:, : steps - 1], vlm.quirk.generated_type)], 1)
    with torch.no_grad():
        full = vlm.model(input_ids=ids, use_cache=False, **extra).logits.float()
    start = uncond["input_ids"].shape[1] - 1
    for k, cached in enumerate(proc.branch.logits_trace):
        torch.testing.assert_close(cached, full[:, start + k], rtol=1e-4, atol=1e-4)


def test_fused_batch_matches_separate_branch(vlm):
    """One padded batch for both branches gives the tokens and PDM of the separate KV cache."""
    cond, uncond = _inputs(vlm)
    settings = M.M3IDSettings(lam=0.3, alpha=1.0, max_new_tokens=8)
    if not vlm.quirk.fused:
        pytest.skip(f"{vlm.family}: the image-free branch cannot share a batch (see vlm.models.QUIRKS)")
    sep, p_sep = _generate(vlm, cond, uncond, settings, fused=False)
    fus, p_fus = _generate(vlm, cond, uncond, settings, fused=True)
    assert torch.equal(sep, fus)
    torch.testing.assert_close(torch.stack(p_fus.pdm), torch.stack(p_sep.pdm), rtol=1e-3, atol=1e-4)


def test_contrast_changes_tokens_and_pdm_in_range(vlm):
    cond, uncond = _inputs(vlm)
    plain, _ = _generate(vlm, cond, uncond, M.M3IDSettings(lam=0.0, max_new_tokens=12))
    strong, proc = _generate(vlm, cond, uncond, M.M3IDSettings(lam=1.0, alpha=1.0, weight_cap=50.0, max_new_tokens=12))
    pdm = torch.stack(proc.pdm)
    assert ((pdm >= 0) & (pdm <= 1)).all() and pdm.max() > 0
    if vlm.family != "paligemma":  # the tiny PaliGemma is too peaked for the contrast to flip a token
        assert not torch.equal(plain, strong)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(vlm):
    cond, uncond = _inputs(vlm)
    s = M.M3IDSettings(lam=0.1, greedy=False, seed=7, max_new_tokens=8)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, _ = _generate(vlm, cond, uncond, s)
    assert torch.equal(before, torch.random.get_rng_state())
    b, _ = _generate(vlm, cond, uncond, s)
    assert torch.equal(a, b)
