"""State-dict tools: load a state_dict into numpy arrays with torch's semantics, rename keys,
and address optimizer state by parameter name. Pure Python + numpy; torch is never imported.

* :func:`load_state_dict` copies a state_dict into the arrays of a mutable mapping in place, as
  ``torch.nn.Module.load_state_dict`` does for a module: same missing/unexpected keys (returned
  as :class:`IncompatibleKeys`), same error text, raised as one :class:`StateDictError`.
* :func:`rename_keys` (and :func:`rename_map`, the report of what it renames) applies prefix,
  regex or callable rules and keeps ``_metadata`` in step with the new names;
  :func:`strip_prefix`, :func:`add_prefix` and :func:`select_prefix` are the usual cases of it.
* :func:`compare_state_dicts` lists key-set, shape and dtype differences.
* :func:`optimizer_state_by_name` / :func:`optimizer_state_from_names` convert a
  ``torch.optim`` state_dict between integer parameter ids and parameter names.
* :func:`module_state_dict` gives the state_dict a whole pickled model (``torch.save(model)``,
  loaded with ``weights_only=False``) would return from ``model.state_dict()``.

:class:`StateDictError` is a ``ValueError`` (a state_dict that does not fit its target is a bad
argument, not a bad checkpoint, so it is *not* a ``torchfree.CheckpointError``); it is also a
``RuntimeError``, the class torch raises, so ``except RuntimeError`` code written for torch
keeps working.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from ._types import MetaArray, Opaque

__all__ = [
    "load_state_dict",
    "rename_keys",
    "rename_map",
    "strip_prefix",
    "add_prefix",
    "select_prefix",
    "compare_state_dicts",
    "optimizer_state_by_name",
    "optimizer_state_from_names",
    "module_state_dict",
    "StateDictError",
    "IncompatibleKeys",
    "StateDictDiff",
]

_EXTRA_STATE = "_extra_state"  # torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX


class StateDictError(ValueError, RuntimeError):
    """A state_dict does not fit its target, or a renaming / id mapping is inconsistent.

    For :func:`load_state_dict` the message is torch's (``Error(s) in loading state_dict for
    ...``) and the problems are also available as attributes: ``missing_keys`` and
    ``unexpected_keys`` (lists of str; empty when they did not cause the error) and
    ``error_msgs`` (the other problems, one line each: size mismatches, bad values, casts).
    """

    def __init__(self, message: str, *, missing_keys=(), unexpected_keys=(), error_msgs=()):
        super().__init__(message)
        self.missing_keys = list(missing_keys)
        self.unexpected_keys = list(unexpected_keys)
        self.error_msgs = list(error_msgs)


class IncompatibleKeys(NamedTuple("IncompatibleKeys", [("missing_keys", list),
                                                       ("unexpected_keys", list)])):
    """``(missing_keys, unexpected_keys)``, as torch's ``_IncompatibleKeys``."""

    __slots__ = ()

    def __repr__(self) -> str:
        if not self.missing_keys and not self.unexpected_keys:
            return "<All keys matched successfully>"
        return f"IncompatibleKeys(missing_keys={self.missing_keys!r}, unexpected_keys={self.unexpected_keys!r})"

    __str__ = __repr__


# ---------------------------------------------------------------------------------------------
# load_state_dict
# ---------------------------------------------------------------------------------------------

def _torch_size(shape) -> str:
    """A shape as torch prints it (``torch.Size([3, 4])``), so messages read as torch's."""
    return f"torch.Size([{', '.join(str(int(s)) for s in shape)}])"


def _is_floating(dt: np.dtype) -> bool:
    if dt.kind == "f":
        return True
    if dt.kind != "V" or dt.fields is not None:
        return False
    try:
        import ml_dtypes

        ml_dtypes.finfo(dt)
    except (ImportError, TypeError, ValueError):
        return False
    return True


def _can_cast(src: np.dtype, dst: np.dtype) -> bool:
    """numpy's ``same_kind`` rule, plus float <-> float between any two floating types (ml_dtypes
    registers some of those, e.g. bfloat16 -> float16, as unsafe, which ``same_kind`` means to
    allow)."""
    if np.can_cast(src, dst, casting="same_kind"):
        return True
    return _is_floating(src) and _is_floating(dst)


_NUMBER = (bool, int, float, complex)


def _as_input(value):
    """The checkpoint value as an array (or MetaArray), or None when it is not array-like."""
    if isinstance(value, (np.ndarray, MetaArray)):
        return value
    if isinstance(value, (np.generic,) + _NUMBER):
        return np.asarray(value)
    if hasattr(value, "__array__") or hasattr(value, "__array_interface__"):
        try:
            return np.asarray(value)
        except (TypeError, ValueError, RuntimeError):
            return None
    return None


