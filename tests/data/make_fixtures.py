"""Regenerate the committed torch-free fixtures in tests/data/ (needs torch; run from anywhere):

    /work/venv/bin/python tests/data/make_fixtures.py

Writes a handful of small checkpoints made by torch.save (torch 2.13) plus
``expected.json`` (the structure of each file as torch.load returns it, with every tensor replaced
by its dtype/shape/strides/storage info and a key into ``expected.npz``, and the storage-sharing
groups) and ``expected.npz`` (the raw bytes of every tensor's values, C order, in the numpy dtype
torchfree returns). tests/test_fixtures.py checks torchfree against them without torch.

Files:
  sd_views.pt           state_dict-like dict: views (transpose/row/col/block/expand), 0-d, empty,
                        bfloat16, float8 (4 kinds), uint16/32/64, complex32 (+ view), conj/neg
  train_ckpt.pt         {"epoch", "model_state_dict" (OrderedDict with _metadata),
                        "optimizer_state_dict" (SGD momentum after 2 steps), "loss"}
  proto4.pt             pickle_protocol=4 (FRAME/MEMOIZE/STACK_GLOBAL/BINBYTES ...)
  sd_views_deflated.pt  sd_views.pt with every record re-zipped ZIP_DEFLATED
  sd_views_bigendian.pt sd_views.pt as a big-endian host writes it (records byte-swapped per
                        element, byteorder = "big"); expected values are those of sd_views.pt
  with_header.bin       6 bytes "HDR123" followed by proto4.pt's zip (load after seek(6))
"""

from __future__ import annotations

import collections
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import ckpt_tools  # noqa: E402
from conftest import TORCH_TO_NP, torch_bytes  # noqa: E402


def build_sd_views():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g)
    bf = torch.randn(2, 3, generator=g).to(torch.bfloat16)
    halves = torch.tensor([1.0, 2.0, -0.0, float("inf"), 6e-8, -65504.0, 0.5, -3.0], dtype=torch.float16)
    c32 = halves.view(torch.complex32)
    c64 = torch.randn(4, dtype=torch.complex64, generator=g)
    n64 = torch.randn(3, dtype=torch.complex64, generator=g)
    u16 = torch.tensor([0, 1, 258, 65535, 4096, 7], dtype=torch.uint16)
    sd = {
        "x": x, "xt": x.t(), "row": x[1], "col": x[:, 2], "block": x[1:, 1:3],
        "expand": x[0:1].expand(3, 4), "elem0d": x[2, 1],
        "scalar": torch.tensor(3.5), "int_scalar": torch.tensor(-9, dtype=torch.int64),
        "empty": torch.zeros(0, 3), "empty_i64": torch.zeros(2, 0, dtype=torch.int64),
        "f16": torch.randn(5, generator=g).half(),
        "f64": torch.randn(2, 2, dtype=torch.float64, generator=g),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "bf16": bf, "bf16_t": bf.t(),
        "f8_e4m3fn": torch.randint(0, 256, (6,), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn),
        "f8_e5m2": torch.randint(0, 256, (6,), dtype=torch.uint8, generator=g).view(torch.float8_e5m2),
        "f8_e4m3fnuz": torch.randint(0, 256, (2, 2), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fnuz),
        "f8_e8m0fnu": torch.randint(0, 256, (3,), dtype=torch.uint8, generator=g).view(torch.float8_e8m0fnu),
        "u16": u16, "u16_step": u16[1::2],
        "u32": torch.tensor([1, 2 ** 32 - 1], dtype=torch.uint32),
        "u64": torch.tensor([3, 2 ** 64 - 1], dtype=torch.uint64),
        "c32": c32, "c32_view": c32[1:3],
        "c64": c64, "c64_conj": c64.conj(),
        "neg": n64.conj().imag,
        "nested": {"list": [x[0], (u16[:2], 5)], "none": None},
    }
    return sd


def build_train_ckpt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU(),
                                torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = None
    for _ in range(2):
        opt.zero_grad()
        loss = model(torch.randn(5, 4)).pow(2).mean()
        loss.backward()
        opt.step()
    return {"epoch": 2, "model_state_dict": model.state_dict(),
            "optimizer_state_dict": opt.state_dict(), "loss": float(loss.item())}


def build_proto4():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(2, 3, generator=g)
    return {"w": w, "v": w[1], "bf": torch.randn(3, generator=g).bfloat16(),
            "meta": {"name": "p4", "vals": (1, 2.5, None), "b": b"xy\x00", "set": {3, 4},
                     "big": 2 ** 70, "size": w.shape, "device": torch.device("cuda", 1),
                     "dtype": torch.float16}}


# --- expected-value encoding --------------------------------------------------------------

