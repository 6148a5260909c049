"""Ground truth for real clips, and how `veilcam realcheck --annotations` scores a model against it.

Format (CSV, UTF-8; `#` lines are comments), version 1::

    # veilcam-annotations 1
    clip,track,start_s,end_s,label,note
    real/fall14.mp4,*,0.3,2.2,falling,backward fall
    real/fall14.mp4,*,2.2,5.7,lying,on the floor

- `clip`: path relative to the annotation file's directory (or `--clips-dir`);
- `track`: `*` for the whole frame (the person the window is about), or a tracker id;
- `start_s`, `end_s`: media seconds from the clip's first frame, `start_s < end_s`;
- `label`: one of the model's labels; `falling` marks a fall *event* (scored by recall);
- `note`: free text.

A file without the version line is read as version 0, the older five-column layout
`clip,start_s,end_s,label,note` (whole frame), which `annotations.csv` of the shared sample
directory (`shared/samples/` next to the checkout, when present) uses.

Scoring (all on the windows realcheck builds, i.e. the daemon's windows):
- a fall is *found* when a window that raised a `falling` alert under the rules overlaps it;
- *false fall alerts* are `falling` alerts on clips with no annotated fall, per hour of those clips
  (alerts in fall clips that overlap no fall are counted apart, as `alerts_outside_falls`);
- a window's *reference label*: `falling` when it overlaps a fall by at least half of the shorter of
  the two; else the label covering most of it, when that covers at least half of it; else none
  (the window is not scored). Top-1 agreement and the confusion matrix use scored windows;
- *lying still*: windows with at least 2 s (or all) of them inside one `lying` stretch, and how
  many read `lying`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

FORMAT_VERSION = 1
FALL = "falling"
LYING = "lying"
WHOLE_FRAME = "*"
LYING_STILL_S = 2.0  # a window with this much of an annotated `lying` stretch is "lying still"


@dataclass(frozen=True, slots=True)
class Annotation:
    """One annotated stretch of a clip."""

    clip: str
    start_s: float
    end_s: float
    label: str
    track: str = WHOLE_FRAME
    note: str = ""


def _version(lines: list[str]) -> int:
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text.startswith("# veilcam-annotations"):
            try:
                return int(text.split()[-1])
            except ValueError as e:
                raise ConfigError(f"annotations: bad version line {text!r}") from e
        return 0
    return 0


def load_annotations(path: str | Path) -> list[Annotation]:
    """Read an annotation file (version 1, or the version-0 five-column layout)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"annotations {p}: cannot read: {e.strerror}") from e
    lines = text.splitlines()
    version = _version(lines)
    if version not in (0, FORMAT_VERSION):
        raise ConfigError(f"annotations {p}: version {version} unknown (this veilcam reads 0 and 1)")
    out: list[Annotation] = []
    body = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    for n, row in enumerate(csv.reader(io.StringIO("\n".join(body))), 1):
        row = [c.strip() for c in row]
        if version == 1 and row[:2] == ["clip", "track"]:
            continue  # header
        if version == 0 and row[:2] == ["clip", "start_s"]:
            continue
        width = 6 if version == 1 else 5
        if len(row) < width - 1:
            raise ConfigError(f"annotations {p}: row {n} has {len(row)} fields, expected {width}")
        row += [""] * (width - len(row))
        if version == 1:
            clip, track, start, end, label, note = row[:6]
        else:
            clip, start, end, label, note = row[:5]
            track = WHOLE_FRAME
        try:
            t_start, t_end = float(start), float(end)
        except ValueError as err:
            raise ConfigError(f"annotations {p}: row {n}: start/end are not numbers") from err
        if not clip or not label or not 0 <= t_start < t_end:
            raise ConfigError(f"annotations {p}: row {n}: need a clip, a label and 0 <= start < end")
        out.append(Annotation(clip, t_start, t_end, label, track or WHOLE_FRAME, note))
    if not out:
        raise ConfigError(f"annotations {p}: no annotations")
    return out


