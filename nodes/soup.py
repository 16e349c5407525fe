"""Diffusion Soup nodes: build a soup from checkpoints, add or remove a shard, save, load, inspect.

Thin by design: every node resolves file names through ``_host`` and calls ``soup`` (the
streaming engine). A soup travels between nodes as a ``COMPARTMENTS_SOUP`` value, a file in
ComfyUI's temp folder plus its manifest; ``Save Soup`` copies it atomically into
``models/soups``. Each node that yields a soup also yields MODEL, CLIP and VAE loaded from it
with ComfyUI's own loader, so the soup feeds KSampler directly.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import comfy.sd
import folder_paths
from comfy_api.latest import io

from .. import soup as engine
from ..soup.exact import stale_sidecars
from ..soup.layout import layout_of
from ..soup.st import Reader
from . import _host

CATEGORY = "Compartments/Soup"
SOUPS = "soups"
_host.register_model_folder(SOUPS)

SoupType = io.Custom("COMPARTMENTS_SOUP")


@dataclass(frozen=True)
class SoupRef:
    """A soup file on disk and its manifest (what flows on a COMPARTMENTS_SOUP wire)."""

    path: str
    manifest: engine.Manifest


_scratch: set[str] = set()  # scratch soups written by this process
_scratch_lost = 0  # how many of them have vanished (temp folder emptied): part of every fingerprint


# Scratch soups kept in ComfyUI's temp folder; older ones are evicted (each is about one or
# three models in size and they filled disks). A wire holding an evicted one makes its node
# re-run (fingerprint_inputs) and the consumers say so clearly; Save Soup keeps one for good.
SCRATCH_KEEP = int(os.environ.get("COMPARTMENTS_SCRATCH_SOUPS", "4"))


def _scratch_path() -> str:
    folder = os.path.join(folder_paths.get_temp_directory(), "compartments_soup")
    os.makedirs(folder, exist_ok=True)
    _evict_scratch(folder, max(SCRATCH_KEEP - 1, 0))
    path = os.path.join(folder, f"soup-{uuid.uuid4().hex[:12]}.safetensors")
    _scratch.add(path)
    return path


def _evict_scratch(folder: str, keep: int) -> None:
    """Delete all but the ``keep`` newest scratch soups in ``folder`` (oldest first)."""
    soups = []
    for entry in os.scandir(folder):
        if entry.name.startswith("soup-") and entry.name.endswith(".safetensors"):
            try:
                soups.append((entry.stat().st_mtime, entry.path))
            except OSError:
                continue
    for _, path in sorted(soups)[: max(len(soups) - keep, 0)]:
        for p in [path, *stale_sidecars(path, None)]:  # the soup and its exact-sum sidecar
            try:
                os.unlink(p)
            except OSError:
                pass


def _fingerprint(*checkpoints: str) -> str:
    """Why re-run a cached soup node: a checkpoint it reads changed on disk, or a scratch soup vanished.

    ComfyUI's cache would otherwise hand out a soup averaged from an overwritten file, or a soup
    wire whose file was swept from the temp folder (downstream nodes would fail to open it).
    """
    global _scratch_lost
    gone = {p for p in _scratch if not os.path.exists(p)}
    if gone:
        _scratch.difference_update(gone)
        _scratch_lost += len(gone)
    stats = []
    for name in checkpoints:
        path = _find_member(name) if name else None
        st = os.stat(path) if path and os.path.exists(path) else None
        stats.append([name, st.st_size, st.st_mtime_ns] if st else [name, None])
    return json.dumps([stats, _scratch_lost])


def _soup_file(soup: SoupRef) -> str:
    if not os.path.exists(soup.path):
        raise _host.BadInput("soup", f"the soup file {soup.path} is gone (ComfyUI's temp folder was emptied).",
                             "queue the workflow again: the soup node re-runs; keep soups with Save Soup.")
    return soup.path


def _load(path: str):
    """MODEL, CLIP, VAE from a soup file; the running-sum tensors are skipped, not loaded.

    A soup of diffusion-model-only files (Flux and most DiTs) is loaded as core's UNETLoader
    loads one: MODEL only (CLIP and VAE are None; load them with the model's own loaders).
    """
    with Reader(path) as r:
        sd = {k: r.tensor(k).clone() for k in r.keys() if not k.startswith(engine.SUM_PREFIX)}
        metadata = dict(r.metadata)
    if layout_of(sd, os.path.basename(path)).diffusion_only:
        model = comfy.sd.load_diffusion_model_state_dict(sd)
        if model is None:
            raise RuntimeError(f"ComfyUI could not detect the diffusion model type of soup {os.path.basename(path)}.")
        return model, None, None
    out = comfy.sd.load_state_dict_guess_config(
        sd, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"),
        metadata=metadata)
    if out is None:
        raise RuntimeError(f"ComfyUI could not detect the model type of soup {os.path.basename(path)}.")
    return out[0], out[1], out[2]


def _outputs(path: str, manifest: engine.Manifest) -> io.NodeOutput:
    model, clip, vae = _load(path)
    return io.NodeOutput(SoupRef(path, manifest), model, clip, vae, manifest.describe())


def _soup_outputs() -> list:
    return [
        SoupType.Output(display_name="soup"),
        io.Model.Output(display_name="MODEL"),
        io.Clip.Output(display_name="CLIP"),
        io.Vae.Output(display_name="VAE"),
        io.String.Output(display_name="manifest"),
    ]


# Members: full checkpoints, or diffusion-model-only files (Flux and most DiTs ship that way).
MEMBER_FOLDERS = ("checkpoints", "diffusion_models")


def _member_files() -> list[str]:
    """Every member a soup node offers: models/checkpoints, then models/diffusion_models."""
    names: list[str] = []
    for folder in MEMBER_FOLDERS:
        names += [n for n in folder_paths.get_filename_list(folder) if n.endswith(".safetensors") and n not in names]
    return names


def _member_folder(name: str) -> str:
    """The folder a member name is found in (checkpoints first); checkpoints when it is in neither."""
    return next((f for f in MEMBER_FOLDERS if folder_paths.get_full_path(f, name)), MEMBER_FOLDERS[0])


def _find_member(name: str) -> str | None:
    return folder_paths.get_full_path(_member_folder(name), name)


def _member(name: str, input_name: str) -> str:
    """The path of a member named in ``input_name``, or BadInput naming the folder it is missing from."""
    return _host.resolve_file(_member_folder(name), name, input_name)


def _progress_for(path: str):
    with Reader(path) as r:
        n = sum(1 for k in r.keys() if not k.startswith(engine.SUM_PREFIX))
    return _host.progress(n)


class SoupBuild(io.ComfyNode):
    """Average N checkpoints fine-tuned from one base, streaming one tensor at a time."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsSoupBuild",
            display_name="Soup Checkpoints",
            category=CATEGORY,
            description="Diffusion Soup: stream-average checkpoints (models/checkpoints) or diffusion-model-only files "
                        "(models/diffusion_models, e.g. Flux fine-tunes), uniform or weighted. Memory stays near "
                        "one tensor, whatever the number of members.",
            inputs=[
                io.String.Input("members", multiline=True,
                                default="soup-member-a.safetensors\nsoup-member-b.safetensors\nsoup-member-c.safetensors",
                                tooltip="One checkpoint or diffusion-model file name per line, optionally ', weight' (default 1). "
                                        "Weights are renormalised to sum to 1."),
                io.Combo.Input("base", options=["first member", *_member_files()], default="first member",
                               tooltip="Where the tensors that are not souped (text encoder, VAE) come from."),
                io.Combo.Input("components", options=["unet", "all"], default="unet",
                               tooltip="unet: soup only the diffusion model (model.diffusion_model.* in a "
                                       "checkpoint, everything in a diffusion-model-only file); all: every float "
                                       "tensor."),
                io.Combo.Input("dtype", options=list(engine.OUT_DTYPES), default="same",
                               tooltip="Storage dtype of the souped tensors: same as the base, or fp16, bf16, fp32, fp8."),
                io.Boolean.Input("keep_sum", default=True,
                                 tooltip="Keep the exact running sum (a sidecar beside the soup, about 0.4x a "
                                         "member) so that add/remove are exact: bitwise equal to a rebuild."),
            ],
            outputs=_soup_outputs(),
        )

    @classmethod
    def fingerprint_inputs(cls, members: str, base: str, **kwargs) -> str:
        try:
            names = [n for n, _ in engine.parse_members(members)]
        except engine.SoupError:
            names = []  # execute reports the bad line
        return _fingerprint(*names, "" if base == "first member" else base)

    @classmethod
    def execute(cls, members: str, base: str, components: str, dtype: str, keep_sum: bool) -> io.NodeOutput:
        try:
            parsed = engine.parse_members(members)
        except engine.SoupError as e:
            raise _host.BadInput("members", str(e), "write 'name.safetensors' or 'name.safetensors, 2'.") from e
        if not parsed:
            raise _host.BadInput("members", "no checkpoint listed.", "list one file name per line.")
        shards = [engine.Shard(_member(n, "members"), w) for n, w in parsed]
        base_path = None if base == "first member" else _member(base, "base")
        out = _scratch_path()
        progress = _progress_for(str(shards[0].path))
        with _host.blame("members"):
            man = engine.build_soup(shards, out, base=base_path, components=components, dtype=dtype,
                                    keep_sum=keep_sum, progress=progress)
        return _outputs(out, man)


