"""Multi-person tracking, sliding skeleton windows and their encryption (docs/ARCHITECTURE.md §3).

`Windower.push(PoseFrame)` tracks skeletons across frames with norfair (keypoint-voting distance:
two skeletons match when enough joints are close), keeps the last `T` frames, and every `stride`
frames builds a `(3, T, 18, M)` float32 window of the `M` most confident tracks, normalised as the
reference demo does (x/W−0.5, y/H−0.5, score; zeros where a joint or a person is missing). The
window is sealed with AES-GCM immediately (`enclave_bridge.shared.windows.seal_window`); plaintext never
leaves this module.

Window `seq` numbers are per device, strictly increasing and persisted (`SeqCounter`), because the
enclave rejects any `seq` it has already seen for the device — a restarted daemon must continue,
not start over.

Why one module of ~460 lines: tracking, window assembly and sealing share the per-camera frame
buffer and its end-of-stream rules.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from norfair.distances import create_keypoints_voting_distance
from norfair.tracker import Detection, Tracker

from config.schema import TrackerConfig
from enclave_bridge.shared.keys import DataKey
from enclave_bridge.shared.windows import seal_window
from pipeline.errors import ConfigError, StageError
from pipeline.messages import EndOfStream, PoseFrame, SealedWindow
from pipeline.queues import BoundedQueue, QueueClosed, QueueTimeout
from pipeline.stats import CameraStats

log = logging.getLogger(__name__)

V = 18  # OpenPose-18 joints (docs/ARCHITECTURE.md §3)


def _drop_scalar_distance_notice(record: logging.LogRecord) -> bool:
    """Logging filter: False for norfair's "scalar distance function" performance notice."""
    return not record.getMessage().startswith("You are using a scalar distance function")


