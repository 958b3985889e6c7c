"""Every public name of torchfree.torch, and torch objects where torchfree's numpy API takes them.
Type-checked by tests/test_typing.py with ``mypy --strict`` (with torch installed), never run; the
``reveal_type`` expectations are written as in uses_every_name.py."""

import io

import torch

import torchfree
import torchfree.safetensors
import torchfree.torch

reveal_type(torchfree.torch.load)
# -> def (f: str | os.PathLike[str] | bytes | bytearray | memoryview[int] | mmap.mmap |
#    typing.IO[bytes], map_location: str | bytes | torch._C.device | dict[str, str] | (def
#    (torch.storage.UntypedStorage, str) -> torch.storage.UntypedStorage | None) | None =,
#    pickle_module: Any =, *, weights_only: bool | None =, mmap: bool | None =, **pickle_load_args:
#    **TypedDict(torchfree.torch._PickleLoadArgs, {'encoding'?: str})) -> Any
state = torchfree.torch.load("model.pt", map_location=torch.device("cuda", 0), weights_only=True, mmap=True)
torchfree.torch.load(io.BytesIO(b"PK..."), map_location=lambda storage, saved: storage, encoding="latin1")
reveal_type(torchfree.torch.save(state, "model.pt"))
# -> None
reveal_type(torchfree.torch.save(state, io.BytesIO(), atomic=False, fsync=False))
# -> None
pending = torchfree.torch.save(state, "model.pt", background=True)
reveal_type(pending)
# -> concurrent.futures._base.Future[None]
pending.result()

torchfree.torch.install()
torchfree.torch.uninstall()
with torchfree.torch.patched():
    torch.save(torch.load("model.pt"), io.BytesIO())

# torchfree's numpy API takes a torch.device as a location, and a tensor wherever numpy.asarray would
torchfree.load("model.pt", map_location=torch.device("cpu"))
torchfree.load("model.pt", map_location={"cuda:0": torch.device("cpu")})
torchfree.safetensors.save_file({"w": torch.zeros(2)}, "model.safetensors")
