"""benchmarks/pose_fps.py runs end to end on a real clip and writes its JSON table: every
OpenPose-graph runtime and size, interleaved, with ratios and agreement against opencv-openpose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_pose_fps_benchmark_writes_rows(tmp_path: Path) -> None:
    out = tmp_path / "pose_fps.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "pose_fps.py"),
            "--clip",
            str(REPO / "samples" / "vtest.avi"),
            "--start",
            "199",
            "--frames",
            "2",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--sizes",
            "432x368,person=150",
            "--stability",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "opencv-openpose" in proc.stdout and "grouping" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["machine"]["cpus"] >= 1
    (run,) = doc["runs"]
    assert run["clip"] == "vtest.avi" and run["frame_size"] == "768x576" and run["frames"] == 2
    rows = {(r["backend"], r["input"]): r for r in run["rows"]}
    cv = rows[("opencv-openpose", "432x368")]
    assert cv["fps"] > 0 and cv["forward_ms_median"] > 0 and cv["grouping_ms_median"] > 0
    assert cv["people_mean"] >= 2
    # the JSON replay re-reads exactly what opencv-openpose found
    assert rows[("openpose-json", "json")]["people_mean"] == cv["people_mean"]
    ov32 = rows[("openvino-openpose:f32", "432x368")]
    assert ov32["precision"] == "f32" and ov32["vs_opencv"] > 0
    agree = ov32["agreement"]
    assert agree["frames"] == 2 and agree["mean_joint_distance_px"] < 0.05
    assert agree["people_per_frame_cand"] == agree["people_per_frame_ref"] == cv["people_mean"]
    ov = rows[("openvino-openpose", "432x368")]
    assert ov["fps"] > 0 and "agreement" in ov and "vs_opencv" in ov
    # person=150 on a 768x576 frame: scale 96/150 → 488x368 (multiples of 8)
    sized = rows[("openvino-openpose", "person=150")]
    assert sized["input_px"] == "488x368" and "agreement" in sized
    # the yardstick: opencv-openpose against itself on imperceptibly changed copies of the frames
    for kind in ("jpeg95", "noise1"):
        st = rows[(f"opencv-openpose@{kind}", "432x368")]
        assert st["agreement"]["frames"] == 2 and st["people_mean"] >= 1
        assert 0 <= st["agreement"]["ref_people_matched_share"] <= 1
        assert st["agreement"]["mean_joint_distance_px"] < 5  # same people, nearly the same joints
    assert {b for b, _ in rows} == {
        "opencv-openpose",
        "opencv-openpose@jpeg95",
        "opencv-openpose@noise1",
        "openvino-openpose",
        "openvino-openpose:f32",
        "openpose-json",
        "mediapipe",
        "openpose",
    }
