"""State-dict tools (torchfree.statedict): load_state_dict with torch's semantics, key renaming,
prefix helpers, comparison and optimizer state by name.

The tests marked needs_torch run the same module and state_dict through
``torch.nn.Module.load_state_dict`` and ``torchfree.load_state_dict`` (on numpy views of the
module's own tensors) and compare keys, error text and loaded values; the checkpoints of the
renaming and DataParallel cases are written by torch.save and read back with torchfree.load.
The others need no torch.
"""

from __future__ import annotations

import collections
import re

import ml_dtypes
import numpy as np
import pytest

import torchfree
from torchfree import IncompatibleKeys, MetaArray, StateDictError


def od(*pairs, metadata=None):
    d = collections.OrderedDict(pairs)
    if metadata is not None:
        d._metadata = collections.OrderedDict(metadata)
    return d


def small_target():
    return collections.OrderedDict([
        ("fc.weight", np.zeros((2, 3), np.float32)),
        ("fc.bias", np.zeros(2, np.float32)),
        ("bn.running_mean", np.zeros(2, np.float32)),
        ("bn.num_batches_tracked", np.zeros((), np.int64)),
    ])


def full_sd():
    return collections.OrderedDict([
        ("fc.weight", np.arange(6, dtype=np.float32).reshape(2, 3)),
        ("fc.bias", np.array([1.0, 2.0], np.float32)),
        ("bn.running_mean", np.array([3.0, 4.0], np.float32)),
        ("bn.num_batches_tracked", np.array(7, np.int64)),
    ])


# ---------------------------------------------------------------------------------------------
# load_state_dict without torch
# ---------------------------------------------------------------------------------------------

