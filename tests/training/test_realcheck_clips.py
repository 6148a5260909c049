"""Real-footage check: track association and daemon-style windows (fast), and the shipped model on
the shared sample clips (slow; skipped with a reason when the clips or the pose backend are absent)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from enclave_bridge.shared.keys import generate_data_key
from enclave_bridge.shared.windows import ReplayGuard, open_window
from pipeline.errors import ConfigError
from pipeline.messages import PoseFrame
from stages.windowing import SeqCounter, Windower
from training.annotations import (
    Annotation,
    confusion_png,
    format_confusion,
    load_annotations,
    score_clips,
    write_annotations,
)
from training.realcheck import FALL_LABEL, clip_windows, run_realcheck

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "samples" / "default_model"


W, H = 640, 480


def _person(cx: float, cy: float, h: float = 100.0) -> np.ndarray:
    kp = np.zeros((18, 3), np.float32)
    kp[:, 0] = cx + np.linspace(-10, 10, 18)
    kp[:, 1] = cy + np.linspace(-h / 2, h / 2, 18)
    kp[:, 2] = 0.8
    return kp


def _walkers(n: int) -> list[np.ndarray]:
    frames = []
    for t in range(n):
        people = [_person(100 + 5 * t, 200), _person(400 - 5 * t, 220)]
        if t % 2:
            people.reverse()  # detector order is arbitrary
        if t == 7:
            people = people[:1]  # one person missed for a frame
        frames.append(np.stack(people))
    return frames


def test_realcheck_windows_are_the_daemons_windows(tmp_path: Path) -> None:
    """One code path: realcheck's windows equal what the daemon's Windower seals for the same
    skeletons — same spans, track ids and data — including the end-of-stream window."""
    frames = _walkers(27)
    times = np.arange(27) / 10.0
    meta = {"T": 10, "stride": 5, "M": 2, "fps": 10.0}
    plain = clip_windows(frames, times, W, H, meta)
    key = generate_data_key()
    w = Windower("cam", key, SeqCounter(tmp_path / "seq"), length_frames=10, stride_frames=5, persons=2)
    sealed = [s for i, kp in enumerate(frames) for s in w.push(PoseFrame("cam", i, 0.0, i / 10.0, W, H, kp))]
    sealed += w.flush()
    guard = ReplayGuard()
    opened = [open_window(s.blob, {key.kid: key}, guard) for s in sealed]
    assert [(p.t0, p.t1) for p in plain] == pytest.approx([(o.t0, o.t1) for o in opened])
    # windows end at frames 9, 14, 19, 24 and, at end of stream, 26 (shifted back: 17-26)
    assert [p.t1 for p in plain] == pytest.approx([0.9, 1.4, 1.9, 2.4, 2.6])
    for p, o in zip(plain, opened, strict=True):
        assert p.track_ids == list(o.track_ids)
        assert np.array_equal(p.data, o.data)
    assert np.abs(plain[0].data[:2]).max() <= 0.5


def test_annotations_read_both_versions_and_round_trip(tmp_path: Path) -> None:
    v0 = tmp_path / "v0.csv"
    v0.write_text(
        "# clip,start_s,end_s,label,note  (legacy)\nreal/a.mp4,0.3,2.2,falling,backward\nb.avi,0,9,walking,\n"
    )
    notes = load_annotations(v0)
    assert notes[0] == Annotation("real/a.mp4", 0.3, 2.2, "falling", "*", "backward")
    assert notes[1].track == "*" and notes[1].note == ""
    v1 = tmp_path / "v1.csv"
    write_annotations(v1, notes)
    assert v1.read_text().startswith("# veilcam-annotations 1\nclip,track,start_s,end_s,label,note\n")
    assert load_annotations(v1) == notes
    bad = tmp_path / "bad.csv"
    for text in (
        "# veilcam-annotations 9\nclip,track,start_s,end_s,label,note\na,*,0,1,x,\n",
        "a.mp4,2,1,x,\n",
        "# x\n",
    ):
        bad.write_text(text)
        with pytest.raises(ConfigError):
            load_annotations(bad)


def _result(clip: str, wins: list[tuple[float, float, str, bool]], duration: float) -> dict:
    return {
        "clip": clip,
        "frames": int(duration * 10),
        "duration_s": duration,
        "windows": [
            {"t0": t0, "t1": t1, "track": 1, "label": lab, "alert": alert} for t0, t1, lab, alert in wins
        ],
    }


def test_scores_fall_recall_false_alerts_agreement_and_lying() -> None:
    labels = ["standing", "walking", "falling", "lying"]
    notes = [
        Annotation("f.mp4", 0.0, 1.0, "standing"),
        Annotation("f.mp4", 1.0, 2.0, "falling"),
        Annotation("f.mp4", 2.0, 8.0, "lying"),
        Annotation("g.mp4", 2.0, 2.5, "falling"),
        Annotation("w.mp4", 0.0, 36.0, "walking"),
    ]
    results = [
        # the fall is found by the alert on 0.5-3.4; the lying windows: 2 of 3 read lying
        _result(
            "f.mp4",
            [
                (0.5, 3.4, "falling", True),
                (2.5, 5.4, "lying", False),
                (3.5, 6.4, "lying", True),
                (5.0, 7.9, "walking", False),
            ],
            8.0,
        ),
        # a falling window without an alert does not find the fall
        _result("g.mp4", [(1.0, 3.9, "falling", False)], 4.0),
        # fall-free: one false fall alert in 36 s = 100 per hour
        _result("w.mp4", [(0.0, 2.9, "walking", False), (3.0, 5.9, "falling", True)], 36.0),
    ]
    s = score_clips(results, notes, labels)
    assert (s["falls"], s["falls_found"], s["fall_recall"]) == (2, 1, 0.5)
    assert s["false_fall_alerts"] == 1 and s["false_fall_alerts_per_hour"] == pytest.approx(100.0)
    assert s["alerts_outside_falls"] == 0  # the lying alert is not a falling alert
    assert s["lying_windows"] == 3 and s["lying_agreement"] == pytest.approx(0.667, abs=1e-3)
    # scored: f 4 (falling, lying, lying, lying), g 1 (falling), w 2 (walking) → 5 agree of 7
    assert s["scored_windows"] == 7 and s["agreement"] == pytest.approx(5 / 7, abs=1e-3)
    m = np.array(s["confusion"])
    assert m[3, 1] == 1 and m[1, 2] == 1 and m.sum() == 7
    text = format_confusion(s)
    assert "annotated" in text and "lying" in text


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


def _shared_clip(name: str) -> Path:
    samples = REPO.parent / "shared" / "samples"
    if not (samples / name).exists():
        pytest.skip(f"sample clip {name} not in {samples} (shared/ not beside the checkout)")
    if importlib.util.find_spec("stages.pose") is None:
        pytest.skip("pose backend stages.pose is not installed in this checkout")
    return samples / name


def test_replay_and_realcheck_give_the_same_labels() -> None:
    """The same real clip through `veilcam replay` (capture, pose child process, windowing,
    sealing, the local enclave's rule engine) and through realcheck: same windows, same top-1
    labels and scores. Every window alerts (rules: any label, score 0, no debounce), so the
    replay's opened alerts list every window's top-1."""
    from config.schema import RulesConfig
    from enclave_bridge.shared.rules import AlertRules
    from pipeline.app.replay import replay_config, run_replay
    from training.evaluate import load_package
    from training.realcheck import classify_clip

    clip = _shared_clip("real/gmdcsa_s3_adl07_squats.mp4")
    every = RulesConfig(labels=["*"], min_score=0.0, debounce_s=0.0)
    cfg = replay_config(clip)
    cfg = cfg.model_copy(update={"rules": every})
    rep = run_replay(clip, cfg, progress=False)
    assert rep.error is None, rep.error
    model, labels, meta = load_package(DEFAULT_MODEL)
    rc = classify_clip(model, labels, meta, clip, rules=AlertRules.from_dict(every.as_dict()))
    assert len(rc["windows"]) == rep.windows >= 2
    got = sorted((a["t0"], a["t1"], a["label"], a["score"]) for a in rep.alerts)
    want = [(w["t0"], w["t1"], w["label"], w["top"][0][1]) for w in rc["windows"]]
    assert [g[2] for g in got] == [w[2] for w in want]
    assert [g[:2] for g in got] == [pytest.approx(w[:2], abs=1e-3) for w in want]
    assert [g[3] for g in got] == [pytest.approx(w[3], abs=1e-3) for w in want]
    # the last window ends at the clip's last sampled frame (end-of-stream window)
    assert want[-1][1] == pytest.approx(rc["duration_s"] - 0.1, abs=0.02)


def test_realcheck_scores_annotated_real_clips(tmp_path: Path) -> None:
    """`realcheck --annotations` on two short real clips: a fall and a fall-free squat clip."""
    fall = _shared_clip("real/gmdcsa_s3_fall16_walk_side_night.mp4")
    _shared_clip("real/gmdcsa_s3_adl07_squats.mp4")
    notes = tmp_path / "notes.csv"
    notes.write_text(
        "# veilcam-annotations 1\nclip,track,start_s,end_s,label,note\n"
        "real/gmdcsa_s3_fall16_walk_side_night.mp4,*,0.0,1.7,walking,\n"
        "real/gmdcsa_s3_fall16_walk_side_night.mp4,*,1.8,3.5,falling,\n"
        "real/gmdcsa_s3_adl07_squats.mp4,*,0.0,3.35,sitting_down,squats\n"
    )
    report = run_realcheck(DEFAULT_MODEL, annotations=notes, clips_dir=fall.parents[1])
    s = report["scores"]
    assert [c["clip"] for c in s["clips"]] == [
        "real/gmdcsa_s3_fall16_walk_side_night.mp4",
        "real/gmdcsa_s3_adl07_squats.mp4",
    ]
    assert s["falls"] == 1 and s["falls_found"] == s["clips"][0]["falls_found"]
    assert s["fall_free_s"] == pytest.approx(3.4, abs=0.15)  # the squat clip: 34 frames at 10 fps
    assert s["scored_windows"] == sum(c["scored_windows"] for c in s["clips"]) >= 2
    assert sum(map(sum, s["confusion"])) == s["scored_windows"]
    png = confusion_png(s, tmp_path / "cm.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
