"""Attestation (ARCHITECTURE.md §6): platform key, enclave backends, evidence, verification, wrapping.

Remote attestation, as used by the model owner (model key) and the data owner (data key):

1. the verifier sends a fresh random nonce;
2. the enclave makes a fresh X25519 key pair for this session and returns *evidence*
   `{v, backend, role, nonce, ts, kx_pub, sign_pub, quote}` whose quote covers the measurement and
   `report_data = SHA-512("veilcam-evidence-v1\\0" ‖ msgpack[role, nonce, ts, kx_pub, sign_pub])`;
3. the verifier checks the quote signature (pinned platform key), the measurement allow-list, the
   role, the nonce (freshness) and the report_data binding, then wraps its secret to `kx_pub`
   (X25519 + HKDF-SHA256 + AES-256-GCM, HPKE-style: `wrap_secret`).

Local attestation (evaluation enclave ↔ key enclave) is the same with `kind="report"` quotes: in SGX an
EREPORT only the same CPU can check; in the simulation a platform-signed report.

Backends: `SimulatedBackend` (this file; a platform Ed25519 key file stands in for the CPU — no
hardware protection, logged at start) and `enclave_bridge.measured.gramine_backend.GramineBackend`
(`/dev/attestation`, DCAP quotes).

Why one module of ~460 lines: evidence format, quote verification and secret wrapping are one
protocol that both sides must read together; the simulated platform beside it is its test double.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclave_bridge.shared.errors import AttestationError, ConfigError, IntegrityError
from enclave_bridge.shared.keys import (
    b64d,
    b64e,
    fingerprint,
    raw_private_bytes,
    raw_public_bytes,
    read_json,
    verify_ed25519,
    write_private_json,
)
from enclave_bridge.shared.sealing import derive_sealing_key

log = logging.getLogger(__name__)

EVIDENCE_VERSION = 1
NONCE_BYTES = 32
ROLES = ("eval", "key")
_QUOTE_DOMAIN = b"veilcam-sim-quote-v1\0"
_EVIDENCE_DOMAIN = b"veilcam-evidence-v1\0"
_WRAP_DOMAIN = b"veilcam-wrap-v1|"


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


# ---------------------------------------------------------------------------------------------
# platform key (simulated CPU)
# ---------------------------------------------------------------------------------------------


class PlatformKey:
    """The simulated platform: an Ed25519 quote-signing key and a 32-byte sealing root secret.

    `veilcam platform init` creates it; verifiers pin `platform.pub`. Whoever can read
    `platform.key` can forge quotes and unseal state — that is exactly what SGX hardware prevents.
    """

    __slots__ = ("_secret", "_sign")

    def __init__(self, sign: Ed25519PrivateKey, secret: bytes) -> None:
        if len(secret) != 32:
            raise ConfigError("platform secret must be 32 bytes")
        self._sign, self._secret = sign, secret

    def __repr__(self) -> str:
        return f"PlatformKey(id={self.platform_id!r})"

    @classmethod
    def generate(cls) -> PlatformKey:
        return cls(Ed25519PrivateKey.generate(), os.urandom(32))

    @property
    def public(self) -> bytes:
        return raw_public_bytes(self._sign.public_key())

    @property
    def platform_id(self) -> str:
        return fingerprint(self.public)

    def sign(self, message: bytes) -> bytes:
        return self._sign.sign(message)

    def sealing_key(self, measurement: bytes) -> bytes:
        return derive_sealing_key(self._secret, measurement)

    def save(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write `platform.key` (0600) and `platform.pub` into `directory`."""
        d = Path(directory)
        key_path = write_private_json(
            d / "platform.key",
            {
                "type": "veilcam-platform-key",
                "v": 1,
                "sign": b64e(raw_private_bytes(self._sign)),
                "secret": b64e(self._secret),
            },
        )
        pub_path = save_platform_pub(d / "platform.pub", self.public)
        return key_path, pub_path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PlatformKey:
        doc = read_json(path, "platform key")
        if doc.get("type") != "veilcam-platform-key":
            raise ConfigError(f"{path}: not a veilcam platform key (run `veilcam platform init`)")
        sign, secret = b64d(doc.get("sign"), f"{path}: sign"), b64d(doc.get("secret"), f"{path}: secret")
        if len(sign) != 32:
            raise ConfigError(f"{path}: corrupted platform key")
        return cls(Ed25519PrivateKey.from_private_bytes(sign), secret)


