#!/usr/bin/env bash
# Set-up for development and tests, everything the README's test command needs:
#  1. .venv: torch (for the tests only), this pack (editable, importable as `compartments`) and
#     its test extra. Tier 1 runs here.
#  2. .venv-comfyui/<release>: one virtualenv per ComfyUI release under ../shared/comfyui (or the
#     checkout COMFYUI_PATH names), with that release's requirements.txt layered over .venv.
#     Tiers 2-3 run there. ComfyUI itself is never installed: its source tree is used in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
# torch for the tests only: the pack never depends on torch (ComfyUI brings its own). The three
# are pinned together, once, here: ComfyUI imports torchaudio, and the registry's newest
# torchaudio refuses to load beside a torch built for another CUDA.
TORCH=(torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0)
.venv/bin/python -m pip install --quiet --disable-pip-version-check "${TORCH[@]}" -e ".[test]"
.venv/bin/python scripts/hosts.py setup
# 3. The browser tier's Chromium: Debian's chromium and chromium-driver (Selenium drives them; nothing
#    downloads a browser). Installed where apt may be used (root, or sudo without a password);
#    elsewhere the tier skips and says why.
if ! command -v chromedriver >/dev/null 2>&1 || ! { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }; then
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo -n")
    echo "setup: installing chromium and chromium-driver (apt) for the browser tier"
    if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ||
           { $SUDO apt-get update -q >/dev/null 2>&1 &&
             $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; }; then
      echo "setup: could not install chromium: the browser tier will skip"
    fi
  else
    echo "setup: no chromium/chromedriver and no apt rights: the browser tier will skip (apt-get install chromium chromium-driver)"
  fi
fi
echo "setup: done. Run the tests with: .venv/bin/python scripts/test.py"
