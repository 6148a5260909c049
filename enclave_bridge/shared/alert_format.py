"""The alert envelope format (docs/ARCHITECTURE.md §7), shared by the enclave that builds envelopes
(`measured.alerts`) and the consumers that open them (`host.alert_opener`).

Envelope (msgpack) `{v, device, seq, ts, kid, recipients:[{rid, wrapped_key}], nonce, ct, sig}`:
- every alert field (`window_seq, t0, t1, track_id, label, score, topk`) is encrypted under its own
  fresh AES-256-GCM key (same nonce, distinct keys), `ct` = msgpack `{field: ciphertext}`; AAD is the
  header `msgpack[v, device, seq, ts, kid]` plus the field name;
- each recipient's `wrapped_key` wraps (X25519 + HKDF + AES-GCM) only the field keys the access
  policy grants it — so field filtering is enforced cryptographically, with one envelope for all;
- `kid` is the id of the enclave's Ed25519 alert-signing key; `sig` signs everything else.

Lengths reveal nothing (v2): a field's plaintext is a 4-byte length, its msgpack value and zeros up
to a fixed size per field kind (`FIELD_PAD_BYTES`; `topk` by its entry count, which is the
deployment's public `topk` setting), so every label, score or ranking gives ciphertexts of one
length; a label longer than `MAX_LABEL_BYTES` (not in the shipped models) is rounded up to a
multiple of it. The envelope itself is padded to a multiple of `ENVELOPE_BLOCK` bytes (a `_pad`
entry in `ct`, under the signature), so its length depends only on cleartext header values and the
policy's recipients. Consumers still open v1 (unpadded) envelopes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import msgpack

from enclave_bridge.shared.errors import IntegrityError

ALERT_VERSION = 2
_OPENABLE_VERSIONS = (1, 2)
MAX_LABEL_BYTES = 64
_NUMBER_PAD = 16  # msgpack int/float: at most 9 bytes
FIELD_PAD_BYTES = {
    "window_seq": _NUMBER_PAD,
    "t0": _NUMBER_PAD,
    "t1": _NUMBER_PAD,
    "track_id": _NUMBER_PAD,
    "score": _NUMBER_PAD,
    "label": MAX_LABEL_BYTES + 8,  # str header (≤ 2 bytes) + label
}
_TOPK_ENTRY_PAD = MAX_LABEL_BYTES + 16  # [label, score]: array + str header + label + float64
ENVELOPE_BLOCK = 256
_LEN = struct.Struct(">I")
MAX_ALERT_BYTES = 1024 * 1024
_SIG_DOMAIN = b"veilcam-alert-v1\0"
WRAP_INFO = b"veilcam-alert-keys"
_ENVELOPE_FIELDS = frozenset({"v", "device", "seq", "ts", "kid", "recipients", "nonce", "ct", "sig"})


def envelope_header(device: str, seq: int, ts: float, kid: str, version: int = ALERT_VERSION) -> bytes:
    return msgpack.packb([version, device, seq, ts, kid], use_bin_type=True)


def signed_bytes(env: Mapping[str, Any]) -> bytes:
    recips = [[r["rid"], r["wrapped_key"]] for r in env["recipients"]]
    return _SIG_DOMAIN + msgpack.packb(
        [env["v"], env["device"], env["seq"], env["ts"], env["kid"], recips, env["nonce"], env["ct"]],
        use_bin_type=True,
    )


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def field_pad_bytes(name: str, value: Any) -> int:
    """The fixed plaintext size of one field (before the 4-byte length prefix)."""
    if name == "topk":
        n = len(value) if isinstance(value, list | tuple) else 0
        return 8 + n * _TOPK_ENTRY_PAD
    return FIELD_PAD_BYTES.get(name, MAX_LABEL_BYTES)


def pad_field(name: str, value: Any) -> bytes:
    """length ‖ msgpack(value) ‖ zeros, to the field kind's fixed size (longer values are rounded
    up to a multiple of `MAX_LABEL_BYTES`, which only an over-long label or topk can reach)."""
    body = msgpack.packb(value, use_bin_type=True)
    size = field_pad_bytes(name, value)
    if len(body) > size:
        size = _round_up(len(body), MAX_LABEL_BYTES)
    return _LEN.pack(len(body)) + body + bytes(size - len(body))


def unpad_field(plain: bytes) -> Any:
    if len(plain) < _LEN.size:
        raise IntegrityError("malformed alert content: short field")
    (n,) = _LEN.unpack_from(plain)
    if n > len(plain) - _LEN.size:
        raise IntegrityError("malformed alert content: field length")
    return msgpack.unpackb(plain[_LEN.size : _LEN.size + n], raw=False)


def parse_alert(payload: bytes) -> dict[str, Any]:
    """Structure check of an envelope (no crypto); raises `IntegrityError`."""
    if not isinstance(payload, bytes | bytearray) or len(payload) > MAX_ALERT_BYTES:
        raise IntegrityError("malformed alert: not bytes or too large")
    try:
        env = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as e:
        raise IntegrityError(f"malformed alert: {type(e).__name__}") from e
    if not isinstance(env, dict) or set(env) != _ENVELOPE_FIELDS or env["v"] not in _OPENABLE_VERSIONS:
        raise IntegrityError("malformed alert: wrong fields or version")
    ok = (
        isinstance(env["device"], str)
        and isinstance(env["seq"], int)
        and isinstance(env["ts"], float)
        and isinstance(env["kid"], str)
        and isinstance(env["nonce"], bytes)
        and isinstance(env["ct"], bytes)
        and isinstance(env["sig"], bytes)
        and isinstance(env["recipients"], list)
        and all(
            isinstance(r, dict) and isinstance(r.get("rid"), str) and isinstance(r.get("wrapped_key"), bytes)
            for r in env["recipients"]
        )
    )
    if not ok:
        raise IntegrityError("malformed alert: field types")
    return env


__all__ = [
    "ALERT_VERSION",
    "ENVELOPE_BLOCK",
    "FIELD_PAD_BYTES",
    "MAX_ALERT_BYTES",
    "MAX_LABEL_BYTES",
    "WRAP_INFO",
    "envelope_header",
    "field_pad_bytes",
    "pad_field",
    "parse_alert",
    "signed_bytes",
    "unpad_field",
]
