"""safetensors files read without torch: the JSON header (tensor name -> dtype, shape,
offsets), checked against the file's size, and a base model's 2-D weight shapes."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from hatrack.errors import HatrackError

# bytes per element of the dtypes whose size a header can be checked against
DTYPE_WIDTH = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100 << 20


class SafetensorsHeaderError(HatrackError):
    """A safetensors file whose header is missing, malformed or lies about its data."""


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a safetensors file, every tensor's offsets checked to lie inside the
    file and to match its shape. Raises SafetensorsHeaderError naming the file."""
    path = Path(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise SafetensorsHeaderError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise SafetensorsHeaderError(f"{path}: safetensors header length {n} exceeds the file")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SafetensorsHeaderError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(f"{path}: safetensors header is not an object")
    data_len = size - 8 - n
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            shape = [int(dim) for dim in meta["shape"]]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsHeaderError(f"{path}: tensor {key!r} has no shape or offsets") from None
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_len):
            raise SafetensorsHeaderError(
                f"{path}: tensor {key!r} claims bytes {start}..{end} but the file holds {data_len}"
            )
        width = DTYPE_WIDTH.get(meta.get("dtype"))
        if width is not None:
            count = 1
            for dim in shape:
                count *= dim
            if count * width != end - start:
                raise SafetensorsHeaderError(
                    f"{path}: tensor {key!r} shape {shape} does not match its {end - start} bytes"
                )
    return header


def tensor_entries(header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The header without its `__metadata__` entry."""
    return {key: meta for key, meta in header.items() if key != "__metadata__"}


def linear_shapes(folder: Path) -> dict[str, tuple[int, int]]:
    """Every 2-D weight of a model folder as module name -> (out_features, in_features).
    Used to check that an adapter fits the base before it is stored."""
    shapes: dict[str, tuple[int, int]] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        for key, meta in tensor_entries(read_safetensors_header(path)).items():
            if key.endswith(".weight") and isinstance(meta, dict) and len(meta.get("shape", [])) == 2:
                out_f, in_f = meta["shape"]
                shapes[key[: -len(".weight")]] = (int(out_f), int(in_f))
    return shapes
