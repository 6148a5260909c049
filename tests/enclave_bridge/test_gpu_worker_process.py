"""The GPU worker as a real OS process (TCP, and Unix sockets with shared memory): exact results
in every delegated mode incl. split2/split3 with one process per party, tamper detection with
blame by address, a stalled party of three, crash + restart, protocol v2 robustness."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from enclave_bridge.measured.worker_client import WorkerClient, wait_for_worker
from enclave_bridge.protocol import SecureEvaluator
from enclave_bridge.shared.errors import TransportError
from enclave_bridge.shared.wire import (
    connect,
    pack_tensor,
    recv_frame,
    send_frame,
    send_raw,
    unpack_tensor,
)
from tests.conftest import free_port
from tests.enclave_bridge.secure_helpers import calibrated_model, skeleton_windows
from tests.security.test_security_support import short_root


class WorkerProcess:
    """`veilcam gpu-worker` in a subprocess we own (started/killed by pid only)."""

    def __init__(self, *extra: str, unix: Path | None = None) -> None:
        self.port = free_port()
        self.addr = f"unix:{unix}" if unix is not None else f"127.0.0.1:{self.port}"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> None:
        cmd = [sys.executable, "-m", "pipeline", "gpu-worker", "--listen", self.addr, "--device", "cpu"]
        self.proc = subprocess.Popen(
            [*cmd, "--threads", "1", *self.extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if wait:
            self.wait()

    def wait(self) -> None:
        wait_for_worker(self.addr, timeout_s=120)  # several workers start at once on 2 cores

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


N_OPS = 23  # delegated ops per window (10 gcn + 10 tcn + 2 res + fc)


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
    return SecureEvaluator(model, "enclave").exact_reference(x)


def test_remote_paper_mode_exact(worker_proc, model, x, reference):
    with SecureEvaluator(model, "paper", worker_proc.addr, pool_capacity=0) as ev:
        assert np.array_equal(ev.evaluate(x), reference)
        assert ev.stats.freivalds_failures == 0 and ev.stats.transport_errors == 0
        assert ev.stats.bytes_to_worker > x.size * 4 and ev.stats.bytes_from_worker > 0
        assert ev.stats.last["transport"] > 0
        client = ev.workers[0]
        assert isinstance(client, WorkerClient) and client.raw_frames  # TCP: raw tensor segments
        assert client.raw_calls >= N_OPS  # every compute of the window went as raw segments


def test_raw_segments_are_checked_before_a_byte_is_read(worker_proc):
    """A request whose raw segment disagrees with its announced shape, or that announces more
    than the frame limit, closes that connection; the worker keeps serving others."""
    head = {"op": "compute", "model_id": "m", "names": ["a"], "terms": [{"slot": 0, "sign": 1, "raw": 0}]}
    with connect(worker_proc.addr) as sock:
        send_frame(sock, {**head, "raw": [{"dtype": "int64", "shape": [4]}]})
        sock.sendall(struct.pack(">Q", 16) + bytes(16))  # 16 bytes where 32 were announced
        with pytest.raises(TransportError):
            recv_frame(sock)
    with connect(worker_proc.addr) as sock:
        send_frame(sock, {**head, "raw": [{"dtype": "int64", "shape": [1 << 30]}]})  # 8 GiB
        with pytest.raises(TransportError):
            recv_frame(sock)
    with connect(worker_proc.addr) as sock:  # a well-formed raw request for an unknown model
        send_frame(sock, {**head, "raw": [{"dtype": "int64", "shape": [2, 3]}], "raw_reply": True})
        send_raw(sock, [np.zeros((2, 3), np.int64)])
        reply = recv_frame(sock)
        assert reply["ok"] is False and reply["code"] == "unknown_model"
        send_frame(sock, {"op": "hello"})
        assert recv_frame(sock)["raw"] is True


class KillingClient(WorkerClient):
    """Kills the worker process right before the k-th compute request: a crash mid-inference."""

    def __init__(self, addr: str, proc: WorkerProcess, kill_at: int) -> None:
        super().__init__(addr, timeout_s=30)
        self.proc, self.kill_at, self.calls = proc, kill_at, 0

    def compute(self, model_id, names, terms, out_shapes=None):
        self.calls += 1
        if self.calls == self.kill_at:
            self.proc.kill()
        return super().compute(model_id, names, terms, out_shapes)


def test_crash_mid_inference_falls_back_then_recovers_after_restart(worker_proc, model, x, reference):
    client = KillingClient(worker_proc.addr, worker_proc, kill_at=0)
    with SecureEvaluator(model, "slalom", client, pool_capacity=0) as ev:
        client.kill_at = client.calls + 5  # after the construction's warm-up window
        assert np.array_equal(ev.evaluate(x), reference)  # finished in the enclave
        assert ev.stats.transport_errors == 1
        delegated_before = ev.stats.delegated_ops
        assert 0 < delegated_before < N_OPS
        assert ev.stats.enclave_recomputes == N_OPS - delegated_before  # the rest ran in the enclave
        # while the worker is down, windows still succeed (enclave path)
        assert np.array_equal(ev.evaluate(x), reference)
        assert ev.stats.transport_errors == 2
        worker_proc.start()  # restarted: fresh process without the model
        assert np.array_equal(ev.evaluate(x), reference)
        assert ev.stats.transport_errors == 2
        assert ev.stats.delegated_ops == delegated_before + N_OPS  # whole window delegated again
        assert ev.stats.freivalds_failures == 0


def test_crash_without_fallback_raises_transport_error(worker_proc, model, x):
    client = KillingClient(worker_proc.addr, worker_proc, kill_at=0)
    ev = SecureEvaluator(model, "paper", client, pool_capacity=0, fallback=False)
    client.kill_at = client.calls + 2
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
            assert ev.stats.freivalds_failures == ev.stats.delegated_ops == N_OPS
            assert dict(ev.stats.worker_faults) == {w.addr: N_OPS}  # blamed by address
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
        term = {"slot": 0, "sign": 1, "input": _tensor(np.int64)}
        send_frame(sock, {"op": "compute", "model_id": "missing", "names": ["a"], "terms": [term]})
        assert recv_frame(sock)["code"] == "unknown_model"
        # protocol v2 refusals: v1-style inputs, non-ring values, bad seeds, bad signs
        for bad_term in (
            {"slot": 0, "sign": 1, "input": _tensor(np.uint32)},
            {"slot": 0, "sign": 2, "input": _tensor(np.int64)},
            {"slot": 9, "sign": 1, "input": _tensor(np.int64)},
            {"slot": 0, "sign": 1, "seed": b"short", "shape": [4]},
            {"slot": 0, "sign": 1, "seed": bytes(32), "shape": [0]},
            {"slot": 0, "sign": 1, "shm": 0, "shape": [4]},  # no arena attached
        ):
            load = {"op": "load", "model_id": "m1", "ops": [_op_payload()]}
            send_frame(sock, load)
            assert recv_frame(sock)["ok"]
            send_frame(sock, {"op": "compute", "model_id": "m1", "names": ["a"], "terms": [bad_term]})
            reply = recv_frame(sock)
            assert reply["ok"] is False and reply["error"], bad_term
        send_frame(sock, {"op": "load", "model_id": "m2", "ops": [_op_payload(np.full((4, 2), 2**61 - 1))]})
        assert recv_frame(sock)["ok"] is False  # p itself is not a ring element
        # a good request after all that: the worker computes x·W mod p exactly
        x = np.arange(8, dtype=np.int64).reshape(2, 4) * (2**57)  # full-width ring elements < p
        good = {"slot": 0, "sign": 1, "input": pack_tensor(x)}
        send_frame(sock, {"op": "compute", "model_id": "m1", "names": ["a"], "terms": [good]})
        reply = recv_frame(sock)
        assert reply["ok"], reply
        y = unpack_tensor(reply["outputs"][0])
        w = _op_weight()
        want = (x.astype(object).dot(w.astype(object))) % (2**61 - 1)
        assert y.tolist() == want.tolist()
        send_frame(sock, {"op": "hello"})
        hello = recv_frame(sock)
        assert hello["ok"] and hello["modulus"] == 2**61 - 1 and hello["device"] == "cpu"
        assert hello["version"] == 2


def _tensor(dtype=np.int64):
    return pack_tensor(np.zeros((2, 4), dtype))


def _op_weight() -> np.ndarray:
    return (np.arange(8, dtype=np.int64).reshape(4, 2) * 12345) % (2**61 - 1)


def _op_payload(w: np.ndarray | None = None) -> dict:
    w = _op_weight() if w is None else w.astype(np.int64)
    return {"name": "a", "meta": {"kind": "dense", "stride": 1, "v": 0, "k": 0}, "slots": [pack_tensor(w)]}


# -- split modes: one `veilcam gpu-worker` process per non-colluding party, over Unix sockets ----


@pytest.fixture
def sockdir():
    d = short_root("gw")
    d.mkdir(parents=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _parties(sockdir: Path, n: int, extra: dict[int, tuple[str, ...]] | None = None) -> list[WorkerProcess]:
    procs = [WorkerProcess(*(extra or {}).get(k, ()), unix=sockdir / f"w{k}.sock") for k in range(n)]
    try:
        for p in procs:
            p.start(wait=False)  # start-ups overlap
        for p in procs:
            p.wait()
    except Exception:
        for p in procs:
            p.stop()
        raise
    return procs


@pytest.mark.parametrize("mode", ["split2", "split3"])
def test_split_modes_with_worker_processes_exact_and_equal_to_slalom(sockdir, model, x, reference, mode):
    n = 2 if mode == "split2" else 3
    procs = _parties(sockdir, n)
    try:
        with SecureEvaluator(model, mode, workers=[p.addr for p in procs], timeout_s=60) as ev:
            assert ev.worker_names == [p.addr for p in procs]
            got = ev.evaluate(x)
            assert np.array_equal(got, reference)
            st = ev.stats
            assert st.freivalds_checks == st.delegated_ops == N_OPS
            assert st.freivalds_failures == st.transport_errors == st.enclave_recomputes == 0
            assert st.bytes_to_worker > 0 and st.bytes_from_worker > 0
        with SecureEvaluator(model, "slalom", procs[0].addr, pool_capacity=0) as ev:
            assert np.array_equal(ev.evaluate(x), got)  # bit-identical across modes
    finally:
        for p in procs:
            p.stop()


def test_split3_one_garbage_process_named_by_address(sockdir, model, x, reference):
    procs = _parties(sockdir, 3, {2: ("--tamper", "garbage", "--tamper-rate", "1.0")})
    try:
        with SecureEvaluator(model, "split3", workers=[p.addr for p in procs], timeout_s=60) as ev:
            assert np.array_equal(ev.evaluate(x), reference)
            st = ev.stats
            assert st.freivalds_failures == st.enclave_recomputes == st.delegated_ops == N_OPS
            assert dict(st.worker_faults) == {procs[2].addr: N_OPS}
            assert st.transport_errors == 0
    finally:
        for p in procs:
            p.stop()


def test_split3_one_stalled_process_times_out_and_the_window_stays_exact(sockdir, model, x, reference):
    """Party B never answers (`--tamper stall`): the request times out (short timeout_s), the
    window is finished in the enclave with exact logits, and the timeout is counted."""
    procs = _parties(sockdir, 3, {1: ("--tamper", "stall", "--tamper-rate", "1.0")})
    try:
        with SecureEvaluator(model, "split3", workers=[p.addr for p in procs], timeout_s=2) as ev:
            assert np.array_equal(ev.evaluate(x), reference)
            st = ev.stats
            assert st.transport_errors == 1  # the first stage's timeout, then the enclave path
            assert st.delegated_ops == 0 and st.enclave_recomputes == N_OPS
            assert st.freivalds_failures == 0 and not st.worker_faults
            assert all(p.proc is not None and p.proc.poll() is None for p in procs)
    finally:
        for p in procs:
            p.kill()
