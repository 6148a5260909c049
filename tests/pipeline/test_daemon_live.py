"""A live camera (a clip paced in real time, looping) feeding the real pose child process: the
pose stage is slower than the camera, so capture drops the oldest frames and counts them, queues
stay within capacity, and a shutdown request flushes every sealed window through the enclave."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from config.schema import (
    CameraConfig,
    EnclaveConfig,
    MetricsConfig,
    QueuesConfig,
    RulesConfig,
    VeilcamConfig,
    WindowConfig,
)
from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.keys import PartyKey, generate_data_key
from pipeline.app.daemon import Daemon, ListSink, make_local_enclave

LABELS = ["a", "b"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(1)
    torch.save(STGCN(len(LABELS)).state_dict(), d / "model.pt")
    (d / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return d


def fast_clip(path: Path, n: int = 120, fps: float = 120.0) -> Path:
    """A 120 fps clip of a moving bright blob: far faster than any pose backend here."""
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (160, 120))
    for i in range(n):
        img = np.zeros((120, 160, 3), np.uint8)
        cv2.circle(img, (20 + i % 120, 60), 12, (255, 255, 255), -1)
        vw.write(img)
    vw.release()
    return path


def test_live_camera_drops_counted_bounded_and_flushes_on_shutdown(tmp_path: Path, model_dir: Path) -> None:
    key = generate_data_key()
    cfg = VeilcamConfig(
        state_dir=tmp_path / "state",
        data_key_path=tmp_path / "unused.key",
        enclave=EnclaveConfig(model_dir=model_dir),
        rules=RulesConfig(min_score=0.0, debounce_s=0.0),
        metrics=MetricsConfig(enabled=False),
        cameras={
            "live": CameraConfig(
                source=str(fast_clip(tmp_path / "fast.avi")),
                live=True,
                loop=True,
                queues=QueuesConfig(frames=2, poses=8, windows=1),
                window=WindowConfig(length_frames=4, stride_frames=2),
            )
        },
    )
    link = make_local_enclave(cfg, key, [PartyKey.generate("consumer", "ops").public])
    sink = ListSink()
    daemon = Daemon(cfg, key=key, link=link, sink=sink)
    cam = daemon.cameras["live"]
    assert cam.frames.policy == "drop_oldest" and cam.windows.policy == "latest_wins"
    daemon.start()
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(daemon.run_until_done(tick_s=0.05)))
    runner.start()
    deadline = time.monotonic() + 60
    while cam.stats.get("windows_submitted") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    daemon.request_shutdown()
    runner.join(60)
    assert codes == [0]
    st = cam.stats
    frames_q = cam.frames.stats()
    # Capture outran pose: drops happened, each one counted once, and the queue never grew.
    assert st.get("skipped_frames") > 0
    assert st.get("skipped_frames") == frames_q.dropped
    assert frames_q.max_depth <= frames_q.capacity + 1  # capacity (+ the end marker)
    assert cam.poses.stats().max_depth <= cam.poses.capacity + 1
    assert st.get("frames_captured") == frames_q.put - 1  # every frame (+ the end marker) went in
    assert cam.stats.stage("pose").snapshot().count == frames_q.got - 1 - st.get("pose_errors")
    # Shutdown was a flush: every sealed window was either evaluated or coalesced (counted).
    assert cam.end is not None and cam.end.reason == "shutdown"
    assert st.get("windows_sealed") == st.get("windows_submitted") + st.get("windows_coalesced")
    assert len(sink.items) == st.get("windows_submitted")
    stats_json = json.loads(st.to_json())
    assert stats_json["counters"]["skipped_frames"] == st.get("skipped_frames")
    assert set(stats_json["queues"]) == {"frames", "poses", "windows"}
    assert "label" not in st.to_json()  # health stats carry no scene content
