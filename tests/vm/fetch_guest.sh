#!/bin/sh
# Fetch the real-VM tests' guest into DIR (default $ZCORE_VM_KIT_DIR): Debian's cloud
# kernel and a static busybox, downloaded with `apt-get download` and unpacked with
# `dpkg-deb -x` into DIR/<package>_<version>_<arch>/, so no package is installed and none
# of the kernel's install hooks runs.  The concrete kernel package is the one the
# linux-image-cloud-amd64 metapackage depends on (apt-cache depends).  Idempotent: what is
# already in DIR is kept.  .ci/run calls it; tests/helpers/vm.py (vm_kit) calls it when
# DIR lacks a package, then builds the initramfs from DIR.
set -eu
dir=${1:-${ZCORE_VM_KIT_DIR:?give a directory or set ZCORE_VM_KIT_DIR}}
mkdir -p "$dir"
cd "$dir"
kernel=$(apt-cache depends linux-image-cloud-amd64 |
  sed -n 's/^ *Depends: *\(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n 1)
if [ -z "$kernel" ]; then
  echo "fetch_guest: apt-cache does not know linux-image-cloud-amd64 (run apt-get update?)" >&2
  exit 1
fi
for package in "$kernel" busybox-static; do
  set -- "$package"_*.deb
  if [ ! -e "$1" ]; then
    apt-get download -q "$package" >&2
    set -- "$package"_*.deb
  fi
  deb=$1
  unpacked=${deb%.deb}
  if [ ! -d "$unpacked" ]; then
    rm -rf "$unpacked.tmp"
    dpkg-deb -x "$deb" "$unpacked.tmp"
    mv "$unpacked.tmp" "$unpacked"
  fi
  echo "$dir/$unpacked"
done
