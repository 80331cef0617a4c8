"""The site database's repository on SQLite and PostgreSQL: what it keeps, what it refuses
and how it names what exists when a name is unknown."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from zcore.site.db import (
    SiteDB,
    TaskError,
    TaskState,
    VolumeRole,
    VpgRole,
    VpgState,
    hash_token,
)
from zcore.site.errors import (
    AlreadyExistsError,
    InUseError,
    PeerNotFoundError,
    SiteNotInitializedError,
    VmNotFoundError,
    VolumeNotFoundError,
    VpgNotFoundError,
)


def test_site_identity_is_recorded_once(db: SiteDB) -> None:
    assert db.get_site().name == "Site A"
    with pytest.raises(AlreadyExistsError):
        db.init_site("other", "Other")


def test_uninitialized_database_has_no_site(db_url: str) -> None:
    with SiteDB.open(db_url) as fresh, pytest.raises(SiteNotInitializedError):
        fresh.get_site()


def test_vm_with_volumes_round_trips(db: SiteDB) -> None:
    db.create_vm("vm1", [{"name": "d0", "size": 1 << 30, "path": "/v/d0.img"}])
    db.create_volume("vm1", "d1", 4096, None, VolumeRole.REPLICA)
    vm = db.get_vm("vm1")
    assert [(v.name, v.size, v.role) for v in vm.volumes] == [
        ("d0", 1 << 30, VolumeRole.PROTECTED),
        ("d1", 4096, VolumeRole.REPLICA),
    ]
    assert vm.volumes[0].path == "/v/d0.img"
    assert [v.name for v in db.list_volumes()] == ["d0", "d1"]


def test_duplicate_vm_and_volume_names_are_refused(db: SiteDB) -> None:
    db.create_vm("vm1", [{"name": "d0", "size": 512}])
    with pytest.raises(AlreadyExistsError):
        db.create_vm("vm1")
    with pytest.raises(AlreadyExistsError):
        db.create_volume("vm1", "d0", 512)
    assert len(db.get_vm("vm1").volumes) == 1


def test_unknown_names_list_what_exists(db: SiteDB) -> None:
    db.create_vm("vm1", [{"name": "d0", "size": 512}])
    with pytest.raises(VmNotFoundError) as vm_err:
        db.get_vm("vm2")
    assert vm_err.value.details == {"known": ["vm1"]}
    with pytest.raises(VolumeNotFoundError) as vol_err:
        db.get_volume("vm1", "d9")
    assert vol_err.value.details == {"known": ["d0"]}
    with pytest.raises(VpgNotFoundError):
        db.get_vpg("g")


def test_list_vms_pages_by_name_with_their_volumes(db: SiteDB) -> None:
    for i in range(25):
        db.create_vm(f"vm{i:02d}", [{"name": "d0", "size": 512 * (i + 1)}])
    first = db.list_vms(limit=10)
    second = db.list_vms(limit=10, after=first[-1].name)
    rest = db.list_vms(after=second[-1].name)
    names = [v.name for v in first + second + rest]
    assert names == [f"vm{i:02d}" for i in range(25)]
    assert all(len(v.volumes) == 1 for v in first + second + rest)
    assert second[0].volumes[0].size == 512 * 11
    assert db.count_vms() == 25


def test_vm_in_a_vpg_cannot_be_deleted(db: SiteDB) -> None:
    db.create_vm("vm1")
    db.create_vpg("g", VpgRole.PROTECTED, ["vm1"], settings={"history_seconds": 3600})
    with pytest.raises(InUseError):
        db.delete_vm("vm1")
    db.delete_vpg("g")
    db.delete_vm("vm1")
    assert db.list_vms() == []


def test_vpg_settings_state_and_role_update(db: SiteDB) -> None:
    db.create_vm("a")
    db.create_vm("b")
    vpg = db.create_vpg("g", VpgRole.RECOVERY, ["b", "a", "a"], settings={"x": [1, 2]})
    assert vpg.vms == ("a", "b") and vpg.state == VpgState.CREATING
    updated = db.update_vpg("g", settings={"x": 3}, state=VpgState.PROTECTING)
    assert updated.settings == {"x": 3} and updated.state == VpgState.PROTECTING
    assert db.update_vpg("g", role=VpgRole.PROTECTED).role == VpgRole.PROTECTED
    assert [v.name for v in db.list_vpgs(VpgRole.PROTECTED)] == ["g"]


def test_vpg_with_unknown_peer_or_vm_is_refused(db: SiteDB) -> None:
    with pytest.raises(PeerNotFoundError):
        db.create_vpg("g", VpgRole.PROTECTED, peer="nobody")
    with pytest.raises(VmNotFoundError):
        db.create_vpg("g", VpgRole.PROTECTED, ["ghost"])
    assert db.list_vpgs() == []


def test_peer_with_vpgs_cannot_be_removed(db: SiteDB) -> None:
    db.add_peer("site-b", "Site B", "10.0.0.2:9000", "ab" * 32)
    db.create_vpg("g", VpgRole.PROTECTED, peer="site-b")
    with pytest.raises(InUseError):
        db.remove_peer("site-b")
    with pytest.raises(AlreadyExistsError):
        db.add_peer("site-b", "again", "x", "y")
    db.delete_vpg("g")
    db.remove_peer("site-b")
    assert db.list_peers() == []


def test_tokens_are_stored_only_as_sha256(db: SiteDB) -> None:
    new = db.create_token("admin")
    with db.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT token_hash FROM api_tokens")).scalars().all()
    assert stored == [hash_token(new.secret)]
    assert new.secret not in repr(new)
    assert db.verify_token(new.secret) is not None
    assert db.verify_token(new.secret + "x") is None
    db.revoke_token(new.record.id)
    assert db.verify_token(new.secret) is None
    assert db.get_token(new.record.id).revoked


def test_task_lifecycle_and_restart(db: SiteDB) -> None:
    task = db.create_task("vpg_sync", "g")
    assert task.state == TaskState.QUEUED and task.started_at is None
    running = db.update_task(task.id, state=TaskState.RUNNING, progress=2.0, message="go")
    assert running.started_at is not None and running.progress == 1.0
    done = db.create_task("vpg_create")
    db.update_task(done.id, state=TaskState.SUCCEEDED, result={"ok": [1, 2]})
    failed = db.fail_unfinished_tasks("site service restarted", "service_restarted")
    assert failed == [task.id]
    after = db.get_task(task.id)
    assert after.state == TaskState.FAILED
    assert after.error == TaskError("service_restarted", "site service restarted")
    assert db.get_task(done.id).result == {"ok": [1, 2]}
    assert {t.id for t in db.list_tasks(state=TaskState.FAILED)} == {task.id}


def test_events_page_newest_first(db: SiteDB) -> None:
    for i in range(7):
        db.add_event("e", f"event {i}", vpg="g" if i % 2 else None, time=1000.0 + i)
    page = db.list_events(limit=3)
    assert [e.text for e in page] == ["event 6", "event 5", "event 4"]
    nxt = db.list_events(limit=3, before_id=page[-1].id)
    assert [e.text for e in nxt] == ["event 3", "event 2", "event 1"]
    assert [e.text for e in db.list_events(vpg="g", start=1002.0)] == ["event 5", "event 3"]


def test_alert_raised_twice_is_one_alert_until_cleared(db: SiteDB) -> None:
    first = db.raise_alert("rpo", "RPO over 300 s", vpg="g")
    assert db.raise_alert("rpo", "RPO over 300 s", vpg="g").id == first.id
    assert db.acknowledge_alert(first.id).acknowledged
    cleared = db.clear_alert(first.id)
    assert cleared.cleared and cleared.cleared_at is not None
    assert db.raise_alert("rpo", "again", vpg="g").id != first.id
    assert len(db.list_alerts(active=True)) == 1
    assert len(db.list_alerts()) == 2


def test_concurrent_writers_all_succeed(db: SiteDB) -> None:
    """Writers in many threads (the service's worker threads) wait for each other instead
    of failing with "database is locked" (SQLite takes the write lock at BEGIN)."""

    def writer(n: int) -> None:
        for i in range(15):
            db.create_vm(f"vm{n}-{i}", [{"name": "d0", "size": 512}])
            db.add_event("e", f"{n}-{i}")
            db.list_vms(limit=5)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(writer, range(8)))
    assert db.count_vms() == 120
    assert len(db.list_events(limit=None)) == 120
