"""Pairing and mutual TLS between sites: a one-time token pairs two sites once; from then
on only pinned certificates get in.  Every refusal: wrong, reused, expired or missing
token, a proof not bound to the certificates, an unknown certificate, a certificate
issued by a pinned site but not itself pinned, a recovery site that is not the pinned
one, plaintext, a man in the middle, and a site claiming another site's id."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers.replication import (
    MiB,
    Model,
    fast_timeouts,
    make_vpg,
    verify_journals,
    wait_until,
)

from zcore import wire
from zcore.errors import CorruptRecordError, ProtocolError
from zcore.fsutil import read_state, write_state
from zcore.replication import ProtectedSite, RecoverySite
from zcore.security import (
    SERVER_NAME,
    PairingTokens,
    PeerStore,
    SiteIdentity,
    client_context,
    fingerprint,
    pairing_proof,
    pem_to_der,
    token_id,
    token_key,
)


def run(coro):
    async def main():
        with fast_timeouts():
            return await coro
    return asyncio.run(main())


async def _started(root: Path) -> tuple[RecoverySite, str, int]:
    rs = RecoverySite(root)
    host, port = await rs.start()
    return rs, host, port


async def _raw_pairing(host, port):
    """A pairing-mode TLS connection (no client certificate) that said HELLO."""
    reader, writer = await asyncio.open_connection(
        host, port, ssl=client_context(None, None), server_hostname=SERVER_NAME)  # type: ignore[arg-type]
    writer.write(wire.control(wire.HELLO, protocol=1, site_id="s", site_name="n",
                              role="protected"))
    parser = wire.FrameReader()
    frames: list[wire.Frame] = []
    while not frames:
        frames += parser.feed(await asyncio.wait_for(reader.read(65536), 5))
    assert frames[0].type == wire.HELLO
    return reader, writer


async def _closed(reader) -> None:
    try:
        while await asyncio.wait_for(reader.read(65536), 5):
            pass
    except (ConnectionError, ssl.SSLError):
        pass


# ---- pairing -------------------------------------------------------------------------------

def test_pairing_pins_each_site_on_the_other_and_replication_then_works(tmp_path):
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        ps = ProtectedSite(tmp_path / "ps", name="prod")
        try:
            peer = await ps.pair(host, port, rs.issue_pairing_token())
            assert peer.fingerprint == rs.identity.fingerprint
            assert peer.site_id == rs.identity.site_id
            pinned = rs.peers.get(ps.identity.fingerprint)
            assert pinned is not None and pinned.name == "prod"
            assert pinned.site_id == ps.identity.site_id
            vpg = make_vpg(tmp_path / "g", "g", {"vm1": [1 * MiB]})
            vpg.start()
            model = Model(vpg)
            rep = ps.protect(vpg, host, port)
            model.write(0, 0, b"x" * 4096)
            seq = vpg.checkpoint("one").seq
            await wait_until(lambda: vpg.acked_seq >= seq, 10, "the ack")
            assert verify_journals(rs, model) >= 1
            assert rep.sessions == 1
            await ps.stop()
            vpg.close()
        finally:
            await rs.stop()
    run(main())


def test_pairing_survives_restarts_of_both_sites(tmp_path):
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        await ProtectedSite(tmp_path / "ps").pair(host, port, rs.issue_pairing_token())
        await rs.stop()
        rs, host, port = await _started(tmp_path / "rs")  # reloads its pinned peers
        try:
            ps = ProtectedSite(tmp_path / "ps")
            vpg = make_vpg(tmp_path / "g", "g", {"vm1": [1 * MiB]})
            vpg.start()
            ps.protect(vpg, host, port)
            vpg.volumes[0].write(0, b"y" * 512)
            seq = vpg.checkpoint().seq
            await wait_until(lambda: vpg.acked_seq >= seq, 10, "the ack")
            await ps.stop()
            vpg.close()
        finally:
            await rs.stop()
    run(main())


@pytest.mark.parametrize("token", ["", "not-the-token", "A" * 32])
def test_wrong_token_is_refused_and_pins_nothing(tmp_path, token):
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        rs.issue_pairing_token()
        ps = ProtectedSite(tmp_path / "ps")
        try:
            with pytest.raises(ProtocolError, match="refused"):
                await ps.pair(host, port, token)
            assert any("token" in r for r in rs.refused), list(rs.refused)
            assert rs.peers.all() == [] and ps.peers.all() == []
        finally:
            await rs.stop()
    run(main())


def test_reused_token_is_refused(tmp_path):
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        token = rs.issue_pairing_token()
        try:
            await ProtectedSite(tmp_path / "a").pair(host, port, token)
            other = ProtectedSite(tmp_path / "b")
            with pytest.raises(ProtocolError, match="refused"):
                await other.pair(host, port, token)
            assert any("already used" in r for r in rs.refused), list(rs.refused)
            assert rs.peers.get(other.identity.fingerprint) is None
            assert len(rs.peers.all()) == 1
        finally:
            await rs.stop()
    run(main())


def test_expired_token_is_refused(tmp_path):
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        token = rs.issue_pairing_token(ttl=0.05)
        await asyncio.sleep(0.1)
        try:
            with pytest.raises(ProtocolError, match="refused"):
                await ProtectedSite(tmp_path / "ps").pair(host, port, token)
            assert any("expired" in r for r in rs.refused), list(rs.refused)
            assert rs.peers.all() == []
        finally:
            await rs.stop()
    run(main())


def test_tokens_are_stored_only_as_hashes(tmp_path):
    tokens = PairingTokens(tmp_path)
    token = tokens.issue()
    assert token not in (tmp_path / "pairing-tokens.json").read_text()


@pytest.mark.parametrize("drop", ["token", "token_id", "cert", "proof"])
def test_pair_message_missing_a_field_is_refused(tmp_path, drop):
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        rs.issue_pairing_token()
        ps = ProtectedSite(tmp_path / "ps")
        try:
            reader, writer = await _raw_pairing(host, port)
            msg = {"token": "t", "token_id": "i", "cert": ps.identity.cert_pem, "proof": "p",
                   "site_id": "x", "site_name": "y"}
            del msg[drop]
            writer.write(wire.control(wire.PAIR, **msg))
            await _closed(reader)
            writer.close()
            await wait_until(lambda: len(rs.refused) > 0, 5, "the refusal")
            assert rs.peers.all() == []
        finally:
            await rs.stop()
    run(main())


def test_pair_with_garbage_certificate_is_refused(tmp_path):
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        rs.issue_pairing_token()
        try:
            reader, writer = await _raw_pairing(host, port)
            writer.write(wire.control(wire.PAIR, token="t", token_id="i", cert="not a cert",
                                      proof="p", site_id="x", site_name="y"))
            await _closed(reader)
            await wait_until(lambda: len(rs.refused) > 0, 5, "the refusal")
            assert rs.peers.all() == []
        finally:
            await rs.stop()
    run(main())


def test_proof_made_for_another_certificate_is_refused(tmp_path):
    """A token holder cannot pin a certificate other than the one its proof names."""
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        ps = ProtectedSite(tmp_path / "ps")
        other = SiteIdentity.load_or_create(tmp_path / "other", "other")
        try:
            real = ps.pair  # pair as ps, but swap in another certificate after the proof
            orig = ps.identity

            class Swapped:
                def __getattr__(self, name):
                    return getattr(orig, name)
                cert_pem = other.cert_pem  # sent in PAIR; the proof names ps's fingerprint
            ps.identity = Swapped()  # type: ignore[assignment]
            with pytest.raises(ProtocolError, match="refused"):
                await real(host, port, rs.issue_pairing_token())
            assert any("proof" in r for r in rs.refused), list(rs.refused)
            assert rs.peers.all() == []
        finally:
            await rs.stop()
    run(main())


def test_pairing_connection_cannot_do_anything_but_pair(tmp_path):
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        try:
            for frame in (wire.control(wire.ATTACH, 1, vpg="g", vms=[], journal={}),
                          wire.heartbeat(1) + wire.control(wire.CLOSE, reason="x"),
                          wire.ack(1, 1)):
                n = len(rs.refused)
                reader, writer = await _raw_pairing(host, port)
                writer.write(frame)
                await _closed(reader)
                writer.close()
                await wait_until(lambda n=n: len(rs.refused) > n, 5, "the refusal")
                assert "pairing connection" in rs.refused[-1]
            assert rs.receivers == {}
        finally:
            await rs.stop()
    run(main())


# ---- mutual TLS ---------------------------------------------------------------------------

def test_unpaired_site_cannot_replicate(tmp_path):
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        paired = ProtectedSite(tmp_path / "ps")
        await paired.pair(host, port, rs.issue_pairing_token())
        # an unpaired site that somehow knows the recovery site's certificate
        stranger = ProtectedSite(tmp_path / "stranger")
        stranger.peers.add(rs.identity.site_id, "recovery", rs.identity.cert_pem)
        vpg = make_vpg(tmp_path / "g", "g", {"vm1": [1 * MiB]})
        vpg.start()
        try:
            rep = stranger.protect(vpg, host, port)
            vpg.volumes[0].write(0, b"z" * 512)
            await wait_until(lambda: rep.last_error, 5, "the refusal")
            await asyncio.sleep(0.3)
            assert not rep.connected and rep.sessions == 0
            assert vpg.acked_seq == 0
            assert rs.receivers == {} and not (rs.vpgs_dir / "g").exists()
        finally:
            await stranger.stop()
            vpg.close()
            await rs.stop()
    run(main())


def _leaf_signed_by(issuer_dir: Path, out_dir: Path) -> SiteIdentity:
    """An identity whose certificate is issued by the site at issuer_dir (whose own,
    pinned certificate is a CA certificate)."""
    issuer_key = serialization.load_pem_private_key((issuer_dir / "site.key").read_bytes(),
                                                    None)
    issuer = x509.load_pem_x509_certificate((issuer_dir / "site.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
            .issuer_name(issuer.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(issuer_key, hashes.SHA256()))
    ident = SiteIdentity.load_or_create(out_dir, "leaf")
    (out_dir / "site.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    (out_dir / "site.crt").write_text(pem)
    return SiteIdentity(ident.directory, ident.site_id, ident.name, pem)


def test_certificate_issued_by_a_pinned_site_but_not_itself_pinned_is_refused(tmp_path):
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        paired = ProtectedSite(tmp_path / "ps")
        await paired.pair(host, port, rs.issue_pairing_token())
        leaf = _leaf_signed_by(tmp_path / "ps" / "site", tmp_path / "leaf")
        try:
            ctx = client_context(leaf, rs.identity.cert_pem)
            ctx.load_verify_locations(cadata=rs.identity.cert_pem)
            try:
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ctx, server_hostname=SERVER_NAME)
            except (ssl.SSLError, ConnectionError):
                return  # refused during the handshake: fine too
            writer.write(wire.control(wire.HELLO, protocol=1, site_id="x", site_name="y",
                                      role="protected"))
            await _closed(reader)
            await wait_until(lambda: any("not pinned" in r for r in rs.refused), 5,
                             "the refusal")
            assert rs.receivers == {}
        finally:
            await rs.stop()
    run(main())


def test_protected_site_refuses_a_recovery_site_that_is_not_the_pinned_one(tmp_path):
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        ps = ProtectedSite(tmp_path / "ps")
        await ps.pair(host, port, rs.issue_pairing_token())
        await rs.stop()
        impostor, host2, port2 = await _started(tmp_path / "impostor")
        # the impostor even trusts the protected site's certificate
        impostor.peers.add(ps.identity.site_id, "ps", ps.identity.cert_pem)
        await impostor.stop()
        impostor, host2, port2 = await _started(tmp_path / "impostor")
        vpg = make_vpg(tmp_path / "g", "g", {"vm1": [1 * MiB]})
        vpg.start()
        try:
            rep = ps.protect(vpg, host2, port2)
            vpg.volumes[0].write(0, b"s" * 512)
            await wait_until(lambda: rep.last_error, 5, "the refusal")
            await asyncio.sleep(0.3)
            assert rep.sessions == 0 and vpg.acked_seq == 0
            assert "certificate" in rep.last_error.lower() or "SSL" in rep.last_error
            assert impostor.receivers == {}
        finally:
            await ps.stop()
            vpg.close()
            await impostor.stop()
    run(main())


def test_plaintext_client_is_refused(tmp_path):
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(wire.control(wire.HELLO, protocol=1, site_id="x", site_name="y",
                                      role="protected"))
            writer.write(wire.control(wire.PAIR, token="t", token_id="i", cert="c",
                                      proof="p"))
            data = b""
            try:
                while chunk := await asyncio.wait_for(reader.read(65536), 5):
                    data += chunk
            except ConnectionError:
                pass
            assert wire.MAGIC not in data
            assert rs.peers.all() == [] and rs.receivers == {}
        finally:
            await rs.stop()
    run(main())


# ---- a man in the middle of the pairing -------------------------------------------------

class PairingMitm:
    """A TLS-terminating relay between a pairing protected site and the real recovery
    site, presenting its own certificate.  If the PAIR message reveals the token, it
    pairs its own certificate with the recovery site and answers the victim as the
    recovery site; otherwise it can only relay the PAIR (bound to the wrong
    certificates) and the answer."""

    def __init__(self, root: Path, target: tuple[str, int]) -> None:
        self.identity = SiteIdentity.load_or_create(root, "mitm")
        self.target = target
        self.seen: dict | None = None
        self.stole = False

    async def start(self) -> tuple[str, int]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.identity.cert_path, self.identity.key_path)
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ctx)
        return self.server.sockets[0].getsockname()[:2]

    async def _frames(self, reader, parser, n=1):
        out: list[wire.Frame] = []
        while len(out) < n:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                raise ConnectionError("closed")
            out += parser.feed(data)
        return out

    async def _handle(self, reader, writer):
        try:
            parser = wire.FrameReader()
            await self._frames(reader, parser)  # HELLO
            writer.write(wire.control(wire.HELLO, protocol=1, site_id="m", site_name="m",
                                      role="recovery"))
            pair = (await self._frames(reader, parser))[0]
            msg = wire.parse_control(pair)
            self.seen = msg
            # to the real recovery site, in pairing mode
            rreader, rwriter = await asyncio.open_connection(
                *self.target, ssl=client_context(None, None),  # type: ignore[arg-type]
                server_hostname=SERVER_NAME)
            rparser = wire.FrameReader()
            rwriter.write(wire.control(wire.HELLO, protocol=1, site_id="m", site_name="m",
                                       role="protected"))
            await self._frames(rreader, rparser)
            real_fp = fingerprint(rwriter.get_extra_info("ssl_object").getpeercert(True))
            victim_fp = fingerprint(pem_to_der(msg["cert"]))
            token = msg.get("token")
            if isinstance(token, str) and token:
                rwriter.write(wire.control(
                    wire.PAIR, token=token, cert=self.identity.cert_pem,
                    proof=pairing_proof(token, "protected", real_fp, self.identity.fingerprint),
                    site_id="mitm", site_name="mitm"))
                answer = (await self._frames(rreader, rparser))[0]
                self.stole = answer.type == wire.PAIRED
                writer.write(wire.control(
                    wire.PAIRED, cert=self.identity.cert_pem,
                    proof=pairing_proof(token, "recovery", self.identity.fingerprint,
                                        victim_fp),
                    site_id="mitm", site_name="recovery"))
            else:  # relay the victim's PAIR and the answer
                rwriter.write(wire.frame(pair.type, pair.channel, pair.payload))
                answer = (await self._frames(rreader, rparser))[0]
                writer.write(wire.frame(answer.type, answer.channel, answer.payload))
            rwriter.close()
            await writer.drain()
        except (ConnectionError, TimeoutError, ssl.SSLError, ProtocolError):
            pass
        finally:
            writer.close()


def test_man_in_the_middle_of_the_pairing_learns_nothing_and_pins_nothing(tmp_path):
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        mitm = PairingMitm(tmp_path / "mitm", (host, port))
        mhost, mport = await mitm.start()
        victim = ProtectedSite(tmp_path / "ps")
        token = rs.issue_pairing_token()
        try:
            with pytest.raises(ProtocolError):
                await victim.pair(mhost, mport, token)
            assert mitm.seen is not None
            assert token not in json.dumps(mitm.seen), "the PAIR message reveals the token"
            assert not mitm.stole
            assert victim.peers.all() == []
            assert rs.peers.get(mitm.identity.fingerprint) is None
            # the token was not burnt by the relayed attempt: the real pairing works
            peer = await victim.pair(host, port, token)
            assert peer.fingerprint == rs.identity.fingerprint
        finally:
            mitm.server.close()
            await rs.stop()
    run(main())


# ---- identities -------------------------------------------------------------------------

def test_a_site_claiming_another_sites_id_cannot_take_over_its_vpg(tmp_path):
    """Ownership of a VPG follows the paired site: a second site (with its own token)
    that claims the owner's site id at pairing is refused, or at least cannot attach."""
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        owner = ProtectedSite(tmp_path / "owner")
        await owner.pair(host, port, rs.issue_pairing_token())
        vpg = make_vpg(tmp_path / "g", "g", {"vm1": [1 * MiB]})
        vpg.start()
        rep = owner.protect(vpg, host, port)
        vpg.volumes[0].write(0, b"o" * 4096)
        seq = vpg.checkpoint().seq
        await wait_until(lambda: vpg.acked_seq >= seq, 10, "the owner's ack")
        # a second site that claims to be the owner
        thief_dir = tmp_path / "thief"
        ProtectedSite(thief_dir)
        meta = thief_dir / "site" / "site.json"
        meta.write_text(json.dumps({"site_id": owner.identity.site_id, "name": "thief"}))
        thief = ProtectedSite(thief_dir)
        try:
            try:
                await thief.pair(host, port, rs.issue_pairing_token())
            except ProtocolError:
                assert any("site id" in r for r in rs.refused), list(rs.refused)
                return
            reader, writer = await asyncio.open_connection(
                host, port, ssl=client_context(thief.identity, rs.identity.cert_pem),
                server_hostname=SERVER_NAME)
            writer.write(thief.hello())
            writer.write(wire.control(wire.ATTACH, 1, **rep.attach_message()))
            await _closed(reader)
            assert rep.sessions == 1 and rep.connected, "the thief took over the VPG"
            assert any("belongs to another site" in r for r in rs.refused), list(rs.refused)
        finally:
            await owner.stop()
            vpg.close()
            await rs.stop()
    run(main())


