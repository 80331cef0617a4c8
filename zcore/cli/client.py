"""The command line's client of a site's REST API: which site, which token, which
certificate, and what an answer that is not a success means to the person typing.

Sits under the API command groups (`vm_cmd`, `vpg_cmd`, `checkpoint_cmd`, `activity_cmd`,
`site_client_cmd`) and over httpx and the API's wire contract (zcore.site.api: everything
under /api/v1, bearer tokens, errors as `{"error": {"code", "message", "details"}}`, long
operations answering 202 with a task to poll).

Finding the site, first match wins for each of URL and token:
  URL:   --site URL / ZCORE_SITE, else the record in --site-dir DIR / ZCORE_SITE_DIR
  token: --token / ZCORE_TOKEN, else the record in the site directory
The site directory's record is DIR/client.json (written by `zcore site init`, its URL
updated by `zcore site serve`); `read_site_dir` is the one place that reads it.

TLS: an https site is verified against --ca-file / ZCORE_CA_FILE, else (local use) against
the site directory's own identity certificate.  A site's certificate names the TLS server
name `zcore-site` (zcore.security.SERVER_NAME), never a host, so the client checks that
name (SNI and hostname check) instead of the URL's host: trust comes from the certificate
file, as with pinned peers.

Exit codes: 1 the site refused the operation (or a task failed), 2 usage (click's, and no
site or token given), 3 the site could not be reached (the message names the URL).
"""

from __future__ import annotations

import functools
import json
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import click
import httpx

from zcore.errors import ZcoreError
from zcore.fsutil import read_state

PREFIX = "/api/v1"
CLIENT_FORMAT = "zcore-site-client"
CLIENT_VERSION = 1
TLS_SERVER_NAME = "zcore-site"  # zcore.security.SERVER_NAME (kept import-free: CLI start-up)
TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.2
FINISHED = frozenset({"succeeded", "failed", "cancelled"})

F = TypeVar("F", bound=Callable[..., Any])


class RefusedError(click.ClickException):
    """The site answered, and refused (exit 1)."""

    exit_code = 1


class UnreachableError(click.ClickException):
    """The site could not be reached (exit 3)."""

    exit_code = 3


class NoSiteError(click.UsageError):
    """Neither a site nor a token was given (exit 2)."""


# what to do next, by the API's stable error code
HINTS = {
    "vm_not_found": "`zcore vm list` shows the VMs of this site",
    "volume_not_found": "`zcore vm show VM` shows a VM's volumes",
    "vpg_not_found": "`zcore vpg list` shows the VPGs of this site",
    "peer_not_found": "`zcore site status` shows the paired sites",
    "task_not_found": "`zcore tasks list` shows recent tasks",
    "alert_not_found": "`zcore alerts list` shows the alerts",
    "checkpoint_not_found": "`zcore checkpoint list VPG` shows the checkpoints",
    "already_exists": "choose another name, or look at the existing one with `show`",
    "in_use": "remove what uses it first",
    "invalid_request": "check the command's arguments (--help)",
    "invalid_config": "check the command's arguments (--help)",
    "site_not_initialized": "run `zcore site init DIR` for this site first",
    "body_too_large": "send less at once",
    "internal_error": "the site service's log has the details",
}


@dataclass(frozen=True)
class SiteRecord:
    """What a site directory records for the CLI on its host."""

    url: str
    token: str
    cert: Path | None  # the site's identity certificate, when the directory holds it


def read_site_dir(directory: str | os.PathLike[str]) -> SiteRecord:
    """The URL and admin token a site directory records for local use (DIR/client.json,
    a checked state file) and the certificate its API is verified with (the record's
    `cafile`, else the identity certificate DIR/site/site.crt)."""
    root = Path(directory)
    path = root / "client.json"
    try:
        meta = read_state(path, CLIENT_FORMAT, (CLIENT_VERSION,))
    except FileNotFoundError:
        raise NoSiteError(f"{root} holds no client record ({path}): is it a site directory "
                          "(`zcore site init DIR`)?") from None
    except (ZcoreError, OSError, ValueError) as exc:
        raise RefusedError(f"cannot read {path}: {exc}") from None
    cafile = meta.get("cafile")  # recorded by `serve` when the API is served over https
    cert = Path(cafile) if cafile else root / "site" / "site.crt"
    return SiteRecord(str(meta["url"]), str(meta["token"]), cert if cert.exists() else None)


@dataclass(frozen=True)
class Target:
    """One site as the client reaches it."""

    url: str
    token: str
    ca_file: Path | None = None
    origin: str = "--site / ZCORE_SITE"  # where the URL came from, for error messages

    @classmethod
    def resolve(
        cls, site: str | None, token: str | None, site_dir: str | None, ca_file: str | None
    ) -> Target:
        record = read_site_dir(site_dir) if site_dir else None
        url = site or (record.url if record else None)
        if not url:
            raise NoSiteError("no site given: pass --site URL (or ZCORE_SITE), or --site-dir "
                              "DIR (or ZCORE_SITE_DIR) of a local site")
        secret = token or (record.token if record else None)
        if not secret:
            raise NoSiteError(f"no API token for {url}: pass --token TOKEN (or ZCORE_TOKEN); "
                              "`zcore site init` printed the admin token")
        if "://" not in url:
            url = "http://" + url
        ca = Path(ca_file) if ca_file else (record.cert if record else None)
        origin = "--site / ZCORE_SITE"
        if not site and site_dir:
            origin = f"the URL {Path(site_dir) / 'client.json'} records (`zcore site serve` " \
                     "updates it)"
        return cls(url.rstrip("/"), secret, ca, origin)