def write_annotations(path: str | Path, notes: list[Annotation]) -> None:
    """Write `notes` in the current format version."""
    buf = io.StringIO()
    buf.write(f"# veilcam-annotations {FORMAT_VERSION}\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["clip", "track", "start_s", "end_s", "label", "note"])
    for a in notes:
        w.writerow([a.clip, a.track, f"{a.start_s:g}", f"{a.end_s:g}", a.label, a.note])
    Path(path).write_text(buf.getvalue(), encoding="utf-8")


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def reference_label(t0: float, t1: float, notes: list[Annotation], track: int = -1) -> str | None:
    """The annotated label a window [t0, t1] is scored against (see the module docstring)."""
    mine = [a for a in notes if a.track in (WHOLE_FRAME, str(track))]
    span = max(t1 - t0, 1e-9)
    for a in mine:
        if a.label == FALL and _overlap(t0, t1, a.start_s, a.end_s) >= 0.5 * min(span, a.end_s - a.start_s):
            return FALL
    best, cover = None, 0.0
    for a in mine:
        c = _overlap(t0, t1, a.start_s, a.end_s)
        if c > cover:
            best, cover = a.label, c
    return best if cover >= 0.5 * span else None


def score_clips(results: list[dict[str, Any]], notes: list[Annotation], labels: list[str]) -> dict[str, Any]:
    """Score realcheck clip results (`classify_clip` dicts with a `clip` key) against `notes`."""
    by_clip: dict[str, list[Annotation]] = {}
    for a in notes:
        by_clip.setdefault(a.clip, []).append(a)
    index = {lab: i for i, lab in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    per_clip = []
    falls = found = false_alerts = outside = agree = scored = lying_n = lying_ok = 0
    free_s = 0.0
    for r in results:
        mine = by_clip.get(r["clip"], [])
        period = r["duration_s"] / max(r["frames"], 1)
        wins = r["windows"]
        spans = [(w["t0"], w["t1"] + period) for w in wins]  # a window covers its last frame's slot
        fall_alerts = [s for s, w in zip(spans, wins, strict=True) if w["alert"] and w["label"] == FALL]
        events = [a for a in mine if a.label == FALL]
        hits = [any(_overlap(s0, s1, a.start_s, a.end_s) > 0 for s0, s1 in fall_alerts) for a in events]
        off = sum(
            1 for s0, s1 in fall_alerts if not any(_overlap(s0, s1, a.start_s, a.end_s) > 0 for a in events)
        )
        c_agree = c_scored = c_lying = c_lying_ok = 0
        for (s0, s1), w in zip(spans, wins, strict=True):
            ref = reference_label(s0, s1, mine, w["track"])
            if ref is None or ref not in index:
                continue
            c_scored += 1
            c_agree += int(w["label"] == ref)
            confusion[index[ref]][index[w["label"]]] += 1
            if ref == LYING and any(
                a.label == LYING
                and _overlap(s0, s1, a.start_s, a.end_s) >= min(LYING_STILL_S, s1 - s0) - 1e-6
                for a in mine
            ):
                c_lying += 1
                c_lying_ok += int(w["label"] == LYING)
        entry = {
            "clip": r["clip"],
            "duration_s": r["duration_s"],
            "windows": len(wins),
            "falls": len(events),
            "falls_found": sum(hits),
            "fall_alerts": len(fall_alerts),
            "alerts_outside_falls": off if events else 0,
            "false_fall_alerts": 0 if events else len(fall_alerts),
            "scored_windows": c_scored,
            "agreement": round(c_agree / c_scored, 3) if c_scored else None,
            "lying_windows": c_lying,
            "lying_read_lying": c_lying_ok,
            "labels": [w["label"] for w in wins],
        }
        per_clip.append(entry)
        falls += len(events)
        found += sum(hits)
        if events:
            outside += off
        else:
            false_alerts += len(fall_alerts)
            free_s += r["duration_s"]
        agree, scored = agree + c_agree, scored + c_scored
        lying_n, lying_ok = lying_n + c_lying, lying_ok + c_lying_ok
    return {
        "falls": falls,
        "falls_found": found,
        "fall_recall": round(found / falls, 3) if falls else None,
        "fall_free_s": round(free_s, 2),
        "false_fall_alerts": false_alerts,
        "false_fall_alerts_per_hour": round(false_alerts * 3600.0 / free_s, 1) if free_s else None,
        "alerts_outside_falls": outside,
        "scored_windows": scored,
        "agreement": round(agree / scored, 3) if scored else None,
        "lying_windows": lying_n,
        "lying_agreement": round(lying_ok / lying_n, 3) if lying_n else None,
        "labels": list(labels),
        "confusion": confusion,
        "clips": per_clip,
    }


def format_confusion(scores: dict[str, Any]) -> str:
    """The confusion matrix as text: rows annotated, columns predicted (labels that occur only)."""
    labels, m = scores["labels"], scores["confusion"]
    used = [i for i in range(len(labels)) if any(m[i]) or any(row[i] for row in m)]
    if not used:
        return "  (no scored windows)"
    w = max(len(labels[i]) for i in used) + 1
    head = " " * (w + 2) + "".join(f"{labels[i][:7]:>8}" for i in used)
    lines = ["  annotated \\ predicted", head]
    lines.extend(f"  {labels[i]:<{w}}" + "".join(f"{m[i][j]:>8}" for j in used) for i in used)
    return "\n".join(lines)


def confusion_png(scores: dict[str, Any], path: str | Path, title: str = "realcheck") -> Path:
    """Save the confusion matrix (annotated × predicted, counts) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels, m = scores["labels"], np.asarray(scores["confusion"])
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted (top-1)")
    ax.set_ylabel("annotated")
    top = m.max() if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                ax.text(
                    j,
                    i,
                    str(m[i, j]),
                    ha="center",
                    va="center",
                    color="white" if m[i, j] > top / 2 else "black",
                )
    recall = scores.get("fall_recall")
    ax.set_title(
        f"{title}: agreement {scores.get('agreement')}, fall recall {recall}, "
        f"false falls/h {scores.get('false_fall_alerts_per_hour')}",
        fontsize="small",
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


__all__ = [
    "FORMAT_VERSION",
    "Annotation",
    "confusion_png",
    "format_confusion",
    "load_annotations",
    "reference_label",
    "score_clips",
    "write_annotations",
]
