"""Attestation failures against real enclave processes refuse to provision anything."""

from __future__ import annotations

import shutil

import pytest

from enclave_bridge.host.client import EnclaveClient, fetch_evidence, provision_data_key, provision_model
from enclave_bridge.shared.attest import PlatformKey, Verifier, new_nonce
from enclave_bridge.shared.errors import AttestationError, IntegrityError
from enclave_bridge.shared.keys import PartyKey
from enclave_bridge.shared.windows import seal_window
from tests.enclave_bridge.test_enclave_service_support import (
    assert_no_secrets,
    deployment,  # noqa: F401  (fixture)
    window,
)


def test_modified_enclave_code_gets_no_model_and_no_data_key(deployment):  # noqa: F811
    dep = deployment
    dep.start("key")
    provision_data_key(dep.ke_addr, dep.dk, dep.do, dep.verifier("key"), [dep.measurement("eval")])
    # an attacker-modified copy of the enclave code (one byte of behaviour changed)
    evil = dep.root / "evil"
    shutil.copytree(dep.code, evil)
    target = evil / "enclave_bridge" / "measured" / "alerts.py"
    target.write_text(target.read_text() + "\nLEAK = True\n")
    assert dep.measurement("eval", evil) != dep.measurement("eval")
    dep.start("eval", code=evil, state="evil-state")
    with EnclaveClient(dep.ev_addr) as c:
        st = c.status()
        assert st["measurement"] == dep.measurement("eval", evil)
        assert st["data_kids"] == []  # the key enclave refused local attestation
    assert "not in the allow-list" in dep.log("key")
    with pytest.raises(AttestationError, match="not in the allow-list"):
        provision_model(dep.ev_addr, dep.package.read_bytes(), dep.mk, dep.mo, dep.verifier("eval"))
    with EnclaveClient(dep.ev_addr) as c:
        assert c.status()["model_kid"] is None
        c.hello("cam1", {"labels": ["*"]})
        r = c.submit(seal_window(dep.dk, "cam1", 1, 0.0, 1.0, window(1)))
        assert r.status == "rejected" and r.reason == "no_model"
    dep.stop("eval")
    # the genuine enclave cannot open state sealed by the modified one (different measurement)
    with pytest.raises(RuntimeError, match="belongs to another measurement"):
        dep.start("eval", state="evil-state")
    dep.start("eval")
    provision_model(dep.ev_addr, dep.package.read_bytes(), dep.mk, dep.mo, dep.verifier("eval"))
    with EnclaveClient(dep.ev_addr) as c:
        assert c.status()["data_kids"] == ["dk-1"]
    assert_no_secrets([dep.log("key"), dep.log("eval")], dep.secrets())


def test_bad_platform_stale_nonce_wrong_owner(deployment):  # noqa: F811
    dep = deployment
    dep.start("key")
    dep.start("eval")
    # evidence signed by another platform (or a forged quote) does not verify against the pinned key
    other = Verifier(PlatformKey.generate().public, [dep.measurement("eval")], role="eval")
    with pytest.raises(AttestationError, match="pinned platform key"):
        provision_model(dep.ev_addr, dep.package.read_bytes(), dep.mk, dep.mo, other)
    # stale evidence: answers an earlier challenge
    with EnclaveClient(dep.ev_addr) as c:
        old_nonce = new_nonce()
        old = c.evidence(old_nonce)
    with pytest.raises(AttestationError, match="another nonce"):
        dep.verifier("eval").verify(old, new_nonce())
    dep.verifier("eval").verify(old, old_nonce)
    # wrong role: a key enclave is not an evaluation enclave
    with pytest.raises(AttestationError):
        fetch_evidence(dep.ke_addr, Verifier(dep.platform_pub, [dep.measurement("key")], role="eval"))
    # a model owner the enclave does not pin cannot provision; a data owner likewise
    impostor = PartyKey.generate("model-owner", "impostor")
    with pytest.raises(IntegrityError, match="signature"):
        provision_model(dep.ev_addr, dep.package.read_bytes(), dep.mk, impostor, dep.verifier("eval"))
    impostor_do = PartyKey.generate("data-owner", "impostor")
    with pytest.raises(IntegrityError, match="signature"):
        provision_data_key(dep.ke_addr, dep.dk, impostor_do, dep.verifier("key"), [dep.measurement("eval")])
    with EnclaveClient(dep.ev_addr) as c:
        assert c.status()["model_kid"] is None
    # a policy signed by only one owner is refused
    from enclave_bridge.shared.policy import create_policy, sign_policy

    half = sign_policy(create_policy([(dep.c1.public, ["label"])]), dep.do)
    with (
        EnclaveClient(dep.ev_addr) as c,
        pytest.raises(IntegrityError, match="not signed by the model-owner"),
    ):
        c.set_policy(half)
