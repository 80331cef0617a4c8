"""Timeouts and limits of site-to-site replication, read at every use by the recovery
site's connections and the protected site's senders, so tests and tools can shorten
them by assigning to this module's attributes (`zcore.replication.timing.PEER_TIMEOUT =
1.0`)."""

from __future__ import annotations

from zcore import wire

HEARTBEAT_INTERVAL = 1.0
PEER_TIMEOUT = 10.0  # no frame for this long: the connection is dead
# Data outstanding and no ack progress for this long, while nothing at all arrives from
# the peer (no heartbeat) or the send buffer does not drain: the link is stalled.  The
# sender declares it down once (the VPG folds once, then waits in bitmap mode) instead
# of counting it connected until PEER_TIMEOUT while the buffer overflows, folds and
# resyncs again and again (issue 9 finding 15: 8 folds in one 13 s drop).  Three missed
# heartbeats: well below PEER_TIMEOUT, well above a loaded recovery site's group commit.
STALL_TIMEOUT = 3.0
HANDSHAKE_TIMEOUT = 10.0
# Stop reading from a peer while this much received data waits for its journals.
RECEIVE_QUEUE_BYTES = 64 << 20
RECONNECT_BACKOFF = (0.05, 2.0)  # first and largest delay between connection attempts
# How often a disconnected sender checks whether its VPG overflowed into bitmap mode.
OUTAGE_POLL = 0.05
# Before HELLO, and on pairing connections, no bundle can be valid: binary frames are
# bounded to a heartbeat's size there, so an unauthenticated peer cannot make the server
# allocate (and wait for) a bundle-sized payload.
UNAUTHENTICATED_PAYLOAD = wire.HEARTBEAT_BODY.size
