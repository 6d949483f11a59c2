"""`hatrack train --processes N`: the same `hatrack train` run by N processes under
torch.distributed's elastic agent, the launcher `accelerate launch --multi_gpu` runs
(it starts the processes, and stops them all as soon as one fails)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys

from hatrack.errors import HatrackError
from hatrack.trainer.api import TrainConfig
from hatrack.trainer.distributed import cpu_count

# what `accelerate launch` needs to start N processes on this machine without asking
# (with --cpu it would start one process; --multi_gpu starts N, and on a machine
# without a GPU each process trains on the CPU, joined by gloo)
LAUNCH_FLAGS = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def train_argv(config: TrainConfig, as_json: bool) -> list[str]:
    """`hatrack train` arguments that give `config` (options left at their default are left out)."""
    argv = ["train"]
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli") is False:
            continue
        value = getattr(config, f.name)
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if f.name == "tags":
            for key, tag in value.items():
                argv += [flag, f"{key}={tag}"]
        elif f.default is not dataclasses.MISSING and value == f.default:
            continue
        elif isinstance(value, bool):
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return argv + (["--json"] if as_json else [])


def accelerate_command(processes: int, argv: list[str]) -> list[str]:
    """The `accelerate launch` command line that runs `hatrack <argv>` in `processes` processes."""
    return ["accelerate", "launch", *LAUNCH_FLAGS, "--num_processes", str(processes), "-m", "hatrack.cli.main", *argv]


def run(config: TrainConfig, processes: int, as_json: bool) -> int:
    """Run `hatrack train` in `processes` processes on this machine, through
    torch.distributed's elastic agent (what `accelerate launch --multi_gpu` runs);
    0 when all finished. A process that fails stops the others; its own error line
    is the one printed, else one line here says which process ended and how."""
    import logging
    import uuid

    argv = train_argv(config, as_json)
    _check_gpus(processes)
    if not as_json:
        print(f"training in {processes} processes, as: {shlex.join(accelerate_command(processes, argv))}",
              file=sys.stderr, flush=True)
    # each process gets its share of the cores; left alone, every one would use all
    # of them and they would spin against each other
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // processes)))

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure report: ours below
    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0",  # a free port, as torchrun --standalone
        max_restarts=0, monitor_interval=0.1,
    )
    try:
        elastic_launch(launch, sys.executable)("-m", "hatrack.cli.main", *argv)
    except SignalException:  # Ctrl-C (or a TERM): the agent has stopped the processes
        raise KeyboardInterrupt from None
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode == 1:
            return 1  # hatrack's error line, printed by that process
        raise HatrackError(f"process {rank} of {processes} {_how_it_ended(failure.exitcode)}; "
                           "the other processes were stopped") from None
    return 0


def _check_gpus(processes: int) -> None:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and processes > gpus:
        raise HatrackError(f"--processes {processes}: this machine has {gpus} GPU(s), and each process takes one")


def _how_it_ended(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"
