"""CPR nodes: private conditioning from retrieved images, CPR-KL / CPR-Choose guiders, audit, save.

The guiders subclass ``comfy.samplers.CFGGuider`` (like core's PerpNegGuider) so they plug
into ``SamplerCustomAdvanced`` with every core sampler and scheduler. Public, negative and
private conds are evaluated in ONE ``calc_cond_batch`` call (in that order, so pre-CFG hooks
that read ``conds_out[0]`` / ``[1]`` as positive / negative keep working); the mixing rule
itself is ``samplers/cpr.py``.

Image conditioning that travels inside CONDITIONING (unCLIP ``unclip_conditioning``, GLIGEN
boxes, reference latents, CLIP-vision outputs) is stripped from the public and negative conds
so that retrieved images reach the private branch only.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import comfy.samplers
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..samplers.cpr import ChooseState, CPRInputError, check_lambda, cpr_choose, cpr_kl, hutchinson_div_diff
from . import _host

CATEGORY = "Compartments/CPR"
#: keys of a cond dict that carry image information into the model (stripped from public/negative)
IMAGE_KEYS = ("unclip_conditioning", "gligen", "reference_latents", "clip_vision_output", "concat_image")
CREDIT_KEY = "compartments_cpr_credit"
PRIVATE_KEY = "compartments_cpr_private"


def _credit_record(ids: str) -> object:
    """The retrieval node's ids JSON (kept structured) or a plain string."""
    ids = (ids or "").strip()
    if not ids:
        return []
    try:
        return json.loads(ids)
    except ValueError:
        return [s.strip() for s in ids.split(",") if s.strip()]


def _mark(conditioning: list, values: dict) -> list:
    """Copy of a CONDITIONING with ``values`` added to every entry's dict (inputs never modified)."""
    return [[t, {**d, **values}] for t, d in conditioning]


def strip_image_conditioning(conditioning: list) -> tuple[list, list[str]]:
    """Copy of ``conditioning`` without image-carrying keys; also returns the keys removed."""
    out, removed = [], []
    for t, d in conditioning:
        keep = {k: v for k, v in d.items() if k not in IMAGE_KEYS and k not in (CREDIT_KEY, PRIVATE_KEY)}
        removed += [k for k in d if k in IMAGE_KEYS]
        out.append([t, keep])
    return out, sorted(set(removed))


def has_private_signal(conditioning: list) -> bool:
    return bool(conditioning) and all(any(k in d for k in IMAGE_KEYS) or d.get(PRIVATE_KEY) for _, d in conditioning)


def credits_of(conditioning: list) -> list:
    seen, out = set(), []
    for _, d in conditioning:
        c = d.get(CREDIT_KEY)
        key = json.dumps(c, sort_keys=True, default=str)
        if c and key not in seen:
            seen.add(key)
            out.append(c)
    return out