class _ModuleTree:
    """The module structure implied by a target's keys, to order keys as torch's traversal does.

    torch walks modules depth first (a module's own parameters and buffers, then its children in
    registration order) and attributes each state_dict key to the deepest module whose child
    names it matches. Children are ordered here by first appearance in the target, which is
    registration order when the target is in ``state_dict()`` order.
    """

    def __init__(self, keys):
        self.root: dict = {}
        for key in keys:
            node = self.root
            for comp in key.split(".")[:-1]:
                node = node.setdefault(comp, {})
        self.order: dict[str, int] = {}
        stack = [("", self.root)]
        while stack:
            path, node = stack.pop()
            self.order[path] = len(self.order)
            for name in reversed(list(node)):
                stack.append((f"{path}.{name}" if path else name, node[name]))

    def owner(self, key: str) -> tuple[int, bool]:
        """(preorder index of the module torch checks ``key`` in, False when ``key`` is that
        module's ``_extra_state``: torch reports it before the module's other unexpected keys)."""
        comps = key.split(".")
        node, path, i = self.root, "", 0
        for comp in comps[:-1]:
            if comp not in node:
                break
            node = node[comp]
            path = f"{path}.{comp}" if path else comp
            i += 1
        return self.order[path], i != len(comps) - 1 or comps[-1] != _EXTRA_STATE

    def sort(self, keys, *, extra_first=False):
        """``keys`` grouped by module in torch's traversal order; within a module they keep their
        order (the sort is stable)."""
        if extra_first:
            return sorted(keys, key=self.owner)
        return sorted(keys, key=lambda k: self.owner(k)[0])