def save_platform_pub(path: str | os.PathLike[str], public: bytes) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    import json

    doc = {"type": "veilcam-platform-pub", "v": 1, "pub": b64e(public), "id": fingerprint(public)}
    p.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return p


def load_platform_pub(path: str | os.PathLike[str]) -> bytes:
    """The pinned platform public key (32 bytes) from `platform.pub`."""
    doc = read_json(path, "platform public key")
    if doc.get("type") != "veilcam-platform-pub":
        raise ConfigError(f"{path}: not a veilcam platform public key")
    pub = b64d(doc.get("pub"), f"{path}: pub")
    if len(pub) != 32:
        raise ConfigError(f"{path}: platform public key must be 32 bytes")
    return pub


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------


class EnclaveBackend(Protocol):
    """What the enclave runtime needs from the TEE: identity, quotes/reports, sealing."""

    name: str
    insecure: bool

    def measurement(self) -> bytes: ...

    def quote(self, report_data: bytes, kind: str = "quote") -> bytes: ...

    def sealing_key(self) -> bytes: ...


class SimulatedBackend:
    """Software stand-in for SGX: quotes signed by the platform key file, sealing via HKDF.

    Gives *no* hardware protection: the host can read the platform key and this process's memory.
    """

    name = "simulated"
    insecure = True

    def __init__(self, platform: PlatformKey, measurement_hex: str, role: str) -> None:
        self._platform = platform
        self._measurement = bytes.fromhex(measurement_hex)
        if len(self._measurement) != 32:
            raise ConfigError("measurement must be 32 bytes (64 hex chars)")
        log.warning(
            "INSECURE simulated enclave backend (%s enclave, measurement %s, platform %s): no hardware "
            "isolation, memory and the platform key are readable by the host; for development only",
            role,
            measurement_hex[:16],
            platform.platform_id,
        )

    def measurement(self) -> bytes:
        return self._measurement

    def platform_public(self) -> bytes:
        """Public key of this platform: what local attestation checks reports against."""
        return self._platform.public

    def quote(self, report_data: bytes, kind: str = "quote") -> bytes:
        if len(report_data) != 64:
            raise ConfigError("report_data must be 64 bytes")
        if kind not in ("quote", "report"):
            raise ConfigError(f"unknown quote kind {kind!r}")
        body = msgpack.packb(
            {
                "v": 1,
                "kind": kind,
                "measurement": self._measurement,
                "report_data": report_data,
                "platform": self._platform.platform_id,
            },
            use_bin_type=True,
        )
        return msgpack.packb(
            {"body": body, "sig": self._platform.sign(_QUOTE_DOMAIN + body)}, use_bin_type=True
        )

    def sealing_key(self) -> bytes:
        return self._platform.sealing_key(self._measurement)


@dataclass(frozen=True, slots=True)
class QuoteBody:
    kind: str
    measurement: bytes
    report_data: bytes


def verify_simulated_quote(quote: bytes, platform_pub: bytes) -> QuoteBody:
    """Check a simulated quote's platform signature and structure."""
    try:
        outer = msgpack.unpackb(quote, raw=False)
        body_bytes, sig = outer["body"], outer["sig"]
        body = msgpack.unpackb(body_bytes, raw=False)
        kind, meas, rd = body["kind"], body["measurement"], body["report_data"]
    except (ValueError, TypeError, KeyError, msgpack.exceptions.UnpackException) as e:
        raise AttestationError(f"malformed quote ({type(e).__name__})") from e
    if not (isinstance(body_bytes, bytes) and isinstance(sig, bytes)):
        raise AttestationError("malformed quote")
    try:
        verify_ed25519(platform_pub, sig, _QUOTE_DOMAIN + body_bytes, "quote")
    except IntegrityError as e:
        raise AttestationError(
            "quote signature does not verify against the pinned platform key (bad signature or "
            "another platform)"
        ) from e
    if not (isinstance(meas, bytes) and len(meas) == 32 and isinstance(rd, bytes) and len(rd) == 64):
        raise AttestationError("malformed quote body")
    return QuoteBody(str(kind), meas, rd)


