"""Writing files so that a crash leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import secrets

__all__ = ["atomic_write", "write_through_file"]


def atomic_write(path, write) -> None:
    """Call ``write(fd)`` on a new temporary file next to ``path``, fsync it, rename it over
    ``path`` and fsync the folder.

    A symlink is replaced at its target; the replaced file's permissions are kept (a new file gets
    what a plain ``open()`` would give). On any error the temporary file is removed and the old
    file is left as it was.
    """
    path = os.fsdecode(os.fspath(path))
    target = os.path.realpath(path) if os.path.islink(path) else path
    directory = os.path.dirname(os.path.abspath(target))
    try:
        mode = os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        mode = None
    base = os.path.basename(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)  # permissions as a plain open() would give (umask)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise FileExistsError(f"cannot create a temporary file next to {target!r}")
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)  # replacing a file keeps its permissions
            write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def write_through_file(write):
    """Adapt ``write(fh)`` (a binary file object) to ``atomic_write``'s ``write(fd)``."""

    def run(fd: int) -> None:
        with os.fdopen(fd, "wb", closefd=False) as fh:
            write(fh)
            fh.flush()

    return run


def _fsync_dir(directory: str) -> None:
    """Make the rename durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
