"""Does an adapter fit its base? Read from the safetensors header alone (no torch):
every LoRA tensor must name a module of the base, with lora_A (r, in) and
lora_B (out, r) matching that module's (out, in)."""

from __future__ import annotations

import json
from pathlib import Path

from hatrack.basemodel import BaseModelError, linear_shapes, read_safetensors_header
from hatrack.registry.errors import ArtifactError, LineageError
from hatrack.registry.store import CONFIG, WEIGHTS

PEFT_PREFIX = "base_model.model."
_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")


def read_adapter_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing (expected a PEFT adapter folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    peft_type = config.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise ArtifactError(f"{path}: peft_type is {peft_type!r}; hatrack stores LoRA adapters only")
    return config


def read_adapter_header(folder: Path) -> dict:
    path = Path(folder) / WEIGHTS
    try:
        return read_safetensors_header(path)
    except BaseModelError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None


def _split(key: str) -> tuple[str, str]:
    """`base_model.model.model.layers.0.q_proj.lora_A.weight` ->
    ('model.layers.0.q_proj', 'lora_A.weight')."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for part in _LORA_PARTS:
        idx = name.find(part)
        if idx >= 0:
            return name[:idx], name[idx + 1:]
    module, _, leaf = name.rpartition(".")
    return module, leaf


def check_fits(folder: Path, base_path: Path, base_name: str) -> int:
    """Raise LineageError naming the first tensor that does not fit; return the LoRA tensor count."""
    read_adapter_config(folder)
    header = read_adapter_header(folder)
    try:
        shapes = linear_shapes(Path(base_path))
    except (BaseModelError, OSError) as exc:
        raise LineageError(f"base {base_name!r}: cannot read its weights ({exc})") from None
    if not shapes:
        raise LineageError(f"base {base_name!r}: no weights found in {base_path}")
    lora_tensors = 0
    ranks: dict[str, int] = {}
    for key, meta in sorted(header.items()):
        if key == "__metadata__":
            continue
        shape = tuple(int(d) for d in meta["shape"])
        module, leaf = _split(key)
        if module not in shapes:
            raise LineageError(
                f"adapter tensor {key} targets module {module!r}, which base {base_name!r} does not have"
            )
        out_f, in_f = shapes[module]
        if leaf.startswith("lora_A."):
            expected = (shape[0] if shape else 0, in_f)
        elif leaf.startswith("lora_B.weight"):
            expected = (out_f, shape[1] if len(shape) == 2 else 0)
        elif leaf.startswith("lora_B.bias") or leaf.startswith("lora_magnitude_vector"):
            expected = (out_f,)
        elif leaf.startswith("lora_embedding_A"):
            expected = (shape[0] if shape else 0, out_f)  # embeddings: weight is (vocab, dim)
        elif leaf.startswith("lora_embedding_B"):
            expected = (in_f, shape[1] if len(shape) == 2 else 0)
        elif leaf == "weight":  # a fully trained module (modules_to_save)
            expected = (out_f, in_f)
        else:
            continue  # biases and other extras of a known module
        if shape != expected:
            raise LineageError(
                f"adapter tensor {key} does not fit base {base_name!r}: module {module} is "
                f"(out={out_f}, in={in_f}), so {leaf.split('.')[0]} must be {list(expected)}, "
                f"but the adapter has {list(shape)}"
            )
        if leaf.startswith("lora_"):
            lora_tensors += 1
            if leaf.startswith("lora_A.") or leaf.startswith("lora_embedding_A"):
                ranks.setdefault(module + ":A", shape[0])
            elif leaf.startswith("lora_B.weight") or leaf.startswith("lora_embedding_B"):
                ranks.setdefault(module + ":B", shape[1])
    for key, rank in ranks.items():
        module, side = key.rsplit(":", 1)
        other = ranks.get(f"{module}:{'B' if side == 'A' else 'A'}")
        if other is not None and other != rank:
            raise LineageError(f"adapter module {module}: lora_A has rank {ranks[module + ':A']} but lora_B has rank {ranks[module + ':B']}")
    if lora_tensors == 0:
        raise LineageError(f"{Path(folder) / WEIGHTS}: holds no LoRA tensors (lora_A / lora_B)")
    return lora_tensors
