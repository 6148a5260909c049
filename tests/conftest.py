"""Shared fixtures: a real Mosquitto on an ephemeral loopback port, sample-clip lookup."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_SAMPLES = REPO_ROOT.parent / "shared" / "samples"


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (tiny race accepted: tests only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
    )


@dataclass
class Broker:
    """A Mosquitto process the test owns; `stop()`/`start()` simulate an outage on the same port."""

    host: str
    port: int
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = mosquitto_binary()
        if binary is None:
            pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf)],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def make_broker(tmp_path: Path) -> Broker:
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_queued_messages 0\n"
        "log_dest stdout\n"
    )
    return Broker(host="127.0.0.1", port=port, conf=conf, log=tmp_path / "mosquitto.log")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A fresh Mosquitto broker for one test; skipped with a reason when not installed."""
    broker = make_broker(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def shared_sample() -> object:
    """Map a file name to its path in the shared sample directory (`shared/samples/` next to the
    checkout, when present; third-party clips that are not shipped), skipping the test if absent."""

    def _get(name: str) -> Path:
        path = SHARED_SAMPLES / name
        if not path.exists():
            pytest.skip(f"sample {name} not found in {SHARED_SAMPLES} (shared/ not beside the checkout)")
        return path

    return _get
