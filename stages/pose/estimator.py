"""`Frame` → `PoseFrame`: runs one backend, validates its output, measures latency.

The daemon runs a `PoseEstimator` inside its pose worker process (one per camera), so this class
holds no queues or threads; it is the unit the worker loop calls once per frame.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import StageError
from pipeline.messages import Frame, PoseFrame
from stages.pose.paf import NUM_PARTS

if TYPE_CHECKING:
    from stages.pose import PoseBackend

log = logging.getLogger(__name__)


def validate_keypoints(kp: npt.ArrayLike, width: int, height: int, backend: str) -> npt.NDArray[np.float32]:
    """Check a backend's output: (P, 18, 3), finite → float32 copy that honours the contract.

    Scores are clipped to [0, 1]; coordinates are clipped into the image so downstream
    normalisation stays in [−0.5, 0.5]; a joint with score 0 becomes (0, 0, 0) ("missing").
    """
    arr = np.asarray(kp, dtype=np.float32)
    if arr.size == 0:
        return np.zeros((0, NUM_PARTS, 3), dtype=np.float32)
    if arr.ndim != 3 or arr.shape[1:] != (NUM_PARTS, 3):
        raise StageError(f"pose backend {backend}: expected (P, 18, 3) keypoints, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise StageError(f"pose backend {backend}: non-finite keypoints")
    out = arr.copy()
    out[..., 2] = np.clip(out[..., 2], 0.0, 1.0)
    out[..., 0] = np.clip(out[..., 0], 0.0, max(0, width - 1))
    out[..., 1] = np.clip(out[..., 1], 0.0, max(0, height - 1))
    out[out[..., 2] <= 0] = 0.0
    return out


@dataclass(slots=True)
class PoseStats:
    """Counters of one estimator (exported by the daemon's stats/metrics)."""

    frames: int = 0
    people: int = 0
    latency_s_total: float = 0.0
    forward_s_total: float = 0.0
    grouping_s_total: float = 0.0

    @property
    def mean_latency_s(self) -> float:
        return self.latency_s_total / self.frames if self.frames else 0.0


class PoseEstimator:
    """Wraps a `PoseBackend` for one camera: `process(frame) -> PoseFrame`.

    A backend that needs the frame's identity (e.g. `openpose-json`, which replays file *i* for
    frame *i*) provides `infer_frame(frame)`; it is preferred over `infer(image)` when present.
    """

    def __init__(self, backend: PoseBackend, camera_id: str) -> None:
        self.backend = backend
        self.camera_id = camera_id
        self.stats = PoseStats()

    def process(self, frame: Frame) -> PoseFrame:
        """Run the backend on `frame.image`; raises `StageError` for a bad frame or backend output."""
        if frame.camera_id != self.camera_id:
            raise StageError(
                f"pose estimator for camera {self.camera_id!r} got a frame of {frame.camera_id!r}"
            )
        image = frame.image
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", type(image).__name__)
            raise StageError(f"camera {self.camera_id}: frame {frame.seq} is not (H, W, 3): {shape}")
        height, width = int(image.shape[0]), int(image.shape[1])
        t0 = time.perf_counter()
        infer_frame = getattr(self.backend, "infer_frame", None)
        raw = infer_frame(frame) if callable(infer_frame) else self.backend.infer(image)
        latency = time.perf_counter() - t0
        keypoints = validate_keypoints(raw, width, height, self.backend.name)
        st = self.stats
        st.frames += 1
        st.people += len(keypoints)
        st.latency_s_total += latency
        timing = getattr(self.backend, "last_timing", None)
        if isinstance(timing, dict):
            st.forward_s_total += float(timing.get("forward_s", 0.0))
            st.grouping_s_total += float(timing.get("grouping_s", 0.0))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "camera %s frame %d: %d people in %.1f ms",
                self.camera_id,
                frame.seq,
                len(keypoints),
                latency * 1e3,
            )
        return PoseFrame(
            camera_id=frame.camera_id,
            seq=frame.seq,
            capture_ts=frame.capture_ts,
            media_ts=frame.media_ts,
            width=width,
            height=height,
            keypoints=keypoints,
            pose_latency_s=latency,
        )

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()


__all__ = ["PoseEstimator", "PoseStats", "validate_keypoints"]
