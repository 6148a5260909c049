"""Sealed storage: enclave state that survives restarts but only opens in the same enclave.

`Sealer` is AES-256-GCM under a sealing key the backend derives (simulated: HKDF-SHA256 of the
platform secret with the measurement as salt; SGX: the MRENCLAVE-bound key from
`/dev/attestation/keys/_sgx_mrenclave`). A changed enclave has a different measurement, hence a
different key, and cannot unseal. Each blob's name is bound as AAD so files cannot be swapped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclave_bridge.shared.errors import ConfigError, IntegrityError

log = logging.getLogger(__name__)

_MAGIC = b"VCSEAL1\0"


def derive_sealing_key(platform_secret: bytes, measurement: bytes) -> bytes:
    """HKDF-SHA256(ikm=platform secret, salt=measurement, info='veilcam-seal-v1') → 32 bytes."""
    if len(platform_secret) < 32 or len(measurement) != 32:
        raise ConfigError("sealing key needs a ≥32-byte platform secret and a 32-byte measurement")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=measurement, info=b"veilcam-seal-v1").derive(
        platform_secret
    )


class Sealer:
    """Seal/unseal named blobs. Holds the key privately; `repr` shows nothing secret."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigError("sealing key must be 32 bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "Sealer(<key hidden>)"

    def seal(self, name: str, data: bytes) -> bytes:
        nonce = os.urandom(12)
        return _MAGIC + nonce + self._aead.encrypt(nonce, data, _MAGIC + name.encode())

    def unseal(self, name: str, blob: bytes) -> bytes:
        if len(blob) < len(_MAGIC) + 12 + 16 or not blob.startswith(_MAGIC):
            raise IntegrityError(f"sealed blob {name!r} is malformed")
        nonce = blob[len(_MAGIC) : len(_MAGIC) + 12]
        try:
            return self._aead.decrypt(nonce, blob[len(_MAGIC) + 12 :], _MAGIC + name.encode())
        except InvalidTag as e:
            raise IntegrityError(
                f"cannot unseal {name!r}: sealed by a different enclave/platform or corrupted"
            ) from e


class SealedStore:
    """A directory of sealed blobs (`<name>.sealed`), written atomically with mode 0600."""

    def __init__(self, directory: str | os.PathLike[str], sealer: Sealer) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self._sealer = sealer

    def _path(self, name: str) -> Path:
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"bad sealed blob name {name!r}")
        return self.dir / f"{name}.sealed"

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self._sealer.seal(name, data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def get(self, name: str) -> bytes | None:
        """The unsealed blob, or None if absent. Raises `IntegrityError` if it cannot be unsealed."""
        path = self._path(name)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        return self._sealer.unseal(name, blob)

    def exists(self, name: str) -> bool:
        return self._path(name).exists()


__all__ = ["SealedStore", "Sealer", "derive_sealing_key"]