class SoupAddShard(io.ComfyNode):
    """Add a fine-tune to a soup, reading only the soup and the new shard."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsSoupAddShard",
            display_name="Soup Add Shard",
            category=CATEGORY,
            description="theta' = (W theta + w theta_new) / (W + w): one model of I/O, not N.",
            inputs=[
                SoupType.Input("soup",
                               tooltip="A soup (Soup Checkpoints, Load Soup, or another Add/Remove Shard)."),
                io.Combo.Input("checkpoint", options=_member_files(),
                               tooltip="The checkpoint or diffusion-model file to add as a new member (fine-tuned "
                                       "from the same base)."),
                io.Float.Input("weight", default=1.0, min=0.001, max=1000.0, step=0.01,
                               tooltip="Its weight relative to the members' weights (1 = the share of a uniform member)."),
            ],
            outputs=_soup_outputs(),
        )

    @classmethod
    def fingerprint_inputs(cls, checkpoint: str, **kwargs) -> str:
        return _fingerprint(checkpoint)

    @classmethod
    def execute(cls, soup: SoupRef, checkpoint: str, weight: float) -> io.NodeOutput:
        _host.check_numbers(cls, weight=weight)
        shard = _member(checkpoint, "checkpoint")
        src = _soup_file(soup)
        out = _scratch_path()
        with _host.blame("checkpoint"):
            man = engine.add_shard(src, shard, out, weight=weight, progress=_progress_for(src))
        return _outputs(out, man)


class SoupRemoveShard(io.ComfyNode):
    """Unlearn a shard: the result equals the soup rebuilt from the remaining members."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsSoupRemoveShard",
            display_name="Soup Remove Shard",
            category=CATEGORY,
            description="theta' = (W theta - w_j theta_j) / (W - w_j). Bitwise equal to a rebuild without the "
                        "shard when the manifest says exact. The shard is identified by content hash.",
            inputs=[
                SoupType.Input("soup",
                               tooltip="A soup (Soup Checkpoints, Load Soup, or Add/Remove Shard) that has the member."),
                io.Combo.Input("checkpoint", options=_member_files(),
                               tooltip="The member's file (a checkpoint or a diffusion-model-only file)."),
            ],
            outputs=_soup_outputs(),
        )

    @classmethod
    def fingerprint_inputs(cls, checkpoint: str, **kwargs) -> str:
        return _fingerprint(checkpoint)

    @classmethod
    def execute(cls, soup: SoupRef, checkpoint: str) -> io.NodeOutput:
        shard = _member(checkpoint, "checkpoint")
        src = _soup_file(soup)
        out = _scratch_path()
        with _host.blame("checkpoint"):
            man = engine.remove_shard(src, shard, out, progress=_progress_for(src))
        return _outputs(out, man)


