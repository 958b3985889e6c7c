"""Every public name of torchfree, torchfree.safetensors and torchfree._core, used as a program
would. Type-checked by tests/test_typing.py with ``mypy --strict``, never run. Below each
``reveal_type(...)`` is the type mypy must reveal: a ``# -> `` line, continued on ``#    `` lines
(joined by one space)."""

import collections
import io
import pickle
from typing import Any

import numpy as np

import torchfree
import torchfree._core
import torchfree._scan
import torchfree.safetensors

# ---- load, save, scan, open, flatten ---------------------------------------------------------

reveal_type(torchfree.load)
# -> def (f: str | os.PathLike[str] | bytes | bytearray | memoryview[int] | mmap.mmap |
#    typing.IO[bytes], map_location: str | bytes | torchfree._load._Device | dict[str, Any] | (def
#    (torchfree._core.Storage, str) -> torchfree._core.Storage | typing_extensions.Buffer | None) |
#    None =, *, mmap: bool | None =, weights_only: bool =, safe_globals: dict[str, def (*Any, **Any)
#    -> Any] | typing.Iterable[(def (*Any, **Any) -> Any) | tuple[def (*Any, **Any) -> Any, str]] |
#    None =, encoding: str =, limits: typing.Mapping[str, int] | None =) -> Any
ckpt = torchfree.load("model.pt", map_location="cpu", mmap=False, weights_only=False, limits={"memo": 1 << 20})
seen: list[tuple[str, str, int]] = []


def note_storage(storage: torchfree.Storage, saved: str) -> None:
    """A map_location callable: sees each storage record once, keeps its data."""
    seen.append((storage.key, saved, storage.nbytes))


torchfree.load(b"PK...", map_location=note_storage, safe_globals=[collections.Counter], encoding="bytes")
torchfree.load(io.BytesIO(b"PK..."), map_location={"cuda:0": "cpu"})
torchfree.load(bytearray(), map_location=lambda storage, saved: bytes(storage))

reveal_type(torchfree.save)
# -> def (obj: object, f: str | bytes | os.PathLike[str] | os.PathLike[bytes] |
#    torchfree._save._Writer, *, pickle_protocol: Literal[2] =, format: Literal['zip'] |
#    Literal['legacy'] =, atomic: bool =)
torchfree.save({"w": np.zeros(3, np.float32), "epoch": 4}, "edited.pt", format="legacy", atomic=False)
torchfree.save(ckpt, io.BytesIO())

info = torchfree.scan("huge.pt", map_location={"cuda:0": "cpu"})
reveal_type(info)
# -> torchfree._scan.CheckpointInfo
reveal_type(info.tensors)
# -> list[torchfree._scan.TensorInfo]
scanned: torchfree.CheckpointInfo = info
tensor_info: torchfree.TensorInfo = info["fc1.weight"]
reveal_type(tensor_info.dtype)
# -> numpy.dtype[Any] | str
reveal_type(tensor_info.shape)
# -> tuple[int, ...]
reveal_type(tensor_info.storage_key)
# -> str | None
quant_info: torchfree.QuantInfo | None = tensor_info.quant
reveal_type(tensor_info.layout)
# -> str
reveal_type(tensor_info.nnz)
# -> int | None
reveal_type(tensor_info.parts)
# -> tuple[torchfree._core.TensorInfoBase, ...]
reveal_type(info.storages[0])
# -> tuple[str, numpy.dtype[Any] | str, int, str, str, fallback=torchfree._scan.StorageInfo]
reveal_type(info.records[0].compressed)
# -> bool
reveal_type(info.dtype_totals)
# -> dict[str, int]
print(info, info.total_bytes, info.param_count, info.to_json(indent=2), info.globals)
reveal_type(info.to_text(max_rows=20))
# -> str

with torchfree.open("huge.pt", map_location="meta") as by_path:
    reveal_type(by_path)
    # -> torchfree._scan.Checkpoint | torchfree._scan.ShardedCheckpoint
    reveal_type(by_path["model.embed_tokens.weight"])
    # -> numpy.ndarray[Any, Any] | torchfree._types.MetaArray | torchfree._types.QuantizedArray | torchfree._types.SparseArray
