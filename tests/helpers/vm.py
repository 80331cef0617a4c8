"""The real-VM kit of the tests (no tests here): a Debian kernel and a busybox initramfs that
boot under QEMU in a few seconds, an ext4 image maker, and a reader of files in an image.

`vm_kit(cache_dir)` builds the kit once per test session (later calls return it): it
runs tests/vm/fetch_guest.sh, which downloads Debian's `linux-image-<version>-cloud-amd64`
(the version that `linux-image-cloud-amd64` depends on) and `busybox-static` with
`apt-get download` and unpacks them with `dpkg-deb -x` (no package is installed, no
install hook runs; a cache it already filled is kept), and writes a gzipped newc cpio
initramfs whose /init (busybox sh):

- mounts /proc, /sys and devtmpfs;
- insmods the modules the guest needs, from the kernel package, with their dependencies
  first (read from each module's own `depends=`/`softdep=` field, since the package ships no
  modules.dep): virtio_pci and virtio_blk (virtio_ring, virtio, virtio_pci_legacy_dev,
  virtio_pci_modern_dev, virtio_pci, virtio_blk), ext4 when it is not built in, and the ACPI
  power button with evdev, so a QMP `system_powerdown` powers the guest off (a script that
  runs `IGNORE_POWER_BUTTON` makes it ignore the button, as a hung guest would);
- runs the test script: one appended to the initramfs as /zcore-test.sh
  (`VMKit.initrd_with_script`), or one given base64-encoded on the kernel command line as
  `zcore.script=...`;
- prints the marker lines `ZCORE-KIT: ...` on the serial console and powers off with
  `poweroff -f` (with QEMU's -no-reboot, a panic exits too: the command line has panic=-1).

In CI (CI=true) a missing tool or a failed download fails the test; elsewhere it skips,
as conftest's `require_tool` does.  ZCORE_VM_KIT_DIR names a directory that keeps the kit
between sessions (the download is ~28 MB).
"""

from __future__ import annotations

import base64
import gzip
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import IN_CI, require_tool

from zcore.adapters import QemuConfig

BUSYBOX = "busybox-static"
# the modules /init loads (their dependencies come first, found by `module_order`)
WANTED_MODULES = ("virtio_pci", "virtio_blk", "ext4", "button", "evdev")
# markers /init prints on the serial console
READY = "ZCORE-KIT: ready"
SCRIPT_EXIT = "ZCORE-KIT: script exit"
POWER_BUTTON = "ZCORE-KIT: power button"
# a script line that makes the guest ignore the ACPI power button from then on
IGNORE_POWER_BUTTON = "kill $(cat /tmp/zcore-kit-power.pids)"

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /mnt /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m.ko || echo "ZCORE-KIT: insmod $m failed"
done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n+1)); done
for i in /sys/class/input/input*; do
  if [ "$(cat $i/name 2>/dev/null)" = "Power Button" ]; then
    for e in $i/event*; do
      ev=/dev/input/${e##*/}
      (dd if=$ev of=/dev/null bs=24 count=1 2>/dev/null; echo "ZCORE-KIT: power button";
       sync; poweroff -f) &
      echo $! >> /tmp/zcore-kit-power.pids
    done
  fi
done
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    zcore.script=*) echo "${arg#zcore.script=}" | base64 -d > /zcore-test.sh ;;
  esac
done
echo "ZCORE-KIT: ready"
if [ -f /zcore-test.sh ]; then
  sh /zcore-test.sh
  echo "ZCORE-KIT: script exit $?"
fi
sync
poweroff -f
"""


def unavailable(message: str) -> None:
    """Fail in CI, skip elsewhere (the rule of conftest's require_tool)."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, check=False,
                          cwd=cwd)


# ---- newc cpio ---------------------------------------------------------------------------


class Cpio:
    """A newc ("070701") cpio archive written in memory, as the kernel's initramfs reads it."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               ) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0]
        self.ino += 1
        self.out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        self.out += bytes(-len(self.out) % 4)
        self.out += data
        self.out += bytes(-len(self.out) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.out)


# ---- modules -----------------------------------------------------------------------------


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressed (Debian ships .ko, .ko.xz or .ko.zst by release)."""
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            unavailable("the kernel's modules are zstd-compressed and zstd is not installed")
        return subprocess.run([str(zstd), "-dc", str(path)], capture_output=True,
                              check=True).stdout
    return path.read_bytes()


