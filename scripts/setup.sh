#!/usr/bin/env bash
# Set-up for development and tests: a fresh .venv with torch, the pack (editable, as
# `compartments`) and its test extra, plus the requirements of the ComfyUI checkout that
# tiers 2-3 run against (COMFYUI_PATH, else ~/ComfyUI) when there is one. ComfyUI itself is
# never installed here: users bring their own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
comfy="${COMFYUI_PATH:-$HOME/ComfyUI}"
extra=()
if [ -f "$comfy/requirements.txt" ]; then
  extra=(-r "$comfy/requirements.txt")
  echo "setup: also installing the requirements of the ComfyUI at $comfy (for test tiers 2-3)"
else
  echo "setup: no ComfyUI at $comfy: tiers 2-3 will be skipped (set COMFYUI_PATH to run them)"
fi
# torch for the tests only: the pack never depends on torch (ComfyUI brings its own). The
# three are pinned together because ComfyUI imports torchaudio, and the registry's newest
# torchaudio (2.11) refuses to load beside a newer torch built for another CUDA.
TORCH=(torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0)
.venv/bin/python -m pip install --quiet "${TORCH[@]}" -e ".[test]" "${extra[@]}"
echo "setup: done. Run the tests with: .venv/bin/python -m pytest"
