"""A training run spread over several processes (`accelerate launch`, torchrun): which
process this is, and the few exchanges `train()` needs between them.

Every process trains on its shard of the rows (accelerate's sampler) and scores its
share of the held-out rows; the main process alone prepares the run folder, converts
the base, writes checkpoints and the adapter, and registers the one version. A process
that dies makes the others fail at their next exchange (the launcher also stops
them); one that hangs makes them fail after `HATRACK_DIST_TIMEOUT` seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

from hatrack.errors import HatrackError

TIMEOUT_ENV = "HATRACK_DIST_TIMEOUT"
# longer than the slowest step one process takes alone while the others wait: the
# main process converting the default base on first use, or registering the version
DEFAULT_TIMEOUT_S = 900

T = TypeVar("T")


class FailedOnMainProcess(HatrackError):
    """Raised on the other processes when the main one failed; the main process has
    already printed the error, so the CLI prints nothing more for this one."""


def timeout_s() -> int:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = int(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise HatrackError(f"{TIMEOUT_ENV} must be a whole number of seconds; got {raw!r}") from None
    if value < 1:
        raise HatrackError(f"{TIMEOUT_ENV} must be at least 1; got {value}")
    return value


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass(frozen=True)
class Processes:
    """This process's place in the run; one process (rank 0 of 1) when not launched."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------ exchanges

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value`, in rank order (a picklable object)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """fn() run by the main process alone, its result (or its HatrackError) handed
        to every process."""
        if not self.distributed:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        failure: HatrackError | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except HatrackError as err:
                failure, box[0] = err, ("error", str(err))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if failure is not None:
            raise failure
        if kind == "error":
            raise FailedOnMainProcess(value)
        return value

    def main_first(self, fn: Callable[[], T]) -> T:
        """fn() on the main process, then on the others (which then find its work done:
        a converted base, a downloaded file)."""
        if not self.distributed:
            return fn()
        if self.is_main:
            return self.from_main(fn)
        self.from_main(lambda: None)
        return fn()

    def finish(self, clean: bool) -> None:
        """Leave the run. After a clean end every process first waits for the others (the
        main one registering the version), so none takes its connections down while a
        peer is still working; after a failure a peer may be gone, so none waits."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                if clean:
                    try:
                        dist.barrier()
                    except RuntimeError:
                        pass  # a peer failed after this process's part was done; that peer reports it
                dist.destroy_process_group()


def current() -> Processes:
    """This process's place, as the launcher's environment says (RANK, WORLD_SIZE, ...)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Processes()
    return Processes(
        rank=_env_int("RANK", 0),
        world=world,
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world=_env_int("LOCAL_WORLD_SIZE", world),
    )


def start(device: str) -> Processes:
    """Join the launched run (gloo on CPU, NCCL on CUDA) with the hang timeout; on CPU
    give each process its share of the cores, so processes do not spin against each other."""
    procs = current()
    if not procs.distributed:
        return procs
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(procs.local_rank)
    else:
        torch.set_num_threads(threads_per_process(procs.local_world))
    if not procs.is_main:  # the main process shows progress for all
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s()))
    return procs


_PEER_GONE = ("connection reset by peer", "connection closed by peer", "broken pipe", "timed out")


def lost_peer(err: BaseException) -> str | None:
    """The gist of an error a collective raises when another process died or hung, else None."""
    text = str(err).lower()
    for gist in _PEER_GONE:
        if gist in text:
            return gist
    return None


def threads_per_process(processes: int) -> int:
    """OMP_NUM_THREADS where set (the launcher or the user), else this machine's cores
    shared out among the processes on it."""
    explicit = _env_int("OMP_NUM_THREADS", 0)
    if explicit >= 1:
        return explicit
    return max(1, cpu_count() // max(1, processes))


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
