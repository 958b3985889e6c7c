#!/usr/bin/env bash
# The sdist holds what its tests need: `python -m build --sdist` (from a clean copy of the
# source), its contents checked, then unpacked, pip-installed from the unpacked folder into a
# fresh venv (with the test extra, no torch), and the torch-free tests run from that folder.
#
#   .ci/check_sdist.sh [PYTHON]      (or PYTHON=... .ci/check_sdist.sh; default python3)
#
# Works from any directory; touches nothing in the working tree (it builds from a copy).
# Needs a C compiler (the sdist builds the extension; tests/test_zipread_c.py and
# tests/test_fuzz_short.py compile C drivers from the sdist's src/ and tests/).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

echo "== tools (build) in their own venv"
"$PY" -m venv "$WORK/tools"
"$WORK/tools/bin/python" -m pip install -q build

echo "== python -m build --sdist"
copy_source "$WORK/src"
"$WORK/tools/bin/python" -m build --sdist --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1 ||
    { cat "$WORK/build.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/torchfree-*.tar.gz)
echo "built $(basename "$SDIST") ($(du -k "$SDIST" | cut -f1) KiB)"

echo "== its contents"
tar -tzf "$SDIST" | sed 's|^[^/]*/||' | sort >"$WORK/list"
echo "$(wc -l <"$WORK/list") entries"
missing=0
for f in pyproject.toml setup.py MANIFEST.in README.md LICENSE \
         src/limits.h src/module.c pyext/torchfree/__init__.py pyext/torchfree/_version.py \
         tests/conftest.py tests/c/zipdump.c tests/fuzz/build.sh tests/fuzz/driver.c tests/fuzz/zip.dict \
         tests/hostile/README.md tests/data/expected.json tests/data/corpus/MANIFEST.jsonl \
         tests/data/samples/basic211.pt bench/suite.py; do
    grep -qxF "$f" "$WORK/list" || { echo "MISSING from the sdist: $f"; missing=1; }
done
# every file git knows under these folders is in the sdist
(cd "$WORK/src" && find src tests bench pyext -type f -not -path "*.egg-info/*") | sort >"$WORK/want"
comm -23 "$WORK/want" "$WORK/list" | sed 's/^/MISSING from the sdist: /' | tee "$WORK/miss"
[ -s "$WORK/miss" ] && missing=1
if grep -E '(\.so|\.o|\.pyc|\.egg-info/.*)$|(^|/)(__pycache__|\.cache|build|dist)/' "$WORK/list" | grep -v '^pyext/torchfree\.egg-info/' ; then
    echo "FAIL: build outputs or caches in the sdist (above)"; missing=1
fi
[ "$missing" = 0 ] || { echo "FAIL: the sdist lacks files"; exit 1; }

echo "== unpack, pip install from the unpacked folder (a fresh venv, the test extra, no torch)"
mkdir "$WORK/unpacked"
tar -xzf "$SDIST" -C "$WORK/unpacked"
UNP=$(ls -d "$WORK"/unpacked/torchfree-*)
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin/python"
"$V" -m pip install -q "$UNP[test]"
if "$V" -c "import torch" 2>/dev/null; then echo "FAIL: torch is importable in the test venv"; exit 1; fi

cd "$UNP"
env -u PYTHONPATH "$V" - "$WORK/venv" <<'EOF'
import os, sys, torchfree, numpy, ml_dtypes
venv = os.path.realpath(sys.argv[1])
where = os.path.realpath(torchfree.__file__)
print("torchfree", torchfree.__version__, "from", where)
print("numpy", numpy.__version__, "ml_dtypes", ml_dtypes.__version__)
assert where.startswith(venv + os.sep), f"torchfree imported from {where}, not the one installed in {venv}"
EOF

echo "== the torch-free tests, from the unpacked sdist"
t1=$SECONDS
env -u PYTHONPATH "$V" -m pytest -q -rs -p no:cacheprovider -m "not needs_torch" tests
echo "== sdist check green: $(basename "$SDIST"), tests $((SECONDS - t1)) s, all $((SECONDS - t0)) s"
