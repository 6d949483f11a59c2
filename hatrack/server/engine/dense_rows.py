"""Dense projections whose rows do not depend on how many rows share the call.

A BLAS picks its matmul kernel by the number of rows M. Measured with torch's MKL sgemm on
an AVX2 CPU: a row of an M = 1..3, 5..7 or 9..11 product differs in its last bits from the
same row of a larger product (rows in multiples of 4 all agree), and one such bit can turn
a greedy answer once the request shares a batch. So every plain nn.Linear of the base is
called with its rows padded (zeros) to a multiple of a quantum, found by a probe at start:
the smallest of QUANTA for which products of every multiple of it up to the batch give
each row the same bits. A device whose matmul is already row-independent gets quantum 1
and no padding. Quantized layers (bitsandbytes) are not plain nn.Linear and keep their own
forward (int8: int8_rows.py).
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

log = logging.getLogger("hatrack.engine")

QUANTA = (1, 2, 4, 8, 16)
_probed: dict[tuple, int | None] = {}  # (device, dtype, in, out, rows, threads) -> quantum


def row_quantum(weight: torch.Tensor, max_rows: int) -> int | None:
    """The smallest quantum q of QUANTA such that F.linear over any multiple of q rows, up
    to max_rows rounded up, gives each row the bits it has in the largest product; None
    if there is none."""
    out_dim, in_dim = weight.shape
    top = -(-max(max_rows, 1) // QUANTA[-1]) * QUANTA[-1]
    key = (str(weight.device), weight.dtype, in_dim, out_dim, top, torch.get_num_threads())
    if key not in _probed:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(top, in_dim, generator=gen).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            ref = F.linear(x, weight)
            found = None
            for q in QUANTA:
                if all(torch.equal(F.linear(x[:m], weight), ref[:m]) for m in range(q, top, q)):
                    found = q
                    break
        _probed[key] = found
        if found is None:
            log.warning("no row padding makes %d x %d %s products row-independent on %s; answers may depend "
                        "on the batch", in_dim, out_dim, weight.dtype, weight.device)
    return _probed[key]


def pad_rows(modules, max_rows: int) -> int:
    """Give each plain nn.Linear among `modules` (searched recursively) a forward that pads
    its rows to the probed quantum. Returns the largest quantum used (1: no padding)."""
    largest = 1
    for root in modules:
        for module in root.modules():
            if type(module) is not torch.nn.Linear or not module.weight.is_floating_point():
                continue
            q = row_quantum(module.weight.detach(), max_rows)
            if q is not None and q > 1:
                module._row_quantum = q
                module.forward = types.MethodType(_forward, module)
                largest = max(largest, q)
    return largest


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    q = self._row_quantum
    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[0]
    if n % q:
        flat = torch.cat([flat, flat.new_zeros(q - n % q, flat.shape[1])])
    out = F.linear(flat, self.weight, self.bias)[:n]
    return out.reshape(*x.shape[:-1], out.shape[-1])
