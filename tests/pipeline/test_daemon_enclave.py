"""The daemon against real `veilcam enclave` processes (key enclave + evaluation enclave, simulated
backend): a replayed clip's windows are evaluated in the enclave and its alerts open for a consumer
granted by the signed policy; a camera whose data key was never provisioned is told so clearly."""

from __future__ import annotations

from pathlib import Path

from config.schema import REPO_ROOT, EnclaveConfig, RulesConfig
from enclave_bridge.host.client import provision_data_key, provision_model
from enclave_bridge.shared.attest import new_nonce
from enclave_bridge.shared.keys import generate_data_key
from pipeline.app.replay import replay_config, run_replay
from tests.enclave_bridge.test_enclave_service_support import LABELS, deployment  # noqa: F401

VTEST = REPO_ROOT / "samples" / "vtest.avi"


def _provisioned(dep) -> bytes:
    """Provision keys, model and policy; returns the enclave's verified alert-signing key."""
    dep.start("key")
    provision_data_key(dep.ke_addr, dep.dk, dep.do, dep.verifier("key"), [dep.measurement("eval")])
    dep.start("eval")
    provision_model(dep.ev_addr, dep.package.read_bytes(), dep.mk, dep.mo, dep.verifier("eval"))
    with dep.client() as c:
        c.set_policy(dep.signed_policy())
        nonce = new_nonce()
        ev = c.evidence(nonce)
    return dep.verifier("eval").verify(ev, nonce).sign_pub


def _cfg(dep, state: Path):
    cfg = replay_config(
        VTEST, state_dir=state, overrides={"max_frames": 16, "length_frames": 8, "stride_frames": 4}
    )
    return cfg.model_copy(
        update={
            "enclave": EnclaveConfig(address=dep.ev_addr, timeout_s=60),
            "rules": RulesConfig(labels=["*"], min_score=0.0, debounce_s=0.0),
        }
    )


def test_replay_through_real_enclave_processes(deployment, tmp_path: Path) -> None:  # noqa: F811
    dep = deployment
    sign_pub = _provisioned(dep)
    report = run_replay(
        VTEST,
        _cfg(dep, tmp_path / "state"),
        key=dep.dk,
        consumer_key=dep.c1,
        enclave_verify_key=sign_pub,
        progress=False,
    )
    assert report.error is None, report.error
    assert report.windows == 3 and report.windows_rejected == 0  # windows end at frames 8, 12, 16
    assert len(report.alerts) == 3
    seqs = [s for s, *_ in report.windows_timeline]
    assert [a["window_seq"] for a in report.alerts] == seqs
    assert all(a["label"] in LABELS and a["device"] == "replay" for a in report.alerts)
    alert_seqs = [a["seq"] for a in report.alerts]
    assert alert_seqs == sorted(alert_seqs) and len(set(alert_seqs)) == 3  # enclave-assigned, increasing
    assert report.stages["enclave"].count == 3


def test_unprovisioned_data_key_is_reported(deployment, tmp_path: Path) -> None:  # noqa: F811
    dep = deployment
    _provisioned(dep)
    stranger = generate_data_key("dk-never-provisioned")
    report = run_replay(VTEST, _cfg(dep, tmp_path / "state"), key=stranger, progress=False)
    assert report.exit_code == 1
    assert report.windows_rejected == report.windows == 3
    assert "rejected 3 of 3 windows" in report.error
    assert report.rejection_reasons and all("kid" in r or "auth" in r for r in report.rejection_reasons)