# ---------------------------------------------------------------------------------------------
# evidence
# ---------------------------------------------------------------------------------------------


def report_data_for(role: str, nonce: bytes, ts: float, kx_pub: bytes, sign_pub: bytes) -> bytes:
    """64-byte report_data binding the session key, signing key, role, nonce and time."""
    payload = msgpack.packb([role, nonce, float(ts), kx_pub, sign_pub], use_bin_type=True)
    return hashlib.sha512(_EVIDENCE_DOMAIN + payload).digest()


class SessionKey:
    """An enclave's ephemeral X25519 key for one attestation session; private part stays here."""

    __slots__ = ("_priv", "public")

    def __init__(self) -> None:
        self._priv = X25519PrivateKey.generate()
        self.public = raw_public_bytes(self._priv.public_key())

    def __repr__(self) -> str:
        return f"SessionKey(pub={fingerprint(self.public)})"

    def exchange(self, peer_pub: bytes) -> bytes:
        try:
            return self._priv.exchange(X25519PublicKey.from_public_bytes(peer_pub))
        except ValueError as e:
            raise IntegrityError("invalid X25519 peer key") from e


def make_evidence(
    backend: EnclaveBackend,
    role: str,
    nonce: bytes,
    session: SessionKey,
    sign_pub: bytes,
    kind: str = "quote",
) -> dict[str, Any]:
    """Build evidence for `nonce` (a remote verifier's or a local peer's challenge)."""
    if role not in ROLES:
        raise ConfigError(f"role must be one of {ROLES}")
    if not isinstance(nonce, bytes) or not 16 <= len(nonce) <= 64:
        raise AttestationError("nonce must be 16..64 bytes")
    ts = time.time()
    rd = report_data_for(role, nonce, ts, session.public, sign_pub)
    return {
        "v": EVIDENCE_VERSION,
        "backend": backend.name,
        "role": role,
        "nonce": nonce,
        "ts": ts,
        "kx_pub": session.public,
        "sign_pub": sign_pub,
        "quote": backend.quote(rd, kind),
    }


@dataclass(frozen=True, slots=True)
class VerifiedEnclave:
    """What a successful verification establishes."""

    measurement: str
    role: str
    kx_pub: bytes
    sign_pub: bytes
    backend: str
    ts: float

    @property
    def signer_id(self) -> str:
        return fingerprint(self.sign_pub)


