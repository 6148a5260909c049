"""A local MQTT broker for `veilcam demo`, `veilcam broker` and trials: Mosquitto when installed
(and working), else an embedded Python broker (amqtt, a regular dependency; MQTT 3.1.1 only — the
publisher falls back to 3.1.1 automatically).

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
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from enclave_bridge.shared.errors import ConfigError, TransportError

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
                    "no MQTT broker: the embedded one (amqtt, a dependency of veilcam) is not importable; "
                    "reinstall veilcam (pip install -e .) or install Mosquitto (apt-get install -y mosquitto)"
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
                    log.debug("%s broker listening on %s", self.kind, self.address)
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


def check_port_free(host: str, port: int) -> None:
    """Fail in one line before starting anything when `host:port` is taken (e.g. a system
    Mosquitto on 1883): both brokers would otherwise die with a log only they can read."""
    with socket.socket() as s:
        # as the brokers do: connections of a previous broker in TIME_WAIT do not block the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {e.strerror or e} (another broker there? "
                "use it, or choose another --port)"
            ) from e


def start_broker(
    kind: BrokerKind = "auto", host: str = "127.0.0.1", port: int = 0, workdir: Path | None = None
) -> LocalBroker:
    """Start a local broker: Mosquitto if installed (or asked for), else the embedded amqtt one.

    `auto` falls back to the embedded broker when Mosquitto is absent *or fails to start* (an old
    version, a config it refuses), so a demo never depends on a system package working.
    """
    port = port or free_port(host)
    check_port_free(host, port)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="veilcam-broker-"))
    if kind == "auto" and mosquitto_path():
        try:
            broker = LocalBroker("mosquitto", host, port, workdir)
            broker.start()
            return broker
        except (ConfigError, TransportError) as e:
            log.warning("mosquitto did not start (%s); using the embedded broker", str(e).splitlines()[0])
    broker = LocalBroker("embedded" if kind == "auto" else kind, host, port, workdir)
    broker.start()
    return broker


def serve_broker(
    kind: BrokerKind = "auto", host: str = "127.0.0.1", port: int = 1883, workdir: Path | None = None
) -> int:
    """`veilcam broker`: run a local broker in the foreground until SIGTERM/SIGINT.

    Prints `<kind> MQTT broker on HOST:PORT` once it accepts connections (stdout, flushed, so a
    script or test can wait for it). Exit 0 on a signal, 1 when the broker process dies.
    """
    own_dir = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="veilcam-broker-"))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    broker = start_broker(kind, host, port, work)
    code = 0
    try:
        proto = "MQTT 5 and 3.1.1" if broker.mqtt5 else "MQTT 3.1.1"
        print(f"{broker.kind} MQTT broker on {broker.address} ({proto}); Ctrl-C stops it", flush=True)
        while not stop.wait(0.5):
            if broker.proc is None or broker.proc.poll() is not None:
                tail = broker.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                print(f"veilcam: error: {broker.kind} broker exited: " + " | ".join(tail), file=sys.stderr)
                code = 1
                break
    finally:
        broker.stop()
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    return code


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


__all__ = [
    "LocalBroker",
    "check_port_free",
    "embedded_available",
    "free_port",
    "mosquitto_path",
    "serve_broker",
    "start_broker",
]
