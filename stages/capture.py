"""Video capture with OpenCV: files, RTSP/HTTP streams and webcams (docs/ARCHITECTURE.md §2).

One `CaptureStage` per camera reads frames and puts `Frame`s on a bounded queue. The queue's policy
carries the back-pressure rule: live sources use `drop_oldest` (capture never stalls; each drop is
counted as `skipped_frames`), replays use `block` (nothing dropped, deterministic runs).

`media_ts` drives windowing: for files it is the frame index over the file's frame rate (exact and
repeatable), for live sources the monotonic time since the stage first opened the source, so it
keeps increasing across reconnects. The `fps` setting drops surplus frames by `media_ts`
(`throttled_frames`), e.g. a 30 fps camera feeding a model trained at 10 fps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

import cv2
import numpy as np
import numpy.typing as npt

from config.schema import CameraConfig
from pipeline.errors import StageError
from pipeline.messages import EndOfStream, Frame
from pipeline.queues import BoundedQueue, QueueClosed
from pipeline.stats import CameraStats

log = logging.getLogger(__name__)

# A file is "truncated" when it ends this far before its container's frame count (containers may be
# off by a frame or two; a cut file loses far more).
_TRUNCATION_SLACK = 0.02


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What an opened source reports (the frame count is 0 for live streams)."""

    width: int
    height: int
    fps: float
    frame_count: int


def describe_source(source: str | int) -> str:
    """A loggable name for a source: URLs lose their credentials (`rtsp://user:pw@host` → host)."""
    if isinstance(source, int):
        return f"webcam {source}"
    if "://" in source and "@" in source.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = source.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return source


