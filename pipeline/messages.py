"""Typed messages carried on the bounded queues between stages (docs/ARCHITECTURE.md §2).

Every message names its camera, a per-camera sequence number and a capture time, so a stage can
log and count without looking at payloads. End of stream is an explicit message, never `None`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded video frame. `image` is (H, W, 3) uint8 BGR as OpenCV decodes it.

    `capture_ts` is wall-clock (time.time()) when the frame was read; `media_ts` is the position in
    the source (seconds from the start of a file, or since the stream was opened) and drives
    windowing so replays are deterministic.
    """

    camera_id: str
    seq: int
    capture_ts: float
    media_ts: float
    image: npt.NDArray[np.uint8]  # (H, W, 3) BGR


@dataclass(frozen=True, slots=True)
class PoseFrame:
    """Skeletons found in one frame, OpenPose-18 layout (docs/ARCHITECTURE.md §3).

    `keypoints` is (P, 18, 3) float32: pixel x, pixel y, score in [0, 1]; a missing joint is
    (0, 0, 0). `width`/`height` are the frame size used for normalisation.
    """

    camera_id: str
    seq: int
    capture_ts: float
    media_ts: float
    width: int
    height: int
    keypoints: npt.NDArray[np.float32]
    pose_latency_s: float = 0.0


@dataclass(frozen=True, slots=True)
class SkeletonWindow:
    """A plaintext window ready for encryption: `data` is (C=3, T, V=18, M) float32, normalised
    x/W-0.5, y/H-0.5, score, zeros where missing. Never leaves the windowing stage unencrypted."""

    camera_id: str
    seq: int
    capture_ts: float
    t0: float
    t1: float
    track_ids: tuple[int, ...]
    data: npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class SealedWindow:
    """An AES-GCM encrypted window: `blob` is the msgpack envelope of docs/ARCHITECTURE.md §3."""

    camera_id: str
    seq: int
    capture_ts: float
    t0: float
    t1: float
    kid: str
    blob: bytes
    coalesced: int = 0


@dataclass(frozen=True, slots=True)
class AlertEnvelope:
    """An encrypted, enclave-signed alert (docs/ARCHITECTURE.md §7 envelope bytes), ready for the outbox."""

    camera_id: str
    seq: int
    capture_ts: float
    payload: bytes
    window_seq: int = -1


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """Explicit end of a finite source (replay) or a shutdown request; flows through every stage."""

    camera_id: str
    seq: int
    capture_ts: float
    reason: str = "eof"
    meta: dict[str, object] = field(default_factory=dict)


__all__ = ["AlertEnvelope", "EndOfStream", "Frame", "PoseFrame", "SealedWindow", "SkeletonWindow"]
