"""Benchmark: streaming soup vs a naive load-everything soup vs a plain read of the same files.

Members are whole checkpoints in the real key layouts and shapes, SD1.5 (UNet, CLIP-L, VAE: 1,131
tensors, 2.1 GB) and SDXL (UNet, CLIP-L, OpenCLIP bigG, VAE: 6.9 GB), fp16, generated as one seeded
base plus a small per-member delta, as fine-tunes of one base are (under --dir; removed after the
run unless --keep). Every variant
runs in its own subprocess so that its peak RSS (VmHWM of that process) is its own.
Before each variant the machine is synced and the member files are dropped from the page
cache with posix_fadvise(DONTNEED), so every variant reads them COLD from disk (``--warm``
skips that). Variants: ``read`` (a plain buffered read, as ``cat``: the issue's baseline),
``read_direct`` (O_DIRECT: the disk's own rate, without the page-cache copy that makes a buffered
read CPU-bound on 2 cores; the soup reads members this way where the filesystem allows), ``stream`` (the soup the nodes and the
CLI write: exact float64 running sum stored, fsync before the rename), ``stream_nosum``
(keep_sum=false), ``naive`` (load every member, then average; first repeat only) and
``remove`` (remove the last member from the N soup).

Each N is measured ``--repeat`` times (default 3), every repeat a read followed by the
soups it is compared with, so the ratios are paired and the virtual disk's drift cancels;
the figures are medians and ``runs`` lists every repeat. One JSON line per figure:

  {"benchmark": "soup", "figure": "peak_rss", "variant": "stream", "n": 8, "value": ..., "unit": "GiB"}

Figures: peak_rss (GiB), throughput (GiB of member data read per second), <variant>_vs_read
(target >= 0.6) and <variant>_vs_read_direct, and remove_ratio = time(remove one shard from the N soup) / time(re-soup
the N-1 others), target <= 0.85 at N = 4 and 3/N at N = 8. Every line names its ``layout``. ``--quick`` keeps the layouts but
uses the tiny fixtures' UNets, N = 2, 4; ``--layout sd15`` measures one layout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1024 ** 3


#: full-size UNet configs in the openaimodel layout (``tiny.sd15.unet_shapes`` writes their keys)
SD15_UNET = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attention": [1, 1, 1, 0],
             "context_dim": 768, "time_embed_dim": 1280}
SDXL_UNET = {"model_channels": 320, "channel_mult": [1, 2, 4], "num_res_blocks": 2, "context_dim": 2048,
             "adm_in_channels": 2816, "time_embed_dim": 1280, "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10}
LAYOUTS = ("sd15", "sdxl")


def layout_shapes(layout: str, quick: bool) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a single-file checkpoint in ``layout``: UNet, text encoder(s) and VAE.

    Full size: SD1.5 (UNet, CLIP-L, VAE) and SDXL base (UNet, CLIP-L, OpenCLIP bigG, VAE).
    ``quick``: the same key layouts with the tiny fixtures' UNets (text encoders and VAE stay real).
    """
    from compartments.tiny import sd15, sdxl

    if layout == "sd15":
        unet = sd15.UNET_CONFIG if quick else SD15_UNET
        parts = [sd15.unet_shapes(unet), sd15.vae_shapes(), sd15.clip_shapes()]
    else:
        unet = sdxl.UNET_CONFIG if quick else SDXL_UNET
        parts = [sd15.unet_shapes(unet), sd15.vae_shapes(),
                 sd15.clip_shapes(prefix="conditioner.embedders.0.transformer.text_model."), sdxl.clip_g_shapes()]
    return [item for part in parts for item in part]


def member_path(folder: Path, layout: str, quick: bool, i: int) -> Path:
    return folder / f"bench-{layout}{'-quick' if quick else ''}-member-{i}.safetensors"


