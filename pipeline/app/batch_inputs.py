"""What a batch run takes and gives: clip lists (files, directories, globs, list files), per-clip
device names, options, per-clip outcomes and the run summary."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset(
    {".avi", ".mp4", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".webm", ".wmv", ".flv", ".3gp"}
)
_DEVICE_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


def expand_clips(inputs: Iterable[str], list_file: Path | None = None) -> list[str]:
    """Files, directories (searched recursively for video files), glob patterns and a list file
    (one path per line, `#` comments) → absolute paths, in order, without duplicates. A path that
    does not exist is kept: it is reported as a failed clip, not silently skipped."""
    items = list(inputs)
    if list_file is not None:
        try:
            lines = list_file.read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"--list {list_file}: {e.strerror}") from e
        base = list_file.parent
        for line in lines:
            s = line.strip()
            if s and not s.startswith("#"):
                items.append(s if os.path.isabs(s) else str(base / s))
    out: dict[str, None] = {}
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES:
                    out[str(f.resolve())] = None
        elif any(ch in item for ch in "*?[") and not p.exists():
            matches = sorted(glob.glob(str(p), recursive=True))
            if not matches:
                log.warning("batch: the pattern %s matches no file", item)
            for m in matches:
                if os.path.isfile(m):
                    out[str(Path(m).resolve())] = None
        else:
            out[str(p.resolve())] = None
    return list(out)


def device_for(clip: str, prefix: str = "batch") -> str:
    """A per-clip device id valid on MQTT topics: `<prefix>-<stem>-<8 hex of the path>`."""
    digest = hashlib.sha256(clip.encode()).hexdigest()[:8]
    stem = _DEVICE_BAD.sub("_", Path(clip).stem).strip("_.-") or "clip"
    head = _DEVICE_BAD.sub("_", prefix).strip("_.-") or "batch"
    room = 64 - len(head) - len(digest) - 2
    return f"{head}-{stem[: max(1, room)]}-{digest}"


# -- options and results -------------------------------------------------------------------------------
@dataclass
class BatchOptions:
    """How a batch runs (the CLI flags). `ray`: "auto" (join a running cluster, else start a
    local one without dashboard), "local" (always a private local one), or a cluster address."""

    out: Path
    ray: str = "auto"
    local_cpus: int | None = None
    cpus_per_clip: float = 1.0
    gpus_per_clip: float = 0.0
    segment_frames: int = 3000
    state_dir: Path | None = None
    progress: bool = True
    restart: bool = False
    max_task_retries: int = 3
    max_inflight: int | None = None
    device_prefix: str = "batch"
    consumer_key: Any = None  # PartyKey opening alerts for the report (remote enclaves)
    enclave_verify_keys: list[bytes] = field(default_factory=list)  # verified alert-signing keys


@dataclass
class ClipOutcome:
    clip: str
    device: str
    status: str  # done | failed
    reason: str | None
    frames: int
    windows: int
    alerts: int
    segments: int
    pose_s: float
    task_wall_s: float
    task_latency_s: float  # dispatch → result, per segment summed (includes queueing)
    warning: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)  # summed stage work: capture, pose, …, enclave
    cpu_s: float = 0.0  # CPU time of its segment tasks
    first_task_on_worker: bool = False  # paid the worker's cold start (imports) in its latency


@dataclass
class BatchSummary:
    clips: int
    clips_done: int
    clips_skipped: int
    clips_failed: int
    frames: int
    windows: int
    alerts: int
    failures: list[dict[str, str]]
    wall_s: float
    outcomes: list[ClipOutcome] = field(default_factory=list)
    report: str = ""

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.clips_failed else 0

    def as_line(self) -> dict[str, Any]:
        return {
            "clips": self.clips,
            "clips_done": self.clips_done,
            "clips_skipped": self.clips_skipped,
            "clips_failed": self.clips_failed,
            "frames": self.frames,
            "windows": self.windows,
            "alerts": self.alerts,
            "failures": self.failures,
            "wall_s": round(self.wall_s, 3),
            "frames_per_s": round(self.frames_per_s, 3),
        }


def format_summary(s: BatchSummary) -> str:
    lines = [
        f"batch: {s.clips} clip(s): {s.clips_done} done, {s.clips_skipped} skipped (done before), "
        f"{s.clips_failed} failed",
        f"  frames {s.frames}  windows {s.windows}  alerts {s.alerts}  wall {s.wall_s:.1f} s"
        + (f"  ({s.frames_per_s:.1f} frames/s)" if s.wall_s > 0 else ""),
        f"  report {s.report}",
    ]
    lines.extend(f"  failed: {f['clip']}: {f['reason']}" for f in s.failures)
    return "\n".join(lines)


__all__ = [
    "VIDEO_SUFFIXES",
    "BatchOptions",
    "BatchSummary",
    "ClipOutcome",
    "device_for",
    "expand_clips",
    "format_summary",
]
