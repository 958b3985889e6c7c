"""Typing: torchfree's stubs (pyext/torchfree/*.pyi, py.typed) against ``mypy --strict`` and, with
mypy's stubtest, against the runtime.

tests/typecheck/ holds programs that use every public name of torchfree, torchfree.safetensors,
torchfree._core and torchfree.torch. mypy checks them (they never run) together with the stubs, and
below each ``reveal_type(...)`` there is the type mypy must reveal::

    reveal_type(torchfree.scan("model.pt"))
    # -> torchfree._scan.CheckpointInfo

(long types go on over ``#    `` lines, joined by one space). mypy and stubtest run in a process of
this interpreter started in an empty folder, so they find torchfree as a user's mypy does: the
installed package (editable or not), never pyext/ through conftest's sys.path. A missing mypy fails
these tests (it is in the ``test`` extra). torchfree.torch's stub imports torch: the checks that
read it are ``needs_torch``; the rest run without torch (the ASan run of .ci/run).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import torchfree

EXAMPLES = Path(__file__).resolve().parent / "typecheck"
TORCH_FREE = EXAMPLES / "uses_every_name.py"
WITH_TORCH = EXAMPLES / "uses_torch.py"
# module -> the example that uses each of its public names (__all__, or what dir() shows)
USERS = {"torchfree": TORCH_FREE, "torchfree.safetensors": TORCH_FREE, "torchfree._core": TORCH_FREE,
         "torchfree.torch": WITH_TORCH}
ALLOWLISTS = [EXAMPLES / "stubtest_allowlist.txt"]
if sys.version_info < (3, 12):
    ALLOWLISTS.append(EXAMPLES / "stubtest_allowlist_before_py312.txt")

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The empty folder mypy and stubtest run in; mypy's cache, shared by this module's runs."""
    return tmp_path_factory.mktemp("typing")


def run(workdir: Path, tool: str, *args: object, env: dict[str, str] | None = None) -> str:
    """``python -m tool args`` in workdir; its output, asserted to have exited 0."""
    r = subprocess.run([sys.executable, "-m", tool, *map(str, args)], cwd=workdir, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, f"{tool} exited {r.returncode}:\n{r.stdout}{r.stderr}"
    return r.stdout


def package_modules(torch: bool) -> list[str]:
    """torchfree's modules: torchfree.torch, or the others. mypy is asked to check them too, so
    that --strict applies to their stubs (it reports no errors in an installed package a program
    imports). By name: mypy finds them where it finds torchfree for the examples."""
    names = ["torchfree"] + [f"torchfree.{m.name}" for m in pkgutil.iter_modules(torchfree.__path__)]
    return [n for n in names if (n == "torchfree.torch") == torch]


def expected_reveals(example: Path) -> dict[int, str]:
    """{line: type} of the example's reveal_type calls, from the comments below each."""
    lines = example.read_text().splitlines()
    out = {}
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("reveal_type("):
            continue
        head = lines[i + 1].strip()
        assert head.startswith("# -> "), f"{example.name}:{i + 1}: no '# -> TYPE' line below reveal_type"
        parts, j = [head[5:]], i + 2
        while j < len(lines) and lines[j].strip().startswith("#    "):
            parts.append(lines[j].strip()[1:].strip())
            j += 1
        out[i + 1] = " ".join(parts)
    return out


def check_mypy(workdir: Path, example: Path, modules: list[str]) -> None:
    # modules, not files: a file of site-packages given to mypy makes all of site-packages a source
    # folder, whose typing_extensions.py then "shadows library module typing_extensions"
    args = [a for m in [example.stem, *modules] for a in ("-m", m)]
    env = dict(os.environ, MYPYPATH=str(EXAMPLES))  # where the example modules are
    out = run(workdir, "mypy", "--strict", "--cache-dir", workdir / "cache", *args, env=env)
    reveals = re.findall(r'^(.*):(\d+): note: Revealed type is "(.*)"$', out, re.M)
    # older mypy wrote builtins' types in full ("builtins.str")
    got = {int(n): t.replace("builtins.", "") for path, n, t in reveals if Path(path).name == example.name}
    want = expected_reveals(example)
    assert want, f"{example.name} reveals nothing"
    bad = [f"{example.name}:{n}: mypy revealed {got.get(n)!r}, the example expects {want.get(n)!r}"
           for n in sorted(set(got) | set(want)) if got.get(n) != want.get(n)]
    assert not bad, "\n".join(bad)


def test_examples_use_every_public_name():
    for name, example in USERS.items():
        mod = importlib.import_module(name)  # torchfree.torch imports torch on first use only
        public = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
        text = example.read_text()
        unused = [n for n in public if not re.search(rf"\b{re.escape(name)}\.{re.escape(n)}\b", text)]
        assert not unused, f"{example.name} does not use " + ", ".join(f"{name}.{n}" for n in unused)


@pytest.mark.slow  # mypy: seconds (more without its cache, and with torch)
def test_mypy_strict_torch_free(workdir):
    check_mypy(workdir, TORCH_FREE, package_modules(torch=False))


@pytest.mark.slow
@pytest.mark.needs_torch
def test_mypy_strict_torch(workdir):
    check_mypy(workdir, WITH_TORCH, package_modules(torch=True))


@pytest.mark.slow
@pytest.mark.needs_torch
def test_stubtest_agrees_with_the_runtime(workdir):
    """Every module of the package (stubtest finds the submodules), torchfree.torch's included."""
    run(workdir, "mypy.stubtest", "torchfree", *(a for path in ALLOWLISTS for a in ("--allowlist", path)))