def encode(obj, path, arrays, prefix):
    if isinstance(obj, torch.Tensor):
        name = str(obj.dtype)[6:]
        dt = TORCH_TO_NP[name]
        lazy = obj.is_conj() or obj.is_neg()
        key = f"{prefix}::{path}"
        arrays[key] = torch_bytes(obj)
        return {"__tensor__": key, "torch_dtype": name, "dtype": dt.name,
                "shape": list(obj.shape),
                "strides": None if lazy else [s * dt.itemsize for s in obj.stride()],
                "storage_offset": obj.storage_offset(), "lazy": lazy}
    if isinstance(obj, torch.Size):
        return {"__tuple__": [encode(v, f"{path}.{i}", arrays, prefix) for i, v in enumerate(obj)]}
    if isinstance(obj, torch.device):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj)[6:]}
    if isinstance(obj, collections.OrderedDict):
        out = {"__odict__": [[encode(k, path, arrays, prefix), encode(v, _join(path, k), arrays, prefix)]
                             for k, v in obj.items()]}
        if hasattr(obj, "_metadata"):
            out["_metadata"] = encode(obj._metadata, _join(path, "_metadata"), arrays, prefix)
        return out
    if type(obj) is dict:
        return {"__dict__": [[encode(k, path, arrays, prefix), encode(v, _join(path, k), arrays, prefix)]
                             for k, v in obj.items()]}
    if type(obj) is list:
        return [encode(v, _join(path, i), arrays, prefix) for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return {"__tuple__": [encode(v, _join(path, i), arrays, prefix) for i, v in enumerate(obj)]}
    if type(obj) is set:
        return {"__set__": sorted([encode(v, path, arrays, prefix) for v in obj], key=repr)}
    if type(obj) is float:
        return {"__float__": obj.hex()}
    if type(obj) is complex:
        return {"__complex__": [obj.real.hex(), obj.imag.hex()]}
    if type(obj) is bytes:
        return {"__bytes__": obj.hex()}
    if type(obj) is bytearray:
        return {"__bytearray__": obj.hex()}
    if obj is None or type(obj) in (bool, int, str):
        return obj
    raise TypeError(f"{path}: cannot encode {type(obj)!r}")


def _join(path, key):
    return str(key) if not path else f"{path}.{key}"


def tensors_by_path(obj, path=""):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_by_path(v, _join(path, k))
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        for i, v in enumerate(obj):
            yield from tensors_by_path(v, _join(path, i))


def sharing_groups(obj):
    """Dotted paths of non-empty, non-lazy tensors grouped by the torch storage they view."""
    groups = collections.OrderedDict()
    for path, t in tensors_by_path(obj):
        if t.is_conj() or t.is_neg() or t.numel() == 0 or t.untyped_storage().nbytes() == 0:
            continue
        groups.setdefault(t.untyped_storage().data_ptr(), []).append(path)
    return list(groups.values())


def main():
    files = {}
    out = {}

    def save(name, obj, **kw):
        p = HERE / name
        torch.save(obj, p, **kw)
        files[name] = p.read_bytes()

    save("sd_views.pt", build_sd_views())
    save("train_ckpt.pt", build_train_ckpt())
    save("proto4.pt", build_proto4(), pickle_protocol=4)
    (HERE / "sd_views_deflated.pt").write_bytes(ckpt_tools.rezip(files["sd_views.pt"], zipfile.ZIP_DEFLATED))
    (HERE / "sd_views_bigendian.pt").write_bytes(ckpt_tools.make_big_endian(files["sd_views.pt"]))
    (HERE / "with_header.bin").write_bytes(b"HDR123" + files["proto4.pt"])

    arrays = {}
    sources = {"sd_views.pt": "sd_views.pt", "train_ckpt.pt": "train_ckpt.pt",
               "proto4.pt": "proto4.pt", "sd_views_deflated.pt": "sd_views.pt",
               "sd_views_bigendian.pt": "sd_views.pt", "with_header.bin": "proto4.pt"}
    loaded = {}
    for src in sorted(set(sources.values())):
        with io.BytesIO(files[src]) as b:
            loaded[src] = torch.load(b, weights_only=(src != "proto4.pt"))
        encode(loaded[src], "", arrays, src)  # fills arrays
    for name, src in sources.items():
        out[name] = {
            "source": src,
            "weights_only_torch": src != "proto4.pt",
            "offset": 6 if name == "with_header.bin" else 0,
            "value": encode(loaded[src], "", {}, src),
            "sharing": sharing_groups(loaded[src]),
        }
    # sanity: the deflated and big-endian copies load in torch to the same values (torch swaps
    # only the legacy-typed storages of a big-endian file, so compare those)
    deflated = torch.load(HERE / "sd_views_deflated.pt")
    for k, v in loaded["sd_views.pt"].items():
        if isinstance(v, torch.Tensor):
            assert np.array_equal(torch_bytes(deflated[k]), torch_bytes(v)), k
    be = torch.load(HERE / "sd_views_bigendian.pt")
    for k in ("x", "xt", "f16", "f64", "bf16", "c64", "i8"):
        assert np.array_equal(torch_bytes(be[k]), torch_bytes(loaded["sd_views.pt"][k])), k

    meta = {"torch_version": torch.__version__, "files": out}
    (HERE / "expected.json").write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n")
    np.savez(HERE / "expected.npz", **arrays)
    total = sum((HERE / n).stat().st_size for n in list(out) + ["expected.json", "expected.npz"])
    print(f"wrote {len(out)} fixtures + expected.json/npz, {total} bytes total")


if __name__ == "__main__":
    main()
