"""One LoRA adapter as plain tensors, read from a PEFT folder (safetensors only).

What an adapter folder is, and whether it can be served, is hatrack.adapter_format's
to say (the same rules `register` applies); this module only reads the tensors and
folds each module's own scaling into its B."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hatrack import adapter_format
from hatrack.server.engine.errors import AdapterFormatError


@dataclass
class LoraWeights:
    """One adapter, on CPU, ready to copy into a slot. `scaling` multiplies B @ A;
    per-module rank/alpha patterns are already folded into that module's B."""

    rank: int
    scaling: float  # lora_alpha / r (lora_alpha / sqrt(r) with rslora)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B [out, r])


def load_peft_adapter(folder: Path) -> LoraWeights:
    """Read adapter_config.json + adapter_model.safetensors. Pickle weights are refused,
    and so is anything the engine would apply wrongly (DoRA, trained biases,
    modules_to_save, embedding LoRA): the rank limit is the slots' to check."""
    folder = Path(folder)
    try:
        layout = adapter_format.read_layout(folder, max_rank=None)
    except adapter_format.AdapterFormatError as exc:
        raise AdapterFormatError(str(exc)) from None

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = folder / adapter_format.WEIGHTS
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{weights_path}: unreadable safetensors file ({exc})") from None

    config = layout.config
    scaling = config.scaling
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, m in sorted(layout.modules.items()):
        try:
            a, b = tensors[m.key_a], tensors[m.key_b]
        except KeyError as exc:  # the file changed since its header was read
            raise AdapterFormatError(f"{weights_path}: tensor {exc.args[0]} vanished while loading") from None
        m_scaling = config.scaling_for(module)
        if m_scaling != scaling:  # fold the module's own scaling relative to the adapter's
            b = b.float() * (m_scaling / scaling)
        modules[module] = (a, b)
    return LoraWeights(rank=layout.rank, scaling=scaling, modules=modules)