def load_state_dict(target: MutableMapping, state_dict: Mapping, *, strict: bool = True,
                    rename=None, name: str | None = None, log: Callable[[str], Any] | None = None,
                    ) -> IncompatibleKeys:
    """Copy ``state_dict`` into the arrays of ``target`` in place, as
    ``torch.nn.Module.load_state_dict`` copies into a module's parameters and buffers.

    Args:
        target: a mutable mapping of name -> ``numpy.ndarray`` (a dict, an ``OrderedDict``, what
            ``torchfree.load`` returned, ...): the model's own arrays, written in place with
            ``numpy.copyto``. A ``None`` value is skipped, like a parameter registered as
            ``None``; a ``MetaArray`` is checked (shape, cast) but not written; a key whose last
            component is ``_extra_state`` is assigned (``target[key] = value``), like
            ``set_extra_state``.
        state_dict: a mapping of name -> value: ``numpy.ndarray`` (ml_dtypes arrays included),
            numpy or Python scalar, or anything ``numpy.asarray`` takes through ``__array__``.
        strict: when true, missing or unexpected keys raise too.
        rename: rules applied to ``state_dict``'s keys first, as in :func:`rename_keys`; the
            returned and reported keys are the new names.
        name: what the error message calls the target (torch: the module's class name);
            default ``type(target).__name__``.
        log: passed to :func:`rename_keys` with ``rename``.

    Returns:
        ``IncompatibleKeys(missing_keys, unexpected_keys)``: target keys absent from
        ``state_dict`` and ``state_dict`` keys absent from ``target``, in torch's order. Both
        are computed in either mode, as torch does.

    Raises:
        StateDictError: listing every problem in torch's words, ``Missing key(s) in state_dict:
            ...`` and ``Unexpected key(s) in state_dict: ...`` (``strict=True`` only), then
            ``size mismatch for KEY: copying a param with shape torch.Size([...]) from
            checkpoint, the shape in current model is torch.Size([...]).`` (both modes), values
            that are not array-like, and casts numpy's ``same_kind`` rule refuses (both modes).
            When it raises, nothing has been written to ``target`` (torch may have copied part).
        TypeError: ``state_dict`` is not a mapping, a key is not a ``str``, or a target value
            cannot be written in place.

    As in torch, a 1-element 1-d value is loaded into a 0-d target (the 0.3 -> 0.4 scalar
    change); a 0-d value into a 1-element target is a size mismatch.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict)}.")
    if not isinstance(target, MutableMapping):
        raise TypeError(f"Expected target to be a mutable mapping of arrays, got {type(target)}.")
    if rename is not None:
        state_dict = rename_keys(state_dict, rename, log=log)
    for k in state_dict:
        if not isinstance(k, str):
            raise TypeError(f"state_dict keys must be str, got {k!r}")

    local: dict[str, Any] = {}  # target key -> target array, None values left out (as torch)
    for k, v in target.items():
        if not isinstance(k, str):
            raise TypeError(f"target keys must be str, got {k!r}")
        if v is None:
            continue
        if not (isinstance(v, (np.ndarray, MetaArray)) or _is_extra(k)):
            raise TypeError(f"target[{k!r}] is {type(v)}, not an array that can be written in place")
        local[k] = v

    tree = _ModuleTree(local)
    missing, errors, writes = [], [], []
    for key in tree.sort(local):
        param = local[key]
        if key not in state_dict:
            missing.append(key)
            continue
        value = state_dict[key]
        if _is_extra(key) and not isinstance(param, (np.ndarray, MetaArray)):
            writes.append((key, None, value))
            continue
        inp = _as_input(value)
        if inp is None:
            errors.append(f'While copying the parameter named "{key}", expected a numpy array or a number '
                          f"from checkpoint but received {type(value)}")
            continue
        if param.ndim == 0 and inp.ndim == 1 and inp.shape[0] == 1:
            inp = inp.reshape(()) if isinstance(inp, np.ndarray) else MetaArray((), inp.dtype)
        if tuple(inp.shape) != tuple(param.shape):
            errors.append(f"size mismatch for {key}: copying a param with shape {_torch_size(inp.shape)} from "
                          f"checkpoint, the shape in current model is {_torch_size(param.shape)}.")
            continue
        problem = None
        if isinstance(inp, MetaArray) and isinstance(param, np.ndarray):
            problem = "cannot copy from a MetaArray: it has no data (the checkpoint was loaded with map_location='meta')"
        elif isinstance(inp.dtype, np.dtype) and isinstance(param.dtype, np.dtype) \
                and not _can_cast(inp.dtype, param.dtype):
            problem = (f"Cannot cast array data from {inp.dtype!r} to {param.dtype!r} "
                       "according to the rule 'same_kind'")
        elif isinstance(param, np.ndarray) and not param.flags.writeable:
            problem = "assignment destination is read-only"
        if problem is not None:
            errors.append(f'While copying the parameter named "{key}", whose dimensions in the model are '
                          f"{_torch_size(param.shape)} and whose dimensions in the checkpoint are "
                          f"{_torch_size(inp.shape)}, an exception occurred : {(problem,)!r}.")
            continue
        writes.append((key, param, inp))

    unexpected = tree.sort((k for k in state_dict if k not in local), extra_first=True)

    msgs = list(errors)
    if strict:
        if unexpected:
            msgs.insert(0, "Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected)))
        if missing:
            msgs.insert(0, "Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
    if msgs:
        label = type(target).__name__ if name is None else name
        raise StateDictError("Error(s) in loading state_dict for {}:\n\t{}".format(label, "\n\t".join(msgs)),
                             missing_keys=missing if strict else (),
                             unexpected_keys=unexpected if strict else (),
                             error_msgs=errors)

    for key, param, inp in writes:
        if param is None:
            target[key] = inp
        elif isinstance(param, np.ndarray):
            np.copyto(param, inp, casting="unsafe")  # the cast was checked above
    return IncompatibleKeys(missing, unexpected)


def _is_extra(key: str) -> bool:
    return key.rpartition(".")[2] == _EXTRA_STATE


# ---------------------------------------------------------------------------------------------
# renaming
# ---------------------------------------------------------------------------------------------

def _path_join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else (a or b)


class _Rules:
    """Compiled renaming rules: ``kind`` is "prefix", "regex" or "callable"."""

    def __init__(self, rules):
        if isinstance(rules, Mapping):
            self.kind = "prefix"
            self.prefixes = {}
            for old, new in rules.items():
                if not isinstance(old, str) or not isinstance(new, str):
                    raise TypeError(f"prefix rules map str to str, got {old!r}: {new!r}")
                self.prefixes[old.rstrip(".")] = new.rstrip(".")
        elif callable(rules):
            self.kind = "callable"
            self.fn = rules
        elif isinstance(rules, Sequence) and not isinstance(rules, (str, bytes)):
            self.kind = "regex"
            self.subs = []
            for item in rules:
                if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
                    raise TypeError(f"regex rules are a list of (pattern, replacement) pairs, got item {item!r}")
                pat, repl = item
                self.subs.append((re.compile(pat), repl))
        else:
            raise TypeError("rules must be a dict of prefix -> prefix, a list of (regex, replacement) pairs "
                            f"or a callable, got {type(rules)}")

    def path(self, path: str) -> str | None:
        """Prefix rules applied to a dotted path (longest matching prefix wins); None if none."""
        comps = path.split(".") if path else []
        for n in range(len(comps), -1, -1):
            old = ".".join(comps[:n])
            if old in self.prefixes:
                return _path_join(self.prefixes[old], ".".join(comps[n:]))
        return None

    def key(self, key: str) -> str:
        if self.kind == "prefix":
            new = self.path(key)
            new = key if new is None else new
        elif self.kind == "regex":
            new = key
            for pat, repl in self.subs:
                new = pat.sub(repl, new)
        else:
            new = self.fn(key)
            if not isinstance(new, str):
                raise TypeError(f"rename callable returned {new!r} for {key!r}; it must return a str")
        if not new:
            raise StateDictError(f'renaming "{key}" gives an empty name')
        return new


def _new_names(keys, rules: _Rules) -> list[str]:
    keys = list(keys)
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"state_dict keys must be str, got {k!r}")
    new = [rules.key(k) for k in keys]
    seen: dict[str, str] = {}
    problems = []
    for old, nk in zip(keys, new):
        if nk in seen:
            problems.append(f'"{seen[nk]}" and "{old}" are both renamed to "{nk}"')
        else:
            seen[nk] = old
    if problems:
        raise StateDictError("rename_keys: two keys renamed onto one name: " + "; ".join(problems))
    return new


def rename_map(keys, rules) -> "collections.OrderedDict[str, str]":
    """``{old: new}`` for every key (of an iterable or a state_dict) that ``rules`` renames, in
    key order: the report of what :func:`rename_keys` does, e.g. for logging. Raises
    :class:`StateDictError` when two keys would get one name."""
    keys = list(keys)
    return collections.OrderedDict((o, n) for o, n in zip(keys, _new_names(keys, _Rules(rules))) if o != n)


def rename_keys(state_dict: Mapping, rules, *, log: Callable[[str], Any] | None = None):
    """Return a new ``OrderedDict`` with ``state_dict``'s values (not copied) under new keys.

    Args:
        state_dict: a mapping with str keys; its ``_metadata`` attribute, if any, is carried over
            with its module paths renamed to match.
        rules: one of
            * a dict of prefix -> prefix, matched on whole dotted components (``"backbone"``
              matches ``backbone.conv.weight`` and ``backbone`` but not ``backbone2.x``; a
              trailing dot is optional; ``""`` matches every key, so ``{"": "module"}`` adds a
              prefix and ``{"module": ""}`` strips one). The longest matching prefix wins; each
              key is renamed at most once, so ``{"a": "b", "b": "a"}`` swaps.
            * a list of ``(regex, replacement)`` pairs, applied one after the other with
              ``re.sub`` (patterns may be compiled; replacements may be callables).
            * a callable ``fn(key) -> new_key``.
        log: called with one line ``"OLD renamed to be NEW"`` per renamed key (``print``,
            ``logger.info``); :func:`rename_map` gives the same report as a dict.

    Raises:
        StateDictError: two keys would get one name (all such pairs are listed) or a key would
            become empty.
    """
    r = _Rules(rules)
    keys = list(state_dict.keys())
    new = _new_names(keys, r)
    out = collections.OrderedDict()
    for old, nk in zip(keys, new):
        out[nk] = state_dict[old]
        if log is not None and nk != old:
            log(f"{old} renamed to be {nk}")
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        out._metadata = _rename_metadata(meta, keys, new, r)
    return out


def _rename_metadata(meta: Mapping, keys, new, rules: _Rules):
    """Module paths of ``_metadata`` renamed to agree with the new keys.

    Prefix rules apply to the paths directly. For regex and callable rules the module renaming
    is read off the key renaming: ``a.b.conv.weight -> x.conv.weight`` renames module
    ``a.b.conv`` to ``x.conv`` and ``a.b`` to ``x``; modules without keys follow their nearest
    renamed ancestor. Where a renamed entry lands on one that kept its name (the ``""`` entry
    of a DataParallel wrapper when ``module`` is stripped), the renamed one wins, as in torch's
    ``consume_prefix_in_state_dict_if_present``.
    """
    if rules.kind == "prefix":
        def move(path):
            return rules.path(path)
    else:
        modmap: dict[str, str] = {}
        for old, nk in zip(keys, new):
            if old == nk:
                continue
            o, n = old.split(".")[:-1], nk.split(".")[:-1]  # the modules holding the key
            modmap.setdefault(".".join(o), ".".join(n))
            while o and n and o[-1] == n[-1]:  # and their ancestors, while the names agree
                o, n = o[:-1], n[:-1]
                modmap.setdefault(".".join(o), ".".join(n))

        def move(path):
            comps = path.split(".") if path else []
            for i in range(len(comps), -1, -1):
                head = ".".join(comps[:i])
                if head in modmap:
                    return _path_join(modmap[head], ".".join(comps[i:]))
            return None

    out = collections.OrderedDict()
    renamed = set()
    for path, value in meta.items():
        new_path = move(path) if isinstance(path, str) else None
        was_renamed = new_path is not None and new_path != path
        new_path = path if new_path is None else new_path
        if new_path in out and (new_path in renamed or not was_renamed):
            continue  # keep what is there: a renamed entry, or the first of two unrenamed ones
        out[new_path] = dict(value) if isinstance(value, Mapping) else value
        if was_renamed:
            renamed.add(new_path)
    return out


def strip_prefix(state_dict: Mapping, prefix: str = "module.", *, log=None):
    """A new state_dict with ``prefix`` (whole components; ``"module."`` by default, as
    DataParallel / DistributedDataParallel add it) removed from the keys that have it; other
    keys are kept as they are. ``_metadata`` is adjusted as torch's
    ``consume_prefix_in_state_dict_if_present`` does, but the input is not modified and key
    order is kept."""
    return rename_keys(state_dict, {prefix: ""}, log=log)


def add_prefix(state_dict: Mapping, prefix: str, *, log=None):
    """A new state_dict with ``prefix`` (a dotted path; a trailing dot is optional) put in front
    of every key, e.g. ``add_prefix(sd, "module.")`` for a DataParallel-wrapped model."""
    return rename_keys(state_dict, {"": prefix}, log=log)


def select_prefix(state_dict: Mapping, prefix: str):
    """The sub-tree under ``prefix`` as a state_dict of its own: keys ``prefix.rest`` become
    ``rest``, every other key is left out (``select_prefix(sd, "backbone")`` gives the backbone's
    state_dict). ``_metadata`` entries of the sub-tree come along, re-rooted. The result is empty
    when no key has the prefix."""
    p = prefix.rstrip(".")
    if not p:
        return rename_keys(state_dict, {})

    def under(path):
        if path == p:
            return ""
        if path.startswith(p + "."):
            return path[len(p) + 1:]
        return None

    out = collections.OrderedDict()
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise TypeError(f"state_dict keys must be str, got {k!r}")
        rest = under(k)
        if rest:
            out[rest] = v
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        out._metadata = collections.OrderedDict(
            (under(path), dict(v) if isinstance(v, Mapping) else v)
            for path, v in meta.items() if isinstance(path, str) and under(path) is not None)
    return out


# ---------------------------------------------------------------------------------------------
# comparing
# ---------------------------------------------------------------------------------------------

def _shape_dtype(v):
    if isinstance(v, (np.ndarray, np.generic, MetaArray)):
        return tuple(v.shape), v.dtype
    if isinstance(v, _NUMBER):
        return (), np.asarray(v).dtype
    return None, None


class StateDictDiff(NamedTuple("StateDictDiff", [("only_in_a", list), ("only_in_b", list),
                                                   ("shape_mismatches", list), ("dtype_mismatches", list)])):
    """What :func:`compare_state_dicts` found. ``shape_mismatches`` and ``dtype_mismatches`` are
    lists of ``(key, a, b)``; ``same_keys`` and ``same_shapes`` say whether the key sets, and the
    key sets and every shape, agree; ``str()`` is a report, one problem a line."""

    __slots__ = ()

    @property
    def same_keys(self) -> bool:
        return not self.only_in_a and not self.only_in_b

    @property
    def same_shapes(self) -> bool:
        return self.same_keys and not self.shape_mismatches

    def __str__(self) -> str:
        lines = [f"only in a: {k}" for k in self.only_in_a]
        lines += [f"only in b: {k}" for k in self.only_in_b]
        lines += [f"shape of {k}: {a} in a, {b} in b" for k, a, b in self.shape_mismatches]
        lines += [f"dtype of {k}: {a} in a, {b} in b" for k, a, b in self.dtype_mismatches]
        return "\n".join(lines) if lines else "state_dicts match (keys, shapes and dtypes)"


def compare_state_dicts(a: Mapping, b: Mapping) -> StateDictDiff:
    """Compare two state_dicts' key sets, shapes and dtypes (values are not compared).

    Keys come in ``a``'s order (``only_in_b``: ``b``'s order); shapes and dtypes are compared
    for keys in both whose values have them (arrays, ``MetaArray``, numpy and Python scalars).
    """
    only_a = [k for k in a if k not in b]
    only_b = [k for k in b if k not in a]
    shapes, dtypes = [], []
    for k in a:
        if k not in b:
            continue
        sa, da = _shape_dtype(a[k])
        sb, db = _shape_dtype(b[k])
        if sa is not None and sb is not None and sa != sb:
            shapes.append((k, sa, sb))
        if da is not None and db is not None and da != db:
            dtypes.append((k, da, db))
    return StateDictDiff(only_a, only_b, shapes, dtypes)


# ---------------------------------------------------------------------------------------------
# optimizer state
# ---------------------------------------------------------------------------------------------

def _group_names(groups, names, what):
    """``names`` (flat, or one sequence per group) split to match the groups' ``params``."""
    sizes = [len(g["params"]) for g in groups]
    if names is None:
        if groups and all("param_names" in g for g in groups):
            names = [list(g["param_names"]) for g in groups]
        else:
            raise TypeError(f"{what}: names are needed (the param_groups carry no 'param_names')")
    names = list(names)
    if names and all(not isinstance(n, str) for n in names):
        nested = [list(n) for n in names]
        if [len(n) for n in nested] != sizes:
            raise StateDictError(f"{what}: param_groups hold {sizes} parameters, "
                                 f"but the names given per group number {[len(n) for n in nested]}")
    else:
        if sum(sizes) != len(names):
            raise StateDictError(f"{what}: the optimizer state numbers {sum(sizes)} parameters in "
                                 f"{len(groups)} param_groups, but {len(names)} names were given")
        nested, i = [], 0
        for s in sizes:
            nested.append(names[i:i + s])
            i += s
    for group in nested:
        for n in group:
            if not isinstance(n, str):
                raise TypeError(f"{what}: parameter names must be str, got {n!r}")
    return nested


