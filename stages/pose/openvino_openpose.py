"""OpenPose (mobilenet_thin) on Intel's OpenVINO runtime: the default pose backend where installed.

OpenVINO reads the shipped frozen TensorFlow graph directly (`openvino.convert_model`, ~0.5 s, no
TensorFlow needed), so no converted copy of the model is shipped. On this project's 2-core AMD EPYC
it runs the graph ~3x faster than `cv2.dnn` (README "Pose backends"), mostly because on CPUs with
AVX512-BF16/AMX OpenVINO computes in bfloat16 by default; `precision: f32` forces float32 (outputs
then equal OpenCV's to 1e-5, ~1.2-1.5x faster than `cv2.dnn`). Grouping is the shared PAF code.

The graph is compiled for one static input shape (uint8 NHWC → float inside the graph), and
recompiled (cached per shape) when `person_height_px` sizing meets a new frame size.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import StageError
from stages.pose.openpose_net import OpenPoseNet

log = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16")


class OpenVINOOpenPose(OpenPoseNet):
    """`PoseBackend` over OpenVINO's CPU plugin + PAF grouping.

    Options as `OpenPoseNet`, plus `precision` (None: OpenVINO's default for the CPU, bf16 where the
    CPU has it; "f32" or "bf16" to force) and `device` (default "CPU"). `threads` caps OpenVINO's
    inference threads (None: all cores).
    """

    name = "openvino-openpose"

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        input_width: int = 432,
        input_height: int = 368,
        person_height_px: float | None = None,
        threads: int | None = None,
        precision: str | None = None,
        device: str = "CPU",
        **paf_options: Any,
    ) -> None:
        super().__init__(model_path, input_width, input_height, person_height_px, threads, **paf_options)
        self._options.update(precision=precision, device=device)
        if precision is not None and precision not in PRECISIONS:
            raise StageError(
                f"openvino-openpose: precision must be one of {PRECISIONS} or null, got {precision!r}"
            )
        try:
            import openvino as ov
        except ImportError as e:
            raise StageError(
                "openvino-openpose: the openvino package is not installed; `pip install openvino` "
                "(a veilcam dependency) or choose pose.backend opencv-openpose"
            ) from e
        self._ov = ov
        self._core = ov.Core()
        try:
            self._model = ov.convert_model(str(self.model_path))
        except Exception as e:  # OpenVINO raises its own (non-exported) error types
            raise StageError(f"openvino-openpose: cannot read {self.model_path}: {e}") from e
        self._config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if self.threads is not None:
            self._config["INFERENCE_NUM_THREADS"] = self.threads
        if precision is not None:
            self._config["INFERENCE_PRECISION_HINT"] = precision
        self.device = device
        self._compiled: dict[tuple[int, int, int], Any] = {}
        self._closed = False
        self._compile(1, *self.input_size)
        log.info(
            "openvino-openpose: %s on %s, precision %s, input %dx%d",
            self.model_path.name,
            device,
            self.precision,
            *self.input_size,
        )

    @property
    def precision(self) -> str:
        """The precision the CPU plugin actually computes in (e.g. 'bf16', 'f32')."""
        compiled = next(iter(self._compiled.values()), None)
        if compiled is None:
            return str(self._config.get("INFERENCE_PRECISION_HINT", "default"))
        return str(compiled.get_property("INFERENCE_PRECISION_HINT").to_string())

    def _compile(self, batch: int, width: int, height: int) -> Any:
        """The compiled model for uint8 NHWC (batch, height, width, 3) input (cached)."""
        key = (batch, width, height)
        compiled = self._compiled.get(key)
        if compiled is not None:
            return compiled
        ov = self._ov
        model = self._model.clone()
        model.reshape({model.inputs[0]: ov.PartialShape([batch, height, width, 3])})
        ppp = ov.preprocess.PrePostProcessor(model)
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        ppp.input().preprocess().convert_element_type(ov.Type.f32)
        try:
            compiled = self._core.compile_model(ppp.build(), self.device, self._config)
        except Exception as e:
            raise StageError(f"openvino-openpose: cannot compile for {self.device}: {e}") from e
        self._compiled[key] = compiled
        return compiled

    def _run(self, resized: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = self.run_batch(resized[None])[0]
        return out

    def run_batch(self, batch: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """(N, h, w, 3) uint8 BGR at the input size → (N, 57, h/8, w/8) float32 (one inference)."""
        if self._closed:
            raise StageError("openvino-openpose: backend is closed")
        n, h, w = batch.shape[:3]
        compiled = self._compile(n, w, h)
        try:
            out = compiled(np.ascontiguousarray(batch))[0]
        except Exception as e:
            raise StageError(f"openvino-openpose: inference failed: {e}") from e
        # NHWC → NCHW view; prepare_maps makes it channel-last again without a copy
        return np.asarray(out, dtype=np.float32).transpose(0, 3, 1, 2)

    def close(self) -> None:
        """Drop the compiled networks (frees their memory)."""
        self._compiled.clear()
        self._closed = True


def available() -> bool:
    """True when the openvino package imports (the `auto` backend then picks this one)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["PRECISIONS", "OpenVINOOpenPose", "available"]
