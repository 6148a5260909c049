"""A worker connection that went away between windows (idle timeout, worker restart) costs nothing.

The worker closes idle connections (its idle timeout) and may be restarted by its host. The next
request then fails at once on the stale socket: the client reconnects once (re-attaching its
shared-memory arena and re-uploading the model to a fresh worker), so the window still runs on the
worker — no transport error, no window finished in the enclave — and its logits are exact.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from enclave_bridge.measured.worker_client import wait_for_worker
from enclave_bridge.protocol import SecureEvaluator
from tests.enclave_bridge.secure_helpers import calibrated_model, skeleton_windows


def _start(addr: str) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "gpu-worker",
        "--listen",
        addr,
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_worker(addr, timeout_s=60)
    return proc


def test_restarted_worker_between_windows_is_reconnected_without_fallback(tmp_path) -> None:
    model = calibrated_model(5, seed=3, t=8, m=1)
    x = skeleton_windows(1, 8, 1, seed=2)
    addrs = [f"unix:{tmp_path / 'a.sock'}", f"unix:{tmp_path / 'b.sock'}"]
    procs = [_start(a) for a in addrs]
    try:
        with SecureEvaluator(model, "split2", workers=addrs, pool_capacity=0) as ev:
            ref = ev.exact_reference(x)
            assert np.array_equal(ev.evaluate(x), ref)
            procs[1].terminate()  # worker B goes away (and loses the model) between windows
            procs[1].wait(timeout=30)
            procs[1] = _start(addrs[1])
            out = ev.evaluate(x)
            assert np.array_equal(out, ref)
            assert ev.stats.transport_errors == 0
            assert ev.stats.enclave_recomputes == 0
            assert ev.stats.freivalds_failures == 0
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
