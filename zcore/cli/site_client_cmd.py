"""`zcore site status|pair|pairing-token`: the site commands that are clients of the REST
API (`site init` and `site serve` run locally on a site directory: zcore.cli.site_cmd).

`add_client_commands(group)` adds these to the `site` group; until the group of site_cmd
is registered, `site` here is a group of these commands alone.  Sits over
zcore.cli.client and zcore.cli.output.
"""

from __future__ import annotations

from typing import Any

import click

from zcore.cli import output as o
from zcore.cli.client import Client, Target, print_json, site_options


@click.command("status")
@site_options
def status_cmd(client: Client, as_json: bool) -> None:
    """The site: its identity, version, paired sites, VPGs and active alerts.  --json
    prints `{"health": GET /health, "sites": GET /sites, "vpgs": GET /vpgs,
    "alerts": GET /alerts?active=true}`."""
    body = {
        "health": client.get("/health"),
        "sites": client.get("/sites"),
        "vpgs": client.get("/vpgs"),
        "alerts": client.get("/alerts", active="true"),
    }
    if as_json:
        print_json(body)
        return
    site = body["sites"]["site"]
    o.fields(f"site {site['name']}", [
        ("id", site["id"]), ("API", client.target.url),
        ("version", body["health"]["version"]), ("created", o.when(site["created_at"])),
        ("VPGs", len(body["vpgs"])), ("active alerts", len(body["alerts"])),
    ])
    peers = body["sites"]["peers"]
    if peers:
        o.table("paired sites", ["name", "id", "address", "fingerprint", "paired"],
                ([p["name"], p["site_id"], p["address"], p["fingerprint"][:16],
                  o.when(p["paired_at"])] for p in peers))
    else:
        click.echo("no paired site yet: `zcore site pair --help` says how")


@click.command("pairing-token")
@site_options
def pairing_token_cmd(client: Client, as_json: bool) -> None:
    """Issue a one-time pairing token at this site (the recovery site), for a protected
    site's `zcore site pair --pairing-token`.  `zcore site pair --peer-site` does this
    step itself when you can reach both sites."""
    issued = client.post("/pairing/tokens")
    if as_json:
        print_json(issued)
        return
    click.echo(f"pairing token (valid until {o.when(issued['expires_at'])}): {issued['token']}")


def _peer_client(site: str | None, token: str | None, site_dir: str | None,
                 ca_file: str | None) -> Client:
    if not (site or site_dir):
        raise click.UsageError("give --peer-site URL (or --peer-site-dir DIR) to issue a "
                               "pairing token at the peer, or --pairing-token TOKEN")
    if not (token or site_dir):
        raise click.UsageError(f"no API token for the peer {site}: pass --peer-token TOKEN "
                               "(its `zcore site init` printed one)")
    return Client(Target.resolve(site, token, site_dir, ca_file))


@click.command("pair")
@click.option("--peer-address", required=True, metavar="HOST:PORT",
              help="the peer's replication listener (the `replication:` line its "
                   "`zcore site serve` prints)")
@click.option("--peer-site", metavar="URL", help="the peer's API, to issue the pairing token there")
@click.option("--peer-token", help="an API token of the peer")
@click.option("--peer-site-dir", type=click.Path(file_okay=False),
              help="the peer's site directory (its URL and token), when it is on this host")
@click.option("--peer-ca-file", type=click.Path(dir_okay=False),
              help="verify an https peer API against this certificate")
@click.option("--pairing-token", metavar="TOKEN",
              help="a token issued at the peer (`zcore site pairing-token`) instead of "
                   "--peer-site")
@site_options
def pair_cmd(client: Client, as_json: bool, peer_address: str, peer_site: str | None,
             peer_token: str | None, peer_site_dir: str | None, peer_ca_file: str | None,
             pairing_token: str | None) -> None:
    """Pair this site (--site, usually the protected one) with a peer (the recovery site):
    both pin each other's certificate, so either can protect VPGs to the other.

    \b
    In one step, when you reach both APIs:
      zcore site pair --site-dir A --peer-site-dir B --peer-address HOST:PORT
      zcore site pair --site URL_A --token T_A --peer-site URL_B --peer-token T_B \\
          --peer-address HOST:PORT
    or in two, e.g. across a firewall:
      zcore site pairing-token --site URL_B --token T_B        # prints TOKEN, at B
      zcore site pair --site URL_A --token T_A --peer-address HOST:PORT --pairing-token TOKEN
    --json prints `{"pairing_token": POST B /pairing/tokens (absent with --pairing-token),
    "peer": POST A /pairing}`."""
    body: dict[str, Any] = {}
    if pairing_token is None:
        peer = _peer_client(peer_site, peer_token, peer_site_dir, peer_ca_file)
        try:
            body["pairing_token"] = peer.post("/pairing/tokens")
        finally:
            peer.close()
        pairing_token = str(body["pairing_token"]["token"])
    body["peer"] = client.post("/pairing", {"address": peer_address, "token": pairing_token})
    if as_json:
        print_json(body)
        return
    p = body["peer"]
    click.echo(f"paired with site {p['name']} ({p['site_id']}) at {p['address']}, "
               f"certificate {p['fingerprint'][:16]}")


def add_client_commands(group: click.Group) -> None:
    """Add status, pair and pairing-token to the `site` group."""
    for command in (status_cmd, pair_cmd, pairing_token_cmd):
        group.add_command(command)


@click.group("site")
def site() -> None:
    """A site: its status and its pairing with other sites."""
