"""The mirrors of a protected VPG whose volumes live in running QEMUs (zcore.hypervisor).

Sits in the site service beside its runtime: `MirrorKeeper` starts each disk's mirror
into the volume's capture export before the VPG's sync and sender start (so a sync reads
only what the mirror no longer misses), then watches them.  A mirror that ended (zcore's
link to QEMU broke, the target failed, QEMU restarted) is started again and the VPG told
to resend what QEMU's dirty bitmaps recorded meanwhile: the mirror first, then the marks,
so every write the mirror missed is in the bitmaps read.  Every `rotate_every` seconds
while the VPG streams, each disk gets a new bitmap generation, and the older ones are
dropped once the recovery site holds every write captured before it (clear-on-ack).
Every QMP call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from zcore.capture import ProtectedVolume
from zcore.errors import ZcoreError
from zcore.hypervisor import QemuDisk, QemuTarget
from zcore.vpg import VPG

log = logging.getLogger("zcore.site")


@dataclass
class DiskState:
    """What the site shows of one disk: `mirroring` (every write reaches zcore) or
    `tracking` (the mirror is down: QEMU's bitmap records the writes), and the last
    error."""

    vm: str
    volume: str
    node: str
    state: str = "tracking"
    error: str | None = None
    bitmap_generation: int = 0


class MirrorKeeper:
    """The mirrors of one VPG's QEMU-hosted volumes (see the module docstring)."""

    def __init__(self, vpg: VPG, target: Callable[[ProtectedVolume], QemuTarget], *,
                 interval: float = 1.0, rotate_every: float = 10.0) -> None:
        self.vpg = vpg
        self._target = target
        self.interval = interval
        self.rotate_every = rotate_every
        self.disks: dict[int, QemuDisk] = {}
        self.states: dict[int, DiskState] = {}
        for vid, vol in vpg.volumes.items():
            if isinstance(vol.source, QemuDisk):
                self.disks[vid] = vol.source
                self.states[vid] = DiskState(vol.vm, vol.name, vol.source.node)
        self._pending: tuple[dict[int, int], tuple[int, int]] | None = None
        self._rotated_at = 0.0
        self._task: asyncio.Task[None] | None = None

    # ---- blocking steps (worker threads) -------------------------------------------------

    def start_all(self, *, resync: bool) -> None:
        """Start every mirror; with `resync` (not a first start) the VPG then marks what
        the bitmaps hold, which covers what the guest wrote before the mirror.  Then the
        VPG's sync may begin (`VPG.start(hold_sync=True)` held it) once every mirror runs
        (else `step` releases it when they do): every block it reads from QEMU is read
        after the mirror forwards the block's later writes."""
        for vid in self.disks:
            self._start(vid)
        if resync:
            self.vpg.resync_from_sources("the mirrors started")
        self._release_when_mirrored()
        self._rotate()

    def _release_when_mirrored(self) -> None:
        """Let the VPG's sync (and a pending compare) begin once every disk is mirrored:
        before, its reads of a disk would miss the guest's later writes."""
        if self.vpg.sync_held and all(st.state == "mirroring"
                                      for st in self.states.values()):
            self.vpg.release_sync()

    def _start(self, vid: int) -> bool:
        disk, st = self.disks[vid], self.states[vid]
        try:
            disk.ensure_tracking()
            disk.start_mirror(self._target(self.vpg.volumes[vid]))
        except ZcoreError as exc:
            if st.state != "tracking" or st.error != str(exc):
                self.vpg.note(f"volume {st.vm}/{st.volume}: the mirror of node {st.node} "
                              f"cannot start ({exc}); QEMU's dirty bitmap tracks its writes")
            st.state, st.error = "tracking", str(exc)
            return False
        st.state, st.error = "mirroring", None
        return True

    def step(self) -> None:
        """One look at every mirror: restart what ended, rotate and release bitmaps."""
        restarted = []
        for vid, disk in self.disks.items():
            st = self.states[vid]
            try:
                state = disk.mirror_state()
            except ZcoreError as exc:
                reason = str(exc)
            else:
                if state.running:
                    continue
                reason = state.error or state.status
            if st.state == "mirroring":
                self.vpg.note(f"volume {st.vm}/{st.volume}: the mirror of node {st.node} "
                              f"ended ({reason}): QEMU's dirty bitmap tracks its writes")
                st.state, st.error = "tracking", reason
            if self._start(vid):
                restarted.append(st)
        if restarted:
            names = ", ".join(f"{s.vm}/{s.volume}" for s in restarted)
            self.vpg.resync_from_sources(f"the mirrors of {names} restarted")
            self._pending = None
        self._release_when_mirrored()
        self._release_or_rotate()

    def _release_or_rotate(self) -> None:
        if self._pending is not None:
            gens, mark = self._pending
            if self.vpg.source_mark_durable(mark):
                for vid, gen in gens.items():
                    try:
                        self.disks[vid].release(gen)
                    except ZcoreError as exc:
                        log.warning("VPG %s: dropping old bitmaps of %s: %s", self.vpg.name,
                                    self.states[vid].node, exc)
                self._pending = None
            else:
                now = self.vpg.source_mark()
                if now is None or now[1] != mark[1]:
                    self._pending = None  # folded since: a later generation goes instead
            return
        if time.monotonic() - self._rotated_at >= self.rotate_every:
            self._rotate()

    def _rotate(self) -> None:
        """A new bitmap generation on every mirrored disk, then the VPG's mark: every
        write not in the new generations was captured before the mark."""
        self._rotated_at = time.monotonic()
        if any(st.state != "mirroring" for st in self.states.values()) \
                or self.vpg.source_mark() is None:
            return  # not streaming: no mark the new generations could be dropped at
        gens: dict[int, int] = {}
        try:
            for vid, disk in self.disks.items():
                gens[vid] = disk.checkpoint()
                self.states[vid].bitmap_generation = gens[vid]
        except ZcoreError as exc:
            log.warning("VPG %s: a bitmap generation failed: %s", self.vpg.name, exc)
            return
        mark = self.vpg.source_mark()
        if mark is not None:
            self._pending = (gens, mark)

    def disk_states(self, syncing: bool) -> list[dict[str, object]]:
        """Each disk as the site's status shows it (`syncing`: the VPG resends now)."""
        return [{"vm": st.vm, "volume": st.volume, "node": st.node,
                 "state": "syncing" if syncing and st.state == "mirroring" else st.state,
                 "error": st.error, "bitmap_generation": st.bitmap_generation}
                for st in self.states.values()]

    def _guests(self) -> list[QemuDisk]:
        """One disk per QEMU (its QMP socket) of this VPG."""
        return list({disk.qmp_path: disk for disk in self.disks.values()}.values())

    def pause_guests(self) -> None:
        """Pause every QEMU of the VPG (no guest write after this); when one cannot be,
        those paused run again and the error says why."""
        paused: list[QemuDisk] = []
        try:
            for disk in self._guests():
                disk.pause_guest()
                paused.append(disk)
        except ZcoreError:
            for disk in paused:
                with contextlib.suppress(ZcoreError):  # the first error is the one to say
                    disk.resume_guest()
            raise
        names = ", ".join(sorted({st.vm for st in self.states.values()}))
        self.vpg.note(f"the VMs {names} are paused in QEMU: their disks take no more writes")

    def resume_guests(self) -> None:
        for disk in self._guests():
            disk.resume_guest()

    def stop_all(self, *, forget: bool = False) -> None:
        """End the mirrors (a clean stop: QEMU's bitmaps go on recording); with `forget`
        (the VPG is deleted), remove the bitmaps and exports too."""
        for vid, disk in self.disks.items():
            try:
                if forget:
                    disk.forget()
                else:
                    disk.stop_mirror()
            except ZcoreError as exc:
                log.warning("VPG %s: stopping the mirror of %s: %s", self.vpg.name,
                            self.states[vid].node, exc)
            disk.close()

    # ---- the watch task -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"mirrors-{self.vpg.name}")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.to_thread(self.step)
            except Exception:  # the watch must go on: it is what restarts the mirrors
                log.exception("VPG %s: watching its mirrors", self.vpg.name)

    async def stop(self, *, forget: bool = False) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await asyncio.to_thread(self.stop_all, forget=forget)
