"""The failover test (issue 11) through the REST API and the CLI of two real site
services: protect a VPG of two VMs, write, tag, start a test at the tag, read the test
exports over NBD (they match the tag), write to them (scratch), replication and new
checkpoints go on meanwhile, the VPG's scratch limit refuses a write, stop with a result
(overlays and exports gone, the result recorded against the checkpoint, an event, back to
replicating), refusals (a second start, a stop when not testing) are 409 with their
reason, the test reminder raises its alert; then a second test through `zcore test
... --json`, and a kill -9 during a third (recorded aborted after the restart).  Plus
the library pieces the operation stands on: checkpoint choice, the state table, the
shared scratch budget."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.site import SiteProcess, ok, two_sites, wait_for, zcore_cmd

from zcore.adapters import (
    BootPlanError,
    QemuAdapter,
    boot_plan,
    check_adapter_settings,
    make_adapter,
)
from zcore.errors import CheckpointNotFoundError, ConfigError, ScratchLimitError, StateError
from zcore.records import Checkpoint, CheckpointKind
from zcore.recovery import (
    CheckpointChoice,
    ChoiceKind,
    Operation,
    OperationState,
    OperationStates,
    ScratchBudget,
    parse_time,
)

MiB = 1 << 20
DISK = 8 * MiB

needs_qemu_io = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")


def qemu_io(uri: str, command: str, readonly: bool = False, check: bool = True) -> str:
    args = ["qemu-io", "-f", "raw", *(["-r"] if readonly else []), "-c", command, uri]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    out = done.stdout + done.stderr
    if check:
        assert done.returncode == 0 and "failed" not in out, out
    return out


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[SiteProcess, SiteProcess]]:
    with two_sites(tmp_path) as pair:
        yield pair


def wait_task(client: httpx.Client, task: dict[str, Any], state: str = "succeeded"
              ) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        t: dict[str, Any] = ok(client.get(f"/tasks/{task['id']}"))
        return t if t["state"] in ("succeeded", "failed", "cancelled") else None

    result: dict[str, Any] = wait_for("the task", done, timeout=60)
    assert result["state"] == state, result
    return result


def tagged(client: httpx.Client, vpg: str, tag: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = ok(client.get(f"/vpgs/{vpg}/checkpoints",
                                                params={"tag": tag}))["items"]
    return items


def refused(response: httpx.Response) -> str:
    assert response.status_code == 409, (response.status_code, response.text)
    message: str = response.json()["error"]["message"]
    return message


def protect(tmp_path: Path, ca: httpx.Client, cb: httpx.Client, a: SiteProcess,
            b: SiteProcess) -> None:
    """Pair both ways; VPG g1 of vm1 and vm2 (one disk each) protected from a to b."""
    token = ok(cb.post("/pairing/tokens"))["token"]
    beta = ok(ca.post("/pairing", json={"address": b.replication, "token": token}))
    token = ok(ca.post("/pairing/tokens"))["token"]
    ok(cb.post("/pairing", json={"address": a.replication, "token": token}))
    for vm in ("vm1", "vm2"):
        disk = tmp_path / f"{vm}.img"
        with open(disk, "wb") as f:
            f.truncate(DISK)
        ok(ca.post("/vms", json={"name": vm, "volumes": [
            {"name": "disk0", "size": DISK, "path": str(disk)}]}), 201)
    task = ok(ca.post("/vpgs", json={"name": "g1", "vms": ["vm1", "vm2"],
                                     "peer": beta["site_id"],
                                     "settings": {"checkpoint_interval_seconds": 0.5}}), 202)
    wait_task(ca, task)


@needs_qemu_io
def test_failover_test_serves_the_tag_on_scratch_while_replication_goes_on(
        sites: tuple[SiteProcess, SiteProcess], tmp_path: Path) -> None:
    a, b = sites
    ca, cb = a.client(), b.client()
    protect(tmp_path, ca, cb, a, b)
    qemu_io(f"{a.nbd}/g1/vm1/disk0", "write -P 0xab 0 1M")
    qemu_io(f"{a.nbd}/g1/vm2/disk0", "write -P 0xac 0 1M")
    t1 = ok(ca.post("/vpgs/g1/checkpoints", json={"tag": "t1"}), 201)
    wait_for("t1 at b", lambda: tagged(cb, "g1", "t1"))
    qemu_io(f"{a.nbd}/g1/vm1/disk0", "write -P 0xee 0 1M")  # after the tag

    # recovery settings: a scratch limit for the whole VPG, a test period (the reminder)
    assert refused(ca.post("/vpgs/g1/test", json={"checkpoint": "tag:t1"})).startswith(
        "VPG 'g1' is protected by this site")
    bad = cb.patch("/vpgs/g1/recovery-settings", json={"adapter": "hyperv"})
    assert bad.status_code == 422 and "unknown hypervisor adapter" in bad.text
    settings = ok(cb.patch("/vpgs/g1/recovery-settings", json={
        "adapter": "none", "test_scratch_limit_bytes": 2 * MiB, "test_period_days": 1e-4}))
    assert settings["test_scratch_limit_bytes"] == 2 * MiB
    overdue = wait_for("the test reminder", lambda: [
        x for x in ok(cb.get("/alerts", params={"active": "true"}))
        if x["code"] == "test_overdue"], timeout=30)
    assert "no passed failover test since it was created" in overdue[0]["text"]

    # a choice nothing matches says what the VPG holds
    missing = cb.post("/vpgs/g1/test", json={"checkpoint": "tag:nope"})
    assert missing.status_code == 404 and "newest tags: 't1'" in missing.text, missing.text
    assert cb.post("/vpgs/g1/test", json={"checkpoint": "sometime"}).status_code == 422
    assert "test start" in refused(cb.post("/vpgs/g1/test/stop", json={"result": "passed"}))

    started = wait_task(cb, ok(cb.post("/vpgs/g1/test", json={"checkpoint": "tag:t1"}), 202))
    result = started["result"]
    assert result["checkpoint"]["id"] == t1["id"] and result["adapter"] == "none"
    exports = result["exports"]
    assert [e.rsplit("/", 4)[1:] for e in exports] == [
        ["test", "g1", "vm1", "disk0"], ["test", "g1", "vm2", "disk0"]]
    test1, test2 = exports
    qemu_io(test1, "read -P 0xab 0 1M")  # the tag, not the write after it
    qemu_io(test2, "read -P 0xac 0 1M")
    # twice is refused, saying why and what is allowed
    message = refused(cb.post("/vpgs/g1/test", json={"checkpoint": "latest"}))
    assert "is in a failover test" in message and f"checkpoint {t1['id']}" in message
    assert "allowed now: test stop" in message
    assert cb.delete("/vpgs/g1").status_code == 409

    # scratch writes; the journal's view of t1 stays as it was
    qemu_io(test1, "write -P 0x11 1M 1M")
    qemu_io(test1, "read -P 0x11 1M 1M")
    qemu_io(f"{b.nbd}/g1/vm1/disk0@{t1['id']}", "read -P 0 1M 1M", readonly=True)
    status = ok(cb.get("/vpgs/g1/test"))
    running = status["running"]
    assert status["state"] == "testing"
    assert running["scratch_used_bytes"] == MiB and running["scratch_limit_bytes"] == 2 * MiB
    vpg_status = ok(cb.get("/vpgs/g1/status"))
    assert vpg_status["operation_state"] == "testing"
    assert (vpg_status["scratch_used_bytes"], vpg_status["scratch_limit_bytes"]) == (
        MiB, 2 * MiB)
    # the VPG's limit is summed over its overlays: 1 MiB more on vm2 passes it
    out = qemu_io(test2, "write -P 0x22 0 1536k", check=False)
    assert "No space left on device" in out, out
    assert ok(cb.get("/vpgs/g1/test"))["running"]["scratch_used_bytes"] == MiB
    # replication goes on: a new checkpoint arrives during the test
    qemu_io(f"{a.nbd}/g1/vm1/disk0", "write -P 0x33 2M 1M")
    t2 = ok(ca.post("/vpgs/g1/checkpoints", json={"tag": "t2"}), 201)
    wait_for("t2 at b during the test", lambda: tagged(cb, "g1", "t2"))
    qemu_io(f"{b.nbd}/g1/vm1/disk0@{t2['id']}", "read -P 0x33 2M 1M", readonly=True)

    stopped = wait_task(cb, ok(cb.post("/vpgs/g1/test/stop", json={
        "result": "passed", "note": "app came up"}), 202))
    record = stopped["result"]["record"]
    assert record["checkpoint_id"] == t1["id"] and record["result"] == "passed"
    assert record["label"].startswith("Tested at ")
    assert "allowed now: test start" in refused(
        cb.post("/vpgs/g1/test/stop", json={"result": "failed"}))
    gone = qemu_io(test1, "read 0 4k", check=False)
    assert "failed" in gone or "not" in gone.lower(), gone
    status = ok(cb.get("/vpgs/g1/test"))
    assert status["state"] == "replicating" and status["running"] is None
    assert ok(cb.get("/vpgs/g1/status"))["operation_state"] == "replicating"
    assert status["history"][0]["checkpoint_tag"] == "t1"
    events = ok(cb.get("/events", params={"vpg": "g1"}))["items"]
    results = [e for e in events if e["code"] == "test_result"]
    assert results and record["label"] in results[0]["text"] and "passed" in results[0]["text"]
    assert any(e["code"] == "test_started" for e in events)
    # a passed test clears the reminder (it comes back once the period passes again)
    alert = next(x for x in ok(cb.get("/alerts")) if x["id"] == overdue[0]["id"])
    assert alert["cleared"], alert

    # the CLI, --json: a second test at the latest checkpoint, failed
    def cli(*args: str) -> dict[str, Any]:
        done = subprocess.run(zcore_cmd(*args, "--site-dir", str(b.root), "--json"),
                              capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stdout + done.stderr
        body: dict[str, Any] = json.loads(done.stdout)
        return body

    # the command adapter: a start command that fails ends the start, nothing left open
    log = tmp_path / "vms.log"
    ok(cb.patch("/vpgs/g1/recovery-settings", json={
        "adapter": "command", "start_command": "sh -c 'exit 3'"}))
    failed = wait_task(cb, ok(cb.post("/vpgs/g1/test", json={}), 202), state="failed")
    assert "exited with status 3" in failed["error"]["message"], failed
    assert ok(cb.get("/vpgs/g1/test"))["state"] == "replicating"
    assert any(e["code"] == "test_start_failed"
               for e in ok(cb.get("/events", params={"vpg": "g1"}))["items"])
    script = f"sh -c 'echo $ZCORE_PURPOSE $ZCORE_VM $ZCORE_CHECKPOINT $ZCORE_NBD_DISK0 >> {log}'"
    ok(cb.patch("/vpgs/g1/recovery-settings", json={
        "start_command": script, "stop_command": script.replace("echo", "echo stop")}))

    began = cli("test", "start", "g1", "--checkpoint", f"id:{t2['id']}")
    assert began["state"] == "succeeded" and began["result"]["checkpoint"]["id"] == t2["id"]
    qemu_io(began["result"]["exports"][0], "read -P 0x33 2M 1M")
    assert cli("test", "status", "g1")["state"] == "testing"
    again = subprocess.run(zcore_cmd("test", "start", "g1", "--site-dir", str(b.root)),
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "allowed now: test stop" in again.stderr, again.stderr
    ended = cli("test", "stop", "g1", "--result", "failed", "--note", "db did not start")
    assert ended["result"]["record"]["result"] == "failed"
    history = cli("test", "status", "g1")["history"]
    assert [h["result"] for h in history[:2]] == ["failed", "passed"]
    assert log.read_text().splitlines() == [
        f"test vm1 {t2['id']} {began['result']['exports'][0]}",
        f"test vm2 {t2['id']} {began['result']['exports'][1]}",
        f"stop test vm2 {t2['id']} {began['result']['exports'][1]}",
        f"stop test vm1 {t2['id']} {began['result']['exports'][0]}"]
    assert cli("test", "settings", "g1", "--adapter", "none")["adapter"] == "none"

    # a crash during a test: the restarted site records it aborted and can test again
    wait_task(cb, ok(cb.post("/vpgs/g1/test", json={"checkpoint": "latest"}), 202))
    b.kill()
    b.start()
    cb = b.client()
    status = ok(cb.get("/vpgs/g1/test"))
    assert status["state"] == "replicating" and status["history"][0]["result"] == "aborted"
    events = ok(cb.get("/events", params={"vpg": "g1"}))["items"]
    assert any(e["code"] == "test_aborted" for e in events)
    again_started = ok(cb.post("/vpgs/g1/test", json={"checkpoint": f"id:{t1['id']}"}), 202)
    wait_task(cb, again_started)
    wait_task(cb, ok(cb.post("/vpgs/g1/test/stop", json={"result": "passed"}), 202))


# -- the pieces underneath ------------------------------------------------------------------


class Source:
    """A CheckpointSource over a list (what RecoveryVPG answers)."""

    name = "g"

    def __init__(self, cps: list[Checkpoint]) -> None:
        self.cps = cps

    def checkpoints(self, *, tag: str | None = None, kind: Any = None,
                    consistent: bool | None = None, limit: int | None = None,
                    newest_first: bool = False, **_: Any) -> list[Checkpoint]:
        found = [c for c in self.cps if (kind is None or c.kind == kind)
                 and (consistent is None or c.consistent == consistent)
                 and (tag is None or (c.tag is not None and tag in c.tag))]
        found = found[::-1] if newest_first else found
        return found if limit is None else found[:limit]

    def latest(self, *, tagged: bool = False, consistent: bool | None = None,
               **_: Any) -> Checkpoint:
        found = self.checkpoints(kind=CheckpointKind.TAGGED if tagged else None,
                                 consistent=consistent, newest_first=True)
        if not found:
            raise CheckpointNotFoundError("VPG g holds no usable such checkpoint")
        return found[0]

    def before(self, t: float, **_: Any) -> Checkpoint:
        found = [c for c in self.cps if c.time < t]
        if not found:
            raise CheckpointNotFoundError(f"VPG g holds no usable checkpoint before {t}")
        return found[-1]

    def by_id(self, checkpoint_id: int) -> Checkpoint:
        for c in self.cps:
            if c.id == checkpoint_id:
                return c
        raise CheckpointNotFoundError(f"checkpoint {checkpoint_id} is not usable in VPG g")


def _cp(seq: int, t: float, tag: str | None = None, consistent: bool = True) -> Checkpoint:
    return Checkpoint(seq, seq, int(t * 1e9),
                      CheckpointKind.TAGGED if tag else CheckpointKind.AUTO, tag, consistent)


def test_checkpoint_choice_resolves_each_form_and_says_what_exists_when_nothing_matches(
        ) -> None:
    base = parse_time("2026-12-01T14:00:00Z")
    src = Source([_cp(1, base, "a"), _cp(2, base + 60), _cp(3, base + 120, "b"),
                  _cp(4, base + 300, consistent=False)])
    assert CheckpointChoice.parse(None).resolve(src).id == 4
    assert CheckpointChoice.parse("latest-tagged").resolve(src).id == 3
    assert CheckpointChoice.parse("consistent").resolve(src).id == 3
    assert CheckpointChoice.parse("2").resolve(src).id == 2
    assert CheckpointChoice.parse("id:1").resolve(src).id == 1
    assert CheckpointChoice.parse("tag:a").resolve(src).id == 1
    assert CheckpointChoice.parse("before:2026-12-01T14:02:00").resolve(src).id == 2
    assert CheckpointChoice.parse("before:2026-12-01T15:02:00+01:00").resolve(src).id == 2
    assert CheckpointChoice.parse(f"before:{base + 121}").resolve(src).id == 3
    assert CheckpointChoice.parse("before:1").kind == ChoiceKind.BEFORE
    with pytest.raises(CheckpointNotFoundError, match=r"holds checkpoints 1 .* to 4 .*"
                       r"newest tags: 'b' \(id 3\), 'a' \(id 1\)"):
        CheckpointChoice.parse("tag:c").resolve(src)
    with pytest.raises(CheckpointNotFoundError, match="holds no usable checkpoint yet"):
        CheckpointChoice.parse("latest").resolve(Source([]))
    for bad in ("newest", "id:x", "before:lunch", "tag:"):
        with pytest.raises(ConfigError, match=r"checkpoint choice|time"):
            CheckpointChoice.parse(bad)


def test_checkpoint_choice_takes_the_failover_api_and_nbd_view_spellings() -> None:
    """The one parser keeps what the failover API (`latest_tagged`, a JSON number,
    `before:<epoch>`) and the NBD view names (`@latest`, `@ID`, `@tag:TEXT`, TEXT kept to
    its last character) took before it replaced their own parsers."""
    base = parse_time("2026-12-01T14:00:00Z")
    src = Source([_cp(1, base, "a "), _cp(2, base + 60, "a"), _cp(3, base + 120),
                  _cp(4, base + 300, consistent=False)])
    assert CheckpointChoice.parse("latest_tagged").resolve(src).id == 2
    assert CheckpointChoice.parse("latest_consistent").resolve(src).id == 3
    assert CheckpointChoice.parse(1).resolve(src).id == 1
    assert CheckpointChoice.parse("3").resolve(src).id == 3
    assert CheckpointChoice.parse(f"before:{base + 61.5}").resolve(src).id == 2
    assert CheckpointChoice.parse("tag:a ").resolve(src).id == 1
    assert CheckpointChoice.parse("tag:a").resolve(src).id == 2
    for bad in (-1, True, 1.5, "\u00b2", "tag:  "):
        with pytest.raises(ConfigError, match="checkpoint choice"):
            CheckpointChoice.parse(bad)  # type: ignore[arg-type]


def test_state_table_refuses_with_the_reason_and_what_is_allowed() -> None:
    states = OperationStates()
    with pytest.raises(StateError, match="replicating with no recovery operation running: "
                                         "test stop is not allowed; allowed now: test start"):
        states.begin("g", Operation.TEST_STOP)
    t = states.begin("g", Operation.TEST_START)
    assert states.get("g") == OperationState.TEST_STARTING
    with pytest.raises(StateError, match="is starting a failover test: test start is not "
                                         "allowed; allowed now: nothing until it finishes"):
        states.begin("g", Operation.TEST_START)
    assert states.finish(t, False) == OperationState.REPLICATING  # a failed start
    t = states.begin("g", Operation.TEST_START)
    assert states.finish(t, True, "checkpoint 7") == OperationState.TESTING
    with pytest.raises(StateError, match=r"in a failover test \(checkpoint 7\): test start"):
        states.begin("g", Operation.TEST_START)
    t = states.begin("g", Operation.TEST_STOP)
    assert states.finish(t, True) == OperationState.REPLICATING


def test_scratch_budget_bounds_the_sum_over_overlays_and_gets_bytes_back() -> None:
    budget = ScratchBudget(4096, "VPG g")
    budget.reserve(3072, "one")
    with pytest.raises(ScratchLimitError, match="VPG g: two would use 4608 bytes"):
        budget.reserve(1536, "two")
    budget.release(3072)
    budget.reserve(4096, "three")
    assert budget.used_bytes == 4096


def _plan_of(settings: dict[str, Any], tmp_path: Path, vms: dict[str, str]) -> Any:
    """The boot plan a test of VPG g at checkpoint 5 runs (vms: vm -> its disk0's URI)."""
    checked = check_adapter_settings(settings)
    adapter = make_adapter(checked, run_dir=tmp_path, vpg="g", purpose="test",
                           volumes={vm: {"disk0": uri} for vm, uri in vms.items()})
    return boot_plan(adapter, checked, {vm: [uri] for vm, uri in vms.items()},
                     checkpoint=_cp(5, 1.0, "t"), vpg="g", operation="test")


def test_command_adapter_reports_a_command_past_its_timeout_or_missing(tmp_path: Path) -> None:
    uri = "nbd://h:1/test/g/vm1/disk0"
    out = tmp_path / "env"
    plan = _plan_of({"adapter": "command", "start_command":
                     f"sh -c 'echo $ZCORE_VPG $ZCORE_PURPOSE $ZCORE_NBD_DISK0 > {out}'"},
                    tmp_path, {"vm1": uri})
    assert plan.run().started == ["vm1"]
    assert out.read_text().split() == ["g", "test", uri]  # the variables of before
    slow = _plan_of({"adapter": "command", "start_command": "sleep 5",
                     "command_timeout_seconds": 0.2}, tmp_path, {"vm1": uri})
    with pytest.raises(BootPlanError, match=r"timed out after 0\.2 s") as info:
        slow.run()
    assert info.value.report.started == []
    with pytest.raises(BootPlanError, match="could not be run"):
        _plan_of({"adapter": "command", "start_command": "/nonexistent/boot-vm"}, tmp_path,
                 {"vm1": uri}).run()
    with pytest.raises(ConfigError, match="unknown hypervisor adapter 'vmware'; known: "
                                          "command, none, qemu"):
        check_adapter_settings({"adapter": "vmware"})
    with pytest.raises(ConfigError, match="needs `start_command`"):
        check_adapter_settings({"adapter": "command"})


def test_boot_order_and_qemu_settings_are_checked_and_make_the_plan(tmp_path: Path) -> None:
    vms = {vm: f"nbd://h:1/test/g/{vm}/disk0" for vm in ("db", "app", "web")}
    plan = _plan_of({"adapter": "qemu", "boot_order": [
        "db", {"vm": "app", "delay_seconds": 2.5, "timeout_seconds": 30}],
        "qemu": {"memory_mib": 256, "kernel": "/boot/k", "append": "console=ttyS0",
                 "extra_args": ["-s"], "vms": {"db": {"memory_mib": 1024}}}}, tmp_path, vms)
    assert [(s.vm, s.delay, s.timeout) for s in plan.steps] == [
        ("db", 0.0, None), ("app", 2.5, 30.0), ("web", 0.0, None)]  # the rest by name
    adapter = plan.adapter
    assert isinstance(adapter, QemuAdapter)
    argv = adapter.command_line("db", [vms["db"]], "/run/q.sock")
    assert argv[argv.index("-m") + 1] == "1024" and argv[-1] == "-s"
    assert argv[argv.index("-kernel") + 1] == "/boot/k"
    web = adapter.command_line("web", [vms["web"]], "/run/q.sock")
    assert web[web.index("-m") + 1] == "256"
    for bad, why in (({"boot_order": ["db", "db"]}, "names a VM twice"),
                     ({"boot_order": [{"vm": "db", "delay_seconds": -1}]}, "zero or more"),
                     ({"qemu": {"memory": 1}}, "unknown setting qemu.memory"),
                     ({"qemu": {"kernel": "vmlinuz"}}, "absolute path"),
                     ({"qemu": {"accel": "hvf"}}, "accel must be one of"),
                     ({"pre_scripts": ["'unclosed"]}, "does not split")):
        with pytest.raises(ConfigError, match=why):
            check_adapter_settings(bad)
