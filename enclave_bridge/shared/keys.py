"""Key objects and key files for every party (docs/ARCHITECTURE.md §6).

Raw key bytes live only inside these objects; callers encrypt, decrypt, sign and wrap through
methods, so a key never ends up in a log line, an f-string or a queue message by accident
(`repr()` shows the kid/fingerprint only). Key files are JSON with mode 0600; with a passphrase the
secret part is encrypted under AES-256-GCM with a scrypt-derived key.

Party keys (`veilcam keygen --role …`) hold an Ed25519 signing key (policy signatures) and an X25519
key (receiving wrapped alert keys); the data owner's AES window key is a separate `DataKey` file so
the capture host can hold it without the owner's signing key.

Why one module of ~400 lines: every key file format (data, model, party keys, passphrase protection)
in one place, so formats stay consistent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from enclave_bridge.shared.errors import ConfigError, IntegrityError

log = logging.getLogger(__name__)

KEY_BYTES = 32
ROLES = ("data-owner", "model-owner", "consumer")
_SCRYPT_N = 2**15
_FILE_VERSION = 1


def b64e(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def b64d(s: Any, what: str) -> bytes:
    if not isinstance(s, str):
        raise ConfigError(f"{what}: expected a base64 string")
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise ConfigError(f"{what}: not valid base64") from e


def fingerprint(public: bytes) -> str:
    """Short stable id of a public key (recipient ids, kids of signing keys)."""
    return hashlib.sha256(public).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# key files
# ---------------------------------------------------------------------------------------------


def _protect(secret: bytes, passphrase: str | None) -> dict[str, Any]:
    if passphrase is None:
        return {"enc": "none", "secret": b64e(secret)}
    salt = os.urandom(16)
    kek = Scrypt(salt=salt, length=32, n=_SCRYPT_N, r=8, p=1).derive(passphrase.encode())
    nonce = os.urandom(12)
    ct = AESGCM(kek).encrypt(nonce, secret, b"veilcam-keyfile")
    return {
        "enc": "scrypt-aes256gcm",
        "salt": b64e(salt),
        "n": _SCRYPT_N,
        "nonce": b64e(nonce),
        "secret": b64e(ct),
    }


def _unprotect(doc: dict[str, Any], passphrase: str | None, path: Path) -> bytes:
    enc = doc.get("enc")
    if enc == "none":
        return b64d(doc.get("secret"), f"{path}: secret")
    if enc != "scrypt-aes256gcm":
        raise ConfigError(f"{path}: unknown key protection {enc!r}")
    if passphrase is None:
        raise ConfigError(f"{path}: key file is passphrase-protected; give --passphrase-file or env")
    n = doc.get("n")
    if not isinstance(n, int) or n < 2**10 or n > 2**22:
        raise ConfigError(f"{path}: bad scrypt parameter")
    salt = b64d(doc.get("salt"), f"{path}: salt")
    kek = Scrypt(salt=salt, length=32, n=n, r=8, p=1).derive(passphrase.encode())
    try:
        return AESGCM(kek).decrypt(
            b64d(doc.get("nonce"), f"{path}: nonce"),
            b64d(doc.get("secret"), f"{path}: secret"),
            b"veilcam-keyfile",
        )
    except InvalidTag as e:
        raise ConfigError(f"{path}: wrong passphrase or corrupted key file") from e


def write_private_json(path: str | os.PathLike[str], doc: dict[str, Any]) -> Path:
    """Write `doc` to `path` with mode 0600 from the start (never world-readable, not even briefly)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, p)
    return p


def read_json(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{p}: {kind} file not found") from e
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: cannot read {kind} file ({type(e).__name__})") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: {kind} file is not a JSON object")
    return doc


def _check_kind(doc: dict[str, Any], kind: str, path: Path) -> None:
    if doc.get("type") != kind:
        raise ConfigError(f"{path}: expected a {kind} file, found {doc.get('type')!r}")
    if doc.get("v") != _FILE_VERSION:
        raise ConfigError(f"{path}: unsupported {kind} file version {doc.get('v')!r}")


def resolve_passphrase(passphrase_file: str | None, env: str = "VEILCAM_PASSPHRASE") -> str | None:
    """Passphrase from a file (first line) or an environment variable — never from argv."""
    if passphrase_file:
        try:
            return Path(passphrase_file).read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError) as e:
            raise ConfigError(f"{passphrase_file}: cannot read passphrase") from e
    return os.environ.get(env) or None


