"""`LocalLink`: a VPG fed into its VMs' journals in the same process.

Sits where a replication link would (zcore.replication): it takes pending bundles,
appends each VM's part to that VM's journal, commits and acknowledges.  The whole
protected-to-journal path without a network, for tests and the demo.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from zcore.errors import ConfigError, StateError
from zcore.journal import Journal
from zcore.vpg.group import VPG

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

    @property
    def running(self) -> bool:
        """True between start() and stop(): a thread pumps bundles."""
        return self._thread is not None

    def pump(self, timeout: float = 0.0) -> int:
        """Deliver pending bundles (waiting up to `timeout` for one), commit, ack.
        Returns the number of bundles delivered."""
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
