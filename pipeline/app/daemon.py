"""The camera daemon: all cameras of one config, the outbox/publisher, metrics, shutdown (ARCHITECTURE.md §2).

One camera's queues and stages are `pipeline.app.camera`, the pose stage `stages.pose.stage`, the
stage supervisor `pipeline.app.supervisor`, the enclave link `pipeline.app.links`.

Per camera::

    capture ─frames─▶ pose (child process) ─poses─▶ windowing+seal ─windows─▶ enclave ─▶ alert sink

Every arrow is a `BoundedQueue` whose policy follows the source: live → `drop_oldest` frames and
`latest_wins` windows (counted), replay → `block` everywhere (deterministic, nothing dropped).
Each stage runs in a thread under a `Supervisor` that restarts it after a failure with backoff,
within a Frigate-style budget (default 5 restarts / 60 s); past the budget the camera is marked
failed and the rest of the daemon keeps running. Pose runs in a child process (CPU-heavy, and a
crash in native code must not take the daemon down); it logs to the parent through a queue.

Shutdown (SIGTERM/SIGINT) is a flush: capture stops and sends `EndOfStream`, which drains through
pose, windowing and the enclave, so every window already captured is evaluated and every alert
reaches the outbox; after `shutdown_timeout_s` the remaining stages are stopped hard.
"""

from __future__ import annotations

import functools
import logging
import logging.handlers
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config.files import load_data_key_from_config
from config.schema import VeilcamConfig
from enclave_bridge.shared.keys import DataKey
from pipeline.app.camera import (
    AlertSink,
    CameraPipeline,
    ListSink,
    TeeSink,
    WindowParams,
    camera_error,
    window_params,
)
from pipeline.app.links import build_link, make_local_enclave
from pipeline.app.supervisor import Supervisor
from pipeline.errors import ConfigError, VeilcamError
from pipeline.messages import PoseFrame, SealedWindow
from pipeline.stats import CameraStats
from stages.enclave_client import (
    EnclaveLink,
)
from stages.pose.stage import PoseProcess, PoseStage

if TYPE_CHECKING:
    from pipeline.outbox import Outbox

log = logging.getLogger(__name__)


# -- the daemon -------------------------------------------------------------------------------------
class Notifier:
    """sd_notify READY/WATCHDOG/STOPPING; nothing at all when not started by systemd.

    The socket is non-blocking: a notification that cannot be queued is dropped rather than
    stalling the daemon's main loop (systemd reads promptly; a stuck reader must not stop us).
    """

    def __init__(self) -> None:
        self._n: Any = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._n = sdnotify.SystemdNotifier()
            if self._n.socket is not None:
                self._n.socket.setblocking(False)

    def notify(self, state: str) -> None:
        if self._n is not None:
            self._n.notify(state)  # sdnotify swallows socket errors (EAGAIN included)


