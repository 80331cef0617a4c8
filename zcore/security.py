"""Site identities, pairing and TLS for site-to-site links (and NBD when configured).

Each site owns a self-signed certificate and key made once (`SiteIdentity`).  Two sites
pair once: the recovery site issues a one-time token (`PairingTokens`); the protected
site connects in pairing mode (TLS without client certificate), names the token by its
id, and both sides prove knowledge of the token with an HMAC bound to both certificates'
fingerprints; the token itself is never sent, so a man in the middle presenting other
certificates cannot pair.  Each side then pins the other's
certificate (`PeerStore`); every later connection is mutual TLS against the pinned
certificates only.

The site's state files (site.json, peers.json, pairing-tokens.json, and the recovery
site's owner.json per VPG) are checked state files (zcore.fsutil.write_state,
docs/format.md 10b); `read_site_state` also reads the plain-JSON layout written before.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from zcore.errors import ConfigError, CorruptRecordError
from zcore.fsutil import atomic_write, read_state, write_all, write_state

SERVER_NAME = "zcore-site"  # TLS server name; certificates are pinned, not named
TOKEN_TTL = 3600.0

# checked state files of a site (docs/format.md 10b): format names, and the version
SITE_FORMAT = "zcore-site"
PEERS_FORMAT = "zcore-peers"
TOKENS_FORMAT = "zcore-pairing-tokens"
SITE_STATE_VERSION = 1


def read_site_state(path: Path, fmt: str,
                    plain: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """The `meta` of the site state file `path`: a checked state file of format `fmt`
    (fsutil.read_state), or the plain-JSON layout written before checked files, which
    `plain` decodes (raising `CorruptRecordError` for a document of another shape).
    Damage raises `CorruptRecordError` naming the file, a version this build does not
    know `FormatVersionError`, a missing file `FileNotFoundError`."""
    raw = path.read_bytes()
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CorruptRecordError(f"{path} is unreadable: {exc}") from None
    if isinstance(doc, dict) and ("meta" in doc or "crc32c" in doc):
        # no plain layout has these keys.  Reread: the file is replaced atomically, so
        # both reads see a whole file
        return read_state(path, fmt, SITE_STATE_VERSION)
    return plain(doc)


def state_str(doc: Any, key: str, path: Path) -> str:
    """`doc[key]`, which a site state file must hold as a string."""
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, str):
        raise CorruptRecordError(f"{path} lacks a valid {key!r}")
    return value


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, hex."""
    return hashlib.sha256(der).hexdigest()


def pem_to_der(pem: str) -> bytes:
    try:
        return x509.load_pem_x509_certificate(pem.encode()).public_bytes(
            serialization.Encoding.DER)
    except ValueError:
        raise ConfigError("not a PEM certificate") from None


