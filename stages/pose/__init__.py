"""Pose backends: frames → OpenPose/COCO-18 skeletons in image pixels (docs/ARCHITECTURE.md §3).

Every backend implements `PoseBackend`; `create_backend(name, **options)` builds one by name, which
is how the daemon's pose worker process constructs it (backends wrap native libraries that cannot be
pickled, so a child gets `(name, options)` and builds its own).

| name | what | needs |
|---|---|---|
| `auto` (default) | `openvino-openpose` when openvino imports, else `opencv-openpose` | - |
| `openvino-openpose` | mobilenet_thin on OpenVINO + PAF grouping (~3x `cv2.dnn`) | `openvino` (a dep.) |
| `opencv-openpose` | the same graph via `cv2.dnn` + the same PAF grouping (fallback) | nothing extra |
| `openpose` | CMU OpenPose Python bindings (`pyopenpose`) | an OpenPose build |
| `mediapipe` | MediaPipe Pose, one person, mapped to 18 joints | `pip install veilcam[mediapipe]` |
| `openpose-json` | replays OpenPose `--write_json` output directories | the JSON files |
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import StageError
from stages.pose.estimator import PoseEstimator, validate_keypoints
from stages.pose.paf import NUM_PARTS

log = logging.getLogger(__name__)

KEYPOINT_NAMES: tuple[str, ...] = (
    "nose",
    "neck",
    "r_shoulder",
    "r_elbow",
    "r_wrist",
    "l_shoulder",
    "l_elbow",
    "l_wrist",
    "r_hip",
    "r_knee",
    "r_ankle",
    "l_hip",
    "l_knee",
    "l_ankle",
    "r_eye",
    "l_eye",
    "r_ear",
    "l_ear",
)
"""OpenPose/COCO-18 joint order (docs/ARCHITECTURE.md §3); index = joint id."""

DEFAULT_BACKEND = "auto"
AUTO_ORDER: tuple[str, ...] = ("openvino-openpose", "opencv-openpose")
"""What `auto` tries, fastest first (README "Pose backends"); the first whose runtime imports wins."""


@runtime_checkable
class PoseBackend(Protocol):
    """One pose model. `infer` returns (P, 18, 3) float32: x, y in pixels of the *given* image,
    score in [0, 1]; a missing joint is (0, 0, 0); P may be 0."""

    name: str

    def infer(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """BGR (H, W, 3) uint8 → (P, 18, 3) float32."""
        ...

    def close(self) -> None:
        """Release native resources; the backend is unusable afterwards."""
        ...


def _opencv(**o: Any) -> PoseBackend:
    from stages.pose.opencv_openpose import OpenCVOpenPose

    return OpenCVOpenPose(**o)


def _openvino(**o: Any) -> PoseBackend:
    from stages.pose.openvino_openpose import OpenVINOOpenPose

    return OpenVINOOpenPose(**o)


def _openpose(**o: Any) -> PoseBackend:
    from stages.pose.pyopenpose_backend import PyOpenPoseBackend

    return PyOpenPoseBackend(**o)


def _mediapipe(**o: Any) -> PoseBackend:
    from stages.pose.mediapipe_backend import MediaPipeBackend

    return MediaPipeBackend(**o)


def _json(**o: Any) -> PoseBackend:
    from stages.pose.openpose_json import OpenPoseJsonBackend

    return OpenPoseJsonBackend(**o)


BACKENDS: dict[str, Callable[..., PoseBackend]] = {
    "openvino-openpose": _openvino,
    "opencv-openpose": _opencv,
    "openpose": _openpose,
    "mediapipe": _mediapipe,
    "openpose-json": _json,
}


def create_backend(name: str = DEFAULT_BACKEND, **options: Any) -> PoseBackend:
    """Build the backend called `name` with its keyword `options` (config `pose.options`).

    `auto` builds the first of `AUTO_ORDER` whose runtime is installed. Raises `StageError` for an
    unknown name, a missing optional dependency/model, or bad options.
    """
    if name == "auto":
        name = resolve_auto()
        if name == AUTO_ORDER[0]:
            try:
                return create_backend(name, **options)
            except StageError as e:  # e.g. the CPU plugin cannot compile here: fall back, loudly
                log.warning("pose backend auto: %s failed (%s); using %s", name, e, AUTO_ORDER[1])
            name = AUTO_ORDER[1]
        # the fallback has no OpenVINO knobs: drop them rather than fail on them
        options = {k: v for k, v in options.items() if k not in _OPENVINO_ONLY}
    factory = BACKENDS.get(name)
    if factory is None:
        raise StageError(f"unknown pose backend {name!r}; choose auto or one of {', '.join(BACKENDS)}")
    try:
        return factory(**options)
    except TypeError as e:
        raise StageError(f"pose backend {name!r}: bad options {sorted(options)}: {e}") from e


_OPENVINO_ONLY = frozenset({"precision", "device"})


def resolve_auto() -> str:
    """The backend `auto` stands for on this machine (both take the same options, except
    `precision`/`device`, which only openvino-openpose reads)."""
    from stages.pose.openvino_openpose import available

    return AUTO_ORDER[0] if available() else AUTO_ORDER[1]


def create_backend_from_options(name: str, options: dict[str, Any]) -> PoseBackend:
    """Pickle helper: backends reduce to `(name, options)` and are rebuilt by this in the child."""
    return create_backend(name, **options)


__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "DEFAULT_BACKEND",
    "KEYPOINT_NAMES",
    "NUM_PARTS",
    "PoseBackend",
    "PoseEstimator",
    "StageError",
    "create_backend",
    "create_backend_from_options",
    "resolve_auto",
    "validate_keypoints",
]
