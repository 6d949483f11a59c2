"""The one exception family the CLI turns into a one-line message and exit code 1."""


class HatrackError(Exception):
    """A user-facing failure. str(err) is the whole message: one line, no traceback."""


def disk_condition(err: OSError) -> str | None:
    """The condition behind an OSError a user can act on ('disk full' rather than errno
    28), or None for other errors."""
    import errno

    return {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
            errno.EFBIG: "file size limit reached", errno.EACCES: "permission denied"}.get(err.errno)


def describe_os_error(err: OSError) -> str:
    """An OSError in one line: where, and what (the condition, else the system's words)."""
    what = disk_condition(err) or err.strerror or str(err)
    return f"{err.filename}: {what}" if err.filename is not None else what