class SeqCounter:
    """Strictly increasing per-device window numbers, persisted before use.

    The file holds the last number handed out; it is rewritten atomically (write + fsync +
    rename) before a number is returned, so a crash can skip numbers but never reuse one. With no
    file (first start, or a lost state dir) numbering starts at the current Unix time in
    milliseconds, which is above anything a previous run on a sane clock can have used.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._last = self._read()

    def _read(self) -> int:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return int(time.time() * 1000) - 1
        except OSError as e:
            raise ConfigError(f"state_dir: cannot read window counter {self.path}: {e.strerror}") from e
        try:
            value = int(text)
        except ValueError as e:
            raise ConfigError(f"state_dir: window counter {self.path} is corrupt ({text[:20]!r})") from e
        if value < 0:
            raise ConfigError(f"state_dir: window counter {self.path} is negative")
        return value

    @property
    def last(self) -> int:
        return self._last

    def next(self) -> int:
        with self._lock:
            value = self._last + 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            with open(tmp, "w") as f:
                f.write(f"{value}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._last = value
            return value


@dataclass(slots=True)
class _FrameSlot:
    media_ts: float
    capture_ts: float
    people: dict[int, npt.NDArray[np.float32]]  # track id → (V, 3) normalised x, y, score


def normalise(keypoints: npt.ArrayLike, width: int, height: int) -> npt.NDArray[np.float32]:
    """(P, V, 3) pixel x, y, score → x/W−0.5, y/H−0.5, score; a joint with score 0 stays all zero."""
    kp = np.asarray(keypoints, dtype=np.float32)
    out = np.zeros_like(kp)
    present = kp[..., 2] > 0
    out[..., 0] = np.where(present, kp[..., 0] / float(width) - 0.5, 0.0)
    out[..., 1] = np.where(present, kp[..., 1] / float(height) - 0.5, 0.0)
    out[..., 2] = np.where(present, kp[..., 2], 0.0)
    return out


DEFAULT_MIN_JOINTS = 4  # a person counts in a frame with at least this many detected joints


@dataclass(slots=True)
class PlainWindow:
    """A window before sealing: `data` (3, T, V, M) float32, its media span, the chosen track ids
    (most confident first) and `frames`, the frames in which a chosen person has enough joints."""

    t0: float
    t1: float
    capture_ts: float
    data: npt.NDArray[np.float32]
    track_ids: list[int]
    frames: int


class WindowBuilder:
    """Per-camera tracker + sliding plaintext windows: the one code path behind the daemon's
    windowing stage (`Windower`, which seals) and `veilcam realcheck` (which evaluates in clear),
    so a replay and a realcheck of the same clip see the same windows.

    Windows: once `T` frames exist, then every `stride` frames. End of stream (`flush`): when any
    frame arrived since the last window, one final window ending at the last frame — the last `T`
    frames (the window is shifted back, overlapping the previous one) when the stream had at least
    `T`, else the frames so far zero-padded at the end (`flush_partial`). Without it, whatever
    happened in the last `stride − 1` frames of a clip (often the event that ends it) is never seen.

    Sparse windows (fewer than `min_frames` frames in which a chosen person has `min_joints`
    detected joints — a truncated file, a person glimpsed for a moment) are not built: a nearly
    empty window carries no evidence, and a model's answer on zeros is noise that can alert.
    They are counted in `sparse`.
    """

    def __init__(
        self,
        device: str = "camera",
        *,
        length_frames: int,
        stride_frames: int,
        persons: int,
        tracker: TrackerConfig | None = None,
        flush_partial: bool = True,
        min_frames: int | None = None,
        min_joints: int = DEFAULT_MIN_JOINTS,
    ) -> None:
        if length_frames < 1 or stride_frames < 1 or persons < 1:
            raise ConfigError("window: length_frames, stride_frames and persons must be >= 1")
        if min_frames is not None and not 0 <= min_frames <= length_frames:
            raise ConfigError("window: min_frames must be between 0 and length_frames")
        if not 0 <= min_joints <= V:
            raise ConfigError(f"window: min_joints must be between 0 and {V}")
        self.device = device
        self.T = length_frames
        self.stride = stride_frames
        self.M = persons
        self.tcfg = tracker or TrackerConfig()
        self.flush_partial = flush_partial
        self.min_frames = default_min_frames(length_frames) if min_frames is None else min_frames
        self.min_joints = min_joints
        self._buf: deque[_FrameSlot] = deque(maxlen=self.T)
        self._since_last = 0
        self._slots = 0  # window slots reached (built or skipped as sparse)
        self.sparse = 0
        self._tracker: Tracker | None = None
        self._frame_size: tuple[int, int] | None = None
        self.last_track_count = 0

    # -- tracking --------------------------------------------------------------------------------
    def _make_tracker(self, width: int, height: int) -> Tracker:
        diag = float(np.hypot(width, height))
        dist = create_keypoints_voting_distance(
            keypoint_distance_threshold=self.tcfg.keypoint_distance_frac * diag,
            detection_threshold=self.tcfg.min_joint_score,
        )
        # distance = 1/(1+matched joints): below 0.34 means at least two joints agree.
        # norfair warns on the root logger that a per-pair distance is slow; with a handful of people
        # per frame it is not, and operators should not see that warning on every camera start.
        root = logging.getLogger()
        root.addFilter(_drop_scalar_distance_notice)
        try:
            return Tracker(
                distance_function=dist,
                distance_threshold=0.34,
                detection_threshold=self.tcfg.min_joint_score,
                hit_counter_max=self.tcfg.max_missed_frames,
                initialization_delay=min(
                    self.tcfg.initialization_delay_frames, self.tcfg.max_missed_frames - 1
                ),
                pointwise_hit_counter_max=4,
            )
        finally:
            root.removeFilter(_drop_scalar_distance_notice)

    def _track(self, pf: PoseFrame) -> dict[int, npt.NDArray[np.float32]]:
        size = (pf.width, pf.height)
        if self._tracker is None or size != self._frame_size:
            if self._tracker is not None:
                log.info("camera %s: frame size changed to %dx%d; tracks restart", self.device, *size)
            self._tracker = self._make_tracker(pf.width, pf.height)
            self._frame_size = size
        kp = np.asarray(pf.keypoints, dtype=np.float32).reshape(-1, V, 3)
        detections = []
        for p in range(kp.shape[0]):
            scores = kp[p, :, 2]
            # Skeletons with fewer than two usable joints cannot be matched; skip them.
            if np.count_nonzero(scores > self.tcfg.min_joint_score) < 2:
                continue
            detections.append(
                Detection(points=kp[p, :, :2].astype(np.float64), scores=scores.astype(np.float64), data=p)
            )
        tracked = self._tracker.update(detections=detections)
        current = {id(d) for d in detections}
        norm = normalise(kp, pf.width, pf.height) if kp.shape[0] else kp
        people: dict[int, npt.NDArray[np.float32]] = {}
        for obj in tracked:
            det = obj.last_detection
            if det is None or id(det) not in current or obj.id is None:
                continue  # track alive but not seen in this frame: zeros for this frame
            people[int(obj.id)] = norm[int(det.data)]
        self.last_track_count = len(people)
        return people

    # -- windows ---------------------------------------------------------------------------------
    def push(self, pf: PoseFrame) -> list[PlainWindow]:
        """Add one frame's skeletons; returns the window completed by it (0 or 1)."""
        if pf.width <= 0 or pf.height <= 0:
            raise StageError(f"camera {self.device}: pose frame {pf.seq} has no frame size")
        people = self._track(pf)
        self._buf.append(_FrameSlot(pf.media_ts, pf.capture_ts, people))
        self._since_last += 1
        if len(self._buf) == self.T and (self._slots == 0 or self._since_last >= self.stride):
            return self._slot()
        return []

    def flush(self) -> list[PlainWindow]:
        """End of stream (or a stalled camera): a final window ending at the last frame, if any
        frame arrived since the last window (see the class docstring: shifted back, or padded)."""
        if not self._buf or self._since_last == 0:
            return []
        if len(self._buf) < self.T and not self.flush_partial:
            return []
        return self._slot()

    def _slot(self) -> list[PlainWindow]:
        slots = list(self._buf)
        data, track_ids = build_window(slots, self.T, self.M)
        self._since_last = 0
        self._slots += 1
        frames = real_frames(data, self.min_joints)
        if frames < max(self.min_frames, 1):
            self.sparse += 1
            log.debug(
                "camera %s: window %.2f-%.2f s skipped: %d frames with a person (< %d)",
                self.device,
                slots[0].media_ts,
                slots[-1].media_ts,
                frames,
                self.min_frames,
            )
            return []
        return [
            PlainWindow(
                float(slots[0].media_ts),
                float(slots[-1].media_ts),
                float(slots[-1].capture_ts),
                data,
                track_ids,
                frames,
            )
        ]


