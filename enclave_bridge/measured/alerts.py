"""Building an alert envelope inside the enclave: encrypt each field per the access policy, wrap
the field keys per recipient, pad, sign. The format is `enclave_bridge.shared.alert_format`;
consumers open envelopes with `enclave_bridge.host.alert_opener.AlertOpener`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave_bridge.shared.alert_format import (
    ALERT_VERSION,
    ENVELOPE_BLOCK,
    WRAP_INFO,
    envelope_header,
    pad_field,
    signed_bytes,
)
from enclave_bridge.shared.attest import wrap_secret
from enclave_bridge.shared.errors import IntegrityError
from enclave_bridge.shared.policy import ALERT_FIELDS, Recipient


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
    header = envelope_header(device, seq, float(ts), signer_kid)
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
            r.kx_pub, msgpack.packb(granted, use_bin_type=True), WRAP_INFO, header + r.rid.encode()
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
    env["sig"] = sign(signed_bytes(env))
    return msgpack.packb(env, use_bin_type=True)


__all__ = ["build_alert"]
