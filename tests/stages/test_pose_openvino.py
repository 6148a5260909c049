"""openvino-openpose against opencv-openpose on real frames; `auto` selection and its fallback;
input size from the expected person height; the backend in a real daemon pose child process."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from config.schema import PoseConfig
from enclave_bridge.shared.errors import StageError
from pipeline.messages import Frame, PoseFrame
from stages.pose import DEFAULT_BACKEND, PoseBackend, create_backend, resolve_auto
from stages.pose.compare import Agreement, match_people
from stages.pose.opencv_openpose import OpenCVOpenPose
from stages.pose.openpose_net import TARGET_PERSON_INPUT_PX, input_size_for_person
from stages.pose.openvino_openpose import OpenVINOOpenPose

from .test_pose_opencv import check_contract, read_frames

pytest.importorskip("openvino", reason="openvino is a veilcam dependency; install with pip install -e .")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def opencv() -> Iterator[OpenCVOpenPose]:
    cv2.setNumThreads(1)  # the CPU is shared with other test runs
    b = create_backend("opencv-openpose")
    assert isinstance(b, OpenCVOpenPose)
    yield b
    b.close()


@pytest.fixture(scope="module")
def ov_default() -> Iterator[OpenVINOOpenPose]:
    b = create_backend("openvino-openpose", threads=1)
    assert isinstance(b, OpenVINOOpenPose)
    yield b
    b.close()


@pytest.fixture(scope="module")
def sample_frames() -> list[np.ndarray]:
    """Four real frames: two of vtest (small pedestrians), exercise (three people), fall (one)."""
    shared = REPO.parent / "shared" / "samples"
    if not (shared / "exercise.avi").exists() or not (shared / "fall-01-cam0.mp4").exists():
        pytest.skip(f"shared sample clips not found in {shared}")
    frames = read_frames(REPO / "samples" / "vtest.avi", [199, 400])
    frames += read_frames(shared / "exercise.avi", [150])
    (fall,) = read_frames(shared / "fall-01-cam0.mp4", [0])
    frames.append(np.ascontiguousarray(fall[:, 320:]))
    return frames


@pytest.fixture(scope="module")
def opencv_skeletons(opencv: OpenCVOpenPose, sample_frames: list[np.ndarray]) -> list[np.ndarray]:
    return [opencv.infer(img) for img in sample_frames]


def test_auto_is_the_default_and_picks_openvino() -> None:
    assert DEFAULT_BACKEND == "auto" and PoseConfig().backend == "auto"
    assert resolve_auto() == "openvino-openpose"


def test_f32_outputs_equal_opencv(
    sample_frames: list[np.ndarray], opencv: OpenCVOpenPose, opencv_skeletons: list[np.ndarray]
) -> None:
    """Forced float32, OpenVINO computes the same network: raw maps and skeletons match OpenCV's."""
    b = create_backend("openvino-openpose", precision="f32", threads=1)
    try:
        assert b.precision == "f32"
        img = sample_frames[0]
        np.testing.assert_allclose(b.forward(img), opencv.forward(img), atol=1e-4)
        ag = Agreement()
        for img, ref in zip(sample_frames, opencv_skeletons, strict=True):
            kp = b.infer(img)
            check_contract(kp, img)
            ag.add(ref, kp)
        s = ag.summary()
        assert s["people_per_frame_ref"] >= 1.5  # the frames do hold people
        assert s["same_people_count_share"] == 1.0 and s["ref_people_matched_share"] == 1.0
        assert s["mean_joint_distance_px"] < 0.05
        assert s["joints_ref_only"] == 0 and s["joints_cand_only"] == 0
    finally:
        b.close()


def test_default_precision_finds_the_same_people_as_opencv(
    sample_frames: list[np.ndarray], ov_default: OpenVINOOpenPose, opencv_skeletons: list[np.ndarray]
) -> None:
    """The default (bf16 on CPUs that have it) differs from OpenCV in the last digits of the maps:
    the same people, joints within a few pixels (README "Pose backends" has the full-clip numbers)."""
    ag = Agreement()
    for img, ref in zip(sample_frames, opencv_skeletons, strict=True):
        kp = ov_default.infer(img)
        check_contract(kp, img)
        assert abs(len(kp) - len(ref)) <= 1
        ag.add(ref, kp)
        assert ov_default.last_timing["forward_s"] > 0 and ov_default.last_timing["grouping_s"] > 0
    s = ag.summary()
    assert abs(s["people_per_frame_cand"] - s["people_per_frame_ref"]) <= 0.25 * s["people_per_frame_ref"]
    assert s["ref_people_matched_share"] >= 0.8
    assert s["mean_joint_distance_px"] < 2.0


def test_input_size_for_person_height() -> None:
    # vtest-like 768x576 frame, 60 px people → scaled up; 1080p with 400 px people → scaled down
    assert input_size_for_person((768, 576), 60.0) == (1024, 768)  # capped at 1024 wide
    w, h = input_size_for_person((1920, 1080), 400.0)
    assert (w, h) == (464, 256) and w % 8 == 0 and h % 8 == 0
    assert input_size_for_person((640, 480), TARGET_PERSON_INPUT_PX) == (640, 480)
    assert input_size_for_person((192, 144), 150.0) == (168, 128)  # short side raised to 128
    with pytest.raises(StageError, match="person_height_px"):
        input_size_for_person((640, 480), 0.0)