class TestLoadStateDict:
    def test_copies_in_place(self):
        t = small_target()
        arrays = dict(t)
        res = torchfree.load_state_dict(t, full_sd())
        assert isinstance(res, IncompatibleKeys) and isinstance(res, tuple)
        assert res == ([], []) and res.missing_keys == [] and res.unexpected_keys == []
        assert repr(res) == str(res) == "<All keys matched successfully>"
        for k, v in full_sd().items():
            assert t[k] is arrays[k], "the target's own arrays are written, not replaced"
            np.testing.assert_array_equal(t[k], v)
            assert t[k].dtype == arrays[k].dtype

    def test_strict_problems_all_listed_nothing_written(self):
        t = small_target()
        sd = full_sd()
        del sd["fc.bias"]
        sd["fc.weight"] = np.ones((3, 3), np.float32)
        sd["head.weight"] = np.ones(1, np.float32)
        with pytest.raises(StateDictError) as ei:
            torchfree.load_state_dict(t, sd)
        assert str(ei.value) == (
            "Error(s) in loading state_dict for OrderedDict:\n\t"
            'Missing key(s) in state_dict: "fc.bias". \n\t'
            'Unexpected key(s) in state_dict: "head.weight". \n\t'
            "size mismatch for fc.weight: copying a param with shape torch.Size([3, 3]) from checkpoint, "
            "the shape in current model is torch.Size([2, 3]).")
        assert ei.value.missing_keys == ["fc.bias"]
        assert ei.value.unexpected_keys == ["head.weight"]
        assert len(ei.value.error_msgs) == 1 and ei.value.error_msgs[0].startswith("size mismatch for fc.weight")
        assert isinstance(ei.value, ValueError) and isinstance(ei.value, RuntimeError)
        assert not isinstance(ei.value, torchfree.CheckpointError)
        assert all(not v.any() for v in t.values()), "a failed load must not write anything"

    def test_strict_missing_only_nothing_written(self):
        t = small_target()
        sd = full_sd()
        del sd["bn.running_mean"]
        with pytest.raises(StateDictError, match=r'Missing key\(s\) in state_dict: "bn.running_mean". $'):
            torchfree.load_state_dict(t, sd)
        assert all(not v.any() for v in t.values())

    def test_non_strict(self):
        t = small_target()
        sd = full_sd()
        del sd["fc.bias"]
        sd["extra"] = np.ones(2)
        res = torchfree.load_state_dict(t, sd, strict=False)
        assert res == IncompatibleKeys(["fc.bias"], ["extra"])
        assert repr(res) == "IncompatibleKeys(missing_keys=['fc.bias'], unexpected_keys=['extra'])"
        np.testing.assert_array_equal(t["fc.weight"], sd["fc.weight"])
        assert not t["fc.bias"].any()

    def test_non_strict_shape_mismatch_raises_alone(self):
        t = small_target()
        sd = full_sd()
        del sd["fc.bias"]
        sd["fc.weight"] = np.ones(6, np.float32)
        with pytest.raises(StateDictError) as ei:
            torchfree.load_state_dict(t, sd, strict=False, name="Net")
        assert str(ei.value) == (
            "Error(s) in loading state_dict for Net:\n\tsize mismatch for fc.weight: copying a param with shape "
            "torch.Size([6]) from checkpoint, the shape in current model is torch.Size([2, 3]).")
        assert ei.value.missing_keys == [] and ei.value.unexpected_keys == []
        assert all(not v.any() for v in t.values()), "nothing is written when it raises, strict or not"

    def test_scalar_shapes_as_torch(self):
        # a 1-element 1-d value goes into a 0-d target (torch 0.3 -> 0.4 compatibility) ...
        t = {"step": np.zeros((), np.int64)}
        torchfree.load_state_dict(t, {"step": np.array([5])})
        assert t["step"].shape == () and int(t["step"]) == 5
        # ... but not the other way round
        t = {"w": np.zeros(1, np.float32)}
        with pytest.raises(StateDictError, match=re.escape(
                "copying a param with shape torch.Size([]) from checkpoint, the shape in current model is "
                "torch.Size([1]).")):
            torchfree.load_state_dict(t, {"w": np.float32(1)})
        t = {"s": np.zeros((), np.float32)}
        with pytest.raises(StateDictError, match=re.escape("shape torch.Size([1, 1]) from checkpoint")):
            torchfree.load_state_dict(t, {"s": np.ones((1, 1))})

    def test_python_and_numpy_scalars(self):
        t = {"a": np.zeros((), np.float32), "b": np.zeros((), np.int32), "c": np.zeros((), np.bool_),
             "d": np.zeros((), np.float64)}
        torchfree.load_state_dict(t, {"a": 1.5, "b": 3, "c": True, "d": np.float16(2.0)})
        assert (float(t["a"]), int(t["b"]), bool(t["c"]), float(t["d"])) == (1.5, 3, True, 2.0)
        assert t["a"].dtype == np.float32 and t["b"].dtype == np.int32

    @pytest.mark.parametrize("src, dst", [
        (np.float64, np.float32), (np.float32, np.float16), (np.int64, np.float32), (np.int64, np.int8),
        (np.bool_, np.float32), (np.uint8, np.int64), (np.float32, ml_dtypes.bfloat16),
        (ml_dtypes.bfloat16, np.float32), (ml_dtypes.bfloat16, np.float16),
        (ml_dtypes.bfloat16, ml_dtypes.float8_e5m2), (np.float16, ml_dtypes.float8_e4m3fn),
        (np.complex64, np.complex128),
    ])
    def test_same_kind_casts(self, src, dst):
        t = {"w": np.zeros(4, dst)}
        value = np.arange(4).astype(src)
        torchfree.load_state_dict(t, {"w": value})
        assert t["w"].dtype == np.dtype(dst)
        np.testing.assert_array_equal(t["w"].astype(np.complex128), value.astype(np.complex128))

    @pytest.mark.parametrize("src, dst", [
        (np.float32, np.int32), (np.float64, np.int64), (np.int64, np.bool_), (np.complex64, np.float32),
        (ml_dtypes.bfloat16, np.int32), (np.float32, np.bool_),
    ])
    def test_unsafe_cast_raises(self, src, dst):
        for strict in (True, False):
            t = {"w": np.zeros(4, dst), "v": np.zeros(2, np.float32)}
            with pytest.raises(StateDictError) as ei:
                torchfree.load_state_dict(t, {"w": np.ones(4, src), "v": np.ones(2, np.float32)}, strict=strict)
            msg = str(ei.value)
            assert msg.startswith('Error(s) in loading state_dict for dict:\n\tWhile copying the parameter named "w", '
                                  "whose dimensions in the model are torch.Size([4]) and whose dimensions in the "
                                  "checkpoint are torch.Size([4]), an exception occurred : ")
            assert f"Cannot cast array data from {np.dtype(src)!r} to {np.dtype(dst)!r} according to the rule " \
                   "'same_kind'" in msg
            assert not t["v"].any()
        with pytest.raises(StateDictError):
            torchfree.load_state_dict({"w": np.zeros((), dst)}, {"w": np.ones((), src)})

    def test_readonly_target(self):
        a = np.zeros(3)
        a.flags.writeable = False
        with pytest.raises(StateDictError, match="assignment destination is read-only"):
            torchfree.load_state_dict({"a": a}, {"a": np.ones(3)})

    def test_non_array_value(self):
        with pytest.raises(StateDictError, match=re.escape(
                'While copying the parameter named "a", expected a numpy array or a number from checkpoint but '
                "received <class 'str'>")):
            torchfree.load_state_dict({"a": np.zeros(3)}, {"a": "nope"}, strict=False)

    def test_array_like_value(self):
        class ArrayLike:
            def __array__(self, dtype=None, copy=None):
                return np.full(3, 2.0)

        t = {"a": np.zeros(3)}
        torchfree.load_state_dict(t, {"a": ArrayLike()})
        assert (t["a"] == 2).all()

    def test_meta_target_is_a_dry_run(self):
        t = {"w": MetaArray((2, 3), np.dtype(np.float32)), "b": MetaArray((2,), np.dtype(np.float32))}
        assert torchfree.load_state_dict(t, {"w": np.ones((2, 3)), "b": np.ones(2)}) == ([], [])
        assert isinstance(t["w"], MetaArray)
        with pytest.raises(StateDictError, match="size mismatch for w"):
            torchfree.load_state_dict(t, {"w": np.ones((3, 2)), "b": np.ones(2)})
        with pytest.raises(StateDictError, match="Cannot cast"):
            torchfree.load_state_dict(t, {"w": np.ones((2, 3), np.complex64), "b": np.ones(2)})

    def test_meta_value_has_no_data(self):
        with pytest.raises(StateDictError, match="cannot copy from a MetaArray"):
            torchfree.load_state_dict({"w": np.zeros(2)}, {"w": MetaArray((2,), np.dtype(np.float64))})

    def test_none_target_entries_are_absent(self):
        # a parameter registered as None: torch leaves it out of the module's local state
        t = {"w": np.zeros(2), "bias": None}
        assert torchfree.load_state_dict(t, {"w": np.ones(2)}) == ([], [])
        with pytest.raises(StateDictError, match=r'Unexpected key\(s\) in state_dict: "bias"'):
            torchfree.load_state_dict(t, {"w": np.ones(2), "bias": np.ones(2)})
        assert t["bias"] is None

    def test_extra_state_is_assigned(self):
        t = {"m.w": np.zeros(2), "m._extra_state": {"old": 1}}
        torchfree.load_state_dict(t, {"m.w": np.ones(2), "m._extra_state": {"new": 2}})
        assert t["m._extra_state"] == {"new": 2}
        with pytest.raises(StateDictError, match=r'Missing key\(s\) in state_dict: "m._extra_state"'):
            torchfree.load_state_dict(t, {"m.w": np.ones(2)})

    def test_bad_arguments(self):
        with pytest.raises(TypeError, match="Expected state_dict to be dict-like"):
            torchfree.load_state_dict({}, [("a", 1)])
        with pytest.raises(TypeError, match="not an array that can be written in place"):
            torchfree.load_state_dict({"a": 1.0}, {"a": 2.0})
        with pytest.raises(TypeError, match="keys must be str"):
            torchfree.load_state_dict({"a": np.zeros(1)}, {1: np.zeros(1)})

    def test_rename_applied_first(self):
        t = {"img_backbone.w": np.zeros(2), "head.w": np.zeros(1)}
        lines = []
        res = torchfree.load_state_dict(t, {"backbone.w": np.ones(2), "junk.w": np.ones(1)}, strict=False,
                                        rename={"backbone": "img_backbone"}, log=lines.append)
        assert res == (["head.w"], ["junk.w"])
        assert (t["img_backbone.w"] == 1).all()
        assert lines == ["backbone.w renamed to be img_backbone.w"]

    def test_key_order_follows_module_traversal(self):
        # torch reports a module's own keys before its children's, children in registration order
        t = collections.OrderedDict([("a.x.w", np.zeros(1)), ("a.w", np.zeros(1)), ("w", np.zeros(1)),
                                     ("b.w", np.zeros(1))])
        sd = {"b.extra": 1.0, "a.x.extra": 1.0, "extra": 1.0, "a.extra": 1.0, "zz.w": 1.0}
        res = torchfree.load_state_dict(t, sd, strict=False)
        assert res.missing_keys == ["w", "a.w", "a.x.w", "b.w"]
        assert res.unexpected_keys == ["extra", "zz.w", "a.extra", "a.x.extra", "b.extra"]

    def test_aliased_targets(self):
        # tied weights: two keys, one array (torch copies into both; the last write wins)
        w = np.zeros(3)
        t = {"emb.weight": w, "head.weight": w}
        torchfree.load_state_dict(t, {"emb.weight": np.ones(3), "head.weight": np.full(3, 2.0)})
        assert (w == 2).all()


