"""`zcore checkpoint list|tag`: a VPG's usable checkpoints (held durably by every journal of
the VPG) through the REST API (/api/v1/vpgs/NAME/checkpoints): filtered, paged, or counted
per time bucket.  Sits over zcore.cli.client and zcore.cli.output."""

from __future__ import annotations

from urllib.parse import quote

import click

from zcore.cli import output as o
from zcore.cli.client import Client, print_json, site_options


def _path(vpg: str) -> str:
    return f"/vpgs/{quote(vpg, safe='')}/checkpoints"


@click.group()
def checkpoint() -> None:
    """The checkpoints of a VPG: the points in time it can be recovered to."""


@checkpoint.command("list")
@click.argument("vpg")
@click.option("--since", type=o.parse_time, metavar="TIME",
              help="from this time: a duration ago (1h), an ISO time or epoch seconds")
@click.option("--until", type=o.parse_time, metavar="TIME", help="before this time (same forms)")
@click.option("--tag", help="only checkpoints with exactly this tag")
@click.option("--kind", type=click.Choice(["auto", "tagged"]), help="only this kind")
@click.option("--consistent/--inconsistent", default=None,
              help="only consistent (or only inconsistent) checkpoints")
@click.option("--oldest-first", is_flag=True, help="oldest first (default: newest first)")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True,
              help="at most this many checkpoints")
@click.option("--after", metavar="CURSOR", help="the next page: the cursor a page ends with")
@click.option("--buckets", "bucket", type=o.parse_duration, metavar="WIDTH",
              help="instead of checkpoints, count them per time bucket of WIDTH (like 1h)")
@site_options
def list_cmd(client: Client, as_json: bool, vpg: str, since: float | None,
             until: float | None, tag: str | None, kind: str | None, consistent: bool | None,
             oldest_first: bool, limit: int, after: str | None, bucket: float | None) -> None:
    """The checkpoints of VPG, newest first, e.g. `zcore checkpoint list web --since 1h
    --kind tagged`, or per hour over a month: `zcore checkpoint list web --since 30d
    --buckets 1h`."""
    filters = {"start": since, "end": until, "tag": tag, "kind": kind,
               "consistent": None if consistent is None else str(consistent).lower()}
    if bucket is not None:
        found = client.get(_path(vpg) + "/buckets", bucket_seconds=bucket, **filters)
        if as_json:
            print_json(found)
            return
        o.table(f"checkpoints of {vpg} per {o.seconds(bucket)}",
                ["from", "checkpoints", "tagged", "first id", "last id"],
                ([o.when(b["start"]), b["count"], b["tagged"], b["first_id"], b["last_id"]]
                 for b in found["buckets"]))
        return
    page = client.get(_path(vpg), order="oldest" if oldest_first else "newest", limit=limit,
                      cursor=after, **filters)
    if as_json:
        print_json(page)
        return
    o.table(f"checkpoints of {vpg}", ["id", "time", "kind", "tag", "consistent"],
            ([c["id"], o.when_ns(c["time_ns"]), c["kind"], c["tag"],
              "yes" if c["consistent"] else "no"] for c in page["items"]))
    o.more(page["next_cursor"], "checkpoints")


@checkpoint.command("tag")
@click.argument("vpg")
@click.argument("tag")
@site_options
def tag_cmd(client: Client, as_json: bool, vpg: str, tag: str) -> None:
    """Tag a checkpoint of VPG now (across all its VMs), e.g. before an upgrade:
    `zcore checkpoint tag web "before upgrade 4.2"`."""
    made = client.post(_path(vpg), {"tag": tag})
    if as_json:
        print_json(made)
        return
    click.echo(f"checkpoint {made['id']} of {vpg} tagged {made['tag']!r} at "
               f"{o.when_ns(made['time_ns'])}")