def optimizer_state_by_name(optimizer_state_dict: Mapping, names=None) -> dict:
    """A ``torch.optim`` state_dict with its integer parameter ids replaced by names.

    Args:
        optimizer_state_dict: ``{"state": {id: {...}}, "param_groups": [{..., "params": [ids]}]}``
            as ``Optimizer.state_dict()`` writes it (e.g. from ``torchfree.load``).
        names: the parameter names in the order ``torch.optim`` numbers the parameters: the
            param_groups in order, each group's ``params`` in order, e.g.
            ``[n for n, _ in model.named_parameters()]`` for ``SGD(model.parameters())``; or one
            list per param group. ``None`` uses the groups' ``param_names`` (present when the
            optimizer was built from ``named_parameters()``).

    Returns:
        A new dict: ``"state"`` keyed by name, each group's ``"params"`` a list of names, other
        entries kept. Per-parameter state dicts are shallow copies; arrays are not copied.
        State under a key that is no parameter id is kept as it is (torch keeps it too).

    Raises:
        StateDictError: the names do not fit the groups, or one id is given two names.
        TypeError: ``names`` is ``None`` and the groups have no ``param_names``.
    """
    what = "optimizer_state_by_name"
    groups = list(optimizer_state_dict["param_groups"])
    nested = _group_names(groups, names, what)
    id_to_name: dict = {}
    name_to_id: dict = {}
    for g, gnames in zip(groups, nested):
        for pid, n in zip(g["params"], gnames):
            if id_to_name.setdefault(pid, n) != n:
                raise StateDictError(f'{what}: parameter id {pid!r} is named both "{id_to_name[pid]}" and "{n}"')
            if name_to_id.setdefault(n, pid) != pid:
                raise StateDictError(f'{what}: name "{n}" is given to parameter ids {name_to_id[n]!r} and {pid!r}')
    state = {}
    for k, v in optimizer_state_dict["state"].items():
        nk = id_to_name.get(k, k)
        if nk in state:
            raise StateDictError(f"{what}: state key {k!r} collides with parameter name {nk!r}")
        state[nk] = dict(v) if isinstance(v, Mapping) else v
    out = {k: v for k, v in optimizer_state_dict.items() if k not in ("state", "param_groups")}
    out["state"] = state
    out["param_groups"] = [{**g, "params": list(gnames)} for g, gnames in zip(groups, nested)]
    return _in_key_order(optimizer_state_dict, out)


