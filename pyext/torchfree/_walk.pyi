from ._scan import flatten as flatten

__all__ = ["flatten"]
