"""Multi-person tracking, sliding skeleton windows and their encryption (DESIGN §3).

`Windower.push(PoseFrame)` tracks skeletons across frames with norfair (keypoint-voting distance:
two skeletons match when enough joints are close), keeps the last `T` frames, and every `stride`
frames builds a `(3, T, 18, M)` float32 window of the `M` most confident tracks, normalised as the
reference demo does (x/W−0.5, y/H−0.5, score; zeros where a joint or a person is missing). The
window is sealed with AES-GCM immediately (`enclave_bridge.windows.seal_window`); plaintext never
leaves this module.

Window `seq` numbers are per device, strictly increasing and persisted (`SeqCounter`), because the
enclave rejects any `seq` it has already seen for the device — a restarted daemon must continue,
not start over.
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
from norfair import Detection, Tracker
from norfair.distances import create_keypoints_voting_distance

from config.schema import TrackerConfig
from enclave_bridge.keys import DataKey
from enclave_bridge.windows import seal_window
from pipeline.errors import ConfigError, StageError
from pipeline.messages import EndOfStream, PoseFrame, SealedWindow
from pipeline.queues import BoundedQueue
from pipeline.stats import CameraStats

log = logging.getLogger(__name__)

V = 18  # OpenPose-18 joints (DESIGN §3)


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
    people: dict[int, np.ndarray]  # track id → (V, 3) normalised x, y, score


def normalise(keypoints: np.ndarray, width: int, height: int) -> np.ndarray:
    """(P, V, 3) pixel x, y, score → x/W−0.5, y/H−0.5, score; a joint with score 0 stays all zero."""
    kp = np.asarray(keypoints, dtype=np.float32)
    out = np.zeros_like(kp)
    present = kp[..., 2] > 0
    out[..., 0] = np.where(present, kp[..., 0] / float(width) - 0.5, 0.0)
    out[..., 1] = np.where(present, kp[..., 1] / float(height) - 0.5, 0.0)
    out[..., 2] = np.where(present, kp[..., 2], 0.0)
    return out


class Windower:
    """Per-camera tracker + window builder + sealer (not thread-safe: one windowing thread)."""

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
    ) -> None:
        if length_frames < 1 or stride_frames < 1 or persons < 1:
            raise ConfigError("window: length_frames, stride_frames and persons must be >= 1")
        self.device = device
        self.key = key
        self.counter = counter
        self.T = length_frames
        self.stride = stride_frames
        self.M = persons
        self.tcfg = tracker or TrackerConfig()
        self.stats = stats
        self.flush_partial = flush_partial
        self._buf: deque[_FrameSlot] = deque(maxlen=self.T)
        self._since_last = 0
        self._emitted = 0
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

    def _track(self, pf: PoseFrame) -> dict[int, np.ndarray]:
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
        people: dict[int, np.ndarray] = {}
        for obj in tracked:
            det = obj.last_detection
            if det is None or id(det) not in current or obj.id is None:
                continue  # track alive but not seen in this frame: zeros for this frame
            people[int(obj.id)] = norm[int(det.data)]
        self.last_track_count = len(people)
        return people

    # -- windows ---------------------------------------------------------------------------------
    def push(self, pf: PoseFrame) -> list[SealedWindow]:
        """Add one frame's skeletons; returns the sealed windows completed by it (0 or 1)."""
        if pf.width <= 0 or pf.height <= 0:
            raise StageError(f"camera {self.device}: pose frame {pf.seq} has no frame size")
        people = self._track(pf)
        self._buf.append(_FrameSlot(pf.media_ts, pf.capture_ts, people))
        self._since_last += 1
        if len(self._buf) == self.T and (self._emitted == 0 or self._since_last >= self.stride):
            return [self._emit()]
        return []

    def flush(self) -> list[SealedWindow]:
        """End of stream: a clip shorter than T still yields one zero-padded window."""
        if self.flush_partial and self._emitted == 0 and self._buf:
            return [self._emit()]
        return []

    def _emit(self) -> SealedWindow:
        slots = list(self._buf)
        data, track_ids = build_window(slots, self.T, self.M)
        seq = self.counter.next()
        t0, t1 = float(slots[0].media_ts), float(slots[-1].media_ts)
        blob = seal_window(self.key, self.device, seq, t0, t1, data, track_ids)
        self._since_last = 0
        self._emitted += 1
        if self.stats is not None:
            self.stats.inc("windows_sealed")
        return SealedWindow(
            camera_id=self.device,
            seq=seq,
            capture_ts=float(slots[-1].capture_ts),
            t0=t0,
            t1=t1,
            kid=self.key.kid,
            blob=blob,
        )


def build_window(slots: Sequence[_FrameSlot], T: int, M: int) -> tuple[np.ndarray, list[int]]:
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
            kp = s.people.get(tid)
            if kp is not None:
                data[:, t, :, m] = kp.T
    return data, chosen


class WindowingStage:
    """The windowing thread: `PoseFrame`s in, `SealedWindow`s out, `EndOfStream` passed on.

    The out queue's policy decides what happens when the enclave lags: `latest_wins` for live
    cameras (an unsent window is replaced by the newer one and counted as coalesced), `block` for
    replays.
    """

    def __init__(
        self,
        windower: Windower,
        inq: BoundedQueue[PoseFrame | EndOfStream],
        out: BoundedQueue[SealedWindow | EndOfStream],
        stats: CameraStats,
    ) -> None:
        self.windower = windower
        self.inq = inq
        self.out = out
        self.stats = stats
        self._timing = stats.stage("windowing")
        self.finished = False

    def run(self, stop: threading.Event) -> None:
        if self.finished:
            return
        for item in self.inq.drain(stop):
            if isinstance(item, EndOfStream):
                for w in self.windower.flush():
                    self._put(w)
                self.out.put(item)
                self.finished = True
                return
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


__all__ = ["SeqCounter", "Windower", "WindowingStage", "build_window", "normalise"]