# ---------------------------------------------------------------------------------------------
# renaming and prefix helpers without torch
# ---------------------------------------------------------------------------------------------

DETECTOR_KEYS = ["backbone.conv1.weight", "backbone.layer1.0.conv.weight", "neck.lateral.weight",
                 "neck.lateral.bias", "rpn_head.conv.weight", "roi_head.fc.weight", "roi_head.fc.bias"]
DETECTOR_META = ["", "backbone", "backbone.conv1", "backbone.relu", "backbone.layer1", "backbone.layer1.0",
                 "backbone.layer1.0.conv", "neck", "neck.lateral", "rpn_head", "rpn_head.conv", "roi_head",
                 "roi_head.fc"]
IMG_RULES = {"backbone": "img_backbone", "neck": "img_neck", "rpn_head": "img_rpn_head",
             "roi_head": "img_roi_head"}


def detector_sd():
    sd = od(*[(k, np.full(2, i, np.float32)) for i, k in enumerate(DETECTOR_KEYS)],
            metadata=[(m, {"version": 1}) for m in DETECTOR_META])
    sd._metadata["backbone.relu"] = {"version": 7}  # a module without keys keeps its entry
    return sd


def img(path):
    return "img_" + path if path else path


class TestRename:
    @pytest.mark.parametrize("rules", [
        IMG_RULES,
        {k + ".": v + "." for k, v in IMG_RULES.items()},
        [(r"^(backbone|neck|rpn_head|roi_head)\.", r"img_\1.")],
        [(re.compile(r"^(backbone|neck)\."), r"img_\1."), (r"^(rpn_head|roi_head)\.", r"img_\1.")],
        lambda k: "img_" + k,
    ], ids=["prefix", "prefix-dot", "regex", "regex-chain", "callable"])
    def test_detector(self, rules):
        sd = detector_sd()
        new = torchfree.rename_keys(sd, rules)
        assert type(new) is collections.OrderedDict
        assert list(new) == ["img_" + k for k in DETECTOR_KEYS]
        for k in DETECTOR_KEYS:
            assert new["img_" + k] is sd[k], "values are not copied"
        assert list(new._metadata) == [img(m) for m in DETECTOR_META]
        assert new._metadata["img_backbone.relu"] == {"version": 7}
        assert list(sd) == DETECTOR_KEYS and list(sd._metadata) == DETECTOR_META, "input left alone"

    def test_report(self):
        sd = detector_sd()
        sd["extra"] = np.zeros(1)
        lines = []
        torchfree.rename_keys(sd, IMG_RULES, log=lines.append)
        assert lines == [f"{k} renamed to be img_{k}" for k in DETECTOR_KEYS]
        rm = torchfree.rename_map(sd, IMG_RULES)
        assert rm == collections.OrderedDict((k, "img_" + k) for k in DETECTOR_KEYS)
        assert "extra" not in rm
        assert torchfree.rename_map(["a.b", "c"], {"a": "x"}) == {"a.b": "x.b"}

    def test_prefix_rules_match_whole_components(self):
        sd = od(("backbone.w", 1), ("backbone2.w", 2), ("backbone", 3), ("xbackbone.w", 4))
        assert list(torchfree.rename_keys(sd, {"backbone": "bb"})) == ["bb.w", "backbone2.w", "bb", "xbackbone.w"]

    def test_longest_prefix_wins_and_swap(self):
        sd = od(("a.w", 1), ("a.head.w", 2), ("b.w", 3))
        assert list(torchfree.rename_keys(sd, {"a": "x", "a.head": "h"})) == ["x.w", "h.w", "b.w"]
        swapped = torchfree.rename_keys(sd, {"a": "b", "b": "a"})
        assert list(swapped.items()) == [("b.w", 1), ("b.head.w", 2), ("a.w", 3)]

    def test_exact_key_rule(self):
        assert list(torchfree.rename_keys(od(("fc.weight", 1)), {"fc.weight": "head.weight"})) == ["head.weight"]

    def test_collisions_raise(self):
        sd = od(("a.w", 1), ("b.w", 2), ("c.w", 3), ("d.w", 4))
        with pytest.raises(StateDictError) as ei:
            torchfree.rename_keys(sd, {"a": "c", "b": "d"})
        assert str(ei.value) == ('rename_keys: two keys renamed onto one name: "a.w" and "c.w" are both renamed to '
                                 '"c.w"; "b.w" and "d.w" are both renamed to "d.w"')
        with pytest.raises(StateDictError, match='"x.w" and "y.w" are both renamed to "z.w"'):
            torchfree.rename_keys(od(("x.w", 1), ("y.w", 2)), [(r"^[xy]\.", "z.")])
        with pytest.raises(StateDictError, match="empty name"):
            torchfree.rename_keys(od(("a", 1)), {"a": ""})

    def test_bad_rules(self):
        with pytest.raises(TypeError, match=r"list of \(pattern, replacement\) pairs"):
            torchfree.rename_keys(od(("a", 1)), (r"^a", "b"))
        with pytest.raises(TypeError, match="rules must be"):
            torchfree.rename_keys(od(("a", 1)), 3)
        with pytest.raises(TypeError, match="must return a str"):
            torchfree.rename_keys(od(("a", 1)), lambda k: None)

    def test_no_metadata(self):
        new = torchfree.rename_keys({"a.w": 1}, {"a": "b"})
        assert new == {"b.w": 1} and not hasattr(new, "_metadata")

    def test_regex_metadata_derived_from_keys(self):
        # a module renamed inside a model: encoder.layers.N -> blocks.N
        sd = od(("encoder.embed.weight", 0), ("encoder.layers.0.fc.weight", 1), ("encoder.layers.1.fc.weight", 2),
                metadata=[("", {"version": 1}), ("encoder", {"version": 2}), ("encoder.embed", {"version": 3}),
                          ("encoder.layers", {"version": 4}), ("encoder.layers.0", {"version": 5}),
                          ("encoder.layers.0.fc", {"version": 6}), ("encoder.layers.0.act", {"version": 7}),
                          ("encoder.layers.1", {"version": 8}), ("encoder.layers.1.fc", {"version": 9})])
        new = torchfree.rename_keys(sd, [(r"^encoder\.layers\.", "blocks.")])
        assert list(new) == ["encoder.embed.weight", "blocks.0.fc.weight", "blocks.1.fc.weight"]
        assert list(new._metadata.items()) == [
            ("", {"version": 1}), ("encoder", {"version": 2}), ("encoder.embed", {"version": 3}),
            ("blocks", {"version": 4}), ("blocks.0", {"version": 5}), ("blocks.0.fc", {"version": 6}),
            ("blocks.0.act", {"version": 7}), ("blocks.1", {"version": 8}), ("blocks.1.fc", {"version": 9})]


