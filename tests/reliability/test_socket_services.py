"""Every socket service is bounded and owns its socket path (issue 19.5, issue 12 item 2).

Real processes on real Unix sockets: the enclaves' `RequestServer` (evaluation and key enclave) and
the GPU worker's `serve` loop, each started by `socket_server_main` with a lowered fd limit.
- accept() running into EMFILE is logged and backed off; the service keeps serving afterwards;
- a connection cap (extra connections are closed at once) and an idle timeout (silent peers cut);
- framing junk closes the connection with a log line that carries no payload;
- the socket's directory is created; a live socket is never unlinked (the second instance refuses
  in one line naming the path); a stale file is replaced; the file is removed on exit.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclave_bridge.shared.errors import TransportError
from enclave_bridge.shared.wire import recv_frame, send_frame
from tests.enclave_bridge.test_enclave_service_support import make_deployment
from tests.security.test_security_support import short_root

REPO = Path(__file__).resolve().parents[2]
OP = {"request": "status", "gpu": "ping"}


@pytest.fixture
def root() -> Iterator[Path]:
    d = short_root("sock")
    d.mkdir(parents=True)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Service:
    """One `socket_server_main` process; `out` accumulates what it logged."""

    def __init__(self, kind: str, sock: Path, nofile: int = 1024, idle_s: float = 60.0, max_conn: int = 64):
        self.kind, self.path, self.addr = kind, sock, f"unix:{sock}"
        cmd = [sys.executable, "-m", "tests.reliability.socket_server_main", kind, self.addr]
        cmd += [str(nofile), str(idle_s), str(max_conn)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.out = ""
        deadline = time.monotonic() + 90
        while "READY" not in self.out:
            assert self.proc.poll() is None or self._read(0.1), f"service exited: {self.out}"
            assert self.proc.poll() is None, f"service exited: {self.out}"
            assert time.monotonic() < deadline, f"service not ready: {self.out}"
            self._read(0.2)

    def _read(self, timeout_s: float) -> bool:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if r:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            self.out += chunk.decode(errors="replace")
            return bool(chunk)
        return False

    def wait_log(self, text: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.out:
            assert time.monotonic() < deadline, f"{text!r} never logged: {self.out[-2000:]}"
            self._read(0.2)

    def call(self, sock: socket.socket | None = None) -> dict:
        own = sock is None
        s = sock or connect(self.path)
        try:
            send_frame(s, {"op": OP[self.kind], "id": 7})
            rep = recv_frame(s)
        finally:
            if own:
                s.close()
        assert isinstance(rep, dict) and rep.get("ok") is True, rep
        return rep

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        while self._read(0.05):
            pass
        return rc


def connect(path: Path, timeout_s: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    s.connect(str(path))
    return s


def closed_by_peer(s: socket.socket, timeout_s: float = 30.0) -> bool:
    """True when the server closes `s` (EOF) within `timeout_s`."""
    s.settimeout(timeout_s)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


@pytest.mark.parametrize("kind", ["request", "gpu"])
def test_accept_loop_survives_emfile(root: Path, kind: str) -> None:
    svc = Service(kind, root / "svc.sock", nofile=48 if kind == "request" else 64)
    clients: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 60
        while "EMFILE" not in svc.out and len(clients) < 200:  # far more than the fd limit
            assert time.monotonic() < deadline, f"{len(clients)} connections, no EMFILE: {svc.out[-2000:]}"
            try:
                clients.append(connect(svc.path, timeout_s=0.5))
            except OSError:  # backlog full: the server is behind, or cannot accept at all
                svc._read(0.1)
        svc.wait_log("accept failed (EMFILE")
        assert svc.proc.poll() is None, svc.out
        for c in clients:
            c.close()
        clients.clear()
        deadline = time.monotonic() + 60
        while True:  # the server catches up, closes the dead connections and serves again
            try:
                svc.call()
                break
            except (OSError, TransportError):
                assert time.monotonic() < deadline, svc.out[-2000:]
                time.sleep(0.2)
        assert svc.proc.poll() is None
    finally:
        for c in clients:
            c.close()
        svc.stop()
    assert "Traceback" not in svc.out


@pytest.mark.parametrize("kind", ["request", "gpu"])
def test_connection_limit_and_idle_timeout(root: Path, kind: str) -> None:
    svc = Service(kind, root / "svc.sock", idle_s=1.0, max_conn=2)
    try:
        a, b = connect(svc.path), connect(svc.path)
        svc.call(a)
        svc.call(b)  # both accepted and served: the cap is reached
        extra = connect(svc.path)
        assert closed_by_peer(extra), "a connection over the cap must be closed"
        svc.wait_log("connection limit 2 reached")
        assert closed_by_peer(a) and closed_by_peer(b), "idle connections must be cut"
        for s in (a, b, extra):
            s.close()
        deadline = time.monotonic() + 30
        while True:  # slots are free again once the idle connections are gone
            c = connect(svc.path)
            try:
                svc.call(c)
                break
            except TransportError:
                assert time.monotonic() < deadline, svc.out[-2000:]
                time.sleep(0.2)
            finally:
                c.close()
    finally:
        svc.stop()


def test_framing_junk_closes_with_a_log_line_and_no_payload(root: Path) -> None:
    svc = Service("request", root / "svc.sock")
    try:
        s = connect(svc.path)
        s.sendall(b"\x00\x00\x00\x05SECRETJUNK")  # a 5-byte body that is not msgpack
        with pytest.raises(TransportError):
            recv_frame(s)
        s.close()
        svc.wait_log("on bad framing")
        svc.call()  # the service is unaffected
    finally:
        svc.stop()
    assert "SECRET" not in svc.out


def test_socket_path_created_probed_and_removed(root: Path) -> None:
    path = root / "not" / "yet" / "svc.sock"
    first = Service("request", path)
    try:
        assert path.is_socket()
        second = subprocess.run(  # a second instance on the live path must refuse, not unlink it
            [
                sys.executable,
                "-m",
                "tests.reliability.socket_server_main",
                "request",
                f"unix:{path}",
                "1024",
                "60",
                "8",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0
        assert "another process is listening" in second.stdout + second.stderr
        first.call()  # still reachable
    finally:
        assert first.stop() == 0
    assert not path.exists(), "the socket file must be removed on exit"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a dead process's leftover file
    stale.bind(str(path))
    stale.close()
    assert path.is_socket()
    again = Service("request", path)
    try:
        again.call()
    finally:
        again.stop()
    assert not path.exists()


def test_cli_socket_errors_are_one_line(root: Path) -> None:
    """`veilcam key-enclave` on a live socket path and `veilcam gpu-worker` under an impossible
    directory: exit 1, one line naming the path, no traceback; the running key enclave still works."""
    (root / "afile").write_text("x")
    bad = root / "afile" / "sub" / "w.sock"
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "gpu-worker", "--listen", f"unix:{bad}", "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(bad.parent) in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

    dep = make_deployment(root / "dep")
    try:
        dep.start("key")
        sock = Path(dep.ke_addr.removeprefix("unix:"))
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline",
                "key-enclave",
                "--listen",
                dep.ke_addr,
                "--state-dir",
                str(dep.root / "key-state"),
                "--config",
                str(dep.cfg_path("key")),
                "--platform-key",
                str(dep.root / "platform" / "platform.key"),
            ],
            cwd=dep.root,
            env=dict(os.environ, PYTHONPATH=str(dep.code)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "another process is listening" in r.stderr and str(sock) in r.stderr
        from enclave_bridge.host.client import key_enclave_status

        assert key_enclave_status(dep.ke_addr)["backend"] == "simulated"
        dep.stop("key")
        assert not sock.exists()
    finally:
        dep.stop_all()
        with contextlib.suppress(OSError):
            shutil.rmtree(dep.root)
