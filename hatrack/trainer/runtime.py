"""Where and how a run computes: device, precision, quantization, and the LoRA model.

Measured on a 2-core AVX-512-bf16 CPU (LoRA r16 all-linear on the default base,
batches of 8 chat rows): a dense base under bf16 autocast trains ~2.5x faster than
an NF4 one (bitsandbytes de-quantizes every weight in forward and backward on CPU)
and ~2x faster than fp32. So: bf16 compute wherever the hardware has it, LoRA
weights and optimizer state kept in fp32 (bf16 Adam updates lose the small steps);
QLoRA (NF4 base) by default on CUDA, a dense base by default on CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatrack import basemodel
from hatrack.errors import HatrackError
from hatrack.precision import QUANTIZE_CHOICES, SERVE_ONLY, precision_label


@dataclass(frozen=True)
class Runtime:
    device: str  # "cpu" or "cuda"
    dtype: Any  # torch dtype of the base's compute
    quantize: str  # "nf4" | "int8" | "int8wo" (eval only) | "none"

    @property
    def bf16(self) -> bool:
        import torch

        return self.dtype == torch.bfloat16

    @property
    def fp16(self) -> bool:
        import torch

        return self.dtype == torch.float16

    @property
    def precision(self) -> str:
        """The label scores record: bf16 / fp32 for a dense base, nf4 / int8 for a quantized one."""
        return precision_label(self.quantize, self.dtype)


@functools.lru_cache(maxsize=None)
def bitsandbytes_works(device: str) -> bool:
    """Whether bitsandbytes can quantize and run a 4-bit matmul here."""
    try:
        import bitsandbytes.functional as F
        import torch

        w = torch.randn(64, 64, dtype=torch.bfloat16, device=device)
        q, state = F.quantize_4bit(w, quant_type="nf4")
        back = F.dequantize_4bit(q, state)
        return bool(torch.isfinite(back).all())
    except Exception:
        return False


def choose_runtime(quantize: str | None, dtype: str = "auto") -> Runtime:
    """`quantize=None` picks the best for this machine: NF4 (QLoRA) on CUDA where
    bitsandbytes works, a dense base on CPU (faster there, see above). dtype: "auto" (the
    device's fast dtype, basemodel.compute_dtype), "float32" or "bfloat16"."""
    import torch

    device = basemodel.best_device()
    dtype = basemodel.compute_dtype(device) if dtype == "auto" else getattr(torch, dtype)
    if quantize is None:
        quantize = "nf4" if device.startswith("cuda") and bitsandbytes_works(device) else "none"
    check_quantize(quantize)
    if quantize in ("nf4", "int8") and not bitsandbytes_works(device):
        raise HatrackError(f"--quantize {quantize}: bitsandbytes does not work on this machine; use --quantize none")
    return Runtime(device=device, dtype=dtype, quantize=quantize)


def check_quantize(quantize: str, *, training: bool = False) -> str:
    """Torch-free: callers check the option before any heavy import. A training run
    refuses a serve-only base (int8wo: its int8 kernel has no backward)."""
    if quantize not in QUANTIZE_CHOICES:
        raise HatrackError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}; got {quantize!r}")
    if training and quantize in SERVE_ONLY:
        *others, last = [q for q in QUANTIZE_CHOICES if q not in SERVE_ONLY]
        raise HatrackError(f"--quantize {quantize} serves and evaluates only (its int8 kernel has no backward); "
                           f"train with --quantize {', '.join(others)} or {last} (or leave it out)")
    return quantize


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 16
    alpha: int = 32
    targets: str = "all-linear"
    dropout: float = 0.0


def target_modules(targets: str) -> str | list[str]:
    """"all-linear" as PEFT spells it, else a comma-separated list of module names."""
    if targets == "all-linear":
        return targets
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise HatrackError("--targets must be all-linear or a comma-separated list of module names")
    return names


def load_trainable(base_dir: Path, runtime: Runtime, lora: LoraSpec, parent_adapter: Path | None = None):
    """(peft model ready to train, tokenizer). LoRA weights in fp32 so the optimizer
    keeps small updates; the base frozen in its (possibly 4-bit) compute dtype."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    check_quantize(runtime.quantize, training=True)
    model, tokenizer = basemodel.load_base(base_dir, runtime.quantize, runtime.device, runtime.dtype)
    model.config.use_cache = False
    if parent_adapter is not None:
        peft_model = PeftModel.from_pretrained(model, str(parent_adapter), is_trainable=True)
    else:
        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            target_modules=target_modules(lora.targets),
            lora_dropout=lora.dropout,
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as err:  # e.g. a target module the base does not have
            raise HatrackError(f"--targets {lora.targets}: {err}") from None
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
    peft_model.train()
    return peft_model, tokenizer


def load_for_eval(base_dir: Path, runtime: Runtime, adapter_dir: Path):
    """(peft model in eval mode, tokenizer) for scoring a stored adapter and its base."""
    from peft import PeftModel

    model, tokenizer = basemodel.load_base(base_dir, runtime.quantize, runtime.device, runtime.dtype)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    peft_model.eval()
    return peft_model, tokenizer
