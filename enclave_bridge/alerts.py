"""Alert envelopes (DESIGN §7): built and signed inside the enclave, opened by consumers.

Envelope (msgpack) `{v, device, seq, ts, kid, recipients:[{rid, wrapped_key}], nonce, ct, sig}`:
- every alert field (`window_seq, t0, t1, track_id, label, score, topk`) is encrypted under its own
  fresh AES-256-GCM key (same nonce, distinct keys), `ct` = msgpack `{field: ciphertext}`; AAD is the
  header `msgpack[v, device, seq, ts, kid]` plus the field name;
- each recipient's `wrapped_key` wraps (X25519 + HKDF + AES-GCM) only the field keys the access
  policy grants it — so field filtering is enforced cryptographically, with one envelope for all;
- `kid` is the id of the enclave's Ed25519 alert-signing key; `sig` signs everything else.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave_bridge.attest import Verifier, unwrap_secret, wrap_secret
from enclave_bridge.errors import IntegrityError
from enclave_bridge.keys import PartyKey, fingerprint, verify_ed25519
from enclave_bridge.policy import ALERT_FIELDS, Recipient

ALERT_VERSION = 1
MAX_ALERT_BYTES = 1024 * 1024
_SIG_DOMAIN = b"veilcam-alert-v1\0"
_WRAP_INFO = b"veilcam-alert-keys"
_ENVELOPE_FIELDS = frozenset({"v", "device", "seq", "ts", "kid", "recipients", "nonce", "ct", "sig"})


def _header(device: str, seq: int, ts: float, kid: str) -> bytes:
    return msgpack.packb([ALERT_VERSION, device, seq, ts, kid], use_bin_type=True)


def _signed_bytes(env: Mapping[str, Any]) -> bytes:
    recips = [[r["rid"], r["wrapped_key"]] for r in env["recipients"]]
    return _SIG_DOMAIN + msgpack.packb(
        [env["v"], env["device"], env["seq"], env["ts"], env["kid"], recips, env["nonce"], env["ct"]],
        use_bin_type=True,
    )


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
    ct = {
        f: AESGCM(field_keys[f]).encrypt(nonce, msgpack.packb(v, use_bin_type=True), header + f.encode())
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
    if not isinstance(env, dict) or set(env) != _ENVELOPE_FIELDS or env["v"] != ALERT_VERSION:
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
        header = _header(env["device"], env["seq"], env["ts"], env["kid"])
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
                out[f] = msgpack.unpackb(
                    AESGCM(k).decrypt(env["nonce"], cts[f], header + f.encode()), raw=False
                )
            except (InvalidTag, ValueError) as e:
                raise IntegrityError(f"alert field {f!r} failed authentication") from e
        return out


__all__ = ["ALERT_VERSION", "AlertOpener", "NoGrantError", "build_alert", "parse_alert"]