class TestPrefixHelpers:
    def dp_sd(self):
        return od(("module.fc.weight", 1), ("module.fc.bias", 2), ("module.bn.running_mean", 3),
                  metadata=[("", {"version": 9}), ("module", {"version": 1}), ("module.fc", {"version": 2}),
                            ("module.bn", {"version": 3})])

    def test_strip_prefix(self):
        for prefix in ("module.", "module"):
            new = torchfree.strip_prefix(self.dp_sd(), prefix)
            assert list(new.items()) == [("fc.weight", 1), ("fc.bias", 2), ("bn.running_mean", 3)]
            # as torch's consume_prefix_in_state_dict_if_present: "module" replaces the wrapper's ""
            assert dict(new._metadata) == {"": {"version": 1}, "fc": {"version": 2}, "bn": {"version": 3}}
        assert list(torchfree.strip_prefix(od(("module.a", 1), ("b", 2)))) == ["a", "b"]
        with pytest.raises(StateDictError, match='"module.a" and "a" are both renamed to "a"'):
            torchfree.strip_prefix(od(("module.a", 1), ("a", 2)))

    def test_add_prefix(self):
        sd = od(("fc.weight", 1), ("bn.x", 2), metadata=[("", {"version": 1}), ("fc", {"version": 2})])
        new = torchfree.add_prefix(sd, "module.")
        assert list(new) == ["module.fc.weight", "module.bn.x"]
        assert dict(new._metadata) == {"module": {"version": 1}, "module.fc": {"version": 2}}
        back = torchfree.strip_prefix(new)
        assert list(back.items()) == list(sd.items()) and back._metadata == sd._metadata

    def test_select_prefix(self):
        sd = detector_sd()
        sub = torchfree.select_prefix(sd, "backbone")
        assert list(sub) == ["conv1.weight", "layer1.0.conv.weight"]
        assert sub["conv1.weight"] is sd["backbone.conv1.weight"]
        assert list(sub._metadata) == ["", "conv1", "relu", "layer1", "layer1.0", "layer1.0.conv"]
        assert list(torchfree.select_prefix(sd, "backbone.layer1.")) == ["0.conv.weight"]
        assert torchfree.select_prefix(sd, "nothing") == {}
        assert list(torchfree.select_prefix(sd, "")) == DETECTOR_KEYS

    def test_compare(self):
        a = od(("w", np.zeros((2, 3), np.float32)), ("b", np.zeros(2)), ("only_a", np.zeros(1)), ("s", 1.0),
               ("m", MetaArray((4,), np.dtype(np.float16))), ("obj", "text"))
        b = od(("only_b", np.zeros(1)), ("w", np.zeros((3, 2), np.float32)), ("b", np.zeros(2, np.float32)),
               ("s", np.float64(2)), ("m", np.zeros(4, np.float16)), ("obj", None))
        d = torchfree.compare_state_dicts(a, b)
        assert d.only_in_a == ["only_a"] and d.only_in_b == ["only_b"]
        assert d.shape_mismatches == [("w", (2, 3), (3, 2))]
        assert d.dtype_mismatches == [("b", np.dtype(np.float64), np.dtype(np.float32))]
        assert not d.same_keys and not d.same_shapes
        assert str(d).splitlines() == ["only in a: only_a", "only in b: only_b", "shape of w: (2, 3) in a, (3, 2) in b",
                                       "dtype of b: float64 in a, float32 in b"]
        same = torchfree.compare_state_dicts(full_sd(), small_target())
        assert same.same_shapes and same == ([], [], [], [])
        assert str(same) == "state_dicts match (keys, shapes and dtypes)"


