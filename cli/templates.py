"""``python -m compartments thumbnails SHOTS``: template-browser thumbnails from the browser tier's screenshots.

ComfyUI's template browser lists a pack's ``workflows/*.json`` under the pack's name and shows
``workflows/<name>.jpg`` beside each (the frontend asks for ``.jpg``). The browser tier saves a
screenshot of every workflow after it ran in the real editor (``$TMPDIR/compartments-browser/
<release>/``); this command crops the editor's chrome off and writes the thumbnails.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from ..atomic import write_bytes
from .client import PACK

WORKFLOWS = PACK / "workflows"
WIDTH = 640
# The editor's side bar and tab bar, in screenshot pixels at the browser tier's 1600x1000 window.
CROP_LEFT, CROP_TOP = 70, 80


def thumbnail(png: Path) -> bytes:
    """A JPEG of the graph area of one screenshot, ``WIDTH`` pixels wide."""
    from PIL import Image

    with Image.open(png) as img:
        img = img.convert("RGB")
        img = img.crop((CROP_LEFT, CROP_TOP, img.width, img.height))
        img = img.resize((WIDTH, round(img.height * WIDTH / img.width)), Image.LANCZOS)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=82, optimize=True)
    return out.getvalue()


def _cmd(args: argparse.Namespace) -> int:
    shots = Path(args.shots)
    written = 0
    for wf in sorted(WORKFLOWS.glob("*.json")):
        png = shots / f"{wf.stem}.png"
        if not png.is_file():
            print(f"no screenshot for {wf.stem} in {shots}: kept its thumbnail")
            continue
        write_bytes(wf.with_suffix(".jpg"), thumbnail(png))
        written += 1
    print(f"wrote {written} thumbnails to {WORKFLOWS}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("thumbnails", help="write workflows/<name>.jpg from the browser tier's screenshots")
    p.add_argument("shots", help="a screenshot folder, e.g. $TMPDIR/compartments-browser/0.8.0")
    p.set_defaults(func=_cmd)