class SoupSave(io.ComfyNode):
    """Copy a soup atomically into models/soups (temp file + rename: never a partial file)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsSoupSave",
            display_name="Save Soup",
            category=CATEGORY,
            description="Copies the soup (with its manifest) and its exact-sum sidecar into models/soups, atomically.",
            is_output_node=True,
            inputs=[
                SoupType.Input("soup",
                               tooltip="The soup to keep (scratch soups in ComfyUI's temp folder are evicted)."),
                io.String.Input("filename", default="soup", tooltip="File name inside models/soups."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a soup of the same name in models/soups."),
            ],
            outputs=[io.String.Output(display_name="saved")],
        )

    @classmethod
    def execute(cls, soup: SoupRef, filename: str, overwrite: bool) -> io.NodeOutput:
        target = _host.save_path(SOUPS, filename.strip() or "soup", "filename")
        if os.path.exists(target) and not overwrite:
            raise _host.BadInput("filename", f"{os.path.basename(target)} already exists in models/soups.",
                                 "choose another name or enable overwrite.")
        src = _soup_file(soup)
        with _host.blame("soup"):  # the soup and its exact-sum sidecar, each on disk before its rename
            engine.copy_soup(src, target, check=_host.check_interrupt)
        name = os.path.relpath(target, os.path.realpath(_host.folder_dirs(SOUPS)[0]))
        return io.NodeOutput(name, ui={"text": [f"saved models/soups/{name}"]})


class SoupLoad(io.ComfyNode):
    """Load a saved soup as MODEL/CLIP/VAE (and as a soup, to add or remove shards)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsSoupLoad",
            display_name="Load Soup",
            category=CATEGORY,
            description="Loads a saved soup from models/soups as MODEL, CLIP and VAE, with its manifest.",
            inputs=[io.Combo.Input("soup_name", options=folder_paths.get_filename_list(SOUPS),
                                   tooltip="A soup saved in models/soups (Save Soup).")],
            outputs=_soup_outputs(),
        )

    @classmethod
    def execute(cls, soup_name: str) -> io.NodeOutput:
        path = _host.resolve_file(SOUPS, soup_name, "soup_name")
        with _host.blame("soup_name"):
            man = engine.read_manifest(path)
        return _outputs(path, man)