# --- conditioning nodes --------------------------------------------------------------------
class CPRImageConditioning(io.ComfyNode):
    """Retrieved images -> the private branch: unCLIP / revision embeddings, or Redux style tokens."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsCPRImageConditioning",
            display_name="CPR Private Conditioning (images)",
            category=CATEGORY,
            description="Encodes each retrieved image with CLIP vision and puts it on a copy of the prompt "
                        "conditioning. Without a style model it attaches unCLIP embeddings (the entries core "
                        "unCLIPConditioning writes: SD2.1 unCLIP, and SDXL 'revision' with clip_vision_g). With a "
                        "style model (Flux Redux and its SigLIP vision model) it appends the images' style tokens "
                        "to the prompt's tokens, as core StyleModelApply does. Feed the result to the 'private' "
                        "input of a CPR guider; the ids are kept for credit.",
            inputs=[
                io.Conditioning.Input("conditioning",
                                      tooltip="Prompt conditioning of the model that samples (its own text encoder)."),
                io.ClipVision.Input("clip_vision",
                                    tooltip="CLIP vision model that encodes the retrieved images (unCLIP: the "
                                            "checkpoint's; SDXL revision: clip_vision_g; Flux Redux: SigLIP 384)."),
                io.Image.Input("images", tooltip="Retrieved images (a batch)."),
                io.String.Input("ids", default="", force_input=True, optional=True,
                                tooltip="Credit record of the images (Retrieve Images 'ids')."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="unCLIP: total strength of the images, split evenly between them. "
                                       "Redux: each image's style tokens are multiplied by it."),
                io.Float.Input("noise_augmentation", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="unCLIP noise augmentation of the image embeddings (0 = none; unused "
                                       "with a style model)."),
                io.Combo.Input("crop", options=["center", "none"], default="center",
                               tooltip="center: crop each image to a square before encoding; none: resize it whole."),
                io.StyleModel.Input("style_model", optional=True,
                                    tooltip="Flux Redux (models/style_models): the images become style tokens "
                                            "on the private prompt instead of unCLIP embeddings."),
            ],
            outputs=[io.Conditioning.Output(display_name="private"), io.String.Output(display_name="ids")],
        )

    @classmethod
    def execute(cls, conditioning, clip_vision, images, strength, noise_augmentation, crop,
                ids: str = "", style_model=None) -> io.NodeOutput:
        _host.check_numbers(cls, strength=strength, noise_augmentation=noise_augmentation)
        if images is None or images.shape[0] == 0:
            raise _host.BadInput("images", "no images were given.",
                                 "connect Retrieve Images (k >= 1) or use CPR Private Conditioning (prompt only).")
        outputs = []
        for i in range(images.shape[0]):
            _host.check_interrupt()
            outputs.append(clip_vision.encode_image(images[i:i + 1], crop=crop == "center"))
        mark = {CREDIT_KEY: _credit_record(ids)}
        if style_model is None:
            entries = [{"clip_vision_output": out, "strength": strength / len(outputs),
                        "noise_augmentation": noise_augmentation} for out in outputs]
            private = [[t, {**d, "unclip_conditioning": list(d.get("unclip_conditioning", [])) + entries,
                            PRIVATE_KEY: "unclip", **mark}] for t, d in conditioning]
        else:
            private = _with_style_tokens(conditioning, style_model, outputs, strength, mark)
        return io.NodeOutput(private, ids or "")


def _with_style_tokens(conditioning: list, style_model, outputs: list, strength: float, mark: dict) -> list:
    """StyleModelApply's 'multiply' rule: each image's style tokens, times strength, after the prompt's tokens."""
    tokens = torch.cat([style_model.get_cond(out).flatten(start_dim=0, end_dim=1).unsqueeze(0) for out in outputs],
                       dim=1) * strength
    private = []
    for t, d in conditioning:
        if "attention_mask" in d:
            raise _host.BadInput("conditioning", "carries an attention mask; style tokens would have to extend it.",
                                 "give the plain prompt conditioning and apply masks after this node.")
        if tokens.shape[-1] != t.shape[-1]:
            raise _host.BadInput("style_model", f"its tokens are {tokens.shape[-1]} wide but the prompt "
                                 f"conditioning is {t.shape[-1]} wide.",
                                 "use the style model of the sampling model's family (Flux Redux with a Flux "
                                 "prompt).")
        private.append([torch.cat((t, tokens.to(t)), dim=1), {**d, PRIVATE_KEY: "style_model", **mark}])
    return private


