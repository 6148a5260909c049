"""CMU OpenPose through its official Python bindings (`pyopenpose`), when a build is importable.

The most accurate option on a GPU host. OpenPose is not on PyPI: it is built from source with
`-DBUILD_PYTHON=ON`, which installs either a top-level `pyopenpose` module or `openpose.pyopenpose`.
BODY_25 output (OpenPose's default model) is mapped to the 18-joint layout; the COCO model is
already in it.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import StageError
from stages.pose.opencv_openpose import check_image
from stages.pose.openpose_json import body25_to_coco18
from stages.pose.paf import NUM_PARTS

log = logging.getLogger(__name__)

_MODULES = ("pyopenpose", "openpose.pyopenpose")


def import_pyopenpose() -> Any:
    """The bindings module, or `StageError` saying how to get it."""
    errors = []
    for name in _MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise StageError(
        "pose backend 'openpose' needs OpenPose's Python bindings (build OpenPose with "
        "-DBUILD_PYTHON=ON and put its python dir on PYTHONPATH); not importable: " + "; ".join(errors)
    )


class PyOpenPoseBackend:
    """`PoseBackend` over `pyopenpose.WrapperPython`.

    Options: `model_folder` (OpenPose's `models/`; default `$OPENPOSE_MODELS`), `model_pose`
    (`BODY_25` or `COCO`), `net_resolution` (e.g. `-1x368`), and `params` — extra OpenPose flags
    passed through unchanged.
    """

    name = "openpose"

    def __init__(
        self,
        model_folder: str | os.PathLike[str] | None = None,
        model_pose: str = "BODY_25",
        net_resolution: str = "-1x368",
        params: dict[str, Any] | None = None,
    ) -> None:
        self._options: dict[str, Any] = {
            "model_folder": None if model_folder is None else str(model_folder),
            "model_pose": model_pose,
            "net_resolution": net_resolution,
            "params": dict(params or {}),
        }
        if model_pose not in ("BODY_25", "COCO"):
            raise StageError(f"openpose: model_pose must be BODY_25 or COCO, got {model_pose!r}")
        op = import_pyopenpose()
        folder = model_folder or os.environ.get("OPENPOSE_MODELS")
        if not folder or not Path(folder).is_dir():
            raise StageError(
                "openpose: set the 'model_folder' option (or $OPENPOSE_MODELS) to OpenPose's models/ dir"
            )
        self._op = op
        self.model_pose = model_pose
        self._wrapper = op.WrapperPython()
        flags = {
            "model_folder": str(folder),
            "model_pose": model_pose,
            "net_resolution": net_resolution,
            **(params or {}),
        }
        try:
            self._wrapper.configure(flags)
            self._wrapper.start()
        except Exception as e:  # the bindings raise plain RuntimeError/Exception subclasses
            raise StageError(f"openpose: cannot start OpenPose: {e}") from e
        log.info("openpose: started %s at %s", model_pose, net_resolution)

    def infer(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """BGR (H, W, 3) uint8 → (P, 18, 3) float32 pixels."""
        check_image(image)
        if self._wrapper is None:
            raise StageError("openpose: backend is closed")
        datum = self._op.Datum()
        datum.cvInputData = image
        self._wrapper.emplaceAndPop(self._op.VectorDatum([datum]))
        kp = datum.poseKeypoints
        if kp is None or np.size(kp) == 0:
            return np.zeros((0, NUM_PARTS, 3), dtype=np.float32)
        arr = np.asarray(kp, dtype=np.float32)
        return body25_to_coco18(arr) if arr.shape[1] == 25 else arr

    def close(self) -> None:
        if self._wrapper is not None:
            stop = getattr(self._wrapper, "stop", None)
            if callable(stop):
                stop()
            self._wrapper = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        from stages.pose import create_backend_from_options

        return (create_backend_from_options, (self.name, dict(self._options)))


__all__ = ["PyOpenPoseBackend", "import_pyopenpose"]
