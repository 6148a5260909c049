"""`veilcam replay --plot`: every window's score per label over time (not only the windows that
alerted), the rules' threshold and the alerts; a real clip, real pose, a real (random) ST-GCN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from config.schema import REPO_ROOT, EnclaveConfig, RulesConfig
from enclave_bridge.measured.stgcn import STGCN
from pipeline.app.replay import ReplayReport, plot_timeline, replay_config, run_replay, timeline_series

VTEST = REPO_ROOT / "samples" / "vtest.avi"
LABELS = ["walking", "standing", "falling"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(3)
    torch.save(STGCN(len(LABELS)).state_dict(), d / "model.pt")
    (d / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (d / "model.json").write_text(json.dumps({"T": 8, "stride": 4, "fps": 10}))
    return d


def test_plot_series_cover_every_window_not_just_alerts(tmp_path: Path, model_dir: Path) -> None:
    cfg = replay_config(VTEST, state_dir=tmp_path / "state", overrides={"max_frames": 16})
    cfg = cfg.model_copy(
        update={
            "enclave": EnclaveConfig(model_dir=model_dir),
            # strict rules: (almost) no window alerts, yet every window must be on the plot
            "rules": RulesConfig(labels=["falling"], min_score=0.9, debounce_s=0.0),
        }
    )
    report = run_replay(VTEST, cfg, progress=False, score_windows=True)
    assert report.error is None, report.error
    times, series = timeline_series(report)
    assert report.windows == len(report.windows_timeline) == len(times) >= 3
    assert times == sorted(times)
    assert set(series) == set(LABELS)  # the shadow evaluator's top-k is every label
    for i in range(len(times)):
        scores = [series[lab][i] for lab in LABELS]
        assert all(not math.isnan(v) for v in scores)
        assert sum(scores) == pytest.approx(1.0, abs=1e-6)  # softmax over all labels
    assert len(report.alerts) < report.windows  # windows without an alert are on the plot too
    for a in report.alerts:  # an alert's score is its window's point on its label's line
        i = [s for s, *_ in sorted(report.windows_timeline)].index(a["window_seq"])
        assert series[a["label"]][i] == pytest.approx(a["score"])
    assert report.min_score == 0.9
    png = plot_timeline(report, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_series_without_window_scores_keep_every_window_on_the_time_axis() -> None:
    """A remote enclave reveals scores of alerting windows only: the others are gaps (NaN), and a
    rejected window is a gap too, but every window still has its place on the time axis."""
    report = ReplayReport(
        clip="c.mp4", device="d", frames=40, windows=3, windows_rejected=1, alert_envelopes=1,
        alerts=[{"window_seq": 11, "label": "falling", "score": 0.8, "t1": 2.9,
                 "topk": [["falling", 0.8], ["lying", 0.15]]}],
        stages={}, counters={}, wall_s=1.0, window_length_frames=30, window_stride_frames=10, fps=10.0,
        windows_timeline=[(12, 1.0, 3.9, "rejected"), (10, -1.0, 1.9, "ok"), (11, 0.0, 2.9, "ok")],
        min_score=0.6,
    )  # fmt: skip
    times, series = timeline_series(report)
    assert times == [1.9, 2.9, 3.9]
    assert set(series) == {"falling", "lying"}
    assert series["falling"][1] == 0.8 and series["lying"][1] == 0.15
    assert all(math.isnan(series[lab][i]) for lab in series for i in (0, 2))
