"""Alert envelopes: per-recipient field grants, signature, tampering, wrong keys, rule engine."""

from __future__ import annotations

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.measured.alerts import build_alert
from enclave_bridge.shared.alert_format import parse_alert
from enclave_bridge.shared.errors import ConfigError, IntegrityError
from enclave_bridge.shared.keys import PartyKey, fingerprint, raw_public_bytes
from enclave_bridge.shared.policy import Recipient
from enclave_bridge.shared.rules import AlertRules, RuleEngine

FIELDS = {
    "window_seq": 12,
    "t0": 1.0,
    "t1": 11.0,
    "track_id": 3,
    "label": "fall",
    "score": 0.91,
    "topk": [["fall", 0.91], ["walk", 0.05]],
}


@pytest.fixture
def setup():
    signer = Ed25519PrivateKey.generate()
    pub = raw_public_bytes(signer.public_key())
    c1, c2, c3 = (PartyKey.generate("consumer", n) for n in ("c1", "c2", "c3"))
    recips = [
        Recipient("c1", c1.public.rid, c1.public.kx_pub, tuple(FIELDS)),
        Recipient("c2", c2.public.rid, c2.public.kx_pub, ("label", "t0")),
    ]
    blob = build_alert("cam1", 5, 1234.5, FIELDS, recips, signer.sign, fingerprint(pub))
    return blob, pub, c1, c2, c3, signer


def test_envelope_format(setup):
    blob, pub, *_ = setup
    env = parse_alert(blob)
    assert set(env) == {"v", "device", "seq", "ts", "kid", "recipients", "nonce", "ct", "sig"}
    assert (env["device"], env["seq"], env["ts"], env["kid"]) == ("cam1", 5, 1234.5, fingerprint(pub))
    assert b"fall" not in blob  # label not in clear


def test_recipients_get_only_their_fields(setup):
    blob, pub, c1, c2, c3, _ = setup
    assert AlertOpener(c1, pub).open(blob) == {"device": "cam1", "seq": 5, "ts": 1234.5, **FIELDS}
    assert AlertOpener(c2, pub).open(blob) == {
        "device": "cam1",
        "seq": 5,
        "ts": 1234.5,
        "label": "fall",
        "t0": 1.0,
    }
    with pytest.raises(IntegrityError, match="no grant"):
        AlertOpener(c3, pub).open(blob)


def test_c2_cannot_decrypt_ungranted_field_with_its_keys(setup):
    """The wrapped key of c2 simply does not contain the score key: filtering is cryptographic."""
    blob, _pub, _, c2, _, _ = setup
    from enclave_bridge.shared.attest import unwrap_secret

    env = parse_alert(blob)
    mine = next(r for r in env["recipients"] if r["rid"] == c2.public.rid)
    header = msgpack.packb([2, "cam1", 5, 1234.5, env["kid"]])
    keys = msgpack.unpackb(
        unwrap_secret(
            c2.exchange,
            c2.public.kx_pub,
            msgpack.unpackb(mine["wrapped_key"]),
            b"veilcam-alert-keys",
            header + c2.public.rid.encode(),
        )
    )
    assert set(keys) == {"label", "t0"}


@pytest.mark.parametrize("field", ["device", "seq", "ts", "ct", "nonce", "recipients"])
def test_tampering_breaks_signature(setup, field):
    blob, pub, c1, *_ = setup
    env = msgpack.unpackb(blob)
    env[field] = {
        "device": "cam2",
        "seq": 6,
        "ts": 1.0,
        "ct": env["ct"][:-1] + bytes([env["ct"][-1] ^ 1]),
        "nonce": b"\0" * 12,
        "recipients": env["recipients"][:1],
    }[field]
    with pytest.raises(IntegrityError):
        AlertOpener(c1, pub).open(msgpack.packb(env))


def test_wrong_enclave_key_and_resigned_forgery(setup):
    blob, pub, c1, *_ = setup
    other = Ed25519PrivateKey.generate()
    with pytest.raises(IntegrityError, match="signed by enclave key"):
        AlertOpener(c1, raw_public_bytes(other.public_key())).open(blob)
    # same kid but a forged signature
    env = msgpack.unpackb(blob)
    env["sig"] = other.sign(b"anything")
    with pytest.raises(IntegrityError, match="signature"):
        AlertOpener(c1, pub).open(msgpack.packb(env))
    for junk in (b"", b"\x81\xa1a\x01", b"\xc1" * 5):
        with pytest.raises(IntegrityError, match="malformed"):
            AlertOpener(c1, pub).open(junk)


def test_unknown_field_refused():
    with pytest.raises(IntegrityError):
        build_alert("cam1", 1, 0.0, {"skeleton": [1, 2]}, [], lambda b: b"", "kid")


def test_rules_and_debounce():
    rules = AlertRules.from_dict({"labels": ["fall"], "min_score": 0.6, "debounce_s": 10})
    eng = RuleEngine()
    assert not eng.decide("cam1", rules, 1, "walk", 0.99, 0.0)
    assert not eng.decide("cam1", rules, 1, "fall", 0.5, 0.0)
    assert eng.decide("cam1", rules, 1, "fall", 0.7, 10.0)
    assert not eng.decide("cam1", rules, 1, "fall", 0.7, 15.0)
    assert eng.decide("cam1", rules, 2, "fall", 0.7, 15.0)
    assert eng.decide("cam2", rules, 1, "fall", 0.7, 15.0)
    assert eng.decide("cam1", rules, 1, "fall", 0.7, 20.0)
    assert eng.suppressed == 1
    anyl = AlertRules.from_dict({"labels": ["*"], "min_score": 0})
    assert anyl.matches("anything", 0.0)
    for bad in (
        {"labels": "fall"},
        {"labels": []},
        {"labels": ["x"], "min_score": 1.5},
        {"labels": ["x"], "debounce_s": -1},
        {"labels": ["x"], "extra": 1},
    ):
        with pytest.raises(ConfigError):
            AlertRules.from_dict(bad)


def test_opener_from_verified_evidence():
    from enclave_bridge.shared.attest import (
        PlatformKey,
        SessionKey,
        SimulatedBackend,
        Verifier,
        make_evidence,
        new_nonce,
    )
    from enclave_bridge.shared.errors import AttestationError

    plat = PlatformKey.generate()
    meas = "ab" * 32
    signer = Ed25519PrivateKey.generate()
    pub = raw_public_bytes(signer.public_key())
    ev = make_evidence(SimulatedBackend(plat, meas, "eval"), "eval", new_nonce(), SessionKey(), pub)
    c1 = PartyKey.generate("consumer", "c1")
    rec = Recipient("c1", c1.public.rid, c1.public.kx_pub, ("label",))
    blob = build_alert("cam1", 1, 1.0, FIELDS, [rec], signer.sign, fingerprint(pub))
    opener = AlertOpener.from_evidence(c1, ev, Verifier(plat.public, [meas], role="eval"))
    assert opener.open(blob)["label"] == "fall"
    with pytest.raises(AttestationError):
        AlertOpener.from_evidence(c1, ev, Verifier(plat.public, ["cd" * 32], role="eval"))
