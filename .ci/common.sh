# Sourced by the .ci/check_*.sh scripts: ROOT (the repository), PY (the python to use: $1, else
# $PYTHON, else python3; an absolute path, since the scripts cd around), WORK (a temporary folder
# removed on exit), t0, and copy_source DEST.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${1:-${PYTHON:-python3}}
PY=$(command -v "$PY") || { echo "no such python: $PY"; exit 1; }
case $PY in /*) ;; *) PY=$PWD/$PY ;; esac
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS

# Copy the source as git sees it (tracked and untracked-but-not-ignored files that exist) to DEST:
# no build outputs, no in-place _core*.so, and above all no stale egg-info, whose SOURCES.txt
# setuptools would add to an sdist (hiding a MANIFEST.in that misses a file). Outside a git
# checkout (an unpacked sdist, a copy) every file but build outputs and caches.
copy_source() {
    "$PY" - "$ROOT" "$1" <<'EOF'
import os, shutil, subprocess, sys
root, dst = sys.argv[1:]
try:
    out = subprocess.run(["git", "-C", root, "ls-files", "-z", "-c", "-o", "--exclude-standard"],
                         capture_output=True, check=True).stdout.decode()
    files = sorted(set(out.split("\0")) - {""})
except (OSError, subprocess.CalledProcessError):
    skip = {".git", "build", "dist", "__pycache__", ".venv", "venv", ".cache", ".hypothesis", ".pytest_cache"}
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip and not x.endswith(".egg-info")]
        files += [os.path.relpath(os.path.join(d, n), root) for n in names if not n.endswith((".so", ".o", ".pyc"))]
for rel in files:
    src = os.path.join(root, rel)
    if os.path.isfile(src):
        os.makedirs(os.path.dirname(os.path.join(dst, rel)) or dst, exist_ok=True)
        shutil.copy2(src, os.path.join(dst, rel))
EOF
}