def optimizer_state_from_names(state_by_name: Mapping, names=None) -> dict:
    """The inverse of :func:`optimizer_state_by_name`: parameter names back to the integer ids
    ``torch.optim`` gives them (position in the param_groups, in order), ready for
    ``Optimizer.load_state_dict`` once the arrays are tensors again.

    Args:
        state_by_name: ``{"state": {name: {...}}, "param_groups": [{..., "params": [names]}]}``.
        names: optional check: the new optimizer's parameter names in its order (flat, or one
            list per group). ``torch.optim`` matches saved and current parameters by position,
            so they must equal the groups' ``params`` in order; any difference raises.

    Raises:
        StateDictError: ``names`` disagrees with the groups, or ``"state"`` names a parameter
            that no group holds.
    """
    what = "optimizer_state_from_names"
    groups = list(state_by_name["param_groups"])
    flat = [n for g in groups for n in g["params"]]
    if names is not None:
        given = [n for grp in _group_names(groups, names, what) for n in grp]
        if given != flat:
            i = next(i for i, (x, y) in enumerate(zip(given, flat)) if x != y)
            raise StateDictError(f'{what}: parameter {i} of the param_groups is "{flat[i]}", but the names '
                                 f'given have "{given[i]}" there (torch.optim matches parameters by position)')
    ids: dict = {}
    for i, n in enumerate(flat):
        ids.setdefault(n, i)
    state = {}
    for k, v in state_by_name["state"].items():
        if isinstance(k, str) and k not in ids:
            raise StateDictError(f'{what}: there is state for "{k}" but no param_group holds it')
        nk = ids.get(k, k)
        if nk in state:
            raise StateDictError(f"{what}: state key {k!r} collides with parameter id {nk!r}")
        state[nk] = dict(v) if isinstance(v, Mapping) else v
    out = {k: v for k, v in state_by_name.items() if k not in ("state", "param_groups")}
    out["state"] = state
    out["param_groups"] = [{**g, "params": [ids[n] for n in g["params"]]} for g in groups]
    return _in_key_order(state_by_name, out)


