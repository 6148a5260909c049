"""Real-footage check: the real pose backend + the default model over sample clips.

Frames are sampled at the model's fps (as the daemon's capture throttle does), skeletons come
from `stages.pose` (OpenPose-18, pixel coordinates), a simple nearest-neighbour association
links them into tracks, and windows are built like the daemon's windowing stage: every `stride`
frames, the `M` most confident tracks of the last `T` frames, normalised x/W−0.5, y/H−0.5, score.
Pose extraction is the slow part, so extracted skeletons are cached as `.npz` keyed by the clip's
size/mtime, crop, fps and backend.

The sample clips are third-party and test-only: they are never used for training.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from config.schema import RulesConfig
from enclave_bridge.errors import StageError
from enclave_bridge.model_inputs import apply_input_transform, input_transform_of
from training.evaluate import load_package
from training.synth import normalise

log = logging.getLogger(__name__)

V = 18
SHARED_SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "samples"
# Clips with a known layout: the fall clip is depth map (left) | RGB (right); only RGB is used.
KNOWN_CROPS: dict[str, tuple[int, int, int, int]] = {"fall-01-cam0.mp4": (320, 0, 640, 240)}
DEFAULT_CLIPS = ("fall-01-cam0.mp4", "vtest.avi")
POSE_BACKEND = "opencv-openpose"
FALL_LABEL = "falling"
DEFAULT_MIN_SCORE = RulesConfig().min_score  # the daemon's default alert rule


@dataclass(slots=True)
class Track:
    """A skeleton track: last keypoints (18, 3) pixel x, y, score and frames since last seen."""

    tid: int
    last: np.ndarray
    missed: int = 0
    frames: dict[int, np.ndarray] = field(default_factory=dict)


def _centre_and_scale(kp: np.ndarray) -> tuple[np.ndarray, float]:
    ok = kp[:, 2] > 0
    if not ok.any():
        return np.zeros(2), 1.0
    pts = kp[ok, :2]
    span = float(np.ptp(pts[:, 1])) if ok.sum() > 1 else 0.0
    return pts.mean(0), max(span, 20.0)


def associate(
    frames: list[np.ndarray], max_missed: int = 5, max_dist: float = 0.8
) -> list[dict[int, np.ndarray]]:
    """Greedy nearest-neighbour tracking over frames of (P, 18, 3) skeletons.

    Two skeletons match when the mean distance of their jointly visible joints (or of their
    centres when none is shared) is below `max_dist` × the skeleton's height. Returns per frame
    {track id: (18, 3)}.
    """
    tracks: list[Track] = []
    next_id = 0
    out: list[dict[int, np.ndarray]] = []
    for fi, kp in enumerate(frames):
        people = [p for p in kp if np.count_nonzero(p[:, 2] > 0) >= 2]
        pairs = []
        for ti, tr in enumerate(tracks):
            for pi, p in enumerate(people):
                both = (tr.last[:, 2] > 0) & (p[:, 2] > 0)
                c1, s1 = _centre_and_scale(tr.last)
                c2, s2 = _centre_and_scale(p)
                if both.sum() >= 2:
                    d = float(np.linalg.norm(tr.last[both, :2] - p[both, :2], axis=1).mean())
                else:
                    d = float(np.linalg.norm(c1 - c2))
                d /= max(s1, s2)
                if d < max_dist * (1 + 0.3 * tr.missed):
                    pairs.append((d, ti, pi))
        used_t: set[int] = set()
        used_p: set[int] = set()
        current: dict[int, np.ndarray] = {}
        for _, ti, pi in sorted(pairs):
            if ti in used_t or pi in used_p:
                continue
            used_t.add(ti)
            used_p.add(pi)
            tracks[ti].last, tracks[ti].missed = people[pi], 0
            current[tracks[ti].tid] = people[pi]
        for ti, tr in enumerate(tracks):
            if ti not in used_t:
                tr.missed += 1
        tracks = [t for t in tracks if t.missed <= max_missed]
        for pi, p in enumerate(people):
            if pi not in used_p:
                tracks.append(Track(next_id, p))
                current[next_id] = p
                next_id += 1
        out.append(current)
        del fi
    return out


def build_windows(
    tracked: list[dict[int, np.ndarray]], width: int, height: int, T: int, stride: int, M: int, fps: float
) -> list[tuple[float, float, list[int], np.ndarray]]:
    """Daemon-style windows: (t0, t1, track ids, (3, T, 18, M) float32) every `stride` frames.

    A clip shorter than T still yields one zero-padded window (as the daemon's flush does).
    """
    n = len(tracked)
    starts = list(range(0, max(1, n - T + 1), stride)) if n >= T else [0]
    out = []
    for s in starts:
        frames = tracked[s : s + T]
        totals: dict[int, float] = {}
        for fr in frames:
            for tid, kp in fr.items():
                totals[tid] = totals.get(tid, 0.0) + float(kp[:, 2].sum())
        chosen = sorted(totals, key=lambda t: (-totals[t], t))[:M]
        data = np.zeros((3, T, V, M), dtype=np.float32)
        for t, fr in enumerate(frames):
            for m, tid in enumerate(chosen):
                if tid in fr:
                    data[:, t, :, m] = normalise(fr[tid], width, height).T
        out.append((s / fps, (s + len(frames) - 1) / fps, chosen, data))
    return out


def _cache_key(path: Path, crop: tuple[int, int, int, int] | None, fps: float, backend: str) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{crop}|{fps}|{backend}|v1"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def extract_skeletons(
    path: str | Path,
    fps: float,
    crop: tuple[int, int, int, int] | None = None,
    cache_dir: str | Path | None = None,
    backend_name: str = POSE_BACKEND,
) -> tuple[list[np.ndarray], int, int, float]:
    """Pose on the frames of `path` sampled at `fps`: (per-frame (P, 18, 3) pixels, W, H, pose seconds).

    Cached in `cache_dir` (npz) so reruns skip pose extraction.
    """
    path = Path(path)
    if not path.exists():
        raise StageError(f"clip {path} not found")
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "veilcam" / "realcheck"
    cache = Path(cache_dir) if cache_dir else default_cache
    cfile = cache / f"{path.stem}-{_cache_key(path, crop, fps, backend_name)}.npz"
    if cfile.exists():
        with np.load(cfile) as z:
            counts, flat = z["counts"], z["keypoints"]
            w, h, secs = int(z["width"]), int(z["height"]), float(z["pose_s"])
        frames = np.split(flat, np.cumsum(counts)[:-1]) if len(counts) else []
        log.info("skeletons of %s from cache %s", path.name, cfile)
        return list(frames), w, h, secs
    from stages.pose import create_backend

    backend = create_backend(backend_name)
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise StageError(f"cannot open clip {path}")
    src_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) or fps
    frames: list[np.ndarray] = []
    next_t, idx, pose_s = 0.0, 0, 0.0
    w = h = 0
    try:
        while True:
            ok, img = cap.read()
            if not ok:
                break
            t = idx / src_fps
            idx += 1
            if t + 1e-6 < next_t:
                continue  # throttle to the model's fps by media time, like the daemon's capture
            next_t += 1.0 / fps
            if crop is not None:
                x0, y0, x1, y1 = crop
                img = img[y0:y1, x0:x1]
            h, w = img.shape[:2]
            t0 = time.monotonic()
            kp = np.asarray(backend.infer(img), dtype=np.float32).reshape(-1, V, 3)
            pose_s += time.monotonic() - t0
            frames.append(kp)
    finally:
        cap.release()
    if not frames:
        raise StageError(f"no frames decoded from {path}")
    cache.mkdir(parents=True, exist_ok=True)
    counts = np.array([len(f) for f in frames], dtype=np.int64)
    flat = np.concatenate(frames) if counts.sum() else np.zeros((0, V, 3), np.float32)
    np.savez_compressed(cfile, counts=counts, keypoints=flat, width=w, height=h, pose_s=pose_s)
    return frames, w, h, pose_s


def classify_clip(
    model: Any,
    labels: list[str],
    meta: dict[str, Any],
    path: str | Path,
    crop: tuple[int, int, int, int] | None = None,
    cache_dir: str | Path | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
) -> dict[str, Any]:
    """Per-window top-3 labels for one clip, and the fall alerts a `min_score` rule would raise."""
    T, stride, fps, M = int(meta["T"]), int(meta["stride"]), float(meta["fps"]), int(meta.get("M", 2))
    frames, w, h, pose_s = extract_skeletons(path, fps, crop, cache_dir)
    tracked = associate(frames)
    wins = build_windows(tracked, w, h, T, stride, M, fps)
    x = torch.from_numpy(apply_input_transform(np.stack([d for *_, d in wins]), input_transform_of(meta)))
    with torch.no_grad():
        prob = torch.softmax(model(x), dim=1).numpy()
    windows = []
    for (t0, t1, tids, _), p in zip(wins, prob, strict=True):
        order = np.argsort(-p)[:3]
        windows.append(
            {
                "t0": round(t0, 2),
                "t1": round(t1, 2),
                "track": tids[0] if tids else -1,
                "label": labels[int(order[0])],
                "top": [(labels[int(i)], round(float(p[i]), 3)) for i in order],
            }
        )
    fall = sum(1 for wi in windows if wi["label"] == FALL_LABEL)
    fall_p = prob[:, labels.index(FALL_LABEL)] if FALL_LABEL in labels else np.zeros(len(prob))
    # what the enclave's rule engine would alert on (top-1 label at or above min_score)
    alerts = [wi for wi in windows if wi["label"] == FALL_LABEL and wi["top"][0][1] >= min_score]
    return {
        "name": Path(path).name,
        "frames": len(frames),
        "width": w,
        "height": h,
        "pose_s": pose_s,
        "windows": windows,
        "fall_windows": fall,
        "max_fall_p": round(float(fall_p.max()), 3) if len(fall_p) else 0.0,
        "fall_times": [(wi["t0"], wi["t1"]) for wi in windows if wi["label"] == FALL_LABEL],
        "min_score": min_score,
        "fall_alerts": len(alerts),
        "fall_alert_times": [(wi["t0"], wi["t1"]) for wi in alerts],
    }


def run_realcheck(
    model_dir: str | Path,
    clips: list[str] | tuple[str, ...] = (),
    cache_dir: str | Path | None = None,
    threads: int = 2,
    min_score: float = DEFAULT_MIN_SCORE,
) -> dict[str, Any]:
    """Classify each clip (default: the shared fall and pedestrian samples)."""
    torch.set_num_threads(threads)
    model, labels, meta = load_package(model_dir)
    paths = [Path(c) for c in clips] or [SHARED_SAMPLES / c for c in DEFAULT_CLIPS]
    results = [
        classify_clip(model, labels, meta, p, KNOWN_CROPS.get(p.name), cache_dir, min_score) for p in paths
    ]
    return {
        "model": str(model_dir),
        "T": meta["T"],
        "stride": meta["stride"],
        "fps": meta["fps"],
        "clips": results,
    }


__all__ = [
    "DEFAULT_CLIPS",
    "KNOWN_CROPS",
    "associate",
    "build_windows",
    "classify_clip",
    "extract_skeletons",
    "run_realcheck",
]