class Verifier:
    """Checks evidence against a pinned platform key and a measurement allow-list.

    `allowed_measurements=None` accepts any measurement (used by `veilcam attest --show` only, to
    print it); provisioning always passes an allow-list.
    """

    def __init__(
        self,
        platform_pub: bytes,
        allowed_measurements: Iterable[str] | None,
        *,
        role: str | None = None,
        kind: str = "quote",
        max_age_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.platform_pub = platform_pub
        self.allowed = None if allowed_measurements is None else {m.lower() for m in allowed_measurements}
        self.role, self.kind, self.max_age_s, self._clock = role, kind, max_age_s, clock

    def verify(self, evidence: Mapping[str, Any], nonce: bytes | None) -> VerifiedEnclave:
        """Raise `AttestationError` unless the evidence is genuine, allowed, and fresh.

        Freshness: with `nonce`, the evidence must answer exactly that challenge; without (e.g.
        retained evidence read from MQTT) its timestamp must be within `max_age_s`.
        """
        try:
            v, backend, role, ev_nonce = (
                evidence["v"],
                evidence["backend"],
                evidence["role"],
                evidence["nonce"],
            )
            ts, kx_pub, sign_pub, quote = (
                evidence["ts"],
                evidence["kx_pub"],
                evidence["sign_pub"],
                evidence["quote"],
            )
        except (KeyError, TypeError) as e:
            raise AttestationError(f"malformed evidence: missing {e}") from e
        if v != EVIDENCE_VERSION:
            raise AttestationError(f"unsupported evidence version {v!r}")
        if not all(isinstance(b, bytes) for b in (ev_nonce, kx_pub, sign_pub, quote)) or not isinstance(
            ts, float
        ):
            raise AttestationError("malformed evidence: wrong field types")
        if backend != "simulated":
            raise AttestationError(
                f"backend {backend!r}: quote verification for SGX/DCAP is not available in this verifier"
            )
        body = verify_simulated_quote(quote, self.platform_pub)
        if body.kind != self.kind:
            raise AttestationError(f"expected a {self.kind}, got a {body.kind}")
        if body.report_data != report_data_for(role, ev_nonce, ts, kx_pub, sign_pub):
            raise AttestationError("report_data does not bind the presented keys/nonce (evidence tampered)")
        meas = body.measurement.hex()
        if self.role is not None and role != self.role:
            raise AttestationError(f"expected a {self.role!r} enclave, got {role!r}")
        if self.allowed is not None and meas not in self.allowed:
            raise AttestationError(f"measurement {meas} is not in the allow-list")
        if nonce is not None:
            if ev_nonce != nonce:
                raise AttestationError("evidence answers another nonce (stale or replayed evidence)")
        elif abs(self._clock() - ts) > self.max_age_s:
            raise AttestationError(f"evidence is {self._clock() - ts:.0f} s old (max {self.max_age_s:.0f} s)")
        return VerifiedEnclave(meas, role, kx_pub, sign_pub, backend, ts)


# ---------------------------------------------------------------------------------------------
# HPKE-style secret wrapping
# ---------------------------------------------------------------------------------------------


def _wrap_key(shared: bytes, epk: bytes, rpk: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + rpk, info=_WRAP_DOMAIN + info).derive(shared)


def wrap_secret(recipient_pub: bytes, secret: bytes, info: bytes, aad: bytes = b"") -> dict[str, bytes]:
    """Encrypt `secret` to an X25519 public key: ephemeral ECDH → HKDF-SHA256 → AES-256-GCM."""
    eph = X25519PrivateKey.generate()
    epk = raw_public_bytes(eph.public_key())
    try:
        shared = eph.exchange(X25519PublicKey.from_public_bytes(recipient_pub))
    except ValueError as e:
        raise AttestationError("invalid recipient X25519 key") from e
    nonce = os.urandom(12)
    ct = AESGCM(_wrap_key(shared, epk, recipient_pub, info)).encrypt(nonce, secret, aad)
    return {"epk": epk, "nonce": nonce, "ct": ct}


def unwrap_secret(
    exchange: Callable[[bytes], bytes],
    own_pub: bytes,
    wrapped: Mapping[str, Any],
    info: bytes,
    aad: bytes = b"",
) -> bytes:
    """Inverse of `wrap_secret`; `exchange` is the recipient's X25519 (SessionKey/PartyKey)."""
    try:
        epk, nonce, ct = wrapped["epk"], wrapped["nonce"], wrapped["ct"]
    except (KeyError, TypeError) as e:
        raise IntegrityError("malformed wrapped key") from e
    if not (isinstance(epk, bytes) and len(epk) == 32 and isinstance(nonce, bytes) and isinstance(ct, bytes)):
        raise IntegrityError("malformed wrapped key")
    try:
        return AESGCM(_wrap_key(exchange(epk), epk, own_pub, info)).decrypt(nonce, ct, aad)
    except (InvalidTag, ValueError) as e:
        raise IntegrityError("wrapped key does not open with this key") from e


def evidence_to_json(evidence: Mapping[str, Any]) -> dict[str, Any]:
    """Printable form (bytes → hex) for `veilcam attest` output."""
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in evidence.items()}


__all__ = [
    "NONCE_BYTES",
    "EnclaveBackend",
    "PlatformKey",
    "SessionKey",
    "SimulatedBackend",
    "VerifiedEnclave",
    "Verifier",
    "evidence_to_json",
    "load_platform_pub",
    "make_evidence",
    "new_nonce",
    "report_data_for",
    "save_platform_pub",
    "unwrap_secret",
    "verify_simulated_quote",
    "wrap_secret",
]
