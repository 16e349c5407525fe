"""M3ID decoding on tiny random VLMs of every supported family (tier 1, no ComfyUI)."""

from __future__ import annotations

import pytest
import torch

from compartments.samplers import m3id as M
from compartments.tiny import m3id as tiny
from compartments.vlm import models as mm

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "paligemma"]
PROMPT = "Describe this image."


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request):
    torch.set_num_threads(1)
    return mm.load_vlm(tiny.vlm(request.param))


def _inputs(vlm):
    return mm.build_inputs(vlm, [tiny.image(1), tiny.image(2)], PROMPT)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_lambda_zero_equals_plain_generate(vlm, fused):
    cond, uncond = _inputs(vlm)
    settings = M.M3IDSettings(lam=0.0, alpha=1.0, max_new_tokens=10)
    new, proc = M.generate_m3id(vlm.model, cond, uncond, settings, vlm.eos_token_ids, vlm.pad_token_id,
                                fused=fused)
    ref = vlm.model.generate(**cond, max_new_tokens=10, do_sample=False, eos_token_id=vlm.eos_token_ids,
                             pad_token_id=vlm.pad_token_id)
    assert torch.equal(new, ref[:, cond["input_ids"].shape[1]:])
    assert len(proc.pdm) == new.shape[1]  # the image-free branch ran every step


def test_image_free_cache_equals_full_recomputation(vlm):
    cond, uncond = _inputs(vlm)
    settings = M.M3IDSettings(lam=0.3, alpha=1.0, max_new_tokens=8)
    new, proc = M.generate_m3id(vlm.model, cond, uncond, settings, vlm.eos_token_ids, vlm.pad_token_id,
                                fused=False)
    steps = len(proc.branch.logits_trace)
    ids = torch.cat([uncond["input_ids"], new[:, : steps - 1]], dim=1)
    extra = {}
    if "token_type_ids" in uncond:  # PaliGemma: prompt is prefix (0), generated tokens are suffix (1)
        extra["token_type_ids"] = torch.cat(
            [uncond["token_type_ids"], torch.ones_like(new[:, : steps - 1])], dim=1)
    with torch.no_grad():
        full = vlm.model(input_ids=ids, use_cache=False, **extra).logits.float()
    start = uncond["input_ids"].shape[1] - 1
    for k, cached in enumerate(proc.branch.logits_trace):
        torch.testing.assert_close(cached, full[:, start + k], rtol=1e-4, atol=1e-4)


def test_fused_batch_matches_separate_branch(vlm):
    """One padded batch for both branches gives the tokens and PDM of the separate KV cache."""
    cond, uncond = _inputs(vlm)
    settings = M.M3IDSettings(lam=0.3, alpha=1.0, max_new_tokens=8)
    sep, p_sep = M.generate_m3id(vlm.model, cond, uncond, settings, vlm.eos_token_ids, vlm.pad_token_id,
                                 fused=False)
    fus, p_fus = M.generate_m3id(vlm.model, cond, uncond, settings, vlm.eos_token_ids, vlm.pad_token_id,
                                 fused=True)
    assert torch.equal(sep, fus)
    torch.testing.assert_close(torch.stack(p_fus.pdm), torch.stack(p_sep.pdm), rtol=1e-3, atol=1e-4)


def test_contrast_changes_tokens_and_pdm_in_range(vlm):
    cond, uncond = _inputs(vlm)
    plain, _ = M.generate_m3id(vlm.model, cond, uncond, M.M3IDSettings(lam=0.0, max_new_tokens=12),
                               vlm.eos_token_ids, vlm.pad_token_id)
    strong, proc = M.generate_m3id(vlm.model, cond, uncond,
                                   M.M3IDSettings(lam=1.0, alpha=1.0, weight_cap=50.0, max_new_tokens=12),
                                   vlm.eos_token_ids, vlm.pad_token_id)
    pdm = torch.stack(proc.pdm)
    assert ((pdm >= 0) & (pdm <= 1)).all() and pdm.max() > 0
    if vlm.family != "paligemma":  # the tiny PaliGemma is too peaked for the contrast to flip a token
        assert not torch.equal(plain, strong)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(vlm):
    cond, uncond = _inputs(vlm)
    s = M.M3IDSettings(lam=0.1, greedy=False, seed=7, max_new_tokens=8)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, _ = M.generate_m3id(vlm.model, cond, uncond, s, vlm.eos_token_ids, vlm.pad_token_id)
    assert torch.equal(before, torch.random.get_rng_state())
    b, _ = M.generate_m3id(vlm.model, cond, uncond, s, vlm.eos_token_ids, vlm.pad_token_id)
    assert torch.equal(a, b)
