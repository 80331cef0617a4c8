"""The `zcore` command line: the demo, and the tools that sit on top of the library."""

from __future__ import annotations

import os
import sys
import tempfile
import time

import click

from zcore.journal import Journal, VolumeSpec


@click.group()
@click.version_option(package_name="zcore")
def main() -> None:
    """zcore: continuous data protection for virtual disks."""


@main.command()
@click.option("--volume-mib", default=64, show_default=True, help="size of each demo volume")
@click.option("--writes", default=2000, show_default=True, help="writes before the checkpoint")
@click.option("--keep", type=click.Path(file_okay=False), default=None,
              help="keep the demo's files in this directory instead of a temporary one")
def demo(volume_mib: int, writes: int, keep: str | None) -> None:
    """Journal a workload, tag a checkpoint, overwrite it as ransomware would, recover."""
    import random

    rng = random.Random(1)
    size = volume_mib << 20
    with tempfile.TemporaryDirectory(prefix="zcore-demo-") as tmp:
        base = keep or tmp
        os.makedirs(base, exist_ok=True)
        journal = Journal.create(os.path.join(base, "vm1"),
                                 [VolumeSpec(0, "disk0", size), VolumeSpec(1, "disk1", size)],
                                 vm="vm1")
        model = {0: bytearray(size), 1: bytearray(size)}
        start = time.perf_counter()
        written = 0
        for _ in range(writes):
            vol = rng.randrange(2)
            length = rng.randrange(1, 17) * 4096
            offset = rng.randrange(0, (size - length) // 4096) * 4096
            data = rng.randbytes(length // 2) + bytes(length // 2)
            journal.append([(vol, offset, data)])
            model[vol][offset : offset + length] = data
            written += length
        tagged = journal.checkpoint("before ransomware")
        journal.commit()
        snapshot = {v: bytes(b) for v, b in model.items()}
        for vol in (0, 1):  # "encrypt" every block of both disks
            for offset in range(0, size, 1 << 20):
                junk = rng.randbytes(1 << 20)
                journal.append([(vol, offset, junk)])
        journal.commit()
        elapsed = time.perf_counter() - start
        with journal.view(tagged) as view:
            mismatches = sum(
                view.read(vol, off, 1 << 20) != snapshot[vol][off : off + (1 << 20)]
                for vol in (0, 1) for off in range(0, size, 1 << 20)
            )
        status = journal.status()
        journal.close()
        click.echo(f"journaled {written / 2**20:.1f} MiB in {writes} writes, then "
                   f"{2 * size / 2**20:.0f} MiB of ransomware overwrites in {elapsed:.2f} s")
        click.echo(f"journal: {status.size_bytes / 2**20:.1f} MiB on disk, "
                   f"{status.records} records, checkpoint {tagged.id} "
                   f"tagged {tagged.tag!r}")
        if mismatches:
            click.echo(f"FAILED: {mismatches} MiB differ from the tagged checkpoint", err=True)
            sys.exit(1)
        click.echo("recovered both volumes at the tagged checkpoint: byte-for-byte identical")


if __name__ == "__main__":
    main()
