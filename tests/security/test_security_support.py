"""Test harness for the reliability/security suite (no tests here).

- `TcpProxy`: a real TCP forwarder placed between two of our processes (enclave → GPU worker). It
  records every byte in both directions (what the untrusted worker *received*), can switch its
  upstream, cut live connections, or "hang" (accept and read, never answer) to model a stuck
  worker.
- `GpuWorker`: a `veilcam gpu-worker` subprocess we own (optionally `--tamper`).
- `rss_bytes(pid)`: resident memory of a process we started (bounded-memory checks).
- `find_secrets(...)`: where key bytes (raw, hex, base64) or other forbidden byte strings occur.
- `provisioned(dep, ...)`: key enclave + evaluation enclave + model + policy, ready for windows.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from enclave_bridge.host.client import provision_data_key, provision_model
from enclave_bridge.measured.worker_client import wait_for_worker
from tests.conftest import free_port

RULES_ALL = {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0}


class TcpProxy:
    """Forwards `127.0.0.1:<port>` to `upstream` (host:port), recording both directions."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.to_upstream = bytearray()  # what the upstream (e.g. the GPU worker) received
        self.to_client = bytearray()
        self.hang = False
        self.connections = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._srv = socket.create_server(("127.0.0.1", self.port))
        self._srv.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            if self.hang:
                with self._lock:
                    self._socks.append(c)
                threading.Thread(target=self._sink, args=(c,), daemon=True).start()
                continue
            host, port = self.upstream.rsplit(":", 1)
            try:
                u = socket.create_connection((host, int(port)), timeout=5)
            except OSError:
                c.close()
                continue
            u.settimeout(None)
            with self._lock:
                self._socks += [c, u]
            threading.Thread(target=self._pipe, args=(c, u, self.to_upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, self.to_client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self._lock:
                    record += data
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _sink(self, c: socket.socket) -> None:
        """A hung peer: reads requests, never replies."""
        with contextlib.suppress(OSError):
            while c.recv(1 << 16):
                pass

    def cut(self) -> None:
        """Close every live connection (the next request reconnects)."""
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._stop.set()
        self._srv.close()
        self.cut()


class GpuWorker:
    """`veilcam gpu-worker --listen 127.0.0.1:<port> --device cpu [extra]` (our own subprocess)."""

    def __init__(self, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "pipeline", "--log-level", "DEBUG", "gpu-worker"]
        cmd += ["--listen", self.addr, "--device", "cpu", "--threads", "1", *extra]
        self.proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        wait_for_worker(self.addr, timeout_s=90)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def rss_bytes(pid: int) -> int:
    """VmRSS of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def encodings(secret: bytes) -> list[bytes]:
    """The forms a leaked key would take: raw, hex (both cases), base64 (standard/urlsafe, unpadded)."""
    out = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    for enc in (base64.b64encode(secret), base64.urlsafe_b64encode(secret)):
        out.append(enc.rstrip(b"=")[:40])
    return out


def find_secrets(
    sources: Mapping[str, bytes], secrets: Mapping[str, bytes], needles: Mapping[str, bytes] | None = None
) -> list[str]:
    """`"<source>: <secret name>"` for every secret (any encoding) or raw needle found in a source."""
    hits = []
    for src, data in sources.items():
        for name, secret in secrets.items():
            if any(e in data for e in encodings(secret)):
                hits.append(f"{src}: {name}")
        for name, needle in (needles or {}).items():
            if needle in data:
                hits.append(f"{src}: {name}")
    return hits


def files_outside(root: Path, excluded: Iterable[Path]) -> dict[str, bytes]:
    """Every regular file under `root` except those under an excluded directory."""
    ex = [p.resolve() for p in excluded]
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_socket() and not any(p.resolve().is_relative_to(e) for e in ex):
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def provisioned(dep, evaluator: dict | None = None) -> None:
    """Start both enclaves (optionally with another evaluator config), provision key, model, policy."""
    if evaluator is not None:
        dep.eval_cfg["evaluator"] = evaluator
        dep.cfg_path("eval").write_text(yaml.safe_dump(dep.eval_cfg))
    dep.start("key")
    provision_data_key(dep.ke_addr, dep.dk, dep.do, dep.verifier("key"), [dep.measurement("eval")])
    dep.start("eval")
    provision_model(dep.ev_addr, dep.package.read_bytes(), dep.mk, dep.mo, dep.verifier("eval"))
    with dep.client() as c:
        c.set_policy(dep.signed_policy())


def short_root(tag: str) -> Path:
    """A short temp dir (Unix socket paths are limited to ~107 bytes)."""
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"vc{tag}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
