"""Regenerate the TorchScript fixtures of torch 1.13 in tests/data/ (needs torch 1.13, e.g. Debian's
python3-torch; CI has torch 2.13 only, so these files are committed):

    /usr/bin/python3 tests/data/make_torchscript_fixtures.py

Files:
  ts113_scripted.pt  torch.jit.script of a nested module: Linear/ModuleList with a tied weight, an int64
                     buffer, a float16 buffer, List[int] / Dict[str, Tensor] / Optional attributes
  ts113_traced.pt    torch.jit.trace of a Sequential with a captured constant tensor (constants/0)

tests/test_torchscript.py compares torchfree with torch 2.13's torch.jit.load of these files.
"""

from pathlib import Path
from typing import Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent


class Leaf(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        self.register_buffer("steps", torch.arange(4))

    def forward(self, x):
        return self.fc(x)


class Net(torch.nn.Module):
    ints: List[int]
    table: Dict[str, torch.Tensor]
    maybe: Optional[torch.Tensor]

    def __init__(self):
        super().__init__()
        self.leaf = Leaf()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
        self.layers[1].weight = self.layers[0].weight
        self.register_buffer("h", torch.randn(2, 3).half())
        self.ints = [1, 2]
        self.table = {"t": torch.ones(2)}
        self.maybe = None

    def forward(self, x):
        x = self.leaf(x)
        for m in self.layers:
            x = m(x)
        return x


class WithConstant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.k = torch.randn(2)  # not a buffer: tracing captures it as a constant

    def forward(self, x):
        return self.lin(x) * self.k


def main():
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(Net()), str(HERE / "ts113_scripted.pt"))
    traced = torch.jit.trace(torch.nn.Sequential(WithConstant(), torch.nn.Tanh()), torch.randn(1, 2))
    torch.jit.save(traced, str(HERE / "ts113_traced.pt"))
    print("torch", torch.__version__)


if __name__ == "__main__":
    main()
