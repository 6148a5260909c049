"""openpose-json replay (COCO-18 and BODY_25 files written here), mediapipe/openpose mapping and errors."""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from enclave_bridge.shared.errors import StageError
from pipeline.messages import Frame
from stages.pose import PoseEstimator, create_backend
from stages.pose.mediapipe_backend import mediapipe33_to_coco18
from stages.pose.openpose_json import BODY25_TO_COCO18, OpenPoseJsonBackend

IMG = np.zeros((240, 320, 3), np.uint8)


def person(rng: np.random.Generator, joints: int) -> np.ndarray:
    """(joints, 3) pixels inside a 320x240 image with scores in (0.1, 1]; two joints missing."""
    kp = np.column_stack(
        [rng.uniform(0, 319, joints), rng.uniform(0, 239, joints), rng.uniform(0.1, 1.0, joints)]
    )
    kp[[3, 7]] = 0.0
    return kp


def write_clip(directory: Path, name: str, frames: list[list[np.ndarray]]) -> None:
    """What OpenPose `--write_json` writes: one file per frame, people[].pose_keypoints_2d flat."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, people in enumerate(frames):
        doc = {
            "version": 1.3,
            "people": [
                {
                    "person_id": [-1],
                    "pose_keypoints_2d": [round(float(v), 3) for v in p.ravel()],
                    "face_keypoints_2d": [],
                }
                for p in people
            ],
        }
        (directory / f"{name}_{i:012d}_keypoints.json").write_text(json.dumps(doc))


def test_coco18_round_trip_through_the_estimator(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    frames = [[person(rng, 18) for _ in range(n)] for n in (2, 0, 1, 3)]
    write_clip(tmp_path / "out", "clip", frames)
    backend = create_backend("openpose-json", directory=tmp_path / "out")
    est = PoseEstimator(backend, "cam0")
    for i, people in enumerate(frames):
        pf = est.process(Frame("cam0", i, 0.0, i / 10, IMG))
        assert pf.keypoints.shape == (len(people), 18, 3)
        if people:
            np.testing.assert_allclose(pf.keypoints, np.stack(people), atol=1e-3)
            assert np.all(pf.keypoints[:, [3, 7]] == 0)
    with pytest.raises(StageError, match="no keypoints file for frame 4"):
        est.process(Frame("cam0", 4, 0.0, 0.4, IMG))


def test_body25_is_mapped_to_coco18(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    frames = [[person(rng, 25), person(rng, 25)]]
    write_clip(tmp_path, "walk", frames)
    kp = create_backend("openpose-json", directory=tmp_path).infer(IMG)
    expect = np.stack(frames[0])[:, list(BODY25_TO_COCO18)]
    np.testing.assert_allclose(kp, expect, atol=1e-3)
    # MidHip (BODY_25 joint 8) is dropped: COCO joint 8 is the right hip (BODY_25 joint 9)
    np.testing.assert_allclose(kp[:, 8], np.stack(frames[0])[:, 9], atol=1e-3)
    with pytest.raises(StageError, match="expected 54"):
        create_backend("openpose-json", directory=tmp_path, layout="coco18").infer(IMG)


def test_index_by_seq_and_media_time_and_pickling(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    frames = [[person(rng, 18)] for _ in range(6)]
    write_clip(tmp_path, "c", frames)
    by_seq = OpenPoseJsonBackend(tmp_path, index="seq")
    np.testing.assert_allclose(by_seq.infer_frame(Frame("c", 4, 0.0, 0.0, IMG))[0], frames[4][0], atol=1e-3)
    by_time = OpenPoseJsonBackend(tmp_path, index="media_ts", fps=10.0, start=1)
    got = by_time.infer_frame(Frame("c", 0, 0.0, 0.3, IMG))  # frame 3 of the source, file 1 + 3
    np.testing.assert_allclose(got[0], frames[4][0], atol=1e-3)
    clone = pickle.loads(pickle.dumps(by_time))
    np.testing.assert_allclose(clone.infer_frame(Frame("c", 0, 0.0, 0.3, IMG)), got)
    assert len(clone) == 6


def test_normalized_coordinates_are_scaled_to_the_image(tmp_path: Path) -> None:
    kp = np.zeros((18, 3))
    kp[1] = (0.5, 0.25, 0.9)
    write_clip(tmp_path, "n", [[kp]])
    out = create_backend("openpose-json", directory=tmp_path, normalized=True).infer(IMG)
    assert out[0, 1].tolist() == pytest.approx([160.0, 60.0, 0.9])
    assert out[0, 0].tolist() == [0.0, 0.0, 0.0]


def test_bad_directories_and_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="not a directory"):
        create_backend("openpose-json", directory=tmp_path / "missing")
    with pytest.raises(StageError, match=r"no '\*_<12 digits>_keypoints\.json' files"):
        create_backend("openpose-json", directory=tmp_path)
    rng = np.random.default_rng(4)
    write_clip(tmp_path, "a", [[person(rng, 18)]])
    write_clip(tmp_path, "b", [[person(rng, 18)]])
    with pytest.raises(StageError, match="several clips"):
        create_backend("openpose-json", directory=tmp_path)
    assert create_backend("openpose-json", directory=tmp_path, prefix="b").infer(IMG).shape == (1, 18, 3)
    (tmp_path / "b_000000000001_keypoints.json").write_text("{not json")
    (tmp_path / "b_000000000002_keypoints.json").write_text(json.dumps({"people": [{"x": 1}]}))
    (tmp_path / "b_000000000003_keypoints.json").write_text(
        json.dumps({"people": [{"pose_keypoints_2d": [1.0] * 30}]})
    )
    b = OpenPoseJsonBackend(tmp_path, prefix="b", index="seq")
    for seq, msg in ((1, "cannot read"), (2, "no pose_keypoints_2d"), (3, "has 30 values")):
        with pytest.raises(StageError, match=msg):
            b.infer_frame(Frame("c", seq, 0.0, 0.0, IMG))
    with pytest.raises(StageError, match="needs a positive 'fps'"):
        create_backend("openpose-json", directory=tmp_path, prefix="b", index="media_ts")
    with pytest.raises(StageError, match="bad options"):
        create_backend("openpose-json", directory=tmp_path, prefix="b", colour="red")


def test_mediapipe_landmarks_map_to_18_joints() -> None:
    lm = np.zeros((33, 3))
    lm[:, 2] = 0.9
    lm[:, 0] = np.linspace(0.1, 0.9, 33)
    lm[:, 1] = np.linspace(0.2, 0.8, 33)
    lm[11] = (0.6, 0.30, 0.8)  # left shoulder (person's left, image right)
    lm[12] = (0.4, 0.32, 0.7)  # right shoulder
    lm[27] = (1.2, 0.9, 0.9)  # left ankle extrapolated outside the frame → missing
    lm[2, 2] = 0.05  # left eye barely visible → missing
    kp = mediapipe33_to_coco18(lm, 200, 100, min_visibility=0.1)
    assert kp.shape == (1, 18, 3) and kp.dtype == np.float32
    np.testing.assert_allclose(kp[0, 1], (100.0, 31.0, 0.7), atol=1e-4)  # neck = mid shoulders
    np.testing.assert_allclose(kp[0, 2], (80.0, 32.0, 0.7), atol=1e-4)  # r shoulder = landmark 12
    np.testing.assert_allclose(kp[0, 5], (120.0, 30.0, 0.8), atol=1e-4)
    np.testing.assert_allclose(kp[0, 0, :2], (lm[0, 0] * 200, lm[0, 1] * 100), atol=1e-4)
    np.testing.assert_allclose(kp[0, 16, :2], (lm[8, 0] * 200, lm[8, 1] * 100), atol=1e-4)  # r ear
    assert kp[0, 13].tolist() == [0.0, 0.0, 0.0]
    assert kp[0, 15].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(StageError, match="33, 3"):
        mediapipe33_to_coco18(np.zeros((25, 3)), 10, 10)


@pytest.mark.skipif(importlib.util.find_spec("mediapipe") is not None, reason="mediapipe is installed")
def test_mediapipe_missing_is_a_clear_error() -> None:
    with pytest.raises(StageError, match=r"veilcam\[mediapipe\]"):
        create_backend("mediapipe")


@pytest.mark.skipif(
    importlib.util.find_spec("pyopenpose") is not None or importlib.util.find_spec("openpose") is not None,
    reason="OpenPose bindings are installed",
)
def test_openpose_missing_is_a_clear_error() -> None:
    with pytest.raises(StageError, match="BUILD_PYTHON"):
        create_backend("openpose")
