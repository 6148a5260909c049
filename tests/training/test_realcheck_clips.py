"""Real-footage check: track association and daemon-style windows (fast), and the shipped model on
the shared sample clips (slow; skipped with a reason when the clips or the pose backend are absent)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from training.realcheck import FALL_LABEL, associate, build_windows, run_realcheck

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "samples" / "default_model"


def _person(cx: float, cy: float, h: float = 100.0) -> np.ndarray:
    kp = np.zeros((18, 3), np.float32)
    kp[:, 0] = cx + np.linspace(-10, 10, 18)
    kp[:, 1] = cy + np.linspace(-h / 2, h / 2, 18)
    kp[:, 2] = 0.8
    return kp


def test_association_keeps_identities_of_two_walkers() -> None:
    frames = []
    for t in range(20):
        people = [_person(100 + 5 * t, 200), _person(400 - 5 * t, 220)]
        if t % 2:
            people.reverse()  # detector order is arbitrary
        if t == 7:
            people = people[:1]  # one person missed for a frame
        frames.append(np.stack(people))
    tracked = associate(frames)
    ids = {tid for fr in tracked for tid in fr}
    assert ids == {0, 1}
    for fr in tracked:
        for tid, kp in fr.items():
            assert (kp[:, 0].mean() < 250) == (tid == 0) or abs(kp[:, 0].mean() - 250) < 60


def test_windows_follow_the_daemon_layout() -> None:
    frames = [np.stack([_person(100, 200), _person(300, 200)]) for _ in range(25)]
    frames[3] = np.zeros((0, 18, 3), np.float32)
    wins = build_windows(associate(frames), 640, 480, T=10, stride=5, M=2, fps=10.0)
    assert [(w[0], w[1]) for w in wins] == [(0.0, 0.9), (0.5, 1.4), (1.0, 1.9), (1.5, 2.4)]
    _, _, tids, data = wins[0]
    assert data.shape == (3, 10, 18, 2) and data.dtype == np.float32
    assert len(tids) == 2
    assert (data[:, 3] == 0).all()  # nobody detected in frame 3
    assert np.abs(data[:2]).max() <= 0.5
    # a clip shorter than T yields one zero-padded window
    short = build_windows(associate(frames[:4]), 640, 480, T=10, stride=5, M=2, fps=10.0)
    assert len(short) == 1 and (short[0][3][:, 4:] == 0).all()


def _need_clips_and_pose() -> Path:
    samples = REPO.parent / "shared" / "samples"
    for name in ("fall-01-cam0.mp4", "vtest.avi"):
        if not (samples / name).exists():
            pytest.skip(f"sample clip {name} not in {samples} (shared/ not beside the checkout)")
    if importlib.util.find_spec("stages.pose") is None:
        pytest.skip("pose backend stages.pose is not installed in this checkout")
    if not (DEFAULT_MODEL / "model.pt").exists():
        pytest.skip("no shipped model in samples/default_model")
    return samples


@pytest.mark.slow
def test_fall_clip_falls_and_pedestrians_do_not(tmp_path: Path) -> None:
    samples = _need_clips_and_pose()
    cache = Path.home() / ".cache" / "veilcam" / "realcheck"
    report = run_realcheck(
        DEFAULT_MODEL, [str(samples / "fall-01-cam0.mp4"), str(samples / "vtest.avi")], cache_dir=cache
    )
    (tmp_path / "report.json").write_text(json.dumps(report))
    fall, walk = report["clips"]
    # alerts as the daemon's default rule raises them: top-1 `falling` with at least min_score
    assert fall["fall_alerts"] >= 1, fall["windows"]
    # the person goes down at ~3.0-3.7 s of the clip: a fall alert's window must cover that moment
    assert any(t0 <= 3.2 and t1 >= 3.5 for t0, t1 in fall["fall_alert_times"]), fall["windows"]
    assert walk["fall_alerts"] == 0, [w for w in walk["windows"] if w["label"] == FALL_LABEL]
