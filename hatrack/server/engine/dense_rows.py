"""Dense projections whose rows do not depend on how many rows share the call.

A BLAS picks its matmul kernel by the number of rows M. Measured with torch's MKL sgemm on
an AVX2 CPU: a row of an M = 1..3, 5..7 or 9..11 product differs in its last bits from the
same row of a larger product (rows in multiples of 4 all agree), and one such bit can turn
a greedy answer once the request shares a batch. So every plain nn.Linear of the base is
called with its rows padded (zeros) to a multiple of a quantum, found by a probe at start:
the smallest of QUANTA for which products of every multiple of it up to the batch give
each row the same bits. A device whose matmul is already row-independent gets quantum 1
and no padding. Weight-only int8 projections (hatrack/weight_only_int8.py, `--quantize
int8wo`) are probed the same way with their own product (torch's int8 kernel gave every row
the same bits at 1..64 rows on AVX2, so quantum 1 there). bitsandbytes layers are not plain
nn.Linear and keep their own forward (int8: int8_rows.py). Packed bf16 projections
(packed_linear.py) are probed with their own product too.

A BLAS may also switch kernels above the decode batch: measured with oneDNN's bf16
kernels on an Intel Xeon with AMX (2026-12-06), a 1536 -> 576 product gives a row one set
of bits at 1..32 rows and another at 33..320, so a prompt token prefilled among other
prompts' tokens, or in a fused decode step, got other bits than alone (32 of 99 greedy
answers on the real base differed from the same request alone). So the probe also tries a
spread of larger products, up to the largest forward the engine runs; where one of them
gives a row other bits, every product of that module runs at most the decode batch's
rows at a time (its tile), the rows the probe checked.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

from hatrack import weight_only_int8
from hatrack.server.engine import packed_linear, probe_cache
from hatrack.server.engine.kv_cache import round_up

log = logging.getLogger("hatrack.engine")

QUANTA = (1, 2, 4, 8, 16)
PROBE_ROWS = 256  # random rows each product size is checked on...
PROBE_MACS = 8e9  # ...fewer for a large weight (the LM head), to keep start-up short
# what a kept result depends on besides the CPU and torch (probe_cache.py): raise the version
# when the probe changes
PROBE_SETTINGS = f"version 4; quanta {QUANTA}; rows {PROBE_ROWS}; macs {PROBE_MACS}"
_probed: dict[tuple, int] = {}  # (kind, device, dtype, in, out, rows, threads) -> quantum
_tiles: dict[tuple, int] = {}  # the same key and the largest forward -> tile (0: none needed)


def row_quantum(weight: torch.Tensor, max_rows: int, product=None, x_dtype: torch.dtype | None = None,
                kind: str = "linear", on_disk: bool = False) -> int:
    """The smallest quantum q of QUANTA such that a product over any multiple of q rows, up
    to max_rows rounded up, gives each row the bits it has in the largest product. Where no
    quantum does, the one under which the fewest rows disagree, with a warning (padding
    that fixes most rows beats none). product(x) runs rows x [m, in] of dtype x_dtype
    (default: F.linear with `weight` and weight's dtype); `kind` names it in the cache of
    probes by shape.

    Each product size is tried on every row of PROBE_ROWS random rows (tile after tile; fewer
    rows for a weight as large as the LM head), not on the first rows alone: a kernel whose
    rows disagree only now and then must be caught. Measured with oneDNN's bf16 kernels on
    an AVX-512 BF16 CPU: a 1-row product gives about one row in 30 other bits than the same
    row among 2 or more, and the first row alone happened to agree.

    on_disk: also look the result up in, and add it to, the probe results kept on disk for
    this CPU and torch (probe_cache.py); for the engine's own products only, whose `kind`
    names them exactly."""
    out_dim, in_dim = weight.shape
    x_dtype = x_dtype or weight.dtype
    product = product or _linear_product(weight)
    top = _rounded_rows(max_rows)
    key = (kind, str(weight.device), x_dtype, in_dim, out_dim, top, torch.get_num_threads())

    def probe() -> int:
        affordable = int(PROBE_MACS // (in_dim * out_dim * max(top - 1, 1)))
        rows = max(top, min(PROBE_ROWS, affordable) // top * top)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(rows, in_dim, generator=gen).to(device=weight.device, dtype=x_dtype)
        with torch.no_grad():
            ref = torch.cat([product(x[t:t + top]) for t in range(0, rows, top)])

            def tiles(q: int):
                return ((s, m) for m in range(q, top, q) for s in range(0, rows - m + 1, m))

            found = next((q for q in QUANTA if all(torch.equal(product(x[s:s + m]), ref[s:s + m])
                                                    for s, m in tiles(q))), None)
            if found is None:  # every quantum leaves some rows off: the one that leaves fewest
                off = {q: sum(int((product(x[s:s + m]) != ref[s:s + m]).any(dim=1).sum()) for s, m in tiles(q))
                       for q in QUANTA}
                found = min(QUANTA, key=lambda q: (off[q], q))
                log.warning("no row padding makes %d x %d %s %s products row-independent on %s (rows that "
                            "differ at each padding: %s); padding to %d, answers may depend on the batch",
                            in_dim, out_dim, kind, x_dtype, weight.device, off, found)
        return found

    return _remembered(_probed, key, weight.device, on_disk, lambda kept: kept in QUANTA, probe)


def _linear_product(weight: torch.Tensor):
    """The default product a probe checks: F.linear with `weight`."""
    def product(rows: torch.Tensor) -> torch.Tensor:
        return F.linear(rows, weight)
    return product


def _rounded_rows(max_rows: int) -> int:
    """max_rows rounded up to the largest quantum: the most rows a probed product runs."""
    return round_up(max(max_rows, 1), QUANTA[-1])


def _remembered(memo: dict, key: tuple, device: torch.device, on_disk: bool, valid, probe) -> int:
    """memo[key]; else, with on_disk on a CPU, the result kept on disk for this CPU and torch
    if valid(it); else probe(), kept in memo and (on_disk) on disk."""
    disk = probe_cache.path_for(PROBE_SETTINGS) if on_disk and device.type == "cpu" else None
    if key not in memo and disk is not None:
        kept = probe_cache.lookup(disk, repr(key))
        if valid(kept):
            memo[key] = kept
    if key not in memo:
        memo[key] = probe()
        if disk is not None:
            probe_cache.remember(disk, repr(key), memo[key])
    return memo[key]


def large_sizes(top: int, max_forward_rows: int, quantum: int) -> list[int]:
    """The row counts above `top` the tile probe tries: a few per doubling (where a BLAS's
    kernel choice may switch), as the packed products round them (packed_linear.padded_rows),
    multiples of the quantum, up to the largest forward."""
    sizes: set[int] = set()
    size = top
    while size < max_forward_rows:
        for part in (9, 12, 16):  # 1.125x, 1.5x and 2x the last doubling
            n = min(size * part // 8, max_forward_rows)
            sizes.add(round_up(packed_linear.padded_rows(n), quantum))
        size *= 2
    return sorted(n for n in sizes if n > top)


def _has_amx() -> bool:
    """Whether oneDNN may run this CPU's bf16 products on AMX tiles."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def row_tile(weight: torch.Tensor, max_rows: int, max_forward_rows: int, product=None,
             x_dtype: torch.dtype | None = None, kind: str = "linear", on_disk: bool = False) -> int:
    """0 if products of more than max_rows rows (up to max_forward_rows) give each row the
    bits it has in products of up to max_rows (rounded up as row_quantum rounds it); else
    that rounded max_rows, the most rows a product of this weight may run at once. The
    larger sizes tried are large_sizes(), within PROBE_MACS multiply-adds."""
    out_dim, in_dim = weight.shape
    x_dtype = x_dtype or weight.dtype
    product = product or _linear_product(weight)
    quantum = row_quantum(weight, max_rows, product=product, x_dtype=x_dtype, kind=kind, on_disk=on_disk)
    top = _rounded_rows(max_rows)
    if x_dtype in (torch.bfloat16, torch.float16) and weight.device.type == "cpu" and _has_amx():
        # oneDNN runs small half-precision products on AVX-512 and larger ones on AMX tiles; a
        # half-precision output rounds away most of that change, so random rows rarely show it:
        # the real base's 576 -> 192 products gave its prompts' rows other bits at 471 rows while
        # 471 random rows matched. Tile these always (where AMX is absent, the probe decides:
        # on an AMD EPYC with AVX-512 BF16 nothing needed a tile, 0 of 99 answers differed).
        return top
    key = (kind, str(weight.device), x_dtype, in_dim, out_dim, top, torch.get_num_threads(), max_forward_rows)

    def probe() -> int:
        sizes, macs = [], 0.0
        for n in large_sizes(top, max_forward_rows, quantum):
            macs += n * in_dim * out_dim
            if macs > PROBE_MACS:
                break
            sizes.append(n)
        if not sizes:
            return 0
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(sizes[-1], in_dim, generator=gen).to(device=weight.device, dtype=x_dtype)
        with torch.no_grad():
            ref = torch.cat([product(x[t:t + top]) for t in range(0, sizes[-1], top)])
            off = [n for n in sizes if not torch.equal(product(x[:n]), ref[:n])]
        if not off:
            return 0
        log.info("%d x %d %s %s products of %s rows give rows other bits than products of up to %d: "
                 "running %d rows at a time", in_dim, out_dim, kind, x_dtype, off, top, top)
        return top

    return _remembered(_tiles, key, weight.device, on_disk, lambda kept: kept in (0, top), probe)