def _in_key_order(src: Mapping, out: dict) -> dict:
    return {k: out[k] for k in src if k in out}


# ---------------------------------------------------------------------------------------------
# whole pickled models
# ---------------------------------------------------------------------------------------------

# ``_version`` is a class attribute, so a pickled module does not carry it: the torch classes
# whose version is not nn.Module's 1 (every torch.nn / torch.ao subclass of Module, torch 2.13)
_V2_NORM = ("torch.nn.modules.batchnorm.", ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d",
                                            "LazyBatchNorm2d", "LazyBatchNorm3d", "SyncBatchNorm", "_BatchNorm",
                                            "_LazyNormBase", "_NormBase"))
_MODULE_VERSIONS: dict[str, int] = {_V2_NORM[0] + n: 2 for n in _V2_NORM[1]}
_MODULE_VERSIONS.update({f"torch.nn.modules.instancenorm.{n}": 2 for n in (
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LazyInstanceNorm1d", "LazyInstanceNorm2d",
    "LazyInstanceNorm3d", "_InstanceNorm")})
_MODULE_VERSIONS.update({f"torch.ao.nn.intrinsic.qat.modules.conv_fused.{n}": 2 for n in (
    "ConvBn1d", "ConvBn2d", "ConvBn3d", "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d", "_ConvBnNd")})
