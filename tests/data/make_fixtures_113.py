"""Make tests/data/sparse_113.pt and sparse_113.npz with torch 1.13 (Debian's python3-torch).

    /usr/bin/python3 tests/data/make_fixtures_113.py

torch 1.13 writes COO tensors as a 3-tuple (no is_coalesced) and CSR through
``torch._utils._rebuild_sparse_csr_tensor``, which torch 2.x no longer has: these files
cannot be read back by torch 2.x, so the expected dense values are stored, computed by
torch 1.13 when the files are made.
"""

import pathlib

import numpy as np
import torch

assert torch.__version__.startswith("1.13"), torch.__version__
here = pathlib.Path(__file__).parent
g = torch.Generator().manual_seed(113)
dense = torch.randn(5, 7, generator=g) * (torch.rand(5, 7, generator=g) > 0.5)
objs = {
    "coo": dense.to_sparse(),
    "coo_uncoalesced": torch.sparse_coo_tensor(torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]]),
                                               torch.tensor([0.5, 1.5, 2.25, 4.0]), (2, 3)),
    "csr": dense.to_sparse_csr(),
}
torch.save(objs, here / "sparse_113.pt")
np.savez(here / "sparse_113.npz", **{k: v.to_dense().numpy() for k, v in objs.items()},
         csr_crow=objs["csr"].crow_indices().numpy(), csr_col=objs["csr"].col_indices().numpy(),
         coo_indices=objs["coo"]._indices().numpy())
print("wrote", here / "sparse_113.pt")
