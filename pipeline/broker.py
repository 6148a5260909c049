"""A local MQTT broker for `veilcam demo` and trials: Mosquitto when installed, else an embedded
Python broker (amqtt, MQTT 3.1.1 only — the publisher falls back to 3.1.1 automatically).

Production deployments run their own broker (Mosquitto/EMQX with TLS and ACLs); this module only
makes the one-command demo work on a fresh install. Both kinds run as a child process on
127.0.0.1 so stopping them is a plain terminate, and a crash of the broker cannot take the demo's
own process down with it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from enclave_bridge.errors import ConfigError, TransportError

log = logging.getLogger(__name__)

BrokerKind = Literal["auto", "mosquitto", "embedded"]
_SBIN = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


def mosquitto_path() -> str | None:
    """Mosquitto on PATH or in the usual sbin directories (Debian puts it in /usr/sbin)."""
    return shutil.which("mosquitto") or next((p for p in _SBIN if os.access(p, os.X_OK)), None)


def embedded_available() -> bool:
    try:
        import amqtt.broker  # noqa: F401
    except ImportError:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class LocalBroker:
    """A broker child process listening on `host:port`; `stop()` ends it (idempotent)."""

    kind: Literal["mosquitto", "embedded"]
    host: str
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / f"{self.kind}.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def mqtt5(self) -> bool:
        return self.kind == "mosquitto"

    def start(self, timeout_s: float = 15.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.kind == "mosquitto":
            binary = mosquitto_path()
            if binary is None:
                raise ConfigError("mosquitto is not installed (apt-get install -y mosquitto)")
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} {self.host}\n"
                "allow_anonymous true\n"
                "persistence false\n"
                # Mosquitto's default (1000) silently drops QoS 1 messages for a slow subscriber.
                "max_queued_messages 0\n"
                "log_dest stdout\n"
            )
            argv = [binary, "-c", str(conf)]
        else:
            if not embedded_available():
                raise ConfigError(
                    "no MQTT broker: install Mosquitto (apt-get install -y mosquitto) or the embedded "
                    "one (pip install 'veilcam[demo]')"
                )
            argv = [sys.executable, "-m", "pipeline.broker", "--host", self.host, "--port", str(self.port)]
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-1500:]
                raise TransportError(f"{self.kind} broker exited with {self.proc.returncode}: {tail}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    log.info("%s broker listening on %s", self.kind, self.address)
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TransportError(f"{self.kind} broker did not listen on {self.address} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> LocalBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_broker(
    kind: BrokerKind = "auto", host: str = "127.0.0.1", port: int = 0, workdir: Path | None = None
) -> LocalBroker:
    """Start a local broker: Mosquitto if installed (or asked for), else the embedded amqtt one."""
    if kind == "auto":
        kind = "mosquitto" if mosquitto_path() else "embedded"
    workdir = workdir or Path(tempfile.mkdtemp(prefix="veilcam-broker-"))
    broker = LocalBroker(kind, host, port or free_port(host), workdir)
    broker.start()
    return broker


# -- embedded broker child process ---------------------------------------------------------------
async def _serve(host: str, port: int) -> None:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 64}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pipeline.broker --port N`: the embedded (amqtt) broker, until SIGTERM."""
    p = argparse.ArgumentParser(prog="python -m pipeline.broker", description=main.__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["LocalBroker", "embedded_available", "free_port", "mosquitto_path", "start_broker"]
