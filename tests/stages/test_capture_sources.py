"""Capture from real video files (written here with OpenCV) and a real closed RTSP port."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from config.schema import REPO_ROOT, CameraConfig, ReconnectConfig
from pipeline.errors import StageError
from pipeline.messages import EndOfStream, Frame
from pipeline.queues import BoundedQueue
from pipeline.stats import CameraStats
from stages.capture import CaptureStage, describe_source

VTEST = REPO_ROOT / "samples" / "vtest.avi"


def write_clip(path: Path, n: int, fps: float = 30.0, size: tuple[int, int] = (64, 48)) -> Path:
    """An MJPG clip whose frame i is filled with grey level 4*i (identifiable after decoding)."""
    w, h = size
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert vw.isOpened()
    for i in range(n):
        img = np.full((h, w, 3), (4 * i) % 256, np.uint8)
        img[:, : w // 2, 2] = 255  # left half red: for the crop test
        vw.write(img)
    vw.release()
    return path


def run_capture(cfg: CameraConfig, capacity: int = 1000, policy: str = "block") -> tuple[list, CameraStats]:
    q: BoundedQueue[Frame | EndOfStream] = BoundedQueue(capacity, policy)
    stats = CameraStats("cam")
    CaptureStage("cam", cfg, q, stats).run(threading.Event())
    items = []
    while len(q):
        items.append(q.get(timeout_s=0))
    return items, stats


def test_file_replay_reads_every_frame_in_order(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "c.avi", 25)
    items, stats = run_capture(CameraConfig(source=str(clip)))
    frames, end = items[:-1], items[-1]
    assert isinstance(end, EndOfStream) and end.reason == "eof"
    assert [f.seq for f in frames] == list(range(25))
    assert np.allclose([f.media_ts for f in frames], np.arange(25) / 30.0)
    grey = [float(f.image[:, 40:, 0].mean()) for f in frames]
    assert np.allclose(grey, 4 * np.arange(25), atol=3)
    assert stats.get("frames_captured") == 25 and stats.get("skipped_frames") == 0


def test_fps_throttle_drops_surplus_by_timestamp(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "c.avi", 30, fps=30)
    items, stats = run_capture(CameraConfig(source=str(clip), fps=10))
    frames = [f for f in items if isinstance(f, Frame)]
    assert len(frames) == 10
    assert np.allclose([f.media_ts for f in frames], np.arange(10) / 10.0, atol=1e-6)
    grey = [float(f.image[:, 40:, 0].mean()) for f in frames]
    assert np.allclose(grey, 4 * 3 * np.arange(10), atol=3)  # every third source frame
    assert stats.get("throttled_frames") == 20


def test_crop_and_max_frames(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "c.avi", 20)
    items, _ = run_capture(CameraConfig(source=str(clip), crop=(32, 8, 100, 20), max_frames=5))
    frames = [f for f in items if isinstance(f, Frame)]
    assert len(frames) == 5 and items[-1].reason == "max_frames"
    assert frames[0].image.shape == (20, 32, 3)  # clipped to the frame's right half
    assert frames[0].image[..., 2].mean() < 100  # the red left half is gone
    with pytest.raises(StageError, match="outside"):
        run_capture(CameraConfig(source=str(clip), crop=(500, 0, 10, 10)))


def test_missing_garbage_and_truncated_files(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="not found"):
        run_capture(CameraConfig(source=str(tmp_path / "nope.avi")))
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(StageError, match="cannot decode"):
        run_capture(CameraConfig(source=str(garbage)))
    data = VTEST.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 10])
    items, _ = run_capture(CameraConfig(source=str(cut)))
    end = items[-1]
    assert isinstance(end, EndOfStream) and end.reason == "truncated"
    assert end.meta["expected_frames"] == 795 and 0 < end.meta["decoded"] < 795


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


def test_unreachable_rtsp_is_a_clear_stage_error() -> None:
    port = closed_port()
    cfg = CameraConfig(
        source=f"rtsp://user:secret@127.0.0.1:{port}/live",
        # a camera down at start is retried like a dropped one (forever by default); give up after 1
        reconnect=ReconnectConfig(open_timeout_s=2, initial_backoff_s=0.05, max_attempts=1),
    )
    with pytest.raises(StageError) as ei:
        run_capture(cfg)
    msg = str(ei.value)
    assert "cannot open stream" in msg and f"127.0.0.1:{port}" in msg
    assert "secret" not in msg  # credentials never in messages


def test_reconnect_backs_off_then_gives_up() -> None:
    port = closed_port()
    cfg = CameraConfig(
        source=f"rtsp://127.0.0.1:{port}/live",
        reconnect=ReconnectConfig(
            initial_backoff_s=0.01, max_backoff_s=0.02, max_attempts=3, open_timeout_s=1
        ),
    )
    q: BoundedQueue[Frame | EndOfStream] = BoundedQueue(2, "drop_oldest")
    stats = CameraStats("cam")
    stage = CaptureStage("cam", cfg, q, stats)
    with pytest.raises(StageError, match="gave up after 3"):
        stage._reconnect(cv2.VideoCapture(), threading.Event())
    assert stats.get("reconnects") == 3


def test_live_source_with_slow_consumer_drops_oldest_and_stays_bounded(tmp_path: Path) -> None:
    """A file paced in real time as a live camera (200 fps) against a consumer taking 20 ms/frame."""
    clip = write_clip(tmp_path / "live.avi", 200, fps=200)
    cfg = CameraConfig(source=str(clip), live=True)
    assert cfg.is_live and (cfg.realtime is None)
    q: BoundedQueue[Frame | EndOfStream] = BoundedQueue(3, "drop_oldest", name="frames")
    stats = CameraStats("cam")
    stage = CaptureStage("cam", cfg, q, stats)
    t = threading.Thread(target=stage.run, args=(threading.Event(),))
    t.start()
    consumed: list[Frame] = []
    while True:
        item = q.get(timeout_s=10)
        if isinstance(item, EndOfStream):
            break
        consumed.append(item)
        time.sleep(0.02)
    t.join(10)
    qs = q.stats()
    skipped = stats.get("skipped_frames")
    assert skipped > 0
    assert skipped == qs.dropped  # every drop counted once
    assert qs.max_depth <= 3 + 1  # bounded memory: capacity frames (+ the end marker)
    assert len(consumed) + skipped == stats.get("frames_captured") == 200
    seqs = [f.seq for f in consumed]
    assert seqs == sorted(seqs) and seqs[-1] >= 195  # newest frames win


def test_describe_source_hides_credentials() -> None:
    assert describe_source("rtsp://admin:pw@10.0.0.2:554/s") == "rtsp://***@10.0.0.2:554/s"
    assert describe_source(0) == "webcam 0"
    assert describe_source("/a/b.mp4") == "/a/b.mp4"
