"""Make tests/data/legacy_113.pt (and .npz with its expected arrays) with torch 1.13 (Debian's
python3-torch), in the legacy stream format (_use_new_zipfile_serialization=False).

    /usr/bin/python3 tests/data/make_legacy_113.py

Every dtype torch 1.13 saves, views sharing a storage (transpose, row, column, offset slice),
0-d and empty tensors, a Parameter and an OrderedDict state_dict with _metadata. The expected
arrays are written by torch 1.13 itself, so tests/test_fixtures.py needs no torch.
"""

import collections
import pathlib

import numpy as np
import torch

assert torch.__version__.startswith("1.13"), torch.__version__
here = pathlib.Path(__file__).parent
g = torch.Generator().manual_seed(1113)
x = torch.randn(4, 6, generator=g)
obj = {
    "f64": torch.randn(3, generator=g, dtype=torch.float64),
    "f32": x, "f32_t": x.t(), "f32_row": x[2], "f32_col": x[:, 3], "f32_tail": x.view(-1)[7:19],
    "f16": torch.randn(5, generator=g).half(),
    "bf16": torch.randn(5, generator=g).bfloat16(),
    "c64": torch.randn(3, generator=g, dtype=torch.complex64),
    "c128": torch.randn(2, 2, generator=g, dtype=torch.complex128),
    "i64": torch.tensor([1, -2, 2 ** 40, -(2 ** 62)]),
    "i32": torch.tensor([7, -70000], dtype=torch.int32),
    "i16": torch.tensor([300, -2], dtype=torch.int16),
    "i8": torch.tensor([-128, 127], dtype=torch.int8),
    "u8": torch.tensor([0, 255], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
    "param": torch.nn.Parameter(torch.randn(2, 3, generator=g)),
}
sd = torch.nn.Linear(3, 2).state_dict()
obj["state_dict"] = sd
torch.save(obj, here / "legacy_113.pt", _use_new_zipfile_serialization=False)

flat = {}
for k, v in obj.items():
    if isinstance(v, collections.OrderedDict):
        for k2, v2 in v.items():
            flat[f"{k}.{k2}"] = v2
    else:
        flat[k] = v
arrays = {}
for k, v in flat.items():
    v = v.detach()
    if v.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits
        arrays[k + ".bits"] = v.view(torch.int16).numpy()
    else:
        arrays[k] = v.numpy()
np.savez(here / "legacy_113.npz", **arrays)
print("wrote", here / "legacy_113.pt", len(arrays), "arrays")
