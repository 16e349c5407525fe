"""Safetensors headers checked against the file before anything is allocated.

Every loader of the pack (soup reader, motion modules, temporal layers, optimizer state,
open_clip weights) calls this first: a header may lie (a 147-byte file claiming a 3 GiB
tensor, offsets past the end, overlapping tensors, shapes that overflow or do not match their
byte range, unknown dtypes, a huge header), and each case becomes one :class:`HeaderError`
naming the file and the tensor, in memory bounded by the header the file really holds.
Plain Python: no torch, no ComfyUI.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import BinaryIO

from .errors import CompartmentsError

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 * 1024 * 1024


class HeaderError(CompartmentsError):
    """The file is not a well-formed safetensors file (the message names the file and what is wrong)."""


def read_header(f: BinaryIO, path: str | os.PathLike,
                dtypes: set[str] | None = None) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """Parse and check the header of the open file ``f``: (metadata, {key: (dtype, shape, start, end)}).

    ``dtypes`` limits the accepted dtype codes (default: every code safetensors defines).
    Offsets are absolute. The file position is left after the header.
    """
    path = Path(path)
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    raw = f.read(8)
    if len(raw) != 8:
        raise HeaderError(f"{path}: too short to be a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER or 8 + n > size:
        raise HeaderError(f"{path}: the header claims {n} bytes but the file holds {size} "
                          "(truncated, or not a safetensors file)")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeaderError(f"{path}: unreadable safetensors header ({e})") from None
    return _parse_header(path, header, 8 + n, size, dtypes or set(ITEMSIZE))


def check_file(path: str | os.PathLike) -> dict[str, str]:
    """Check ``path``'s header (see :func:`read_header`); return its metadata."""
    try:
        with open(path, "rb") as f:
            return read_header(f, path)[0]
    except IsADirectoryError:
        raise HeaderError(f"{path}: is a folder, not a safetensors file") from None


def _parse_header(path: Path, header: object, base: int, size: int, dtypes: set[str]) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """Check every entry against the file's real size before anything is allocated.

    A header may lie: offsets past the end, overlapping tensors, shapes whose product does not
    match the byte range or overflows, negative sizes, unknown dtypes. Each is a HeaderError
    naming the tensor, so memory is bounded by the bytes actually in the file.
    """
    if not isinstance(header, dict):
        raise HeaderError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise HeaderError(f"{path}: __metadata__ must map strings to strings")
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for key, info in header.items():
        where = f"{path}: tensor '{key[:200]}'"
        if not isinstance(info, dict):
            raise HeaderError(f"{where}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in dtypes:
            raise HeaderError(f"{where} has unsupported dtype {str(dtype)[:40]}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                 for d in shape)):
            raise HeaderError(f"{where}: shape {str(shape)[:80]} is not a list of sizes >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise HeaderError(f"{where}: data_offsets {str(offsets)[:80]} are not a byte range")
        a, b = offsets
        numel = 1
        for d in shape:
            numel *= d
        if numel * ITEMSIZE[dtype] != b - a:
            raise HeaderError(f"{where}: shape {shape} of {dtype} needs {numel * ITEMSIZE[dtype]} bytes, "
                              f"its byte range holds {b - a}")
        if base + b > size:
            raise HeaderError(f"{where} ends at byte {base + b} but the file holds {size} (truncated or lying header)")
        entries[key] = (dtype, tuple(shape), base + a, base + b)
    prev_end, prev_key = base, None
    for key, (_, _, start, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if start < prev_end and end > start:
            raise HeaderError(f"{path}: tensors '{prev_key}' and '{key[:200]}' overlap in the file")
        if end > start:
            prev_end, prev_key = end, key
    return meta, entries
