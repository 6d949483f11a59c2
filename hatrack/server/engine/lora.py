"""One LoRA adapter as plain tensors, read from a PEFT folder (safetensors only)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from hatrack.server.engine.errors import AdapterFormatError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
# "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" (an adapter name may
# sit before ".weight" in files written by other tools)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraWeights:
    """One adapter, on CPU, ready to copy into a slot. `scaling` multiplies B @ A;
    per-module rank/alpha patterns are already folded into that module's B."""

    rank: int
    scaling: float  # lora_alpha / r (lora_alpha / sqrt(r) with rslora)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B [out, r])


def _scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key matches a module name that ends with it."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def load_peft_adapter(folder: Path) -> LoraWeights:
    """Read adapter_config.json + adapter_model.safetensors. Pickle weights are refused,
    and so is anything the engine would apply wrongly (DoRA, trained biases,
    modules_to_save, embedding LoRA)."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not weights_path.is_file():
        if any((folder / name).exists() for name in _PICKLE_FILES):
            raise AdapterFormatError(f"{folder}: pickle weights are refused; only {WEIGHTS_FILE} is loaded")
        raise AdapterFormatError(f"{folder}: no {WEIGHTS_FILE}")
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{folder}: no {CONFIG_FILE}")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{cfg_path}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{cfg_path}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise AdapterFormatError(f"{cfg_path}: DoRA adapters are not supported (use_dora is true)")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"{cfg_path}: bias {config.get('bias')!r} is not supported (expected 'none')")
    if config.get("modules_to_save"):
        raise AdapterFormatError(f"{cfg_path}: modules_to_save {config['modules_to_save']} is not supported")
    try:
        r = int(config["r"])
        alpha = float(config.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError):
        raise AdapterFormatError(f"{cfg_path}: field 'r' must be a positive integer") from None
    if r <= 0:
        raise AdapterFormatError(f"{cfg_path}: field 'r' must be a positive integer, got {r}")
    rslora = bool(config.get("use_rslora"))
    scaling = _scaling(alpha, r, rslora)

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{weights_path}: unreadable safetensors file ({exc})") from None

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if not match:
            raise AdapterFormatError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight")
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise AdapterFormatError(f"{weights_path}: tensor {key!r} must be a 2-D float tensor")
        parts.setdefault(match["module"], {})[match["ab"]] = tensor
    if not parts:
        raise AdapterFormatError(f"{weights_path}: holds no LoRA weights")

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"{weights_path}: module {module!r} lacks lora_{'A' if 'A' not in ab else 'B'}")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise AdapterFormatError(
                f"{weights_path}: module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} disagree on rank"
            )
        m_rank = int(a.shape[0])
        m_alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha))
        m_scaling = _scaling(m_alpha, m_rank, rslora)
        if m_scaling != scaling:  # fold the module's own scaling relative to the adapter's
            b = b.float() * (m_scaling / scaling)
        modules[module] = (a, b)
        rank = max(rank, m_rank)
    return LoraWeights(rank=rank, scaling=scaling, modules=modules)
