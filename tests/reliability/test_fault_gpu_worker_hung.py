"""A GPU worker that hangs (accepts, reads, never answers) or is SIGSTOPped mid-stream: requests
time out, the window is finished on the enclave path with exact results, the timeouts are
counted, and delegation resumes once the worker answers again. (A worker that *dies* is covered
by tests/enclave_bridge/test_gpu_worker_process.py.)"""

from __future__ import annotations

import signal

import numpy as np
import pytest

from enclave_bridge.protocol import SecureEvaluator
from tests.enclave_bridge.secure_helpers import calibrated_model, skeleton_windows
from tests.security.test_security_support import GpuWorker, TcpProxy


@pytest.fixture(scope="module")
def model():
    return calibrated_model(5, seed=11, t=12, m=1)


def test_hung_then_stopped_worker_times_out_falls_back_and_recovers(model, tmp_path) -> None:
    x = skeleton_windows(1, 12, 1, seed=3)
    reference = SecureEvaluator(model, "enclave").exact_reference(x)  # what delegated modes compute
    worker = GpuWorker(tmp_path / "worker.log")
    proxy = TcpProxy(worker.addr)
    try:
        with SecureEvaluator(model, "paper", proxy.addr, pool_capacity=0, timeout_s=1.5) as ev:
            assert np.array_equal(ev.evaluate(x), reference)
            ops_per_window = ev.stats.delegated_ops
            assert ops_per_window > 0 and ev.stats.transport_errors == 0
            # 1) the worker hangs: new connections are accepted and read, never answered
            proxy.hang = True
            proxy.cut()
            assert np.array_equal(ev.evaluate(x), reference)
            assert ev.stats.transport_errors == 1  # one timeout, then the window stays in the enclave
            assert ev.stats.delegated_ops == ops_per_window
            # 2) it answers again: delegation resumes (the client reconnects, re-sends the model)
            proxy.hang = False
            assert np.array_equal(ev.evaluate(x), reference)
            assert (ev.stats.transport_errors, ev.stats.delegated_ops) == (1, 2 * ops_per_window)
            # 3) the worker process is frozen (SIGSTOP) mid-stream, then thawed
            worker.proc.send_signal(signal.SIGSTOP)
            try:
                assert np.array_equal(ev.evaluate(x), reference)
                assert ev.stats.transport_errors == 2
            finally:
                worker.proc.send_signal(signal.SIGCONT)
            assert np.array_equal(ev.evaluate(x), reference)
            assert ev.stats.delegated_ops > 2 * ops_per_window
            assert ev.stats.freivalds_failures == 0
    finally:
        proxy.close()
        worker.stop()


@pytest.mark.slow
def test_enclave_with_hung_worker_answers_within_its_timeout(tmp_path) -> None:
    """A paper-mode enclave whose GPU worker hangs (`evaluator.timeout_s: 2`): every window is
    still evaluated (enclave path) and alerted, the timeouts are in the enclave's stats."""
    import shutil

    from enclave_bridge.shared.windows import seal_window
    from tests.enclave_bridge.test_enclave_service_support import make_deployment, window
    from tests.security.test_security_support import RULES_ALL, provisioned, short_root

    dep = make_deployment(short_root("hng"))
    worker = GpuWorker(dep.root / "worker.log")
    proxy = TcpProxy(worker.addr)
    try:
        provisioned(dep, {"mode": "paper", "worker": proxy.addr, "timeout_s": 2})
        with dep.client() as c:
            c.hello("cam1", RULES_ALL)
            assert c.submit(seal_window(dep.dk, "cam1", 1, 0.0, 1.0, window(1))).status == "ok"
            proxy.hang = True
            proxy.cut()
            for seq in (2, 3):
                r = c.submit(seal_window(dep.dk, "cam1", seq, 0.0, 1.0, window(seq)))
                assert (r.status, len(r.alerts)) == ("ok", 1)
            ev = c.stats()["evaluator"]
        assert ev["transport_errors"] == 2 and ev["freivalds_failures"] == 0
    finally:
        proxy.close()
        worker.stop()
        dep.stop_all()
        shutil.rmtree(dep.root, ignore_errors=True)