class SoupInspect(io.ComfyNode):
    """The soup's manifest as text: members (content hashes), weights, base, exactness, history."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsSoupInspect",
            display_name="Inspect Soup",
            category=CATEGORY,
            description="The soup's manifest: members, content hashes, weights, base, dtype, exactness, history.",
            inputs=[
                SoupType.Input("soup", tooltip="A soup (Soup Checkpoints, Load Soup, or Add/Remove Shard)."),
                io.Boolean.Input("as_json", default=False,
                                 tooltip="Output the manifest as JSON instead of readable text."),
            ],
            outputs=[io.String.Output(display_name="manifest")],
        )

    @classmethod
    def execute(cls, soup: SoupRef, as_json: bool) -> io.NodeOutput:
        man = engine.read_manifest(_soup_file(soup))
        return io.NodeOutput(man.to_json() if as_json else man.describe())


class SoupModels(io.ComfyNode):
    """Soup MODEL inputs lazily with ModelPatcher patches: quick in-graph experiments, no file."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsSoupModels",
            display_name="Soup Models (in graph)",
            category=CATEGORY,
            description="Weighted average of up to 4 MODELs as patches on the first (like a chain of "
                        "ModelMergeSimple). Nothing is computed until sampling; no manifest, no file.",
            inputs=[
                io.Model.Input("model_1",
                               tooltip="MODEL 1 to average (fine-tuned from the same base as the others)."),
                io.Model.Input("model_2",
                               tooltip="MODEL 2 to average (fine-tuned from the same base as the others)."),
                io.Model.Input("model_3", optional=True,
                               tooltip="MODEL 3 to average (fine-tuned from the same base as the others); optional."),
                io.Model.Input("model_4", optional=True,
                               tooltip="MODEL 4 to average (fine-tuned from the same base as the others); optional."),
                io.Float.Input("weight_1", default=1.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="Weight of model_1; weights are renormalised over the connected models."),
                io.Float.Input("weight_2", default=1.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="Weight of model_2; weights are renormalised over the connected models."),
                io.Float.Input("weight_3", default=1.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="Weight of model_3; weights are renormalised over the connected models."),
                io.Float.Input("weight_4", default=1.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="Weight of model_4; weights are renormalised over the connected models."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model_1, model_2, model_3=None, model_4=None, weight_1: float = 1.0, weight_2: float = 1.0,
                weight_3: float = 1.0, weight_4: float = 1.0) -> io.NodeOutput:
        _host.check_numbers(cls, weight_1=weight_1, weight_2=weight_2, weight_3=weight_3, weight_4=weight_4)
        pairs = [(m, w) for m, w in ((model_1, weight_1), (model_2, weight_2), (model_3, weight_3),
                                     (model_4, weight_4)) if m is not None]
        if sum(w for _, w in pairs) <= 0:
            raise _host.BadInput("weight_1", "all weights are 0.", "give one a weight > 0.")
        return io.NodeOutput(soup_as_patches(pairs))


def soup_as_patches(pairs: list[tuple[Any, float]]) -> Any:
    """Weighted mean of MODELs as patches on a clone of the first: (W theta + w theta_i) / (W + w), one
    member at a time, so nothing is computed until ComfyUI loads the model for sampling."""
    m = pairs[0][0].clone()
    total = pairs[0][1]
    for other, w in pairs[1:]:
        if w == 0:
            continue
        keep = total / (total + w)  # running mean: (total*theta + w*theta_i) / (total + w)
        kp = other.get_key_patches("diffusion_model.")
        for k in kp:
            m.add_patches({k: kp[k]}, 1.0 - keep, keep)
        total += w
    return m


class SoupModelsAny(io.ComfyNode):
    """Soup Models (in graph) with as many MODEL inputs as the user connects (``io.Autogrow``).

    Registered only on releases whose public V3 API has ``io.Autogrow`` (0.8 and later); on older
    ones the four-input Soup Models (in graph) is the same operation. Its input ids
    (``models.model0``, ...) are Autogrow's, so workflows with it need such a release.
    """

    MAX_MODELS = 16
    V3_FEATURES = ("Autogrow",)  # see nodes.NEEDS_NEWER_V3

    @classmethod
    def define_schema(cls) -> io.Schema:
        template = io.Autogrow.TemplatePrefix(io.Model.Input("model"), prefix="model", min=2, max=cls.MAX_MODELS)
        return io.Schema(
            node_id="CompartmentsSoupModelsAny",
            display_name="Soup Models (any number)",
            category=CATEGORY,
            description="Weighted average of 2 to 16 MODELs as patches on the first: connect a model and the "
                        "next input appears. Nothing is computed until sampling; no manifest, no file. "
                        "Needs a ComfyUI with Autogrow inputs (0.8+); elsewhere use Soup Models (in graph).",
            inputs=[
                io.Autogrow.Input("models", template=template, tooltip="the MODELs to average, in order"),
                io.String.Input("weights", default="", tooltip="one weight per connected model, in order, "
                                "e.g. '2, 1, 1' (empty: equal weights)"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, models: dict, weights: str = "") -> io.NodeOutput:
        ordered = [models[k] for k in sorted(models, key=_ordinal) if models[k] is not None]
        if len(ordered) < 2:
            raise _host.BadInput("models", f"{len(ordered)} model(s) connected.", "connect at least two MODELs.")
        try:
            ws = engine.parse_weights(weights, len(ordered))
        except engine.SoupError as e:
            raise _host.BadInput("weights", str(e) + ".",
                                 "write one weight per connected model, e.g. '2, 1, 1', or leave it empty.") from e
        return io.NodeOutput(soup_as_patches(list(zip(ordered, ws, strict=True))))


def _ordinal(name: str) -> int:
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits) if digits else 0


NODES = [SoupBuild, SoupAddShard, SoupRemoveShard, SoupSave, SoupLoad, SoupInspect, SoupModels, SoupModelsAny]
