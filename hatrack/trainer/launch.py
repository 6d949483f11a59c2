"""`hatrack train --processes N`: the same `hatrack train` run by N processes under
accelerate's launcher (torch.distributed's elastic agent: it starts the processes,
and stops them all as soon as one fails). Torch-free: the options and every row are
checked before anything is launched."""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys

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


def accelerate_command(processes: int, argv: list[str], port: int | None = None) -> list[str]:
    """The `accelerate launch` command line that runs `hatrack <argv>` in `processes` processes."""
    port_flags = ["--main_process_port", str(port)] if port else []
    return ["accelerate", "launch", *LAUNCH_FLAGS, "--num_processes", str(processes), *port_flags,
            "-m", "hatrack.cli.main", *argv]


def _free_port() -> int:
    with socket.socket() as sock:  # another run on this machine may hold accelerate's default 29500
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(config: TrainConfig, processes: int, as_json: bool) -> int:
    """Launch the run; its exit status (non-zero when any process failed)."""
    command = accelerate_command(processes, train_argv(config, as_json), _free_port())
    env = dict(os.environ)
    # each process gets its share of the cores; left alone, every one would use all
    # of them and they would spin against each other
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // processes)))
    if not as_json:
        print(f"launching {processes} processes: {shlex.join(command)}", file=sys.stderr, flush=True)
    # Ctrl-C reaches the launcher and its processes from the terminal; this process
    # only waits for them
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *command[2:]], env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