class CPRPromptConditioning(io.ComfyNode):
    """Prompt-only private branch: a prompt describing the retrieved items, marked as private."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsCPRPromptConditioning",
            display_name="CPR Private Conditioning (prompt only)",
            category=CATEGORY,
            description="Marks a prompt conditioning as the private branch of CPR when no image encoder is "
                        "available (e.g. a prompt written from the retrieved items, or style-model tokens "
                        "applied with StyleModelApply). Records the ids for credit.",
            inputs=[
                io.Conditioning.Input("conditioning",
                                      tooltip="The prompt (CLIP Text Encode) whose information counts as private."),
                io.String.Input("ids", default="", force_input=True, optional=True,
                                tooltip="Credits to record: Retrieve Images' ids JSON, or ids and sha256 hashes, comma separated."),
            ],
            outputs=[io.Conditioning.Output(display_name="private"), io.String.Output(display_name="ids")],
        )

    @classmethod
    def execute(cls, conditioning, ids: str = "") -> io.NodeOutput:
        return io.NodeOutput(_mark(conditioning, {PRIVATE_KEY: "prompt", CREDIT_KEY: _credit_record(ids)}), ids or "")


# --- guiders ------------------------------------------------------------------------------
class CPRGuider(comfy.samplers.CFGGuider):
    """CFGGuider whose positive denoiser is the CPR mix of a public and a private one."""

    def __init__(self, model_patcher, mode: str, lam: float, laplacian_probe: bool = False):
        super().__init__(model_patcher)
        self.mode, self.lam, self.laplacian_probe = mode, lam, laplacian_probe
        self.state = ChooseState()
        self.credits: list = []
        self.stripped: list[str] = []
        self.evaluations = 0

    def set_conds(self, public, private, negative) -> None:  # type: ignore[override]
        public, removed_pub = strip_image_conditioning(public)
        conds = {"positive": public, "private": private}
        removed_neg: list[str] = []
        if negative is not None:  # None: cfg 1 without a negative (Flux)
            conds["negative"], removed_neg = strip_image_conditioning(negative)
        self.stripped = sorted(set(removed_pub + removed_neg))
        self.credits = credits_of(private)
        self.inner_set_conds(conds)

    def sample(self, *args, **kwargs):  # noqa: D102 - reset the per-run audit, then sample as CFGGuider does
        self.state = ChooseState()
        self.evaluations = 0
        return super().sample(*args, **kwargs)

    def audit(self) -> dict:
        rec = {"method": f"CPR-{self.mode.upper() if self.mode == 'kl' else 'Choose'}", "lambda": self.lam,
               "cfg": self.cfg, "credits": self.credits, "stripped_from_public": self.stripped,
               "model_evaluations": self.evaluations}
        if self.mode == "choose":
            rec["laplacian_probe"] = self.laplacian_probe
            rec["choose"] = self.state.audit()
        return rec

    def _one_branch(self, cond, negative, x, timestep, model_options, seed):
        """lambda = 1 or 0: the other branch has weight exactly zero (both rules), so it is not evaluated and
        the step is core's own CFG step on the followed branch (CFGGuider with that conditioning, bit for bit,
        hooks included), a third of the model calls cheaper."""
        self.evaluations += 1
        if self.mode == "choose":
            self.state.record_constant(x.shape[0], private=self.lam == 0.0, sigma=float(timestep.reshape(-1)[0]))
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, negative, cond, self.cfg,
                                                model_options=model_options, seed=seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None, **kwargs):  # noqa: B006 - CFGGuider's signature
        public = self.conds.get("positive", None)
        negative = self.conds.get("negative", None)
        private = self.conds.get("private", None)
        if self.lam in (0.0, 1.0):
            return self._one_branch(public if self.lam == 1.0 else private, negative, x, timestep, model_options, seed)
        if not model_options.get("disable_cfg1_optimization", False) and math.isclose(self.cfg, 1.0):
            negative = None
        conds = [public, negative, private]
        b = x.shape[0]
        probe = self.mode == "choose" and self.laplacian_probe and 0.0 < self.lam < 1.0
        x_in, t_in = x, timestep
        if probe:
            gen = torch.Generator().manual_seed(int(seed or 0) * 1000003 + self.evaluations)
            v = (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1).to(x)
            eps = 1e-2 * timestep.reshape(-1, *([1] * (x.dim() - 1))).to(x)
            x_in, t_in = torch.cat([x, x + eps * v]), torch.cat([timestep, timestep])
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x_in, t_in, model_options)
        self.evaluations += 1
        probe_out = [o[b:] for o in out] if probe else None
        out = [o[:b] for o in out] if probe else out
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                    "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options}
            out = fn(args)
        d_pub, d_neg, d_priv = out[0], (out[1] if negative is not None else None), out[2]
        if self.mode == "kl":
            d_pos = cpr_kl(d_pub, d_priv, None, self.lam)
        else:
            dd = None
            if probe_out is not None:
                dd = hutchinson_div_diff(d_pub, d_priv, probe_out[0], probe_out[2], v, eps.reshape(-1))
            d_pos, _, _ = cpr_choose(d_pub, d_priv, None, x, timestep, self.lam, 1.0, self.state, dd)
        result = d_pos if d_neg is None else d_neg + self.cfg * (d_pos - d_neg)
        for fn in model_options.get("sampler_post_cfg_function", []):
            args = {"denoised": result, "cond": public, "uncond": negative, "cond_scale": self.cfg,
                    "model": self.inner_model, "uncond_denoised": d_neg if d_neg is not None else d_pos,
                    "cond_denoised": d_pos, "sigma": timestep, "model_options": model_options, "input": x,
                    "public_denoised": d_pub, "private_denoised": d_priv, "private_cond": private}
            result = fn(args)
        return result


def _make_guider(mode: str, model, public, private, negative, cfg: float, lam: float,
                 laplacian_probe: bool = False) -> CPRGuider:
    try:
        lam = check_lambda(lam)
    except CPRInputError as exc:
        raise _host.BadInput("lambda_", str(exc), "use 1 for the public model only, 0 for plain retrieval.") from exc
    for name, c in (("public", public), ("private", private), ("negative", negative)):
        if name == "negative" and c is None:
            if not math.isclose(cfg, 1.0):
                raise _host.BadInput("negative", f"cfg is {cfg:g} but no negative conditioning is connected.",
                                     "connect a negative prompt, or set cfg to 1 (guidance-distilled models such "
                                     "as Flux take their guidance from the conditioning and need no negative).")
            continue
        if not c:
            raise _host.BadInput(name, "the conditioning is empty.", "connect a CLIP Text Encode output.")
        _host.check_conditioning_width(model, name, c)
    for name, c in (("public", public), ("negative", negative or [])):
        if any(d.get(PRIVATE_KEY) or d.get(CREDIT_KEY) for _, d in c):
            raise _host.BadInput(name, "this conditioning is marked private (it came out of a CPR Private Conditioning node): "
                "used here it would feed the retrieved images' information into the public branch and turn the "
                "copy protection off.",
                f"connect the plain prompt (CLIP Text Encode) to '{name}'; the private conditioning goes to 'private'.")
    if not has_private_signal(private):
        raise _host.BadInput("private", "this conditioning carries no retrieved-image information (no unCLIP / GLIGEN / "
            "reference-image entries and not marked private), so CPR would mix two public models.",
            "build it with 'CPR Private Conditioning (images)' from retrieved images and a CLIP vision model, "
            "or mark a prompt with 'CPR Private Conditioning (prompt only)'.")
    guider = CPRGuider(model, mode, lam, laplacian_probe)
    guider.set_conds(public, private, negative)
    guider.set_cfg(cfg)
    return guider


_COMMON = (
    "Public: the prompt only (any image embeddings on it are removed). Private: the prompt plus the retrieved "
    "images (CPR Private Conditioning). lambda = 1 samples the public model only, 0 is plain retrieval (at 1 "
    "and 0 the other branch is not evaluated: exactly core CFG on the followed one)."
)


def _guider_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="The diffusion model both branches share."),
        io.Conditioning.Input("public",
                              tooltip="Public conditioning: the plain prompt (CLIP Text Encode), never "
                              "the retrieved private images."),
        io.Conditioning.Input("private",
                              tooltip="Private conditioning: from CPR Private Conditioning (images) "
                              "or (prompt only)."),
        io.Conditioning.Input("negative", optional=True,
                              tooltip="Negative prompt for classifier-free guidance; leave it unconnected with "
                                      "cfg 1 (Flux and other guidance-distilled models)."),
        io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale against the negative (1 = no CFG)."),
        # The id stays lambda_ (saved workflows use it; lambda is a Python keyword); the editor shows "lambda".
        io.Float.Input("lambda_", display_name="lambda", default=0.5, min=0.0, max=1.0, step=0.01,
                       tooltip="Weight of the public (safe) denoiser: 1 = the public model only, 0 = plain "
                               "retrieval."),
    ]


class CPRKLGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsCPRKLGuider",
            display_name="CPR-KL Guider",
            category=CATEGORY,
            description="CPR-KL: denoised = lambda*public + (1-lambda)*private, then CFG against the negative, "
                        "one batched model call per step. " + _COMMON,
            inputs=_guider_inputs(),
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, public, private, cfg, lambda_, negative=None) -> io.NodeOutput:
        _host.check_numbers(cls, cfg=cfg, lambda_=lambda_)
        return io.NodeOutput(_make_guider("kl", model, public, private, negative, cfg, lambda_))


class CPRChooseGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsCPRChooseGuider",
            display_name="CPR-Choose Guider",
            category=CATEGORY,
            description="CPR-Choose: per sample and step, follow the denoiser under which the current latent is "
                        "less likely (running log-likelihood-ratio estimate; see CPR Audit). " + _COMMON,
            inputs=_guider_inputs() + [
                io.Boolean.Input("laplacian_probe", default=True,
                                 tooltip="Estimate the Laplacian term of the log-ratio with one Hutchinson probe "
                                         "(doubles the batch; needed when the private law is much narrower than "
                                         "the public one, the copy-protection case)."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, public, private, cfg, lambda_, laplacian_probe, negative=None) -> io.NodeOutput:
        _host.check_numbers(cls, cfg=cfg, lambda_=lambda_)
        return io.NodeOutput(_make_guider("choose", model, public, private, negative, cfg,
                                          lambda_, laplacian_probe))


# --- audit and save -----------------------------------------------------------------------
class CPRAudit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsCPRAudit",
            display_name="CPR Audit",
            category=CATEGORY,
            description="After sampling (connect the sampler's output latent), the guider's record: method, lambda, "
                        "cfg, credited ids/hashes, and for CPR-Choose the per-step choices and log-ratio.",
            inputs=[io.Guider.Input("guider",
                                    tooltip="The CPR-KL or CPR-Choose guider that sampled (connect it "
                                    "after sampling)."),
                    io.Latent.Input("latent", tooltip="Sampler output (orders this node after sampling).")],
            outputs=[io.String.Output(display_name="audit")],
        )

    @classmethod
    def fingerprint_inputs(cls, guider, latent) -> float:
        return float("nan")  # the guider object's record changes with every run

    @classmethod
    def execute(cls, guider, latent) -> io.NodeOutput:
        if not isinstance(guider, CPRGuider):
            raise _host.BadInput("guider", f"expects a CPR guider, got {type(guider).__name__}.",
                                 "connect CPR-KL Guider or CPR-Choose Guider.")
        return io.NodeOutput(json.dumps(guider.audit()))


class CPRSaveImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsCPRSaveImage",
            display_name="Save Image with Credits",
            category=CATEGORY,
            description="Saves PNGs to the output folder with the CPR audit (credited ids/hashes, lambda, cfg, "
                        "choices) in the 'compartments_cpr' text chunk, next to the usual prompt/workflow.",
            inputs=[
                io.Image.Input("images", tooltip="The sampled images to save as PNG."),
                io.String.Input("audit", force_input=True,
                                tooltip="CPR Audit output (or Retrieve Images 'ids')."),
                io.String.Input("filename_prefix", default="cpr/ComfyUI",
                                tooltip="Sub-folder and file prefix inside ComfyUI's output folder."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, audit, filename_prefix) -> io.NodeOutput:
        try:
            record = json.loads(audit)
        except ValueError as exc:
            raise _host.BadInput("audit", "is not JSON.", "connect CPR Audit's output.") from exc
        out_dir = folder_paths.get_output_directory()
        full, name, counter, sub, _ = folder_paths.get_save_image_path(filename_prefix, out_dir,
                                                                      images.shape[2], images.shape[1])
        results = []
        for i, img in enumerate(images):
            _host.check_interrupt()
            meta = PngInfo()
            meta.add_text("compartments_cpr", json.dumps({**record, "batch_index": i}))
            if cls.hidden is not None and cls.hidden.prompt is not None:
                meta.add_text("prompt", json.dumps(cls.hidden.prompt))
            if cls.hidden is not None and cls.hidden.extra_pnginfo:
                for k, v in cls.hidden.extra_pnginfo.items():
                    meta.add_text(k, json.dumps(v))
            arr = np.clip(255.0 * img.float().cpu().numpy(), 0, 255).astype(np.uint8)
            file = f"{name.replace('%batch_num%', str(i))}_{counter:05}_.png"
            fd, tmp = tempfile.mkstemp(suffix=".png", dir=full)
            os.close(fd)
            try:
                Image.fromarray(arr).save(tmp, pnginfo=meta, compress_level=4)
                os.replace(tmp, os.path.join(full, file))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            results.append(ui.SavedResult(file, sub, io.FolderType.output))
            counter += 1
        return io.NodeOutput(ui=ui.SavedImages(results))


NODES = [CPRImageConditioning, CPRPromptConditioning, CPRKLGuider, CPRChooseGuider, CPRAudit, CPRSaveImage]
