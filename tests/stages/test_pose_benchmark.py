"""benchmarks/pose_fps.py runs end to end on a real clip and writes its JSON table."""

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
    rows = {r["backend"]: r for r in run["rows"]}
    cv = rows["opencv-openpose"]
    assert cv["fps"] > 0 and cv["forward_ms_median"] > 0 and cv["grouping_ms_median"] > 0
    assert cv["people_mean"] >= 2
    # the JSON replay re-reads exactly what opencv-openpose found
    assert rows["openpose-json"]["people_mean"] == cv["people_mean"]
    assert set(rows) == {"opencv-openpose", "openpose-json", "mediapipe", "openpose"}
