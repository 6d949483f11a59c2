"""The KV cache: keys and values of every batch row and layer, held under a byte budget.

The layout is the one decode attends over in one batched call: per layer, K and V of
shape [max_batch, kv_heads, max_capacity, head_dim]. On CPU that whole block is one
anonymous memory mapping that the OS backs lazily: a page costs memory only once a key
or value is written into it, and a finished row's pages go straight back to the OS
(madvise DONTNEED; reads of them give zeros again). So each row costs its own length,
not the longest row's, and no allocator sits between a freed row and the OS. The
budget is kept by counting what rows hold, in chunks of positions: a row grows a chunk
at a time, all or nothing, and never past the budget.

On other devices (CUDA) memory cannot be committed lazily: the budget is allocated at
start as one block, and each row may hold as many positions as its share allows.
"""

from __future__ import annotations

import mmap
import os
import sys
from dataclasses import dataclass

import torch

from hatrack.server.engine.errors import EngineError, KVBudgetError, is_out_of_memory

WINDOW_STEP = 64  # decode attends over windows of this many positions (see model.py)
DEFAULT_FRACTION = 0.5  # of the memory available when the engine starts
_PAGE = mmap.PAGESIZE
# Python < 3.13 lacks the name; 0x4000 is Linux' value (elsewhere: no flag)
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
GB = 1e9


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def position_bytes(self) -> int:
        """Bytes one position of one row costs: K and V in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


def available_bytes(device: torch.device) -> int:
    """Free device memory on CUDA; MemAvailable of the machine otherwise."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_budget(device: torch.device, full_bytes: int) -> int:
    """Half the memory available now (the base is loaded by then), and never more than
    every row at the full context needs."""
    return min(full_bytes, int(available_bytes(device) * DEFAULT_FRACTION))


