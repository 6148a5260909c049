"""The pose stage: frames in, `PoseFrame`s out, through a pose worker.

The worker is a child process by default (CPU-heavy, and a crash in native code must not take the
daemon down; it logs to the parent through a queue), a shared pose server for several cameras
(`pose.shared`), or in-process (`pose.in_process`, tests and debugging).
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import multiprocessing as mp
import multiprocessing.connection
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from config.schema import CameraConfig
from pipeline.errors import StageError, VeilcamError
from pipeline.messages import EndOfStream, Frame, PoseFrame
from pipeline.queues import BoundedQueue
from pipeline.stats import CameraStats
from stages.pose.server import SharedPoseClient

log = logging.getLogger(__name__)

POSE_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class _PoseFailure:
    """The child's answer when one frame could not be processed (message without pixels)."""

    seq: int
    message: str
    fatal: bool = False


def _pose_child(
    conn: multiprocessing.connection.Connection,
    log_queue: Any,
    camera_id: str,
    backend: str,
    options: dict[str, Any],
    log_level: int,
) -> None:
    """Child-process main: build the backend, then answer one `PoseFrame` per `Frame`."""
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
    root.setLevel(log_level)
    clog = logging.getLogger("pipeline.app.daemon.pose")
    try:
        from stages.pose import PoseEstimator, create_backend

        estimator = PoseEstimator(create_backend(backend, **options), camera_id)
    except Exception as e:
        conn.send(
            _PoseFailure(-1, f"pose backend {backend!r} failed to start: {type(e).__name__}: {e}", True)
        )
        return
    conn.send("ready")
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        if item is None:
            return
        try:
            conn.send(estimator.process(item))
        except VeilcamError as e:
            clog.warning("camera %s: pose failed on frame %d: %s", camera_id, item.seq, e)
            conn.send(_PoseFailure(item.seq, str(e)))
        except Exception as e:
            clog.exception("camera %s: pose crashed on frame %d", camera_id, item.seq)
            conn.send(_PoseFailure(item.seq, f"{type(e).__name__}: {e}"))


class PoseProcess:
    """A pose backend in a `spawn`ed child; `process(frame)` is a synchronous round trip."""

    def __init__(self, camera_id: str, backend: str, options: dict[str, Any], start_timeout_s: float = 120.0):
        self.camera_id = camera_id
        self.backend = backend
        self.options = dict(options)
        self.start_timeout_s = start_timeout_s
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._listener: logging.handlers.QueueListener | None = None
        self._close_lock = threading.Lock()

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        log_queue = ctx.Queue(-1)
        self._listener = logging.handlers.QueueListener(
            log_queue, _ForwardHandler(), respect_handler_level=False
        )
        self._listener.start()
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_pose_child,
            args=(child, log_queue, self.camera_id, self.backend, self.options, logging.getLogger().level),
            name=f"veilcam-pose-{self.camera_id}",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self._conn = parent
        reply = self._recv(self.start_timeout_s)
        if isinstance(reply, _PoseFailure):
            self.close()
            raise StageError(f"camera {self.camera_id}: {reply.message}")
        log.info("camera %s: pose backend %s ready in child pid %s", self.camera_id, self.backend, self.pid)

    def _recv(self, timeout_s: float) -> Any:
        conn, proc = self._conn, self._proc
        if conn is None:
            raise StageError(f"camera {self.camera_id}: pose process closed")
        try:
            ready = conn.poll(timeout_s)
        except (EOFError, OSError) as e:  # closed by another thread meanwhile
            raise StageError(f"camera {self.camera_id}: pose process closed") from e
        if not ready:
            alive = proc is not None and proc.is_alive()
            self.close()
            raise StageError(
                f"camera {self.camera_id}: pose process "
                + (f"did not answer within {timeout_s:.0f} s" if alive else "died")
            )
        try:
            return conn.recv()
        except (EOFError, OSError) as e:
            code = proc.exitcode if proc is not None else None
            self.close()
            raise StageError(f"camera {self.camera_id}: pose process died (exit code {code})") from e

    def process(self, frame: Frame) -> PoseFrame | _PoseFailure:
        conn = self._conn
        if conn is None:
            raise StageError(f"camera {self.camera_id}: pose process not started")
        try:
            conn.send(frame)
        except (BrokenPipeError, OSError) as e:
            self.close()
            raise StageError(f"camera {self.camera_id}: pose process died") from e
        reply = self._recv(POSE_TIMEOUT_S)
        if isinstance(reply, _PoseFailure) and reply.fatal:
            raise StageError(f"camera {self.camera_id}: {reply.message}")
        return reply  # type: ignore[no-any-return]

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else int(proc.pid)

    def close(self) -> None:
        """Stop the child; safe to call again and from several threads at once (the pose stage and
        the camera's failure handler both close it), each part is taken out before it is closed."""
        with self._close_lock:
            conn, self._conn = self._conn, None
            proc, self._proc = self._proc, None
            listener, self._listener = self._listener, None
        if conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
            conn.close()
        if proc is not None:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        if listener is not None:
            listener.stop()