def test_peer_store_pins_by_fingerprint(tmp_path):
    a = SiteIdentity.load_or_create(tmp_path / "a", "a")
    (tmp_path / "store").mkdir()
    store = PeerStore(tmp_path / "store")
    peer = store.add(a.site_id, a.name, a.cert_pem)
    assert peer.fingerprint == a.fingerprint
    assert store.get(a.fingerprint) == peer
    assert store.get("0" * 64) is None
    assert a.cert_pem in store.trust_bundle()


# ---- site state files (docs/format.md 10b) --------------------------------------------------

def _damages(path: Path) -> dict[str, bytes]:
    """Ways a site state file is found damaged on disk."""
    good = path.read_bytes()
    doc = json.loads(good)
    doc["crc32c"] ^= 1
    return {"empty": b"", "not_json": b"{not json", "torn": good[: len(good) // 2],
            "checksum_mismatch": json.dumps(doc).encode(), "a_list": b"[1, 2]",
            "deep": b"[" * 60_000}


def test_site_files_are_written_as_checked_state_files(tmp_path):
    identity = SiteIdentity.load_or_create(tmp_path, "a")
    PeerStore(tmp_path).add(identity.site_id, "a", identity.cert_pem)
    PairingTokens(tmp_path).issue()
    assert read_state(tmp_path / "site.json", "zcore-site", 1)["site_id"] == identity.site_id
    assert identity.fingerprint in read_state(tmp_path / "peers.json", "zcore-peers", 1)["peers"]
    assert len(read_state(tmp_path / "pairing-tokens.json", "zcore-pairing-tokens",
                          1)["tokens"]) == 1


def test_site_files_of_the_plain_json_layout_still_load(tmp_path):
    """Sites created before checked state files hold plain JSON: it still loads, and a
    file that is rewritten (peers, tokens) is rewritten as a checked file."""
    made = SiteIdentity.load_or_create(tmp_path / "other", "other")
    (tmp_path / "site.crt").write_text(made.cert_pem)
    (tmp_path / "site.json").write_text(json.dumps({"site_id": "abc", "name": "old"}))
    (tmp_path / "peers.json").write_text(json.dumps(
        {made.fingerprint: {"site_id": made.site_id, "name": "other", "cert": made.cert_pem}},
        indent=1))
    token = "old-token"
    (tmp_path / "pairing-tokens.json").write_text(json.dumps(
        {token_id(token): [token_key(token), time.time() + 60], "x": "older shape"}))
    identity = SiteIdentity.load_or_create(tmp_path, "ignored")
    assert (identity.site_id, identity.name, identity.cert_pem) == ("abc", "old", made.cert_pem)
    peers = PeerStore(tmp_path)
    assert peers.get(made.fingerprint).site_id == made.site_id
    tokens = PairingTokens(tmp_path)
    assert tokens.key_for(token_id(token)) == token_key(token)
    assert tokens.key_for("x") is None
    assert tokens.consume(token_id(token)) and not tokens.consume(token_id(token))
    assert read_state(tmp_path / "pairing-tokens.json", "zcore-pairing-tokens",
                      1)["tokens"] == {}
    peers.add("s2", "n2", SiteIdentity.load_or_create(tmp_path / "n2", "n2").cert_pem)
    assert len(read_state(tmp_path / "peers.json", "zcore-peers", 1)["peers"]) == 2


@pytest.mark.parametrize("damage", ["empty", "not_json", "torn", "checksum_mismatch",
                                    "a_list", "deep"])
@pytest.mark.parametrize("name", ["site.json", "peers.json", "pairing-tokens.json"])
def test_damaged_site_file_raises_corrupt_record_error_naming_it(tmp_path, name, damage):
    identity = SiteIdentity.load_or_create(tmp_path, "a")
    PeerStore(tmp_path).add(identity.site_id, "a", identity.cert_pem)
    PairingTokens(tmp_path).issue()
    path = tmp_path / name
    path.write_bytes(_damages(path)[damage])
    load = {"site.json": lambda: SiteIdentity.load_or_create(tmp_path, "a"),
            "peers.json": lambda: PeerStore(tmp_path).all(),
            "pairing-tokens.json": lambda: PairingTokens(tmp_path).key_for("x")}[name]
    with pytest.raises(CorruptRecordError, match=re.escape(name)):
        load()


@pytest.mark.parametrize("doc", [{"site_id": 5, "name": "a"}, {"name": "a"}])
def test_site_json_with_a_field_of_the_wrong_type_is_damage(tmp_path, doc):
    SiteIdentity.load_or_create(tmp_path, "a")
    write_state(tmp_path / "site.json", "zcore-site", 1, doc)  # a valid checksum
    with pytest.raises(CorruptRecordError, match="site_id"):
        SiteIdentity.load_or_create(tmp_path, "a")
    (tmp_path / "site.json").write_text(json.dumps(doc))  # the plain layout likewise
    with pytest.raises(CorruptRecordError, match="site_id"):
        SiteIdentity.load_or_create(tmp_path, "a")


def test_site_json_without_its_certificate_is_damage(tmp_path):
    SiteIdentity.load_or_create(tmp_path, "a")
    (tmp_path / "site.crt").unlink()
    with pytest.raises(CorruptRecordError, match=r"site\.crt"):
        SiteIdentity.load_or_create(tmp_path, "a")


def test_damaged_peers_file_refuses_a_connection_with_its_reason_not_a_traceback(tmp_path):
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        ps = ProtectedSite(tmp_path / "ps")
        try:
            await ps.pair(host, port, rs.issue_pairing_token())
            (tmp_path / "rs" / "site" / "peers.json").write_bytes(b"{torn")
            reader, writer = await asyncio.open_connection(
                host, port, ssl=client_context(ps.identity, rs.identity.cert_pem),
                server_hostname=SERVER_NAME)
            await _closed(reader)
            writer.close()
            await wait_until(lambda: len(rs.refused) > 0, 5, "the refusal")
            assert "peers.json" in rs.refused[-1], list(rs.refused)
            assert rs.receivers == {}
        finally:
            await rs.stop()
    run(main())


def test_damaged_token_file_refuses_the_pairing_with_its_reason_not_a_traceback(tmp_path):
    async def main():
        rs, host, port = await _started(tmp_path / "rs")
        token = rs.issue_pairing_token()
        (tmp_path / "rs" / "site" / "pairing-tokens.json").write_bytes(b'{"meta": 1}')
        ps = ProtectedSite(tmp_path / "ps")
        try:
            with pytest.raises(ProtocolError, match="refused"):
                await ps.pair(host, port, token)
            await wait_until(lambda: len(rs.refused) > 0, 5, "the refusal")
            assert "pairing-tokens.json" in rs.refused[-1], list(rs.refused)
            assert rs.peers.all() == [] and ps.peers.all() == []
        finally:
            await rs.stop()
    run(main())