def test_person_height_sizes_the_input_per_frame_size(shared_sample) -> None:
    (img,) = read_frames(shared_sample("exercise.avi"), [150])  # 384x288, people ≈150 px tall
    b = create_backend("openvino-openpose", person_height_px=150.0, threads=1)
    try:
        assert b.input_size_for((384, 288)) == (248, 184)
        kp = b.infer(img)
        check_contract(kp, img)
        assert len(kp) >= 2
        assert b.forward(img).shape == (57, 184 // 8, 248 // 8)
        small = np.ascontiguousarray(img[::2, ::2])  # a second frame size compiles a second shape
        assert b.forward(small).shape == (57, 128 // 8, 168 // 8)  # short side ≥ 128
    finally:
        b.close()


def test_pickled_backend_keeps_its_options(
    ov_default: OpenVINOOpenPose, sample_frames: list[np.ndarray]
) -> None:
    b = create_backend("openvino-openpose", precision="f32", input_width=320, input_height=240, threads=1)
    clone = pickle.loads(pickle.dumps(b))
    try:
        assert isinstance(clone, OpenVINOOpenPose) and isinstance(clone, PoseBackend)
        assert clone.precision == "f32" and clone.input_size == (320, 240)
        img = sample_frames[2]
        np.testing.assert_allclose(clone.infer(img), b.infer(img), atol=1e-3)
    finally:
        b.close()
        clone.close()


def test_errors_bad_precision_bad_image_closed(sample_frames: list[np.ndarray]) -> None:
    with pytest.raises(StageError, match="precision"):
        create_backend("openvino-openpose", precision="int4")
    with pytest.raises(StageError, match="multiples of 8"):
        create_backend("openvino-openpose", input_width=430)
    with pytest.raises(StageError, match="not found"):
        create_backend("openvino-openpose", model_path="/nonexistent/graph.pb")
    b = create_backend("openvino-openpose", input_width=128, input_height=96, threads=1)
    with pytest.raises(StageError, match="uint8"):
        b.infer(np.zeros((32, 32, 3), np.float32))
    b.close()
    with pytest.raises(StageError, match="closed"):
        b.infer(sample_frames[0])


def test_auto_falls_back_to_opencv_without_openvino() -> None:
    """In a fresh interpreter where `import openvino` fails, as on a machine without it."""
    code = (
        "import sys; sys.modules['openvino'] = None\n"
        "from stages.pose import create_backend, resolve_auto\n"
        "b = create_backend('auto', precision='f32', input_width=128, input_height=96)\n"
        "print(resolve_auto(), b.name)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["opencv-openpose", "opencv-openpose"]
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['openvino'] = None\n"
            "from stages.pose import create_backend\ncreate_backend('openvino-openpose')",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0 and "pip install openvino" in proc.stderr


def test_config_person_height_reaches_the_daemon_pose_child(shared_sample) -> None:
    """`pose.person_height_px` → `backend_options()` → the daemon's spawned pose process."""
    from stages.pose.stage import PoseProcess

    cfg = PoseConfig(person_height_px=150.0, options={"threads": 1})
    assert cfg.backend_options() == {"threads": 1, "person_height_px": 150.0}
    assert PoseConfig(options={"threads": 1}).backend_options() == {"threads": 1}
    with pytest.raises(ValueError, match="backend"):
        PoseConfig(backend="openvino")  # type: ignore[arg-type]
    (img,) = read_frames(shared_sample("exercise.avi"), [150])
    proc = PoseProcess("cam0", cfg.backend, cfg.backend_options())
    try:
        proc.start()
        pf = proc.process(Frame("cam0", 5, 10.0, 0.5, img))
    finally:
        proc.close()
    assert isinstance(pf, PoseFrame) and (pf.seq, pf.width, pf.height) == (5, 384, 288)
    check_contract(pf.keypoints, img)
    assert len(pf.keypoints) >= 2


def test_agreement_matches_people_one_to_one() -> None:
    a = np.zeros((2, 18, 3), np.float32)
    a[0, :4] = [[10, 10, 1], [10, 20, 1], [5, 20, 1], [15, 20, 1]]
    a[1, :4] = [[60, 10, 1], [60, 20, 1], [55, 20, 1], [65, 20, 1]]
    b = a[::-1].copy()
    b[..., 0] += np.where(b[..., 2] > 0, 1.0, 0.0)  # shifted 1 px right
    assert sorted((i, j) for i, j, _ in match_people(a, b, 5.0)) == [(0, 1), (1, 0)]
    ag = Agreement(match_px=5.0)
    ag.add(a, b)
    ag.add(a, b[:1])
    s = ag.summary()
    assert s["people_per_frame_ref"] == 2.0 and s["people_per_frame_cand"] == 1.5
    assert s["same_people_count_share"] == 0.5 and s["ref_people_matched_share"] == 0.75
    assert s["mean_joint_distance_px"] == pytest.approx(1.0)
