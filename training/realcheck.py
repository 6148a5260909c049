"""Real-footage check: the real pose backend + a model over real clips, scored against annotations.

Frames are sampled at the model's fps with the daemon's capture throttle, skeletons come from
`stages.pose` (OpenPose-18, pixel coordinates), and tracking + windows are the daemon's own
`stages.windowing.WindowBuilder` (norfair tracks, a window every `stride` frames, the final window
at end of stream, sparse windows skipped) — one code path, so `veilcam replay` and `veilcam
realcheck` give the same windows and labels for the same clip and settings. Alerts are decided by
the enclave's own `RuleEngine` with the rules of a veilcam config (default: the daemon defaults).
Pose extraction is the slow part, so skeletons are cached as `.npz` keyed by the clip's size/mtime,
crop, fps and backend.

With `--annotations` (see `training.annotations` for the format) each clip is scored: fall event
recall (a fall is found when an alert `falling` window overlaps it), false fall alerts per hour of
fall-free footage, per-window top-1 agreement with the annotated label, a confusion matrix, and
`lying` agreement on windows with at least 2 s inside an annotated `lying` stretch.

Why one module of ~440 lines: extraction, windowing, classification and scoring of one clip share
the cache key and the rules; kept together so a report names exactly the settings that made it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import numpy.typing as npt
import torch

from config.schema import PoseConfig, RulesConfig, WindowConfig
from enclave_bridge.measured.model_inputs import apply_input_transform, input_transform_of
from enclave_bridge.shared.errors import StageError
from enclave_bridge.shared.rules import AlertRules, RuleEngine
from pipeline.messages import PoseFrame
from stages.windowing import PlainWindow, WindowBuilder
from training.annotations import Annotation, load_annotations, score_clips
from training.evaluate import load_package

log = logging.getLogger(__name__)

V = 18
SHARED_SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "samples"
# Clips with a known layout: the fall clip is depth map (left) | RGB (right); only RGB is used.
KNOWN_CROPS: dict[str, tuple[int, int, int, int]] = {"fall-01-cam0.mp4": (320, 0, 640, 240)}
DEFAULT_CLIPS = ("fall-01-cam0.mp4", "vtest.avi")
POSE_BACKEND = "auto"  # the daemon's default (config pose.backend): same skeletons as a replay
FALL_LABEL = "falling"
DEFAULT_MIN_SCORE = RulesConfig().min_score  # the daemon's default alert rule
DEVICE = "realcheck"


def _cache_key(
    path: Path, crop: tuple[int, int, int, int] | None, fps: float, backend: str, options: dict[str, Any]
) -> str:
    st = path.stat()
    opts = sorted(options.items())
    raw = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{crop}|{fps}|{backend}|{opts}|v3"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def extract_skeletons(
    path: str | Path,
    fps: float,
    crop: tuple[int, int, int, int] | None = None,
    cache_dir: str | Path | None = None,
    backend_name: str = POSE_BACKEND,
    backend_options: dict[str, Any] | None = None,
) -> tuple[list[npt.NDArray[np.float32]], npt.NDArray[np.float64], int, int, float]:
    """Pose on the frames of `path` sampled at `fps`.

    Returns per-frame (P, 18, 3) pixel skeletons, their media times (s, as the daemon's capture
    stamps them), frame width, height and the seconds spent in pose.

    Cached in `cache_dir` (npz) so reruns skip pose extraction.
    """
    path = Path(path)
    if not path.exists():
        raise StageError(f"clip {path} not found")
    options = dict(backend_options or {})
    if backend_name == "auto":
        from stages.pose import resolve_auto

        backend_name = resolve_auto()
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "veilcam" / "realcheck"
    cache = Path(cache_dir) if cache_dir else default_cache
    cfile = cache / f"{path.stem}-{_cache_key(path, crop, fps, backend_name, options)}.npz"
    if cfile.exists():
        with np.load(cfile) as z:
            counts, flat, times = z["counts"], z["keypoints"], z["times"]
            w, h, secs = int(z["width"]), int(z["height"]), float(z["pose_s"])
        cached = np.split(flat, np.cumsum(counts)[:-1]) if len(counts) else []
        log.info("skeletons of %s from cache %s", path.name, cfile)
        return list(cached), times, w, h, secs
    from stages.pose import create_backend

    backend = create_backend(backend_name, **options)
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise StageError(f"cannot open clip {path}")
    src_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) or fps
    frames: list[npt.NDArray[np.float32]] = []
    stamps: list[float] = []
    idx, pose_s = 0, 0.0
    next_due: float | None = None
    period = 1.0 / fps
    w = h = 0
    try:
        while True:
            ok, img = cap.read()
            if not ok:
                break
            t = idx / src_fps  # media time of a file frame, as stages.capture computes it
            idx += 1
            # the daemon's fps throttle (stages.capture.CaptureStage._due), step for step, so the
            # same frames reach pose in a replay and here
            if next_due is not None and t + 1e-3 < next_due:
                continue
            nxt = (next_due if next_due is not None else t) + period
            next_due = nxt if nxt > t else t + period
            if crop is not None:
                x0, y0, x1, y1 = crop
                img = img[y0:y1, x0:x1]
            h, w = img.shape[:2]
            t0 = time.monotonic()
            bgr = cast(npt.NDArray[np.uint8], img)  # VideoCapture decodes to 8-bit BGR (cv2: any array)
            kp = np.asarray(backend.infer(bgr), dtype=np.float32).reshape(-1, V, 3)
            pose_s += time.monotonic() - t0
            frames.append(kp)
            stamps.append(t)
    finally:
        cap.release()
    if not frames:
        raise StageError(f"no frames decoded from {path}")
    cache.mkdir(parents=True, exist_ok=True)
    counts = np.array([len(f) for f in frames], dtype=np.int64)
    flat = np.concatenate(frames) if counts.sum() else np.zeros((0, V, 3), np.float32)
    times = np.asarray(stamps, dtype=np.float64)
    np.savez_compressed(cfile, counts=counts, keypoints=flat, times=times, width=w, height=h, pose_s=pose_s)
    return frames, times, w, h, pose_s


def clip_windows(
    frames: list[npt.NDArray[np.float32]],
    times: npt.NDArray[np.float64],
    width: int,
    height: int,
    meta: dict[str, Any],
    window: WindowConfig | None = None,
) -> list[PlainWindow]:
    """The daemon's windows of a clip's skeletons (`WindowBuilder`, end-of-stream flush included)."""
    window = window or WindowConfig()
    builder = WindowBuilder(
        DEVICE,
        length_frames=window.length_frames or int(meta["T"]),
        stride_frames=window.stride_frames or int(meta["stride"]),
        persons=window.persons or int(meta.get("M", 2)),
        tracker=window.tracker,
        flush_partial=window.flush_partial,
        min_frames=window.min_frames,
        min_joints=window.min_joints,
    )
    out: list[PlainWindow] = []
    for i, (kp, t) in enumerate(zip(frames, times, strict=True)):
        out += builder.push(PoseFrame(DEVICE, i, float(t), float(t), width, height, kp))
    out += builder.flush()
    return out


def classify_clip(
    model: Any,
    labels: list[str],
    meta: dict[str, Any],
    path: str | Path,
    crop: tuple[int, int, int, int] | None = None,
    cache_dir: str | Path | None = None,
    rules: AlertRules | None = None,
    window: WindowConfig | None = None,
    pose: PoseConfig | None = None,
) -> dict[str, Any]:
    """Per-window top-3 labels for one clip, and the alerts the enclave's rules would raise."""
    rules = rules or AlertRules.from_dict(RulesConfig().as_dict())
    pose = pose or PoseConfig()
    fps = float(meta["fps"])
    frames, times, w, h, pose_s = extract_skeletons(
        path, fps, crop, cache_dir, pose.backend, pose.backend_options()
    )
    wins = clip_windows(frames, times, w, h, meta, window)
    if wins:
        x = apply_input_transform(np.stack([wi.data for wi in wins]), input_transform_of(meta))
        with torch.no_grad():
            prob = torch.softmax(model(torch.from_numpy(x)).double(), dim=1).numpy()
    else:
        prob = np.zeros((0, len(labels)))
    engine = RuleEngine()
    windows = []
    for wi, p in zip(wins, prob, strict=True):
        order = np.argsort(-p)[:3]
        label, score = labels[int(order[0])], float(p[order[0]])
        track = wi.track_ids[0] if wi.track_ids else -1
        windows.append(
            {
                "t0": round(wi.t0, 3),
                "t1": round(wi.t1, 3),
                "track": track,
                "frames": wi.frames,
                "label": label,
                "top": [(labels[int(i)], round(float(p[i]), 3)) for i in order],
                "alert": engine.decide(DEVICE, rules, track, label, score, wi.t1),
            }
        )
    fall_p = prob[:, labels.index(FALL_LABEL)] if FALL_LABEL in labels and len(prob) else np.zeros(0)
    alerts = [wi for wi in windows if wi["alert"] and wi["label"] == FALL_LABEL]
    duration = float(times[-1] - times[0]) + 1.0 / fps if len(times) else 0.0
    return {
        "name": Path(path).name,
        "path": str(path),
        "frames": len(frames),
        "duration_s": round(duration, 3),
        "width": w,
        "height": h,
        "pose_s": pose_s,
        "windows": windows,
        "fall_windows": sum(1 for wi in windows if wi["label"] == FALL_LABEL),
        "max_fall_p": round(float(fall_p.max()), 3) if len(fall_p) else 0.0,
        "fall_times": [(wi["t0"], wi["t1"]) for wi in windows if wi["label"] == FALL_LABEL],
        "min_score": rules.score_for(FALL_LABEL),
        "fall_alerts": len(alerts),
        "fall_alert_times": [(wi["t0"], wi["t1"]) for wi in alerts],
    }


