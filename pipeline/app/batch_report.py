"""The report and manifest of `veilcam batch`: JSON lines on disk, idempotent, resumable.

Report (`--out report.jsonl`): one line per alert `{"type": "alert", clip, t0, t1, label, score,
track, segment, device, window_seq, alert_seq}` and, at the end of every run, one summary line
`{"type": "summary", clips, clips_done, clips_skipped, clips_failed, frames, windows, alerts,
failures: [{clip, reason}], wall_s, frames_per_s}`. An alert line is written at most once per
(clip, window media span, track, label): a clip redone after a crash or a killed worker adds no
duplicate (windows get new numbers on a rerun, so the key is media time, not `seq`).

Manifest (`report.jsonl.manifest`): one line per finished clip `{clip, status: done|failed,
reason, fingerprint, settings, …}`; a rerun of the same command skips clips whose last line is
`done` with the same file fingerprint (path, size, mtime) and settings. The report line of an
alert is fsynced before its clip's manifest line, so a crash between the two redoes the clip
(its alerts deduplicated) rather than losing them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def clip_fingerprint(path: str | Path) -> str | None:
    """(absolute path, size, mtime): a done clip is skipped only while the file is unchanged."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def alert_key(clip: str, t0: float, t1: float, track: Any, label: Any) -> str:
    """Idempotency key of a report line: clip + window media span (+ track and label)."""
    return f"{clip}|{t0:.4f}|{t1:.4f}|{track}|{label}"


class ReportWriter:
    """Appends alert lines to the report, skipping keys already in it (this or earlier runs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: set[str] = set()
        self.existing = 0
        if path.exists():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except ValueError:
                    log.warning("report %s line %d is not JSON (a torn write?); ignored", path, n)
                    continue
                if doc.get("type") == "alert":
                    self.keys.add(
                        alert_key(doc["clip"], doc["t0"], doc["t1"], doc.get("track"), doc.get("label"))
                    )
                    self.existing += 1
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = path.open("a", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"--out: cannot write {path}: {e.strerror}") from e
        self._lock = threading.Lock()
        self.written = 0
        self.duplicates = 0

    def alert(self, doc: dict[str, Any]) -> bool:
        """Write one alert line unless its key is already in the report; True when written."""
        key = alert_key(doc["clip"], doc["t0"], doc["t1"], doc.get("track"), doc.get("label"))
        with self._lock:
            if key in self.keys:
                self.duplicates += 1
                return False
            self.keys.add(key)
            self._f.write(json.dumps({"type": "alert", **doc}, sort_keys=True) + "\n")
            self.written += 1
            return True

    def summary(self, doc: dict[str, Any]) -> None:
        with self._lock:
            self._f.write(json.dumps({"type": "summary", **doc}, sort_keys=True) + "\n")
        self.sync()

    def sync(self) -> None:
        with self._lock:
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:
            self._f.close()


class Manifest:
    """Finished clips, one JSON line each, beside the report (`<report>.manifest`)."""

    def __init__(self, path: Path, settings: str) -> None:
        self.path = path
        self.settings = settings
        self.last: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue  # a torn last line: that clip is simply redone
                if isinstance(doc, dict) and "clip" in doc:
                    self.last[str(doc["clip"])] = doc
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a", encoding="utf-8")

    def other_settings(self) -> set[str]:
        """Settings digests of earlier runs that differ from this run's (a changed config)."""
        return {str(d.get("settings")) for d in self.last.values()} - {self.settings}

    def is_done(self, clip: str) -> bool:
        doc = self.last.get(clip)
        return (
            doc is not None
            and doc.get("status") == "done"
            and doc.get("settings") == self.settings
            and doc.get("fingerprint") == clip_fingerprint(clip)
        )

    def record(self, clip: str, status: str, reason: str | None = None, **extra: Any) -> None:
        doc = {
            "clip": clip,
            "status": status,
            "reason": reason,
            "fingerprint": clip_fingerprint(clip),
            "settings": self.settings,
            **extra,
        }
        with self._lock:
            self.last[clip] = doc
            self._f.write(json.dumps(doc, sort_keys=True) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:
            self._f.close()


def read_report(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(alert lines, summary lines) of a report file."""
    alerts: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        doc = json.loads(line)
        (alerts if doc.get("type") == "alert" else summaries).append(doc)
    return alerts, summaries


__all__ = ["Manifest", "ReportWriter", "alert_key", "clip_fingerprint", "read_report"]
