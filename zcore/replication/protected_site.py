"""The protected site's side of replication: `ProtectedSite` holds the site's identity
and its pinned recovery site (zcore.security), pairs with a recovery site once, and runs
one sender (zcore.replication.sender) per protected VPG through a shared throttle."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from zcore import wire
from zcore.errors import ConfigError, ProtocolError, StateError
from zcore.replication import timing
from zcore.replication.sender import FrameStream, Replication, close_writer
from zcore.replication.throttle import Throttle
from zcore.security import (
    SERVER_NAME,
    Peer,
    PeerStore,
    SiteIdentity,
    client_context,
    fingerprint,
    pairing_proof,
    pem_to_der,
    proofs_equal,
    token_id,
    token_key,
)
from zcore.vpg import VPG


class ProtectedSite:
    """The protected site's side: identity, pairing, and one sender per VPG."""

    def __init__(self, root: str | os.PathLike[str], name: str = "protected",
                 rate_limit_bytes: float | None = None) -> None:
        self.root = Path(root)
        self.identity = SiteIdentity.load_or_create(self.root / "site", name)
        self.peers = PeerStore(self.root / "site")
        self.throttle = Throttle(rate_limit_bytes)
        self.replications: dict[str, Replication] = {}

    def hello(self) -> bytes:
        return wire.client_hello("protected", self.identity.site_id, self.identity.name)

    def recovery_peer(self) -> Peer:
        peers = self.peers.all()
        if not peers:
            raise StateError("this site is not paired with a recovery site")
        return peers[0]

    async def pair(self, host: str, port: int, token: str) -> Peer:
        """Pair with the recovery site at host:port using its one-time token."""
        ctx = client_context(self.identity, None)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=SERVER_NAME), timing.HANDSHAKE_TIMEOUT)
        try:
            server_der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            server_fp = fingerprint(server_der)
            frames = FrameStream(reader)
            writer.write(self.hello())
            await asyncio.wait_for(frames.expect(wire.HELLO), timing.HANDSHAKE_TIMEOUT)
            key = token_key(token)  # the token itself never leaves this site
            writer.write(wire.control(
                wire.PAIR, token_id=token_id(token), cert=self.identity.cert_pem,
                proof=pairing_proof(key, "protected", server_fp, self.identity.fingerprint),
                site_id=self.identity.site_id, site_name=self.identity.name))
            msg = await asyncio.wait_for(frames.expect(wire.PAIRED), timing.HANDSHAKE_TIMEOUT)
            if fingerprint(pem_to_der(msg["cert"])) != server_fp:
                raise ProtocolError("PAIRED certificate differs from the TLS certificate")
            want = pairing_proof(key, "recovery", server_fp, self.identity.fingerprint)
            if not proofs_equal(want, msg["proof"]):
                raise ProtocolError("recovery site could not prove it knows the token")
            return self.peers.add(msg["site_id"], msg["site_name"], msg["cert"])
        finally:
            await close_writer(writer)

    def protect(self, vpg: VPG, host: str, port: int) -> Replication:
        """Start replicating a started VPG to the paired recovery site (call in the loop)."""
        if vpg.name in self.replications:
            raise ConfigError(f"VPG {vpg.name} is already replicated")
        rep = Replication(self, vpg, host, port)
        self.replications[vpg.name] = rep
        rep.start()
        return rep

    async def stop(self) -> None:
        for rep in self.replications.values():
            await rep.stop()
        self.replications.clear()
