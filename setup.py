"""Build torchfree: one C extension, torchfree._core, with an explicit source list.

Environment switches:
  TORCHFREE_WERROR=1    warnings are errors (CI)
  TORCHFREE_DEBUG=1     -O0 -g with asserts (-UNDEBUG)
  TORCHFREE_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer (implies DEBUG)
"""
import os

import numpy
from setuptools import Extension, setup

SOURCES = [
    "src/common.c",
    "src/limits.c",
    "src/dtypes.c",
    "src/globals.c",
    "src/zipread.c",
    "src/zipentry.c",
    "src/crc32.c",
    "src/pickscan.c",
    "src/pagedrop.c",
    "src/state.c",
    "src/vm_stack.c",
    "src/vm_objects.c",
    "src/vm.c",
    "src/storage_io.c",
    "src/storage.c",
    "src/tensor.c",
    "src/fastpath.c",
    "src/loader.c",
    "src/archive.c",
    "src/legacy.c",
    "src/scaninfo.c",
    "src/scanwalk.c",
    "src/pickler.c",
    "src/zipwrite.c",
    "src/writer.c",
    "src/save_collect.c",
    "src/save_pickle.c",
    "src/save.c",
    "src/module.c",
    "src/pickscan_py.c",
]
HEADERS = [
    "src/common.h",
    "src/limits.h",
    "src/dtypes.h",
    "src/globals.h",
    "src/opcodes.h",
    "src/oparg.h",
    "src/state.h",
    "src/objects.h",
    "src/loader.h",
    "src/pagedrop.h",
    "src/vm.h",
    "src/vm_impl.h",
    "src/rebuild.h",
    "src/load.h",
    "src/scaninfo.h",
    "src/zipread.h",
    "src/zipread_impl.h",
    "src/crc32.h",
    "src/pickscan.h",
    "src/pickler.h",
    "src/zipwrite.h",
    "src/writer.h",
    "src/saver.h",
    "src/save.h",
    "src/platform.h",
]


def flag(name):
    return os.environ.get(name, "") not in ("", "0")


cflags = ["-std=c11", "-Wall", "-Wextra", "-Wshadow", "-Wno-unused-parameter", "-fvisibility=hidden", "-D_GNU_SOURCE"]
ldflags = []
if flag("TORCHFREE_WERROR"):
    cflags.append("-Werror")
if flag("TORCHFREE_DEBUG") or flag("TORCHFREE_SANITIZE"):
    cflags += ["-O0", "-g", "-UNDEBUG"]
else:
    cflags += ["-O2"]
if flag("TORCHFREE_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    cflags += san
    ldflags += san

setup(
    ext_modules=[
        Extension(
            "torchfree._core",
            sources=SOURCES,
            depends=HEADERS,
            include_dirs=[numpy.get_include()],  # no -Isrc: src/limits.h must not shadow <limits.h>,
            # the oldest numpy C API the binary runs on: pyproject.toml's lower bound (1.23)
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), ("NPY_TARGET_VERSION", "NPY_1_23_API_VERSION")],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
            libraries=["z", "pthread"],
        )
    ],
)