class KVCache:
    def __init__(self, shape: KVShape, *, max_batch: int, context_length: int, device: torch.device,
                 budget_bytes: int | None = None):
        self.shape = shape
        self.max_batch = max_batch
        self.device = device
        self.position_bytes = shape.position_bytes
        elem = torch.empty((), dtype=shape.dtype).element_size()
        plane_row = shape.head_dim * elem  # bytes of one position in one head's plane
        # a chunk is whole windows and whole pages of every head's plane, so what the
        # budget counts is what the OS commits
        self.chunk = WINDOW_STEP * max(1, round_up(_PAGE, WINDOW_STEP * plane_row) // (WINDOW_STEP * plane_row))
        self.max_capacity = round_up(context_length, self.chunk)
        full = max_batch * self.max_capacity * self.position_bytes
        budget = default_budget(device, full) if budget_bytes is None else int(budget_bytes)
        if budget < self.chunk * self.position_bytes:
            raise EngineError(
                f"the KV cache budget of {budget / GB:.6g} GB holds no request: one row needs at least "
                f"{self.chunk * self.position_bytes / GB:.6g} GB ({self.chunk} positions of "
                f"{self.position_bytes} bytes)"
            )
        self.budget_bytes = budget
        self.held = [0] * max_batch  # positions each row holds (a multiple of chunk)
        self.used_positions = 0
        self._map: mmap.mmap | None = None
        if device.type == "cpu":
            self.row_limit = self.max_capacity
            self.k, self.v = self._map_lazily(full)
        else:
            # the budget up front: each row gets an equal share of positions
            per_row = budget // (max_batch * self.position_bytes) // self.chunk * self.chunk
            self.row_limit = min(self.max_capacity, max(per_row, self.chunk))
            size = (max_batch, shape.kv_heads, self.row_limit, shape.head_dim)
            try:
                self.k = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
                self.v = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                raise EngineError(
                    f"cannot allocate the KV cache budget of {budget / GB:.3g} GB on {device}: out of memory; "
                    f"lower --kv-cache-gb"
                ) from None
        self._plane_bytes = self.row_limit * plane_row
        self._plane_row = plane_row

    def _map_lazily(self, full: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        try:
            self._map = mmap.mmap(-1, full, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        except OSError as err:
            raise EngineError(
                f"cannot reserve {full / GB:.3g} GB of address space for the KV cache ({err.strerror}); "
                f"lower --max-batch or the context"
            ) from None
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            # a 2 MB huge page would commit many rows' positions on one write
            self._map.madvise(mmap.MADV_NOHUGEPAGE)
        s = self.shape
        whole = torch.frombuffer(self._map, dtype=s.dtype).view(
            2, s.layers, self.max_batch, s.kv_heads, self.max_capacity, s.head_dim
        )
        return list(whole[0]), list(whole[1])

    # ------------------------------------------------------------ accounting

    @property
    def used_bytes(self) -> int:
        return self.used_positions * self.position_bytes

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def positions_for(self, length: int) -> int:
        return round_up(length, self.chunk)

    def most_positions(self) -> int:
        """The longest sequence (prompt + answer) one row can ever hold."""
        return min(self.row_limit, self.budget_bytes // self.position_bytes // self.chunk * self.chunk)

    def check_fits(self, prompt: int, max_tokens: int, context: int, rows: int = 1) -> None:
        """Raise KVBudgetError if a request (of `rows` choices, each in its own row) could
        not run even with the cache to itself: waiting for room would never end."""
        need = min(prompt + max_tokens, context)
        whole = rows * self.positions_for(need)
        if rows > 1 and whole * self.position_bytes > self.budget_bytes:
            raise KVBudgetError(
                f"the request's {rows} choices need KV cache for {rows} x {need} positions "
                f"({whole * self.position_bytes / GB:.3g} GB) but the KV cache budget is "
                f"{self.budget_bytes / GB:.3g} GB (--kv-cache-gb); lower n, best_of or max_tokens"
            )
        most = self.most_positions()
        if need > most:
            raise KVBudgetError(
                f"the request needs KV cache for {need} positions (prompt {prompt} + max_tokens "
                f"{max_tokens}, {self.positions_for(need) * self.position_bytes / GB:.3g} GB) but the KV "
                f"cache budget of {self.budget_bytes / GB:.3g} GB (--kv-cache-gb) holds at most {most} "
                f"positions per request; lower max_tokens or shorten the prompt"
            )

    def can_hold(self, length: int, running: int = 0, rows: int = 1) -> bool:
        """Whether `rows` new rows of `length` positions each fit in the free budget now,
        leaving each of the `running` rows room for its next chunk (so admitting a prompt
        does not take the room running answers are about to grow into)."""
        need = rows * self.positions_for(length) + running * self.chunk
        return need * self.position_bytes <= self.free_bytes

    def grow(self, row: int, length: int) -> bool:
        """Make `row` hold `length` positions: all of it, or nothing and False when the
        budget (or the row's share) has no room."""
        need = self.positions_for(length)
        extra = need - self.held[row]
        if extra <= 0:
            return True
        if need > self.row_limit or (self.used_positions + extra) * self.position_bytes > self.budget_bytes:
            return False
        self.held[row] = need
        self.used_positions += extra
        return True

    def full_error(self, length: int, running: int) -> KVBudgetError:
        return KVBudgetError(
            f"the KV cache is full: this answer needed room for position {length} but the KV cache "
            f"budget of {self.budget_bytes / GB:.3g} GB (--kv-cache-gb) is held by {running} running "
            f"requests; retry, or start the server with a larger --kv-cache-gb"
        )

    # ------------------------------------------------------------ rows

    def release(self, row: int, keep: int = 0) -> None:
        """Give back what `row` holds beyond its first `keep` positions (keep: a multiple
        of chunk, or 0): the budget's count and, on CPU, the memory itself."""
        held = self.held[row]
        if held <= keep:
            return
        if self._map is not None:
            self._drop_pages(row, keep, held)
        self.used_positions -= held - keep
        self.held[row] = keep

    def move(self, src: int, dst: int, length: int) -> None:
        """Move a sequence's `length` positions from row src to row dst (keeps the running
        batch in rows 0..N-1); src ends empty."""
        for cache in (*self.k, *self.v):
            cache[dst, :, :length].copy_(cache[src, :, :length])
        keep = self.held[src]
        self.release(dst, min(keep, self.held[dst]))  # the old sequence's tail beyond what src held
        self.used_positions += keep - self.held[dst]
        self.held[dst] = keep
        self.release(src)

    def copy(self, src: int, dst: int, length: int) -> None:
        """Give row dst (which grow made room for) the first `length` positions of row src;
        src keeps its own (n choices share one prefill)."""
        for cache in (*self.k, *self.v):
            cache[dst, :, :length].copy_(cache[src, :, :length])

    def release_all(self) -> None:
        for row in range(self.max_batch):
            self.release(row)

    def _drop_pages(self, row: int, start: int, end: int) -> None:
        s = self.shape
        first, last = start * self._plane_row, end * self._plane_row  # page-aligned: chunks are whole pages
        for kv in range(2):
            for layer in range(s.layers):
                for head in range(s.kv_heads):
                    plane = (((kv * s.layers + layer) * self.max_batch + row) * s.kv_heads + head) * self._plane_bytes
                    self._map.madvise(mmap.MADV_DONTNEED, plane + first, last - first)