class CaptureStage:
    """Reads one camera's source and feeds `out`; call `run(stop)` from a supervised thread.

    State that must survive a supervisor restart (frame `seq`, media-time origin, counters) lives
    on the object, so a restarted stage continues numbering instead of starting over.
    """

    def __init__(
        self,
        camera_id: str,
        cfg: CameraConfig,
        out: BoundedQueue[Frame | EndOfStream],
        stats: CameraStats,
    ) -> None:
        self.camera_id = camera_id
        self.cfg = cfg
        self.out = out
        self.stats = stats
        self.name = describe_source(cfg.source)
        self._seq = 0
        self._t_origin: float | None = None  # monotonic origin of live media time
        self._media_offset = 0.0  # for looping files
        self._next_due: float | None = None
        self._timing = stats.stage("capture")
        self.info: SourceInfo | None = None
        self.finished = False

    # -- opening ---------------------------------------------------------------------------------
    def open(self) -> cv2.VideoCapture:
        """Open the source or raise `StageError` with the reason in plain words."""
        src = self.cfg.source
        kind = self.cfg.source_kind
        if kind == "file":
            path = str(src).removeprefix("file://")
            if not os.path.isfile(path):
                raise StageError(f"camera {self.camera_id}: video file not found: {path}")
            cap = cv2.VideoCapture(path)
            if not cap.isOpened():
                raise StageError(
                    f"camera {self.camera_id}: cannot decode {path}: not a video OpenCV can read "
                    "(corrupt file or unsupported codec)"
                )
        elif kind == "webcam":
            cap = cv2.VideoCapture(int(src))
            if not cap.isOpened():
                raise StageError(f"camera {self.camera_id}: cannot open webcam index {src}")
        else:
            rc = self.cfg.reconnect
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                int(rc.open_timeout_s * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                int(rc.read_timeout_s * 1000),
            ]
            cap = cv2.VideoCapture(str(src), cv2.CAP_FFMPEG, params)
            if not cap.isOpened():
                raise StageError(
                    f"camera {self.camera_id}: cannot open stream {self.name} "
                    f"(unreachable, refused or timed out after {rc.open_timeout_s:g} s)"
                )
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.info = SourceInfo(
            width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0),
            height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0),
            fps=fps if 0 < fps < 1000 else 0.0,
            frame_count=max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)) if kind == "file" else 0,
        )
        log.info(
            "camera %s: opened %s (%dx%d, %.2f fps, %d frames)",
            self.camera_id,
            self.name,
            self.info.width,
            self.info.height,
            self.info.fps,
            self.info.frame_count,
        )
        return cap

    def probe(self) -> SourceInfo:
        """Open and close the source once (replay progress bars need the frame count)."""
        cap = self.open()
        cap.release()
        assert self.info is not None
        return self.info

    # -- the loop --------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Read until end of file, `max_frames`, or `stop`; then put an `EndOfStream`.

        Live sources re-open with exponential backoff when reads fail or when they cannot be opened
        at start (forever with `reconnect.max_attempts: null`; past a set budget `StageError` goes
        to the supervisor). A file that cannot be opened raises `StageError` at once.
        """
        if self.finished:
            return
        file_source = self.cfg.source_kind == "file"
        try:
            cap = self.open()
        except StageError as e:
            if file_source:
                raise  # a missing or undecodable file does not come back by waiting
            # a camera that is down at start is the same as one that dropped: the reconnect loop
            # (backoff, `reconnect.max_attempts`, null = keep trying forever), not the supervisor
            log.warning("%s", e)
            cap = self._reconnect(None, stop)
        realtime = self.cfg.realtime if self.cfg.realtime is not None else self.cfg.is_live
        if self._t_origin is None:
            self._t_origin = time.monotonic()
        wall_origin = time.monotonic()
        media_origin: float | None = None
        decoded = 0
        reason = "eof"
        try:
            while not stop.is_set():
                if self.cfg.max_frames is not None and self._seq >= self.cfg.max_frames:
                    reason = "max_frames"
                    break
                t_read = time.monotonic()
                ok, image = cap.read()
                decode_s = time.monotonic() - t_read  # read + decode only (not pacing, not crop)
                if not ok or image is None:
                    if file_source:
                        if self._check_truncated(decoded):
                            reason = "truncated"
                            break
                        if self.cfg.loop and decoded > 0:
                            cap.release()
                            self._media_offset += decoded / (
                                self.info.fps if self.info and self.info.fps else 1
                            )
                            cap = self.open()
                            decoded = 0
                            continue
                        break
                    cap = self._reconnect(cap, stop)
                    continue
                decoded += 1
                if file_source:
                    fps = self.info.fps if self.info and self.info.fps else 0.0
                    media_ts = (decoded - 1) / fps if fps else cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                    media_ts += self._media_offset
                else:
                    media_ts = t_read - self._t_origin
                if realtime and file_source:
                    if media_origin is None:
                        media_origin = media_ts
                    delay = (media_ts - media_origin) - (time.monotonic() - wall_origin)
                    if delay > 0 and stop.wait(delay):
                        break
                if not self._due(media_ts):
                    self.stats.inc("throttled_frames")
                    continue
                # VideoCapture decodes to 8-bit BGR (cv2 types it as any numeric array)
                image = self._crop(cast(npt.NDArray[np.uint8], image))
                frame = Frame(
                    camera_id=self.camera_id,
                    seq=self._seq,
                    capture_ts=time.time(),
                    media_ts=float(media_ts),
                    image=image,
                )
                self._seq += 1
                self.stats.inc("frames_captured")
                self._timing.observe(decode_s)
                if not self.out.put(frame):
                    self.stats.inc("skipped_frames")
        except QueueClosed:
            reason = "shutdown"
        finally:
            cap.release()
        if stop.is_set() and reason == "eof":
            reason = "shutdown"
        self.finished = True
        meta: dict[str, object] = {"frames": self._seq, "decoded": decoded}
        if self.info is not None:
            meta["expected_frames"] = self.info.frame_count
        if reason == "truncated":
            log.error(
                "camera %s: %s ended after %d of %d frames: file truncated or corrupt",
                self.camera_id,
                self.name,
                decoded,
                self.info.frame_count if self.info else -1,
            )
        with contextlib.suppress(QueueClosed):
            self.out.put(EndOfStream(self.camera_id, self._seq, time.time(), reason=reason, meta=meta))

    def _check_truncated(self, decoded: int) -> bool:
        if self.info is None or self.info.frame_count <= 0 or self.cfg.max_frames is not None:
            return False
        missing = self.info.frame_count - decoded
        return missing > max(2, int(self.info.frame_count * _TRUNCATION_SLACK))

    def _due(self, media_ts: float) -> bool:
        """fps throttle by media time: keep a frame when its slot (1/fps) has come."""
        if self.cfg.fps is None:
            return True
        period = 1.0 / self.cfg.fps
        if self._next_due is None or media_ts + 1e-3 >= self._next_due:
            nxt = (self._next_due if self._next_due is not None else media_ts) + period
            # After a gap (reconnect, lag) re-anchor instead of bursting to catch up.
            self._next_due = nxt if nxt > media_ts else media_ts + period
            return True
        return False

    def _crop(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        if self.cfg.crop is None:
            return image
        x, y, w, h = self.cfg.crop
        height, width = image.shape[:2]
        if x >= width or y >= height:
            raise StageError(
                f"camera {self.camera_id}: crop {list(self.cfg.crop)} lies outside the {width}x{height} frame"
            )
        return np.ascontiguousarray(image[y : min(y + h, height), x : min(x + w, width)])

    def _reconnect(self, cap: cv2.VideoCapture | None, stop: threading.Event) -> Any:
        """Re-open a lost (or never opened) live source with exponential backoff (`reconnect.*`)."""
        if cap is not None:
            cap.release()
        rc = self.cfg.reconnect
        delay = rc.initial_backoff_s
        attempt = 0
        while not stop.is_set():
            attempt += 1
            log.warning(
                "camera %s: stream %s lost; re-opening in %.1f s (attempt %d)",
                self.camera_id,
                self.name,
                delay,
                attempt,
            )
            if stop.wait(delay):
                break
            self.stats.inc("reconnects")
            try:
                return self.open()
            except StageError as e:
                if rc.max_attempts is not None and attempt >= rc.max_attempts:
                    raise StageError(f"{e} — gave up after {attempt} re-open attempts") from e
            delay = min(delay * 2, rc.max_backoff_s)
        return cv2.VideoCapture()  # stop requested: a closed capture ends the loop


__all__ = ["CaptureStage", "SourceInfo", "describe_source"]
