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

from enclave_bridge.errors import ConfigError

ANY_LABEL = "*"
_MAX_LABELS = 1000


@dataclass(frozen=True, slots=True)
class AlertRules:
    """`labels` that raise an alert (`"*"` = any), minimum softmax score, per-track debounce."""

    labels: tuple[str, ...]
    min_score: float = 0.5
    debounce_s: float = 10.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "rules") -> AlertRules:
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a mapping")
        unknown = set(d) - {"labels", "min_score", "debounce_s"}
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
        return cls(tuple(labels), float(min_score), float(debounce_s))

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "min_score": self.min_score, "debounce_s": self.debounce_s}

    def matches(self, label: str, score: float) -> bool:
        return (ANY_LABEL in self.labels or label in self.labels) and score >= self.min_score


class RuleEngine:
    """Applies rules with per-(device, track, label) debounce on media time (window `t1`)."""

    def __init__(self, max_tracks: int = 100_000) -> None:
        self._last: dict[tuple[str, int, str], float] = {}
        self._lock = threading.Lock()
        self._max = max_tracks
        self.suppressed = 0

    def decide(
        self, device: str, rules: AlertRules, track_id: int, label: str, score: float, t1: float
    ) -> bool:
        """True if an alert should be emitted now; records it for debouncing."""
        if not rules.matches(label, score):
            return False
        key = (device, track_id, label)
        with self._lock:
            last = self._last.get(key)
            if last is not None and 0.0 <= t1 - last < rules.debounce_s:
                self.suppressed += 1
                return False
            if len(self._last) >= self._max:  # bounded: forget the oldest entries
                for k in list(self._last)[: self._max // 10]:
                    del self._last[k]
            self._last[key] = t1
            return True


__all__ = ["ANY_LABEL", "AlertRules", "RuleEngine"]
