"""What precision a base runs at, as one short label shared by scores and the server.

A score records the label it was measured at; the server says when it serves an
adapter at a label none of its scores carry. Torch-free: callers pass dtype names.
"""

from __future__ import annotations

QUANTIZE_CHOICES = ("nf4", "int8", "int8wo", "none")
# `hatrack serve --dtype`: auto is basemodel.compute_dtype's choice for the device
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
# bases that serve and evaluate but cannot train (no backward through their kernel)
SERVE_ONLY = ("int8wo",)
_DENSE = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16", "bf16": "bf16", "fp32": "fp32", "fp16": "fp16"}


def precision_label(quantize: str, dtype: object) -> str:
    """'nf4' or 'int8' for a bitsandbytes base, 'int8wo' for torch's weight-only int8
    (bf16 activations); the dense dtype ('bf16', 'fp32', 'fp16') for an unquantized one.
    `dtype` is a torch dtype or its name."""
    if quantize in ("nf4", "int8", "int8wo"):
        return quantize
    if quantize != "none":
        raise ValueError(f"unknown quantization {quantize!r}: expected one of {', '.join(QUANTIZE_CHOICES)}")
    name = str(dtype).replace("torch.", "")
    return _DENSE.get(name, name)


def default_serving_quantize(device: str) -> str:
    """The serving default on each device: the most accurate mode among the fastest.

    CPU: an unquantized base. Measured on this project's benchmark (bench/RESULTS.md,
    "Precision"): bitsandbytes NF4 on CPU changes greedy answers of adapters trained on
    the dense base and is no faster there; int8 is slower still. CUDA: NF4, where the
    4-bit kernels pay for themselves in memory and speed.
    """
    return "nf4" if str(device).startswith("cuda") else "none"
