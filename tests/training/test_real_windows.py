"""Real annotated windows for fine-tuning: loading, class-balanced augmentation, config checks;
re-applying alert rules to realcheck windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from enclave_bridge.shared.errors import ConfigError
from enclave_bridge.shared.rules import AlertRules
from training.dataset import augment_real, load_real_windows
from training.realcheck import reapply_rules
from training.train import TrainConfig


def _windows(n: int, label: int) -> np.ndarray:
    rng = np.random.default_rng(label)
    x = np.zeros((n, 3, 30, 18, 2), np.float32)
    x[:, :2, :, :, 0] = rng.uniform(-0.2, 0.2, (n, 2, 30, 18))
    x[:, 2, :, :, 0] = 0.8
    x[:, :, :, 5:, 0] = 0  # missing joints must stay zero
    return x


def test_real_windows_load_and_augment_class_balanced(tmp_path: Path) -> None:
    x = np.concatenate([_windows(90, 0), _windows(10, 5)])
    y = np.array([0] * 90 + [5] * 10, np.int64)
    path = tmp_path / "real.npz"
    np.savez(path, x=x, y=y)
    lx, ly = load_real_windows(str(path), TrainConfig())
    assert lx.shape == x.shape and (ly == y).all()
    ax, ay = augment_real(lx, ly, 400, np.random.default_rng(0))
    assert ax.shape == (400, 3, 30, 18, 2) and ax.dtype == np.float32
    assert 150 < (ay == 5).sum() < 250  # the rare class is drawn as often as the common one
    assert (ax[:, :, :, 5:] == 0).all() and (ax[:, :, :, :, 1] == 0).all()
    assert np.abs(ax[:, :2]).max() <= 0.5
    src = lx[ly == ay[0]]
    assert not any(np.array_equal(ax[0], s) for s in src)  # augmented, not copied
    with pytest.raises(ConfigError):
        load_real_windows(str(path), TrainConfig(T=20))


def test_real_fraction_needs_real_windows() -> None:
    with pytest.raises(ConfigError):
        TrainConfig(real_fraction=0.1).validate()
    TrainConfig(real_fraction=0.1, real_windows="x.npz").validate()


def test_reapply_rules_counts_streaks_per_clip() -> None:
    def win(t: float, label: str, p: float) -> dict:
        return {"t0": t, "t1": t + 2.9, "track": 1, "label": label, "top": [(label, p)], "alert": False}

    report = {
        "clips": [
            {"clip": "a", "windows": [win(0, "falling", 0.45), win(1, "falling", 0.7), win(2, "lying", 0.9)]},
            {"clip": "b", "windows": [win(0, "walking", 0.9), win(1, "falling", 0.9)]},
        ]
    }
    one = AlertRules.from_dict({"labels": ["falling"], "min_score": 0.5})
    two = AlertRules.from_dict(
        {
            "labels": ["falling"],
            "min_score": 0.5,
            "label_min_score": {"falling": 0.4},
            "min_windows": {"falling": 2},
        }
    )
    r1, r2 = reapply_rules(report, one), reapply_rules(report, two)
    assert [c["fall_alerts"] for c in r1["clips"]] == [1, 1]
    assert [c["fall_alerts"] for c in r2["clips"]] == [1, 0]  # b's single falling window does not alert
    assert r2["clips"][0]["fall_alert_times"] == [(1, 3.9)]
    assert report["clips"][0]["windows"][1]["alert"] is False  # the input is not modified


def test_rule_sweep_scores_every_setting_and_the_held_out_clips_apart() -> None:
    from training.annotations import Annotation
    from training.realcheck import rule_sweep
    from training.synth import CLASSES

    def win(t: float, label: str, p: float) -> dict:
        return {"t0": t, "t1": t + 2.9, "track": 1, "label": label, "top": [(label, p)], "alert": False}

    def clip(name: str, wins: list[dict]) -> dict:
        return {"clip": name, "duration_s": 6.0, "frames": 60, "windows": wins}

    report = {
        "rules": {"labels": ["falling"], "min_score": 0.6, "debounce_s": 10.0},
        "real_clips": ["seen.mp4"],
        "clips": [
            clip("seen.mp4", [win(0, "falling", 0.45), win(1, "falling", 0.55)]),  # trained-on fall
            clip("fall.mp4", [win(0, "walking", 0.9), win(1, "falling", 0.65)]),  # held-out fall
            clip("free.mp4", [win(0, "falling", 0.35), win(1, "standing", 0.9)]),  # held-out, no fall
        ],
    }
    notes = [
        Annotation("seen.mp4", 1.0, 3.0, "falling"),
        Annotation("fall.mp4", 2.0, 3.0, "falling"),
        Annotation("free.mp4", 0.0, 6.0, "walking"),
    ]
    rows = {(r["min_score"], r["min_windows"]): r for r in rule_sweep(report, notes, list(CLASSES))}
    assert len(rows) == 10
    assert rows[(0.3, 1)]["all"]["falls_found"] == 2 and rows[(0.3, 1)]["all"]["false_fall_alerts"] == 1
    assert rows[(0.3, 1)]["held_out"]["falls"] == 1 and rows[(0.3, 1)]["held_out"]["false_fall_alerts"] == 1
    assert rows[(0.4, 1)]["all"]["false_fall_alerts"] == 0
    assert rows[(0.5, 1)]["all"]["falls_found"] == 2  # the trained-on clip's 0.55 window
    assert rows[(0.6, 1)]["all"]["falls_found"] == 1 and rows[(0.6, 1)]["held_out"]["falls_found"] == 1
    assert rows[(0.4, 2)]["all"]["falls_found"] == 1  # only the trained-on clip has 2 in a row
    assert rows[(0.4, 2)]["held_out"]["falls_found"] == 0
    assert rows[(0.7, 1)]["all"]["falls_found"] == 0
