"""The one exception family the CLI turns into a one-line message and exit code 1."""


class HatrackError(Exception):
    """A user-facing failure. str(err) is the whole message: one line, no traceback."""


def describe_os_error(err: OSError) -> str:
    """An OSError in words a user acts on: where, and 'disk full' rather than errno 28."""
    import errno

    what = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied", errno.EFBIG: "file too large"}.get(err.errno, err.strerror or str(err))
    return f"{err.filename}: {what}" if err.filename is not None else what
