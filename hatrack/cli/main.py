"""Entry point of the `hatrack` command. Each command group lives in its own module
and adds itself to the app through `install(app)`."""

from __future__ import annotations

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
    from hatrack.cli import demo_cmd, integration_cmds, registry_cmds, serve_cmds, train_cmds

    for module in (registry_cmds, train_cmds, serve_cmds, demo_cmd, integration_cmds):
        module.install(app)


_install_commands()


def main() -> None:
    """Run the app; a HatrackError becomes one line on stderr and exit code 1."""
    from hatrack.cli import quiet

    quiet.install()  # before any command imports a library
    try:
        app()
    except HatrackError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:  # a full or read-only disk, a missing folder: one line, not a traceback
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
