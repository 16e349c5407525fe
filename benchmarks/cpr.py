"""Time per sampling step of the CPR guiders vs a plain CFGGuider evaluating the same conds.

Loads the tiny SD1.5 checkpoint in a real in-process ComfyUI (the one the pack is installed in,
``COMFYUI_PATH``, ~/ComfyUI, else the newest release under ../shared/comfyui; --cpu unless
``--gpu``), and times ``guider.sample`` with core's Euler sampler. The reference is core
``CFGGuider`` whose positive is public+private combined (ComfyUI evaluates every entry of a
conditioning list as its own cond), so both run the same 3 conds x batch rows per step in one
model call; CPR-Choose with the Laplacian probe doubles the rows and is compared with CFGGuider
on a doubled batch. Prints one JSON line per figure; target: ratio <= 1.1.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _comfy(gpu: bool) -> None:
    """The pack's in-process harness (COMFYUI_PATH, else ../shared/comfyui's newest), temp base dir."""
    import atexit
    import shutil
    import tempfile

    from compartments.nodes._inprocess import boot, default_checkout

    path = default_checkout()
    if path is None:
        raise SystemExit("benchmarks/cpr.py: no ComfyUI found: set COMFYUI_PATH to a checkout")
    base = tempfile.mkdtemp(prefix="compartments-bench-")
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    boot(path, base, cpu=None if gpu else True, core_nodes=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 px, 4 steps, 2 repeats")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu", action="store_true", help="let ComfyUI pick its device (default --cpu)")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.repeats = 64, 4, 2
    _comfy(args.gpu)

    import comfy.model_management as mm
    import comfy.samplers
    import comfy.sd
    import torch

    from compartments.nodes.cpr import CPRGuider, CPRPromptConditioning
    from compartments.tiny import sd15

    if not args.gpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(str(sd15.checkpoint(0)), output_vae=True,
                                                                  output_clip=True)

    def enc(text: str) -> list:
        tokens = clip.tokenize(text)
        return clip.encode_from_tokens_scheduled(tokens)

    public, neg = enc("a red house"), enc("")
    private = CPRPromptConditioning.execute(enc("a blue boat"), "[]").result[0]
    sigmas = model.get_model_object("model_sampling")
    sig = comfy.samplers.calculate_sigmas(sigmas, "karras", args.steps)
    sampler = comfy.samplers.sampler_object("euler")
    device = str(mm.get_torch_device())

    def timed(guider, batch: int) -> float:
        lat = torch.zeros(batch, 4, args.size // 8, args.size // 8)
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
        guider.sample(noise, lat, sampler, sig, disable_pbar=True, seed=0)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            if mm.get_torch_device().type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            guider.sample(noise, lat, sampler, sig, disable_pbar=True, seed=0)
            if mm.get_torch_device().type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best / args.steps

    def cfg_ref() -> comfy.samplers.CFGGuider:
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(public + private, neg)
        g.set_cfg(5.0)
        return g

    def cpr(mode: str, probe: bool = False) -> CPRGuider:
        g = CPRGuider(model, mode, 0.5, probe)
        g.set_conds(public, private, neg)
        g.set_cfg(5.0)
        return g

    base = {"benchmark": "cpr", "unit": "s/step", "device": device, "size": args.size, "steps": args.steps,
            "batch": args.batch, "model": "tiny-sd15", "threads": torch.get_num_threads()}
    ref = timed(cfg_ref(), args.batch)
    print(json.dumps({**base, "figure": "cfg_3conds_step_time", "value": round(ref, 5)}))
    for name, guider, batch_ref in (("cpr_kl", cpr("kl"), None), ("cpr_choose", cpr("choose"), None),
                                    ("cpr_choose_probe", cpr("choose", True), 2)):
        t = timed(guider, args.batch)
        r = ref if batch_ref is None else timed(cfg_ref(), args.batch * batch_ref)
        print(json.dumps({**base, "figure": f"{name}_step_time", "value": round(t, 5),
                          "reference_step_time": round(r, 5), "ratio": round(t / r, 3), "target_ratio": 1.1}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
