"""Site-to-site replication: the recovery-site server and the protected-site sender.

Sits between a VPG's bundle stream (zcore.vpg) and the recovery site's journals
(zcore.journal), over TLS on TCP (zcore.security, zcore.wire).  This package's
`__init__` is the public facade; the parts:

- recovery site: `recovery_site` (the listener, attach and ownership checks),
  `receiver` (one peer connection: the protocol, HELLO, PAIR, ATTACH, BUNDLE),
  `journals` (a site-wide pool of worker threads appending every VPG's bundles to its
  journals, each VPG in order; group commit, acks),
  `ownership` (owner.json);
- protected site: `protected_site` (pairing, one sender per VPG), `sender` (connect,
  attach, resume, ship bundles, reconnect with backoff), `throttle` (the site-wide
  bandwidth cap by priority);
- `status` (ReplicationState and ReplicationStatus) and `timing` (timeouts and limits,
  read at every use: assign to `zcore.replication.timing.PEER_TIMEOUT` etc. to change
  them).

Recovery site: `RecoverySite.start()` listens; a peer must complete TLS (pinned
certificate, or pairing mode with a one-time token) and HELLO before anything else is
read.  Bundles go to the site's journal workers (a bounded pool; one VPG is applied by
one worker at a time, in order), which append every VM part to its
journal (skipping records a journal already holds, so a resend is never applied twice),
commits all journals once per batch (group commit) and only then acknowledges the
batch's last seq.

Protected site: `ProtectedSite.protect(vpg, host, port)` runs a sender that connects,
attaches the VPG, resumes after the recovery site's durable seq, and ships bundles
through a site-wide throttle shared by priority.  A lost connection is retried with
backoff; if the buffer overflows meanwhile the VPG is in bitmap mode and a bitmap sync
runs when the link is back.  Before any bundle, a session may first run a delta sync
(reverse protection: `deltasend`, `deltarecv`) or, after an unclean protected-site
restart, a compare of the volumes with the journals' head views whose differing blocks
the VPG's bitmap sync then sends (docs/format.md 10.3, 10c.7).
"""

from __future__ import annotations

from zcore.replication import timing
from zcore.replication.journals import JournalWorkers, ReceiverStats, VPGReceiver
from zcore.replication.protected_site import ProtectedSite
from zcore.replication.receiver import RecoveryConnection
from zcore.replication.recovery_site import RecoverySite
from zcore.replication.sender import Replication
from zcore.replication.status import ReplicationState, ReplicationStatus
from zcore.replication.throttle import PRIORITY_WEIGHTS, Throttle

__all__ = [
    "PRIORITY_WEIGHTS",
    "JournalWorkers",
    "ProtectedSite",
    "ReceiverStats",
    "RecoveryConnection",
    "RecoverySite",
    "Replication",
    "ReplicationState",
    "ReplicationStatus",
    "Throttle",
    "VPGReceiver",
    "timing",
]
