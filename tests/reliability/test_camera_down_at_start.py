"""A camera that is down when the daemon starts keeps reconnecting (issue 19.6).

Before: the first open failure of a live stream went to the supervisor's restart budget instead of
the capture reconnect loop, so `reconnect.max_attempts: null` (never give up) was ignored and the
daemon exited 1 after ~31 s — with an `AttributeError` from `PoseProcess.close` running twice.
Here a real HTTP video stream (`ClipServer`) is absent at start and appears later; and a real pose
child process is closed from several threads at once.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from config.schema import CameraConfig, ReconnectConfig
from pipeline.errors import StageError
from pipeline.messages import EndOfStream, Frame
from pipeline.queues import BoundedQueue
from pipeline.stats import CameraStats
from stages.capture import CaptureStage
from stages.pose.stage import PoseProcess
from tests.stages.test_capture_reconnect import ClipServer, clip  # noqa: F401  (fixture)


def stage_for(url: str, max_attempts: int | None) -> tuple[CaptureStage, BoundedQueue, CameraStats]:
    cfg = CameraConfig(
        source=url,
        max_frames=30,
        reconnect=ReconnectConfig(
            initial_backoff_s=0.05,
            max_backoff_s=0.2,
            open_timeout_s=2,
            read_timeout_s=2,
            max_attempts=max_attempts,
        ),
    )
    q: BoundedQueue[Frame | EndOfStream] = BoundedQueue(1000, "drop_oldest")
    stats = CameraStats("cam")
    return CaptureStage("cam", cfg, q, stats), q, stats


def test_stream_down_at_start_is_reconnected_forever(clip: Path) -> None:  # noqa: F811
    server = ClipServer(clip, bytes_per_s=clip.stat().st_size // 300 * 60)  # not started: camera down
    stage, q, stats = stage_for(server.url, max_attempts=None)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            stage.run(threading.Event())
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while stats.get("reconnects") < 4:  # keeps trying with backoff instead of failing
        assert not errors, errors
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.start()  # the camera comes up
    t.join(60)
    server.cut()
    assert not t.is_alive() and not errors, errors
    items = []
    while len(q):
        items.append(q.get(timeout_s=0))
    assert isinstance(items[-1], EndOfStream) and items[-1].reason == "max_frames"
    assert sum(isinstance(i, Frame) for i in items) == 30


def test_stream_down_at_start_gives_up_after_max_attempts(clip: Path) -> None:  # noqa: F811
    server = ClipServer(clip, bytes_per_s=10_000)  # never started
    stage, _, stats = stage_for(server.url, max_attempts=2)
    with pytest.raises(StageError, match="gave up after 2 re-open attempts"):
        stage.run(threading.Event())
    assert stats.get("reconnects") == 2


def test_pose_process_close_from_several_threads(tmp_path: Path) -> None:
    (tmp_path / "pose").mkdir()
    doc = {"people": [{"pose_keypoints_2d": [float(v) for v in np.arange(54) % 50 + 1]}]}
    (tmp_path / "pose" / "c_000000000000_keypoints.json").write_text(json.dumps(doc))
    for _ in range(3):
        proc = PoseProcess("cam", "openpose-json", {"directory": str(tmp_path / "pose")})
        proc.start()
        errors: list[BaseException] = []
        barrier = threading.Barrier(3)

        def close(
            p: PoseProcess = proc, errs: list[BaseException] = errors, b: threading.Barrier = barrier
        ) -> None:
            b.wait()
            try:
                p.close()
            except BaseException as e:
                errs.append(e)

        threads = [threading.Thread(target=close) for _ in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        proc.close()  # and once more, afterwards
        assert errors == [] and proc.pid is None


def test_daemon_keeps_a_camera_down_at_start_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole daemon, default settings: a live camera that never comes up is not given up (the
    issue's daemon exited 1 after 31 s); it keeps reconnecting until shut down, cleanly."""
    import logging
    import socket

    import torch

    from config.schema import EnclaveConfig, MetricsConfig, PoseConfig, SupervisorConfig, VeilcamConfig
    from enclave_bridge.measured.stgcn import STGCN
    from enclave_bridge.shared.keys import PartyKey, generate_data_key
    from pipeline.app.daemon import Daemon, ListSink, make_local_enclave

    model = tmp_path / "model"
    model.mkdir()
    torch.manual_seed(3)
    torch.save(STGCN(2).state_dict(), model / "model.pt")
    (model / "labels.txt").write_text("calm\nbusy\n")
    (model / "model.json").write_text(json.dumps({"T": 8, "stride": 4, "fps": 10}))
    (tmp_path / "pose").mkdir()
    (tmp_path / "pose" / "c_000000000000_keypoints.json").write_text(json.dumps({"people": []}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    key = generate_data_key()
    cfg = VeilcamConfig(
        state_dir=tmp_path / "state",
        data_key_path=tmp_path / "unused.key",
        enclave=EnclaveConfig(model_dir=model),
        metrics=MetricsConfig(enabled=False),
        supervisor=SupervisorConfig(max_restarts=2, window_s=60, backoff_s=0.05),
        cameras={
            "gate": CameraConfig(
                source=f"rtsp://127.0.0.1:{port}/live",
                reconnect=ReconnectConfig(initial_backoff_s=0.05, max_backoff_s=0.2, open_timeout_s=1),
                pose=PoseConfig(backend="openpose-json", options={"directory": str(tmp_path / "pose")}),
            )
        },
    )
    link = make_local_enclave(cfg, key, [PartyKey.generate("consumer", "ops").public])
    daemon = Daemon(cfg, key=key, link=link, sink=ListSink(), metrics=False)
    caplog.set_level(logging.INFO)
    daemon.start()
    gate = daemon.cameras["gate"]
    deadline = time.monotonic() + 60
    while gate.stats.get("reconnects") < 8:  # well past the supervisor's budget of 2 restarts
        assert gate.stats.status != "failed", "camera given up"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert gate.stats.get("stage_restarts") == 0 and gate.stats.status == "running"
    daemon.request_shutdown()
    daemon.run_until_done(tick_s=0.1)
    assert gate.stats.status != "failed"
    assert "AttributeError" not in caplog.text and "Traceback" not in caplog.text
