"""Replay of OpenPose `--write_json` output: one `<name>_<12-digit frame>_keypoints.json` per frame.

Lets a site that already runs OpenPose (or any tool writing its JSON format) feed the daemon
without running a pose model, and makes pose-stage tests deterministic. Each file holds
`{"people": [{"pose_keypoints_2d": [x0, y0, c0, x1, …]}, …]}` with either 18 joints (COCO model,
54 values) or 25 joints (BODY_25, 75 values); BODY_25 is mapped to the 18-joint layout.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import StageError
from pipeline.messages import Frame
from stages.pose.paf import NUM_PARTS

log = logging.getLogger(__name__)

BODY25_TO_COCO18: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
"""COCO-18 joint j = BODY_25 joint `BODY25_TO_COCO18[j]` (BODY_25 adds MidHip=8 and six foot points)."""

_NAME = re.compile(r"^(?P<prefix>.*?)_?(?P<num>\d{12})_keypoints\.json$")
_INDEX_MODES = ("counter", "seq", "media_ts")
_S = TypeVar("_S", bound=np.generic)  # the keypoints' dtype, kept by the layout conversion


def body25_to_coco18(kp: npt.NDArray[_S]) -> npt.NDArray[_S]:
    """(..., 25, 3) BODY_25 → (..., 18, 3) COCO-18 (drops MidHip and the feet)."""
    arr = np.asarray(kp)
    if arr.shape[-2:] != (25, 3):
        raise StageError(f"expected (..., 25, 3) BODY_25 keypoints, got {arr.shape}")
    return arr[..., list(BODY25_TO_COCO18), :]


def parse_people(doc: Any, layout: str = "auto", source: str = "<json>") -> npt.NDArray[np.float32]:
    """One OpenPose JSON document → (P, 18, 3) float32 (coordinates as written in the file).

    `layout` is `auto` (by length: 54 → COCO-18, 75 → BODY_25), `coco18` or `body25`.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("people"), list):
        raise StageError(f"openpose-json: {source}: no 'people' list")
    people: list[npt.NDArray[np.float64]] = []
    for i, person in enumerate(doc["people"]):
        flat = person.get("pose_keypoints_2d") if isinstance(person, dict) else None
        if not isinstance(flat, list):
            raise StageError(f"openpose-json: {source}: person {i} has no pose_keypoints_2d list")
        if not flat:
            continue  # OpenPose writes [] for a person found only by face/hand detectors
        try:
            arr = np.asarray(flat, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise StageError(f"openpose-json: {source}: person {i}: non-numeric keypoints") from e
        n = arr.size
        kind = layout if layout != "auto" else {54: "coco18", 75: "body25"}.get(n, "?")
        want = {"coco18": 54, "body25": 75}.get(kind)
        if want is None or n != want:
            raise StageError(
                f"openpose-json: {source}: person {i} has {n} values; expected 54 (COCO-18) or "
                f"75 (BODY_25) for layout {layout!r}"
            )
        kp = arr.reshape(-1, 3)
        if kind == "body25":
            kp = body25_to_coco18(kp)
        if not np.all(np.isfinite(kp)):
            raise StageError(f"openpose-json: {source}: person {i} has non-finite keypoints")
        people.append(kp)
    if not people:
        return np.zeros((0, NUM_PARTS, 3), dtype=np.float32)
    out = np.stack(people).astype(np.float32)
    out[out[..., 2] <= 0] = 0.0  # OpenPose marks a missing joint with confidence 0
    return out


def list_frames(directory: Path, prefix: str | None = None) -> dict[int, Path]:
    """Frame number → file of a `--write_json` directory (one clip; `prefix` picks one of several)."""
    if not directory.is_dir():
        raise StageError(f"openpose-json: {directory} is not a directory")
    by_prefix: dict[str, dict[int, Path]] = {}
    for entry in os.scandir(directory):
        m = _NAME.match(entry.name)
        if m and entry.is_file():
            by_prefix.setdefault(m["prefix"], {})[int(m["num"])] = Path(entry.path)
    if prefix is not None:
        if prefix not in by_prefix:
            raise StageError(f"openpose-json: no '{prefix}_<frame>_keypoints.json' files in {directory}")
        return by_prefix[prefix]
    if not by_prefix:
        raise StageError(f"openpose-json: no '*_<12 digits>_keypoints.json' files in {directory}")
    if len(by_prefix) > 1:
        raise StageError(
            f"openpose-json: {directory} holds several clips ({', '.join(sorted(by_prefix))}); "
            "set the 'prefix' option"
        )
    return next(iter(by_prefix.values()))


class OpenPoseJsonBackend:
    """`PoseBackend` replaying a `--write_json` directory: frame *i* reads file number `start + i`.

    Options: `directory` (required), `prefix` (the `<name>` part, when several clips share a
    directory), `layout` (`auto` | `coco18` | `body25`), `start` (first frame number),
    `index` — how *i* is found: `counter` (i-th call; replays never drop frames), `seq`
    (`Frame.seq`) or `media_ts` (round(`media_ts`·`fps`), for a source throttled below its file fps),
    and `normalized` (coordinates were written with `--keypoint_scale 3`, i.e. in [0, 1]).
    A frame whose file is missing raises `StageError` (the daemon counts it and moves on).
    """

    name = "openpose-json"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        prefix: str | None = None,
        layout: str = "auto",
        start: int = 0,
        index: str = "counter",
        fps: float | None = None,
        normalized: bool = False,
    ) -> None:
        if layout not in ("auto", "coco18", "body25"):
            raise StageError(f"openpose-json: layout must be auto, coco18 or body25, got {layout!r}")
        if index not in _INDEX_MODES:
            raise StageError(f"openpose-json: index must be one of {', '.join(_INDEX_MODES)}, got {index!r}")
        if index == "media_ts" and not (fps and fps > 0):
            raise StageError("openpose-json: index 'media_ts' needs a positive 'fps' option")
        if start < 0:
            raise StageError(f"openpose-json: start must be >= 0, got {start}")
        self._options: dict[str, Any] = {
            "directory": str(directory),
            "prefix": prefix,
            "layout": layout,
            "start": start,
            "index": index,
            "fps": fps,
            "normalized": normalized,
        }
        self.directory = Path(directory)
        self.files = list_frames(self.directory, prefix)
        self.layout, self.start, self.index_mode = layout, int(start), index
        self.fps, self.normalized = fps, normalized
        self._next = 0
        log.info("openpose-json: %d frame files in %s", len(self.files), self.directory)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int, image_wh: tuple[int, int] | None = None) -> npt.NDArray[np.float32]:
        """Skeletons of frame `i` (relative to `start`) → (P, 18, 3) float32 pixels."""
        num = self.start + i
        path = self.files.get(num)
        if path is None:
            raise StageError(f"openpose-json: no keypoints file for frame {num} in {self.directory}")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StageError(f"openpose-json: cannot read {path.name}: {type(e).__name__}") from e
        kp = parse_people(doc, self.layout, path.name)
        if self.normalized:
            if image_wh is None:
                raise StageError("openpose-json: normalized coordinates need the image size")
            kp[..., 0] *= image_wh[0]
            kp[..., 1] *= image_wh[1]
            kp[kp[..., 2] <= 0] = 0.0
        return kp

    def infer(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """The next frame's skeletons (the `counter` rule); `image` only supplies the size."""
        i = self._next
        self._next += 1
        return self.read(i, (int(image.shape[1]), int(image.shape[0])))

    def infer_frame(self, frame: Frame) -> npt.NDArray[np.float32]:
        """The skeletons of `frame`, indexed by the configured rule (see the class docstring)."""
        if self.index_mode == "seq":
            i = frame.seq
        elif self.index_mode == "media_ts":
            i = round(frame.media_ts * float(self.fps or 0.0))
        else:
            i = self._next
            self._next += 1
        return self.read(i, (int(frame.image.shape[1]), int(frame.image.shape[0])))

    def close(self) -> None:
        """Nothing native to release; resets the counter."""
        self._next = 0

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        from stages.pose import create_backend_from_options

        return (create_backend_from_options, (self.name, dict(self._options)))


__all__ = ["BODY25_TO_COCO18", "OpenPoseJsonBackend", "body25_to_coco18", "list_frames", "parse_people"]