def _tls(target: Target) -> tuple[ssl.SSLContext | bool, dict[str, Any]]:
    """The verify argument and request extensions for `target`."""
    if not target.url.startswith("https://"):
        return True, {}
    if target.ca_file is None:
        return True, {}  # the system's CAs, the URL's host
    try:
        context = ssl.create_default_context(cafile=str(target.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise NoSiteError(f"cannot use {target.ca_file} as the site's certificate: {exc}"
                          ) from None
    return context, {"sni_hostname": TLS_SERVER_NAME}


def error_message(url: str, response: httpx.Response) -> str:
    """One line for a refused request: the API's message, its code, what to do next."""
    try:
        err = response.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code = f"http_{response.status_code}"
        message = f"HTTP {response.status_code} from {url} (not a zcore site API answer?)"
    if response.status_code == 401:
        return (f"the site at {url} refused the API token ({message}): pass a valid one "
                "with --token / ZCORE_TOKEN, or --site-dir DIR on the site's host")
    hint = HINTS.get(code)
    return f"{message} [{code}]" + (f"; {hint}" if hint else "")


class Client:
    """An httpx client for one site; every failure becomes a click exception."""

    def __init__(self, target: Target, timeout: float = TIMEOUT_S) -> None:
        self.target = target
        verify, self._extensions = _tls(target)
        self._http = httpx.Client(
            base_url=target.url + PREFIX,
            headers={"Authorization": f"Bearer {target.token}"},
            verify=verify,
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The decoded JSON body of a successful answer (None for 204)."""
        if "params" in kwargs:
            kwargs["params"] = {k: v for k, v in kwargs["params"].items() if v is not None}
        try:
            response = self._http.request(method, path, extensions=self._extensions, **kwargs)
        except httpx.TimeoutException:
            raise UnreachableError(f"the site at {self.target.url} did not answer within "
                                   f"{self._http.timeout.read}s: is it overloaded?") from None
        except httpx.TransportError as exc:
            raise UnreachableError(self._unreachable(exc)) from None
        if response.is_error:
            raise RefusedError(error_message(self.target.url, response))
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise RefusedError(f"{self.target.url} answered {method} {path} with something "
                               "that is not JSON: is it a zcore site?") from None

    def _unreachable(self, exc: Exception) -> str:
        reason = str(exc) or type(exc).__name__
        if "CERTIFICATE_VERIFY_FAILED" in reason or isinstance(exc.__cause__, ssl.SSLError):
            return (f"cannot reach the site at {self.target.url}: its TLS certificate was not "
                    f"accepted ({reason}); pass the site's certificate with --ca-file")
        return (f"cannot reach the site at {self.target.url} ({reason}): is `zcore site "
                f"serve` running there? Check {self.target.origin}")

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def wait_task(self, task: dict[str, Any], on_progress: Callable[[dict[str, Any]], None]
                  ) -> dict[str, Any]:
        """Poll the task until it ends; `on_progress` sees each state."""
        while True:
            on_progress(task)
            if task["state"] in FINISHED:
                return task
            time.sleep(POLL_INTERVAL_S)
            task = cast(dict[str, Any], self.get(f"/tasks/{task['id']}"))


def site_options(fn: F) -> F:
    """Add the site, token, TLS and --json options; the command receives `client`
    (a Client, closed after the command) and `as_json` instead of them."""

    @click.option("--site", envvar="ZCORE_SITE", metavar="URL",
                  help="the site's API, e.g. http://127.0.0.1:7480 [env ZCORE_SITE]")
    @click.option("--token", envvar="ZCORE_TOKEN", help="API token [env ZCORE_TOKEN]")
    @click.option("--site-dir", envvar="ZCORE_SITE_DIR", type=click.Path(file_okay=False),
                  help="a local site directory: its recorded URL and admin token "
                       "[env ZCORE_SITE_DIR]")
    @click.option("--ca-file", envvar="ZCORE_CA_FILE", type=click.Path(dir_okay=False),
                  help="verify an https site against this certificate file "
                       "[env ZCORE_CA_FILE; default: the site directory's certificate]")
    @click.option("--json", "as_json", is_flag=True,
                  help="print the API's JSON answer unchanged (for scripts)")
    @functools.wraps(fn)
    def wrapper(site: str | None, token: str | None, site_dir: str | None,
                ca_file: str | None, **kwargs: Any) -> Any:
        client = Client(Target.resolve(site, token, site_dir, ca_file))
        try:
            return fn(client=client, **kwargs)
        finally:
            client.close()

    return cast(F, wrapper)


def print_json(body: Any) -> None:
    click.echo(json.dumps(body, indent=2))