with open("huge.pt", "rb") as fh, torchfree.open(fh, mmap=False) as lazy:
    reveal_type(lazy)
    # -> torchfree._scan.Checkpoint
    reveal_type(lazy.get("fc1.bias", 0))
    # -> numpy.ndarray[Any, Any] | torchfree._types.MetaArray | torchfree._types.QuantizedArray | torchfree._types.SparseArray | int
    checkpoint: torchfree.Checkpoint = lazy
    storage = lazy.read_storage(lazy.storages[0])
    print(storage.location, storage.dtype, storage.is_meta, memoryview(storage).nbytes, lazy.info, lazy.load())
    raw: np.ndarray[Any, Any] = storage.numpy()

reveal_type(torchfree.flatten(ckpt, sep="/"))
# -> collections.OrderedDict[str, numpy.ndarray[Any, Any] | torchfree._types.MetaArray | torchfree._types.QuantizedArray | torchfree._types.SparseArray]

# ---- what load returns for what numpy has no word for -------------------------------------------

meta = torchfree.MetaArray((2, 3), np.dtype(np.float32))
reveal_type(meta.shape)
# -> tuple[int, ...]
quantized = torchfree.QuantizedArray(np.zeros(4, np.int8), "torch.qint8", 0.1, 0)
reveal_type(quantized.qscheme)
# -> Literal['torch.per_tensor_affine'] | Literal['torch.per_channel_affine'] |
#    Literal['torch.per_channel_affine_float_qparams']
reveal_type(quantized.scale)
# -> float | numpy.ndarray[Any, Any]
dequantized: np.ndarray[Any, Any] = quantized.dequantize()
sparse = torchfree.SparseArray("torch.sparse_coo", (3,), np.ones(1), np.zeros((1, 1), np.int64))
reveal_type(sparse.layout)
# -> Literal['torch.sparse_coo'] | Literal['torch.sparse_csr'] | Literal['torch.sparse_csc'] |
#    Literal['torch.sparse_bsr'] | Literal['torch.sparse_bsc']
dense: np.ndarray[Any, Any] = sparse.todense()
nested = torchfree.NestedArray([np.zeros(2)])
reveal_type(nested[0])
# -> numpy.ndarray[Any, Any]
opaque = torchfree.Opaque("mymodule", "MyClass")
reveal_type(opaque.args)
# -> tuple[Any, ...] | None

# ---- errors and limits ----------------------------------------------------------------------------

try:
    torchfree.load("model.pt")
except torchfree.UnsafeGlobalError as unsafe:
    reveal_type(unsafe)
    # -> torchfree._core.UnsafeGlobalError
    as_unpickling: torchfree.UnpicklingError = unsafe
    as_pickle: pickle.UnpicklingError = unsafe
except (torchfree.FormatError, torchfree.LimitError) as bad:
    as_base: torchfree.CheckpointError = bad
    as_value: ValueError = bad
reveal_type(torchfree.LIMITS)
# -> dict[str, int]
reveal_type(torchfree.__version__)
# -> str

# ---- state-dict tools --------------------------------------------------------------------------

model: dict[str, np.ndarray[Any, Any]] = {"fc.weight": np.zeros((2, 2), np.float32)}
result = torchfree.load_state_dict(model, ckpt, strict=False, rename={"module": ""}, log=print)
reveal_type(result)
# -> tuple[list[str], list[str], fallback=torchfree.statedict.IncompatibleKeys]
incompatible: torchfree.IncompatibleKeys = result
renamed = torchfree.rename_keys(model, [(r"^fc\.", "head.")])
reveal_type(renamed)
# -> collections.OrderedDict[str, numpy.ndarray[Any, Any]]
reveal_type(torchfree.rename_map(model, lambda key: key.upper()))
# -> collections.OrderedDict[str, str]
wrapped = torchfree.add_prefix(torchfree.strip_prefix(model), "module")
backbone = torchfree.select_prefix(wrapped, "module.fc")
diff = torchfree.compare_state_dicts(model, backbone)
reveal_type(diff.same_shapes)
# -> bool
reveal_type(diff.shape_mismatches)
# -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]
state_diff: torchfree.StateDictDiff = diff
by_name = torchfree.optimizer_state_by_name(ckpt["optimizer"], [["fc.weight"], ["fc.bias"]])
reveal_type(torchfree.optimizer_state_from_names(by_name, ["fc.weight", "fc.bias"]))
# -> dict[str, Any]
model_obj = torchfree.load("model.pt", weights_only=False)
reveal_type(torchfree.module_state_dict(model_obj))
# -> collections.OrderedDict[str, Any]
try:
    torchfree.load_state_dict(model, renamed)
except torchfree.StateDictError as mismatch:
    reveal_type(mismatch.missing_keys)
    # -> list[str]
    as_runtime: RuntimeError = mismatch

