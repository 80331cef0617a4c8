"""`zcore demo`: two site services on loopback, two VMs replicated over TLS, ransomware,
a failover to the tagged checkpoint verified byte for byte, reverse protection and a
failback (the work is `zcore.demo.run_demo`; this module prints it)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile

import click


@click.command()
@click.option("--volume-mib", default=64, show_default=True, help="size of each VM's disk")
@click.option("--seconds", default=4.0, show_default=True, help="length of the workload")
@click.option("--rate-mb", default=40.0, show_default=True, help="workload write rate, MB/s")
@click.option("--keep", type=click.Path(file_okay=False), default=None,
              help="keep the demo's files in this directory instead of a temporary one")
@click.option("--ui", is_flag=True, help="then leave two site services running with a "
              "protected VPG and print their browser UIs and tokens (until Ctrl-C)")
def demo(volume_mib: int, seconds: float, rate_mb: float, keep: str | None,
         ui: bool) -> None:
    """Run two site services on loopback, replicate two VMs over TLS, tag a checkpoint,
    let ransomware overwrite the disks, fail the VPG over to the tagged checkpoint and
    verify it byte for byte, commit with reverse protection, and fail back."""
    from zcore.demo import run_demo

    # the sites' own log lines (a refused ATTACH while the VPG is failed over, ...) are
    # what a site service logs; the demo shows its steps instead
    logging.basicConfig(level=logging.ERROR)
    if volume_mib < 1 or seconds <= 0 or rate_mb <= 0:
        raise click.BadParameter("volume size, duration and rate must be positive")
    with tempfile.TemporaryDirectory(prefix="zcore-demo-") as tmp:
        base = keep or os.path.join(tmp, "demo")
        report = run_demo(base, volume_bytes=volume_mib << 20, seconds=seconds,
                          rate_bytes=rate_mb * 1e6, say=click.echo)
    click.echo("")
    click.echo("report")
    click.echo(f"  workload          {report.written_bytes / 2**20:8.1f} MiB in "
               f"{report.workload_seconds:.1f} s, steady replication "
               f"{report.throughput_bytes / 1e6:.1f} MB/s")
    click.echo(f"  RPO               worst {report.rpo_max_seconds * 1000:.0f} ms")
    click.echo(f"  recovered         {report.recovered_bytes / 2**20:8.1f} MiB at checkpoint "
               f"{report.checkpoint_id} ({report.checkpoint_tag!r})")
    click.echo(f"  reverse sync      {report.delta_sync}")
    if not report.ok:
        click.echo(f"FAILED: {report.mismatched_chunks} MiB of the failed-over volumes and "
                   f"{report.failback_mismatched_chunks} MiB of the failed-back disks differ "
                   "from the disks at the tagged checkpoint", err=True)
        sys.exit(1)
    click.echo("  verification      failed-over volumes and failed-back disks byte-for-byte "
               "identical to the disks at the checkpoint")
    if ui:
        from pathlib import Path

        from zcore.errors import ZcoreError
        from zcore.site.ui.demo import run_ui_demo

        click.echo("")
        with tempfile.TemporaryDirectory(prefix="zcore-demo-ui-") as tmp:
            try:
                run_ui_demo(Path(keep or tmp) / "ui", click.echo)
            except ZcoreError as exc:
                raise click.ClickException(str(exc)) from None