# ---------------------------------------------------------------------------------------------
# symmetric keys
# ---------------------------------------------------------------------------------------------


class SymmetricKey:
    """A 32-byte AES-256-GCM key with an id. Base of the data key and the model key."""

    __slots__ = ("_aead", "_raw", "kid")
    _type = "symmetric-key"

    def __init__(self, raw: bytes, kid: str) -> None:
        if not isinstance(raw, bytes | bytearray) or len(raw) != KEY_BYTES:
            raise ConfigError(f"{self._type}: key must be {KEY_BYTES} bytes")
        if not isinstance(kid, str) or not kid or len(kid) > 64 or "|" in kid:
            raise ConfigError(f"{self._type}: kid must be a non-empty string ≤ 64 chars without '|'")
        self._raw = bytes(raw)
        self._aead = AESGCM(self._raw)
        self.kid = kid

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kid={self.kid!r})"

    def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """AES-GCM open; a bad tag raises `IntegrityError` (message never carries data)."""
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except (InvalidTag, ValueError) as e:
            raise IntegrityError(f"authentication failed under kid {self.kid!r}") from e

    def export_secret(self) -> bytes:
        """Raw key bytes — only for wrapping to an attested enclave or sealing. Never log them."""
        return self._raw

    def save(self, path: str | os.PathLike[str], passphrase: str | None = None) -> Path:
        """Write a 0600 key file; with `passphrase` the key is scrypt+AES-GCM protected."""
        doc = {"type": self._type, "v": _FILE_VERSION, "kid": self.kid, "created": int(time.time())}
        doc.update(_protect(self._raw, passphrase))
        return write_private_json(path, doc)

    @classmethod
    def load(cls, path: str | os.PathLike[str], passphrase: str | None = None) -> Self:
        p = Path(path)
        doc = read_json(p, cls._type)
        _check_kind(doc, cls._type, p)
        kid = doc.get("kid")
        if not isinstance(kid, str):
            raise ConfigError(f"{p}: missing kid")
        return cls(_unprotect(doc, passphrase, p), kid)


class DataKey(SymmetricKey):
    """The data owner's AES-256 window key (docs/ARCHITECTURE.md §3). Rotation = a new key with a new kid."""

    __slots__ = ()
    _type = "veilcam-data-key"


class ModelKey(SymmetricKey):
    """The model owner's AES-256 key encrypting a model package (docs/ARCHITECTURE.md §6)."""

    __slots__ = ()
    _type = "veilcam-model-key"