_MODULE_VERSIONS.update({f"torch.ao.quantization.observer.{n}": 3 for n in (
    "HistogramObserver", "MinMaxObserver", "MovingAverageMinMaxObserver", "MovingAveragePerChannelMinMaxObserver",
    "PerChannelMinMaxObserver", "UniformQuantizationObserverBase")})
_MODULE_VERSIONS.update({
    "torch.ao.nn.intrinsic.quantized.dynamic.modules.linear_relu.LinearReLU": 4,
    "torch.ao.nn.intrinsic.quantized.modules.bn_relu.BNReLU2d": 2,
    "torch.ao.nn.intrinsic.quantized.modules.bn_relu.BNReLU3d": 2,
    "torch.ao.nn.intrinsic.quantized.modules.linear_relu.LinearLeakyReLU": 3,
    "torch.ao.nn.intrinsic.quantized.modules.linear_relu.LinearReLU": 3,
    "torch.ao.nn.intrinsic.quantized.modules.linear_relu.LinearTanh": 3,
    "torch.ao.nn.quantized.dynamic.modules.linear.Linear": 4,
    "torch.ao.nn.quantized.dynamic.modules.rnn.GRU": 2,
    "torch.ao.nn.quantized.dynamic.modules.rnn.LSTM": 2,
    "torch.ao.nn.quantized.dynamic.modules.rnn.RNNBase": 2,
    "torch.ao.nn.quantized.modules.batchnorm.BatchNorm2d": 2,
    "torch.ao.nn.quantized.modules.batchnorm.BatchNorm3d": 2,
    "torch.ao.nn.quantized.modules.batchnorm._BatchNorm": 2,
    "torch.ao.nn.quantized.modules.linear.Linear": 3,
    "torch.ao.nn.quantized.modules.linear.LinearPackedParams": 3,
    "torch.ao.nn.quantized.modules.normalization.InstanceNorm1d": 2,
    "torch.ao.nn.quantized.modules.normalization.InstanceNorm2d": 2,
    "torch.ao.nn.quantized.modules.normalization.InstanceNorm3d": 2,
})

_MODULE_KEYS = ("_parameters", "_buffers", "_modules")
MAX_MODULES = 1 << 20  # module visits of one module_state_dict call (a shared child counts each time)


def _module_state(o):
    """The ``__dict__`` of a pickled ``nn.Module`` (an Opaque whose state has ``_parameters``,
    ``_buffers`` and ``_modules``), or None when ``o`` is not one."""
    if isinstance(o, Opaque) and isinstance(o.state, dict) and all(k in o.state for k in _MODULE_KEYS):
        return o.state
    return None


def _bad_module(path: str, what: str):
    from ._core import FormatError

    return FormatError(f"pickled module {_nm(path)}: {what}")


def _nm(path: str) -> str:
    return repr(path) if path else "<root>"


def _str_keys(path, state, attr) -> Mapping:
    m = state[attr]
    if not isinstance(m, Mapping) or not all(isinstance(k, str) for k in m):
        raise _bad_module(path, f"{attr} is a {type(m).__name__}, not a dict of names")
    return m


def _one_module(path: str, mod: Opaque, state: dict, out, meta) -> list:
    """Add one module's own entries (torch's ``_save_to_state_dict``) to ``out`` and its version
    to ``meta``; return its children as (path, module) pairs, in registration order."""
    version = state.get("_version", _MODULE_VERSIONS.get(mod.qualname, 1))
    if isinstance(version, bool) or not isinstance(version, int):
        raise _bad_module(path, f"_version is a {type(version).__name__}, not an int")
    meta[path] = {"version": version}
    params = _str_keys(path, state, "_parameters")
    bufs = _str_keys(path, state, "_buffers")
    skip = state.get("_non_persistent_buffers_set", ())
    if not isinstance(skip, (set, frozenset, list, tuple)) or not all(isinstance(k, str) for k in skip):
        raise _bad_module(path, f"_non_persistent_buffers_set is a {type(skip).__name__}, not a set of names")
    prefix = path + "." if path else ""
    for name, v in params.items():
        if v is not None:
            out[prefix + name] = v
    for name, v in bufs.items():
        if v is not None and name not in skip:
            out[prefix + name] = v
    kids = []
    for name, child in _str_keys(path, state, "_modules").items():
        if child is None:
            continue
        if _module_state(child) is None:
            raise _bad_module(path, f"child {name!r} is a {type(child).__name__}, not a pickled module")
        kids.append((prefix + name, child))
    return kids


