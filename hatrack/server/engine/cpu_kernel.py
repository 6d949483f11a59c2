"""The CPU kernels, compiled on first use with the machine's C++ compiler and cached:
the per-row LoRA term (csrc/lora_cpu.cpp), decode attention (csrc/attention_cpu.cpp) and,
on CPUs with AVX-512 BF16, bf16 projections (csrc/linear_cpu.cpp, used by packed_linear.py).

Why a kernel: a decode step that mixes adapters is bound by reading their weights. torch's
batched matmul needs a gathered copy of each row's adapter and runs bf16 far below memory
speed on CPU; the kernel reads every row's adapter in place from the slot bank, in bf16,
once per distinct adapter. Decode attention in one kernel call per layer is batch-invariant
by construction and skips the other threads' wake-ups that torch's five small ops pay for
(bench/RESULTS.md). Where it cannot be built (no compiler, no ninja) the engine
falls back to torch ops and says so once in the log; HATRACK_CPU_KERNEL=0 turns it off.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("hatrack.engine")

SOURCES = tuple(Path(__file__).with_name("csrc") / name
                for name in ("lora_cpu.cpp", "attention_cpu.cpp", "linear_cpu.cpp"))
HEADERS = (Path(__file__).with_name("csrc") / "bf16.h",)  # copied beside the sources, part of the build's name
# -fopenmp: at::parallel_for is OpenMP in torch's CPU builds (without it the kernel runs on
# one thread); the module then binds to the libgomp torch has already loaded.
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def cache_dir() -> Path:
    """HATRACK_KERNEL_CACHE, else the user's cache folder: shared by every HATRACK_HOME on
    this machine, so a build happens once per machine and source version."""
    if os.environ.get("HATRACK_KERNEL_CACHE"):
        return Path(os.environ["HATRACK_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hatrack" / "kernels"


@functools.cache  # read once a process: the row-padding probe asks for every projection
def cpu_description(fields: tuple[str, ...] = ("flags",)) -> str:
    """The first CPU's /proc/cpuinfo lines that start with `fields`. The flags alone key a
    -march=native build (its code runs on the CPU it was built for); probe_cache.py also
    keys by model and cache size, which decide the kernels a BLAS picks."""
    lines = []
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if not line.strip():
                    break  # the first CPU only
                if line.startswith(fields):
                    lines.append(line.strip())
    except OSError:
        pass
    return "\n".join(lines) or platform.processor() or platform.machine()


def build_name() -> str:
    import torch

    digest = hashlib.sha256()
    # torch's install path too: two environments with one torch version build with other
    # include paths, and sharing a folder would rebuild it at every switch
    sources = (s.read_bytes() for s in (*SOURCES, *HEADERS))
    for part in (*sources, torch.__version__.encode(), os.path.dirname(torch.__file__).encode(),
                 " ".join(CFLAGS).encode(), cpu_description().encode()):
        digest.update(part)
    return f"hatrack_lora_cpu_{digest.hexdigest()[:16]}"


def load() -> Any | None:
    """The compiled module, or None where it cannot be built (the reason is logged once)."""
    if os.environ.get("HATRACK_CPU_KERNEL", "1") == "0":
        return None
    with _lock:
        if "module" in _loaded:
            return _loaded["module"]
        module = None
        try:
            from torch.utils.cpp_extension import load as build

            name = build_name()
            folder = cache_dir() / name
            folder.mkdir(parents=True, exist_ok=True)
            with _build_lock(folder):
                for header in HEADERS:
                    _stable_source(folder, header)
                sources = [str(_stable_source(folder, s)) for s in SOURCES]
                module = build(name=name, sources=sources, extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                               build_directory=str(folder), verbose=False)
        except Exception as exc:  # no compiler, no ninja, a read-only cache: torch ops instead
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning("CPU decode kernels unavailable (%s); using torch ops, slower for mixed batches", first[:300])
        _loaded["module"] = module
        return module


class _build_lock:
    """An flock on the build folder, held while building or loading. The kernel releases it
    when its holder dies, so whoever holds it knows no other build is running: a `lock`
    file torch's builder left there (its holder was killed mid-compile) is stale, and
    torch would otherwise wait for it forever."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.handle = None

    def __enter__(self) -> None:
        self.handle = open(self.folder / ".hatrack-build.lock", "w")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        stale = self.folder / "lock"
        if stale.exists():
            log.warning("removing a stale kernel build lock left by a killed build: %s", stale)
            stale.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _stable_source(folder: Path, source: Path) -> Path:
    """A source copied into the build folder: torch's build file records the source's
    path, so building from each checkout's own path would rebuild for every checkout."""
    copy = folder / source.name
    data = source.read_bytes()
    if not copy.exists() or copy.read_bytes() != data:
        tmp = copy.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, copy)
    return copy
