"""bf16 projections on CPU with their weight packed once at start: in pairs for the
engine's own product (csrc/linear_cpu.cpp) on CPUs with AVX-512 BF16, else in oneDNN's own
blocked layout.

The engine's product reads each weight once per 8 rows at close to memory speed, where
oneDNN's kernels read it at about half that for a decode step's few rows. Measured on an
AMD EPYC with AVX-512 BF16 (2 cores, 2026-12-07, bench/dot_linear.py: the default base's
210 decoder projections, distinct weights): 14.7 -> 8.1 ms at 1 row, 16.1 -> 9.3 at 8,
29.0 -> 22.1 at 32, 94.4 -> 82.2 at 160 (bench/RESULTS.md). It sums each output in blocks
of input pairs; the block that gives F.linear's bits (those of a row among others) is found
once per weight shape at start, on random rows, and a shape that no block matches takes
oneDNN's layout instead. Its rows do not depend on each other, so it needs no padding
(dense_rows.py). An engine with the CPU kernels off (Engine(cpu_kernel=False)) packs in
oneDNN's layout only, and builds nothing.

torch's F.linear hands oneDNN a plain [out, in] weight and oneDNN reorders it on every
call; a weight reordered once at start skips that. Measured on an AMD EPYC with AVX-512
BF16 (2 cores, 2026-12-01, the default base's 210 decoder projections): 21.0 -> 13.2 ms at
8 rows, 32.6 -> 24.7 ms at 32, 146 -> 133 ms at 256 (bench/RESULTS.md). The products have
the same bits as F.linear's; that is checked once per weight shape at start, on random
rows, and a shape whose products differ keeps F.linear.

Only plain bf16 nn.Linear modules change (the decoder layers' and the LM head), in
place: the module keeps its type and shape (PEFT and Hugging Face's forward still call
it), its `weight` becomes the packed tensor (the plain one is freed, so memory does not
double) and its forward runs the packed product. Anything that reads the weight's values
directly (F.linear on it, saving a state dict) no longer works on such a model: it is the
serving engine's. An LM head tied to the input embedding gets a packed copy of its own
(56 MB on the default base): the embedding keeps the plain weight. Measured the same way,
the default base's LM head takes 4.2 -> 2.1 ms at 8 rows and 7.1 -> 5.1 ms at 32.
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
DOT_BLOCKS = (0, 256, 512, 8, 16, 32, 64, 128, 1024)  # input pairs a sum block holds (0: all), in trial order
DOT_CHECK_SIZES = (1, 3, 8, 17, CHECK_ROWS)  # row counts the block is checked at
_agrees: dict[tuple[int, int, bool], bool] = {}  # (in, out, bias) -> packed products equal F.linear's
_dot_blocks: dict[tuple[int, int], int | None] = {}  # (in, out) -> the block with F.linear's bits; None: no block
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


def packed_kind(module: torch.nn.Module) -> str | None:
    """How a packed module multiplies: "dot" (the engine's product), "packed" (oneDNN's
    layout), None where it is not packed. The row probes (dense_rows.py) keep their
    results under this name."""
    return getattr(module, "_pack_kind", "packed") if is_packed(module) else None


def dot_kernel():
    """The compiled module with the engine's bf16 product, or None (no AVX-512 BF16 in this
    build, or the CPU kernels off or not buildable: cpu_kernel.py)."""
    from hatrack.server.engine import cpu_kernel

    module = cpu_kernel.load()
    return module if module is not None and module.dot_available() else None


def _dot_product(self, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = self._dot_kernel.dot_linear(flat, self.weight, self._dot_block)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _reference(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """CHECK_ROWS random rows for a weight, seeded so every start checks the same rows, and
    F.linear's products of them: the bits a packed product must give."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(CHECK_ROWS, weight.shape[1], generator=gen).to(weight.dtype)
    with torch.no_grad():
        return x, torch.nn.functional.linear(x, weight, bias)


def _dot_block(kernel, weight: torch.Tensor, pairs: torch.Tensor) -> int | None:
    """The sum block under which the engine's product of `weight` (packed as `pairs`) gives
    each row, at every row count of DOT_CHECK_SIZES, the bits F.linear gives it among
    CHECK_ROWS rows; or None. (F.linear's one-row product is not the reference: on an AVX-512
    BF16 EPYC it gives about one row in 30 other bits than among others, which is why
    dense_rows pads oneDNN's products to 2 rows there.) The block found for a shape with the
    same inputs is tried first: oneDNN blocks by the inputs."""
    out_dim, in_dim = weight.shape
    key = (in_dim, out_dim)
    if key not in _dot_blocks:
        x, want = _reference(weight, None)
        same_inputs = [b for (i, _), b in _dot_blocks.items() if i == in_dim and b is not None]
        trials = dict.fromkeys([*same_inputs, *(b for b in DOT_BLOCKS if b < in_dim // 2)])
        _dot_blocks[key] = next((b for b in trials if all(
            torch.equal(kernel.dot_linear(x[:m], pairs, b), want[:m]) for m in DOT_CHECK_SIZES)), None)
        if _dot_blocks[key] is None:
            log.info("bf16 %d x %d products of the engine's kernel differ from F.linear's under every "
                     "block: oneDNN's layout instead", in_dim, out_dim)
    return _dot_blocks[key]


def _pack_dot(kernel, module: torch.nn.Linear) -> bool:
    """Give `module` the engine's product where it can have F.linear's bits."""
    weight = module.weight.detach()
    if kernel is None or module.bias is not None or weight.shape[0] % 16 or weight.shape[1] % 2:
        return False
    pairs = kernel.dot_pack(weight)
    block = _dot_block(kernel, weight, pairs)
    if block is None:
        return False
    module.weight = torch.nn.Parameter(pairs, requires_grad=False)  # [out, in] bf16: the shape stays
    module._packed, module._pack_kind = True, "dot"
    module._dot_kernel, module._dot_block = kernel, block
    module.forward = types.MethodType(_dot_product, module)
    return True


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
        x, want = _reference(weight, bias)
        with torch.no_grad():
            _agrees[key] = all(
                torch.equal(_multiply(x[:m], packed, bias), want[:m])
                for m in (1, 3, 8, CHECK_ROWS)
            )
        if not _agrees[key]:
            log.info("packed bf16 %d x %d products differ from F.linear's: kept unpacked", *key[:2])
    return _agrees[key]


def pack(modules, device: torch.device, dtype: torch.dtype, *, own_kernel: bool = True) -> int:
    """Pack every plain bf16 nn.Linear among `modules` (searched recursively) on CPU, for the
    engine's product where it has F.linear's bits (and `own_kernel`: the CPU kernels are on),
    else in oneDNN's layout. Returns how many were packed (0 where oneDNN cannot on this CPU,
    or off CPU, or not bf16)."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not bf16_supported():
        return 0
    packed = 0
    kernel = dot_kernel() if own_kernel else None
    with torch.no_grad():
        for root in modules:
            for module in root.modules():
                if (type(module) is not torch.nn.Linear or is_packed(module) or weight_only_int8.is_weight_only(module)
                        or module.weight.dtype != torch.bfloat16 or module.weight.device.type != "cpu"):
                    continue
                if _pack_dot(kernel, module):
                    packed += 1
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
