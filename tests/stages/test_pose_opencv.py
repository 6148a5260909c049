"""opencv-openpose on real frames (vtest, exercise, fall-01 right half), the estimator, and errors."""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from enclave_bridge.shared.errors import StageError
from pipeline.messages import Frame, PoseFrame
from stages.pose import PoseBackend, PoseEstimator, create_backend, validate_keypoints
from stages.pose.opencv_openpose import MODEL_ENV, OpenCVOpenPose, default_model_path

REPO = Path(__file__).resolve().parents[2]
NOSE, NECK, RSHO, LSHO, RHIP, LHIP = 0, 1, 2, 5, 8, 11


def read_frames(path: Path, indices: list[int]) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    out: list[np.ndarray] = []
    try:
        for i in range(max(indices) + 1):
            ok, img = cap.read()
            assert ok, f"{path}: frame {i}"
            if i in indices:
                out.append(img)
    finally:
        cap.release()
    return out


@pytest.fixture(scope="module")
def backend() -> Iterator[OpenCVOpenPose]:
    cv2.setNumThreads(1)  # the CPU is shared with other test runs
    b = create_backend("opencv-openpose")
    assert isinstance(b, OpenCVOpenPose)
    yield b
    b.close()


def check_contract(kp: np.ndarray, image: np.ndarray) -> None:
    """Shape, dtype, scores in [0, 1], present joints inside the image, missing joints all zero."""
    h, w = image.shape[:2]
    assert kp.ndim == 3 and kp.shape[1:] == (18, 3)
    assert kp.dtype == np.float32
    assert np.all((kp[..., 2] >= 0) & (kp[..., 2] <= 1))
    present = kp[..., 2] > 0
    assert np.all((kp[..., 0][present] >= 0) & (kp[..., 0][present] <= w - 1))
    assert np.all((kp[..., 1][present] >= 0) & (kp[..., 1][present] <= h - 1))
    assert np.all(kp[~present] == 0)


def check_upright_anatomy(kp: np.ndarray, tol_px: float) -> int:
    """For every person with the joints: neck between the shoulders, nose above neck above hips.
    Returns how many people had enough joints to check (so a test can require some)."""
    checked = 0
    for p in kp:
        have = p[:, 2] > 0
        if have[[NECK, RSHO, LSHO]].all():
            sx = sorted([p[RSHO, 0], p[LSHO, 0]])
            sy = sorted([p[RSHO, 1], p[LSHO, 1]])
            assert sx[0] - tol_px <= p[NECK, 0] <= sx[1] + tol_px
            assert sy[0] - tol_px <= p[NECK, 1] <= sy[1] + tol_px
            checked += 1
        hips = [j for j in (RHIP, LHIP) if have[j]]
        if have[NOSE] and have[NECK] and hips:
            assert p[NOSE, 1] < p[NECK, 1] < min(p[j, 1] for j in hips)
    return checked


def test_exercise_three_people_upright(backend: OpenCVOpenPose, shared_sample) -> None:
    frames = read_frames(shared_sample("exercise.avi"), [0, 150])
    for img in frames:
        kp = backend.infer(img)
        check_contract(kp, img)
        assert kp.shape[0] >= 2
        full = kp[(kp[..., 2] > 0).sum(axis=1) >= 10]
        assert len(full) >= 2
        assert check_upright_anatomy(full, tol_px=6.0) >= 2
        # three people side by side on the lawn: necks at distinct x positions
        necks = full[full[:, NECK, 2] > 0, NECK, 0]
        assert len(necks) >= 2 and np.min(np.diff(np.sort(necks))) > 20
        assert backend.last_timing["forward_s"] > 0 and backend.last_timing["grouping_s"] > 0


def test_vtest_finds_several_small_pedestrians(backend: OpenCVOpenPose) -> None:
    (img,) = read_frames(REPO / "samples" / "vtest.avi", [199])
    kp = backend.infer(img)
    check_contract(kp, img)
    assert kp.shape[0] >= 2
    check_upright_anatomy(kp, tol_px=8.0)
    for p in kp:  # pedestrians are small in this wide CCTV view
        ys = p[p[:, 2] > 0, 1]
        assert ys.max() - ys.min() < img.shape[0] / 2


def test_fall_clip_right_half_one_person(backend: OpenCVOpenPose, shared_sample) -> None:
    (img,) = read_frames(shared_sample("fall-01-cam0.mp4"), [0])
    rgb = np.ascontiguousarray(img[:, 320:])
    kp = backend.infer(rgb)
    check_contract(kp, rgb)
    assert kp.shape[0] >= 1
    best = kp[np.argmax((kp[..., 2] > 0).sum(axis=1))]
    assert (best[:, 2] > 0).sum() >= 8


def test_estimator_makes_pose_frames(backend: OpenCVOpenPose, shared_sample) -> None:
    (img,) = read_frames(shared_sample("exercise.avi"), [10])
    est = PoseEstimator(backend, "cam0")
    pf = est.process(Frame("cam0", 7, 1000.0, 0.7, img))
    assert isinstance(pf, PoseFrame)
    assert (pf.camera_id, pf.seq, pf.capture_ts, pf.media_ts) == ("cam0", 7, 1000.0, 0.7)
    assert (pf.width, pf.height) == (384, 288)
    assert pf.pose_latency_s > 0
    check_contract(pf.keypoints, img)
    assert pf.keypoints.shape[0] >= 2
    assert est.stats.frames == 1 and est.stats.people == pf.keypoints.shape[0]
    assert est.stats.forward_s_total > 0
    with pytest.raises(StageError, match="got a frame of 'cam9'"):
        est.process(Frame("cam9", 8, 1000.1, 0.8, img))
    with pytest.raises(StageError, match="not \\(H, W, 3\\)"):
        est.process(Frame("cam0", 9, 1000.2, 0.9, img[..., 0]))