def pad_rows(modules, max_rows: int, dtype: torch.dtype = torch.float32, max_forward_rows: int | None = None) -> int:
    """Give each plain nn.Linear among `modules` (searched recursively), dense or weight-only
    int8, a forward that pads its rows to the probed quantum and, where larger products
    would give rows other bits (row_tile), runs more than max_rows rows a tile at a time.
    dtype: the activations' dtype a weight-only layer is called with; max_forward_rows: the
    most rows a forward gives these modules (default max_rows). Returns the largest quantum
    used (1: no padding)."""
    largest = 1
    for root in modules:
        for module in root.modules():
            if type(module) is not torch.nn.Linear:
                continue
            packed = packed_linear.packed_kind(module)  # a weight packed at start (packed_linear.py)
            if packed or weight_only_int8.is_weight_only(module):
                # its own product, unpadded (a second engine on the same model finds it padded)
                product = getattr(module, "_unpadded_forward", module.forward)
                kind, x_dtype = (packed, module.weight.dtype) if packed else ("int8wo", dtype)
                weight = module.weight
            elif module.weight.is_floating_point():
                product, kind, x_dtype, weight = None, "linear", None, module.weight.detach()
            else:
                continue
            q = row_quantum(weight, max_rows, product=product, x_dtype=x_dtype, kind=kind, on_disk=True)
            tile = 0
            if max_forward_rows and max_forward_rows > max_rows:
                tile = row_tile(weight, max_rows, max_forward_rows, product=product, x_dtype=x_dtype, kind=kind,
                                on_disk=True)
            if q > 1 or tile:
                module._row_quantum, module._row_tile = q, tile
                if not hasattr(module, "_unpadded_forward"):  # padded once, whatever engines follow
                    module._unpadded_forward = module.forward  # F.linear, or the int8 product
                    module.forward = types.MethodType(_forward, module)
                largest = max(largest, q)
    return largest


def _padded(self, flat: torch.Tensor) -> torch.Tensor:
    q = self._row_quantum
    n = flat.shape[0]
    if n % q:
        flat = torch.cat([flat, flat.new_zeros(q - n % q, flat.shape[1])])
    return self._unpadded_forward(flat)[:n]


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    tile = self._row_tile  # set with _row_quantum by pad_rows
    if tile and flat.shape[0] > tile:
        out = torch.cat([_padded(self, flat[s:s + tile]) for s in range(0, flat.shape[0], tile)])
    else:
        out = _padded(self, flat)
    return out.reshape(*x.shape[:-1], out.shape[-1])
