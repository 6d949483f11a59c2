"""bf16 projections on CPU with their weight in oneDNN's own blocked layout.

torch's F.linear hands oneDNN a plain [out, in] weight and oneDNN reorders it on every
call; a weight reordered once at start skips that. Measured on an AMD EPYC with AVX-512
BF16 (2 cores, 2026-12-01, the default base's 210 decoder projections): 21.0 -> 13.2 ms at
8 rows, 32.6 -> 24.7 ms at 32, 146 -> 133 ms at 256 (bench/RESULTS.md). The products have
the same bits as F.linear's; that is checked once per weight shape at start, on random
rows, and a shape whose products differ keeps F.linear.

Only plain bf16 nn.Linear modules change (the decoder layers' and the LM head), in
place: the module keeps
its type and shape (PEFT and Hugging Face's forward still call it), its `weight` becomes
the packed tensor (the plain one is freed, so memory does not double) and its forward runs
the packed product. Anything that reads the weight's values directly (F.linear on it,
saving a state dict) no longer works on such a model: it is the serving engine's. An LM
head tied to the input embedding gets a packed copy of its own (56 MB on the default
base): the embedding keeps the plain weight. Measured the same way, the default base's LM
head takes 4.2 -> 2.1 ms at 8 rows and 7.1 -> 5.1 ms at 32.
"""

from __future__ import annotations

import logging
import types

import torch

from hatrack import weight_only_int8

log = logging.getLogger("hatrack.engine")

BATCH_HINT = 8  # oneDNN picks the layout for this many rows; any number of rows runs
SMALL_ROWS = 32  # row counts up to this run as they are (padded_rows)
CHECK_ROWS = 64
_agrees: dict[tuple[int, int, bool], bool] = {}  # (in, out, bias) -> packed products equal F.linear's
_cpu_packs_bf16: bool | None = None  # probed once (bf16_supported)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)


def _multiply(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def bf16_supported() -> bool:
    """Whether oneDNN packs and multiplies bf16 weights on this CPU. It refuses where the
    CPU has neither AVX-512 (BW, VL, DQ) nor AVX-NE-CONVERT, e.g. an AVX2-only AMD EPYC;
    the projections then keep F.linear. Probed once on a small weight."""
    global _cpu_packs_bf16
    if _cpu_packs_bf16 is None:
        _cpu_packs_bf16 = False
        if available():
            try:
                weight = torch.ones(16, 16, dtype=torch.bfloat16)
                _multiply(weight, _reorder(weight), None)
                _cpu_packs_bf16 = True
            except RuntimeError as err:
                log.info("bf16 projections stay unpacked on this CPU: %s", str(err).splitlines()[0])
    return _cpu_packs_bf16


def is_packed(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "_packed", False))


def padded_rows(n: int) -> int:
    """How many rows a packed product runs for n rows: n up to SMALL_ROWS (a decode step's
    batch), above that n rounded up to one of 8 sizes per doubling (at most 1/8 more rows).
    oneDNN builds and keeps a kernel for every row count it meets, about 0.7 MB each
    (measured: a 576 x 1536 bf16 weight, 200 row counts, +136 MB for good), and prefills
    with decode rows beside them meet any count: this keeps the counts, and the memory,
    bounded."""
    if n <= SMALL_ROWS:
        return n
    step = 1 << max((n - 1).bit_length() - 4, 0)
    return -(-n // step) * step


def _product(self, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[0]
    rows = padded_rows(n)
    if rows != n:  # zero rows: the others' bits do not depend on them (dense_rows.py)
        flat = torch.cat([flat, flat.new_zeros(rows - n, flat.shape[1])])
    out = _multiply(flat, self.weight, self.bias)[:n]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _same_bits(weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> bool:
    key = (weight.shape[1], weight.shape[0], bias is not None)
    if key not in _agrees:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(CHECK_ROWS, weight.shape[1], generator=gen).to(weight.dtype)
        with torch.no_grad():
            want = torch.nn.functional.linear(x, weight, bias)
            _agrees[key] = all(
                torch.equal(_multiply(x[:m], packed, bias), want[:m])
                for m in (1, 3, 8, CHECK_ROWS)
            )
        if not _agrees[key]:
            log.info("packed bf16 %d x %d products differ from F.linear's: kept unpacked", *key[:2])
    return _agrees[key]


def pack(modules, device: torch.device, dtype: torch.dtype) -> int:
    """Pack every plain bf16 nn.Linear among `modules` (searched recursively) on CPU. Returns
    how many were packed (0 where oneDNN cannot on this CPU, or off CPU, or not bf16)."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not bf16_supported():
        return 0
    packed = 0
    with torch.no_grad():
        for root in modules:
            for module in root.modules():
                if (type(module) is not torch.nn.Linear or is_packed(module) or weight_only_int8.is_weight_only(module)
                        or module.weight.dtype != torch.bfloat16 or module.weight.device.type != "cpu"):
                    continue
                weight = module.weight.detach()
                blocked = _reorder(weight)
                if not _same_bits(weight, blocked, module.bias):
                    continue
                module.weight = torch.nn.Parameter(blocked, requires_grad=False)
                module._packed = True
                module.forward = types.MethodType(_product, module)
                packed += 1
    return packed
