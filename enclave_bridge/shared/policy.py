"""Access policy: which consumers receive which alert fields, signed by both owners (ARCHITECTURE.md §6, §7).

A policy is JSON: a body plus `signatures`. Both the data owner and the model owner sign
`"veilcam-policy-v1\\0" + canonical JSON(body)` with their Ed25519 keys; the enclave pins both owners'
public keys in its (measured) config, refuses to publish alerts without a valid policy, and refuses
a policy whose `version` is lower than the one it holds (no rollback). Optional `rules`
(`{"<device>"|"*": {labels, min_score, debounce_s}}`) override the camera config's rules.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclave_bridge.shared.errors import ConfigError, IntegrityError
from enclave_bridge.shared.keys import (
    PartyKey,
    PartyPublic,
    b64d,
    b64e,
    fingerprint,
    read_json,
    verify_ed25519,
)
from enclave_bridge.shared.rules import AlertRules

ALERT_FIELDS = ("window_seq", "t0", "t1", "track_id", "label", "score", "topk")
SIGNER_ROLES = ("data-owner", "model-owner")
_DOMAIN = b"veilcam-policy-v1\0"


@dataclass(frozen=True, slots=True)
class Recipient:
    name: str
    rid: str
    kx_pub: bytes
    fields: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Policy:
    """A verified policy (only `verify_policy` makes these)."""

    version: int
    recipients: tuple[Recipient, ...]
    rules: Mapping[str, AlertRules]
    digest: str

    def rules_for(self, device: str) -> AlertRules | None:
        return self.rules.get(device) or self.rules.get("*")


def _body_bytes(body: Mapping[str, Any]) -> bytes:
    return _DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def create_policy(
    recipients: Iterable[tuple[PartyPublic, Iterable[str]]],
    version: int = 1,
    rules: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """An unsigned policy document granting each recipient the named alert fields."""
    recs = []
    for pub, fields in recipients:
        fl = sorted(set(fields))
        bad = set(fl) - set(ALERT_FIELDS)
        if bad or not fl:
            raise ConfigError(f"recipient {pub.name!r}: fields must be a non-empty subset of {ALERT_FIELDS}")
        recs.append({"name": pub.name, "rid": pub.rid, "kx_pub": b64e(pub.kx_pub), "fields": fl})
    if not recs:
        raise ConfigError("a policy needs at least one recipient")
    if rules is not None:
        for dev, r in rules.items():
            AlertRules.from_dict(r, f"rules.{dev}")
    body = {
        "type": "veilcam-policy",
        "v": 1,
        "version": int(version),
        "created": int(time.time()),
        "recipients": recs,
        "rules": dict(rules) if rules else None,
    }
    return {"body": body, "signatures": {}}


def sign_policy(doc: dict[str, Any], key: PartyKey) -> dict[str, Any]:
    """Add `key`'s signature (role data-owner or model-owner) to the policy document."""
    if key.role not in SIGNER_ROLES:
        raise ConfigError(f"policies are signed by {' and '.join(SIGNER_ROLES)}, not {key.role}")
    body = doc.get("body")
    if not isinstance(body, dict):
        raise ConfigError("not a policy document (no body)")
    sigs = dict(doc.get("signatures") or {})
    sigs[key.role] = {"signer": key.public.signer_id, "sig": b64e(key.sign(_body_bytes(body)))}
    return {"body": body, "signatures": sigs}


def verify_policy(doc: Mapping[str, Any], data_owner_pub: bytes, model_owner_pub: bytes) -> Policy:
    """Check both signatures and the structure; raises `IntegrityError` (tampered/unsigned)."""
    body, sigs = doc.get("body"), doc.get("signatures")
    if not isinstance(body, dict) or not isinstance(sigs, dict) or body.get("type") != "veilcam-policy":
        raise IntegrityError("not a policy document")
    msg = _body_bytes(body)
    for role, pub in (("data-owner", data_owner_pub), ("model-owner", model_owner_pub)):
        entry = sigs.get(role)
        if not isinstance(entry, dict):
            raise IntegrityError(f"policy is not signed by the {role}")
        try:
            sig = b64d(entry.get("sig"), f"{role} signature")
        except ConfigError as e:
            raise IntegrityError(str(e)) from e
        verify_ed25519(pub, sig, msg, f"policy {role} signature")
    version = body.get("version")
    if not isinstance(version, int) or version < 0:
        raise IntegrityError("policy: bad version")
    recs = []
    seen = set()
    for i, r in enumerate(body.get("recipients") or []):
        try:
            kx = b64d(r["kx_pub"], f"recipients[{i}].kx_pub")
            fields = tuple(r["fields"])
            name, rid = str(r["name"]), str(r["rid"])
        except (KeyError, TypeError, ConfigError) as e:
            raise IntegrityError(f"policy: malformed recipient {i}") from e
        if len(kx) != 32 or fingerprint(kx) != rid or not set(fields) <= set(ALERT_FIELDS) or rid in seen:
            raise IntegrityError(f"policy: recipient {i} ({name!r}) is inconsistent")
        seen.add(rid)
        recs.append(Recipient(name, rid, kx, fields))
    if not recs:
        raise IntegrityError("policy has no recipients")
    rules: dict[str, AlertRules] = {}
    raw_rules = body.get("rules")
    if raw_rules is not None:
        if not isinstance(raw_rules, dict):
            raise IntegrityError("policy: rules must be a mapping")
        try:
            rules = {str(dev): AlertRules.from_dict(r, f"policy.rules.{dev}") for dev, r in raw_rules.items()}
        except ConfigError as e:
            raise IntegrityError(str(e)) from e
    import hashlib

    return Policy(version, tuple(recs), rules, hashlib.sha256(msg).hexdigest())


def load_policy_doc(path: str | Path) -> dict[str, Any]:
    return read_json(path, "policy")


def save_policy_doc(doc: Mapping[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return p


__all__ = [
    "ALERT_FIELDS",
    "Policy",
    "Recipient",
    "create_policy",
    "load_policy_doc",
    "save_policy_doc",
    "sign_policy",
    "verify_policy",
]
