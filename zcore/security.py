"""Site identities, pairing and TLS for site-to-site links (and NBD when configured).

Each site owns a self-signed certificate and key made once (`SiteIdentity`).  Two sites
pair once: the recovery site issues a one-time token (`PairingTokens`); the protected
site connects in pairing mode (TLS without client certificate), names the token by its
id, and both sides prove knowledge of the token with an HMAC bound to both certificates'
fingerprints; the token itself is never sent, so a man in the middle presenting other
certificates cannot pair.  Each side then pins the other's
certificate (`PeerStore`); every later connection is mutual TLS against the pinned
certificates only.
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
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from zcore.errors import ConfigError, CorruptRecordError
from zcore.fsutil import atomic_write

SERVER_NAME = "zcore-site"  # TLS server name; certificates are pinned, not named
TOKEN_TTL = 3600.0


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
    def load_or_create(cls, directory: str | os.PathLike, name: str) -> SiteIdentity:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = directory / "site.json"
        if meta.exists():
            doc = json.loads(meta.read_text())
            return cls(directory, doc["site_id"], doc["name"],
                       (directory / "site.crt").read_text())
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
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        atomic_write(directory / "site.crt", cert_pem.encode())
        atomic_write(meta, json.dumps({"site_id": site_id, "name": name}).encode())
        return cls(directory, site_id, name, cert_pem)


@dataclass(frozen=True)
class Peer:
    site_id: str
    name: str
    cert_pem: str
    fingerprint: str


class PeerStore:
    """Certificates of paired sites, pinned by fingerprint (peers.json)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / "peers.json"
        self._lock = threading.Lock()

    def _load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        try:
            return json.loads(self.path.read_text())
        except ValueError as exc:
            raise CorruptRecordError(f"{self.path} is unreadable: {exc}") from None

    def add(self, site_id: str, name: str, cert_pem: str) -> Peer:
        fp = fingerprint(pem_to_der(cert_pem))
        with self._lock:
            peers = self._load()
            peers[fp] = {"site_id": site_id, "name": name, "cert": cert_pem}
            atomic_write(self.path, json.dumps(peers, indent=1).encode())
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

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / "pairing-tokens.json"
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list]:
        if not self.path.exists():
            return {}
        doc = json.loads(self.path.read_text())
        # entries of another shape (an older format) are no valid tokens
        return {k: v for k, v in doc.items() if isinstance(v, list) and len(v) == 2}

    def issue(self, ttl: float = TOKEN_TTL) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            tokens = {i: e for i, e in self._load().items() if e[1] > time.time()}
            tokens[token_id(token)] = [token_key(token), time.time() + ttl]
            atomic_write(self.path, json.dumps(tokens).encode())
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
            atomic_write(self.path, json.dumps(tokens).encode())
        return entry is not None and entry[1] > time.time()


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