def make_member(folder: Path, layout: str, quick: bool, i: int) -> Path:
    """Member ``i``: one seeded fp16 base plus this member's small delta (1/20 of the base's scale),
    as fine-tunes of one base are; every member has the same keys, shapes and order."""
    import torch

    from compartments.soup.st import Planned, atomic_writer

    path = member_path(folder, layout, quick, i)
    if path.exists():
        return path
    plan = [Planned(k, "F16", shape) for k, shape in layout_shapes(layout, quick)]
    base, delta = torch.Generator().manual_seed(7), torch.Generator().manual_seed(1000 + i)
    with atomic_writer(path, plan, {"bench": f"soup-{layout}"}) as w:
        for p in plan:
            t = torch.randn(p.shape, generator=base) * 0.02
            t += torch.randn(p.shape, generator=delta) * 0.001
            w.write(p.key, t.to(torch.float16))
            del t
    return path


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        if not p.exists():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ------------------------------------------------------------------ variants (child side)
def v_read(paths: list[Path], out: Path) -> int:
    buf = bytearray(64 * 1024 * 1024)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def v_read_direct(paths: list[Path], out: Path) -> int:
    """The disk's own rate: O_DIRECT reads into one aligned 64 MiB buffer (no page-cache copy)."""
    import mmap

    buf = mmap.mmap(-1, 64 * 1024 * 1024)  # page aligned, as direct I/O needs
    total = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
    return total


def v_stream(paths: list[Path], out: Path) -> int:
    from compartments.soup import build_soup

    build_soup(paths, out)
    return sum(p.stat().st_size for p in paths)


def v_stream_nosum(paths: list[Path], out: Path) -> int:
    from compartments.soup import build_soup

    build_soup(paths, out, keep_sum=False)
    return sum(p.stat().st_size for p in paths)


def v_naive(paths: list[Path], out: Path) -> int:
    """What a merge script does: load every member whole, then average."""
    import torch
    from safetensors.torch import load_file, save_file

    sds = [load_file(str(p)) for p in paths]
    soup = {}
    for k in sds[0]:
        acc = torch.zeros(sds[0][k].shape, dtype=torch.float32)
        for sd in sds:
            acc += sd[k].float()
        soup[k] = (acc / len(sds)).to(sds[0][k].dtype)
    save_file(soup, str(out))
    return sum(p.stat().st_size for p in paths)


def v_mecha(paths: list[Path], out: Path) -> int:
    """sd-mecha's n_average (pip install sd-mecha; never a dependency of the pack), its defaults:
    float32 merge, float16 output, streaming with its own thread pool and buffers."""
    import functools

    import sd_mecha
    import tqdm

    recipe = sd_mecha.n_average(*[sd_mecha.model(str(p)) for p in paths])
    sd_mecha.merge(recipe, output=str(out), tqdm=functools.partial(tqdm.tqdm, disable=True))
    return sum(p.stat().st_size for p in paths)


def v_remove(paths: list[Path], out: Path) -> int:
    from compartments.soup import remove_shard

    remove_shard(out, paths[-1], out.with_name(out.stem + "-removed.safetensors"))
    return out.stat().st_size + paths[-1].stat().st_size


VARIANTS = {"read": v_read, "read_direct": v_read_direct, "stream": v_stream, "stream_nosum": v_stream_nosum, "naive": v_naive, "remove": v_remove,
            "mecha": v_mecha}


def have_mecha() -> bool:
    try:
        import sd_mecha  # noqa: F401
    except ImportError:
        return False
    return True


