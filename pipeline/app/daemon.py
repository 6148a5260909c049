"""The camera daemon: wiring, pose child processes, supervision, graceful shutdown (DESIGN §2).

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

import logging
import logging.handlers
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from config.schema import (
    DEFAULT_MODEL_DIR,
    CameraConfig,
    VeilcamConfig,
    load_data_key_from_config,
    model_window_defaults,
)
from enclave_bridge.shared.keys import DataKey
from pipeline.app.supervisor import Supervisor
from pipeline.errors import ConfigError, StageError, TransportError, VeilcamError
from pipeline.messages import AlertEnvelope, EndOfStream, Frame, PoseFrame, SealedWindow
from pipeline.queues import BoundedQueue
from pipeline.stats import CameraStats
from stages.capture import CaptureStage
from stages.enclave_client import (
    EnclaveLink,
    EnclaveStage,
    LocalEnclave,
    RemoteEnclave,
    WindowJournal,
    load_model_dir,
)
from stages.pose.stage import PoseProcess, PoseStage
from stages.windowing import SeqCounter, Windower, WindowingStage

log = logging.getLogger(__name__)

DEFAULT_T = 300
DEFAULT_STRIDE = 30
DEFAULT_PERSONS = 2


# -- alert sinks -------------------------------------------------------------------------------------
class AlertSink(Protocol):
    """Where alerts go: the durable outbox in the daemon, a list in tests/replays."""

    def put(self, envelope: AlertEnvelope) -> None: ...


class ListSink:
    """Keeps alert envelopes in memory (replay summaries, tests)."""

    def __init__(self) -> None:
        self.items: list[AlertEnvelope] = []
        self._lock = threading.Lock()

    def put(self, envelope: AlertEnvelope) -> None:
        with self._lock:
            self.items.append(envelope)


class TeeSink:
    """Sends every alert to several sinks in order (outbox first: it is the durable one)."""

    def __init__(self, *sinks: AlertSink) -> None:
        self.sinks = sinks

    def put(self, envelope: AlertEnvelope) -> None:
        for s in self.sinks:
            s.put(envelope)


# -- one camera -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WindowParams:
    length_frames: int
    stride_frames: int
    fps: float | None
    persons: int = 2


def window_params(cfg: VeilcamConfig, cam: CameraConfig) -> WindowParams:
    """Window length/stride/persons and target fps: config first, then the model's model.json, then
    defaults (T=300, stride 30, M=2, the source's own fps)."""
    model = model_window_defaults(cfg.enclave.model_dir or DEFAULT_MODEL_DIR)
    T = cam.window.length_frames or int(model.get("T", DEFAULT_T))
    stride = cam.window.stride_frames or int(model.get("stride", DEFAULT_STRIDE))
    fps = cam.fps if cam.fps is not None else (float(model["fps"]) if "fps" in model else None)
    persons = cam.window.persons or int(model.get("M", DEFAULT_PERSONS))
    return WindowParams(T, stride, fps, persons)


def file_source_key(cam: CameraConfig) -> str | None:
    """Identity of a file camera's video (path, size, mtime): the replay progress recorded for it
    applies only to this very file. None for live sources (their media time restarts at 0)."""
    if cam.source_kind != "file":
        return None
    path = str(cam.source).removeprefix("file://")
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


class CameraPipeline:
    """Queues, stages and supervisor of one camera. `start()`, then `wait()` or `request_stop()`."""

    def __init__(
        self,
        name: str,
        cfg: VeilcamConfig,
        key: DataKey,
        link: EnclaveLink,
        sink: AlertSink,
        *,
        on_pose: Callable[[PoseFrame], None] | None = None,
        on_result: Callable[[SealedWindow, Any, float], None] | None = None,
        journal: WindowJournal | None = None,
    ) -> None:
        cam = cfg.cameras[name]
        self.name = name
        self.device = cfg.device_of(name)
        self.live = cam.is_live
        params = window_params(cfg, cam)
        if params.fps is not None and cam.fps is None:
            cam = cam.model_copy(update={"fps": params.fps})
        self.cam = cam
        self.params = params
        self.stats = CameraStats(self.device)
        q = cam.queues
        frame_policy, window_policy = ("drop_oldest", "latest_wins") if self.live else ("block", "block")
        self.frames: BoundedQueue[Frame | EndOfStream] = BoundedQueue(
            q.frames, frame_policy, name="frames", timeout_s=q.put_timeout_s
        )
        self.poses: BoundedQueue[PoseFrame | EndOfStream] = BoundedQueue(
            q.poses, "drop_oldest" if self.live else "block", name="poses", timeout_s=q.put_timeout_s
        )
        self.windows: BoundedQueue[SealedWindow | EndOfStream] = BoundedQueue(
            q.windows, window_policy, name="windows", timeout_s=q.put_timeout_s, key=lambda w: w.camera_id
        )
        self.stats.queues.extend([self.frames, self.poses, self.windows])
        self.capture = CaptureStage(self.device, cam, self.frames, self.stats)
        self.pose = PoseStage(self.device, cam, self.frames, self.poses, self.stats, on_frame=on_pose)
        counter = SeqCounter(cfg.state_dir / "windows" / f"{self.device}.seq")
        windower = Windower(
            self.device,
            key,
            counter,
            length_frames=params.length_frames,
            stride_frames=params.stride_frames,
            persons=params.persons,
            tracker=cam.window.tracker,
            stats=self.stats,
            flush_partial=cam.window.flush_partial,
            min_frames=cam.window.min_frames,
            min_joints=cam.window.min_joints,
        )
        self.windowing = WindowingStage(windower, self.poses, self.windows, self.stats)
        self.end: EndOfStream | None = None
        self.enclave = EnclaveStage(
            self.device,
            link,
            cfg.rules_of(name).as_dict(),
            self.windows,
            sink.put,
            self.stats,
            max_retries=cfg.enclave.max_retries,
            retry_backoff_s=cfg.enclave.retry_backoff_s,
            retry_timeout_s=cfg.enclave.retry_timeout_s,
            on_result=on_result,
            on_end=self._on_end,
            journal=journal,
            source_key=file_source_key(cam) if journal is not None else None,
        )
        self.stop_capture = threading.Event()
        self.halt = threading.Event()
        self.done = threading.Event()
        self.failure: BaseException | None = None
        self.supervisor = Supervisor(
            self.device,
            cfg.supervisor,
            self.stats,
            self._on_failed,
            max_restarts=None if self.live or cam.loop else 0,
        )
        self.supervisor.add("capture", self.capture.run, self.stop_capture)
        self.supervisor.add("pose", self.pose.run, self.halt)
        self.supervisor.add("windowing", self.windowing.run, self.halt)
        self.supervisor.add("enclave", self.enclave.run, self.halt)

    def _on_end(self, eos: EndOfStream) -> None:
        self.end = eos
        self.stats.status = "done"
        self.done.set()

    def _on_failed(self, stage: str, error: BaseException) -> None:
        if self.failure is None:
            self.failure = error
        if self.halt.is_set() and self.stop_capture.is_set():
            return  # shutting down anyway
        self.stats.status = "failed"
        self.stop_capture.set()
        self.halt.set()
        for q in (self.frames, self.poses, self.windows):
            q.close()
        self.pose.close()
        self.done.set()

    def start(self) -> None:
        """Register with the enclave (bad rules are a `ConfigError` right here) and start the stages.

        An unreachable enclave is not fatal: the enclave stage says hello again when it starts,
        under the supervisor's restart budget, while capture and pose already run."""
        try:
            self.enclave.hello()
        except TransportError as e:
            log.warning(
                "camera %s: enclave unreachable at start (%s); retrying in the enclave stage", self.device, e
            )
        self.stats.status = "running"
        self.supervisor.start()

    def request_stop(self) -> None:
        """Graceful: capture ends with `EndOfStream`, which drains through every stage."""
        self.stop_capture.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self.done.wait(timeout_s)

    def halt_now(self) -> None:
        """Hard stop after the flush budget: stop every stage and close the queues."""
        self.stop_capture.set()
        self.halt.set()
        for q in (self.frames, self.poses, self.windows):
            q.close()
        self.supervisor.join(10)
        self.pose.close()
        if self.stats.status == "running":
            self.stats.status = "stopped"
        self.done.set()

    def close(self) -> None:
        self.halt_now()


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


def build_link(cfg: VeilcamConfig, key: DataKey, recipients_extra: list[Any] | None = None) -> EnclaveLink:
    """The enclave link the config asks for: remote `veilcam enclave` (several: an `EnclavePool`,
    `enclave.addresses`), else the local stand-in."""
    addresses = [a for a in [cfg.enclave.address, *cfg.enclave.addresses] if a]
    if len(addresses) > 1:
        from stages.enclave_pool import EnclavePool

        return EnclavePool(addresses, timeout_s=cfg.enclave.timeout_s, backoff_s=cfg.enclave.retry_backoff_s)
    if addresses:
        return RemoteEnclave(addresses[0], timeout_s=cfg.enclave.timeout_s)
    log.warning(
        "enclave.address is not set: windows are evaluated by the in-process local evaluator "
        "(development/replay only — no enclave isolation)"
    )
    return make_local_enclave(cfg, key, recipients_extra or [])


def make_local_enclave(cfg: VeilcamConfig, key: DataKey, extra_recipients: list[Any]) -> LocalEnclave:
    """The in-process evaluator: model from `enclave.model_dir`, a persisted signing key, the
    configured recipients (+ `extra_recipients`, e.g. a replay's throw-away consumer)."""
    from enclave_bridge.shared.keys import PartyKey, PartyPublic
    from enclave_bridge.shared.policy import ALERT_FIELDS, Recipient

    model_dir = cfg.enclave.model_dir or DEFAULT_MODEL_DIR
    model, labels, meta = load_model_dir(model_dir)
    sk_path = cfg.enclave.signing_key_path or cfg.state_dir / "local-evaluator.key"
    if sk_path.exists():
        try:
            signer = PartyKey.load(sk_path)
        except VeilcamError as e:
            raise ConfigError(f"enclave.signing_key_path: {e}") from e
    else:
        signer = PartyKey.generate("data-owner", "local-evaluator")
        signer.save(sk_path)
        log.info("local evaluator: new alert-signing key %s", sk_path)
    pubs = []
    for i, path in enumerate(cfg.enclave.recipients):
        try:
            pubs.append(PartyPublic.load(path))
        except VeilcamError as e:
            raise ConfigError(f"enclave.recipients.{i}: {e}") from e
    pubs.extend(extra_recipients)
    recipients = [Recipient(p.name, p.rid, p.kx_pub, tuple(ALERT_FIELDS)) for p in pubs]
    counters: dict[str, SeqCounter] = {}
    lock = threading.Lock()

    def next_seq(device: str) -> int:
        with lock:
            if device not in counters:
                counters[device] = SeqCounter(cfg.state_dir / "alerts" / f"{device}.seq")
            return counters[device].next()

    from enclave_bridge.measured.model_inputs import input_transform_of

    return LocalEnclave(
        {key.kid: key},
        model,
        labels,
        signer,
        recipients,
        next_seq,
        input_transform=input_transform_of(meta),
        last_results_path=cfg.state_dir / "alerts" / "last-results.json",
    )


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
        outbox: Any = None,
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
                cam.stats.probes["outbox_depth"] = lambda dev=cam.device: float(outbox.depth(dev))
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


def camera_error(cam: CameraPipeline) -> VeilcamError | None:
    """The error that ended a camera, as a typed error with a plain message (or None)."""
    if cam.failure is not None:
        if isinstance(cam.failure, VeilcamError):
            return cam.failure
        return StageError(f"camera {cam.device}: {type(cam.failure).__name__}: {cam.failure}")
    if cam.end is not None and cam.end.reason == "truncated":
        meta = cam.end.meta
        return StageError(
            f"camera {cam.device}: video ended after {meta.get('decoded')} of {meta.get('expected_frames')} "
            "frames (truncated or corrupt file)"
        )
    return None


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
    "window_params",
]