def export_windows(
    annotations: str | Path,
    clips: list[str] | tuple[str, ...],
    out: str | Path,
    meta: dict[str, Any],
    clips_dir: str | Path | None = None,
    stride: int = 1,
    cache_dir: str | Path | None = None,
    classes: tuple[str, ...] | list[str] = (),
) -> dict[str, int]:
    """Annotated training windows from real clips (`veilcam train --real-windows`): the daemon's
    windows of each clip in `clips` (annotation clip names) every `stride` frames, labelled with
    their reference label (`training.annotations.reference_label`); unlabelled windows are left
    out. Saves `x` (N, 3, T, 18, M) float32, `y` (N,) int64 and the clip of each window to `out`
    (npz). Clips used here are training clips: report realcheck on them apart from held-out ones."""
    from training.annotations import reference_label

    notes = load_annotations(annotations)
    root = Path(clips_dir) if clips_dir else Path(annotations).resolve().parent
    pose = PoseConfig()
    fps = float(meta["fps"])
    index = {c: i for i, c in enumerate(classes)}
    xs: list[npt.NDArray[np.float32]] = []
    ys: list[int] = []
    names: list[str] = []
    counts: dict[str, int] = {}
    for clip in clips:
        mine = [a for a in notes if a.clip == clip]
        if not mine:
            raise StageError(f"clip {clip} has no annotations in {annotations}")
        path = root / clip
        frames, times, w, h, _ = extract_skeletons(
            path, fps, KNOWN_CROPS.get(path.name), cache_dir, pose.backend, pose.backend_options()
        )
        for wi in clip_windows(frames, times, w, h, meta, WindowConfig(stride_frames=stride)):
            ref = reference_label(wi.t0, wi.t1 + 1.0 / fps, mine, wi.track_ids[0] if wi.track_ids else -1)
            if ref is None or ref not in index:
                continue
            xs.append(wi.data)
            ys.append(index[ref])
            names.append(clip)
            counts[f"{clip}:{ref}"] = counts.get(f"{clip}:{ref}", 0) + 1
    if not xs:
        raise StageError("no annotated windows in the given clips")
    np.savez_compressed(
        out, x=np.stack(xs).astype(np.float32), y=np.asarray(ys, np.int64), clip=np.asarray(names)
    )
    return counts


