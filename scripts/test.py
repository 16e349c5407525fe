"""The README's test command: tier 1 once, then tiers 2-3 against every ComfyUI release.

    .venv/bin/python scripts/test.py [PYTEST ARGS]

Each release under ../shared/comfyui (or the one checkout COMFYUI_PATH names) runs in its own
virtualenv made by scripts/setup.sh; the summary names, per release, the ComfyUI version, the
tiers and their counts, and the last line is ``total: N passed, N failed, N skipped``. Exit 1
when any release or tier fails. ``.venv/bin/python -m pytest -m unit`` runs tier 1 alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hosts import test  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(test(sys.argv[1:]))
