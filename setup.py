"""Declares zcore's compiled parts; everything else lives in pyproject.toml.

The C kernels in csrc/ are compiled once into the static library `zc` (build_clib) and
linked into each Cython extension.  `ZCORE_WERROR=1` in the environment turns every
warning of `-Wall -Wextra` into an error (CI sets it).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

C_SOURCES = ["csrc/zc_crc32c.c", "csrc/zc_record.c", "csrc/zc_index.c", "csrc/zc_capture.c"]
C_HEADERS = [
    "csrc/zc_format.h", "csrc/zc_crc32c.h", "csrc/zc_record.h", "csrc/zc_index.h",
    "csrc/zc_capture.h",
]
WARNINGS = ["-Wall", "-Wextra"]
if os.environ.get("ZCORE_WERROR") == "1":
    WARNINGS.append("-Werror")
C_FLAGS = ["-O2", "-std=gnu11", *WARNINGS]

ZC_LIBRARY = ("zc", {"sources": C_SOURCES, "include_dirs": ["csrc"], "cflags": C_FLAGS,
                     "obj_deps": {"": C_HEADERS}})


def native(name: str) -> Extension:
    return Extension(
        f"zcore._native.{name}",
        [f"zcore/_native/{name}.pyx"],
        include_dirs=["csrc"],
        libraries=["zc"],
        extra_compile_args=C_FLAGS,
        depends=[*C_SOURCES, *C_HEADERS],  # relink when the library's sources change
    )


setup(
    libraries=[ZC_LIBRARY],
    ext_modules=cythonize(
        [native("record"), native("index"), native("capture")],
        compiler_directives={"language_level": 3},
    ),
)
