"""Alert envelopes (docs/ARCHITECTURE.md §7): built and signed inside the enclave, opened by consumers.

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

import os
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave_bridge.shared.attest import Verifier, unwrap_secret, wrap_secret
from enclave_bridge.shared.errors import IntegrityError
from enclave_bridge.shared.keys import PartyKey, fingerprint, verify_ed25519
from enclave_bridge.shared.policy import ALERT_FIELDS, Recipient

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
_WRAP_INFO = b"veilcam-alert-keys"
_ENVELOPE_FIELDS = frozenset({"v", "device", "seq", "ts", "kid", "recipients", "nonce", "ct", "sig"})


def _header(device: str, seq: int, ts: float, kid: str, version: int = ALERT_VERSION) -> bytes:
    return msgpack.packb([version, device, seq, ts, kid], use_bin_type=True)


def _signed_bytes(env: Mapping[str, Any]) -> bytes:
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


def build_alert(
    device: str,
    seq: int,
    ts: float,
    fields: Mapping[str, Any],
    recipients: Iterable[Recipient],
    sign: Callable[[bytes], bytes],
    signer_kid: str,
) -> bytes:
    """Encrypt `fields` per the recipients' grants and sign with the enclave key (inside the enclave)."""
    unknown = set(fields) - set(ALERT_FIELDS)
    if unknown:
        raise IntegrityError(f"unknown alert fields {sorted(unknown)}")
    header = _header(device, seq, float(ts), signer_kid)
    nonce = os.urandom(12)
    field_keys = {f: AESGCM.generate_key(bit_length=256) for f in fields}
    ct: dict[str, bytes] = {
        f: AESGCM(field_keys[f]).encrypt(nonce, pad_field(f, v), header + f.encode())
        for f, v in fields.items()
    }
    recips = []
    for r in recipients:
        granted = {f: field_keys[f] for f in r.fields if f in field_keys}
        if not granted:
            continue
        wrapped = wrap_secret(
            r.kx_pub, msgpack.packb(granted, use_bin_type=True), _WRAP_INFO, header + r.rid.encode()
        )
        recips.append({"rid": r.rid, "wrapped_key": msgpack.packb(wrapped, use_bin_type=True)})
    env: dict[str, Any] = {
        "v": ALERT_VERSION,
        "device": device,
        "seq": seq,
        "ts": float(ts),
        "kid": signer_kid,
        "recipients": recips,
        "nonce": nonce,
        "ct": msgpack.packb(ct, use_bin_type=True),
    }
    # Pad the envelope to a block multiple with `ct["_pad"]`. At 256..511 bytes its msgpack header
    # has one fixed size (bin16), so the total grows exactly with the fill: measure once, then fill.
    ct["_pad"] = bytes(ENVELOPE_BLOCK)
    env["ct"] = msgpack.packb(ct, use_bin_type=True)
    env["sig"] = bytes(64)  # Ed25519 signatures are 64 bytes: the size is known before signing
    base = len(msgpack.packb(env, use_bin_type=True))
    ct["_pad"] = bytes(ENVELOPE_BLOCK + (-base) % ENVELOPE_BLOCK)
    env["ct"] = msgpack.packb(ct, use_bin_type=True)
    env["sig"] = sign(_signed_bytes(env))
    return msgpack.packb(env, use_bin_type=True)


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


class NoGrantError(IntegrityError):
    """A genuine alert (enclave signature verified) that grants this consumer nothing: the policy
    names other recipients only. Not a forgery; retrying with this key can never succeed."""


class AlertOpener:
    """Consumer side: verify the enclave signature, unwrap this consumer's field keys, decrypt.

    `enclave_verify_key` is the Ed25519 public key from verified enclave evidence
    (`Verifier.verify(...).sign_pub`). `open()` returns `{device, seq, ts, <granted fields>}`.
    """

    def __init__(self, consumer_key: PartyKey, enclave_verify_key: bytes) -> None:
        self._key = consumer_key
        self._rid = consumer_key.public.rid
        self._kx_pub = consumer_key.public.kx_pub
        self._verify_key = enclave_verify_key
        self.kid = fingerprint(enclave_verify_key)

    def __repr__(self) -> str:
        return f"AlertOpener(rid={self._rid!r}, enclave_kid={self.kid!r})"

    @classmethod
    def from_evidence(
        cls,
        consumer_key: PartyKey,
        evidence: Mapping[str, Any],
        verifier: Verifier,
        nonce: bytes | None = None,
    ) -> AlertOpener:
        """Trust the alert-signing key only after verifying the enclave's evidence (e.g. the retained
        `veilcam/<device>/enclave` message; without `nonce`, `verifier.max_age_s` bounds its age)."""
        return cls(consumer_key, verifier.verify(evidence, nonce).sign_pub)

    def open(self, payload: bytes) -> dict[str, Any]:
        env = parse_alert(payload)
        if env["kid"] != self.kid:
            raise IntegrityError(f"alert signed by enclave key {env['kid']!r}, expected {self.kid!r}")
        verify_ed25519(self._verify_key, env["sig"], _signed_bytes(env), "alert")
        mine = [r for r in env["recipients"] if r["rid"] == self._rid]
        if not mine:
            raise NoGrantError(f"alert {env['device']}/{env['seq']} has no grant for recipient {self._rid}")
        header = _header(env["device"], env["seq"], env["ts"], env["kid"], env["v"])
        try:
            wrapped = msgpack.unpackb(mine[0]["wrapped_key"], raw=False)
            keys = msgpack.unpackb(
                unwrap_secret(
                    self._key.exchange, self._kx_pub, wrapped, _WRAP_INFO, header + self._rid.encode()
                ),
                raw=False,
            )
            cts = msgpack.unpackb(env["ct"], raw=False)
        except (ValueError, TypeError, msgpack.exceptions.UnpackException) as e:
            raise IntegrityError(f"malformed alert content: {type(e).__name__}") from e
        if not isinstance(keys, dict) or not isinstance(cts, dict):
            raise IntegrityError("malformed alert content")
        out: dict[str, Any] = {"device": env["device"], "seq": env["seq"], "ts": env["ts"]}
        for f, k in keys.items():
            if f not in ALERT_FIELDS or f not in cts or not isinstance(k, bytes) or len(k) != 32:
                raise IntegrityError("malformed alert content: field keys")
            try:
                plain = AESGCM(k).decrypt(env["nonce"], cts[f], header + f.encode())
            except (InvalidTag, ValueError) as e:
                raise IntegrityError(f"alert field {f!r} failed authentication") from e
            try:
                out[f] = unpad_field(plain) if env["v"] >= 2 else msgpack.unpackb(plain, raw=False)
            except (ValueError, TypeError, msgpack.exceptions.UnpackException) as e:
                raise IntegrityError(f"malformed alert field {f!r}: {type(e).__name__}") from e
        return out


__all__ = [
    "ALERT_VERSION",
    "ENVELOPE_BLOCK",
    "FIELD_PAD_BYTES",
    "AlertOpener",
    "NoGrantError",
    "build_alert",
    "pad_field",
    "parse_alert",
]