def reapply_rules(report: dict[str, Any], rules: AlertRules) -> dict[str, Any]:
    """The same windows under other alert rules (a fresh `RuleEngine` per clip): how the
    recall/false-alert trade-off of `min_score`/`min_windows` is measured without re-running pose
    or the model. Returns a copy of `report` (without `scores`)."""
    out = {**report, "rules": rules.to_dict(), "clips": []}
    out.pop("scores", None)
    for clip in report["clips"]:
        engine = RuleEngine()
        wins = []
        for w in clip["windows"]:
            label, score = w["top"][0]
            wins.append({**w, "alert": engine.decide(DEVICE, rules, w["track"], label, score, w["t1"])})
        alerts = [w for w in wins if w["alert"] and w["label"] == FALL_LABEL]
        out["clips"].append(
            {
                **clip,
                "windows": wins,
                "min_score": rules.score_for(FALL_LABEL),
                "fall_alerts": len(alerts),
                "fall_alert_times": [(w["t0"], w["t1"]) for w in alerts],
            }
        )
    return out


def rules_and_window(
    config: str | Path | None, min_score: float | None = None
) -> tuple[AlertRules, WindowConfig, PoseConfig]:
    """Alert rules and window settings of a veilcam config's first camera (else the defaults);
    `min_score` overrides the rules' `min_score`."""
    if config is not None:
        from config.schema import load_config

        cfg = load_config(config)
        name = next(iter(cfg.cameras), None)
        rc = cfg.rules_of(name) if name else cfg.rules
        window = cfg.cameras[name].window if name else WindowConfig()
        pose = cfg.cameras[name].pose if name else PoseConfig()
    else:
        rc, window, pose = RulesConfig(), WindowConfig(), PoseConfig()
    d = rc.as_dict()
    if min_score is not None:
        d["min_score"] = min_score
    return AlertRules.from_dict(d), window, pose


