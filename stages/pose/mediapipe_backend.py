"""MediaPipe Pose (BlazePose, 33 landmarks, one person) mapped to the OpenPose-18 layout.

An optional extra (`pip install 'veilcam[mediapipe]'`): lighter than OpenPose on a CPU but finds a
single person, so it suits one-person rooms (falls at home), not crowds. The neck, which BlazePose
lacks, is the midpoint of the shoulders, scored by the weaker shoulder.
"""

from __future__ import annotations

import logging
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import StageError
from stages.pose.opencv_openpose import check_image
from stages.pose.paf import NUM_PARTS

log = logging.getLogger(__name__)

# COCO-18 joint → BlazePose landmark (−1: neck, synthesised). BlazePose "left" is the person's left,
# as OpenPose's L*.
MEDIAPIPE33_TO_COCO18: tuple[int, ...] = (0, -1, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)


def mediapipe33_to_coco18(
    landmarks: npt.NDArray[np.floating[Any]], width: int, height: int, min_visibility: float = 0.0
) -> npt.NDArray[np.float32]:
    """(33, 3) normalised (x, y, visibility) landmarks → (1, 18, 3) float32 pixels.

    Joints whose visibility is ≤ `min_visibility`, or that fall outside the image (BlazePose
    extrapolates hidden limbs beyond the frame), are missing (0, 0, 0).
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (33, 3):
        raise StageError(f"mediapipe: expected (33, 3) landmarks, got {lm.shape}")
    out = np.zeros((1, NUM_PARTS, 3), dtype=np.float32)
    for j, m in enumerate(MEDIAPIPE33_TO_COCO18):
        if m >= 0:
            x, y, v = lm[m]
        else:
            (xr, yr, vr), (xl, yl, vl) = lm[12], lm[11]
            x, y, v = (xr + xl) / 2, (yr + yl) / 2, min(vr, vl)
        if v <= min_visibility or not (0.0 <= x < 1.0 and 0.0 <= y < 1.0):
            continue
        out[0, j] = (x * width, y * height, min(max(v, 0.0), 1.0))
    return out


class MediaPipeBackend:
    """`PoseBackend` over `mediapipe.solutions.pose.Pose` (video mode: tracks between frames).

    Options: `model_complexity` (0, 1, 2), `min_detection_confidence`, `min_tracking_confidence`,
    `min_visibility` (joints below it are missing).
    """

    name = "mediapipe"

    def __init__(
        self,
        model_complexity: int = 1,
        min_detection_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
        min_visibility: float = 0.1,
    ) -> None:
        self._options: dict[str, Any] = {
            "model_complexity": model_complexity,
            "min_detection_confidence": min_detection_confidence,
            "min_tracking_confidence": min_tracking_confidence,
            "min_visibility": min_visibility,
        }
        try:
            import mediapipe as mp  # type: ignore[import-not-found,unused-ignore]
        except ImportError as e:
            raise StageError(
                "pose backend 'mediapipe' needs the optional extra: pip install 'veilcam[mediapipe]' "
                "(or choose opencv-openpose, the default)"
            ) from e
        if model_complexity not in (0, 1, 2):
            raise StageError(f"mediapipe: model_complexity must be 0, 1 or 2, got {model_complexity}")
        self.min_visibility = float(min_visibility)
        self._pose = mp.solutions.pose.Pose(
            static_image_mode=False,
            model_complexity=model_complexity,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence,
        )
        self.last_timing: dict[str, float] = {"forward_s": 0.0, "grouping_s": 0.0}

    def infer(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """BGR (H, W, 3) uint8 → (0 or 1, 18, 3) float32 pixels."""
        check_image(image)
        if self._pose is None:
            raise StageError("mediapipe: backend is closed")
        result = self._pose.process(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        if result.pose_landmarks is None:
            return np.zeros((0, NUM_PARTS, 3), dtype=np.float32)
        lm = np.array([(p.x, p.y, p.visibility) for p in result.pose_landmarks.landmark], dtype=np.float64)
        return mediapipe33_to_coco18(lm, image.shape[1], image.shape[0], self.min_visibility)

    def close(self) -> None:
        if self._pose is not None:
            self._pose.close()
            self._pose = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        from stages.pose import create_backend_from_options

        return (create_backend_from_options, (self.name, dict(self._options)))


__all__ = ["MEDIAPIPE33_TO_COCO18", "MediaPipeBackend", "mediapipe33_to_coco18"]