def _new_kid(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d', time.gmtime())}-{secrets.token_hex(4)}"


def generate_data_key(kid: str | None = None) -> DataKey:
    """A fresh random data key; default kid `dk-YYYYMMDD-<8 hex>`."""
    return DataKey(os.urandom(KEY_BYTES), kid or _new_kid("dk"))


def load_data_key(path: str | os.PathLike[str], passphrase: str | None = None) -> DataKey:
    """Load a data key file written by `DataKey.save` / `veilcam keygen --role data-owner`."""
    return DataKey.load(path, passphrase)


def generate_model_key(kid: str | None = None) -> ModelKey:
    return ModelKey(os.urandom(KEY_BYTES), kid or _new_kid("mk"))


def load_model_key(path: str | os.PathLike[str], passphrase: str | None = None) -> ModelKey:
    return ModelKey.load(path, passphrase)


# ---------------------------------------------------------------------------------------------
# asymmetric party keys
# ---------------------------------------------------------------------------------------------


def raw_public_bytes(k: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return k.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def raw_private_bytes(k: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return k.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


@dataclass(frozen=True, slots=True)
class PartyPublic:
    """The public half of a party: what others pin (policy signers) or name (alert recipients)."""

    role: str
    name: str
    sign_pub: bytes  # Ed25519, 32 bytes
    kx_pub: bytes  # X25519, 32 bytes

    @property
    def rid(self) -> str:
        """Recipient id: fingerprint of the X25519 key (what an alert's `recipients[].rid` names)."""
        return fingerprint(self.kx_pub)

    @property
    def signer_id(self) -> str:
        return fingerprint(self.sign_pub)

    def verify(self, signature: bytes, message: bytes) -> None:
        try:
            Ed25519PublicKey.from_public_bytes(self.sign_pub).verify(signature, message)
        except (InvalidSignature, ValueError) as e:
            raise IntegrityError(f"signature of {self.role} {self.name!r} does not verify") from e

    def to_doc(self) -> dict[str, Any]:
        return {
            "type": "veilcam-public-key",
            "v": _FILE_VERSION,
            "role": self.role,
            "name": self.name,
            "sign_pub": b64e(self.sign_pub),
            "kx_pub": b64e(self.kx_pub),
            "rid": self.rid,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any], where: str = "public key") -> PartyPublic:
        if doc.get("type") != "veilcam-public-key":
            raise ConfigError(f"{where}: not a veilcam public key")
        role, name = doc.get("role"), doc.get("name")
        if role not in ROLES or not isinstance(name, str):
            raise ConfigError(f"{where}: bad role/name")
        sp, kp = b64d(doc.get("sign_pub"), where), b64d(doc.get("kx_pub"), where)
        if len(sp) != 32 or len(kp) != 32:
            raise ConfigError(f"{where}: public keys must be 32 bytes")
        return cls(role, name, sp, kp)

    def save(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_doc(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PartyPublic:
        return cls.from_doc(read_json(path, "public key"), str(path))


class PartyKey:
    """A party's private keys: Ed25519 (signs policies) and X25519 (receives wrapped keys)."""

    __slots__ = ("_kx", "_sign", "name", "role")
    _type = "veilcam-party-key"

    def __init__(self, role: str, name: str, sign: Ed25519PrivateKey, kx: X25519PrivateKey) -> None:
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}")
        self.role, self.name, self._sign, self._kx = role, name, sign, kx

    def __repr__(self) -> str:
        return f"PartyKey(role={self.role!r}, name={self.name!r}, rid={self.public.rid!r})"

    @classmethod
    def generate(cls, role: str, name: str) -> PartyKey:
        return cls(role, name, Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @property
    def public(self) -> PartyPublic:
        return PartyPublic(
            self.role,
            self.name,
            raw_public_bytes(self._sign.public_key()),
            raw_public_bytes(self._kx.public_key()),
        )

    def sign(self, message: bytes) -> bytes:
        return self._sign.sign(message)

    def exchange(self, peer_pub: bytes) -> bytes:
        """X25519 shared secret with `peer_pub` (input to HKDF, never used directly)."""
        try:
            return self._kx.exchange(X25519PublicKey.from_public_bytes(peer_pub))
        except ValueError as e:
            raise IntegrityError("invalid X25519 peer key") from e

    def save(self, path: str | os.PathLike[str], passphrase: str | None = None) -> Path:
        doc: dict[str, Any] = {
            "type": self._type,
            "v": _FILE_VERSION,
            "role": self.role,
            "name": self.name,
            "created": int(time.time()),
        }
        doc.update(_protect(raw_private_bytes(self._sign) + raw_private_bytes(self._kx), passphrase))
        return write_private_json(path, doc)

    @classmethod
    def load(cls, path: str | os.PathLike[str], passphrase: str | None = None) -> PartyKey:
        p = Path(path)
        doc = read_json(p, "party key")
        _check_kind(doc, cls._type, p)
        secret = _unprotect(doc, passphrase, p)
        if len(secret) != 64:
            raise ConfigError(f"{p}: corrupted party key")
        role, name = doc.get("role"), doc.get("name")
        if not isinstance(role, str) or not isinstance(name, str):
            raise ConfigError(f"{p}: missing role/name")
        return cls(
            role,
            name,
            Ed25519PrivateKey.from_private_bytes(secret[:32]),
            X25519PrivateKey.from_private_bytes(secret[32:]),
        )


def verify_ed25519(public: bytes, signature: bytes, message: bytes, what: str) -> None:
    """Verify an Ed25519 signature, raising `IntegrityError` naming `what`."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError) as e:
        raise IntegrityError(f"{what}: signature does not verify") from e


__all__ = [
    "KEY_BYTES",
    "ROLES",
    "DataKey",
    "ModelKey",
    "PartyKey",
    "PartyPublic",
    "SymmetricKey",
    "fingerprint",
    "generate_data_key",
    "generate_model_key",
    "load_data_key",
    "load_model_key",
    "resolve_passphrase",
    "verify_ed25519",
]
