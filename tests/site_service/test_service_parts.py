"""The site service's small parts, in process: settings mapping, addresses, the event diff,
the sampler's recorded VPG state, the client record and the JSON log lines."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from zcore.errors import ConfigError
from zcore.replication import ReplicationState
from zcore.site.config import ClientRecord, SiteDir, read_client, set_client_url, write_client
from zcore.site.db import SiteDB, VpgRole, VpgState
from zcore.site.runtime import VIEW_NAME, split_address, vpg_settings
from zcore.site.scheduler import Sample, Scheduler, history_short, new_events
from zcore.site.service import is_loopback, raise_nofile_limit, setup_logging


def test_api_settings_become_library_settings_and_bad_ones_are_refused() -> None:
    s = vpg_settings({"checkpoint_interval_seconds": 2, "history_seconds": 7200,
                      "journal_hard_limit_bytes": 64 << 20, "journal_warn_bytes": 32 << 20,
                      "rpo_alert_seconds": 30, "compression": False})
    assert (s.checkpoint_interval, s.journal.history_seconds, s.rpo_alert_seconds) == (2, 7200, 30)
    assert s.journal.warning_fraction == 0.5 and not s.compression
    with pytest.raises(ConfigError, match="history"):
        vpg_settings({"history_seconds": 60})  # the journal keeps at least an hour


@pytest.mark.parametrize("address", ["nohost", "host:", ":80", "h:99999", "h:x"])
def test_a_bad_peer_address_is_refused_with_its_form(address: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        split_address(address)


def test_addresses_split_ipv4_and_ipv6() -> None:
    assert split_address("127.0.0.1:7481") == ("127.0.0.1", 7481)
    assert split_address("[::1]:7481") == ("::1", 7481)


def test_only_new_vpg_events_are_taken_across_a_full_event_log() -> None:
    assert new_events((), ("a", "b")) == ["a", "b"]
    assert new_events(("a", "b"), ("a", "b", "c")) == ["c"]
    assert new_events(("a", "b", "c"), ("b", "c", "d", "e")) == ["d", "e"]  # a fell off
    assert new_events(("a",), ("a",)) == []
    assert new_events(("x",), ("y",)) == ["y"]


def test_view_export_names_carry_vpg_vm_volume_and_checkpoint() -> None:
    m = VIEW_NAME.match("g1/vm1/disk0@42")
    assert m is not None and (m["vpg"], m["vm"], m["volume"], m["id"]) == (
        "g1", "vm1", "disk0", "42")
    assert VIEW_NAME.match("g1/vm1/disk0") is None
    for ckpt in ("latest", "tag:before upgrade"):
        m = VIEW_NAME.match(f"g1/vm1/disk0@{ckpt}")
        assert m is not None and m["id"] == ckpt
    assert VIEW_NAME.match("g1/vm1/disk0@newest") is None


def test_the_client_record_keeps_its_token_when_serve_records_the_url(tmp_path: Path) -> None:
    site = SiteDir(tmp_path)
    write_client(site, ClientRecord("http://127.0.0.1:1", "zc_secret"))
    set_client_url(site, "https://127.0.0.1:2", "/x/site.crt")
    assert read_client(site) == ClientRecord("https://127.0.0.1:2", "zc_secret", "/x/site.crt")
    assert (tmp_path / "client.json").stat().st_mode & 0o077 == 0


def test_only_loopback_addresses_serve_plain_http() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")


def test_the_descriptor_limit_is_raised_to_the_hard_limit() -> None:
    import resource

    soft = raise_nofile_limit()
    assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_json_logs_are_one_object_per_line() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(True, stream)
        logging.getLogger("zcore.test").warning("hello %s", "there")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    doc = json.loads(stream.getvalue().splitlines()[-1])
    assert doc["message"] == "hello there" and doc["level"] == "WARNING"


def test_a_young_vpg_building_its_history_is_no_history_sla_shortfall() -> None:
    assert not history_short("building") and not history_short("ok")
    assert history_short("warning") and history_short("error")


def test_a_vpg_is_syncing_in_the_database_while_any_sync_runs(db: SiteDB) -> None:
    """The sampler keeps a protected VPG's recorded state in step with its replication:
    "protecting" is what a move or failback checks, so a delta sync (reverse protection)
    must read as syncing, as an initial or bitmap sync does (a demo once failed back in
    the middle of one)."""
    db.create_vpg("g", VpgRole.PROTECTED, state=VpgState.SYNCING)
    scheduler = Scheduler(db, cast(Any, SimpleNamespace(metrics=None)))
    for state in ReplicationState:
        if state == ReplicationState.PAUSED:
            continue  # a paused VPG's recorded state is the user's
        scheduler._record([Sample("g", str(VpgRole.PROTECTED), state=str(state))], [])
        want = VpgState.SYNCING if state in (
            ReplicationState.INITIALIZING, ReplicationState.DELTA_SYNCING,
            ReplicationState.BITMAP_SYNCING) else VpgState.PROTECTING
        assert db.get_vpg("g").state == want, state