# ---------------------------------------------------------------------------------------------
# optimizer state by name without torch
# ---------------------------------------------------------------------------------------------

def osd():
    return {"state": {0: {"momentum_buffer": np.ones(2)}, 2: {"momentum_buffer": np.full(3, 2.0)}},
            "param_groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.01, "params": [2]}]}


class TestOptimizerNames:
    def test_round_trip(self):
        names = ["fc.weight", "fc.bias", "head.weight"]
        byname = torchfree.optimizer_state_by_name(osd(), names)
        assert list(byname["state"]) == ["fc.weight", "head.weight"]
        assert byname["param_groups"] == [{"lr": 0.1, "params": ["fc.weight", "fc.bias"]},
                                          {"lr": 0.01, "params": ["head.weight"]}]
        src = osd()
        assert torchfree.optimizer_state_by_name(src, names)["state"]["head.weight"]["momentum_buffer"] \
            is src["state"][2]["momentum_buffer"], "arrays are not copied"
        for n in (None, names, [names[:2], names[2:]]):
            back = torchfree.optimizer_state_from_names(byname, n)
            assert back["param_groups"] == osd()["param_groups"]
            assert list(back["state"]) == [0, 2]
            np.testing.assert_array_equal(back["state"][2]["momentum_buffer"], np.full(3, 2.0))
        nested = torchfree.optimizer_state_by_name(osd(), [names[:2], names[2:]])
        assert nested["param_groups"] == byname["param_groups"]

    def test_param_names_in_groups(self):
        sd = osd()
        sd["param_groups"][0]["param_names"] = ["a", "b"]
        sd["param_groups"][1]["param_names"] = ["c"]
        byname = torchfree.optimizer_state_by_name(sd)
        assert list(byname["state"]) == ["a", "c"]
        with pytest.raises(TypeError, match="names are needed"):
            torchfree.optimizer_state_by_name(osd())

    def test_errors(self):
        with pytest.raises(StateDictError, match="numbers 3 parameters in 2 param_groups, but 2 names"):
            torchfree.optimizer_state_by_name(osd(), ["a", "b"])
        with pytest.raises(StateDictError, match=r"hold \[2, 1\] parameters"):
            torchfree.optimizer_state_by_name(osd(), [["a"], ["b", "c"]])
        with pytest.raises(StateDictError, match='name "a" is given to parameter ids 0 and 1'):
            torchfree.optimizer_state_by_name(osd(), ["a", "a", "c"])
        byname = torchfree.optimizer_state_by_name(osd(), ["a", "b", "c"])
        with pytest.raises(StateDictError, match='parameter 1 of the param_groups is "b", but the names given have '
                                                 '"c" there'):
            torchfree.optimizer_state_from_names(byname, ["a", "c", "b"])
        byname["state"]["zzz"] = {}
        with pytest.raises(StateDictError, match='there is state for "zzz" but no param_group holds it'):
            torchfree.optimizer_state_from_names(byname)


# ---------------------------------------------------------------------------------------------
# against torch
# ---------------------------------------------------------------------------------------------

def make_net(torch, *, relu_between=False):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.register_buffer("scale", torch.tensor(2.0))  # 0-d buffer
            self.register_buffer("tmp", torch.zeros(2), persistent=False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(()))
            self.block = Block()
            if relu_between:
                self.act = nn.ReLU()
            self.layers = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
            self.head = nn.Linear(2, 1, bias=False)

    torch.manual_seed(0)
    return Net()


def numpy_views(module):
    """The module's parameters and persistent buffers as numpy arrays sharing their memory."""
    return collections.OrderedDict((k, v.numpy()) for k, v in module.state_dict().items())


def to_numpy_sd(sd):
    out = collections.OrderedDict((k, v.detach().numpy().copy()) for k, v in sd.items())
    if hasattr(sd, "_metadata"):
        out._metadata = sd._metadata
    return out


def with_meta(sd, meta):
    sd = collections.OrderedDict(sd)
    sd._metadata = meta
    return sd


def edit_cases(torch):
    """name -> function(state_dict of tensors) -> edited state_dict (OrderedDict with _metadata)."""

    def missing(sd):
        for k in ("block.bn.num_batches_tracked", "layers.1.bias", "alpha", "block.scale"):
            del sd[k]
        return sd

    def unexpected(sd):
        sd["block.conv.extra"] = torch.ones(1)
        sd["ghost.weight"] = torch.ones(2)
        sd["layers.0.weight_orig"] = torch.ones(1)
        sd["layers.5.weight"] = torch.ones(1)
        sd["block.tmp"] = torch.zeros(2)  # a non-persistent buffer is not expected
        sd["head.bias"] = torch.zeros(1)  # bias=False: registered as None
        sd["beta"] = torch.zeros(1)
        sd["block._extra_state"] = torch.zeros(1)
        return sd

    def mismatched(sd):
        sd["layers.0.weight"] = torch.ones(4, 5)
        sd["block.conv.weight"] = torch.ones(4, 3, 3)
        sd["alpha"] = torch.ones(2)  # 2 elements into a 0-d parameter
        sd["block.scale"] = torch.ones(1, 1)
        return sd

    def scalars(sd):
        sd["alpha"] = torch.tensor([3.0])  # 1-element 1-d into 0-d: loads
        sd["block.scale"] = torch.tensor([5.0])
        return sd

    def everything(sd):
        sd = unexpected(missing(mismatched(sd)))
        del sd["head.weight"]
        return sd

    def reordered(sd):
        return collections.OrderedDict(sorted(sd.items(), reverse=True))

    return {"identity": lambda sd: sd, "missing": missing, "unexpected": unexpected, "mismatched": mismatched,
            "scalars": scalars, "everything": everything,
            "reordered-everything": lambda sd: reordered(everything(sd))}


def run_torch(model, sd, strict):
    try:
        res = model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        return None, str(e)
    return (list(res.missing_keys), list(res.unexpected_keys)), None


def run_torchfree(target, sd, strict, name):
    try:
        res = torchfree.load_state_dict(target, sd, strict=strict, name=name)
    except StateDictError as e:
        return None, str(e)
    return (list(res.missing_keys), list(res.unexpected_keys)), None


@pytest.mark.needs_torch
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("case", ["identity", "missing", "unexpected", "mismatched", "scalars", "everything",
                                  "reordered-everything"])
def test_same_as_torch(torch, case, strict):
    source = make_net(torch)
    with torch.no_grad():
        for i, p in enumerate(source.parameters()):
            p.add_(i + 1.0)
    ref_sd = source.state_dict()
    meta = ref_sd._metadata
    edited = with_meta(edit_cases(torch)[case](collections.OrderedDict(ref_sd)), meta)

    m_torch = make_net(torch)
    m_free = make_net(torch)
    target = numpy_views(m_free)
    before = {k: v.copy() for k, v in target.items()}

    expected, t_err = run_torch(m_torch, edited, strict)
    got, f_err = run_torchfree(target, to_numpy_sd(edited), strict, type(m_torch).__name__)
    assert f_err == t_err
    assert got == expected
    if t_err is None:
        for k, v in m_torch.state_dict().items():
            np.testing.assert_array_equal(target[k], v.numpy(), err_msg=k)
            np.testing.assert_array_equal(m_free.state_dict()[k].numpy(), v.numpy(), err_msg=k)
    else:
        for k, v in target.items():
            np.testing.assert_array_equal(v, before[k], err_msg=f"{k} written by a failed load")
    if case == "identity":
        assert t_err is None and got == ([], [])
    else:
        key_problems = case not in ("mismatched", "scalars")
        assert (t_err is not None) == ((strict and key_problems) or case not in ("missing", "unexpected", "scalars"))


@pytest.mark.needs_torch
@pytest.mark.parametrize("strict", [True, False])
def test_parameter_free_module_order(torch, strict):
    # Keys under a module that owns no parameters or buffers (ReLU) are unexpected in torch and
    # here alike; torchfree cannot see such a module in the target, so it reports them with the
    # parent's keys: the same set, possibly another order.
    model = make_net(torch, relu_between=True)
    sd = collections.OrderedDict(model.state_dict())
    sd["act.weight"] = torch.ones(1)
    sd["layers.0.extra"] = torch.ones(1)
    sd["head.extra"] = torch.ones(1)
    sd = with_meta(sd, model.state_dict()._metadata)
    expected, t_err = run_torch(make_net(torch, relu_between=True), sd, strict)
    got, f_err = run_torchfree(numpy_views(make_net(torch, relu_between=True)), to_numpy_sd(sd), strict, "Net")
    assert (t_err is None) == (f_err is None) == (not strict)
    if strict:
        for err in (t_err, f_err):
            assert err.count('"act.weight"') == 1 and err.count('"layers.0.extra"') == 1
    else:
        assert got[0] == expected[0] == []
        assert sorted(got[1]) == sorted(expected[1]) == ["act.weight", "head.extra", "layers.0.extra"]


@pytest.mark.needs_torch
def test_dtype_casts_like_torch(torch):
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    target = {k: v.view(torch.int16).numpy().view(ml_dtypes.bfloat16) for k, v in model.state_dict().items()}
    src = {"weight": np.arange(6, dtype=np.float64).reshape(2, 3) / 8, "bias": np.array([1.5, -2.0], np.float32)}
    torchfree.load_state_dict(target, src)
    twin = torch.nn.Linear(3, 2).to(torch.bfloat16)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in src.items()})
    for k, v in twin.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------
