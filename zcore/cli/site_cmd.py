"""`zcore site ...`: create a site directory (`init`) and run its service (`serve`).

These two run locally on the site directory; every other site command is a client of the
REST API (`status` and `pair` join this group as such).  The service itself is
zcore.site.service; the directory layout zcore.site.config.
"""

from __future__ import annotations

import json
import os
import sys

import click

from zcore.errors import ZcoreError

PORT = click.IntRange(0, 65535)


@click.group()
def site() -> None:
    """Create and run a site: its service holds replication, journals, NBD and the API."""


@site.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", required=True, help="the site's name, shown to its peers")
@click.option("--db", "db_url", default=None,
              help="database URL (default: sqlite under DIRECTORY; or postgresql://...)")
@click.option("--api-port", type=PORT, default=None,
              help="the API port the local client record names until `serve` runs")
@click.option("--json", "as_json", is_flag=True,
              help="print `{name, site_id, directory, db_url, token}` as JSON (for scripts)")
def init_cmd(directory: str, name: str, db_url: str | None, api_port: int | None,
             as_json: bool) -> None:
    """Create a site in DIRECTORY: identity, database and an admin API token (printed
    once; also kept, readable by you only, in DIRECTORY/client.json)."""
    from sqlalchemy.exc import SQLAlchemyError

    from zcore.site.config import DEFAULT_API_PORT, init_site

    try:
        result = init_site(directory, name, db_url,
                           api_port=DEFAULT_API_PORT if api_port is None else api_port)
    except SQLAlchemyError as exc:
        raise click.ClickException(f"site init failed: the database at {db_url} refused: "
                                   f"{exc.__class__.__name__}: {exc.args[0] if exc.args else exc}"
                                   ) from None
    except (ZcoreError, OSError) as exc:
        raise click.ClickException(f"site init failed: {exc}") from None
    if as_json:
        click.echo(json.dumps({"name": result.name, "site_id": result.site_id,
                               "directory": os.path.abspath(directory),
                               "db_url": result.db_url, "token": result.token}, indent=2))
        return
    click.echo(f"site {result.name} ({result.site_id}) created in {directory}")
    click.echo(f"database: {result.db_url}")
    click.echo(f"admin API token (shown once): {result.token}")


@site.command("serve")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--api-host", default="127.0.0.1", show_default=True,
              help="the API's address; beyond loopback it is served over HTTPS with the "
                   "site's certificate")
@click.option("--api-port", type=PORT, default=None, help="API port (0: any free one)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="the replication and NBD listeners' address")
@click.option("--replication-port", type=PORT, default=None,
              help="replication port (0: any free one)")
@click.option("--nbd-port", type=PORT, default=None, help="NBD port (0: any free one)")
@click.option("--db", "db_url", default=None, help="database URL (default: the one of init)")
@click.option("--log-json", is_flag=True, help="structured logs: one JSON object per line")
@click.option("--script-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="default timeout of the VPGs' pre/post scripts and "
              "adapter commands (a VPG's own settings override it) [300]")
def serve_cmd(directory: str, api_host: str, api_port: int | None, host: str,
              replication_port: int | None, nbd_port: int | None, db_url: str | None,
              log_json: bool, script_timeout: float | None) -> None:
    """Run the site service of DIRECTORY until SIGTERM or SIGINT."""
    from sqlalchemy.exc import SQLAlchemyError

    from zcore.site.config import DEFAULT_API_PORT, DEFAULT_NBD_PORT, DEFAULT_REPLICATION_PORT
    from zcore.site.service import ServeOptions, serve

    options = ServeOptions(
        api_host=api_host,
        api_port=DEFAULT_API_PORT if api_port is None else api_port,
        host=host,
        replication_port=DEFAULT_REPLICATION_PORT if replication_port is None
        else replication_port,
        nbd_port=DEFAULT_NBD_PORT if nbd_port is None else nbd_port,
        db_url=db_url, log_json=log_json,
        **({} if script_timeout is None else {"script_timeout": script_timeout}))
    try:
        serve(directory, options)
    except SQLAlchemyError as exc:
        click.echo(f"Error: site serve failed: the database refused: "
                   f"{exc.__class__.__name__}: {exc.args[0] if exc.args else exc}", err=True)
        sys.exit(1)
    except (ZcoreError, OSError) as exc:
        click.echo(f"Error: site serve failed: {exc}", err=True)
        sys.exit(1)
