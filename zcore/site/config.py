"""A site directory's layout, its service record and its client record, and `init_site`
(what `zcore site init DIR` does).

Sits under the site service (zcore.site.service) and the command line (zcore.cli.site_cmd):
every path of a site directory is named here, nowhere else.

    DIR/service.json   checked state file: the site's name and database URL
    DIR/client.json    checked state file, mode 0600: the API URL and the admin token,
                       for the CLI on this host (written by init, URL updated by serve)
    DIR/site.db        the SQLite database (unless --db names another)
    DIR/site/          the site identity, pinned peers, pairing tokens (zcore.security)
    DIR/vpgs/          the recovery site's journals, one directory per VPG (RecoverySite)
    DIR/protected/     the protected VPGs' state directories (vpg.json and bitmaps)
    DIR/metrics.json   the metric history snapshot (zcore.site.metrics)

The journals and the VPG state directories are the source of truth for data; the database
holds definitions, roles and activity and is reconciled with them at every start.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from zcore.errors import ConfigError
from zcore.fsutil import fsync_dir, read_state, write_state
from zcore.security import SiteIdentity

SERVICE_FORMAT = "zcore-site-service"
CLIENT_FORMAT = "zcore-site-client"
STATE_VERSION = 1
DEFAULT_API_PORT = 7480
DEFAULT_REPLICATION_PORT = 7481
DEFAULT_NBD_PORT = 10809


@dataclass(frozen=True)
class SiteDir:
    """The paths of one site directory."""

    root: Path

    @property
    def service_file(self) -> Path:
        return self.root / "service.json"

    @property
    def client_file(self) -> Path:
        return self.root / "client.json"

    @property
    def default_db(self) -> Path:
        return self.root / "site.db"

    @property
    def identity_dir(self) -> Path:
        return self.root / "site"

    @property
    def journals_dir(self) -> Path:
        return self.root / "vpgs"

    @property
    def protected_dir(self) -> Path:
        return self.root / "protected"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.json"

    def vpg_state_dir(self, vpg: str) -> Path:
        return self.protected_dir / vpg

    def exists(self) -> bool:
        return self.service_file.exists()


@dataclass(frozen=True)
class ServiceRecord:
    """What `serve` needs to find the site's state: its name and database URL."""

    name: str
    db_url: str


@dataclass(frozen=True)
class ClientRecord:
    """How the CLI on this host reaches the site: the API URL, a token and, when the API
    is served over HTTPS, the site certificate to verify it with (self-signed, so a
    client pins it: `httpx.Client(verify=ssl.create_default_context(cafile=...))`; its
    name is `zcore-site`, so check_hostname must be off)."""

    url: str
    token: str
    cafile: str | None = None


def read_service(site: SiteDir) -> ServiceRecord:
    if not site.exists():
        raise ConfigError(f"{site.root} is not a site directory (no {site.service_file.name}); "
                          f"create one with `zcore site init {site.root} --name NAME`")
    meta = read_state(site.service_file, SERVICE_FORMAT, STATE_VERSION)
    return ServiceRecord(str(meta["name"]), str(meta["db_url"]))


def read_client(site: SiteDir) -> ClientRecord:
    meta = read_state(site.client_file, CLIENT_FORMAT, STATE_VERSION)
    cafile = meta.get("cafile")
    return ClientRecord(str(meta["url"]), str(meta["token"]),
                        None if cafile is None else str(cafile))


def write_client(site: SiteDir, record: ClientRecord) -> None:
    """Write the client record, readable by the owner only (it holds the admin token)."""
    path = site.client_file
    meta: dict[str, str] = {"url": record.url, "token": record.token}
    if record.cafile is not None:
        meta["cafile"] = record.cafile
    write_state(path, CLIENT_FORMAT, STATE_VERSION, meta)
    os.chmod(path, 0o600)


def set_client_url(site: SiteDir, url: str, cafile: str | None = None) -> None:
    """Record the URL the service actually listens on (keeps the token)."""
    try:
        old = read_client(site)
    except FileNotFoundError:
        return
    write_client(site, ClientRecord(url, old.token, cafile))


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


@dataclass(frozen=True)
class InitResult:
    site_id: str
    name: str
    db_url: str
    token: str
    url: str


def init_site(root: str | os.PathLike[str], name: str, db_url: str | None = None,
              api_port: int = DEFAULT_API_PORT) -> InitResult:
    """Create a site directory: identity, database (bootstrapped), service and client
    records.  Refuses a directory that holds anything; a failure removes what it made
    (the directory itself when it made it; the tables of an external database stay)."""
    from zcore.site.db import SiteDB

    site = SiteDir(Path(root).absolute())
    made_root = not site.root.exists()
    if not made_root:
        if not site.root.is_dir():
            raise ConfigError(f"{site.root} exists and is not a directory")
        if any(site.root.iterdir()):
            what = "a site directory" if site.exists() else "not empty"
            raise ConfigError(f"{site.root} is {what}: refusing to initialize a site there "
                              f"(choose a new or empty directory)")
    if not name or len(name) > 200:
        raise ConfigError("the site name must be 1 to 200 characters")
    url = db_url or sqlite_url(site.default_db)
    try:
        site.root.mkdir(parents=True, exist_ok=True)
        identity = SiteIdentity.load_or_create(site.identity_dir, name)
        db = SiteDB.open(url)
        try:
            token = db.bootstrap(identity.site_id, name).secret
        finally:
            db.close()
        api_url = f"http://127.0.0.1:{api_port}"
        write_client(site, ClientRecord(api_url, token))
        # service.json last: its presence says the site directory is complete
        write_state(site.service_file, SERVICE_FORMAT, STATE_VERSION,
                    {"name": name, "db_url": url})
        fsync_dir(site.root)
    except BaseException:
        _remove_partial(site, made_root)
        raise
    return InitResult(identity.site_id, name, url, token, api_url)


def _remove_partial(site: SiteDir, made_root: bool) -> None:
    if made_root:
        shutil.rmtree(site.root, ignore_errors=True)
        return
    for child in list(site.root.iterdir()):  # it was empty: everything here is ours
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
