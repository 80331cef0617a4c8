"""The command line as a client of the REST API: every API command against a real uvicorn
server (in a thread, on a free loopback port) over the database-backed test double, with
and without --json; the exit codes and messages of a refused operation, an unreachable
site, a refused token and a missing site; the site directory's record and TLS with the
site's own certificate."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
import uvicorn
from click.testing import CliRunner, Result

from zcore.cli import main
from zcore.fsutil import write_state
from zcore.security import SiteIdentity
from zcore.site.api import DbSiteBackend, SiteContext, create_app
from zcore.site.db import Severity, SiteDB

# commands that run locally (no REST API), so they have no --json
LOCAL_COMMANDS = {"demo", "nbd", "site init", "site serve"}


@dataclass
class Site:
    url: str
    token: str
    db: SiteDB
    backend: DbSiteBackend
    server: uvicorn.Server
    thread: threading.Thread
    root: Path

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        verify: Any = True
        if self.url.startswith("https"):
            verify = False  # the CLI's verification is under test, not this helper's
        with httpx.Client(base_url=self.url + "/api/v1", verify=verify,
                          headers={"Authorization": f"Bearer {self.token}"}) as c:
            response = c.request(method, path, **kwargs)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.db.close()


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def start_site(root: Path, name: str, tls: bool = False) -> Site:
    """A site API served by uvicorn in a thread, over DbSiteBackend on SQLite in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    db = SiteDB.open(f"sqlite:///{root / 'site.db'}")
    token = db.bootstrap(f"{name}-id", name).secret
    identity = SiteIdentity.load_or_create(root / "site", name) if tls else None
    sock = _free_socket()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{sock.getsockname()[1]}"
    ready = threading.Event()
    made: dict[str, Any] = {}

    async def serve() -> None:
        backend = DbSiteBackend(db)
        backend.step_delay_s = 0.01
        config = uvicorn.Config(
            create_app(SiteContext(db, backend)), log_level="warning", lifespan="off",
            ssl_certfile=str(identity.cert_path) if identity else None,
            ssl_keyfile=str(identity.key_path) if identity else None,
        )
        made["backend"], made["server"] = backend, uvicorn.Server(config)
        ready.set()
        await made["server"].serve(sockets=[sock])

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    site = Site(url, token, db, made["backend"], made["server"], thread, root)
    for _ in range(200):
        if site.server.started:
            break
        threading.Event().wait(0.05)
    write_state(root / "client.json", "zcore-site-client", 1, {"url": url, "token": token})
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = start_site(tmp_path_factory.mktemp("site-a"), "alpha")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = start_site(tmp_path_factory.mktemp("site-b"), "bravo")
    yield s
    s.stop()


NO_ENV = {"ZCORE_SITE": None, "ZCORE_TOKEN": None, "ZCORE_SITE_DIR": None,
          "ZCORE_CA_FILE": None, "COLUMNS": "200"}


def cli(site: Site | None, *args: str, env: dict[str, str | None] | None = None,
        input: str | None = None) -> Result:
    full = dict(NO_ENV)
    if site is not None:
        full.update(ZCORE_SITE=site.url, ZCORE_TOKEN=site.token)
    full.update(env or {})
    return CliRunner().invoke(main, list(args), env=full, input=input, catch_exceptions=False)


def ok(site: Site | None, *args: str, **kwargs: Any) -> str:
    result = cli(site, *args, **kwargs)
    assert result.exit_code == 0, (args, result.output, result.stderr)
    return result.stdout


def as_json(site: Site, *args: str) -> Any:
    return json.loads(ok(site, *args, "--json"))


def add_vm(site: Site, name: str, tmp_path: Path) -> None:
    image = tmp_path / f"{name}.img"
    image.write_bytes(b"\0" * 8192)
    ok(site, "vm", "add", name, "--volume", f"disk0={image}", "--volume",
       f"data={tmp_path / 'data.img'}:1M")


def create_vpg(site: Site, name: str, *vms: str) -> None:
    args = [a for vm in vms for a in ("--vm", vm)]
    ok(site, "vpg", "create", name, *args)


# -- the command tree ----------------------------------------------------------------------


