"""One pose process serving several cameras (`stages.pose.server`): real spawned child, real frames;
answers go to the right camera and equal a direct backend's, waiting frames are batched, cameras
are served round-robin, a dead child fails its callers and is replaced; and in the real daemon two
live cameras share one pose process with their drops still counted per camera."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from config.schema import (
    CameraConfig,
    EnclaveConfig,
    MetricsConfig,
    PoseConfig,
    QueuesConfig,
    RulesConfig,
    VeilcamConfig,
    WindowConfig,
)
from enclave_bridge.shared.errors import StageError
from pipeline.messages import Frame, PoseFrame
from stages.pose import create_backend
from stages.pose.server import PoseServer, SharedPoseClient

from .test_pose_opencv import check_contract, read_frames

pytest.importorskip("openvino", reason="openvino is a veilcam dependency; install with pip install -e .")

REPO = Path(__file__).resolve().parents[2]
OPTS = {"threads": 1, "precision": "f32"}  # f32: a batch gives exactly the single-frame numbers


@pytest.fixture(scope="module")
def frames(shared_sample_module) -> list[np.ndarray]:
    return read_frames(shared_sample_module("exercise.avi"), [0, 150, 300])


@pytest.fixture(scope="module")
def shared_sample_module():
    shared = REPO.parent / "shared" / "samples"

    def get(name: str) -> Path:
        if not (shared / name).exists():
            pytest.skip(f"sample {name} not found in {shared}")
        return shared / name

    return get


@pytest.fixture(scope="module")
def server() -> Iterator[PoseServer]:
    s = PoseServer("openvino-openpose", OPTS)
    s.start()
    yield s
    s.close()


def test_frames_of_several_cameras_answered_to_each_and_batched(
    server: PoseServer, frames: list[np.ndarray]
) -> None:
    direct = create_backend("openvino-openpose", **OPTS)
    expected = [direct.infer(img) for img in frames]
    direct.close()
    before = server.stats.batches
    futs = [server.submit(Frame(f"cam{i}", 10 + i, 100.0 + i, 0.1 * i, img)) for i, img in enumerate(frames)]
    results = [f.result(timeout=120) for f in futs]
    for i, (pf, exp, img) in enumerate(zip(results, expected, frames, strict=True)):
        assert isinstance(pf, PoseFrame)
        assert (pf.camera_id, pf.seq, pf.capture_ts) == (f"cam{i}", 10 + i, 100.0 + i)
        check_contract(pf.keypoints, img)
        assert len(pf.keypoints) == len(exp) >= 2
        np.testing.assert_allclose(pf.keypoints, exp, atol=0.05)
        assert pf.pose_latency_s > 0
    # three cameras submitted at once: at most 2 round trips (the first may leave before the rest)
    assert server.stats.batches - before <= 2 and server.stats.max_batch_seen >= 2
    assert all(server.stats.per_camera[f"cam{i}"] >= 1 for i in range(3))


def test_cameras_are_served_round_robin(server: PoseServer, frames: list[np.ndarray]) -> None:
    """A camera with five frames waiting does not hold back another camera's single frame."""
    order: list[str] = []
    lock = threading.Lock()

    def done(tag: str):
        def cb(_):
            with lock:
                order.append(tag)

        return cb

    futs = []
    for k in range(5):
        f = server.submit(Frame("busy", k, 0.0, 0.0, frames[0]))
        f.add_done_callback(done("busy"))
        futs.append(f)
    f = server.submit(Frame("quiet", 0, 0.0, 0.0, frames[1]))
    f.add_done_callback(done("quiet"))
    futs.append(f)
    for f in futs:
        f.result(timeout=120)
    assert order.index("quiet") <= 2  # served in the first or second batch, not after all five


def test_bad_frame_fails_alone_and_the_server_keeps_serving(
    server: PoseServer, frames: list[np.ndarray]
) -> None:
    bad = server.submit(Frame("camX", 1, 0.0, 0.0, np.zeros((32, 32, 3), np.float32)))
    good = server.submit(Frame("camY", 2, 0.0, 0.0, frames[1]))
    res_bad, res_good = bad.result(timeout=120), good.result(timeout=120)
    assert not isinstance(res_bad, PoseFrame) and "uint8" in res_bad.message and res_bad.seq == 1
    assert isinstance(res_good, PoseFrame) and len(res_good.keypoints) >= 2