def run_realcheck(
    model_dir: str | Path,
    clips: list[str] | tuple[str, ...] = (),
    cache_dir: str | Path | None = None,
    threads: int = 2,
    min_score: float | None = None,
    *,
    config: str | Path | None = None,
    annotations: str | Path | None = None,
    clips_dir: str | Path | None = None,
    only: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Classify each clip (default: the annotated clips, else the shared fall and pedestrian
    samples) and, with `annotations`, score the results against them."""
    torch.set_num_threads(threads)
    model, labels, meta = load_package(model_dir)
    rules, window, pose = rules_and_window(config, min_score)
    notes: list[Annotation] = []
    if annotations is not None:
        notes = load_annotations(annotations)
        root = Path(clips_dir) if clips_dir else Path(annotations).resolve().parent
        named = list(dict.fromkeys(n.clip for n in notes))
        if only:
            named = [c for c in named if any(o in c for o in only)]
        paths = [Path(c) for c in clips] or [root / c for c in named]
        keys = {str(root / c): c for c in named}
    else:
        paths = [Path(c) for c in clips] or [SHARED_SAMPLES / c for c in DEFAULT_CLIPS]
        keys = {}
    results = []
    for p in paths:
        r = classify_clip(model, labels, meta, p, KNOWN_CROPS.get(p.name), cache_dir, rules, window, pose)
        r["clip"] = keys.get(str(p), p.name)
        results.append(r)
    report: dict[str, Any] = {
        "model": str(model_dir),
        "T": meta["T"],
        "stride": meta["stride"],
        "fps": meta["fps"],
        "rules": rules.to_dict(),
        "clips": results,
    }
    if notes:
        report["scores"] = score_clips(results, notes, labels)
        trained = set(meta.get("real_clips", []))
        report["real_clips"] = sorted(trained)
        if trained:  # a fine-tuned model: the clips it never saw are the honest measure
            held = [r for r in results if r["clip"] not in trained]
            seen = [r for r in results if r["clip"] in trained]
            report["scores_held_out"] = score_clips(held, notes, labels) if held else None
            report["scores_trained_on"] = score_clips(seen, notes, labels) if seen else None
    return report


SWEEP_SCORES = (0.3, 0.4, 0.5, 0.6, 0.7)
SWEEP_WINDOWS = (1, 2)
_SWEEP_KEYS = (
    "falls",
    "falls_found",
    "false_fall_alerts",
    "fall_free_s",
    "false_fall_alerts_per_hour",
    "alerts_outside_falls",
)


def rule_sweep(
    report: dict[str, Any],
    notes: list[Annotation],
    labels: list[str],
    scores: tuple[float, ...] = SWEEP_SCORES,
    windows: tuple[int, ...] = SWEEP_WINDOWS,
) -> list[dict[str, Any]]:
    """Fall recall and false fall alerts for each `falling` min_score × min_windows, the other
    rules as in `report` (the windows are re-decided, pose and model are not re-run). With a
    fine-tuned model the held-out clips are scored apart."""
    base = report["rules"]
    trained = set(report.get("real_clips", []))
    rows = []
    for ms in scores:
        for mw in windows:
            d = {
                **base,
                "label_min_score": {**base.get("label_min_score", {}), FALL_LABEL: ms},
                "min_windows": {**base.get("min_windows", {}), FALL_LABEL: mw},
            }
            clips = reapply_rules(report, AlertRules.from_dict(d))["clips"]
            row: dict[str, Any] = {"min_score": ms, "min_windows": mw}
            for name, subset in (
                ("all", clips),
                ("held_out", [c for c in clips if c["clip"] not in trained] if trained else []),
            ):
                if not subset:
                    continue
                sc = score_clips(subset, notes, labels)
                row[name] = {k: sc[k] for k in _SWEEP_KEYS}
            rows.append(row)
    return rows


__all__ = [
    "DEFAULT_CLIPS",
    "KNOWN_CROPS",
    "classify_clip",
    "clip_windows",
    "export_windows",
    "extract_skeletons",
    "reapply_rules",
    "rule_sweep",
    "rules_and_window",
    "run_realcheck",
]
