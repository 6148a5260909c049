"""Evidence and verification in-process: every tampered field, freshness, roles, secret wrapping."""

from __future__ import annotations

import hashlib
import logging

import pytest

from enclave_bridge.shared.attest import (
    PlatformKey,
    SessionKey,
    SimulatedBackend,
    Verifier,
    make_evidence,
    new_nonce,
    unwrap_secret,
    wrap_secret,
)
from enclave_bridge.shared.errors import AttestationError, IntegrityError
from enclave_bridge.shared.keys import PartyKey
from enclave_bridge.shared.measurement import compute_measurement

MEAS = hashlib.sha256(b"enclave v1").hexdigest()


@pytest.fixture
def plat() -> PlatformKey:
    return PlatformKey.generate()


@pytest.fixture
def backend(plat, caplog) -> SimulatedBackend:
    caplog.set_level(logging.WARNING)
    return SimulatedBackend(plat, MEAS, "eval")


def _evidence(backend, nonce, kind="quote", role="eval"):
    session = SessionKey()
    return make_evidence(backend, role, nonce, session, b"\x11" * 32, kind), session


def test_valid_evidence_verifies(plat, backend, caplog):
    nonce = new_nonce()
    ev, session = _evidence(backend, nonce)
    v = Verifier(plat.public, [MEAS], role="eval").verify(ev, nonce)
    assert (v.measurement, v.role, v.kx_pub, v.sign_pub) == (MEAS, "eval", session.public, b"\x11" * 32)
    insecure = [r for r in caplog.get_records("setup") if "INSECURE simulated enclave backend" in r.message]
    assert len(insecure) == 1 and insecure[0].levelname == "WARNING"


@pytest.mark.parametrize("field", ["kx_pub", "sign_pub", "nonce", "role", "ts"])
def test_tampered_binding_fields_refused(plat, backend, field):
    nonce = new_nonce()
    ev, _ = _evidence(backend, nonce)
    forged = dict(ev)
    forged[field] = {
        "kx_pub": b"\x22" * 32,
        "sign_pub": b"\x33" * 32,
        "nonce": new_nonce(),
        "role": "key",
        "ts": ev["ts"] + 1.0,
    }[field]
    with pytest.raises(AttestationError):
        Verifier(plat.public, [MEAS]).verify(forged, forged["nonce"] if field == "nonce" else nonce)


def test_quote_bit_flips_refused(plat, backend):
    nonce = new_nonce()
    ev, _ = _evidence(backend, nonce)
    for pos in range(0, len(ev["quote"]), 7):
        q = bytearray(ev["quote"])
        q[pos] ^= 0x01
        with pytest.raises(AttestationError):
            Verifier(plat.public, [MEAS]).verify(dict(ev, quote=bytes(q)), nonce)


def test_allow_list_platform_role_kind_freshness(plat, backend):
    nonce = new_nonce()
    ev, _ = _evidence(backend, nonce)
    with pytest.raises(AttestationError, match="allow-list"):
        Verifier(plat.public, [hashlib.sha256(b"other").hexdigest()]).verify(ev, nonce)
    with pytest.raises(AttestationError, match="pinned platform key"):
        Verifier(PlatformKey.generate().public, [MEAS]).verify(ev, nonce)
    with pytest.raises(AttestationError, match="'key' enclave"):
        Verifier(plat.public, [MEAS], role="key").verify(ev, nonce)
    with pytest.raises(AttestationError, match="expected a report"):
        Verifier(plat.public, [MEAS], kind="report").verify(ev, nonce)
    with pytest.raises(AttestationError, match="another nonce"):
        Verifier(plat.public, [MEAS]).verify(ev, new_nonce())
    # without a nonce (retained evidence), age decides
    Verifier(plat.public, [MEAS], max_age_s=60).verify(ev, None)
    late = Verifier(plat.public, [MEAS], max_age_s=60, clock=lambda: ev["ts"] + 61)
    with pytest.raises(AttestationError, match="old"):
        late.verify(ev, None)
    with pytest.raises(AttestationError, match="malformed"):
        Verifier(plat.public, [MEAS]).verify({"v": 1}, nonce)
    with pytest.raises(AttestationError, match="backend"):
        Verifier(plat.public, [MEAS]).verify(dict(ev, backend="gramine-sgx"), nonce)


def test_quote_from_another_enclave_cannot_be_reused(plat):
    """Evidence of enclave A with its quote swapped into B's evidence fails the binding."""
    a = SimulatedBackend(plat, MEAS, "eval")
    b = SimulatedBackend(plat, hashlib.sha256(b"evil").hexdigest(), "eval")
    nonce = new_nonce()
    ev_a, _ = _evidence(a, nonce)
    ev_b, _ = _evidence(b, nonce)
    with pytest.raises(AttestationError, match="report_data"):
        Verifier(plat.public, [MEAS]).verify(dict(ev_b, quote=ev_a["quote"]), nonce)


def test_wrap_unwrap_and_wrong_recipient():
    session, other = SessionKey(), SessionKey()
    w = wrap_secret(session.public, b"k" * 32, b"info", b"aad")
    assert unwrap_secret(session.exchange, session.public, w, b"info", b"aad") == b"k" * 32
    for bad in (
        lambda: unwrap_secret(other.exchange, other.public, w, b"info", b"aad"),
        lambda: unwrap_secret(session.exchange, session.public, w, b"other", b"aad"),
        lambda: unwrap_secret(session.exchange, session.public, w, b"info", b"other"),
        lambda: unwrap_secret(session.exchange, session.public, dict(w, ct=w["ct"][:-1]), b"info", b"aad"),
        lambda: unwrap_secret(session.exchange, session.public, {"epk": b"x"}, b"info", b"aad"),
    ):
        with pytest.raises(IntegrityError):
            bad()
    party = PartyKey.generate("consumer", "c")
    w2 = wrap_secret(party.public.kx_pub, b"s", b"i")
    assert unwrap_secret(party.exchange, party.public.kx_pub, w2, b"i") == b"s"


def test_measurement_tracks_code_and_config(tmp_path):
    import shutil

    from enclave_bridge.shared.measurement import PACKAGE_ROOT, enclave_files

    code = tmp_path / "enclave_bridge"
    shutil.copytree(PACKAGE_ROOT, code, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = {"role": "key", "backend": "simulated", "data_owner_pub": "x"}
    m1 = compute_measurement(cfg, code)
    assert m1 == compute_measurement(dict(reversed(list(cfg.items()))), code)  # canonical config
    assert m1 != compute_measurement(dict(cfg, data_owner_pub="y"), code)
    files = [rel for rel, _ in enclave_files(code)]
    assert "shared/keys.py" in files and "measured/stgcn/model.py" in files
    assert not [f for f in files if f.startswith(("gpu/", "host/"))]
    (code / "gpu" / "worker.py").write_text("# untrusted host code is not measured\n")
    (code / "host" / "client.py").write_text("# party-side code is not measured\n")
    assert compute_measurement(cfg, code) == m1
    (code / "shared" / "keys.py").write_text((code / "shared" / "keys.py").read_text() + "\n# changed\n")
    assert compute_measurement(cfg, code) != m1
    m2 = compute_measurement(cfg, code)
    (code / "measured" / "extra_module.py").write_text("X = 1\n")  # an added module is measured too
    assert compute_measurement(cfg, code) != m2