def default_min_frames(length_frames: int) -> int:
    """A fifth of the window (6 of 30 frames, 0.6 s at 10 fps). Measured on real falls: pose
    estimators lose a person once on the floor, so the window that holds a fall may show the
    person in only ~9 of its 30 frames (GMDCSA24 fall 16 at night); a third would drop it. A
    truncated clip's 3-frame window stays below."""
    return max(1, length_frames // 5)


def real_frames(data: npt.ArrayLike, min_joints: int = DEFAULT_MIN_JOINTS) -> int:
    """Frames of a (3, T, V, M) window in which some person has at least `min_joints` joints."""
    joints = (np.asarray(data)[2] > 0).sum(axis=1)  # (T, M)
    return int((joints >= max(min_joints, 1)).any(axis=1).sum())


class Windower(WindowBuilder):
    """`WindowBuilder` whose windows are sealed at once for the enclave (not thread-safe: one
    windowing thread). Sparse windows consume no `seq`."""

    def __init__(
        self,
        device: str,
        key: DataKey,
        counter: SeqCounter,
        *,
        length_frames: int,
        stride_frames: int,
        persons: int,
        tracker: TrackerConfig | None = None,
        stats: CameraStats | None = None,
        flush_partial: bool = True,
        min_frames: int | None = None,
        min_joints: int = DEFAULT_MIN_JOINTS,
    ) -> None:
        super().__init__(
            device,
            length_frames=length_frames,
            stride_frames=stride_frames,
            persons=persons,
            tracker=tracker,
            flush_partial=flush_partial,
            min_frames=min_frames,
            min_joints=min_joints,
        )
        self.key = key
        self.counter = counter
        self.stats = stats

    def push(self, pf: PoseFrame) -> list[SealedWindow]:  # type: ignore[override]
        """Add one frame's skeletons; returns the sealed windows completed by it (0 or 1)."""
        return self._seal_all(super().push(pf))

    def flush(self) -> list[SealedWindow]:  # type: ignore[override]
        """End of stream: the final window (see `WindowBuilder.flush`), sealed."""
        return self._seal_all(super().flush())

    def _seal_all(self, windows: list[PlainWindow]) -> list[SealedWindow]:
        if self.stats is not None and self.sparse:
            self.stats.set_counter("windows_sparse", self.sparse)
        return [self._seal(w) for w in windows]

    def _seal(self, w: PlainWindow) -> SealedWindow:
        seq = self.counter.next()
        blob = seal_window(self.key, self.device, seq, w.t0, w.t1, w.data, w.track_ids)
        if self.stats is not None:
            self.stats.inc("windows_sealed")
        return SealedWindow(
            camera_id=self.device,
            seq=seq,
            capture_ts=w.capture_ts,
            t0=w.t0,
            t1=w.t1,
            kid=self.key.kid,
            blob=blob,
        )


def build_window(slots: Sequence[_FrameSlot], T: int, M: int) -> tuple[npt.NDArray[np.float32], list[int]]:
    """(3, T, V, M) float32 from the frames (oldest first, zero-padded at the end) and the ids of
    the M tracks with the highest summed joint scores over the window (most confident first)."""
    totals: dict[int, float] = {}
    for s in slots:
        for tid, kp in s.people.items():
            totals[tid] = totals.get(tid, 0.0) + float(kp[:, 2].sum())
    chosen = sorted(totals, key=lambda t: (-totals[t], t))[:M]
    data = np.zeros((3, T, V, M), dtype=np.float32)
    for t, s in enumerate(slots[:T]):
        for m, tid in enumerate(chosen):
            person = s.people.get(tid)
            if person is not None:
                data[:, t, :, m] = person.T
    return data, chosen


STALL_FLUSH_S = 3.0  # live camera silent this long (wall time): its last frames get a final window


class WindowingStage:
    """The windowing thread: `PoseFrame`s in, `SealedWindow`s out, `EndOfStream` passed on.

    The out queue's policy decides what happens when the enclave lags: `latest_wins` for live
    cameras (an unsent window is replaced by the newer one and counted as coalesced), `block` for
    replays. A live camera that stops delivering (no frame for `stall_flush_s` of wall time) gets
    the same final window as an end of stream, so its last seconds are evaluated without waiting
    for frames that may never come; windowing carries on when frames return. Replays never do this
    (pose may be slower than any timeout there, and a replay must be deterministic).
    """

    def __init__(
        self,
        windower: Windower,
        inq: BoundedQueue[PoseFrame | EndOfStream],
        out: BoundedQueue[SealedWindow | EndOfStream],
        stats: CameraStats,
        stall_flush_s: float | None = None,
    ) -> None:
        self.windower = windower
        self.inq = inq
        self.out = out
        self.stats = stats
        self._timing = stats.stage("windowing")
        self.finished = False
        live = out.policy != "block"
        self.stall_flush_s = stall_flush_s if stall_flush_s is not None else (STALL_FLUSH_S if live else None)

    def run(self, stop: threading.Event) -> None:
        if self.finished:
            return
        last_frame = time.monotonic()
        stalled = False
        while True:
            try:
                item = self.inq.get(timeout_s=0.2)
            except QueueTimeout:
                if stop.is_set():
                    return
                quiet = time.monotonic() - last_frame
                if self.stall_flush_s is not None and not stalled and quiet >= self.stall_flush_s:
                    stalled = True
                    for w in self.windower.flush():
                        log.info("camera %s: no frames for %.1f s; final window sealed", w.camera_id, quiet)
                        self._put(w)
                continue
            except QueueClosed:
                return
            if isinstance(item, EndOfStream):
                for w in self.windower.flush():
                    self._put(w)
                self.out.put(item)
                self.finished = True
                return
            last_frame, stalled = time.monotonic(), False
            t = time.monotonic()
            windows = self.windower.push(item)
            self._timing.observe(time.monotonic() - t)
            for w in windows:
                self._put(w)

    def _put(self, w: SealedWindow) -> None:
        if not self.out.put(w):
            self.stats.inc("windows_coalesced")
            log.info(
                "camera %s: enclave lagging; an unsent window was replaced by seq %d", w.camera_id, w.seq
            )


__all__ = [
    "DEFAULT_MIN_JOINTS",
    "PlainWindow",
    "SeqCounter",
    "WindowBuilder",
    "Windower",
    "WindowingStage",
    "build_window",
    "default_min_frames",
    "normalise",
    "real_frames",
]