# ---- torchfree.safetensors --------------------------------------------------------------------

reveal_type(torchfree.safetensors.load_file("model.safetensors"))
# -> collections.OrderedDict[str, numpy.ndarray[Any, Any]]
blob = torchfree.safetensors.save(model, metadata={"format": "pt"})
reveal_type(torchfree.safetensors.load(blob))
# -> collections.OrderedDict[str, numpy.ndarray[Any, Any]]
torchfree.safetensors.save_file(model, "model.safetensors", progress=print)
torchfree.safetensors.save_file(model, io.BytesIO())
with torchfree.safetensors.safe_open("model.safetensors", mmap=False) as st:
    reveal_type(st)
    # -> torchfree.safetensors.SafetensorsFile | torchfree.safetensors._ShardedFile
    reveal_type(st.get_tensor("fc.weight"))
    # -> numpy.ndarray[Any, Any]
reveal_type(torchfree.safetensors.scan("model.safetensors"))
# -> torchfree._scan.CheckpointInfo
reveal_type(torchfree.safetensors.metadata("model.safetensors"))
# -> dict[str, str] | None
entries, header_metadata, data_start, file_size = torchfree.safetensors.read_header("model.safetensors")
reveal_type(entries[0].dtype)
# -> numpy.dtype[Any]
reveal_type(torchfree.safetensors.DTYPES)
# -> dict[str, numpy.dtype[Any]]
reveal_type(torchfree.safetensors.MAX_HEADER)
# -> int

# ---- torchfree._core: the C module (the modules above call it) ---------------------------------

core_errors: tuple[type[ValueError], ...] = (
    torchfree._core.CheckpointError,
    torchfree._core.FormatError,
    torchfree._core.LimitError,
    torchfree._core.UnpicklingError,
    torchfree._core.UnsafeGlobalError,
)
reveal_type(torchfree._core.crc32)
# -> def (typing_extensions.Buffer, int =, *, fold: int =) -> int
print(torchfree._core.crc32(b"abc", fold=torchfree._core.crc32_folds()), torchfree._core.DTYPE_NAMES)
reveal_type(torchfree._core.pickle_globals(b"\x80\x02}q\x00.", limits=torchfree._core.LIMITS))
# -> list[str]
int64_id = torchfree._core.DTYPE_NAMES.index("int64")
core_storage: torchfree._core.Storage = torchfree._core.storage_over(bytearray(8), int64_id)
tagged = torchfree._core.storage_over(bytearray(8), int64_id, "cuda:0")
at_address = torchfree._core.storage_at(tagged, 0, 0, int64_id)
reveal_type(at_address)
# -> torchfree._core.Storage
info_base: torchfree._core.TensorInfoBase = tensor_info
print(torchfree._core.info_table(info.tensors))
torchfree._core.save(model, io.BytesIO(), "archive", False, sync=False)
archive = torchfree._core.Archive(
    b"PK...", 6, mode=1, require_map=False, map_location=None, weights_only=True,
    safe_globals=None, encoding="utf-8", limits=None,
)
root = archive.unpickle(lazy=True, collect_globals=True)
reveal_type(torchfree._core.record_infos(archive.record_table(), torchfree._scan.RecordInfo))
# -> list[tuple[str, bool, int, int, int, fallback=torchfree._scan.RecordInfo]]
prefix = archive.prefix + "/data/"
storage_infos = torchfree._core.storage_infos(archive.storages(), prefix, torchfree._scan.StorageInfo)
leaf = torchfree._core.walk(root, 3, ".", lambda obj: None, True, target="fc1.weight")
if isinstance(leaf, torchfree._core.TensorRef):
    reveal_type(archive.materialize(leaf))
    # -> numpy.ndarray[Any, Any] | torchfree._types.MetaArray
archive.close()
options: dict[str, Any] = dict(
    mode=1, require_map=False, map_location=None, weights_only=True, safe_globals=None,
    encoding="utf-8", limits=None,
)
torchfree._core.load_zip(b"PK...", 6, **options)
options["map_location"] = torchfree._core.map_location({"cuda:0": "cpu"})
location: str | None = torchfree._core.map_target(options["map_location"], "cuda:0")
_, legacy_storages, legacy_globals, legacy_format = torchfree._core.load_legacy(
    b"\x80\x02", 2, **options, lazy=True, collect_globals=True
)
reveal_type(legacy_format)
# -> Literal['legacy'] | Literal['tar']