def _add_module(path: str, mod: Opaque, out, meta, budget: list) -> None:
    """``mod.state_dict(prefix=path + ".")`` into ``out`` / ``meta``, without recursion (a
    hostile pickle can nest modules deeper than Python's stack, or make one its own child)."""
    from ._core import LIMITS, LimitError

    max_depth = LIMITS["marks"]  # the loader's container nesting limit
    on_path: set = set()
    stack: list = [(path, mod)]
    while stack:
        p, m = stack.pop()
        if p is None:  # leaving m
            on_path.discard(id(m))
            continue
        budget[0] -= 1
        if budget[0] < 0:
            raise LimitError(f"more than {MAX_MODULES} modules in one state_dict")
        if id(m) in on_path:
            raise _bad_module(p, "is its own submodule")
        if len(on_path) >= max_depth:
            raise LimitError(f"pickled module {_nm(p)}: modules nested more than {max_depth} deep")
        kids = _one_module(p, m, m.state, out, meta)
        on_path.add(id(m))
        stack.append((None, m))
        for kp, km in reversed(kids):
            stack.append((kp, km))


def _find_modules(obj) -> list:
    """(dotted path, module) of the outermost pickled modules in ``obj``, in ``flatten`` order
    (a shared container is looked into once)."""
    from ._walk import _children

    found, seen, stack = [], set(), [("", obj)]
    while stack:
        path, o = stack.pop()
        if _module_state(o) is not None:
            found.append((path, o))
            continue
        if not isinstance(o, (dict, list, tuple, Opaque)) or id(o) in seen:
            continue
        seen.add(id(o))
        for k, v in reversed(_children(o) or []):
            stack.append((f"{path}.{k}" if path else k, v))
    return found


def module_state_dict(obj) -> collections.OrderedDict:
    """What ``model.state_dict()`` returns, for a model pickled whole (``torch.save(model)``)
    and loaded with ``weights_only=False``, where it is an inert :class:`torchfree.Opaque`.

    The walk is torch's ``Module.state_dict``: for each module (depth first, children in
    registration order) its parameters that are not ``None``, then its buffers that are not
    ``None`` and not in ``_non_persistent_buffers_set``. The result's ``_metadata`` maps each
    module path (``""`` for the root) to ``{"version": module._version}``, as torch's does.
    Values are the loaded objects themselves (arrays, not copied).

    ``obj`` may also hold models, e.g. ``{"model": model, "epoch": 3}``: each outermost module
    then contributes its state_dict under its ``flatten`` path (``model.fc.weight``, ``_metadata``
    key ``model.fc``), as if the containers were modules; values that are not inside a module are
    left out.

    What a pickle cannot tell, since nothing of the class is run: ``_version`` is a class
    attribute, so it is read from the module's own state if set there, else from a table of
    torch's classes (BatchNorm and InstanceNorm: 2, ...), else 1 (a user's subclass of
    ``BatchNorm2d`` reads as 1). A module overriding ``get_extra_state`` would add
    ``_extra_state``, one overriding ``_save_to_state_dict`` (torch.ao quantized modules) other
    keys, and ``state_dict`` hooks could change the result: none of that code can run here, so
    none of it is applied.

    Raises:
        TypeError: ``obj`` is not, and holds no, pickled ``nn.Module``.
        torchfree.FormatError: a module's state is malformed (``_parameters`` / ``_buffers`` /
            ``_modules`` not dicts of names, a child that is not a module, a module that is its
            own submodule, a ``_version`` that is not an int).
        torchfree.LimitError: more than ``MAX_MODULES`` module visits (a shared submodule counts
            once per path, as torch lists it once per path).
    """
    out: collections.OrderedDict = collections.OrderedDict()
    meta: collections.OrderedDict = collections.OrderedDict()
    mods = [("", obj)] if _module_state(obj) is not None else _find_modules(obj)
    if not mods:
        raise TypeError(f"expected a pickled torch.nn.Module (loaded with weights_only=False) or a container "
                        f"holding one, got {type(obj).__name__}")
    budget = [MAX_MODULES]
    for path, mod in mods:
        _add_module(path, mod, out, meta, budget)
    out._metadata = meta  # type: ignore[attr-defined]
    return out