def modinfo_field(elf: bytes, key: str) -> list[str]:
    """The values of `key=` in a module's .modinfo strings."""
    return [m.decode() for m in re.findall(rb"(?:^|\0)" + key.encode() + rb"=([^\0]*)", elf)]


def module_order(modules: dict[str, Path], builtin: set[str],
                 wanted: tuple[str, ...]) -> list[str]:
    """The modules to insmod for `wanted`, each after its dependencies (built-in ones and
    ones the package lacks are left out)."""
    order: list[str] = []

    def visit(name: str, seen: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in order or name in builtin or name in seen:
            return
        if name not in modules:
            if f"{name}_generic" in modules:  # softdeps name algorithms: crc32c
                visit(f"{name}_generic", seen)
            return
        elf = read_module(modules[name])
        deps = [d for field in modinfo_field(elf, "depends") for d in field.split(",") if d]
        for soft in modinfo_field(elf, "softdep"):
            pre = soft.split("pre:", 1)[1].split("post:")[0] if "pre:" in soft else ""
            deps += pre.split()
        for dep in deps:
            visit(dep, (*seen, name))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


# ---- the kit -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VMKit:
    """A kernel and an initramfs that boot a test script under QEMU."""

    kernel: Path
    initrd: Path
    modules: tuple[str, ...]  # insmod order
    kernel_version: str

    def initrd_with_script(self, script: str, dest: Path) -> Path:
        """The kit's initramfs with `script` appended as /zcore-test.sh (the kernel unpacks
        concatenated archives in order), written to `dest`."""
        extra = Cpio()
        extra.file("zcore-test.sh", script.encode(), 0o755)
        dest.write_bytes(self.initrd.read_bytes() + extra.finish())
        return dest

    def append(self, extra: str = "", script: str | None = None) -> str:
        """The kernel command line: serial console, quiet, exit on panic; `script` goes
        base64-encoded as zcore.script= (keep it short: the line holds 2 KiB)."""
        line = "console=ttyS0 quiet panic=-1 " + extra
        if script is not None:
            line += " zcore.script=" + base64.b64encode(script.encode()).decode()
        return line.strip()

    def qemu_config(self, script: str, dest_dir: Path, memory_mib: int = 256) -> QemuConfig:
        """A QemuConfig that boots the kit with `script` baked into its initramfs."""
        initrd = self.initrd_with_script(script, dest_dir / "initrd-test.img")
        return QemuConfig(kernel=self.kernel, initrd=initrd, append=self.append(),
                          memory_mib=memory_mib)


FETCH_GUEST = Path(__file__).resolve().parent.parent / "vm" / "fetch_guest.sh"


def _download(cache: Path) -> tuple[Path, Path]:
    """The kernel and busybox packages in `cache`, fetched and unpacked there by
    tests/vm/fetch_guest.sh (the one way the tests get them; .ci/run runs it ahead);
    (kernel deb, busybox deb)."""
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        require_tool(tool)
    got = run(["sh", str(FETCH_GUEST), str(cache)])
    if got.returncode:
        unavailable(f"{FETCH_GUEST.name} failed (run apt-get update?):\n"
                    f"{got.stdout}{got.stderr}")
    debs = []
    for pattern in ("linux-image-*-cloud-amd64_*.deb", f"{BUSYBOX}_*.deb"):
        have = sorted(cache.glob(pattern))
        if not have:
            unavailable(f"{FETCH_GUEST.name} left no {pattern} in {cache}")
        debs.append(have[-1])
    return debs[0], debs[1]


def _unpack(deb: Path, dest: Path) -> Path:
    if not dest.exists():
        tmp = Path(tempfile.mkdtemp(dir=dest.parent))
        got = run(["dpkg-deb", "-x", str(deb), str(tmp)])
        if got.returncode:
            unavailable(f"dpkg-deb -x {deb.name} failed: {got.stderr}")
        tmp.rename(dest)
    return dest


def _build_initrd(kernel_root: Path, busybox_root: Path, dest: Path) -> tuple[str, list[str]]:
    """Write the gzipped initramfs; (kernel version, module order)."""
    lib = next(p for p in (kernel_root / "lib" / "modules", kernel_root / "usr" / "lib" /
                           "modules") if p.is_dir())
    (moddir,) = [p for p in lib.iterdir() if p.is_dir()]
    modules = {re.sub(r"\.ko(\.\w+)?$", "", p.name).replace("-", "_"): p
               for p in moddir.rglob("*.ko*")}
    builtin_file = moddir / "modules.builtin"
    builtin = {Path(line).name.split(".ko")[0].replace("-", "_")
               for line in builtin_file.read_text().split()} if builtin_file.exists() else set()
    order = module_order(modules, builtin, WANTED_MODULES)
    archive = Cpio()
    for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "lib", "lib/modules"):
        archive.dir(d)
    archive.chardev("dev/console", 5, 1)
    archive.chardev("dev/null", 1, 3)
    archive.file("bin/busybox", (busybox_root / "bin" / "busybox").read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", INIT.encode(), 0o755)
    for name in order:
        archive.file(f"lib/modules/{name}.ko", read_module(modules[name]))
    archive.file("lib/modules/order", ("\n".join(order) + "\n").encode())
    packed = gzip.compress(archive.finish(), compresslevel=6, mtime=0)
    # pad so that a cpio appended later starts 512-aligned (the kernel skips zero padding
    # between concatenated archives)
    # written aside and renamed: sessions sharing $ZCORE_VM_KIT_DIR build the same bytes
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(packed + bytes(-len(packed) % 512))
    tmp.replace(dest)
    return moddir.name, order


_KITS: dict[Path, VMKit] = {}


def vm_kit(cache_dir: Path) -> VMKit:
    """The kit, built under `cache_dir` (or $ZCORE_VM_KIT_DIR) once per session; skips or,
    in CI, fails when a tool or the download is missing."""
    cache = Path(os.environ.get("ZCORE_VM_KIT_DIR") or cache_dir)
    if cache in _KITS:
        return _KITS[cache]
    cache.mkdir(parents=True, exist_ok=True)
    kernel_deb, busybox_deb = _download(cache)
    kroot = _unpack(kernel_deb, cache / kernel_deb.stem)
    broot = _unpack(busybox_deb, cache / busybox_deb.stem)
    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        unavailable(f"{kernel_deb.name} holds no /boot/vmlinuz-*")
    initrd = cache / "initrd.img"
    version, order = _build_initrd(kroot, broot, initrd)
    kit = VMKit(vmlinuz[-1], initrd, tuple(order), version)
    _KITS[cache] = kit
    return kit


# ---- ext4 images -------------------------------------------------------------------------


def make_ext4_image(path: Path, files: dict[str, bytes], size_mib: int = 32) -> Path:
    """An ext4 filesystem image of `size_mib` MiB at `path` holding `files` (relative paths
    -> contents), made with mkfs.ext4 -d (e2fsprogs)."""
    mkfs = require_tool("mkfs.ext4")
    with tempfile.TemporaryDirectory() as staging:
        for rel, data in files.items():
            target = Path(staging) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        path.unlink(missing_ok=True)
        got = run([mkfs, "-q", "-F", "-L", "zcore-test", "-E", "root_owner=0:0",
                   "-d", staging, str(path), f"{size_mib}M"])
    if got.returncode:
        raise AssertionError(f"mkfs.ext4 failed: {got.stdout}{got.stderr}")
    return path


def read_ext4_file(image: Path, path: str) -> bytes:
    """The contents of `path` inside the ext4 image (debugfs -R 'cat PATH', e2fsprogs);
    AssertionError when it is not there."""
    debugfs = require_tool("debugfs")
    got = subprocess.run([debugfs, "-R", f"cat {path}", str(image)], capture_output=True,
                         timeout=60, check=False)
    if got.returncode or b"File not found" in got.stderr:
        raise AssertionError(f"debugfs cannot read {path} in {image}: "
                             f"{got.stderr.decode(errors='replace')}")
    return got.stdout
