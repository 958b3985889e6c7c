"""flatten() and the walk under it: the dotted names of every tensor in nested containers
(Opaque placeholders included), made in C by ``_core.walk`` with the children listed here."""

from __future__ import annotations

import collections

from . import _core
from ._types import Opaque

__all__ = ["flatten"]


def _children(obj):
    """(name, child) pairs of a container, in order; None for leaves and scalars."""
    if isinstance(obj, dict):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(obj)]
    if isinstance(obj, Opaque):
        # an Opaque's state comes first, then its items, list and args; a state that is itself an
        # Opaque (BUILD of BUILD ...) is followed down in a loop, not by recursion: a hostile pickle
        # can chain them deeper than Python's stack, or make one its own state
        chain, seen = [obj], {id(obj)}
        while isinstance(chain[-1].state, Opaque) and id(chain[-1].state) not in seen:
            seen.add(id(chain[-1].state))
            chain.append(chain[-1].state)
        out = []
        state = chain[-1].state
        if isinstance(state, tuple) and len(state) == 2 and all(isinstance(s, (dict, type(None))) for s in state):
            for part in state:
                out += _children(part or {})
        elif isinstance(state, (dict, list, tuple)):
            out += _children(state)
        for o in reversed(chain):
            out += [(str(k), v) for k, v in o.items.items()]
            out += [(str(i), v) for i, v in enumerate(o.list)]
            if o.args and not o.wrapper_subclass:  # a wrapper's args: its placeholder
                out += [(f"args.{i}", v) for i, v in enumerate(o.args)]
        return out
    return None


def _max_depth(opts) -> int:
    """How deep the walk may go: the loader's ``marks`` limit (container nesting)."""
    lim = opts.get("limits") if opts else None
    return int(lim["marks"]) if lim else _core.LIMITS["marks"]


_PAIRS, _INDEX, _INFOS, _FIND = 0, 1, 2, 3


def _walk(obj, sep=".", refs=False, max_depth=None):
    """[(dotted name, leaf)] of every array (and TensorRef when refs) under obj, depth first, a
    shared container once; C (_core.walk), with Opaque children from _children."""
    return _core.walk(obj, _PAIRS, sep, _children, refs, max_depth=max_depth or _core.LIMITS["marks"])


def flatten(obj, sep: str = ".") -> "collections.OrderedDict[str, np.ndarray]":
    """Every tensor in nested containers (and in Opaque states) by dotted path.

    ``{"model_state_dict.fc1.weight": array, "optimizer_state_dict.state.0.momentum_buffer": ...}``.
    A bare array flattens to ``{"": array}``. The names are the ones ``scan`` and ``open`` use.
    A quantized or sparse tensor is one entry, the ``QuantizedArray`` / ``SparseArray`` itself
    (its integers, scales, indices and values are not listed apart), as torch's ``state_dict()``
    holds the quantized tensor: a dynamic-quantized Linear's weight is
    ``"0._packed_params._packed_params.0"``, its bias ``"...1"``.
    """
    return collections.OrderedDict(_walk(obj, sep))
