"""One pose process serving several cameras of the daemon (`pose.shared: true`).

Without it every camera spawns its own pose child, so N cameras hold N copies of the network and
N runtimes compete for the same cores. With it, cameras whose pose settings are equal share one
`spawn`ed child: each camera's pose stage calls `SharedPoseClient.process(frame)` exactly as it
calls `PoseProcess.process` (a synchronous round trip), a dispatcher thread in the daemon collects
the frames that are waiting, sends them to the child as one batch and hands every camera its own
answer.

Fairness and drops stay as they are: each camera has at most one frame in flight (its pose stage
waits for the answer), a batch takes at most one frame per camera, in round-robin order from the
camera after the last one served first, so a fast camera cannot starve a slow one; frames that
arrive while pose is busy wait — and are dropped oldest-first and counted — in the camera's own
frame queue in the daemon, as before. In the child, frames of the same input size go through the
network as one batch when the backend can (`run_batch`, openvino-openpose), else one by one.

Why one module of ~430 lines: the shared pose server's child process, dispatcher thread and client
proxy speak one private protocol over one pipe; they change together.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import multiprocessing as mp
import multiprocessing.connection
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from enclave_bridge.shared.errors import StageError, VeilcamError
from pipeline.messages import Frame, PoseFrame

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
BATCH_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class _Failed:
    """The child's answer for one frame that could not be processed (message, no pixels)."""

    seq: int
    message: str
    fatal: bool = False


# -- child process ---------------------------------------------------------------------------------


def _infer_batch(backend: Any, estimators: dict[str, Any], frames: list[Frame]) -> list[Any]:
    """PoseFrame or _Failed per frame; frames with the same network input size share one pass."""
    from stages.pose import PoseEstimator
    from stages.pose.estimator import validate_keypoints

    results: list[Any] = [None] * len(frames)
    run_batch = getattr(backend, "run_batch", None)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, f in enumerate(frames):
        img = f.image
        ok = isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
        if callable(run_batch) and ok and img.size:
            groups.setdefault(backend.input_size_for((img.shape[1], img.shape[0])), []).append(i)
        else:  # one by one through the camera's estimator (it validates the frame itself)
            est = estimators.setdefault(f.camera_id, PoseEstimator(backend, f.camera_id))
            try:
                results[i] = est.process(f)
            except VeilcamError as e:
                results[i] = _Failed(f.seq, str(e))
    for size, idx in groups.items():
        t0 = time.perf_counter()
        try:
            batch = np.stack(
                [
                    frames[i].image
                    if (frames[i].image.shape[1], frames[i].image.shape[0]) == size
                    else cv2.resize(frames[i].image, size)
                    for i in idx
                ]
            )
            assert run_batch is not None  # groups are filled only for a batching backend
            outs = run_batch(batch)
        except VeilcamError as e:
            for i in idx:
                results[i] = _Failed(frames[i].seq, str(e))
            continue
        share = (time.perf_counter() - t0) / len(idx)
        for i, out in zip(idx, outs, strict=True):
            f = frames[i]
            h, w = f.image.shape[:2]
            t1 = time.perf_counter()
            try:
                kp = validate_keypoints(backend.postprocess(out, (w, h)), w, h, backend.name)
            except VeilcamError as e:
                results[i] = _Failed(f.seq, str(e))
                continue
            results[i] = PoseFrame(
                camera_id=f.camera_id,
                seq=f.seq,
                capture_ts=f.capture_ts,
                media_ts=f.media_ts,
                width=w,
                height=h,
                keypoints=kp,
                pose_latency_s=share + time.perf_counter() - t1,
            )
    return results


def _server_child(
    conn: multiprocessing.connection.Connection,
    log_queue: Any,
    backend_name: str,
    options: dict[str, Any],
    log_level: int,
) -> None:
    """Child main: build the backend once, then answer one list of results per list of frames."""
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
    root.setLevel(log_level)
    clog = logging.getLogger("stages.pose.server")
    try:
        from stages.pose import create_backend

        backend = create_backend(backend_name, **options)
    except Exception as e:
        conn.send(
            _Failed(-1, f"pose backend {backend_name!r} failed to start: {type(e).__name__}: {e}", True)
        )
        return
    conn.send(("ready", backend.name))
    estimators: dict[str, Any] = {}
    while True:
        try:
            frames = conn.recv()
        except (EOFError, OSError):
            return
        if frames is None:
            return
        try:
            conn.send(_infer_batch(backend, estimators, frames))
        except Exception as e:  # a bug, not a bad frame: answer every frame, keep serving
            clog.exception("shared pose: batch of %d frames crashed", len(frames))
            conn.send([_Failed(f.seq, f"{type(e).__name__}: {e}") for f in frames])


