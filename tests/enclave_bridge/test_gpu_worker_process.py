"""The GPU worker as a real OS process over TCP: exact results, tamper detection, crash + restart."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest

from enclave_bridge.errors import TransportError
from enclave_bridge.protocol import SecureEvaluator
from enclave_bridge.wire import connect, recv_frame, send_frame
from enclave_bridge.worker_client import WorkerClient, wait_for_worker
from tests.conftest import free_port
from tests.enclave_bridge.secure_helpers import calibrated_model, skeleton_windows


class WorkerProcess:
    """`veilcam gpu-worker` in a subprocess we own (started/killed by pid only)."""

    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "pipeline", "gpu-worker", "--listen", self.addr, "--device", "cpu"]
        self.proc = subprocess.Popen(
            [*cmd, *self.extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_worker(self.addr, timeout_s=60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def worker_proc():
    w = WorkerProcess()
    w.start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def model():
    return calibrated_model(6, seed=4, t=12, m=1)


@pytest.fixture(scope="module")
def x():
    return skeleton_windows(1, 8, 1, seed=8)


@pytest.fixture(scope="module")
def reference(model, x):
    return SecureEvaluator(model, "enclave").evaluate(x)


def test_remote_paper_mode_exact(worker_proc, model, x, reference):
    with SecureEvaluator(model, "paper", worker_proc.addr, pool_capacity=0) as ev:
        assert np.array_equal(ev.evaluate(x), reference)
        assert ev.stats.freivalds_failures == 0 and ev.stats.transport_errors == 0
        assert ev.stats.bytes_to_worker > x.size * 4 and ev.stats.bytes_from_worker > 0
        assert ev.stats.last["transport"] > 0


class KillingClient(WorkerClient):
    """Kills the worker process right before the k-th compute request: a crash mid-inference."""

    def __init__(self, addr: str, proc: WorkerProcess, kill_at: int) -> None:
        super().__init__(addr, timeout_s=30)
        self.proc, self.kill_at, self.calls = proc, kill_at, 0

    def compute(self, model_id, x, names):
        self.calls += 1
        if self.calls == self.kill_at:
            self.proc.kill()
        return super().compute(model_id, x, names)


def test_crash_mid_inference_falls_back_then_recovers_after_restart(worker_proc, model, x, reference):
    client = KillingClient(worker_proc.addr, worker_proc, kill_at=5)
    with SecureEvaluator(model, "slalom", client, pool_capacity=0) as ev:
        assert np.array_equal(ev.evaluate(x), reference)  # finished in the enclave
        assert ev.stats.transport_errors == 1
        delegated_before = ev.stats.delegated_ops
        assert 0 < delegated_before < 32
        assert ev.stats.enclave_recomputes == 32 - delegated_before  # the rest ran in the enclave
        # while the worker is down, windows still succeed (enclave path)
        assert np.array_equal(ev.evaluate(x), reference)
        assert ev.stats.transport_errors == 2
        worker_proc.start()  # restarted: fresh process without the model
        assert np.array_equal(ev.evaluate(x), reference)
        assert ev.stats.transport_errors == 2
        assert ev.stats.delegated_ops == delegated_before + 32  # whole window delegated again
        assert ev.stats.freivalds_failures == 0


def test_crash_without_fallback_raises_transport_error(worker_proc, model, x):
    client = KillingClient(worker_proc.addr, worker_proc, kill_at=2)
    ev = SecureEvaluator(model, "paper", client, pool_capacity=0, fallback=False)
    with pytest.raises(TransportError):
        ev.evaluate(x)
    ev.close()


def test_unreachable_worker_at_start_is_not_fatal(model, x, reference):
    addr = f"127.0.0.1:{free_port()}"
    with SecureEvaluator(model, "paper", addr, pool_capacity=0, timeout_s=2) as ev:
        assert np.array_equal(ev.evaluate(x), reference)
        assert ev.stats.transport_errors == 1


def test_tampering_process_detected(model, x, reference):
    w = WorkerProcess("--tamper", "scale", "--tamper-rate", "1.0")
    w.start()
    try:
        with SecureEvaluator(model, "slalom", w.addr, pool_capacity=0) as ev:
            assert np.array_equal(ev.evaluate(x), reference)
            assert ev.stats.freivalds_failures == ev.stats.delegated_ops == 32
    finally:
        w.stop()


def test_worker_survives_garbage_and_bad_requests(worker_proc):
    host, port = worker_proc.addr.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"\x00\x00\x00\x05hello")  # not msgpack
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"\xff\xff\xff\xff")  # absurd length: refused before allocation
    sock = connect(worker_proc.addr, 5)
    with sock:
        for bad in ({"op": "nope"}, [1, 2], {"op": "compute", "model_id": "x", "names": ["a"], "input": 3}):
            send_frame(sock, bad)
            reply = recv_frame(sock)
            assert reply["ok"] is False and reply["error"]
        send_frame(sock, {"op": "compute", "model_id": "missing", "names": [], "input": _tensor()})
        assert recv_frame(sock)["code"] == "unknown_model"
        send_frame(sock, {"op": "hello"})
        hello = recv_frame(sock)
        assert hello["ok"] and hello["modulus"] == 2**31 - 1 and hello["device"] == "cpu"


def _tensor():
    from enclave_bridge.wire import pack_tensor

    return pack_tensor(np.zeros(4, np.uint32))