@dataclass(frozen=True)
class SiteIdentity:
    """This site's id, name, certificate and key (files under `directory`)."""

    directory: Path
    site_id: str
    name: str
    cert_pem: str

    @property
    def cert_path(self) -> Path:
        return self.directory / "site.crt"

    @property
    def key_path(self) -> Path:
        return self.directory / "site.key"

    @property
    def fingerprint(self) -> str:
        return fingerprint(pem_to_der(self.cert_pem))

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str], name: str) -> SiteIdentity:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = directory / "site.json"
        if meta.exists():
            return cls._load(directory, meta)
        site_id = uuid.uuid4().hex
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, f"zcore site {name}"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, site_id),
        ])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        fd = os.open(directory / "site.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, key_pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        atomic_write(directory / "site.crt", cert_pem.encode())  # its fsync_dir covers the key
        # site.json last: its presence says the key and certificate are complete
        write_state(meta, SITE_FORMAT, SITE_STATE_VERSION, {"site_id": site_id, "name": name})
        return cls(directory, site_id, name, cert_pem)

    @classmethod
    def _load(cls, directory: Path, meta_path: Path) -> SiteIdentity:
        # both layouts hold {"site_id", "name"}: the plain one as the whole document
        meta = read_site_state(meta_path, SITE_FORMAT, lambda doc: doc)
        site_id, name = state_str(meta, "site_id", meta_path), state_str(meta, "name", meta_path)
        cert_path = directory / "site.crt"
        try:
            cert_pem = cert_path.read_text()
            pem_to_der(cert_pem)
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            raise CorruptRecordError(f"{cert_path} (the certificate of site {name}) is "
                                     f"missing or unreadable: {exc}") from None
        return cls(directory, site_id, name, cert_pem)


@dataclass(frozen=True)
class Peer:
    site_id: str
    name: str
    cert_pem: str
    fingerprint: str


class PeerStore:
    """Certificates of paired sites, pinned by fingerprint (peers.json)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / "peers.json"
        self._lock = threading.Lock()

    def _load(self) -> dict[str, dict[str, str]]:
        """{fingerprint: {"site_id", "name", "cert"}}; damage raises CorruptRecordError."""
        try:
            # the plain layout is that mapping as the whole document
            meta = read_site_state(self.path, PEERS_FORMAT, lambda doc: {"peers": doc})
        except FileNotFoundError:
            return {}
        peers = meta.get("peers")
        if not isinstance(peers, dict):
            raise CorruptRecordError(f"{self.path} lacks a valid 'peers'")
        for entry in peers.values():
            for key in ("site_id", "name", "cert"):
                state_str(entry, key, self.path)
        return peers

    def add(self, site_id: str, name: str, cert_pem: str) -> Peer:
        fp = fingerprint(pem_to_der(cert_pem))
        with self._lock:
            peers = self._load()
            peers[fp] = {"site_id": site_id, "name": name, "cert": cert_pem}
            write_state(self.path, PEERS_FORMAT, SITE_STATE_VERSION, {"peers": peers})
        return Peer(site_id, name, cert_pem, fp)

    def get(self, fp: str) -> Peer | None:
        doc = self._load().get(fp)
        return Peer(doc["site_id"], doc["name"], doc["cert"], fp) if doc else None

    def all(self) -> list[Peer]:
        return [Peer(d["site_id"], d["name"], d["cert"], fp) for fp, d in self._load().items()]

    def trust_bundle(self) -> str:
        return "".join(p.cert_pem for p in self.all())


class PairingTokens:
    """One-time pairing tokens.  A token never travels: the protected site sends its id
    and proves knowledge of it with an HMAC keyed by a second one-way derivation
    (`token_id`, `token_key`), so a man in the middle of the pairing TLS session learns
    nothing it can pair with.  Only the id and key derivations are stored; each token
    expires and is consumed by its first successful use."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / "pairing-tokens.json"
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list[Any]]:
        """{token id: [proof key, expiry (epoch seconds)]}; damage raises
        CorruptRecordError."""
        try:
            meta = read_site_state(self.path, TOKENS_FORMAT, _plain_tokens(self.path))
        except FileNotFoundError:
            return {}
        tokens = meta.get("tokens")
        if not isinstance(tokens, dict) or not all(
                _token_entry(e) for e in tokens.values()):
            raise CorruptRecordError(f"{self.path} lacks valid 'tokens'")
        return tokens

    def _save(self, tokens: dict[str, list[Any]]) -> None:
        write_state(self.path, TOKENS_FORMAT, SITE_STATE_VERSION, {"tokens": tokens})

    def issue(self, ttl: float = TOKEN_TTL) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            tokens = {i: e for i, e in self._load().items() if e[1] > time.time()}
            tokens[token_id(token)] = [token_key(token), time.time() + ttl]
            self._save(tokens)
        return token

    def key_for(self, tid: str) -> str | None:
        """The proof key of the valid, unexpired token with id `tid` (not consumed)."""
        with self._lock:
            entry = self._load().get(tid)
        if entry is None or entry[1] <= time.time():
            return None
        return str(entry[0])

    def consume(self, tid: str) -> bool:
        """True (once) for the valid, unexpired token with id `tid`."""
        with self._lock:
            tokens = self._load()
            entry = tokens.pop(tid, None)
            self._save(tokens)
        return entry is not None and entry[1] > time.time()


def _token_entry(entry: Any) -> bool:
    """True for a [proof key, expiry] token entry."""
    return (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
            and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool))


def _plain_tokens(path: Path) -> Callable[[Any], dict[str, Any]]:
    """The decoder of the plain token layout: {token id: [key, expiry]} as the whole
    document; entries of another shape (an even older format) are no valid tokens."""
    def decode(doc: Any) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise CorruptRecordError(f"{path} is not a token table")
        return {"tokens": {k: v for k, v in doc.items() if _token_entry(v)}}
    return decode


def token_id(token: str) -> str:
    """The public id of a pairing token (names it in PAIR; reveals nothing of it)."""
    return hashlib.sha256(b"zcore-pairing-id|" + token.encode()).hexdigest()


def token_key(token: str) -> str:
    """The secret a pairing proof is keyed by, derived one-way from the token."""
    return hashlib.sha256(b"zcore-pairing-key|" + token.encode()).hexdigest()


def pairing_proof(key: str, role: str, server_fp: str, client_fp: str) -> str:
    """HMAC proving knowledge of a token (`key` = token_key(token)), bound to both
    certificates and the role."""
    msg = f"zcore-pairing|{role}|{server_fp}|{client_fp}".encode()
    return hmac.new(key.encode(), msg, hashlib.sha256).hexdigest()


def proofs_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _base_context(purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH
                         else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(identity: SiteIdentity, peers: PeerStore) -> ssl.SSLContext:
    """The server context: a client presenting a certificate must present a pinned one
    (mutual TLS); a client presenting none is in pairing mode, where only a PAIR message
    with a valid one-time token is accepted.  Pin newly paired peers with `trust`."""
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    bundle = peers.trust_bundle()
    if bundle:
        ctx.load_verify_locations(cadata=bundle)
    return ctx


def trust(ctx: ssl.SSLContext, cert_pem: str) -> None:
    """Add a newly pinned peer certificate to a live server context."""
    ctx.load_verify_locations(cadata=cert_pem)


def client_context(identity: SiteIdentity, peer_cert_pem: str | None) -> ssl.SSLContext:
    """Client context: mutual TLS with the pinned server certificate, or (peer None) the
    pairing mode: no client certificate, server certificate checked by the pairing proof."""
    ctx = _base_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    if peer_cert_pem is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_cert_chain(identity.cert_path, identity.key_path)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=peer_cert_pem)
    return ctx
