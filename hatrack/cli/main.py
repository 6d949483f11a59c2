"""Entry point of the `hatrack` command. Each command group lives in its own module
and adds itself to the app through `install(app)`."""

from __future__ import annotations

import os
import sys

import typer

from hatrack.errors import HatrackError, describe_os_error

app = typer.Typer(
    name="hatrack",
    help="Train, register and serve many LoRA adapters from one quantized base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _install_commands() -> None:
    from hatrack.cli import demo_cmd, hub_cmds, integration_cmds, registry_cmds, serve_cmds, train_cmds, ui_cmd

    for module in (registry_cmds, train_cmds, serve_cmds, ui_cmd, demo_cmd, hub_cmds, integration_cmds):
        module.install(app)


_install_commands()


def main() -> None:
    """Run the app; a HatrackError becomes one line on stderr and exit code 1."""
    from hatrack.cli import quiet
    from hatrack.trainer.distributed import current

    quiet.install()  # before any command imports a library
    code = _run_app()
    if current().distributed:
        # a process of a launched training run leaves without the interpreter's teardown:
        # there, now and then, a C++ thread of torch.distributed aborts the process
        # ("terminate called without an active exception", SIGABRT), and the launcher
        # would call the whole run failed after its version was registered
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _run_app() -> int:
    """The app's exit code."""
    try:
        app()
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        print(done.code, file=sys.stderr)
        return 1
    except HatrackError as err:
        _print_error(err)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a full or read-only disk, a missing folder: one line, not a traceback
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    return 0


def _print_error(err: HatrackError) -> None:
    """One line; in a run of several processes the main one speaks for all, and another
    says which it is when it alone failed."""
    from hatrack.trainer.distributed import FailedOnMainProcess, current

    rank = current().rank
    if isinstance(err, FailedOnMainProcess):
        return
    print(f"error: (process {rank}) {err}" if rank else f"error: {err}", file=sys.stderr)


if __name__ == "__main__":
    main()