class _ForwardHandler(logging.Handler):
    """Re-emits child log records through the parent's logger of the same name."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


# -- parent side -----------------------------------------------------------------------------------


@dataclass
class ServerStats:
    """Counters of one shared pose process (batches and how full they were, frames per camera)."""

    batches: int = 0
    frames: int = 0
    max_batch_seen: int = 0
    per_camera: dict[str, int] = field(default_factory=dict)

    @property
    def mean_batch(self) -> float:
        return self.frames / self.batches if self.batches else 0.0


class PoseServer:
    """The shared pose child plus the dispatcher thread that batches the cameras' frames."""

    def __init__(self, backend: str, options: dict[str, Any], max_batch: int = 4) -> None:
        if max_batch < 1:
            raise StageError(f"shared pose: max_batch must be >= 1, got {max_batch}")
        self.backend = backend
        self.options = dict(options)
        self.max_batch = max_batch
        self.stats = ServerStats()
        self.backend_name = backend
        self._pending: dict[str, deque[tuple[Frame, Future[Any]]]] = {}
        self._order: deque[str] = deque()  # round-robin order of cameras
        self._cv = threading.Condition()
        self._closed = False
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._listener: logging.handlers.QueueListener | None = None
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def start(self) -> None:
        """Spawn the child, wait until its backend is built (raises `StageError` if it is not)."""
        ctx = mp.get_context("spawn")
        log_queue = ctx.Queue(-1)
        self._listener = logging.handlers.QueueListener(log_queue, _ForwardHandler())
        self._listener.start()
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_server_child,
            args=(child, log_queue, self.backend, self.options, logging.getLogger().level),
            name="veilcam-pose-shared",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(START_TIMEOUT_S):
            self.close()
            raise StageError(
                f"shared pose: backend {self.backend!r} did not start within {START_TIMEOUT_S} s"
            )
        try:
            reply = parent.recv()
        except (EOFError, OSError) as e:
            self.close()
            raise StageError("shared pose: process died while starting") from e
        if isinstance(reply, _Failed):
            self.close()
            raise StageError(f"shared pose: {reply.message}")
        self.backend_name = reply[1]
        self._thread = threading.Thread(target=self._dispatch, name="veilcam-pose-dispatch", daemon=True)
        self._thread.start()
        log.info("shared pose: backend %s ready in child pid %s", self.backend_name, self.pid)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else int(proc.pid)

    @property
    def alive(self) -> bool:
        return not self._closed and self._proc is not None and self._proc.is_alive()

    def submit(self, frame: Frame) -> Future[Any]:
        """Queue one frame of `frame.camera_id`; the future resolves to a PoseFrame or `_Failed`."""
        fut: Future[Any] = Future()
        with self._cv:
            if self._closed:
                raise StageError(f"shared pose: closed ({self.error or 'stopped'})")
            q = self._pending.get(frame.camera_id)
            if q is None:
                q = self._pending[frame.camera_id] = deque()
                self._order.append(frame.camera_id)
            q.append((frame, fut))
            self._cv.notify()
        return fut

    def _take_batch(self) -> list[tuple[Frame, Future[Any]]] | None:
        """Block until frames wait; one per camera, round-robin, up to `max_batch`."""
        with self._cv:
            while not self._closed and not any(self._pending.values()):
                self._cv.wait()
            if self._closed:
                return None
            batch = []
            for _ in range(len(self._order)):
                cam = self._order[0]
                self._order.rotate(-1)
                q = self._pending[cam]
                if q:
                    batch.append(q.popleft())
                    if len(batch) == self.max_batch:
                        break
            return batch

    def _dispatch(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            conn = self._conn
            try:
                if conn is None:
                    raise StageError("shared pose: closed")
                conn.send([f for f, _ in batch])
                if not conn.poll(BATCH_TIMEOUT_S):
                    raise StageError(f"shared pose: no answer within {BATCH_TIMEOUT_S:.0f} s")
                results = conn.recv()
            except (StageError, EOFError, OSError) as e:
                msg = str(e) if isinstance(e, StageError) else f"shared pose: process died ({e})"
                self._fail_all(msg, batch)
                return
            st = self.stats
            st.batches += 1
            st.frames += len(batch)
            st.max_batch_seen = max(st.max_batch_seen, len(batch))
            for (frame, fut), res in zip(batch, results, strict=True):
                st.per_camera[frame.camera_id] = st.per_camera.get(frame.camera_id, 0) + 1
                fut.set_result(res)

    def _fail_all(self, message: str, batch: list[tuple[Frame, Future[Any]]]) -> None:
        """The child is gone: every waiting camera gets a `StageError` (its stage restarts)."""
        with self._cv:
            self.error = message
            self._closed = True
            waiting = [fut for q in self._pending.values() for _, fut in q]
            self._pending.clear()
        for fut in [fut for _, fut in batch] + waiting:
            if not fut.done():
                fut.set_exception(StageError(message))

    def close(self) -> None:
        """Stop the dispatcher and the child; idempotent."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            waiting = [fut for q in self._pending.values() for _, fut in q]
            self._pending.clear()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(StageError("shared pose: closed"))
        conn, self._conn = self._conn, None
        proc, self._proc = self._proc, None
        listener, self._listener = self._listener, None
        thread = self._thread
        if conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(BATCH_TIMEOUT_S)
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        if listener is not None:
            listener.stop()


# -- registry: one server per distinct (backend, options) in this process --------------------------

_registry_lock = threading.Lock()
_servers: dict[str, tuple[PoseServer, set[str]]] = {}


def _key(backend: str, options: dict[str, Any]) -> str:
    return repr((backend, sorted(options.items())))


def acquire_server(camera_id: str, backend: str, options: dict[str, Any]) -> PoseServer:
    """The running server for these settings (started on first use, restarted if it died)."""
    key = _key(backend, options)
    with _registry_lock:
        entry = _servers.get(key)
        if entry is not None and not entry[0].alive:
            entry[0].close()
            entry = None
        if entry is None:
            server = PoseServer(backend, options)
            server.start()  # under the lock: two cameras must not start two children
            entry = _servers[key] = (server, set())
        entry[1].add(camera_id)
        return entry[0]


def release_server(camera_id: str, server: PoseServer) -> None:
    """Drop one camera's use; the last camera out closes the server."""
    with _registry_lock:
        key = next((k for k, (srv, _) in _servers.items() if srv is server), None)
        if key is not None:
            users = _servers[key][1]
            users.discard(camera_id)
            if users:
                return
            del _servers[key]
    server.close()


class SharedPoseClient:
    """One camera's handle on the shared server, with `PoseProcess`'s interface (`start`,
    `process`, `close`, `pid`). `failure` turns a failed frame into the caller's failure type."""

    def __init__(
        self,
        camera_id: str,
        backend: str,
        options: dict[str, Any],
        failure: Callable[[int, str], Any] | None = None,
    ) -> None:
        self.camera_id = camera_id
        self.backend = backend
        self.options = dict(options)
        self._failure = failure or (lambda seq, msg: _Failed(seq, msg))
        self._server: PoseServer | None = None

    def start(self) -> None:
        self._server = acquire_server(self.camera_id, self.backend, self.options)

    @property
    def pid(self) -> int | None:
        return None if self._server is None else self._server.pid

    def process(self, frame: Frame) -> Any:
        """PoseFrame, or `failure(seq, message)` for a frame the backend refused; `StageError`
        when the shared process is gone (the pose stage's restart then starts a new one)."""
        server = self._server
        if server is None:
            raise StageError(f"camera {self.camera_id}: shared pose not started")
        if frame.camera_id != self.camera_id:
            raise StageError(f"shared pose client of {self.camera_id!r} got a frame of {frame.camera_id!r}")
        try:
            res = server.submit(frame).result(timeout=2 * BATCH_TIMEOUT_S)
        except FuturesTimeout as e:
            raise StageError(f"camera {self.camera_id}: shared pose did not answer") from e
        if isinstance(res, _Failed):
            return self._failure(res.seq, res.message)
        return res

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            release_server(self.camera_id, server)


__all__ = ["PoseServer", "ServerStats", "SharedPoseClient", "acquire_server", "release_server"]
