"""The enclave in `paper` mode: masked linear layers on a separate `veilcam gpu-worker` process."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.host.client import provision_data_key, provision_model
from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.attest import new_nonce
from enclave_bridge.shared.windows import seal_window
from tests.enclave_bridge.test_enclave_service_support import (
    LABELS,
    assert_no_secrets,
    deployment,  # noqa: F401  (fixture)
    window,
)


@pytest.mark.slow
def test_paper_mode_with_remote_gpu_worker(deployment):  # noqa: F811
    dep = deployment
    worker_addr = f"unix:{dep.root / 'worker.sock'}"
    log = (dep.root / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "gpu-worker", "--listen", worker_addr, "--device", "cpu"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not (dep.root / "worker.sock").exists():
            assert worker.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        dep.eval_cfg["evaluator"] = {"mode": "paper", "worker": worker_addr}
        dep.cfg_path("eval").write_text(yaml.safe_dump(dep.eval_cfg))
        dep.start("key")
        provision_data_key(dep.ke_addr, dep.dk, dep.do, dep.verifier("key"), [dep.measurement("eval")])
        dep.start("eval")
        provision_model(dep.ev_addr, dep.package.read_bytes(), dep.mk, dep.mo, dep.verifier("eval"))
        x = window(7)
        with dep.client() as c:
            assert c.status()["mode"] == "paper"
            c.set_policy(dep.signed_policy())
            c.hello("cam1", {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0})
            r = c.submit(seal_window(dep.dk, "cam1", 1, 0.0, 1.6, x))
            ev = c.evidence(nonce := new_nonce())
            stats = c.stats()
        assert r.status == "ok" and len(r.alerts) == 1
        alert = AlertOpener(dep.c1, dep.verifier("eval").verify(ev, nonce).sign_pub).open(r.alerts[0])
        model = STGCN.from_checkpoint(dep.root / "model.pt").eval()
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(x[None])).double(), dim=1)[0].numpy()
        for lab, p in alert["topk"]:
            assert p == pytest.approx(float(probs[LABELS.index(lab)]), abs=2e-3)
        assert np.isclose(alert["score"], probs.max(), atol=2e-3)
        ev_stats = stats["evaluator"]
        assert ev_stats["mode"] == "paper" and ev_stats["windows"] == 1
        assert ev_stats["bytes_to_worker"] > 0 and ev_stats["freivalds_checks"] > 0
        assert ev_stats["freivalds_failures"] == 0
        # the worker dies: the enclave neither hangs nor crashes; the window is evaluated on the
        # enclave path or rejected as eval_error (counted)
        worker.terminate()
        worker.wait(timeout=10)
        with dep.client() as c:
            r2 = c.submit(seal_window(dep.dk, "cam1", 2, 1.6, 3.2, x))
            assert (r2.status, r2.reason) in {("ok", None), ("rejected", "eval_error")}
            assert c.status()["model_kid"] == "mk-1"
        assert_no_secrets(
            [dep.log("eval"), dep.log("key"), (dep.root / "worker.log").read_text()], dep.secrets()
        )
    finally:
        if worker.poll() is None:
            worker.terminate()
            worker.wait(timeout=10)