class _ForwardHandler(logging.Handler):
    """Re-emits child log records through the parent's logger of the same name."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


class _InProcessPose:
    """The same interface without a child process (`pose.in_process: true`, debugging)."""

    def __init__(self, camera_id: str, backend: str, options: dict[str, Any]) -> None:
        self.camera_id, self.backend, self.options = camera_id, backend, dict(options)
        self._est: Any = None
        self.pid = None

    def start(self) -> None:
        from stages.pose import PoseEstimator, create_backend

        try:
            self._est = PoseEstimator(create_backend(self.backend, **self.options), self.camera_id)
        except VeilcamError:
            raise
        except Exception as e:
            raise StageError(f"camera {self.camera_id}: pose backend {self.backend!r} failed: {e}") from e

    def process(self, frame: Frame) -> PoseFrame | _PoseFailure:
        try:
            return self._est.process(frame)  # type: ignore[no-any-return]
        except VeilcamError as e:
            return _PoseFailure(frame.seq, str(e))

    def close(self) -> None:
        self._est = None


class PoseStage:
    """Frames in, `PoseFrame`s out through a pose worker (child process by default)."""

    def __init__(
        self,
        camera_id: str,
        cam: CameraConfig,
        inq: BoundedQueue[Frame | EndOfStream],
        out: BoundedQueue[PoseFrame | EndOfStream],
        stats: CameraStats,
        on_frame: Callable[[PoseFrame], None] | None = None,
    ) -> None:
        self.camera_id = camera_id
        self.cam = cam
        self.inq = inq
        self.out = out
        self.stats = stats
        self.on_frame = on_frame
        self._timing = stats.stage("pose")
        self.worker: PoseProcess | _InProcessPose | SharedPoseClient | None = None
        self.finished = False

    def _new_worker(self) -> PoseProcess | _InProcessPose | SharedPoseClient:
        p = self.cam.pose
        if p.shared:
            return SharedPoseClient(self.camera_id, p.backend, p.backend_options(), failure=_PoseFailure)
        if p.in_process:
            return _InProcessPose(self.camera_id, p.backend, p.backend_options())
        return PoseProcess(self.camera_id, p.backend, p.backend_options())

    def run(self, stop: threading.Event) -> None:
        if self.worker is None:
            worker = self._new_worker()
            worker.start()
            self.worker = worker
        try:
            if self.finished:
                return
            for item in self.inq.drain(stop):
                if isinstance(item, EndOfStream):
                    self.out.put(item)
                    self.finished = True
                    return
                t = time.monotonic()
                try:
                    result = self.worker.process(item)
                except StageError:
                    self.worker = None  # the supervisor's restart starts a fresh child
                    raise
                if isinstance(result, _PoseFailure):
                    self.stats.inc("pose_errors")
                    self._timing.error()
                    continue
                self._timing.observe(time.monotonic() - t)
                if not self.out.put(result):
                    self.stats.inc("skipped_poses")
                if self.on_frame is not None:
                    self.on_frame(result)
        finally:
            if self.finished or stop.is_set():
                self.close()

    def close(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.close()


__all__ = ["POSE_TIMEOUT_S", "PoseProcess", "PoseStage"]
