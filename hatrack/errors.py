"""The one exception family the CLI turns into a one-line message and exit code 1."""


class HatrackError(Exception):
    """A user-facing failure. str(err) is the whole message: one line, no traceback."""
