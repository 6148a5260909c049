"""Alert rules: per-label minimum scores and consecutive-window streaks (evaluated in the enclave)."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.schema import RulesConfig, load_config
from enclave_bridge.shared.errors import ConfigError
from enclave_bridge.shared.rules import STREAK_GAP_S, AlertRules, RuleEngine

REPO = Path(__file__).resolve().parents[2]


def test_label_min_score_overrides_the_default() -> None:
    r = AlertRules.from_dict(
        {"labels": ["falling", "lying"], "min_score": 0.6, "label_min_score": {"falling": 0.4}}
    )
    assert r.matches("falling", 0.45) and not r.matches("falling", 0.39)
    assert not r.matches("lying", 0.45) and r.matches("lying", 0.6)
    assert AlertRules.from_dict(r.to_dict()) == r


def test_min_windows_needs_consecutive_matching_windows() -> None:
    r = AlertRules.from_dict(
        {"labels": ["falling", "lying"], "min_score": 0.5, "debounce_s": 10, "min_windows": {"falling": 2}}
    )
    e = RuleEngine()
    # one falling window alone never alerts; a non-matching window ends the streak
    assert not e.decide("cam", r, 1, "falling", 0.9, 1.0)
    assert not e.decide("cam", r, 1, "walking", 0.9, 2.0)
    assert not e.decide("cam", r, 1, "falling", 0.9, 3.0)
    assert not e.decide("cam", r, 1, "falling", 0.4, 4.0)  # below min_score: ends it too
    assert not e.decide("cam", r, 1, "falling", 0.9, 5.0)
    # the second in a row alerts, even when the track id changed (fragmented track)
    assert e.decide("cam", r, 2, "falling", 0.8, 6.0)
    assert not e.decide("cam", r, 2, "falling", 0.8, 7.0)  # debounced
    # other labels keep one window; other cameras keep their own streak
    assert e.decide("cam", r, 1, "lying", 0.9, 8.0)
    assert not e.decide("cam2", r, 1, "falling", 0.9, 8.0)
    # windows too far apart in media time are not consecutive
    assert not e.decide("cam3", r, 1, "falling", 0.9, 1.0)
    assert not e.decide("cam3", r, 1, "falling", 0.9, 1.0 + STREAK_GAP_S + 1)


@pytest.mark.parametrize(
    "bad",
    [
        {"labels": ["falling"], "label_min_score": {"falling": 1.5}},
        {"labels": ["falling"], "label_min_score": ["falling"]},
        {"labels": ["falling"], "min_windows": {"falling": 0}},
        {"labels": ["falling"], "min_windows": {"falling": 1.5}},
        {"labels": ["falling"], "min_windows": {"": 2}},
    ],
)
def test_bad_rules_are_refused(bad: dict) -> None:
    with pytest.raises(ConfigError):
        AlertRules.from_dict(bad)


def test_example_config_rules_reach_the_enclave_unchanged() -> None:
    cfg = load_config(REPO / "config" / "veilcam.example.yaml")
    sent = cfg.rules.as_dict()
    parsed = AlertRules.from_dict(sent)
    assert parsed.to_dict() == sent
    assert RulesConfig().as_dict() == {"labels": ["*"], "min_score": 0.5, "debounce_s": 10.0}
