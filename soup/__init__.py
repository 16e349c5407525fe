"""Streaming weight soups (Diffusion Soup, arXiv 2406.08431) over safetensors files.

Plain torch + safetensors-format code: no ComfyUI import, usable from the command line
(``python -m compartments soup ...``) on a server with no ComfyUI.
"""

from .engine import (
    OUT_DTYPES,
    Shard,
    SoupError,
    add_shard,
    build_soup,
    check_compatible,
    content_id,
    copy_soup,
    parse_members,
    parse_weights,
    read_manifest,
    read_sums,
    remove_shard,
)
from .manifest import META_KEY, SUM_PREFIX, UNET_PREFIX, Manifest, Member

__all__ = [
    "META_KEY", "OUT_DTYPES", "SUM_PREFIX", "UNET_PREFIX", "Manifest", "Member", "Shard", "SoupError", "add_shard",
    "build_soup", "check_compatible", "content_id", "copy_soup", "parse_members", "parse_weights", "read_manifest", "read_sums",
    "remove_shard",
]
