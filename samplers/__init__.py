"""Sampling algorithms as pure tensor math (no ComfyUI imports)."""
