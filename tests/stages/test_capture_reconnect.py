"""Stream loss and reconnect against a real network stream: a local HTTP server streams an MJPG clip
at its frame rate; the test cuts the connection and takes the server away for a while, and the
capture stage re-opens the stream with backoff and carries on with increasing seq and media time."""

from __future__ import annotations

import http.server
import itertools
import socket
import socketserver
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from config.schema import CameraConfig, ReconnectConfig
from pipeline.messages import EndOfStream, Frame
from pipeline.queues import BoundedQueue
from pipeline.stats import CameraStats
from stages.capture import CaptureStage


class ClipServer:
    """Serves one file over HTTP at roughly `bytes_per_s`; `cut()` resets live connections and
    stops listening, `start()` listens again on the same port."""

    def __init__(self, clip: Path, bytes_per_s: int) -> None:
        self.data = clip.read_bytes()
        self.bytes_per_s = bytes_per_s
        self.cut_event = threading.Event()
        self.requests = 0
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self._srv: socketserver.ThreadingTCPServer | None = None

    def start(self) -> None:
        server = self
        self.cut_event.clear()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "video/x-msvideo")
                self.send_header("Content-Length", str(len(server.data)))
                self.end_headers()
                chunk = 2048
                for i in range(0, len(server.data), chunk):
                    if server.cut_event.is_set():
                        self.connection.shutdown(socket.SHUT_RDWR)  # abrupt loss mid-stream
                        return
                    try:
                        self.wfile.write(server.data[i : i + chunk])
                    except OSError:
                        return
                    time.sleep(chunk / server.bytes_per_s)

            def log_message(self, *args: object) -> None:
                return None

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._srv = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self._srv.daemon_threads = True
        threading.Thread(target=self._srv.serve_forever, daemon=True).start()

    def cut(self) -> None:
        self.cut_event.set()
        if self._srv is not None:
            self._srv.shutdown()
            self._srv.server_close()
            self._srv = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/clip.avi"


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    path = tmp_path / "clip.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 48))
    for i in range(300):
        vw.write(np.full((48, 64, 3), (i * 3) % 256, np.uint8))
    vw.release()
    return path


def test_stream_loss_reconnects_with_backoff_and_continues(clip: Path) -> None:
    per_frame = clip.stat().st_size // 300
    server = ClipServer(clip, bytes_per_s=per_frame * 60)  # ~60 frames/s on the wire
    server.start()
    cfg = CameraConfig(
        source=server.url,
        max_frames=90,
        reconnect=ReconnectConfig(
            initial_backoff_s=0.05, max_backoff_s=0.2, open_timeout_s=2, read_timeout_s=2
        ),
    )
    assert cfg.is_live
    q: BoundedQueue[Frame | EndOfStream] = BoundedQueue(1000, "drop_oldest")
    stats = CameraStats("cam")
    stage = CaptureStage("cam", cfg, q, stats)
    t = threading.Thread(target=stage.run, args=(threading.Event(),), daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while stats.get("frames_captured") < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stats.get("frames_captured") >= 20
    server.cut()  # connection reset; nobody listening for a moment
    time.sleep(0.6)
    server.start()
    t.join(60)
    assert not t.is_alive()
    items = []
    while len(q):
        items.append(q.get(timeout_s=0))
    frames = [f for f in items if isinstance(f, Frame)]
    assert isinstance(items[-1], EndOfStream) and items[-1].reason == "max_frames"
    assert len(frames) == 90
    assert stats.get("reconnects") >= 1 and server.requests >= 2
    assert [f.seq for f in frames] == list(range(90))  # numbering continues across the reconnect
    ts = [f.media_ts for f in frames]
    assert all(b > a for a, b in itertools.pairwise(ts))  # media time never goes back
    # the gap shows in media time: somewhere between two frames at least the outage elapsed
    assert max(b - a for a, b in itertools.pairwise(ts)) >= 0.5
