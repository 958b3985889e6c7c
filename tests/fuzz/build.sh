#!/usr/bin/env bash
# Build the fuzz targets of the Python-free core (tests/fuzz/README.md).
#
#   tests/fuzz/build.sh [OUTDIR]        (default: tests/fuzz/build)
#
# With clang (and its libFuzzer runtime): OUTDIR/fuzz_zipread and
# OUTDIR/fuzz_pickscan, libFuzzer binaries built with ASan + UBSan.
# Always, with gcc: OUTDIR/driver_zipread and OUTDIR/driver_pickscan, the same
# targets linked with driver.c (seed replay + random mutations) under ASan +
# UBSan, for machines without clang. Prints one line per binary built.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../../src" && pwd)
OUT=${1:-$HERE/build}
mkdir -p "$OUT"
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
COMMON="-std=c11 -g -O1 -Wall -Wextra -Wshadow -Werror -UNDEBUG -D_GNU_SOURCE"
ZIP_SRC="$HERE/fuzz_zipread.c $SRC/zipread.c $SRC/zipentry.c $SRC/common.c"
PICK_SRC="$HERE/fuzz_pickscan.c $SRC/pickscan.c $SRC/globals.c $SRC/dtypes.c $SRC/common.c"

CC_FUZZ=${CLANG:-$(command -v clang || true)}
if [ -n "$CC_FUZZ" ] && echo 'int LLVMFuzzerTestOneInput(const char *d, long n){return 0;}' |
    "$CC_FUZZ" -x c -fsanitize=fuzzer,address -o "$OUT/.probe" - 2>/dev/null; then
    rm -f "$OUT/.probe"
    # shellcheck disable=SC2086
    "$CC_FUZZ" $COMMON $SAN -fsanitize=fuzzer -o "$OUT/fuzz_zipread" $ZIP_SRC -lz
    echo "built $OUT/fuzz_zipread (libFuzzer, $("$CC_FUZZ" --version | head -1))"
    # shellcheck disable=SC2086
    "$CC_FUZZ" $COMMON $SAN -fsanitize=fuzzer -o "$OUT/fuzz_pickscan" $PICK_SRC
    echo "built $OUT/fuzz_pickscan (libFuzzer)"
else
    rm -f "$OUT/.probe" "$OUT/fuzz_zipread" "$OUT/fuzz_pickscan"
    echo "no clang with libFuzzer: only the gcc drivers are built"
fi

CC_GCC=${CC:-gcc}
# shellcheck disable=SC2086
"$CC_GCC" $COMMON $SAN -o "$OUT/driver_zipread" "$HERE/driver.c" $ZIP_SRC -lz
echo "built $OUT/driver_zipread (gcc driver)"
# shellcheck disable=SC2086
"$CC_GCC" $COMMON $SAN -o "$OUT/driver_pickscan" "$HERE/driver.c" $PICK_SRC
echo "built $OUT/driver_pickscan (gcc driver)"
