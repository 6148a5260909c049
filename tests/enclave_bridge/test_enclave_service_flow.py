"""Full provisioning flow across real processes: key enclave, evaluation enclave, owners, consumers."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import torch

from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.host.client import provision_data_key, provision_model
from enclave_bridge.host.packaging import package_model
from enclave_bridge.measured.model_inputs import apply_input_transform
from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.attest import new_nonce
from enclave_bridge.shared.errors import ConfigError, IntegrityError
from enclave_bridge.shared.keys import generate_data_key
from enclave_bridge.shared.windows import seal_window
from tests.enclave_bridge.test_enclave_service_support import (
    LABELS,
    assert_no_secrets,
    deployment,  # noqa: F401  (fixture)
    window,
)

RULES_ALL = {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0}


def _provision_all(dep) -> None:
    dep.start("key")
    provision_data_key(dep.ke_addr, dep.dk, dep.do, dep.verifier("key"), [dep.measurement("eval")])
    dep.start("eval")
    provision_model(dep.ev_addr, dep.package.read_bytes(), dep.mk, dep.mo, dep.verifier("eval"))


def test_full_flow_alerts_policy_restart(deployment, caplog):  # noqa: F811
    dep = deployment
    caplog.set_level(logging.DEBUG)
    _provision_all(dep)
    x2 = window(2)
    with dep.client() as c:
        c.hello("cam1", RULES_ALL)
        r = c.submit(seal_window(dep.dk, "cam1", 1, 0.0, 1.6, window(1), (7,)))
        assert (r.status, r.reason, r.alerts) == ("rejected", "no_policy", [])
        assert c.set_policy(dep.signed_policy())["version"] == 1
        blob2 = seal_window(dep.dk, "cam1", 2, 1.6, 3.2, x2, (7,))
        r = c.submit(blob2)
        assert (r.status, r.reason, r.window_seq, len(r.alerts)) == ("ok", None, 2, 1)
        alert = r.alerts[0]
        replay = c.submit(blob2)
        assert (replay.status, replay.reason, replay.alerts) == ("rejected", "replay", [])
        nonce = new_nonce()
        ev = c.evidence(nonce)
        stats = c.stats()
    assert stats["windows_ok"] == 1 and stats["alerts"] == 1
    assert stats["windows_rejected"] == {"no_policy": 1, "replay": 1}
    assert stats["evaluator"]["mode"] == "enclave"  # the enclave runs protocol.SecureEvaluator
    enclave = dep.verifier("eval").verify(ev, nonce)

    full = AlertOpener(dep.c1, enclave.sign_pub).open(alert)
    assert (full["device"], full["seq"], full["window_seq"], full["track_id"]) == ("cam1", 1, 2, 7)
    assert (full["t0"], full["t1"]) == (1.6, 3.2)
    # the label is the model's: compare with an independent plaintext evaluation of the same weights
    model = STGCN.from_checkpoint(dep.root / "model.pt").eval()
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x2[None])).double(), dim=1)[0].numpy()
    assert full["score"] == pytest.approx(float(probs.max()), abs=2e-3)
    assert len(full["topk"]) == 3
    assert [p for _, p in full["topk"]] == sorted((p for _, p in full["topk"]), reverse=True)
    for lab, p in full["topk"]:
        assert p == pytest.approx(float(probs[LABELS.index(lab)]), abs=2e-3)
    assert full["topk"][0] == [full["label"], full["score"]]

    partial = AlertOpener(dep.c2, enclave.sign_pub).open(alert)
    assert set(partial) == {"device", "seq", "ts", "label", "t1"}
    assert partial["label"] == full["label"]
    for outsider in (dep.mo, dep.do):  # no grant in the policy → cannot decrypt
        with pytest.raises(IntegrityError, match="no grant"):
            AlertOpener(outsider, enclave.sign_pub).open(alert)

    # restart both enclaves: sealed model, policy, keys, counters and signing key come back
    dep.stop("eval")
    dep.stop("key")
    dep.start("key")
    dep.start("eval")
    with dep.client() as c:
        st = c.status()
        assert (st["model_kid"], st["policy_version"], st["data_kids"]) == ("mk-1", 1, ["dk-1"])
        c.hello("cam1", RULES_ALL)
        again = c.submit(blob2)
        assert (again.status, again.reason) == ("rejected", "replay")
        r3 = c.submit(seal_window(dep.dk, "cam1", 3, 3.2, 4.8, window(3), (7,)))
        assert r3.status == "ok" and len(r3.alerts) == 1
        ev2 = c.evidence(nonce2 := new_nonce())
    enclave2 = dep.verifier("eval").verify(ev2, nonce2)
    assert enclave2.sign_pub == enclave.sign_pub
    assert AlertOpener(dep.c1, enclave2.sign_pub).open(r3.alerts[0])["seq"] == 2  # per-device seq persisted

    for role in ("key", "eval"):
        assert dep.log(role).count("INSECURE simulated enclave backend") == 2  # once per start
    assert_no_secrets([dep.log("key"), dep.log("eval"), caplog.text], dep.secrets())


def test_rules_debounce_labels_and_policy_precedence(deployment):  # noqa: F811
    dep = deployment
    _provision_all(dep)
    with dep.client() as c:
        c.set_policy(dep.signed_policy())
        c.hello("cam1", {"labels": ["*"], "min_score": 0.0, "debounce_s": 5.0})
        first = c.submit(seal_window(dep.dk, "cam1", 1, 0.0, 1.0, window(1), (4,)))
        # same track within 5 s of media time: debounced; another track: not
        second = c.submit(seal_window(dep.dk, "cam1", 2, 1.0, 2.0, window(1), (4,)))
        other = c.submit(seal_window(dep.dk, "cam1", 3, 1.0, 2.0, window(1), (5,)))
        later = c.submit(seal_window(dep.dk, "cam1", 4, 6.0, 7.0, window(1), (4,)))
        assert [len(r.alerts) for r in (first, second, other, later)] == [1, 0, 1, 1]
        c.hello("cam2", {"labels": ["no-such-label"], "min_score": 0.0, "debounce_s": 0.0})
        assert c.submit(seal_window(dep.dk, "cam2", 1, 0.0, 1.0, window(1))).alerts == []
        # a policy with rules overrides the camera's rules (v2; older versions are refused afterwards)
        c.set_policy(
            dep.signed_policy(version=2, rules={"*": {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0}})
        )
        assert c.hello("cam2", {"labels": ["no-such-label"]})["rules_source"] == "policy"
        assert len(c.submit(seal_window(dep.dk, "cam2", 2, 1.0, 2.0, window(1))).alerts) == 1
        with pytest.raises(IntegrityError, match="older"):
            c.set_policy(dep.signed_policy(version=1))
        tampered = dep.signed_policy(version=3)
        tampered["body"]["recipients"][1]["fields"] = ["label", "score", "topk"]
        with pytest.raises(IntegrityError, match="signature"):
            c.set_policy(tampered)
        unknown = c.submit(seal_window(dep.dk, "cam9", 1, 0.0, 1.0, window(1)))
        assert (unknown.status, unknown.reason) == ("rejected", "unknown_device")
        with pytest.raises(ConfigError):
            c.hello("cam3", {"labels": [], "min_score": 2})


def test_data_key_rotation_with_grace(deployment):  # noqa: F811
    dep = deployment
    _provision_all(dep)
    allow = [dep.measurement("eval")]
    dk2, dk3 = generate_data_key("dk-2"), generate_data_key("dk-3")
    dep.extra_secrets += [dk2.export_secret(), dk3.export_secret()]
    with dep.client() as c:
        c.set_policy(dep.signed_policy())
        c.hello("cam1", RULES_ALL)
        assert c.submit(seal_window(dep.dk, "cam1", 1, 0.0, 1.0, window(1))).status == "ok"
        rep = provision_data_key(dep.ke_addr, dk2, dep.do, dep.verifier("key"), allow, grace_s=3600)
        assert rep["kids"] == ["dk-1", "dk-2"]
        assert c.submit(seal_window(dk2, "cam1", 2, 1.0, 2.0, window(1))).status == "ok"  # fetched on demand
        assert c.submit(seal_window(dep.dk, "cam1", 3, 2.0, 3.0, window(1))).status == "ok"  # grace period
        with pytest.raises(ConfigError, match="already provisioned"):
            provision_data_key(dep.ke_addr, dk2, dep.do, dep.verifier("key"), allow)
        provision_data_key(dep.ke_addr, dk3, dep.do, dep.verifier("key"), allow, grace_s=0)
        time.sleep(1.2)  # the enclave re-fetches keys for an unknown kid at most once per second
        assert c.submit(seal_window(dk3, "cam1", 4, 3.0, 4.0, window(1))).status == "ok"
        old = c.submit(seal_window(dk2, "cam1", 5, 4.0, 5.0, window(1)))
        assert (old.status, old.reason) == ("rejected", "unknown_kid")
        assert c.status()["data_kids"] == ["dk-3"]
    assert_no_secrets([dep.log("key"), dep.log("eval")], dep.secrets())


def test_window_rejections_are_counted_not_fatal(deployment):  # noqa: F811
    dep = deployment
    _provision_all(dep)
    with dep.client() as c:
        c.set_policy(dep.signed_policy())
        c.hello("cam1", RULES_ALL)
        good = seal_window(dep.dk, "cam1", 1, 0.0, 1.0, window(1))
        flipped = bytearray(good)
        flipped[-5] ^= 0x10
        attacker = generate_data_key("dk-1")
        results = [
            c.submit(bytes(flipped)),
            c.submit(b"\x00garbage"),
            c.submit(seal_window(attacker, "cam1", 9, 0.0, 1.0, window(1))),
            c.submit(good),
        ]
        assert [(r.status, r.reason) for r in results] == [
            ("rejected", "auth"),
            ("rejected", "malformed"),
            ("rejected", "auth"),
            ("ok", None),
        ]
        assert c.stats()["windows_rejected"] == {"auth": 2, "malformed": 1}
    # the host swaps the stored (owner-encrypted) model package: the enclave refuses to start with it
    dep.stop("eval")
    pkg = dep.root / "eval-state" / "model.pkg"
    data = bytearray(pkg.read_bytes())
    data[len(data) // 2] ^= 0x01
    pkg.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="modified on disk"):
        dep.start("eval")
    assert_no_secrets([dep.log("eval")], dep.secrets())


def test_model_input_transform_is_applied_inside_the_enclave(deployment):  # noqa: F811
    """A package declaring `input_transform: person-centred` gets it applied after decryption."""
    dep = deployment
    meta = json.loads((dep.root / "model.json").read_text())
    meta["input_transform"] = "person-centred"
    # a random ST-GCN is nearly uniform whatever its input: sharpen its classifier so inputs matter
    state = torch.load(dep.root / "model.pt")
    state["fcn.weight"], state["fcn.bias"] = state["fcn.weight"] * 20, state["fcn.bias"] * 0
    torch.save(state, dep.root / "sharp.pt")
    dep.package = package_model(
        dep.root / "sharp.pt", dep.root / "labels.txt", meta, dep.mk, dep.root / "centred.vcpkg"
    )
    _provision_all(dep)
    # a small person (a few hundredths of the frame) off-centre: the transform changes the input a lot
    x = (window(3) * 0.05 + 0.2).astype("float32")
    x[2] = np.abs(x[2]) + 0.1  # every joint present
    with dep.client() as c:
        c.set_policy(dep.signed_policy())
        c.hello("cam1", RULES_ALL)
        r = c.submit(seal_window(dep.dk, "cam1", 1, 0.0, 1.6, x, (7,)))
        ev = dep.verifier("eval").verify(c.evidence(nonce := new_nonce()), nonce)
    assert r.status == "ok"
    got = AlertOpener(dep.c1, ev.sign_pub).open(r.alerts[0])
    model = STGCN.from_checkpoint(dep.root / "sharp.pt").eval()
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(apply_input_transform(x[None], "person-centred"))), 1)[0]
        raw = torch.softmax(model(torch.from_numpy(x[None])), 1)[0]
    for lab, p in got["topk"]:  # exact ring arithmetic: probabilities within ~1e-4 of the float model
        assert p == pytest.approx(float(want[LABELS.index(lab)]), abs=5e-4)
    assert float((want - raw).abs().max()) > 2e-3  # the check above would fail without the transform


def test_unknown_input_transform_is_refused_at_packaging(deployment):  # noqa: F811
    dep = deployment
    meta = json.loads((dep.root / "model.json").read_text())
    meta["input_transform"] = "mirror"
    with pytest.raises(ConfigError, match="input_transform"):
        package_model(dep.root / "model.pt", dep.root / "labels.txt", meta, dep.mk, dep.root / "x.vcpkg")
