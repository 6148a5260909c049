"""Frames per second of each available pose backend on a sample clip.

    python benchmarks/pose_fps.py [--clip samples/vtest.avi] [--frames 30] [--sizes 432x368,320x272]

For `opencv-openpose` the per-frame time is split into the network forward pass and the PAF
post-processing (upsampling, smoothing, peaks, grouping). `openpose-json` replays the skeletons the
first opencv-openpose run found, written in OpenPose's `--write_json` format, so its number is the
cost of reading real-sized files. Backends that are not installed are listed with the reason.
Decoding is excluded (frames are decoded up front). Writes `benchmarks/results/pose_fps.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from enclave_bridge.errors import StageError  # noqa: E402
from stages.pose import create_backend  # noqa: E402


def decode(clip: Path, n: int, start: int, crop: tuple[int, int, int, int] | None) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(clip))
    if not cap.isOpened():
        raise SystemExit(f"cannot open {clip}")
    frames: list[np.ndarray] = []
    i = 0
    while len(frames) < n:
        ok, img = cap.read()
        if not ok:
            break
        if i >= start:
            if crop:
                x0, y0, x1, y1 = crop
                img = np.ascontiguousarray(img[y0:y1, x0:x1])
            frames.append(img)
        i += 1
    cap.release()
    if not frames:
        raise SystemExit(f"no frames decoded from {clip}")
    return frames


def run(backend: Any, frames: list[np.ndarray], warmup: int) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Per-frame wall time (and forward/grouping split when the backend reports it), skeletons."""
    for img in frames[:warmup]:
        backend.infer(img)
    totals, fwd, grp, people, skeletons = [], [], [], [], []
    for img in frames:
        t0 = time.perf_counter()
        kp = backend.infer(img)
        totals.append(time.perf_counter() - t0)
        people.append(len(kp))
        skeletons.append(kp)
        timing = getattr(backend, "last_timing", None)
        if isinstance(timing, dict) and timing.get("forward_s"):
            fwd.append(timing["forward_s"])
            grp.append(timing["grouping_s"])
    med = statistics.median(totals)
    row: dict[str, Any] = {
        "frames": len(frames),
        "ms_median": round(med * 1e3, 2),
        "ms_mean": round(statistics.fmean(totals) * 1e3, 2),
        "ms_p90": round(float(np.percentile(totals, 90)) * 1e3, 2),
        "fps": round(1.0 / med, 2),
        "people_mean": round(statistics.fmean(people), 2),
    }
    if fwd:
        row["forward_ms_median"] = round(statistics.median(fwd) * 1e3, 2)
        row["grouping_ms_median"] = round(statistics.median(grp) * 1e3, 2)
        row["grouping_share"] = round(statistics.median(grp) / med, 3)
    return row, skeletons


def write_json_dir(directory: Path, skeletons: list[np.ndarray]) -> None:
    for i, kp in enumerate(skeletons):
        doc = {
            "version": 1.3,
            "people": [{"person_id": [-1], "pose_keypoints_2d": p.ravel().round(3).tolist()} for p in kp],
        }
        (directory / f"bench_{i:012d}_keypoints.json").write_text(json.dumps(doc))


def bench_clip(clip: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every backend on the first `--frames` frames of `clip`; returns the clip's result record."""
    crop = tuple(int(v) for v in args.crop.split(",")) if args.crop else None
    frames = decode(clip, args.frames, args.start, crop)  # type: ignore[arg-type]
    h, w = frames[0].shape[:2]
    rows: list[dict[str, Any]] = []
    replay: list[np.ndarray] | None = None

    for size in args.sizes.split(","):
        iw, ih = (int(v) for v in size.lower().split("x"))
        b = create_backend("opencv-openpose", input_width=iw, input_height=ih)
        row, skeletons = run(b, frames, args.warmup)
        rows.append({"backend": "opencv-openpose", "input": f"{iw}x{ih}", **row})
        replay = replay or skeletons
        b.close()

    with tempfile.TemporaryDirectory() as tmp:
        write_json_dir(Path(tmp), replay or [])
        b = create_backend("openpose-json", directory=tmp)
        # the counter-indexed backend reads file i on call i: warm-up would shift it, so none here
        rows.append({"backend": "openpose-json", "input": "json", **run(b, frames, 0)[0]})
        b.close()

    for name in ("mediapipe", "openpose"):
        try:
            b = create_backend(name)
        except StageError as e:
            rows.append({"backend": name, "input": "-", "unavailable": str(e).split(";")[0]})
            continue
        rows.append({"backend": name, "input": "native", **run(b, frames, args.warmup)[0]})
        b.close()

    print(f"\n{clip.name} ({w}x{h}{', crop ' + args.crop if crop else ''}, {len(frames)} frames)")
    print(f"{'backend':<17}{'input':<9}{'ms/frame':>9}{'fps':>7}{'forward':>9}{'grouping':>10}{'people':>8}")
    for r in rows:
        if "unavailable" in r:
            print(f"{r['backend']:<17}{'-':<9}  unavailable: {r['unavailable'][:70]}")
            continue
        fw = f"{r['forward_ms_median']:.1f}" if "forward_ms_median" in r else "-"
        gr = f"{r['grouping_ms_median']:.1f}" if "grouping_ms_median" in r else "-"
        print(
            f"{r['backend']:<17}{r['input']:<9}{r['ms_median']:>9.1f}{r['fps']:>7.1f}{fw:>9}{gr:>10}"
            f"{r['people_mean']:>8.1f}"
        )
    return {
        "clip": clip.name,
        "frame_size": f"{w}x{h}",
        "crop": args.crop,
        "frames": len(frames),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", type=Path, action="append", help="repeatable (default: samples/vtest.avi)")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--start", type=int, default=0, help="first frame index used")
    ap.add_argument("--crop", default=None, help="x0,y0,x1,y1 (e.g. 320,0,640,240 for fall-01-cam0)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sizes", default="432x368", help="opencv-openpose input sizes, WxH comma list")
    ap.add_argument("--threads", type=int, default=None, help="cv2.setNumThreads (default: OpenCV's)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pose_fps.json")
    args = ap.parse_args()

    if args.threads is not None:
        cv2.setNumThreads(args.threads)
    load_start = os.getloadavg()[0]
    runs = [bench_clip(c, args) for c in (args.clip or [REPO / "samples" / "vtest.avi"])]
    machine = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "cv2_threads": cv2.getNumThreads(),
        # the CPU may be shared: a 1-minute load above the CPU count inflates every number
        "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "runs": runs}, indent=2) + "\n")
    print(
        f"\n{machine['cpus']} CPUs ({machine['processor']}), cv2 threads {machine['cv2_threads']}, "
        f"load avg {machine['loadavg_1m']}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
