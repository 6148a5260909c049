"""One camera's pipeline: queues, stages and supervisor, and the sinks its alerts go to.

    capture ─frames─▶ pose ─poses─▶ windowing+seal ─windows─▶ enclave ─▶ alert sink

Every arrow is a `BoundedQueue` whose policy follows the source: live → `drop_oldest` frames and
`latest_wins` windows (counted), replay → `block` everywhere (deterministic, nothing dropped).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from config.schema import (
    DEFAULT_MODEL_DIR,
    CameraConfig,
    VeilcamConfig,
    model_window_defaults,
)
from enclave_bridge.shared.keys import DataKey
from pipeline.app.supervisor import Supervisor
from pipeline.errors import StageError, TransportError, VeilcamError
from pipeline.messages import AlertEnvelope, EndOfStream, Frame, PoseFrame, SealedWindow
from pipeline.queues import BoundedQueue
from pipeline.stats import CameraStats
from stages.capture import CaptureStage
from stages.enclave_client import (
    EnclaveLink,
    EnclaveStage,
    WindowJournal,
)
from stages.pose.stage import PoseStage
from stages.windowing import SeqCounter, Windower, WindowingStage

log = logging.getLogger(__name__)

DEFAULT_T = 300
DEFAULT_STRIDE = 30
DEFAULT_PERSONS = 2


class AlertSink(Protocol):
    """Where alerts go: the durable outbox in the daemon, a list in tests/replays."""

    def put(self, envelope: AlertEnvelope) -> object: ...  # the outbox returns its row id


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


__all__ = [
    "AlertSink",
    "CameraPipeline",
    "ListSink",
    "TeeSink",
    "WindowParams",
    "camera_error",
    "file_source_key",
    "window_params",
]
