"""`zcore vm add|list|show`: the VMs of a site and their volumes, through the REST API
(/api/v1/vms).  Sits over zcore.cli.client and zcore.cli.output."""

from __future__ import annotations

import os
import stat
from typing import Any
from urllib.parse import quote

import click

from zcore.cli import output as o
from zcore.cli.client import Client, print_json, site_options
from zcore.cli.params import parse_size

SECTOR = 512


def _size_of(path: str) -> int:
    """The size of a file or block device (whose st_size is 0)."""
    info = os.stat(path)
    if not stat.S_ISBLK(info.st_mode):
        return info.st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def parse_volume(text: str) -> dict[str, Any]:
    """"NAME=PATH[:SIZE]" -> a volume spec; without SIZE, the size of the file or block
    device at PATH (on this host).  The path is made absolute."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise click.BadParameter(f"--volume takes NAME=PATH[:SIZE], not {text!r}")
    path, colon, tail = rest.rpartition(":")
    if colon and tail and path:
        try:
            nbytes = parse_size(tail)
        except click.BadParameter:
            path, nbytes = rest, -1
    else:
        path, nbytes = rest, -1
    if nbytes < 0:
        try:
            nbytes = _size_of(path)
        except OSError as exc:
            raise click.BadParameter(f"--volume {text!r}: give its size (NAME=PATH:SIZE, e.g. "
                                     f":4G) or an existing file ({exc.strerror})") from None
    if nbytes <= 0 or nbytes % SECTOR:
        raise click.BadParameter(f"--volume {text!r}: the size ({nbytes} bytes) must be a "
                                 f"positive multiple of {SECTOR}")
    return {"name": name, "path": os.path.abspath(path), "size": nbytes}


def show_vm(vm: dict[str, Any]) -> None:
    o.table(
        f"VM {vm['name']} (added {o.when(vm['created_at'])})",
        ["volume", "size", "role", "path"],
        ([v["name"], o.size(v["size"]), v["role"], v["path"]] for v in vm["volumes"]),
    )


@click.group()
def vm() -> None:
    """The VMs of a site and their volumes (disks)."""


def parse_node(text: str, qmp: str, nbd: str | None) -> dict[str, Any]:
    """"[VOL=]NODE" of the QEMU at `qmp` -> a volume spec (the site probes its size)."""
    name, sep, node = text.rpartition("=")
    if not node or (sep and not name):
        raise click.BadParameter(f"--node takes [VOLUME=]NODE, not {text!r}")
    spec = {"name": name or node, "qmp": os.path.abspath(qmp), "node": node}
    if nbd is not None:
        spec["nbd"] = os.path.abspath(nbd)
    return spec


@vm.command("add")
@click.argument("name")
@click.option("--volume", "volumes", multiple=True, metavar="NAME=PATH[:SIZE]",
              help="a disk of the VM: its image or device PATH and SIZE (like 4G; default: "
                   "the size of the file at PATH); repeat for each disk")
@click.option("--qmp", metavar="SOCKET",
              help="the QMP socket of the VM's running QEMU, whose disks --node names")
@click.option("--node", "nodes", multiple=True, metavar="[VOLUME=]NODE",
              help="a disk of the running QEMU at --qmp, by block node name, protected in "
                   "place (the volume is named NODE unless VOLUME= is given); repeatable")
@click.option("--nbd", metavar="SOCKET",
              help="with --qmp: the NBD server socket that QEMU already runs, if any "
                   "(otherwise zcore starts one of its own)")
@site_options
def add_cmd(client: Client, as_json: bool, name: str, volumes: tuple[str, ...],
            qmp: str | None, nodes: tuple[str, ...], nbd: str | None) -> None:
    """Add the VM NAME with its volumes, e.g.
    `zcore vm add web --volume disk0=/images/web.img --volume data=/dev/vg/web-data:100G`,
    or a running QEMU VM whose disks stay where they are:
    `zcore vm add db --qmp /run/qemu/db.qmp --node disk0=drive-virtio0`."""
    if (qmp is None) != (not nodes):
        raise click.UsageError("--qmp and --node go together: the QMP socket of a running "
                               "QEMU and the block nodes of its disks")
    if nbd is not None and qmp is None:
        raise click.UsageError("--nbd goes with --qmp")
    if not volumes and not nodes:
        raise click.UsageError("give the VM's disks: --volume NAME=PATH, or --qmp SOCKET "
                               "--node NODE")
    specs = [parse_volume(v) for v in volumes]
    specs += [parse_node(n, qmp, nbd) for n in nodes if qmp is not None]
    created = client.post("/vms", {"name": name, "volumes": specs})
    if as_json:
        print_json(created)
        return
    show_vm(created)


@vm.command("list")
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True,
              help="at most this many VMs")
@click.option("--after", metavar="NAME", help="start after this VM (the cursor a page ends with)")
@site_options
def list_cmd(client: Client, as_json: bool, limit: int, after: str | None) -> None:
    """The VMs of the site, by name."""
    page = client.get("/vms", limit=limit, after=after)
    if as_json:
        print_json(page)
        return
    o.table(
        "VMs",
        ["name", "volumes", "size", "added"],
        (
            [v["name"], len(v["volumes"]), o.size(sum(x["size"] for x in v["volumes"])),
             o.when(v["created_at"])]
            for v in page["items"]
        ),
    )
    o.more(page["next_cursor"], "VMs")


@vm.command("show")
@click.argument("name")
@site_options
def show_cmd(client: Client, as_json: bool, name: str) -> None:
    """One VM and its volumes."""
    found = client.get(f"/vms/{quote(name, safe='')}")
    if as_json:
        print_json(found)
        return
    show_vm(found)
