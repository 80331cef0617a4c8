"""Hypervisor adapters: the user's scripts (command adapter), boot plans with delays and
pre/post scripts, and real VMs booted by the qemu adapter on zcore's NBD exports (the kit
of tests/helpers/vm.py: a Debian kernel and a busybox initramfs, a few seconds under TCG)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from conftest import require_tool
from helpers.nbd import serving
from helpers.vm import (
    IGNORE_POWER_BUTTON,
    POWER_BUTTON,
    READY,
    VMKit,
    make_ext4_image,
    read_ext4_file,
    vm_kit,
)

from zcore import nbd
from zcore.adapters import (
    Accel,
    AdapterError,
    BootPlan,
    BootPlanError,
    BootStep,
    CommandAdapter,
    QemuAdapter,
    QemuConfig,
    Script,
    ScriptError,
    StepKind,
    StopMode,
    VMState,
)
from zcore.records import Checkpoint, CheckpointKind

BOOT_TIMEOUT = 90.0  # generous: TCG on a loaded 2-core machine


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def dies(pid: int, within: float = 5.0) -> bool:
    """The process is gone (or a zombie) within `within` seconds: a SIGKILL is delivered
    asynchronously, and a loaded machine takes a while to run the dying process."""
    deadline = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


# ---- the command adapter -----------------------------------------------------------------


def test_start_script_gets_the_vm_its_checkpoint_and_its_nbd_uris_in_its_environment(
        tmp_path: Path) -> None:
    out = tmp_path / "env"
    adapter = CommandAdapter(f"env | grep ^ZCORE_ > {out}", "true", "true",
                             env={"ZCORE_SITE_EXTRA": "x"})
    ckpt = Checkpoint(42, 42, 1_700_000_000_000_000_000, CheckpointKind.TAGGED, "before", True)
    uris = ["nbd://127.0.0.1:10809/vm1-boot", "nbd+unix:///vm1-data?socket=/run/z.sock"]
    adapter.start("vm1", uris, ckpt, timeout=10)
    env = read_env(out)
    assert env["ZCORE_VM"] == "vm1"
    assert env["ZCORE_CHECKPOINT"] == "42"
    assert env["ZCORE_CHECKPOINT_TAG"] == "before"
    assert env["ZCORE_CHECKPOINT_KIND"] == "tagged"
    assert env["ZCORE_CHECKPOINT_TIME_NS"] == str(ckpt.time_ns)
    assert env["ZCORE_NBD_URIS"] == " ".join(uris)
    assert env["ZCORE_NBD_COUNT"] == "2"
    assert [env["ZCORE_NBD_URI_0"], env["ZCORE_NBD_URI_1"]] == uris
    assert env["ZCORE_SITE_EXTRA"] == "x" and env["ZCORE_TIMEOUT"] == "10"


def test_failing_start_script_is_reported_with_its_name_exit_status_and_output(
        tmp_path: Path) -> None:
    script = tmp_path / "start-vm.sh"
    script.write_text("#!/bin/sh\necho 'hypervisor says: no such host'\necho oops >&2\n"
                      "exit 7\n")
    script.chmod(0o755)
    adapter = CommandAdapter([str(script)], "true", "true")
    with pytest.raises(ScriptError) as info:
        adapter.start("vm1", ["nbd://h/x"], "c1", timeout=10)
    err = info.value
    assert err.status == 7 and not err.timed_out
    assert err.script == str(script)
    assert "hypervisor says: no such host" in err.output and "oops" in err.output
    message = str(err)
    assert str(script) in message and "status 7" in message and "no such host" in message
    assert "vm1" in message


def test_script_past_its_timeout_is_killed_with_its_children_and_reported(
        tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    adapter = CommandAdapter(f"echo launching; sleep 60 & echo $! > {pidfile}; wait", "true",
                             "true")
    t0 = time.monotonic()
    with pytest.raises(ScriptError) as info:
        adapter.start("vm1", [], None, timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert info.value.timed_out and info.value.status is None
    assert "launching" in info.value.output and "timed out after 0.5 s" in str(info.value)
    assert dies(int(pidfile.read_text()))


def test_start_script_that_leaves_a_vm_process_behind_returns_at_once(tmp_path: Path) -> None:
    pidfile = tmp_path / "vm.pid"
    adapter = CommandAdapter(f"sleep 60 & echo $! > {pidfile}", "true", "true")
    t0 = time.monotonic()
    adapter.start("vm1", [], None, timeout=20)
    pid = int(pidfile.read_text())
    try:
        assert time.monotonic() - t0 < 10  # the background child holds no pipe of ours
        assert alive(pid)
    finally:
        os.kill(pid, 9)


def test_status_script_exit_status_says_running_or_stopped_and_anything_else_fails(
        tmp_path: Path) -> None:
    code = tmp_path / "code"
    adapter = CommandAdapter("true", "true", f"exit $(cat {code})")
    for status, state in (("0", VMState.RUNNING), ("3", VMState.STOPPED),
                          ("1", VMState.STOPPED)):
        code.write_text(status)
        assert adapter.status("vm1", timeout=10) is state
    code.write_text("9")
    with pytest.raises(ScriptError) as info:
        adapter.status("vm1", timeout=10)
    assert info.value.status == 9


def test_stop_script_is_told_whether_the_stop_is_graceful_or_forced(tmp_path: Path) -> None:
    out = tmp_path / "stops"
    adapter = CommandAdapter("true", f'echo "$ZCORE_VM $ZCORE_STOP_MODE" >> {out}', "true")
    adapter.stop("vm1", StopMode.GRACEFUL, timeout=10)
    adapter.stop("vm2", StopMode.FORCE, timeout=10)
    assert out.read_text().splitlines() == ["vm1 graceful", "vm2 force"]


def test_script_that_cannot_be_run_at_all_is_a_script_error(tmp_path: Path) -> None:
    adapter = CommandAdapter([str(tmp_path / "no-such-script")], "true", "true")
    with pytest.raises(ScriptError, match="could not be run") as info:
        adapter.start("vm1", [], None, timeout=10)
    assert info.value.status is None and str(tmp_path / "no-such-script") in str(info.value)


def test_vm_name_that_cannot_name_files_is_refused() -> None:
    adapter = CommandAdapter("true", "true", "true")
    with pytest.raises(ValueError, match="not usable"):
        adapter.start("../etc", [], None, timeout=10)


# ---- boot plans --------------------------------------------------------------------------


def logging_adapter(log: Path, fail_flag: Path | None = None) -> CommandAdapter:
    """A command adapter whose start script logs "start VM TIME" (and fails for the VM
    named in `fail_flag`, while that file exists)."""
    fail = (f'[ -f {fail_flag} ] && [ "$(cat {fail_flag})" = "$ZCORE_VM" ] && '
            'echo "cannot start $ZCORE_VM" && exit 4; ' if fail_flag else "")
    return CommandAdapter(f'{fail}echo "start $ZCORE_VM $(date +%s.%N)" >> {log}', "true",
                          "true")


def log_script(log: Path) -> Script:
    return Script(f'echo "$ZCORE_PHASE-script $ZCORE_VPG $ZCORE_CHECKPOINT '
                  f'$(date +%s.%N)" >> {log}')


def test_boot_plan_runs_pre_scripts_vms_in_boot_order_with_delays_then_post_scripts(
        tmp_path: Path) -> None:
    log = tmp_path / "log"
    plan = BootPlan(logging_adapter(log),
                    [BootStep("db", ("nbd://h/db",)), BootStep("app", ("nbd://h/app",), 0.4),
                     BootStep("web", ("nbd://h/web",), 0.2)],
                    checkpoint="c9", vpg="shop", operation="failover-test",
                    pre=[log_script(log)], post=[log_script(log)], default_timeout=10)
    report = plan.run()
    lines = [line.split() for line in log.read_text().splitlines()]
    assert [w[:2] for w in lines] == [["pre-script", "shop"], ["start", "db"],
                                      ["start", "app"], ["start", "web"],
                                      ["post-script", "shop"]]
    assert lines[0][2] == "c9"
    times = [float(w[-1]) for w in lines]
    assert times[2] - times[1] >= 0.4 and times[3] - times[2] >= 0.2
    assert report.started == ["db", "app", "web"] and report.failed is None
    assert [s.kind for s in report.steps] == [StepKind.PRE, *[StepKind.START] * 3,
                                              StepKind.POST]


def test_failing_boot_step_is_named_and_leaves_started_vms_running_until_resumed(
        tmp_path: Path) -> None:
    log, flag = tmp_path / "log", tmp_path / "fail"
    flag.write_text("app")
    plan = BootPlan(logging_adapter(log, flag),
                    [BootStep("db", ()), BootStep("app", ()), BootStep("web", ())],
                    checkpoint=None, vpg="shop", post=[log_script(log)], default_timeout=10)
    with pytest.raises(BootPlanError) as info:
        plan.run()
    err = info.value
    assert err.step.kind is StepKind.START and err.step.name == "app"
    assert err.report.started == ["db"]
    assert "cannot start app" in (err.step.error or "") and "left running: db" in str(err)
    assert isinstance(err.__cause__, ScriptError) and err.__cause__.status == 4
    assert [w.split()[1] for w in log.read_text().splitlines()] == ["db"]  # no web, no post
    flag.unlink()  # the user fixed the cause: continue from where it stopped
    report = plan.run(resume=err.report)
    assert report.started == ["db", "app", "web"]
    assert [w.split()[1] for w in log.read_text().splitlines()] == ["db", "app", "web",
                                                                   "shop"]


def test_failing_pre_script_starts_no_vm(tmp_path: Path) -> None:
    log = tmp_path / "log"
    plan = BootPlan(logging_adapter(log), [BootStep("db", ())], checkpoint=None,
                    pre=[Script("echo 'storage not ready'; exit 2")], default_timeout=10)
    with pytest.raises(BootPlanError) as info:
        plan.run()
    assert info.value.step.kind is StepKind.PRE and info.value.report.started == []
    assert "storage not ready" in str(info.value)
    assert not log.exists()


def test_script_without_its_own_timeout_is_killed_at_the_site_default(tmp_path: Path) -> None:
    plan = BootPlan(logging_adapter(tmp_path / "log"), [BootStep("db", ())], checkpoint=None,
                    post=[Script("sleep 30"), Script("true", timeout=5)], default_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(BootPlanError) as info:
        plan.run()
    assert time.monotonic() - t0 < 10
    cause = info.value.__cause__
    assert isinstance(cause, ScriptError) and cause.timed_out
    assert info.value.step.kind is StepKind.POST and info.value.report.started == ["db"]


def test_cancelled_operation_does_not_sit_out_a_boot_delay(tmp_path: Path) -> None:
    cancel = threading.Event()
    plan = BootPlan(logging_adapter(tmp_path / "log"),
                    [BootStep("db", ()), BootStep("app", (), delay=60)], checkpoint=None,
                    cancel=cancel, default_timeout=10)
    threading.Timer(0.3, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(BootPlanError, match="cancelled") as info:
        plan.run()
    assert time.monotonic() - t0 < 10 and info.value.report.started == ["db"]


def test_rollback_stops_what_a_failed_plan_left_running_in_reverse_order(
        tmp_path: Path) -> None:
    stops, flag = tmp_path / "stops", tmp_path / "fail"
    flag.write_text("c")
    adapter = logging_adapter(tmp_path / "log", flag)
    adapter.stop_command = f'echo "$ZCORE_VM" >> {stops}'
    plan = BootPlan(adapter, [BootStep(n, ()) for n in "abc"], checkpoint=None,
                    default_timeout=10)
    with pytest.raises(BootPlanError) as info:
        plan.run()
    assert plan.stop_started(info.value.report, StopMode.FORCE) == {}
    assert stops.read_text().split() == ["b", "a"] and info.value.report.started == []


# ---- the qemu adapter --------------------------------------------------------------------


def test_qemu_adapter_refuses_clearly_when_qemu_is_not_installed(tmp_path: Path) -> None:
    adapter = QemuAdapter(tmp_path, QemuConfig(binary="qemu-system-x86_64-not-installed"))
    with pytest.raises(AdapterError, match="is not installed"):
        adapter.start("vm1", ["nbd://127.0.0.1:1/disk"], None, timeout=10)
    assert adapter.status("vm1") is VMState.STOPPED


def test_drive_option_of_a_uri_with_a_comma_is_escaped_for_qemu(tmp_path: Path) -> None:
    adapter = QemuAdapter(tmp_path, QemuConfig(accel=Accel.TCG),
                          vms={"big": QemuConfig(memory_mib=4096, accel=Accel.TCG)})
    argv = adapter.command_line("vm1", ["nbd+unix:///d0?socket=/run/a,b.sock",
                                        "nbd://127.0.0.1:10809/d1"], "/run/q.sock")
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives[0].startswith("file=nbd+unix:///d0?socket=/run/a,,b.sock,format=raw,")
    assert drives[1].startswith("file=nbd://127.0.0.1:10809/d1,format=raw,")
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices == ["virtio-blk-pci,drive=disk0,bootindex=1",
                       "virtio-blk-pci,drive=disk1,bootindex=2"]
    assert argv[argv.index("-accel") + 1] == "tcg" and "-no-reboot" in argv
    assert argv[argv.index("-m") + 1] == "512"
    big = adapter.command_line("big", [], "/run/q.sock")
    assert big[big.index("-m") + 1] == "4096"


def test_qemu_that_cannot_reach_its_nbd_export_is_reported_with_qemus_log(
        tmp_path: Path) -> None:
    require_tool("qemu-system-x86_64")
    with serving([], tmp_path) as srv:
        uri = srv.uri("missing")
        adapter = QemuAdapter(tmp_path / "run")
        with pytest.raises(AdapterError, match="exited with status") as info:
            adapter.start("vm1", [uri], None, timeout=30)
    # QEMU's log, quoting zcore's NBD server, says which export it lacks
    assert "no export named 'missing'" in str(info.value)
    assert adapter.status("vm1") is VMState.STOPPED


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> VMKit:
    require_tool("qemu-system-x86_64")
    return vm_kit(tmp_path_factory.mktemp("vmkit"))


def wait_console(adapter: QemuAdapter, vm: str, marker: str,
                 timeout: float = BOOT_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = adapter.console_path(vm).read_text(errors="replace")
        if marker in text:
            return text
        if time.monotonic() > deadline or adapter.status(vm) is VMState.STOPPED:
            raise AssertionError(f"{marker!r} not on {vm}'s console:\n{text}\n"
                                 f"{adapter.log_path(vm).read_text()}")
        time.sleep(0.1)


GUEST_READS_AND_WRITES = """\
mount -t ext4 /dev/vda /mnt || echo GUEST-MOUNT-FAILED
echo "GUEST-READ: $(cat /mnt/notes/hello.txt)"
echo "recovered at $(cat /proc/uptime)" > /mnt/notes/from-guest.txt
umount /mnt && sync && echo GUEST-WROTE
sleep 600
"""


def test_guest_on_a_zcore_nbd_export_reads_and_writes_its_ext4_disk_and_powers_off_gracefully(
        kit: VMKit, tmp_path: Path) -> None:
    image = make_ext4_image(tmp_path / "disk.img", {"notes/hello.txt": b"written by the host"})
    config = kit.qemu_config(GUEST_READS_AND_WRITES, tmp_path)
    with serving([nbd.file_export(image, "vm1-disk0")], tmp_path) as srv:
        adapter = QemuAdapter(tmp_path / "run", config)
        adapter.start("vm1", [srv.uri("vm1-disk0")], "ckpt-1", timeout=BOOT_TIMEOUT)
        try:
            assert adapter.status("vm1") is VMState.RUNNING
            console = wait_console(adapter, "vm1", "GUEST-WROTE")
            assert READY in console and "GUEST-MOUNT-FAILED" not in console
            assert "GUEST-READ: written by the host" in console
            adapter.stop("vm1", StopMode.GRACEFUL, timeout=BOOT_TIMEOUT)
        finally:
            adapter.stop("vm1", StopMode.FORCE, timeout=10)
        assert adapter.status("vm1") is VMState.STOPPED
        assert POWER_BUTTON in adapter.console_path("vm1").read_text()
    assert read_ext4_file(image, "/notes/from-guest.txt").startswith(b"recovered at ")
    assert read_ext4_file(image, "/notes/hello.txt") == b"written by the host"


GUEST_IGNORES_THE_POWER_BUTTON = f"""\
{IGNORE_POWER_BUTTON}
echo GUEST-DEAF
sleep 600
"""


def test_guest_that_ignores_the_power_button_fails_a_graceful_stop_and_is_forced_off(
        kit: VMKit, tmp_path: Path) -> None:
    image = make_ext4_image(tmp_path / "disk.img", {})
    config = kit.qemu_config(GUEST_IGNORES_THE_POWER_BUTTON, tmp_path)
    with serving([nbd.file_export(image, "disk")], tmp_path) as srv:
        # a run directory whose QMP socket path is past sun_path's 107 bytes
        run_dir = tmp_path / ("long-" * 20) / "run"
        adapter = QemuAdapter(run_dir, config)
        adapter.start("vm1", [srv.uri("disk")], None, timeout=BOOT_TIMEOUT)
        try:
            wait_console(adapter, "vm1", "GUEST-DEAF")
            with pytest.raises(AdapterError, match="did not power off within 1 s"):
                adapter.stop("vm1", StopMode.GRACEFUL, timeout=1)
            assert adapter.status("vm1") is VMState.RUNNING
            with pytest.raises(AdapterError, match="already runs"):
                adapter.start("vm1", [srv.uri("disk")], None, timeout=BOOT_TIMEOUT)
            # a site service restarted meanwhile: a new adapter finds the VM by its files
            restarted = QemuAdapter(run_dir, config)
            assert restarted.status("vm1") is VMState.RUNNING
            t0 = time.monotonic()
            restarted.stop("vm1", StopMode.FORCE, timeout=10)
            assert time.monotonic() - t0 < 10
            assert restarted.status("vm1") is VMState.STOPPED
        finally:
            adapter.stop("vm1", StopMode.FORCE, timeout=10)
        assert adapter.status("vm1") is VMState.STOPPED
        assert POWER_BUTTON not in adapter.console_path("vm1").read_text()
