"""Temporal layers (Video LDM) for image UNets: layers, AnimateDiff/own formats, injection, context windows.

Plain torch and safetensors; never imports ComfyUI. See README.md, section "Temporal layers".
"""

from .context import WindowError, blend_weights, check_windows, fuse, run_windowed, windows
from .formats import (
                      FormatError,
                      MotionInfo,
                      build_animatediff,
                      detect,
                      diffusers_to_original,
                      hotshot_to_original,
                      load_layers,
                      load_motion_module,
                      original_to_diffusers,
                      original_to_hotshot,
                      save_layers,
)
from .inject import (
                      LayoutMismatch,
                      MotionSlot,
                      check_compatible,
                      check_frames,
                      frames_per_video,
                      make_apply,
                      parse_alpha_overrides,
                      timestep_embed_handler,
)
from .layers import (
                      LAYOUTS,
                      SD15,
                      SDXL,
                      TINY_SD15,
                      AlphaBlender,
                      Layout,
                      MotionModule,
                      Slot,
                      TemporalAttentionBlock,
                      TemporalConvBlock,
                      TemporalLayer,
                      layout_of_unet,
                      make_layout,
                      sinusoidal_positions,
)

TemporalStack = MotionModule  # the Video LDM name for the container

__all__ = [
    "LAYOUTS", "SD15", "SDXL", "TINY_SD15", "AlphaBlender", "FormatError", "Layout", "LayoutMismatch", "MotionInfo",
    "MotionModule", "MotionSlot", "Slot", "TemporalAttentionBlock", "TemporalConvBlock", "TemporalLayer",
    "TemporalStack", "WindowError", "blend_weights", "build_animatediff", "check_compatible", "check_frames",
    "check_windows", "detect", "diffusers_to_original", "frames_per_video", "fuse", "hotshot_to_original", "layout_of_unet", "load_layers",
    "load_motion_module", "make_apply", "make_layout", "original_to_diffusers", "original_to_hotshot",
    "parse_alpha_overrides",
    "run_windowed", "save_layers", "sinusoidal_positions", "timestep_embed_handler", "windows",
]
