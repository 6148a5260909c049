"""Per-camera health counters shared by /metrics, the replay summary and `veilcam/<device>/stats`.

Stages record into these objects; readers take snapshots. The JSON published on the stats topic
holds only operational numbers (fps, latencies, queue depths, drops) — never counts of people or
labels (docs/ARCHITECTURE.md §7), so the broker learns nothing about the scene.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.queues import BoundedQueue, QueueStats

# Histogram buckets (seconds) shared by every stage latency: pose is ~0.1 s, windowing ~ms,
# the enclave 0.1–2 s, end-to-end up to the window length.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_FPS_WINDOW_S = 10.0
_RESERVOIR = 20_000


@dataclass(frozen=True, slots=True)
class StageSnapshot:
    """One stage's numbers at a point in time."""

    name: str
    count: int
    errors: int
    fps: float
    latency_sum_s: float
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_max_s: float | None
    bucket_counts: tuple[int, ...]


class StageStats:
    """Thread-safe item count, error count, recent fps and a latency histogram for one stage."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._count = 0
        self._errors = 0
        self._sum = 0.0
        self._buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self._recent: deque[float] = deque()
        self._samples: deque[float] = deque(maxlen=_RESERVOIR)

    def observe(self, latency_s: float, now: float | None = None) -> None:
        """Record one processed item and how long it took."""
        t = time.monotonic() if now is None else now
        with self._lock:
            self._count += 1
            self._sum += latency_s
            self._buckets[bisect.bisect_left(LATENCY_BUCKETS_S, latency_s)] += 1
            self._samples.append(latency_s)
            self._recent.append(t)
            while self._recent and self._recent[0] < t - _FPS_WINDOW_S:
                self._recent.popleft()

    def error(self) -> None:
        with self._lock:
            self._errors += 1

    def snapshot(self) -> StageSnapshot:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0] < now - _FPS_WINDOW_S:
                self._recent.popleft()
            if len(self._recent) >= 2:
                span = max(now - self._recent[0], 1e-6)
                fps = len(self._recent) / min(span, _FPS_WINDOW_S)
            else:
                fps = 0.0
            ordered = sorted(self._samples)
            return StageSnapshot(
                name=self.name,
                count=self._count,
                errors=self._errors,
                fps=fps,
                latency_sum_s=self._sum,
                latency_p50_s=_quantile(ordered, 0.5),
                latency_p95_s=_quantile(ordered, 0.95),
                latency_max_s=ordered[-1] if ordered else None,
                bucket_counts=tuple(self._buckets),
            )


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


@dataclass
class CameraStats:
    """Everything one camera pipeline counts. Counters are plain named integers (see `COUNTERS`)."""

    camera_id: str
    stages: dict[str, StageStats] = field(default_factory=dict)
    queues: list[BoundedQueue[Any]] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    status: str = "starting"
    # Extra gauges read at snapshot time (e.g. outbox depth, enclave-side counters).
    probes: dict[str, Callable[[], float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    COUNTERS = (
        "frames_captured",
        "skipped_frames",
        "skipped_poses",
        "throttled_frames",
        "reconnects",
        "corrupt_frames",
        "windows_sealed",
        "windows_coalesced",
        "windows_submitted",
        "windows_rejected",
        "enclave_errors",
        "windows_dropped",
        "windows_resubmitted",
        "windows_skipped_done",
        "pose_errors",
        "alerts",
        "stage_restarts",
        "freivalds_failures",
    )

    def stage(self, name: str) -> StageStats:
        with self._lock:
            if name not in self.stages:
                self.stages[name] = StageStats(name)
            return self.stages[name]

    def inc(self, counter: str, n: int = 1) -> None:
        with self._lock:
            self.counters[counter] = self.counters.get(counter, 0) + n

    def set_counter(self, counter: str, value: int) -> None:
        with self._lock:
            self.counters[counter] = value

    def get(self, counter: str) -> int:
        with self._lock:
            return self.counters.get(counter, 0)

    def queue_stats(self) -> list[QueueStats]:
        return [q.stats() for q in self.queues]

    def probe_values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, fn in list(self.probes.items()):
            try:
                out[name] = float(fn())
            except Exception:
                out[name] = float("nan")
        return out

    def to_dict(self) -> dict[str, Any]:
        """Health numbers for the stats topic and /healthz (no scene content)."""
        stages = {}
        for snap in (s.snapshot() for s in list(self.stages.values())):
            stages[snap.name] = {
                "count": snap.count,
                "errors": snap.errors,
                "fps": round(snap.fps, 3),
                "latency_p50_s": _round(snap.latency_p50_s),
                "latency_p95_s": _round(snap.latency_p95_s),
                "latency_max_s": _round(snap.latency_max_s),
            }
        queues = {
            q.name: {
                "depth": q.depth,
                "capacity": q.capacity,
                "policy": q.policy,
                "dropped": q.dropped,
                "coalesced": q.coalesced,
            }
            for q in self.queue_stats()
        }
        with self._lock:
            counters = {k: self.counters.get(k, 0) for k in self.COUNTERS}
        return {
            "camera": self.camera_id,
            "status": self.status,
            "ts": time.time(),
            "stages": stages,
            "queues": queues,
            "counters": counters,
            "gauges": {k: (None if v != v else v) for k, v in self.probe_values().items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 6)


def merge_counters(cams: Iterable[CameraStats], counter: str) -> int:
    return sum(c.get(counter) for c in cams)


__all__ = ["LATENCY_BUCKETS_S", "CameraStats", "StageSnapshot", "StageStats", "merge_counters"]
