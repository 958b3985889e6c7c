"""Writing files so that a crash leaves the old file or the new one, never a torn one, and
never pulling a file away from the arrays and tensors of this process that map it.

Imported by ``import torchfree`` (loads note their mappings here): only builtin modules.
"""

from __future__ import annotations

import errno
import os
import stat as _stat
from _weakref import ref as _ref  # weakref.ref itself; `import weakref` costs ~1.5 ms

__all__ = ["atomic_write", "write_through_file", "note_mapping", "is_mapped", "open_rewrite",
           "check_file_object", "check_parent"]


# ---- files this process maps --------------------------------------------------------------
#
# A file that live arrays or tensors map must not be truncated or rewritten in place: a mapped
# page read after the file shrank faults (SIGBUS: the process dies), and a page of a private
# (copy-on-write) mapping that was never written to shows the file's new bytes. Replacing the
# file (a new file renamed over its name) is harmless: the mappings keep the old inode.
#
# Every mapping torchfree makes of a file is noted with the file's (st_dev, st_ino) until the
# mmap object is freed, which is when the last array, tensor or storage viewing it is (they hold
# memoryviews of it); writers look their target up here, and on Linux also in /proc/self/maps
# (mappings made by others: torch.load(mmap=True), numpy.memmap). Noting costs a weak reference
# and a dict entry per mapping, nothing per array.

_maps: dict = {}  # weak reference to a live mmap.mmap -> (st_dev, st_ino) of the file it maps


def _forget(ref) -> None:
    _maps.pop(ref, None)


def note_mapping(mapping, st) -> None:
    """Note that ``mapping`` (an ``mmap.mmap``) maps the file whose ``os.stat`` result is ``st``,
    for as long as the mapping object lives."""
    _maps[_ref(mapping, _forget)] = (st.st_dev, st.st_ino)


def _noted(st) -> bool:
    return (st.st_dev, st.st_ino) in _maps.values()


def _proc_maps_has(st) -> bool:
    """Whether /proc/self/maps lists a mapping of the file of ``st`` (False where there is none)."""
    try:
        with open("/proc/self/maps", "rb") as fh:
            data = fh.read()
    except OSError:
        return False
    ino = b"%d" % st.st_ino
    if b" " + ino + b" " not in data:  # "<addr> <perms> <offset> <major>:<minor> <inode>   <path>"
        return False
    for line in data.splitlines():
        parts = line.split(None, 5)
        if len(parts) >= 5 and parts[4] == ino:
            major, _, minor = parts[3].partition(b":")
            try:
                if os.makedev(int(major, 16), int(minor, 16)) == st.st_dev:
                    return True
            except ValueError:
                continue
    return False


def is_mapped(st) -> bool:
    """Whether memory of this process maps the file of ``st``: a mapping of torchfree's (a load
    with mmap, ``open``, ``safetensors``), or, on Linux, any other (``/proc/self/maps``)."""
    return _noted(st) or _proc_maps_has(st)


_MAPPED_HINT = ("arrays or tensors of this process map it (a load with mmap): writing it in place "
                "would change their values or kill the process (SIGBUS) when they are read")


def open_rewrite(path):
    """A descriptor of ``path`` opened to be written from its start (created, or truncated), as
    ``open(path, "wb")``; or ``None``, touching nothing, when memory of this process maps the file:
    it must then be replaced (``atomic_write``), not rewritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        st = os.fstat(fd)
        if _stat.S_ISREG(st.st_mode):
            # an empty file has no page to lose: /proc/self/maps is read only for files with bytes
            if _noted(st) or st.st_size and _proc_maps_has(st):
                os.close(fd)
                return None
            if st.st_size:
                os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_file_object(f) -> None:
    """Raise ``OSError`` (``errno.ETXTBSY``) before anything is written through the file object
    ``f`` when its file is mapped by this process: a file object cannot be replaced by renaming."""
    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, ValueError, TypeError):  # BytesIO, closed, no descriptor
        return
    if not _stat.S_ISREG(st.st_mode) or not is_mapped(st):
        return
    name = getattr(f, "name", None)
    what = f"the file object's file {name!r}" if isinstance(name, (str, bytes)) else "the file object's file"
    truncated = " (it is empty: opening it with mode 'wb' has truncated it already)" if st.st_size == 0 else ""
    raise OSError(errno.ETXTBSY,
                  f"refusing to write through a file object: {what} cannot be written in place, {_MAPPED_HINT}"
                  f"{truncated}. Save to its path instead (torchfree writes a new file and renames it over "
                  "the old one), or load with mmap=False")


def _cannot_replace(target: str, e: OSError) -> OSError:
    return OSError(e.errno, f"{_MAPPED_HINT}, so it is replaced by a new file renamed over it, which failed: "
                            f"{e.strerror or e}; the file was left as it was (save elsewhere, or load it with "
                            "mmap=False)", target)


# ---- atomic writes ------------------------------------------------------------------------


def _parent_of(path: str) -> str:
    """The folder part of ``path`` as torch.save names it: everything before the last ``/``."""
    return path[:path.rfind("/")] if "/" in path else ""


def check_parent(path: str) -> None:
    """Raise ``FileNotFoundError`` naming ``path`` when the folder it would be written in does not
    exist (or is not a folder): "Parent directory nodir does not exist", as torch.save says it."""
    parent = _parent_of(path)
    if parent and not os.path.isdir(parent):
        raise FileNotFoundError(errno.ENOENT, f"Parent directory {parent} does not exist", path)


def _named(e: OSError, path: str, what: str, hint: str = "") -> OSError:
    """``e`` again, naming ``path`` (the user's) instead of the temporary file."""
    return type(e)(e.errno, f"{what}: {e.strerror or e}{hint}", path)


def atomic_write(path, write, *, sync=True, mapped=False, in_place_hint="") -> None:
    """Call ``write(fd)`` on a new temporary file next to ``path``, fsync it, rename it over
    ``path`` and fsync the folder.

    A symlink is replaced at its target; the replaced file's permissions are kept (a new file gets
    what a plain ``open()`` would give). On any error the temporary file is removed and the old
    file is left as it was. ``sync=False`` skips both fsyncs (the rename alone: for a target that
    must be replaced because it is mapped, not for crash safety); ``mapped=True`` says so in the
    error raised when the temporary file cannot be made or renamed. Errors name ``path``, never the
    temporary file; ``in_place_hint`` is added to the error when only the folder is not writable
    (the temporary file cannot be made there, the file itself could be written in place).
    """
    path = os.fsdecode(os.fspath(path))
    check_parent(path)
    target = os.path.realpath(path) if os.path.islink(path) else path
    directory = os.path.dirname(os.path.abspath(target))
    try:
        mode = os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        mode = None
    base = os.path.basename(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.{os.urandom(6).hex()}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)  # permissions as a plain open() would give (umask)
            break
        except FileExistsError:
            continue
        except OSError as e:
            if mapped:
                raise _cannot_replace(target, e) from e
            hint = ""
            if (in_place_hint and e.errno in (errno.EACCES, errno.EPERM) and mode is not None
                    and os.access(target, os.W_OK)):
                hint = f"; the file itself is writable: {in_place_hint}"
            raise _named(e, path, f"cannot create a temporary file in the folder {directory!r} to write it "
                                  "atomically", hint) from e
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise FileExistsError(f"cannot create a temporary file next to {target!r}")
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)  # replacing a file keeps its permissions
            write(fd)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, target)
        except OSError as e:
            if mapped:
                raise _cannot_replace(target, e) from e
            raise _named(e, path, "cannot rename the temporary file over it") from e
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync:
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
