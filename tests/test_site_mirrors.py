"""zcore.site.mirrors.MirrorKeeper against a fake QEMU disk and a fake VPG, both
recording what they are asked in one log: the mirrors start before the VPG's sync is
released, an ended mirror is started again before the VPG resyncs from the bitmaps, and
an older bitmap generation is dropped only once the VPG says the mark it was taken at is
durable (never after a fold)."""

from __future__ import annotations

from types import SimpleNamespace

from zcore.errors import HypervisorError
from zcore.hypervisor import MirrorState, QemuDisk, QemuTarget
from zcore.site.mirrors import MirrorKeeper


class FakeDisk(QemuDisk):
    """A QemuDisk without QEMU: generations counted, the mirror a flag."""

    def __init__(self, log: list[str]) -> None:  # no QMP probe
        self.node = "disk0"
        self.log = log
        self.gens = [1]
        self.running = False
        self.refuse: str | None = None  # start_mirror fails with this

    def ensure_tracking(self) -> int:
        return self.gens[-1]

    def start_mirror(self, target: QemuTarget) -> None:
        if self.refuse:
            self.log.append("start refused")
            raise HypervisorError(self.refuse)
        self.log.append(f"start {target.export}")
        self.running = True

    def mirror_state(self) -> MirrorState:
        return MirrorState(self.running, "ready" if self.running else "concluded",
                           None if self.running else "Input/output error")

    def checkpoint(self) -> int:
        self.gens.append(self.gens[-1] + 1)
        self.log.append(f"generation {self.gens[-1]}")
        return self.gens[-1]

    def release(self, below: int) -> int:
        self.log.append(f"release below {below}")
        gone = [g for g in self.gens if g < below]
        self.gens = [g for g in self.gens if g >= below]
        return len(gone)

    def stop_mirror(self) -> None:
        self.running = False

    def close(self) -> None:
        pass


class FakeVPG:
    """What MirrorKeeper uses of a VPG; `streaming`, `folds`, `acked` are set by tests."""

    name = "g"

    def __init__(self, disk: FakeDisk) -> None:
        self.log = disk.log
        self.volumes = {0: SimpleNamespace(vm="vm1", name="disk0", source=disk)}
        self.streaming = True
        self.sync_held = True  # VPG.start(hold_sync=True)
        self.next_seq, self.folds, self.acked = 10, 0, 0
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)

    def resync_from_sources(self, reason: str) -> None:
        self.log.append(f"resync: {reason}")

    def release_sync(self) -> None:
        self.sync_held = False
        self.log.append("sync released")

    def source_mark(self) -> tuple[int, int] | None:
        return (self.next_seq, self.folds) if self.streaming else None

    def source_mark_durable(self, mark: tuple[int, int]) -> bool:
        return self.streaming and mark[1] == self.folds and self.acked >= mark[0] - 1


def keeper(rotate_every: float = 3600.0) -> tuple[MirrorKeeper, FakeDisk, FakeVPG]:
    disk = FakeDisk([])
    vpg = FakeVPG(disk)
    k = MirrorKeeper(vpg, lambda vol: QemuTarget("127.0.0.1", 1, f"g/{vol.vm}/{vol.name}"),
                     rotate_every=rotate_every)  # type: ignore[arg-type]
    return k, disk, vpg


def test_mirrors_start_before_the_resync_and_the_sync_is_released_last():
    k, disk, vpg = keeper()
    vpg.streaming = False  # a restart's sync is held: no generation to add yet
    k.start_all(resync=True)
    assert disk.log == ["start g/vm1/disk0", "resync: the mirrors started", "sync released"]
    assert k.states[0].state == "mirroring" and disk.gens == [1]


def test_an_ended_mirror_is_started_again_before_the_vpg_resyncs():
    k, disk, vpg = keeper()
    vpg.streaming = False
    k.start_all(resync=False)
    disk.running = False  # the target failed: QEMU ended the job
    disk.log.clear()
    k.step()
    assert disk.log == ["start g/vm1/disk0", "resync: the mirrors of vm1/disk0 restarted"]
    assert "ended (Input/output error)" in vpg.notes[-1]
    disk.log.clear()
    k.step()  # it runs: nothing to do
    assert disk.log == []


def test_a_mirror_that_cannot_start_is_tracked_said_once_and_retried():
    k, disk, vpg = keeper()
    vpg.streaming = False
    disk.refuse = "no route to the site"
    k.start_all(resync=False)
    assert k.states[0].state == "tracking" and k.states[0].error == "no route to the site"
    k.step()
    assert len(vpg.notes) == 1 and "cannot start" in vpg.notes[0]
    assert not any(e.startswith("resync") for e in disk.log)  # nothing mirrors yet
    assert vpg.sync_held  # its reads would miss the guest's writes
    disk.refuse = None
    k.step()
    assert disk.log[-3:] == ["start g/vm1/disk0", "resync: the mirrors of vm1/disk0 restarted",
                             "sync released"]
    assert k.states[0].state == "mirroring"
    k.step()
    assert disk.log.count("sync released") == 1


def test_an_older_generation_is_dropped_only_once_its_mark_is_durable():
    k, disk, vpg = keeper(rotate_every=0.0)
    k.start_all(resync=False)  # streaming: generation 2, taken before mark (10, 0)
    assert disk.gens == [1, 2]
    vpg.acked = 8
    k.step()  # seq 9 is not at the recovery site yet
    assert disk.gens == [1, 2] and "release below 2" not in disk.log
    vpg.acked = 9
    k.step()
    assert disk.gens == [2] and disk.log[-1] == "release below 2"


def test_a_fold_after_the_mark_keeps_the_generations():
    k, disk, vpg = keeper(rotate_every=3600.0)
    k.start_all(resync=False)
    assert disk.gens == [1, 2]
    vpg.folds, vpg.acked = 1, 100  # the writes before the mark went into the bitmaps
    k.step()
    k.step()
    assert disk.gens == [1, 2] and not any(e.startswith("release") for e in disk.log)
