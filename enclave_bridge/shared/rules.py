"""Alert rules, evaluated inside the enclave so the host never learns labels or scores.

Rules come from the camera config (`EnclaveClient.hello(device, rules)`) or, taking precedence, from
the access policy signed by both owners. Trade-off: hello-rules are chosen by the capture host, which
could widen them (e.g. `labels: ["*"]`) and so learn more from alert *timing*; it still cannot read
alerts. Deployments that care put rules into the signed policy.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from enclave_bridge.shared.errors import ConfigError

ANY_LABEL = "*"
_MAX_LABELS = 1000
_MAX_WINDOWS = 100
STREAK_GAP_S = 5.0  # windows whose ends are further apart than this are not consecutive


def _per_label(d: Any, where: str, kind: type, lo: float, hi: float) -> tuple[tuple[str, Any], ...]:
    """{label: number} → sorted pairs, each number in [lo, hi] (ints only for `kind` int)."""
    if d is None:
        return ()
    if not isinstance(d, Mapping) or len(d) > _MAX_LABELS:
        raise ConfigError(f"{where}: a mapping of label names to numbers")
    out = []
    for label, v in d.items():
        ok_type = isinstance(v, int) if kind is int else isinstance(v, int | float)
        if not isinstance(label, str) or not label or isinstance(v, bool) or not ok_type:
            raise ConfigError(f"{where}: a mapping of label names to numbers")
        if not lo <= float(v) <= hi:
            raise ConfigError(f"{where}.{label}: a number in [{lo:g}, {hi:g}]")
        out.append((label, kind(v)))
    return tuple(sorted(out))


@dataclass(frozen=True, slots=True)
class AlertRules:
    """`labels` that raise an alert (`"*"` = any), minimum softmax score, per-track debounce.

    `label_min_score` overrides `min_score` per label. `min_windows` asks, per label, for that
    many consecutive windows of the camera (any track: a falling person's track often fragments)
    whose top-1 is the label at its score before the first alert: on real footage a single
    window can read `falling` on a person who kneels or lies down on purpose, while a real fall
    keeps the label over the overlapping windows that contain it. It costs one stride of latency
    per extra window.
    """

    labels: tuple[str, ...]
    min_score: float = 0.5
    debounce_s: float = 10.0
    label_min_score: tuple[tuple[str, float], ...] = ()
    min_windows: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "rules") -> AlertRules:
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a mapping")
        unknown = set(d) - {"labels", "min_score", "debounce_s", "label_min_score", "min_windows"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        labels = d.get("labels")
        if (
            not isinstance(labels, list | tuple)
            or not labels
            or len(labels) > _MAX_LABELS
            or not all(isinstance(x, str) and x for x in labels)
        ):
            raise ConfigError(f"{where}.labels: a non-empty list of label names (or ['*'])")
        min_score = d.get("min_score", 0.5)
        debounce_s = d.get("debounce_s", 10.0)
        if not isinstance(min_score, int | float) or not 0.0 <= float(min_score) <= 1.0:
            raise ConfigError(f"{where}.min_score: a number in [0, 1]")
        if not isinstance(debounce_s, int | float) or not math.isfinite(debounce_s) or debounce_s < 0:
            raise ConfigError(f"{where}.debounce_s: a non-negative number of seconds")
        per_score = _per_label(d.get("label_min_score"), f"{where}.label_min_score", float, 0.0, 1.0)
        per_windows = _per_label(d.get("min_windows"), f"{where}.min_windows", int, 1, _MAX_WINDOWS)
        return cls(tuple(labels), float(min_score), float(debounce_s), per_score, per_windows)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "labels": list(self.labels),
            "min_score": self.min_score,
            "debounce_s": self.debounce_s,
        }
        if self.label_min_score:
            out["label_min_score"] = dict(self.label_min_score)
        if self.min_windows:
            out["min_windows"] = dict(self.min_windows)
        return out

    def score_for(self, label: str) -> float:
        """The minimum score `label` needs (its own, else `min_score`)."""
        return dict(self.label_min_score).get(label, self.min_score)

    def windows_for(self, label: str) -> int:
        """Consecutive matching windows `label` needs before it alerts (1 unless set)."""
        return dict(self.min_windows).get(label, 1)

    def matches(self, label: str, score: float) -> bool:
        return (ANY_LABEL in self.labels or label in self.labels) and score >= self.score_for(label)


class RuleEngine:
    """Applies rules with per-(device, track, label) debounce on media time (window `t1`) and
    per-device streaks of matching windows (`min_windows`). Call `decide` for every evaluated
    window, matching or not: a non-matching window ends the streak."""

    def __init__(self, max_tracks: int = 100_000) -> None:
        self._last: dict[tuple[str, int, str], float] = {}
        self._streak: dict[str, tuple[str, int, float]] = {}  # device → (label, windows, last t1)
        self._lock = threading.Lock()
        self._max = max_tracks
        self.suppressed = 0

    def decide(
        self, device: str, rules: AlertRules, track_id: int, label: str, score: float, t1: float
    ) -> bool:
        """True if an alert should be emitted now; records it for debouncing."""
        ok = rules.matches(label, score)
        with self._lock:
            prev = self._streak.get(device)
            if not ok:
                self._streak.pop(device, None)
                return False
            run = 1
            if prev is not None and prev[0] == label and 0.0 <= t1 - prev[2] <= STREAK_GAP_S:
                run = prev[1] + 1
            if len(self._streak) >= self._max and device not in self._streak:
                self._streak.clear()  # bounded (one entry per camera in practice)
            self._streak[device] = (label, run, t1)
            if run < rules.windows_for(label):
                return False
            key = (device, track_id, label)
            last = self._last.get(key)
            if last is not None and 0.0 <= t1 - last < rules.debounce_s:
                self.suppressed += 1
                return False
            if len(self._last) >= self._max:  # bounded: forget the oldest entries
                for k in list(self._last)[: self._max // 10]:
                    del self._last[k]
            self._last[key] = t1
            return True


__all__ = ["ANY_LABEL", "STREAK_GAP_S", "AlertRules", "RuleEngine"]
