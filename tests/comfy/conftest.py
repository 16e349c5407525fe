"""Fixtures shared by the tier-2 tests of this folder."""

from __future__ import annotations

import gc

import pytest
import torch


def _free_models() -> None:
    import comfy.model_management as mm

    gc.collect()
    mm.unload_all_models()
    mm.soft_empty_cache()


@pytest.fixture(scope="module", autouse=True)
def _torch_threads_per_module():
    """A module that pins torch to one thread (tiny models, bitwise comparisons) pins only itself:
    the next module gets the thread count back (torch's setting is process-wide, and tier 2 is one
    process: a leaked 1 made every later module, the Flux and SDXL ones included, run on one core)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def free_models():
    """Unload every model ComfyUI holds (a module's big fixtures must not overlap the next module's)."""
    return _free_models


@pytest.fixture
def cond_rows():
    """``cond_rows(model) -> (clone, seen)``: the clone's diffusion-model calls record, per batch chunk,
    ``(cond index, {input name: that chunk's tensor})`` through the documented
    ``set_model_unet_function_wrapper`` hook (``cond_or_uncond``: the index of each chunk's cond in the
    guider's list; CFGGuider: 0 positive, 1 negative; CPR: 0 public, 1 negative, 2 private)."""

    def wrap(model):
        seen: list[tuple[int, dict]] = []

        def wrapper(apply, args):
            c, idx = args["c"], args["cond_or_uncond"]
            n = args["input"].shape[0] // len(idx)
            for j, i in enumerate(idx):
                seen.append((i, {k: v[j * n:(j + 1) * n].clone() for k, v in c.items() if torch.is_tensor(v)}))
            return apply(args["input"], args["timestep"], **c)

        m = model.clone()
        m.set_model_unet_function_wrapper(wrapper)
        return m, seen

    return wrap