def _commands(group: click.Group, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        yield path, command
        if isinstance(command, click.Group):
            yield from _commands(command, path + " ")


def test_every_api_command_has_json_and_help_text() -> None:
    leaves = []
    for path, command in _commands(main):
        assert (command.help or "").strip(), f"`zcore {path}` has no help text"
        if isinstance(command, click.Group) or path.split(" ")[0] in LOCAL_COMMANDS:
            continue
        if path in LOCAL_COMMANDS:
            continue
        leaves.append(path)
        names = {opt for p in command.params for opt in getattr(p, "opts", ())}
        assert "--json" in names, f"`zcore {path}` has no --json"
        for p in command.params:
            if isinstance(p, click.Option):
                assert p.help, f"`zcore {path}` {p.opts[0]} has no help text"
    expected = {
        "site status", "site pair", "site pairing-token", "vm add", "vm list", "vm show",
        "vpg create", "vpg list", "vpg show", "vpg pause", "vpg resume", "vpg sync",
        "vpg delete", "vpg update", "checkpoint list", "checkpoint tag", "events", "alerts list",
        "alerts ack", "tasks list", "tasks show",
    }
    assert expected <= set(leaves)


# -- VMs -----------------------------------------------------------------------------------


def test_vm_add_list_show_print_tables_and_the_apis_json(site: Site, tmp_path: Path) -> None:
    image = tmp_path / "web.img"
    image.write_bytes(b"\0" * 4096)
    out = ok(site, "vm", "add", "web", "--volume", f"disk0={image}",
             "--volume", f"data={tmp_path / 'web-data.img'}:2M")
    assert "VM web" in out and "disk0" in out and "2.0 MiB" in out and str(image) in out
    shown = as_json(site, "vm", "show", "web")
    assert shown == site.api("GET", "/vms/web")
    sizes = {v["name"]: v["size"] for v in shown["volumes"]}
    assert sizes == {"disk0": 4096, "data": 2 << 20}
    assert "disk0" in ok(site, "vm", "show", "web")
    added = as_json(site, "vm", "add", "db", "--volume", "disk0=/dev/vg/db:1G")
    assert added == site.api("GET", "/vms/db")
    listed = as_json(site, "vm", "list")
    assert listed == site.api("GET", "/vms")
    out = ok(site, "vm", "list")
    assert "web" in out and "db" in out


def test_vm_list_pages_with_limit_and_after(site: Site, tmp_path: Path) -> None:
    for name in ("page-a", "page-b", "page-c"):
        ok(site, "vm", "add", name, "--volume", "d=/dev/null:1M")
    first = as_json(site, "vm", "list", "--limit", "1", "--after", "page-")
    assert [v["name"] for v in first["items"]] == ["page-a"]
    assert first["next_cursor"] == "page-a"
    out = ok(site, "vm", "list", "--limit", "1", "--after", "page-a")
    assert "page-b" in out and "--after page-b" in out


def test_unknown_vm_exits_1_with_the_apis_message(site: Site) -> None:
    result = cli(site, "vm", "show", "no-such-vm")
    assert result.exit_code == 1
    with httpx.Client() as c:
        body = c.get(f"{site.url}/api/v1/vms/no-such-vm",
                     headers={"Authorization": f"Bearer {site.token}"}).json()
    assert body["error"]["message"] in result.stderr
    assert "vm_not_found" in result.stderr and "zcore vm list" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_vm_add_without_size_of_a_missing_file_is_a_usage_error(site: Site) -> None:
    result = cli(site, "vm", "add", "x", "--volume", "d=/no/such/file")
    assert result.exit_code == 2
    assert "give its size" in result.stderr


def test_vm_add_refused_by_the_api_exits_1(site: Site) -> None:
    result = cli(site, "vm", "add", "bad name!", "--volume", "d=/dev/null:1M")
    assert result.exit_code == 1
    assert "invalid_request" in result.stderr and "--help" in result.stderr


# -- finding the site ----------------------------------------------------------------------


def test_unreachable_site_exits_3_naming_the_url() -> None:
    with _free_socket() as sock:  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        result = cli(None, "vm", "list", "--site", url, "--token", "t")
    assert result.exit_code == 3
    assert url in result.stderr and "zcore site serve" in result.stderr


def test_unreachable_site_of_a_site_dir_names_its_record(tmp_path: Path) -> None:
    with _free_socket() as sock:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        write_state(tmp_path / "client.json", "zcore-site-client", 1, {"url": url, "token": "t"})
        result = cli(None, "vpg", "list", "--site-dir", str(tmp_path))
    assert result.exit_code == 3
    assert url in result.stderr and str(tmp_path / "client.json") in result.stderr


def test_wrong_token_says_the_token_was_refused(site: Site) -> None:
    result = cli(site, "vpg", "list", env={"ZCORE_TOKEN": "zt_wrong"})
    assert result.exit_code == 1
    assert "refused the API token" in result.stderr and site.url in result.stderr
    assert "--token" in result.stderr


def test_no_site_given_is_a_usage_error() -> None:
    result = cli(None, "vm", "list")
    assert result.exit_code == 2
    assert "--site URL" in result.stderr and "--site-dir" in result.stderr
    result = cli(None, "vm", "list", "--site", "http://127.0.0.1:1")
    assert result.exit_code == 2 and "--token" in result.stderr


def test_site_dir_record_gives_url_and_token(site: Site) -> None:
    listed = json.loads(ok(None, "vm", "list", "--json", "--site-dir", str(site.root)))
    assert listed == site.api("GET", "/vms")
    env = {"ZCORE_SITE_DIR": str(site.root)}
    assert json.loads(ok(None, "vpg", "list", "--json", env=env)) == site.api("GET", "/vpgs")


def test_site_dir_without_a_record_is_a_usage_error(tmp_path: Path) -> None:
    result = cli(None, "vm", "list", "--site-dir", str(tmp_path))
    assert result.exit_code == 2 and "client.json" in result.stderr


def test_https_site_verified_against_the_site_dirs_certificate(tmp_path: Path) -> None:
    tls = start_site(tmp_path / "tls", "tango", tls=True)
    try:
        listed = json.loads(ok(None, "vm", "list", "--json", "--site-dir", str(tls.root)))
        assert listed == tls.api("GET", "/vms")
        ca = tls.root / "site" / "site.crt"
        out = ok(None, "vpg", "list", "--site", tls.url, "--token", tls.token,
                 "--ca-file", str(ca))
        assert "VPGs" in out
        elsewhere = tmp_path / "elsewhere"  # a record naming its certificate (`cafile`)
        elsewhere.mkdir()
        write_state(elsewhere / "client.json", "zcore-site-client", 1,
                    {"url": tls.url, "token": tls.token, "cafile": str(ca)})
        assert "VMs" in ok(None, "vm", "list", "--site-dir", str(elsewhere))
        result = cli(None, "vm", "list", "--site", tls.url, "--token", tls.token)
        assert result.exit_code == 3
        assert tls.url in result.stderr and "--ca-file" in result.stderr
        other = SiteIdentity.load_or_create(tmp_path / "other", "other")
        result = cli(None, "vm", "list", "--site", tls.url, "--token", tls.token,
                     "--ca-file", str(other.cert_path))
        assert result.exit_code == 3 and "certificate" in result.stderr
    finally:
        tls.stop()


# -- VPGs ----------------------------------------------------------------------------------


def test_vpg_create_waits_and_shows_the_vpg(site: Site, tmp_path: Path) -> None:
    add_vm(site, "app1", tmp_path)
    out = ok(site, "vpg", "create", "vpg-app", "--vm", "app1", "--history", "2h",
             "--rpo-alert", "90s", "--journal-limit", "64M")
    assert "VPG vpg-app" in out and "protecting" in out
    vpg = site.api("GET", "/vpgs/vpg-app")
    assert vpg["settings"]["history_seconds"] == 7200
    assert vpg["settings"]["rpo_alert_seconds"] == 90
    assert vpg["settings"]["journal_hard_limit_bytes"] == 64 << 20
    shown = as_json(site, "vpg", "show", "vpg-app")
    assert shown == {"vpg": vpg, "status": site.api("GET", "/vpgs/vpg-app/status")}
    assert "RPO" in ok(site, "vpg", "show", "vpg-app")
    assert as_json(site, "vpg", "list") == site.api("GET", "/vpgs")
    assert "vpg-app" in ok(site, "vpg", "list")


def test_vpg_show_says_how_the_link_compresses_and_where_it_is_held(capsys) -> None:
    from zcore.cli.vpg_cmd import show_vpg

    vpg = {"name": "v", "role": "protected", "state": "protecting", "vms": ["a"],
           "peer": None, "created_at": 1.7e9, "updated_at": 1.7e9, "settings": {}}
    status = {"compression": "zstd-3", "compression_bytes_saved": 3 << 20,
              "compression_held_seconds": 25.0, "compression_held_at": "zstd-3"}
    show_vpg(vpg, {}, status)
    held = " ".join(re.sub("[│┌┐└┘├┤┬┴┼─]", " ", capsys.readouterr().out).split())
    assert "zstd-3 (saved 3.0 MiB; held at zstd-3 for 25.0s: a step up did not pay)" in held
    show_vpg(vpg, {}, status | {"compression_held_seconds": 0.0})
    assert "held at" not in capsys.readouterr().out


def test_vpg_update_changes_only_the_settings_given(site: Site, tmp_path: Path) -> None:
    add_vm(site, "app7", tmp_path)
    ok(site, "vpg", "create", "vpg-set", "--vm", "app7", "--history", "1h")
    before = site.api("GET", "/vpgs/vpg-set")["settings"]
    changed = as_json(site, "vpg", "update", "vpg-set", "--history", "7d", "--no-compression")
    assert changed == site.api("GET", "/vpgs/vpg-set")
    assert changed["settings"] == {**before, "history_seconds": 7 * 86_400,
                                   "compression": False}
    assert "setting rpo_alert_seconds" in ok(site, "vpg", "update", "vpg-set",
                                             "--rpo-alert", "2m")
    assert site.api("GET", "/vpgs/vpg-set")["settings"]["rpo_alert_seconds"] == 120
    result = cli(site, "vpg", "update", "vpg-set")
    assert result.exit_code == 2 and "at least one setting" in result.stderr
    result = cli(site, "vpg", "update", "vpg-set", "--history", "31d")
    assert result.exit_code == 1 and "history_seconds" in result.stderr


def test_vpg_create_json_prints_the_ended_task(site: Site, tmp_path: Path) -> None:
    add_vm(site, "app2", tmp_path)
    task = as_json(site, "vpg", "create", "vpg-json", "--vm", "app2")
    assert task == site.api("GET", f"/tasks/{task['id']}")
    assert task["state"] == "succeeded" and task["kind"] == "vpg_create"


def test_vpg_create_shows_a_progress_bar_on_a_terminal(site: Site, tmp_path: Path) -> None:
    add_vm(site, "app5", tmp_path)
    site.backend.step_delay_s = 0.25
    try:
        result = cli(site, "vpg", "create", "vpg-bar", "--vm", "app5",
                     env={"FORCE_COLOR": "1"})  # rich: stderr counts as a terminal
    finally:
        site.backend.step_delay_s = 0.01
    assert result.exit_code == 0, result.stderr
    assert "vpg_create vpg-bar: initial sync of vpg-bar: step" in result.stderr
    assert "━" in result.stderr and "VPG vpg-bar" in result.stdout


def test_vpg_no_wait_prints_the_task_id(site: Site, tmp_path: Path) -> None:
    add_vm(site, "app3", tmp_path)
    out = ok(site, "vpg", "create", "vpg-nowait", "--vm", "app3", "--no-wait")
    assert "zcore tasks show" in out
    task_id = out.split()[1]
    shown = as_json(site, "tasks", "show", task_id, "--wait")
    assert shown["state"] == "succeeded" and shown["vpg"] == "vpg-nowait"
    started = as_json(site, "vpg", "sync", "vpg-nowait", "--no-wait")
    assert started["kind"] == "vpg_sync" and started["state"] in ("queued", "running")
    assert "succeeded" in ok(site, "tasks", "show", started["id"], "--wait")


def test_vpg_pause_resume_sync_delete(site: Site, tmp_path: Path) -> None:
    add_vm(site, "app4", tmp_path)
    create_vpg(site, "vpg-life", "app4")
    assert "VPG vpg-life is paused" in ok(site, "vpg", "pause", "vpg-life")
    result = cli(site, "vpg", "sync", "vpg-life")
    assert result.exit_code == 1
    assert "resume it before a sync" in result.stderr and "invalid_state" in result.stderr
    resumed = as_json(site, "vpg", "resume", "vpg-life")
    assert resumed == site.api("GET", "/vpgs/vpg-life") and resumed["state"] == "protecting"
    paused = as_json(site, "vpg", "pause", "vpg-life")
    assert paused["state"] == "paused"
    assert "protecting" in ok(site, "vpg", "resume", "vpg-life")
    assert "succeeded" in ok(site, "vpg", "sync", "vpg-life")
    synced = as_json(site, "vpg", "sync", "vpg-life")
    assert synced["state"] == "succeeded" and synced["result"] == {"vpg": "vpg-life", "bytes": 0}
    refused = cli(site, "vpg", "delete", "vpg-life", input="n\n")
    assert refused.exit_code == 1
    assert site.api("GET", "/vpgs/vpg-life")["name"] == "vpg-life"
    assert "VPG vpg-life deleted" in ok(site, "vpg", "delete", "vpg-life", "--yes")
    result = cli(site, "vpg", "show", "vpg-life")
    assert result.exit_code == 1 and "zcore vpg list" in result.stderr
    create_vpg(site, "vpg-gone", "app4")
    deleted = as_json(site, "vpg", "delete", "vpg-gone", "--yes")
    assert deleted["kind"] == "vpg_delete" and deleted["state"] == "succeeded"


# -- checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def history(site: Site, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A VPG with 10 checkpoints one minute apart, ending an hour ago; #3 and #7 tagged."""
    add_vm(site, "hist", tmp_path_factory.mktemp("hist"))
    create_vpg(site, "vpg-hist", "hist")
    import time

    base = int((time.time() - 3600 - 600) * 1e9)
    for i in range(10):
        tag = f"t{i}" if i in (3, 7) else None
        site.backend.add_checkpoint("vpg-hist", base + i * 60 * 10**9, tag=tag,
                                    consistent=i != 5)
    return "vpg-hist"


def test_checkpoint_list_filters_and_json(site: Site, history: str) -> None:
    page = as_json(site, "checkpoint", "list", history)
    assert page == site.api("GET", f"/vpgs/{history}/checkpoints", params={"limit": 100})
    assert len(page["items"]) == 10 and page["next_cursor"] is None
    tagged = as_json(site, "checkpoint", "list", history, "--kind", "tagged")
    assert [c["tag"] for c in tagged["items"]] == ["t7", "t3"]
    assert [c["tag"] for c in as_json(site, "checkpoint", "list", history, "--tag", "t3")
            ["items"]] == ["t3"]
    bad = as_json(site, "checkpoint", "list", history, "--inconsistent")
    assert len(bad["items"]) == 1
    assert len(as_json(site, "checkpoint", "list", history, "--consistent")["items"]) == 9
    # the last 10 minutes hold none of them; from 2h ago until 1h ago holds all
    assert as_json(site, "checkpoint", "list", history, "--since", "10m")["items"] == []
    window = as_json(site, "checkpoint", "list", history, "--since", "2h", "--until", "1h")
    assert len(window["items"]) == 10
    out = ok(site, "checkpoint", "list", history, "--kind", "tagged")
    assert "t3" in out and "t7" in out and "tagged" in out


def test_checkpoint_list_pages_with_limit_and_after(site: Site, history: str) -> None:
    first = as_json(site, "checkpoint", "list", history, "--limit", "4")
    assert len(first["items"]) == 4 and first["next_cursor"] is not None
    second = as_json(site, "checkpoint", "list", history, "--limit", "4",
                     "--after", first["next_cursor"])
    ids = [c["id"] for c in first["items"] + second["items"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 8
    out = ok(site, "checkpoint", "list", history, "--limit", "4")
    assert f"--after {first['next_cursor']}" in out
    everything = as_json(site, "checkpoint", "list", history)["items"]
    oldest = as_json(site, "checkpoint", "list", history, "--oldest-first", "--limit", "1")
    assert oldest["items"] == everything[-1:]


def test_checkpoint_list_buckets(site: Site, history: str) -> None:
    found = as_json(site, "checkpoint", "list", history, "--buckets", "5m")
    assert found == site.api("GET", f"/vpgs/{history}/checkpoints/buckets",
                             params={"bucket_seconds": 300})
    assert sum(b["count"] for b in found["buckets"]) == 10
    assert sum(b["tagged"] for b in found["buckets"]) == 2
    out = ok(site, "checkpoint", "list", history, "--buckets", "5m")
    assert "per 300.0s" in out or "per 5.0m" in out


def test_checkpoint_tag_then_listed(site: Site, history: str) -> None:
    out = ok(site, "checkpoint", "tag", history, "before upgrade")
    assert "tagged 'before upgrade'" in out
    made = as_json(site, "checkpoint", "tag", history, "second")
    assert made["tag"] == "second" and made["kind"] == "tagged"
    latest = as_json(site, "checkpoint", "list", history, "--limit", "1")["items"][0]
    assert latest == made
    assert "before upgrade" in ok(site, "checkpoint", "list", history, "--kind", "tagged")


def test_checkpoint_list_of_an_unknown_vpg_exits_1(site: Site) -> None:
    result = cli(site, "checkpoint", "list", "nope")
    assert result.exit_code == 1 and "vpg_not_found" in result.stderr


def test_bad_time_is_a_usage_error(site: Site) -> None:
    result = cli(site, "checkpoint", "list", "x", "--since", "yesterday-ish")
    assert result.exit_code == 2 and "not a time" in result.stderr


# -- activity ------------------------------------------------------------------------------


def test_events(site: Site, history: str) -> None:
    site.db.add_event("test_event", "something happened", vpg=history)
    page = as_json(site, "events")
    assert page == site.api("GET", "/events", params={"limit": 100})
    assert "something happened" in ok(site, "events", "--vpg", history)
    one = as_json(site, "events", "--limit", "1")
    assert len(one["items"]) == 1 and one["next_cursor"] is not None
    nxt = as_json(site, "events", "--limit", "1", "--after", one["next_cursor"])
    assert nxt["items"][0]["id"] < one["items"][0]["id"]
    assert as_json(site, "events", "--severity", "critical")["items"] == []


def test_alerts_list_and_ack(site: Site, history: str) -> None:
    alert = site.db.raise_alert("rpo_exceeded", "RPO above 90s", vpg=history,
                                severity=Severity.ERROR)
    listed = as_json(site, "alerts", "list")
    assert listed == site.api("GET", "/alerts", params={"limit": 100})
    assert as_json(site, "alerts", "list", "--active") == site.api(
        "GET", "/alerts", params={"active": "true", "limit": 100})
    out = ok(site, "alerts", "list")
    assert "rpo_exceeded" in out and "active" in out
    acked = as_json(site, "alerts", "ack", str(alert.id))
    assert acked["acknowledged"] is True
    assert acked == site.api("GET", "/alerts", params={"limit": 100})[0]
    other = site.db.raise_alert("journal_full", "journal at 95%", vpg=history)
    assert f"alert {other.id} (journal_full) acknowledged" in ok(
        site, "alerts", "ack", str(other.id))
    result = cli(site, "alerts", "ack", "999999")
    assert result.exit_code == 1 and "zcore alerts list" in result.stderr


def test_tasks_list_and_show(site: Site, history: str) -> None:
    listed = as_json(site, "tasks", "list")
    assert listed == site.api("GET", "/tasks", params={"limit": 100})
    assert listed and all(t["state"] == "succeeded" for t in listed)
    assert "vpg_create" in ok(site, "tasks", "list", "--kind", "vpg_create")
    one = listed[0]
    assert as_json(site, "tasks", "show", one["id"]) == site.api("GET", f"/tasks/{one['id']}")
    out = ok(site, "tasks", "show", one["id"])
    assert one["kind"] in out and "succeeded" in out
    result = cli(site, "tasks", "show", "no-such-task")
    assert result.exit_code == 1 and "zcore tasks list" in result.stderr


# -- site status and pairing ---------------------------------------------------------------


def test_site_status(site: Site) -> None:
    status = as_json(site, "site", "status")
    assert status["sites"] == site.api("GET", "/sites")
    assert status["health"] == site.api("GET", "/health")
    assert status["vpgs"] == site.api("GET", "/vpgs")
    assert status["alerts"] == site.api("GET", "/alerts", params={"active": "true"})
    out = ok(site, "site", "status")
    assert "site alpha" in out and site.url in out


def test_site_pair_in_one_step_issues_the_token_at_the_peer(site: Site, peer: Site) -> None:
    out = ok(site, "site", "pair", "--peer-site", peer.url, "--peer-token", peer.token,
             "--peer-address", "127.0.0.1:17481")
    assert "paired with site" in out and "127.0.0.1:17481" in out
    body = as_json(site, "site", "pair", "--peer-site-dir", str(peer.root),
                   "--peer-address", "127.0.0.1:17482")
    assert body["pairing_token"]["token"].startswith("zp_")
    peers = site.api("GET", "/sites")["peers"]
    assert body["peer"] in peers
    assert {p["address"] for p in peers} >= {"127.0.0.1:17481", "127.0.0.1:17482"}
    assert "paired sites" in ok(site, "site", "status")


def test_site_pair_in_two_steps(site: Site, peer: Site) -> None:
    issued = as_json(peer, "site", "pairing-token")
    assert issued["token"].startswith("zp_") and issued["expires_at"] > 0
    assert "pairing token" in ok(peer, "site", "pairing-token")
    body = as_json(site, "site", "pair", "--peer-address", "127.0.0.1:17483",
                   "--pairing-token", issued["token"])
    assert set(body) == {"peer"} and body["peer"]["address"] == "127.0.0.1:17483"


def test_site_pair_refusals(site: Site, peer: Site) -> None:
    result = cli(site, "site", "pair", "--peer-address", "h:1")
    assert result.exit_code == 2 and "--pairing-token" in result.stderr
    result = cli(site, "site", "pair", "--peer-address", "h:1", "--peer-site", peer.url)
    assert result.exit_code == 2 and "--peer-token" in result.stderr
    result = cli(site, "site", "pair", "--peer-address", "h:1", "--peer-site", peer.url,
                 "--peer-token", "zt_wrong")
    assert result.exit_code == 1 and peer.url in result.stderr
    assert "refused the API token" in result.stderr


def test_python_m_zcore_cli_runs_a_command(site: Site, tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "ZCORE_SITE": site.url, "ZCORE_TOKEN": site.token}
    # run outside the source tree: `-m` puts the working directory first on sys.path
    done = subprocess.run([sys.executable, "-m", "zcore.cli", "vpg", "list", "--json"],
                          capture_output=True, text=True, env=env, timeout=60, check=False,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == site.api("GET", "/vpgs")



def test_vpg_create_names_its_peer_by_name(site: Site, peer: Site, tmp_path: Path) -> None:
    token = peer.api("POST", "/pairing/tokens")["token"]
    paired = as_json(site, "site", "pair", "--peer-address", "peer-by-name:7481",
                     "--pairing-token", token)["peer"]
    add_vm(site, "app6", tmp_path)
    ok(site, "vpg", "create", "vpg-peer", "--vm", "app6", "--peer", paired["name"])
    assert site.api("GET", "/vpgs/vpg-peer")["peer"] == paired["site_id"]
    assert f"{paired['name']} ({paired['site_id']})" in ok(site, "vpg", "show", "vpg-peer")
    assert paired["name"] in ok(site, "vpg", "list")


def test_an_empty_list_says_so(site: Site) -> None:
    assert ok(site, "alerts", "list", "--vpg", "no-such-vpg").strip() == "no alerts"
    assert as_json(site, "alerts", "list", "--vpg", "no-such-vpg") == []
