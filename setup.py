"""Declares zcore's compiled extensions; everything else lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

C_SOURCES = ["csrc/zc_crc32c.c", "csrc/zc_record.c", "csrc/zc_index.c", "csrc/zc_capture.c"]
COMPILE_ARGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11"]


def native(name: str) -> Extension:
    return Extension(
        f"zcore._native.{name}",
        [f"zcore/_native/{name}.pyx", *C_SOURCES],
        include_dirs=["csrc"],
        extra_compile_args=COMPILE_ARGS,
    )


setup(
    ext_modules=cythonize(
        [native("record"), native("index"), native("capture")],
        compiler_directives={"language_level": 3},
    ),
)
