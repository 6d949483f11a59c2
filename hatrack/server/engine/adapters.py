"""The tiered adapter cache: device slots (bounded, LRU, pinned while in use), host
memory (bounded, LRU; each adapter staged in the slots' layout, in pinned memory on
CUDA), and disk through each spec's `load`, run on loader threads with
one load per key however many requests want it."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from hatrack.server.engine.errors import AdapterFormatError, memory_error
from hatrack.server.engine.lora import LoraWeights
from hatrack.server.engine.slots import SlotBank, StagedAdapter
from hatrack.server.engine.types import AdapterSpec


class AdapterCache:
    """Slot bookkeeping and `acquire` belong to the scheduler thread; `want` may be
    called from any thread."""

    def __init__(self, bank: SlotBank, max_host: int, on_ready: Callable[[], None], workers: int = 2):
        self.bank = bank
        self.max_host = max(1, max_host)
        self._on_ready = on_ready
        self._lock = threading.Lock()
        self._host: OrderedDict[str, StagedAdapter] = OrderedDict()
        self._loading: dict[str, Future] = {}
        self._failed: dict[str, BaseException] = {}
        self._wanted: dict[str, int] = {}  # requests waiting for each key
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._pins = [0] * (bank.n_slots + 1)
        self._free = list(range(1, bank.n_slots + 1))
        self.load_seconds: deque[float] = deque(maxlen=64)
        self.loads_total = 0  # monotonic, so a reader of the bounded deque knows what is new
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hatrack-adapter-load")

    # ------------------------------------------------------------ any thread

    def want(self, spec: AdapterSpec) -> None:
        """A request for `spec` was queued: start loading it now if it is nowhere yet."""
        with self._lock:
            key = spec.key
            if key in self._failed and not self._wanted.get(key):
                del self._failed[key]  # an old failure nobody saw: try again
            self._wanted[key] = self._wanted.get(key, 0) + 1
            self._ensure_loading(spec)

    def unwant(self, key: str) -> None:
        with self._lock:
            left = self._wanted.get(key, 0) - 1
            if left > 0:
                self._wanted[key] = left
            else:
                self._wanted.pop(key, None)
                self._failed.pop(key, None)

    def loaded_keys(self) -> list[str]:
        with self._lock:
            return list(self._slot_of)

    def host_keys(self) -> list[str]:
        with self._lock:
            return list(self._host)

    def pinned_slots(self) -> int:
        """Device slots in use by running sequences."""
        with self._lock:
            return sum(1 for pins in self._pins if pins)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _ensure_loading(self, spec: AdapterSpec) -> None:  # holds _lock
        key = spec.key
        if key in self._slot_of or key in self._host or key in self._loading or key in self._failed:
            return
        self._loading[key] = self._executor.submit(self._load, spec)

    def _load(self, spec: AdapterSpec) -> None:
        started = time.perf_counter()
        try:
            weights = spec.load()
            if not isinstance(weights, LoraWeights):
                raise AdapterFormatError(f"adapter {spec.key}: load returned {type(weights).__name__}, not LoraWeights")
            self.bank.check(weights, spec.key)
            staged = self.bank.stage(weights)  # the slot's layout, made here rather than on the engine thread
        except Exception as exc:  # delivered to the requests that wanted this adapter
            with self._lock:
                self._loading.pop(spec.key, None)
                self._failed[spec.key] = exc
        else:
            with self._lock:
                self._loading.pop(spec.key, None)
                self._host[spec.key] = staged
                self._host.move_to_end(spec.key)
                self._trim_host()
                self.load_seconds.append(time.perf_counter() - started)
                self.loads_total += 1
        self._on_ready()

    def _trim_host(self) -> None:  # holds _lock; never drops one a queued request waits for
        for key in list(self._host):
            if len(self._host) <= self.max_host:
                break
            if not self._wanted.get(key):
                del self._host[key]

    # ------------------------------------------------------------ scheduler thread

    def acquire(self, spec: AdapterSpec) -> int | BaseException | None:
        """The pinned device slot holding `spec`, copying it in if needed; the load's
        exception if loading failed, or the copy's (an EngineMemoryError when growing
        the slot bank ran out of memory; the slot stays free, the bank as it was); None
        if it must wait (still loading, or every slot is pinned by running sequences)."""
        key = spec.key
        with self._lock:
            slot = self._slot_of.get(key)
            if slot is not None:
                self._slot_of.move_to_end(key)
                self._pins[slot] += 1
                return slot
            if key in self._failed:
                return self._failed[key]
            weights = self._host.get(key)
            if weights is None:
                self._ensure_loading(spec)
                return None
            slot = self._take_slot()
            if slot is None:
                return None
            self._host.move_to_end(key)
        held = self.bank.rank
        try:
            self.bank.write(slot, weights)  # a copy into the slot (the bank grows for a larger rank)
        except Exception as exc:  # out of memory growing the bank: this request fails, the slot is free again
            with self._lock:
                self._free.insert(0, slot)
            what = (f"growing the adapter slot bank from rank {held} for adapter {key} (rank {weights.rank})"
                    if weights.rank > held else f"copying adapter {key} into a device slot")
            return memory_error(exc, what)
        with self._lock:
            self._slot_of[key] = slot
            self._pins[slot] = 1
        return slot

    def release(self, slot: int) -> None:
        if slot:
            with self._lock:
                self._pins[slot] -= 1

    def _take_slot(self) -> int | None:  # holds _lock
        if self._free:
            return self._free.pop(0)
        for key, slot in self._slot_of.items():  # least recently used first
            if self._pins[slot] == 0:
                del self._slot_of[key]
                return slot
        return None