class Daemon:
    """All cameras of one config, the alert outbox/publisher, metrics and systemd integration."""

    def __init__(
        self,
        cfg: VeilcamConfig,
        *,
        link: EnclaveLink | None = None,
        sink: AlertSink | None = None,
        key: DataKey | None = None,
        metrics: bool | None = None,
        publisher: Any = None,
        on_pose: Callable[[PoseFrame], None] | None = None,
        on_result: Callable[[SealedWindow, Any, float], None] | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self.key = key or load_data_key_from_config(cfg)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.link = link or build_link(cfg, self.key)
        self.publisher = publisher
        self.sink: AlertSink = sink or ListSink()
        # the outbox as the alert sink is also the window journal (crash-safe hand-over, see outbox)
        journal = outbox if outbox is not None and self.sink is outbox else None
        self.cameras = {
            name: CameraPipeline(
                name,
                cfg,
                self.key,
                self.link,
                self.sink,
                on_pose=on_pose,
                on_result=on_result,
                journal=journal,
            )
            for name in cfg.cameras
        }
        if outbox is not None:
            for cam in self.cameras.values():
                cam.stats.probes["outbox_depth"] = functools.partial(_outbox_depth, outbox, cam.device)
        self.metrics_enabled = cfg.metrics.enabled if metrics is None else metrics
        self.metrics_server: Any = None
        self.notifier = Notifier()
        self._shutdown = threading.Event()
        self._abort = threading.Event()
        self._enclave_stats_at = 0.0

    @property
    def camera_stats(self) -> list[CameraStats]:
        return [c.stats for c in self.cameras.values()]

    def healthy(self) -> tuple[bool, dict[str, Any]]:
        cams = {c.device: c.stats.status for c in self.cameras.values()}
        ok = all(s in ("running", "done", "starting") for s in cams.values())
        info: dict[str, Any] = {"status": "ok" if ok else "degraded", "cameras": cams}
        if self.publisher is not None and hasattr(self.publisher, "connected"):
            info["broker_connected"] = bool(self.publisher.connected)
        return ok, info

    def start(self) -> None:
        if self.metrics_enabled:
            from pipeline.metrics import MetricsServer

            self.metrics_server = MetricsServer(self.cfg.metrics.listen, self)
            self.metrics_server.start()
        if self.publisher is not None and hasattr(self.publisher, "start"):
            self.publisher.start()
        for cam in self.cameras.values():
            cam.start()
        self.notifier.notify("READY=1")
        log.info("veilcam daemon running: %d camera(s)", len(self.cameras))

    def poll_enclave_stats(self) -> None:
        """Copy non-sensitive enclave counters (Freivalds failures) into every camera's stats."""
        try:
            st = self.link.stats()
        except VeilcamError as e:
            log.debug("enclave stats unavailable: %s", e)
            return
        failures = st.get("freivalds_failures")
        evaluator = st.get("evaluator")
        if failures is None and isinstance(evaluator, dict):
            failures = evaluator.get("freivalds_failures")
        if isinstance(failures, int | float):
            failures = int(failures)
            for c in self.cameras.values():
                c.stats.set_counter("freivalds_failures", failures)

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            if self._shutdown.is_set():
                log.warning("signal %d again: stopping now without finishing the flush", signum)
                self._abort.set()  # only events here: a handler must not take the queues' locks
                return
            log.info("signal %d: graceful shutdown (a second signal stops at once)", signum)
            self._shutdown.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def request_shutdown(self) -> None:
        self._shutdown.set()

    def run_until_done(self, tick_s: float = 1.0) -> int:
        """Block until every camera ended (files) or a shutdown was requested; returns an exit code."""
        last_stats = 0.0
        while not self._shutdown.is_set():
            if all(c.done.is_set() for c in self.cameras.values()):
                break
            self.notifier.notify("WATCHDOG=1")
            now = time.monotonic()
            if now - last_stats >= self.cfg.supervisor.stats_interval_s:
                last_stats = now
                self.poll_enclave_stats()
                self._publish_stats()
            self._shutdown.wait(tick_s)
        return self.stop()

    def _publish_stats(self) -> None:
        if self.publisher is None or not hasattr(self.publisher, "publish_stats"):
            return
        for c in self.cameras.values():
            try:
                self.publisher.publish_stats(c.device, c.stats.to_json())
            except VeilcamError as e:
                log.debug("stats publish failed: %s", e)

    def stop(self) -> int:
        """Flush every camera (bounded by `shutdown_timeout_s`), stop publisher and metrics."""
        self.notifier.notify("STOPPING=1")
        for c in self.cameras.values():
            c.request_stop()
        deadline = time.monotonic() + self.cfg.supervisor.shutdown_timeout_s
        for c in self.cameras.values():
            while not c.wait(0.2):
                if self._abort.is_set() or time.monotonic() >= deadline:
                    log.warning("camera %s: flush not finished; stopping hard", c.device)
                    break
        for c in self.cameras.values():
            c.halt_now()
        self.poll_enclave_stats()
        self._publish_stats()
        if self.publisher is not None and hasattr(self.publisher, "stop"):
            # Whatever the broker does not acknowledge in time stays in the outbox for next start.
            self.publisher.stop(flush_timeout_s=max(1.0, deadline - time.monotonic()))
        if self.outbox is not None:
            self.outbox.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        try:
            self.link.close()
        except VeilcamError as e:
            log.debug("enclave link close: %s", e)
        failed = [c for c in self.cameras.values() if c.stats.status == "failed"]
        truncated = [c for c in self.cameras.values() if c.end is not None and c.end.reason == "truncated"]
        dropped = [c for c in self.cameras.values() if c.stats.get("windows_dropped")]
        for c in dropped:
            log.error(
                "camera %s: %d window(s) dropped (enclave unreachable past enclave.retry_timeout_s)",
                c.device,
                c.stats.get("windows_dropped"),
            )
        return 1 if failed or truncated or dropped else 0


def build_daemon(cfg: VeilcamConfig) -> Daemon:
    """The production wiring of `veilcam run`: data key, enclave link, the durable outbox
    (`<state_dir>/outbox.sqlite`, every alert is committed there before anything publishes it) and,
    with a broker configured, its MQTT publisher (which also retains the enclave's evidence)."""
    from pipeline.outbox import Outbox

    ensure_state_dir(cfg.state_dir)
    key = load_data_key_from_config(cfg)
    link = build_link(cfg, key)
    outbox = Outbox(cfg.state_dir / "outbox.sqlite")
    publisher = None
    if cfg.broker is not None:
        from stages.alerts import AlertPublisher, enclave_evidence_provider

        # Remote enclaves only: the in-process evaluator has nothing to attest. The provider uses
        # its own connection, so evidence requests never queue behind window submissions.
        provider = (
            enclave_evidence_provider(cfg.enclave.address, timeout_s=cfg.enclave.timeout_s)
            if cfg.enclave.address
            else None
        )
        if hasattr(link, "evidence_provider"):  # a pool: each device's own enclave's evidence
            provider = link.evidence_provider(timeout_s=cfg.enclave.timeout_s)
        publisher = AlertPublisher(
            cfg.broker, outbox, devices=[cfg.device_of(n) for n in cfg.cameras], evidence_provider=provider
        )
    return Daemon(cfg, key=key, link=link, sink=outbox, publisher=publisher, outbox=outbox)


def _outbox_depth(outbox: Outbox, device: str) -> float:
    """The metrics probe of one camera's outbox backlog."""
    return float(outbox.depth(device))


def ensure_state_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"state_dir: cannot create {path}: {e.strerror}") from e


__all__ = [
    "AlertSink",
    "CameraPipeline",
    "Daemon",
    "ListSink",
    "PoseProcess",
    "PoseStage",
    "Supervisor",
    "TeeSink",
    "WindowParams",
    "build_daemon",
    "build_link",
    "camera_error",
    "make_local_enclave",
    "window_params",
]
