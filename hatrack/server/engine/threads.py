"""OpenMP thread pools, and why the engine's thread should own the only busy one.

libgomp, torch's OpenMP on Linux, keeps a pool of worker threads for every thread that has
run a parallel region, for as long as that thread lives. While all pools' threads together
outnumber the CPUs, its workers stop spinning between regions (a "throttled" 100 spins) and
every parallel region then waits for a futex wake-up of another core. Measured on a 2-core
AMD EPYC VM (2026-12-01): the default base's 210 bf16 projections at 8 rows took 13 ms on a
thread whose pool was the only one, 22 ms while another thread's pool lived.

So the engine's start-up work (probes, packing, allocations) runs on a thread that exits
when done (`on_passing_thread`): an Engine built on a caller's long-lived thread left that
thread's pool beside the engine's, and the default base's decode step at batch 8 took 50 ms
instead of 36 (bench/profile_step.py, same machine and day). A caller that runs
multi-threaded torch work on a long-lived thread of its own beside a running engine slows
the engine the same way. (torch.set_num_threads(1) on a helper thread is no cure: it also
changes torch's process-wide default, and the engine's steps got slower, not faster.)
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def on_passing_thread(fn: Callable[[], T], name: str = "hatrack-engine-init") -> T:
    """fn() on a new thread, with the caller's torch thread count, that exits afterwards
    (taking its OpenMP pool with it). Returns fn's result or raises its exception."""
    threads = torch.get_num_threads()
    grad = torch.is_grad_enabled()  # grad mode is per thread too
    box: dict[str, object] = {}

    def run() -> None:
        torch.set_num_threads(threads)
        try:
            with torch.set_grad_enabled(grad):
                box["result"] = fn()
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]