# checkpoints written by torch: the detector renaming case, DataParallel prefixes
# ---------------------------------------------------------------------------------------------

def detector_modules(torch):
    nn = torch.nn

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3)
            self.bn1 = nn.BatchNorm2d(8)
            self.relu = nn.ReLU()
            self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))

    class Neck(nn.Module):
        def __init__(self):
            super().__init__()
            self.lateral = nn.Conv2d(8, 4, 1)

    class RPNHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3)
            self.cls = nn.Conv2d(4, 3, 1)

    class RoIHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 8)
            self.cls = nn.Linear(8, 5)

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Backbone()
            self.neck = Neck()
            self.rpn_head = RPNHead()
            self.roi_head = RoIHead()

    class MultiModal(nn.Module):
        """The bigger model: the image branch is the detector under img_*, plus a point branch."""

        def __init__(self):
            super().__init__()
            self.img_backbone = Backbone()
            self.img_neck = Neck()
            self.img_rpn_head = RPNHead()
            self.img_roi_head = RoIHead()
            self.pts_backbone = nn.Linear(3, 8)
            self.fusion = nn.Linear(16, 8)

    return Detector, MultiModal


def _trained_detector(torch, Detector):
    torch.manual_seed(1)
    det = Detector()
    with torch.no_grad():
        for p in det.parameters():
            p.normal_()
        for name, b in det.named_buffers():
            if name.endswith("num_batches_tracked"):
                b.fill_(11)
            else:
                b.uniform_(0.5, 1.5)
    return det


