"""The project's single error tree: callers catch by kind, never by message.

It lives in `enclave_bridge` because enclave code must not import the daemon; `pipeline.errors`
re-exports it for the untrusted side.
"""

from __future__ import annotations


class VeilcamError(Exception):
    """Root of every error the project raises on purpose."""


class ConfigError(VeilcamError):
    """Invalid configuration; the message names the key path."""


class StageError(VeilcamError):
    """A pipeline stage cannot continue (e.g. a video source that cannot be opened)."""


class TransportError(VeilcamError):
    """A socket/broker peer is unreachable, closed the connection or sent a malformed frame."""


class EnclaveError(VeilcamError):
    """The enclave refused or failed an operation."""


class AttestationError(EnclaveError):
    """Evidence did not verify: bad signature, unknown measurement, stale nonce, wrong key binding."""


class IntegrityError(EnclaveError):
    """Authenticated data failed its check: AEAD tag, replayed sequence, Freivalds, signature."""


class CheckpointError(VeilcamError):
    """A model checkpoint does not match the architecture (names the keys/shapes)."""


__all__ = [
    "AttestationError",
    "CheckpointError",
    "ConfigError",
    "EnclaveError",
    "IntegrityError",
    "StageError",
    "TransportError",
    "VeilcamError",
]
