"""``np``: numpy, imported on first use.

``import torchfree`` and ``torchfree info`` of a zip checkpoint never need numpy (its import is
most of such a process); everything that makes or reads an array does, and gets it here on its
first attribute access: ``from ._np import np``, then ``np.ndarray`` as usual.
"""

from __future__ import annotations

__all__ = ["np"]


class _Numpy:
    """Stands for the numpy module: the first attribute asked for imports it and copies its
    namespace here, so later lookups are plain attribute hits; names numpy makes on demand
    (module ``__getattr__``) are asked of numpy itself."""

    def __getattr__(self, name):
        import numpy

        ns = self.__dict__
        if not ns:
            ns.update(vars(numpy))
            if name in ns:
                return ns[name]
        return getattr(numpy, name)

    def __repr__(self) -> str:
        return "<numpy, imported on first use>"


np = _Numpy()
