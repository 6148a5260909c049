"""The enclave RPC: typed request/reply messages, the error names replies carry, and the byte
strings owners sign when provisioning. Both the enclave services (`measured`) and their clients
(`host.client`, the daemon's enclave stage) use this module, so neither imports the other.

Frames are msgpack maps `{op, id, ...}` → `{id, ok: true, ...}` or `{id, ok: false, error, message}`
(`RequestServer` in `measured.service`); the per-window ops `hello` and `submit` travel as the
dataclasses below, validated on receipt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from enclave_bridge.shared import errors
from enclave_bridge.shared.errors import EnclaveError, TransportError, VeilcamError

MAX_DEVICE_LEN = 128
PROVISION_MODEL_DOMAIN = b"veilcam-provision-model-v1\0"
MODEL_KEY_INFO = b"veilcam-model-key"
PROVISION_DATA_KEY_DOMAIN = b"veilcam-provision-data-key-v1\0"
DATA_KEY_WRAP_INFO = b"veilcam-data-key"
DEFAULT_GRACE_S = 3600.0


def _malformed(op: str, what: str) -> TransportError:
    return TransportError(f"{op}: malformed message ({what})")


@dataclass(frozen=True, slots=True)
class HelloRequest:
    """A camera registers itself and the alert rules from its config (the policy's rules win)."""

    device: str
    rules: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"device": self.device, "rules": self.rules}

    @staticmethod
    def from_wire(d: Mapping[str, Any]) -> HelloRequest:
        device, rules = d.get("device"), d.get("rules")
        if not isinstance(device, str) or not 0 < len(device) <= MAX_DEVICE_LEN or "|" in device:
            raise errors.ConfigError("hello: bad device id")
        if rules is not None and not isinstance(rules, dict):
            raise _malformed("hello", "rules must be a mapping")
        return HelloRequest(device, rules)


@dataclass(frozen=True, slots=True)
class HelloReply:
    device: str
    rules_source: str  # "policy" | "hello"
    kid: str  # the enclave's alert-signing key id

    def to_wire(self) -> dict[str, Any]:
        return {"device": self.device, "rules_source": self.rules_source, "kid": self.kid}


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    """One sealed window; `resend` marks a window whose reply was lost (answered idempotently)."""

    blob: bytes
    resend: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"blob": self.blob, **({"resend": True} if self.resend else {})}

    @staticmethod
    def from_wire(d: Mapping[str, Any]) -> SubmitRequest:
        blob = d.get("blob")
        if not isinstance(blob, bytes):
            raise _malformed("submit", "blob must be bytes")
        return SubmitRequest(blob, d.get("resend") is True)


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """Outcome of one sealed window: alerts are finished envelopes (encrypted + signed).

    The one result type of every enclave link (remote enclave, local evaluator, enclave pool)."""

    status: str  # "ok" | "rejected"
    reason: str | None
    alerts: list[bytes] = field(default_factory=list)
    window_seq: int = -1

    def to_wire(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "alerts": list(self.alerts),
            "window_seq": self.window_seq,
        }

    @staticmethod
    def from_wire(d: Mapping[str, Any]) -> SubmitResult:
        status, reason, alerts = d.get("status"), d.get("reason"), d.get("alerts") or []
        if status not in ("ok", "rejected"):
            raise _malformed("submit", "status")
        if reason is not None and not isinstance(reason, str):
            raise _malformed("submit", "reason")
        if not isinstance(alerts, list) or not all(isinstance(a, bytes) for a in alerts):
            raise TransportError("submit: malformed alerts in reply")
        seq = d.get("window_seq", -1)
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise _malformed("submit", "window_seq")
        return SubmitResult(str(status), reason, alerts, int(seq))


def error_class(name: str) -> type[VeilcamError]:
    """Map a reply's `error` name back to the error tree (unknown names → EnclaveError)."""
    cls = getattr(errors, str(name), None)
    return cls if isinstance(cls, type) and issubclass(cls, VeilcamError) else EnclaveError


def provision_model_message(nonce: bytes, package: bytes, wrapped: Mapping[str, Any]) -> bytes:
    """What the model owner signs: the attestation nonce, the package digest and the wrapped key."""
    return (
        PROVISION_MODEL_DOMAIN
        + nonce
        + hashlib.sha256(package).digest()
        + msgpack.packb([wrapped["epk"], wrapped["nonce"], wrapped["ct"]], use_bin_type=True)
    )


def provision_data_key_message(
    nonce: bytes, kid: str, grace_s: float, allow: list[str], wrapped: Mapping[str, bytes]
) -> bytes:
    """What the data owner signs when provisioning a key."""
    return PROVISION_DATA_KEY_DOMAIN + msgpack.packb(
        [nonce, kid, float(grace_s), sorted(allow), wrapped["epk"], wrapped["nonce"], wrapped["ct"]],
        use_bin_type=True,
    )


__all__ = [
    "DATA_KEY_WRAP_INFO",
    "DEFAULT_GRACE_S",
    "MODEL_KEY_INFO",
    "PROVISION_DATA_KEY_DOMAIN",
    "PROVISION_MODEL_DOMAIN",
    "HelloReply",
    "HelloRequest",
    "SubmitRequest",
    "SubmitResult",
    "error_class",
    "provision_data_key_message",
    "provision_model_message",
]
