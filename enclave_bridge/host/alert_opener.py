"""Opening alert envelopes on the consumer's side: verify the enclave's signature, unwrap the field
keys granted to this consumer, decrypt and un-pad its fields. Party-side code: not measured."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave_bridge.shared.alert_format import (
    WRAP_INFO,
    envelope_header,
    parse_alert,
    signed_bytes,
    unpad_field,
)
from enclave_bridge.shared.attest import Verifier, unwrap_secret
from enclave_bridge.shared.errors import IntegrityError
from enclave_bridge.shared.keys import PartyKey, fingerprint, verify_ed25519
from enclave_bridge.shared.policy import ALERT_FIELDS


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
        verify_ed25519(self._verify_key, env["sig"], signed_bytes(env), "alert")
        mine = [r for r in env["recipients"] if r["rid"] == self._rid]
        if not mine:
            raise NoGrantError(f"alert {env['device']}/{env['seq']} has no grant for recipient {self._rid}")
        header = envelope_header(env["device"], env["seq"], env["ts"], env["kid"], env["v"])
        try:
            wrapped = msgpack.unpackb(mine[0]["wrapped_key"], raw=False)
            keys = msgpack.unpackb(
                unwrap_secret(
                    self._key.exchange, self._kx_pub, wrapped, WRAP_INFO, header + self._rid.encode()
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


__all__ = ["AlertOpener", "NoGrantError"]