@pytest.mark.needs_torch
@pytest.mark.parametrize("rules", [IMG_RULES, [(r"^(backbone|neck|rpn_head|roi_head)\.", r"img_\1.")]],
                         ids=["prefix", "regex"])
def test_detector_renaming_from_torch_checkpoint(torch, tmp_path, rules):
    Detector, MultiModal = detector_modules(torch)
    det = _trained_detector(torch, Detector)
    path = tmp_path / "detector.pth"
    torch.save({"state_dict": det.state_dict(), "meta": {"epoch": 12}}, path)

    ckpt = torchfree.load(path)
    sd = ckpt["state_dict"]
    renamed = torchfree.rename_keys(sd, rules)

    model = MultiModal()
    ref = MultiModal()
    ref.load_state_dict(model.state_dict())  # same starting point
    torch_sd = torch.load(path, weights_only=True)["state_dict"]
    torch_res = ref.load_state_dict(
        with_meta({"img_" + k: v for k, v in torch_sd.items()}, torch_sd._metadata), strict=False)

    target = numpy_views(model)
    res = torchfree.load_state_dict(target, sd, rename=rules, strict=False)
    assert res == IncompatibleKeys(["pts_backbone.weight", "pts_backbone.bias", "fusion.weight", "fusion.bias"], [])
    assert res == (torch_res.missing_keys, torch_res.unexpected_keys)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    for k, v in det.state_dict().items():
        assert torch.equal(model.state_dict()["img_" + k], v), k

    # _metadata follows the new names: every img_* module of the bigger model has its entry
    want = {k for k in model.state_dict()._metadata if k.startswith("img_")}
    assert {k for k in renamed._metadata if k.startswith("img_")} == want
    assert renamed._metadata["img_backbone.bn1"] == model.state_dict()._metadata["img_backbone.bn1"]
    assert renamed._metadata["img_backbone.relu"] == det.state_dict()._metadata["backbone.relu"]

    # strict: the point branch is reported missing, in torch's words
    with pytest.raises(StateDictError) as ei:
        torchfree.load_state_dict(numpy_views(MultiModal()), sd, rename=rules, name="MultiModal")
    with pytest.raises(RuntimeError) as te:
        MultiModal().load_state_dict(with_meta({"img_" + k: v for k, v in torch_sd.items()}, torch_sd._metadata))
    assert str(ei.value) == str(te.value)

    # the backbone alone, as a state_dict of its own
    bb = torchfree.select_prefix(sd, "backbone")
    solo = Detector().backbone
    assert torchfree.load_state_dict(numpy_views(solo), bb) == ([], [])
    for k, v in det.backbone.state_dict().items():
        assert torch.equal(solo.state_dict()[k], v), k
    assert set(bb._metadata) == set(det.backbone.state_dict()._metadata)


