#!/bin/sh
# Build zcore's C extensions with clang's coverage instrumentation for the fuzzers
# (-fsanitize=fuzzer-no-link), into a separate tree, leaving the installed build alone:
#
#   tests/fuzz/build_native_for_fuzzing.sh [OUT]        (default: build/fuzz-native)
#   ZCORE_FUZZ_NATIVE=OUT python -m pytest tests/fuzz    (test_fuzz.py then runs every
#                                                         target with the two below)
#   LD_PRELOAD=OUT/libfuzzer.so PYTHONPATH=OUT python tests/fuzz/fuzz_records.py ...
#
# OUT receives a copy of the zcore package whose zcore/_native modules are the
# instrumented builds, and libfuzzer.so: clang's libFuzzer runtime as a shared library.
# It must be preloaded: the instrumented modules call into libFuzzer when they load, and
# atheris ("Using preloaded libfuzzer") then drives that one.  Needs Debian's clang and
# Cython (the build dependency of setup.py).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$repo/build/fuzz-native}
mkdir -p "$out"
out=$(cd "$out" && pwd)
: "${ZC_FUZZ_CFLAGS:=-fsanitize=fuzzer-no-link}"
rm -rf "$out/zcore" "$out/tmp"
cp -r "$repo/zcore" "$out/zcore"
find "$out/zcore" -name '*.so' -delete
runtime=$(clang -print-file-name=libclang_rt.fuzzer_no_main-x86_64.a)
[ -f "$runtime" ] || runtime=$(ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer_no_main-x86_64.a | tail -1)
clang++ -shared -o "$out/libfuzzer.so" -Wl,--whole-archive "$runtime" -Wl,--no-whole-archive -lpthread
cd "$repo"
CC=clang LDSHARED="clang -shared" \
CFLAGS="$ZC_FUZZ_CFLAGS -O1 -g -fno-omit-frame-pointer" LDFLAGS="$ZC_FUZZ_CFLAGS" \
    python setup.py -q build_ext --build-lib "$out" --build-temp "$out/tmp" >/dev/null 2>&1
rm -rf "$out/tmp"
echo "instrumented zcore in $out (preload $out/libfuzzer.so)"
