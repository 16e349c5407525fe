"""Tiny models in real key layouts, built from configs with seeded random weights.

The test suite and ``python -m compartments demo`` use these instead of downloading
anything. Every builder is deterministic and caches its files under :func:`cache_dir`,
keyed by a hash of its config, so the second run costs nothing.

Each module here that defines ``prepare(models_dir, input_dir) -> dict`` contributes the
files its capability's shipped workflows need (``prepare_all`` calls them all).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pkgutil
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """``$COMPARTMENTS_CACHE`` or ``<tmp>/compartments-tiny``."""
    root = os.environ.get("COMPARTMENTS_CACHE") or os.path.join(tempfile.gettempdir(), "compartments-tiny")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(name: str, config: dict, build: Callable[[Path], None]) -> Path:
    """Return ``cache_dir()/<name>-<hash>``; build it atomically (temp + rename) if missing.

    ``build(tmp_path)`` writes a file or a folder at ``tmp_path``.
    """
    suffix = Path(name).suffix
    target = cache_dir() / f"{Path(name).stem}-{config_key(config)}{suffix}"
    if target.exists():
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp{suffix}")
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # a folder another process (a parallel test run) built meanwhile: use theirs
            if not target.exists():
                raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return target


def link_into(src: Path, dst: Path) -> Path:
    """Place a cached file/folder into a models folder (symlink, or a copy where links fail)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        return dst
    try:
        os.symlink(src, dst, target_is_directory=src.is_dir())
    except OSError:
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    return dst


def prepare_all(models_dir: Path, input_dir: Path) -> dict:
    """Run every capability's ``prepare``; return what they report (names of the files placed)."""
    report: dict = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        prep = getattr(module, "prepare", None)
        if prep is not None:
            report[info.name] = prep(Path(models_dir), Path(input_dir))
    return report
