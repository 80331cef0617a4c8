"""`LocalLink`: a VPG fed into its VMs' journals in the same process.

Sits where a replication link would (zcore.replication): it takes pending bundles,
appends each VM's part to that VM's journal, commits and acknowledges.  The whole
protected-to-journal path without a network, for tests and the demo.  A VPG restarted
after a crash (`VPG.resync_pending`) is compared with the journals' head views when the
link is made: in one process nothing needs hashing, the bytes are compared directly,
4 KiB at a time, and what differs is marked dirty for the bitmap sync.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from zcore.capture import ProtectedVolume
from zcore.errors import ConfigError, StateError, ZcoreError
from zcore.journal import HeadView, Journal
from zcore.vpg.core import ResyncReport
from zcore.vpg.group import VPG

COMPARE_CHUNK = 4 << 20  # bytes of each side read at once by the in-process compare
BLOCK = 4096

log = logging.getLogger("zcore.vpg")


class LocalLink:
    """Feeds a VPG's bundles into its VMs' journals in this process: the whole protected
    -to-journal path without a network (tests, the demo)."""

    def __init__(self, vpg: VPG, journals: dict[str, Journal]) -> None:
        missing = set(vpg.vms) - set(journals)
        if missing:
            raise ConfigError(f"no journal for VM(s) {sorted(missing)}")
        self.vpg = vpg
        self.journals = journals
        self.sent_seq = max((j.last_seq for j in journals.values()), default=0)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None
        if vpg.resync_pending:
            self.resync()

    @classmethod
    def create_journals(cls, vpg: VPG, root: str | os.PathLike[str]) -> dict[str, Journal]:
        """Open (or create) one journal per VM of `vpg` under `root/<vm>`."""
        out = {}
        for name in vpg.vms:
            path = Path(root) / name
            if (path / "journal.meta").exists():
                out[name] = Journal.open(path)
            else:
                out[name] = Journal.create(path, vpg.journal_volumes(name), vm=name,
                                           settings=vpg.settings.journal)
        return out

    def resync(self) -> ResyncReport | None:
        """Compare every volume with its journal's head view and mark the 4 KiB blocks
        that differ (`VPG.resync_differs`), then `VPG.resync_done`; a journal that cannot
        be read makes it `VPG.resync_failed` (every volume resent).  None when no
        compare is pending."""
        vpg = self.vpg
        if not vpg.resync_pending:
            return None
        t0 = time.perf_counter()
        compared = differing = 0
        try:
            for vm, journal in self.journals.items():
                journal.commit()
                head = journal.head_view()
                for vol in vpg.vms[vm].volumes:
                    differing += self._compare_volume(head, vol)
                    compared += vol.size
        except (ZcoreError, OSError) as exc:
            vpg.resync_failed(f"journal unreadable: {exc}")
            return None
        report = ResyncReport(volumes=len(vpg.volumes), compared_bytes=compared,
                              differing_bytes=differing, bytes_sent=0, bytes_received=0,
                              seconds=time.perf_counter() - t0)
        vpg.resync_done(report)
        return report

    def _compare_volume(self, head: HeadView, vol: ProtectedVolume) -> int:
        """Mark the blocks of `vol` (its backing store or source) unlike `head`'s; their
        bytes."""
        vid, size = vol.id, vol.size
        ours, theirs = bytearray(COMPARE_CHUNK), bytearray(COMPARE_CHUNK)
        differing = 0
        for start in range(0, size, COMPARE_CHUNK):
            n = min(COMPARE_CHUNK, size - start)
            a, b = memoryview(ours)[:n], memoryview(theirs)[:n]
            vol.read_into(start, a)
            head.read_into(vid, start, b)
            if a == b:
                continue
            pad = -n % BLOCK  # a volume's last block may be short (sizes are 512-multiples)
            x = np.frombuffer(bytes(a) + bytes(pad), dtype=np.uint8).reshape(-1, BLOCK)
            y = np.frombuffer(bytes(b) + bytes(pad), dtype=np.uint8).reshape(-1, BLOCK)
            for i in np.flatnonzero((x != y).any(axis=1)).tolist():
                offset = start + i * BLOCK
                length = min(BLOCK, size - offset)
                self.vpg.resync_differs(vid, offset, length)
                differing += length
        return differing

    @property
    def running(self) -> bool:
        """True between start() and stop(): a thread pumps bundles."""
        return self._thread is not None

    def pump(self, timeout: float = 0.0) -> int:
        """Deliver pending bundles (waiting up to `timeout` for one), commit, ack.
        Returns the number of bundles delivered; a compare the VPG asked for meanwhile
        (`VPG.resync_pending`) runs first."""
        if self.vpg.resync_pending:
            self.resync()
        bundles = self.vpg.wait_bundles(self.sent_seq, timeout)
        bundles = [b for b in bundles if b.first_seq > self.sent_seq]
        for b in bundles:
            for vm, part in b.parts.items():
                if part:
                    self.journals[vm].append_encoded(part)
            self.sent_seq = b.last_seq
        if bundles:
            for j in self.journals.values():
                j.commit()
            self.vpg.ack(self.sent_seq)
        return len(bundles)

    def start(self) -> None:
        def run() -> None:
            try:
                while not self._stop.is_set():
                    self.pump(timeout=0.05)
            except BaseException as exc:
                log.exception("local link of VPG %s failed", self.vpg.name)
                self.error = exc

        self._stop.clear()
        self._thread = threading.Thread(target=run, name=f"link-{self.vpg.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            raise StateError(f"local link failed: {self.error!r}") from self.error

    def drain(self, timeout: float = 30.0) -> int:
        """Seal and deliver everything captured so far (link thread stopped); returns the
        last seq the journals hold.

        It pumps while it seals: with nothing acknowledging them, bundles stop being sealed
        at the VPG's pending bound.  Done when the VPG streams, has sealed every captured
        seq and no sealed bundle is left undelivered."""
        vpg = self.vpg
        deadline = time.monotonic() + timeout
        while True:
            if vpg.seal_for_drain(self.sent_seq):
                return self.sent_seq
            if time.monotonic() > deadline:
                raise StateError(f"VPG {vpg.name} did not drain in {timeout} s "
                                 f"(mode {vpg.mode})")
            self.pump(timeout=0.005)