def peak_rss() -> int:
    """VmHWM of this process image, in bytes.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the pre-exec high-water mark of
    the forked parent into it, which would charge the benchmark driver to every variant.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.paths]
    if args.child != "read":  # import torch & co. before the clock starts; the read variant needs none
        import safetensors.torch  # noqa: F401

        import compartments.soup  # noqa: F401
        if args.child == "mecha":
            import sd_mecha  # noqa: F401
    base = peak_rss()
    t0 = time.perf_counter()
    nbytes = VARIANTS[args.child](paths, Path(args.out))
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "bytes": nbytes, "peak_rss": peak_rss(), "baseline_rss": base}))
    return 0


# ------------------------------------------------------------------ parent side
def run_variant(name: str, paths: list[Path], out: Path, warm: bool, extra_cold: list[Path] = (),
                fresh_ids: bool = False) -> dict:
    """One variant in its own process; ``fresh_ids``: members are hashed as on a first soup (the
    member-id cache under the benchmark folder is emptied first), else ids cached earlier are used."""
    os.sync()  # the previous variant's unsynced output must not be flushed on this one's clock
    ids = out.parent / "member-ids.json"
    if fresh_ids:
        ids.unlink(missing_ok=True)
    if not warm:
        drop_cache([*paths, *extra_cold, *out.parent.glob(out.name + ".*.exact")])
    cmd = [sys.executable, __file__, "--child", name, "--out", str(out), "--paths", *map(str, paths)]
    # torch's own default (one thread per core), as inside ComfyUI; OMP_NUM_THREADS overrides.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)),
               COMPARTMENTS_ID_CACHE=str(ids))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"variant {name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def emit(**fields) -> None:
    print(json.dumps({"benchmark": "soup", **fields}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny-fixture UNets in the same layouts, N = 2, 4")
    ap.add_argument("--layout", choices=LAYOUTS, nargs="+", default=list(LAYOUTS),
                    help="checkpoint layouts to measure (default: both)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "compartments-bench-soup")
    ap.add_argument("--n", type=int, nargs="+", help="member counts (default 2 4 8, quick 2 4)")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache between variants")
    ap.add_argument("--keep", action="store_true", help="keep the generated members for the next run")
    ap.add_argument("--repeat", type=int, default=3, help="paired repeats per N; figures are medians")
    ap.add_argument("--skip-naive-above", type=int, default=8, help="skip the naive variant above this N")
    ap.add_argument("--no-mecha", action="store_true", help="skip sd-mecha even where it is installed")
    ap.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    ns = args.n or ([2, 4] if args.quick else [4, 8])
    args.dir.mkdir(parents=True, exist_ok=True)
    for layout in args.layout:
        members = [make_member(args.dir, layout, args.quick, i) for i in range(max(ns))]
        measure(args, layout, members, ns)
        if not args.keep:
            for m in members:
                m.unlink(missing_ok=True)
    return 0


def measure(args: argparse.Namespace, layout: str, members: list[Path], ns: list[int]) -> None:
    """Every variant for each N on ``members`` (one layout), one JSON line per figure."""
    size = members[0].stat().st_size
    cache = "warm page cache" if args.warm else "cold (posix_fadvise DONTNEED before each variant)"
    common = {"layout": layout, "tensors": len(layout_shapes(layout, args.quick)), "member_gib": round(size / GiB, 3),
              "member_mb": round(size / 1e6), "cache": cache,
              "cpu_threads": int(os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))), "repeats": args.repeat}
    streams = ("stream", "stream_nosum") + (("mecha",) if have_mecha() and not args.no_mecha else ())
    for n in ns:
        paths = members[:n]
        soup = args.dir / f"soup-{n}.safetensors"
        rest = args.dir / f"rest-{n}.safetensors"
        runs: dict[str, list[dict]] = {}
        ratios: dict[str, list[float]] = {name: [] for name in streams}
        direct_ratios: dict[str, list[float]] = {}
        removes: list[tuple[dict, dict]] = []
        # Repeats, each a read right before the soups it is compared with: the virtual disk's
        # speed drifts by 2x over minutes, and a paired ratio cancels most of that drift.
        for rep in range(args.repeat):
            names = ["read", "read_direct", *streams] + (["naive"] if rep == 0 and n <= args.skip_naive_above else [])
            for name in names:
                out = soup if name == "stream" else args.dir / f"scratch-{name}.safetensors"
                r = run_variant(name, paths, out, args.warm, fresh_ids=name in ("stream", "stream_nosum"))
                runs.setdefault(name, []).append(r)
                if name == "stream" and rep == 0:
                    sizes = soup_sizes(soup, size)
                if name in streams:
                    ratios[name].append(_tp(r) / _tp(runs["read"][-1]))
                    direct_ratios.setdefault(name, []).append(_tp(r) / _tp(runs["read_direct"][-1]))
            if n >= 3:  # member ids are cached by now (the soup above hashed them), as after any first soup
                rem = run_variant("remove", paths, soup, args.warm, [soup])
                soup.with_name(soup.stem + "-removed.safetensors").unlink(missing_ok=True)  # disk: SDXL soups are 21 GB
                resoup = run_variant("stream", paths[:-1], rest, args.warm)
                removes.append((rem, resoup))
            for p in [*args.dir.glob("scratch-*"), rest, *args.dir.glob(rest.name + ".*.exact"),
                      *args.dir.glob(soup.stem + "-removed.safetensors.*.exact")]:
                p.unlink(missing_ok=True)
        for name, rs in runs.items():
            peak = max(r["peak_rss"] for r in rs)
            emit(figure="peak_rss", variant=name, n=n, value=round(peak / GiB, 3), unit="GiB",
                 ratio_to_member=round(peak / size, 3), baseline_gib=round(rs[0]["baseline_rss"] / GiB, 3),
                 target="< 1.5 x member at N=8" if name == "stream" else "", **common)
            tps = sorted(_tp(r) / GiB for r in rs)
            emit(figure="throughput", variant=name, n=n, value=round(statistics.median(tps), 3), unit="GiB/s",
                 runs=[round(t, 3) for t in tps], seconds=round(statistics.median(r["seconds"] for r in rs), 2),
                 **common)
        for name in streams:
            vals = sorted(ratios[name])
            emit(figure=f"{name}_vs_read", n=n, value=round(statistics.median(vals), 3), unit="ratio",
                 runs=[round(v, 3) for v in vals], target=">= 0.6" if name == "stream" else "",
                 read="buffered, 64 MiB readinto (as cat)", **common)
            vals = sorted(direct_ratios[name])
            emit(figure=f"{name}_vs_read_direct", n=n, value=round(statistics.median(vals), 3), unit="ratio",
                 runs=[round(v, 3) for v in vals], read="O_DIRECT (the disk's own rate)", **common)
        emit(figure="soup_file_ratio", n=n, value=sizes["soup"], unit="x member", target="1 (the file ComfyUI loads)",
             **common)
        emit(figure="sidecar_ratio", n=n, value=sizes["sidecar"], unit="x member", target="<= 0.75", **common)
        if "mecha" in runs:
            st, me = runs["stream"], runs["mecha"]
            emit(figure="vs_sd_mecha", n=n, unit="ratio",
                 value=round(statistics.median(r["seconds"] for r in me) / statistics.median(r["seconds"] for r in st), 3),
                 rss_ratio=round(max(r["peak_rss"] for r in me) / max(r["peak_rss"] for r in st), 3),
                 note="sd-mecha n_average time / exact soup time (> 1: the soup is faster); rss_ratio likewise",
                 **common)
        if removes:
            vals = sorted(rem["seconds"] / resoup["seconds"] for rem, resoup in removes)
            emit(figure="remove_seconds", n=n, value=round(statistics.median(r["seconds"] for r, _ in removes), 2),
                 unit="s", peak_rss_gib=round(max(r["peak_rss"] for r, _ in removes) / GiB, 3), **common)
            emit(figure="remove_ratio", n=n, value=round(statistics.median(vals), 3), unit="ratio",
                 runs=[round(v, 3) for v in vals], target=f"<= {0.85 if n == 4 else 3 / n:.3f}",
                 resoup_seconds=round(statistics.median(r["seconds"] for _, r in removes), 2), **common)
        soup.unlink(missing_ok=True)
        for p in args.dir.glob("*.exact"):
            p.unlink()


def soup_sizes(soup: Path, member: int) -> dict:
    """The soup file and its exact-sum sidecar, each as a multiple of one member's size."""
    side = sum(p.stat().st_size for p in soup.parent.glob(soup.name + ".*.exact"))
    return {"soup": round(soup.stat().st_size / member, 3), "sidecar": round(side / member, 3)}


def _tp(r: dict) -> float:
    return r["bytes"] / r["seconds"]


if __name__ == "__main__":
    raise SystemExit(main())
