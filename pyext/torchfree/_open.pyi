from ._scan import Checkpoint as Checkpoint

__all__ = ["Checkpoint"]