def test_clients_share_one_process_and_a_dead_one_is_replaced(frames: list[np.ndarray]) -> None:
    opts = {"threads": 1, "input_width": 216, "input_height": 184}
    a = SharedPoseClient("a", "openvino-openpose", opts, failure=lambda seq, msg: ("failed", seq, msg))
    b = SharedPoseClient("b", "openvino-openpose", opts)
    other = SharedPoseClient("c", "openvino-openpose", {**opts, "input_width": 208})
    a.start()
    b.start()
    other.start()
    try:
        assert a.pid is not None and a.pid == b.pid and other.pid != a.pid
        assert isinstance(a.process(Frame("a", 1, 0.0, 0.0, frames[0])), PoseFrame)
        assert a.process(Frame("a", 2, 0.0, 0.0, frames[0][..., 0]))[:2] == ("failed", 2)
        with pytest.raises(StageError, match="got a frame of 'b'"):
            a.process(Frame("b", 3, 0.0, 0.0, frames[0]))
        os.kill(a.pid, signal.SIGKILL)
        with pytest.raises(StageError, match="shared pose"):
            a.process(Frame("a", 4, 0.0, 0.0, frames[0]))
        dead = a.pid
        a.close()  # what the pose stage does before the supervisor restarts it
        a.start()
        assert a.pid != dead
        assert isinstance(a.process(Frame("a", 5, 0.0, 0.0, frames[0])), PoseFrame)
    finally:
        for c in (a, b, other):
            c.close()
    with pytest.raises(StageError, match="not started"):
        a.process(Frame("a", 6, 0.0, 0.0, frames[0]))


def test_bad_backend_fails_at_start() -> None:
    s = PoseServer("openvino-openpose", {"precision": "int4"})
    with pytest.raises(StageError, match="precision"):
        s.start()


def fast_clip(path: Path, n: int = 120, fps: float = 120.0) -> Path:
    """A 120 fps clip of a moving bright blob: far faster than pose, so live capture drops frames."""
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (160, 120))
    for i in range(n):
        img = np.zeros((120, 160, 3), np.uint8)
        cv2.circle(img, (20 + i % 120, 60), 12, (255, 255, 255), -1)
        vw.write(img)
    vw.release()
    return path


def test_daemon_two_live_cameras_share_one_pose_process(tmp_path: Path) -> None:
    import torch

    from enclave_bridge.measured.stgcn import STGCN
    from enclave_bridge.shared.keys import PartyKey, generate_data_key
    from pipeline.app.daemon import Daemon, ListSink, make_local_enclave

    model = tmp_path / "model"
    model.mkdir()
    torch.manual_seed(1)
    torch.save(STGCN(2).state_dict(), model / "model.pt")
    (model / "labels.txt").write_text("a\nb\n")
    pose = PoseConfig(backend="openvino-openpose", options={"threads": 1}, person_height_px=60.0, shared=True)
    cams = {
        name: CameraConfig(
            source=str(fast_clip(tmp_path / f"{name}.avi")),
            live=True,
            loop=True,
            pose=pose,
            queues=QueuesConfig(frames=2, poses=8, windows=1),
            window=WindowConfig(length_frames=4, stride_frames=2),
        )
        for name in ("east", "west")
    }
    cfg = VeilcamConfig(
        state_dir=tmp_path / "state",
        data_key_path=tmp_path / "unused.key",
        enclave=EnclaveConfig(model_dir=model),
        rules=RulesConfig(min_score=0.0, debounce_s=0.0),
        metrics=MetricsConfig(enabled=False),
        cameras=cams,
    )
    key = generate_data_key()
    link = make_local_enclave(cfg, key, [PartyKey.generate("consumer", "ops").public])
    daemon = Daemon(cfg, key=key, link=link, sink=ListSink())
    daemon.start()
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(daemon.run_until_done(tick_s=0.05)))
    runner.start()
    east, west = daemon.cameras["east"], daemon.cameras["west"]
    pids: set[int | None] = set()
    deadline = time.monotonic() + 90
    while (
        time.monotonic() < deadline and min(c.stats.stage("pose").snapshot().count for c in (east, west)) < 20
    ):
        pids |= {c.pose.worker.pid for c in (east, west) if c.pose.worker is not None}
        time.sleep(0.05)
    daemon.request_shutdown()
    runner.join(90)
    assert codes == [0]
    assert len(pids - {None}) == 1  # both cameras' pose stages talked to the same child
    counts = [c.stats.stage("pose").snapshot().count for c in (east, west)]
    assert min(counts) >= 20 and abs(counts[0] - counts[1]) <= 0.2 * max(counts) + 2  # fair share
    for cam in (east, west):
        q = cam.frames.stats()
        assert cam.stats.get("skipped_frames") > 0 and cam.stats.get("skipped_frames") == q.dropped
        assert q.max_depth <= q.capacity + 1
        assert cam.stats.get("pose_errors") == 0
