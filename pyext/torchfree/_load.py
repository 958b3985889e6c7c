"""load(): a shard index to _shards, any other input (path, bytes-like or file object) to
_source.load_file (safetensors, or the C core by run_load)."""

from __future__ import annotations

from ._source import (  # noqa: F401  (names older code imports from here)
    Source,
    _is_index_json,
    is_index_json,
    is_safetensors,
    load_file,
    load_safetensors,
    options,
    safetensors_entries,
    safetensors_input,
    safetensors_meta,
)


def load(f, map_location=None, *, mmap=None, weights_only=True, safe_globals=None, encoding="utf-8",
         limits=None):
    """Load a checkpoint written by ``torch.save`` and return it with numpy arrays for tensors.

    A safetensors file (told by its header, whatever its name) gives what
    ``torchfree.safetensors.load_file`` returns (``MetaArray``s with ``map_location="meta"``).

    Args:
        f: a path (``str`` or ``os.PathLike``), a bytes-like object (``bytes``, ``bytearray``,
            ``memoryview``, ``mmap``) or a binary file object (read from its current position).
        map_location: ``None`` (keep each storage's saved location), a location string such as
            ``"cpu"`` or ``"meta"`` (or any object whose ``str()`` is one, e.g. a
            ``torch.device``), a dict ``{saved: target}``, or a callable
            ``fn(storage, saved_location)`` called once per storage record.
        mmap: ``None`` maps the file when ``f`` is a path (copy-on-write, zero-copy); ``True``
            requires mapping; ``False`` copies every storage into memory the arrays own.
        weights_only: ``True`` rebuilds only allowlisted globals (torch's default allowlist
            plus numpy arrays and ``argparse.Namespace``); ``False`` turns unknown globals into
            inert ``torchfree.Opaque`` placeholders. Nothing is ever imported or executed.
        safe_globals: globals you trust: a dict ``{"module.name": obj}`` or an iterable of
            classes/functions, rebuilt as pickle would.
        encoding: how Python 2 ``str`` objects are decoded (``"bytes"`` keeps them as bytes).
        limits: a dict overriding entries of ``torchfree.LIMITS``.

    Raises:
        FormatError, UnpicklingError, UnsafeGlobalError, LimitError (all ``CheckpointError``),
        ``TypeError`` for a bad ``map_location``, ``ValueError`` for ``mmap=True`` on a non-path.
    """
    opts = options(map_location, weights_only, safe_globals, encoding, limits)
    if is_index_json(f):
        from ._shards import load_sharded  # here: import torchfree does not need it

        return load_sharded(f, mmap=mmap, **opts)
    return load_file(f, map_location, mmap, opts)
