from typing import Any

__all__ = ["np"]

class _Numpy:
    """numpy, imported on its first attribute access."""

    def __getattr__(self, name: str) -> Any: ...

np: _Numpy