@pytest.mark.needs_torch
def test_dataparallel_prefix_from_torch_checkpoint(torch, tmp_path):
    Detector, _ = detector_modules(torch)
    det = _trained_detector(torch, Detector)
    wrapped = torch.nn.DataParallel(det)  # CPU: a wrapper whose state_dict keys start with "module."
    path = tmp_path / "dp.pt"
    torch.save(wrapped.state_dict(), path)

    sd = torchfree.load(path)
    assert all(k.startswith("module.") for k in sd)
    stripped = torchfree.strip_prefix(sd)

    torch_sd = torch.load(path, weights_only=True)
    torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(torch_sd, "module.")
    assert sorted(stripped) == sorted(torch_sd)
    assert list(stripped) == list(det.state_dict())
    assert dict(stripped._metadata) == dict(torch_sd._metadata)

    fresh = Detector()
    assert torchfree.load_state_dict(numpy_views(fresh), stripped) == ([], [])
    for k, v in det.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # without stripping: every key unexpected and every key missing, as in torch, except that
    # BatchNorm's own loader back-fills num_batches_tracked when it finds no "version" for its
    # module in _metadata (here under "module.backbone.bn1", not "backbone.bn1"), which
    # torchfree, knowing no module classes, cannot do
    res = torchfree.load_state_dict(numpy_views(Detector()), sd, strict=False)
    torch_res = Detector().load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert res.unexpected_keys == torch_res.unexpected_keys == list(sd)
    assert [k for k in res.missing_keys if not k.endswith("num_batches_tracked")] == torch_res.missing_keys
    assert res.missing_keys == list(det.state_dict())

    # and back: add the prefix to load a plain checkpoint into a wrapped model
    plain = tmp_path / "plain.pt"
    torch.save(det.state_dict(), plain)
    added = torchfree.add_prefix(torchfree.load(plain), "module.")
    assert list(added) == list(wrapped.state_dict())
    assert dict(added._metadata).keys() <= dict(wrapped.state_dict()._metadata).keys()
    target = torch.nn.DataParallel(Detector())
    assert torchfree.load_state_dict(numpy_views(target), added) == ([], [])
    for k, v in wrapped.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    assert torchfree.compare_state_dicts(added, numpy_views(target)).same_shapes


# ---------------------------------------------------------------------------------------------
# optimizer state by name on real optimizers
# ---------------------------------------------------------------------------------------------

@pytest.mark.needs_torch
@pytest.mark.parametrize("opt_name", ["sgd-momentum", "adam", "adam-two-groups"])
def test_optimizer_state_by_name_round_trip(torch, tmp_path, opt_name):
    model = make_net(torch)
    named = [(n, p) for n, p in model.named_parameters()]
    if opt_name == "sgd-momentum":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        groups_names = [[n for n, _ in named]]
    elif opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        groups_names = [[n for n, _ in named]]
    else:
        heads = [(n, p) for n, p in named if n.startswith("head") or n.startswith("layers.1")]
        rest = [(n, p) for n, p in named if (n, p) not in heads]
        opt = torch.optim.Adam([{"params": [p for _, p in rest]},
                                {"params": [p for _, p in heads], "lr": 1e-2}], lr=1e-3)
        groups_names = [[n for n, _ in rest], [n for n, _ in heads]]
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model.alpha.grad = None
        out = model.layers(model.block.bn(model.block.conv(torch.randn(2, 3, 5, 5))).mean((2, 3)))
        (model.head(out).sum() + model.alpha * 0.5).backward()
        opt.step()

    path = tmp_path / "opt.pt"
    torch.save({"optimizer": opt.state_dict()}, path)
    loaded = torchfree.load(path)["optimizer"]
    flat = [n for g in groups_names for n in g]
    byname = torchfree.optimizer_state_by_name(loaded, flat)

    params = dict(named)
    state_key = "momentum_buffer" if opt_name == "sgd-momentum" else "exp_avg"
    assert set(byname["state"]) == set(flat)
    for n in flat:
        st = byname["state"][n]
        ref = opt.state[params[n]]
        assert set(st) == set(ref)
        np.testing.assert_array_equal(st[state_key], ref[state_key].numpy(), err_msg=n)
        if opt_name != "sgd-momentum":
            np.testing.assert_array_equal(st["exp_avg_sq"], ref["exp_avg_sq"].numpy())
            assert float(st["step"]) == float(ref["step"])
    assert [g["params"] for g in byname["param_groups"]] == groups_names
    assert torchfree.optimizer_state_by_name(loaded, groups_names)["param_groups"] == byname["param_groups"]

    back = torchfree.optimizer_state_from_names(byname, flat)
    assert back["param_groups"] == opt.state_dict()["param_groups"]

    def to_torch(x):
        if isinstance(x, np.ndarray):
            return torch.from_numpy(x.copy())
        if isinstance(x, dict):
            return {k: to_torch(v) for k, v in x.items()}
        if isinstance(x, list):
            return [to_torch(v) for v in x]
        return x

    model2 = make_net(torch)
    if opt_name == "sgd-momentum":
        opt2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.1)
    elif opt_name == "adam":
        opt2 = torch.optim.Adam(model2.parameters())
    else:
        p2 = dict(model2.named_parameters())
        opt2 = torch.optim.Adam([{"params": [p2[n] for n in groups_names[0]]},
                                 {"params": [p2[n] for n in groups_names[1]]}])
    opt2.load_state_dict(to_torch(back))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)

    # names from the optimizer itself (built from named_parameters) need no list
    opt3 = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    opt3.zero_grad()
    model.head(model.layers(torch.randn(1, 4))).sum().backward()
    opt3.step()
    torch.save(opt3.state_dict(), tmp_path / "opt3.pt")
    byname3 = torchfree.optimizer_state_by_name(torchfree.load(tmp_path / "opt3.pt"))
    assert set(byname3["state"]) == {"layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
                                     "head.weight"}
