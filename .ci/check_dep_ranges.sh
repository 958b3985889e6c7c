#!/usr/bin/env bash
# The declared dependency ranges are true: the torch-free tests pass with the wheel installed
# next to the OLDEST releases pyproject.toml allows (each dependency pinned to its lower bound,
# read from [project].dependencies with the markers evaluated for this Python) and next to the
# NEWEST releases (checked with `pip list --outdated`). Torch is not installed in either venv.
#
#   .ci/check_dep_ranges.sh [PYTHON]      (or PYTHON=...; default python3)
#   TORCHFREE_WHEEL=path/to.whl .ci/check_dep_ranges.sh    (test that wheel instead of building one)
#
# Works from any directory; touches nothing in the working tree (it builds from a copy).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

echo "== the lower bounds pyproject.toml declares for $("$PY" -c 'import sys; print("Python %d.%d" % sys.version_info[:2])')"
"$PY" -m venv "$WORK/tools"
"$WORK/tools/bin/python" -m pip install -q packaging
OLDEST=$("$WORK/tools/bin/python" - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
low = {}
for text in deps:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate():
        continue
    name = canonicalize_name(req.name)
    low.setdefault(name, None)
    for spec in req.specifier:
        if spec.operator in (">=", "==", "~=", "==="):
            v = Version(spec.version)
            low[name] = v if low[name] is None else max(low[name], v)
none = [n for n, v in low.items() if v is None]
if none:
    sys.exit(f"no lower bound declared for {none}: nothing to test as the oldest")
print(" ".join(f"{n}=={v}" for n, v in sorted(low.items())))
EOF
)
echo "oldest: $OLDEST"

if [ -n "${TORCHFREE_WHEEL:-}" ]; then
    WHEEL=$(cd "$(dirname "$TORCHFREE_WHEEL")" && pwd)/$(basename "$TORCHFREE_WHEEL")
    echo "== the wheel given: $(basename "$WHEEL")"
else
    echo "== pip wheel . (build isolation: numpy>=2 headers, as a released wheel is built)"
    copy_source "$WORK/src"
    (cd "$WORK/src" && "$PY" -m pip wheel . --no-deps -q -w "$WORK/wheel")
    WHEEL=$(ls "$WORK"/wheel/torchfree-*.whl)
    echo "built $(basename "$WHEEL")"
fi

# the tests, run away from pyext/ (they read README.md, pyproject.toml, src/ and bench/ beside tests/)
RUN="$WORK/run"
mkdir -p "$RUN"
[ -d "$WORK/src" ] || copy_source "$WORK/src"
cp -a "$WORK/src/tests" "$WORK/src/bench" "$WORK/src/src" "$WORK/src/README.md" "$WORK/src/pyproject.toml" "$RUN/"
rm -rf "$RUN/tests/.cache"

summary=()
run_with() {  # label, pip requirements...
    local label=$1; shift
    local venv="$WORK/venv-$label" t1=$SECONDS
    echo "== $label: a fresh venv with $*"
    "$PY" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --only-binary=:all: "$WHEEL[test]" "$@"
    if "$venv/bin/python" -c "import torch" 2>/dev/null; then echo "FAIL: torch is importable"; exit 1; fi
    local got
    got=$(cd "$RUN" && env -u PYTHONPATH "$venv/bin/python" - "$venv" <<'EOF'
import os, sys, torchfree, numpy, ml_dtypes
venv = os.path.realpath(sys.argv[1])
assert os.path.realpath(torchfree.__file__).startswith(venv + os.sep), torchfree.__file__
print(f"ml-dtypes=={ml_dtypes.__version__} numpy=={numpy.__version__}")  # as OLDEST: sorted, canonical
EOF
)
    echo "installed: $got"
    if [ "$label" = oldest ] && ! "$WORK/tools/bin/python" -c '
import sys
from packaging.requirements import Requirement
pins = lambda s: {r.name: set(r.specifier) for r in map(Requirement, s.split())}
sys.exit(pins(sys.argv[1]) != pins(sys.argv[2]))' "$got" "$OLDEST"; then
        echo "FAIL: installed $got, not the declared lower bounds $OLDEST"; exit 1
    fi
    if [ "$label" = newest ]; then
        local stale
        stale=$("$venv/bin/python" -m pip list --outdated --format=freeze 2>/dev/null |
                grep -iE '^(numpy|ml[-_]dtypes)==' || true)
        [ -z "$stale" ] || { echo "FAIL: not the newest: $stale"; exit 1; }
    fi
    (cd "$RUN" && env -u PYTHONPATH "$venv/bin/python" -m pytest -q -rs -p no:cacheprovider -m "not needs_torch" tests)
    summary+=("$label ($got): green in $((SECONDS - t1)) s")
}

run_with oldest $OLDEST
run_with newest --upgrade numpy ml_dtypes
printf '%s\n' "${summary[@]}"
echo "== dependency ranges green, all $((SECONDS - t0)) s"