def test_pickled_backend_is_rebuilt_and_gives_the_same_skeletons(
    backend: OpenCVOpenPose, shared_sample
) -> None:
    (img,) = read_frames(shared_sample("exercise.avi"), [20])
    clone = pickle.loads(pickle.dumps(backend))
    try:
        assert isinstance(clone, OpenCVOpenPose) and clone is not backend
        assert isinstance(clone, PoseBackend)
        np.testing.assert_allclose(clone.infer(img), backend.infer(img), atol=1e-3)
    finally:
        clone.close()


def _child_process_pose(name: str, options: dict[str, object], frame: Frame) -> PoseFrame:
    """What the daemon's pose worker does: build the backend from (name, options), process a frame."""
    cv2.setNumThreads(1)
    est = PoseEstimator(create_backend(name, **options), frame.camera_id)
    try:
        return est.process(frame)
    finally:
        est.close()


def test_backend_built_in_a_spawned_child_process(shared_sample) -> None:
    (img,) = read_frames(shared_sample("exercise.avi"), [30])
    frame = Frame("cam1", 3, 1.0, 0.3, img)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        pf = pool.apply(_child_process_pose, ("opencv-openpose", {"input_width": 432}, frame))
    assert isinstance(pf, PoseFrame) and (pf.camera_id, pf.seq) == ("cam1", 3)
    check_contract(pf.keypoints, img)
    assert pf.keypoints.shape[0] >= 2


def test_input_size_and_thresholds_are_configurable(shared_sample) -> None:
    (img,) = read_frames(shared_sample("exercise.avi"), [0])
    small = create_backend("opencv-openpose", input_width=216, input_height=184, upsample=2.0)
    strict = create_backend("opencv-openpose", thresh_part_cnt=19)  # more parts than a body has
    try:
        kp = small.infer(img)
        check_contract(kp, img)
        assert small.input_size == (216, 184)
        assert strict.infer(img).shape == (0, 18, 3)
    finally:
        small.close()
        strict.close()


def test_bad_images_are_rejected(backend: OpenCVOpenPose) -> None:
    with pytest.raises(StageError, match="uint8"):
        backend.infer(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(StageError, match="\\(H, W, 3\\)"):
        backend.infer(np.zeros((32, 32), np.uint8))
    with pytest.raises(StageError, match="empty"):
        backend.infer(np.zeros((0, 32, 3), np.uint8))


def test_closed_backend_refuses_frames(shared_sample) -> None:
    (img,) = read_frames(shared_sample("exercise.avi"), [0])
    b = create_backend("opencv-openpose", input_width=128, input_height=96)
    assert b.infer(img).shape[1:] == (18, 3)
    b.close()
    with pytest.raises(StageError, match="closed"):
        b.infer(img)


def test_model_path_errors_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.pb"
    with pytest.raises(StageError, match=r"not found.*model_path"):
        create_backend("opencv-openpose", model_path=missing)
    monkeypatch.setenv(MODEL_ENV, str(missing))
    assert default_model_path() == missing
    with pytest.raises(StageError, match="not found"):
        create_backend("opencv-openpose")
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\x00not a graph")
    with pytest.raises(StageError, match="cannot load"):
        create_backend("opencv-openpose", model_path=garbage)
    with pytest.raises(StageError, match="multiples of 8"):
        create_backend("opencv-openpose", input_width=430)
    with pytest.raises(StageError, match="unknown option"):
        create_backend("opencv-openpose", thresh_hat=0.1)


def test_shipped_model_is_found_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODEL_ENV, raising=False)
    path = default_model_path()
    assert path == REPO / "samples" / "models" / "openpose_mobilenet_thin_432x368.pb"
    assert path.is_file()


def test_unknown_backend_and_validation() -> None:
    with pytest.raises(StageError, match="unknown pose backend 'posenet'"):
        create_backend("posenet")
    kp = np.zeros((1, 18, 3), np.float32)
    kp[0, 0] = (500.0, -3.0, 1.5)
    kp[0, 1] = (5.0, 5.0, 0.0)
    out = validate_keypoints(kp, 100, 50, "x")
    assert out[0, 0].tolist() == [99.0, 0.0, 1.0]
    assert out[0, 1].tolist() == [0.0, 0.0, 0.0]
    assert validate_keypoints(np.zeros((0,)), 10, 10, "x").shape == (0, 18, 3)
    with pytest.raises(StageError, match="expected \\(P, 18, 3\\)"):
        validate_keypoints(np.zeros((2, 17, 3)), 10, 10, "x")
    bad = np.zeros((1, 18, 3))
    bad[0, 0, 0] = np.nan
    with pytest.raises(StageError, match="non-finite"):
        validate_keypoints(bad, 10, 10, "x")
