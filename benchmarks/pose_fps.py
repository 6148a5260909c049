"""Frames per second of every pose backend and input size on sample clips, in one interleaved run.

    python benchmarks/pose_fps.py [--clip samples/vtest.avi] [--frames 30]
        [--backends opencv-openpose,openvino-openpose,openvino-openpose:f32]
        [--sizes 432x368,320x272,person=80]

Every (backend, size) pair of the OpenPose-graph runtimes runs on every frame in turn — frame 1 on
each, then frame 2 on each, … — so a machine shared with other jobs slows all of them alike and
the ratios stay meaningful even when the absolute numbers do not. `openvino-openpose:f32` is the
same backend forced to float32. A size is `WxH` (the frame is stretched to it) or `person=H`
(expected person height H px in the frame; the input size follows from it, aspect kept).

Per row: ms/frame split into network forward and PAF grouping, people per frame, `vs_opencv` (its
fps over opencv-openpose's at the same size), and its agreement with opencv-openpose at the same
size on the same frames (people matched one to one, mean joint distance in image pixels).
`openpose-json` replays the skeletons opencv-openpose found, in OpenPose's `--write_json` format,
so its number is the cost of reading real-sized files. Backends that are not installed are listed
with the reason. Decoding is excluded (frames are decoded up front). `--stability` adds the
yardstick for the agreement columns: opencv-openpose against itself on the same frames re-encoded
as JPEG quality 95 (`@jpeg95`) and with ±1 grey-level noise (`@noise1`) — imperceptible changes
that already flip borderline people. Writes `benchmarks/results/pose_fps.json`.

Why one module of ~440 lines: one script run and read as a whole; the interleaving, agreement and
shared-server rows share the decoded frames and the report format.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from enclave_bridge.shared.errors import StageError  # noqa: E402
from stages.pose import create_backend  # noqa: E402
from stages.pose.compare import Agreement  # noqa: E402

NET_BACKENDS = ("opencv-openpose", "openvino-openpose")


def decode(
    clip: Path, n: int, start: int, crop: tuple[int, int, int, int] | None, step: int = 1
) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(clip))
    if not cap.isOpened():
        raise SystemExit(f"cannot open {clip}")
    frames: list[np.ndarray] = []
    i = 0
    while len(frames) < n:
        ok, img = cap.read()
        if not ok:
            break
        if i >= start and (i - start) % step == 0:
            if crop:
                x0, y0, x1, y1 = crop
                img = np.ascontiguousarray(img[y0:y1, x0:x1])
            frames.append(img)
        i += 1
    cap.release()
    if not frames:
        raise SystemExit(f"no frames decoded from {clip}")
    return frames


def size_options(size: str) -> dict[str, Any]:
    """'432x368' → input_width/height; 'person=80' → person_height_px."""
    if size.startswith("person="):
        return {"person_height_px": float(size.split("=", 1)[1])}
    iw, ih = (int(v) for v in size.lower().split("x"))
    return {"input_width": iw, "input_height": ih}


def backend_options(spec: str) -> tuple[str, dict[str, Any]]:
    """'openvino-openpose:f32' → ('openvino-openpose', {'precision': 'f32'})."""
    name, _, precision = spec.partition(":")
    return name, ({"precision": precision} if precision else {})


def summarize(totals: list[float], fwd: list[float], grp: list[float], people: list[int]) -> dict[str, Any]:
    med = statistics.median(totals)
    row: dict[str, Any] = {
        "frames": len(totals),
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
    return row


def run(backend: Any, frames: list[np.ndarray], warmup: int) -> tuple[dict[str, Any], list[np.ndarray]]:
    """One backend alone: per-frame wall time (and forward/grouping split), skeletons."""
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
    return summarize(totals, fwd, grp, people), skeletons


def run_interleaved(
    configs: list[tuple[str, str, Any]], frames: list[np.ndarray], warmup: int
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], list[np.ndarray]]]:
    """Every config on frame 1, then every config on frame 2, …; rows and skeletons per config."""
    for _, _, b in configs:
        for img in frames[:warmup]:
            b.infer(img)
    acc: dict[tuple[str, str], dict[str, list[Any]]] = {
        (s, z): {"t": [], "f": [], "g": [], "p": [], "k": []} for s, z, _ in configs
    }
    for img in frames:
        for spec, size, b in configs:
            a = acc[(spec, size)]
            t0 = time.perf_counter()
            kp = b.infer(img)
            a["t"].append(time.perf_counter() - t0)
            a["f"].append(b.last_timing["forward_s"])
            a["g"].append(b.last_timing["grouping_s"])
            a["p"].append(len(kp))
            a["k"].append(kp)
    rows = []
    h, w = frames[0].shape[:2]
    for spec, size, b in configs:
        a = acc[(spec, size)]
        iw, ih = b.input_size_for((w, h))
        label = size if size.startswith("person=") else f"{iw}x{ih}"
        row = {
            "backend": spec,
            "input": label,
            "input_px": f"{iw}x{ih}",
            **summarize(a["t"], a["f"], a["g"], a["p"]),
        }
        if hasattr(b, "precision"):
            row["precision"] = b.precision
        rows.append(row)
    return rows, {k: v["k"] for k, v in acc.items()}


PERTURBATIONS = ("jpeg95", "noise1")


def perturb(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """An imperceptible change of the frame: JPEG re-encode at quality 95, or ±1 grey level noise."""
    if kind == "jpeg95":
        _, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        return cv2.imdecode(buf, cv2.IMREAD_COLOR)
    noise = rng.integers(-1, 2, img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def stability_rows(
    configs: list[tuple[str, str, Any]],
    skeletons: dict[tuple[str, str], list[np.ndarray]],
    frames: list[np.ndarray],
    match_px: float,
) -> list[dict[str, Any]]:
    """The yardstick for 'same people': opencv-openpose against itself on imperceptibly changed
    frames (first size only). Borderline people flip under such changes too; a faster runtime
    whose agreement is within this spread is as close as the reference is to itself."""
    ref = next(((s, z, b) for s, z, b in configs if s == "opencv-openpose"), None)
    if ref is None:
        return []
    spec, size, b = ref
    rng = np.random.default_rng(0)
    out = []
    for kind in PERTURBATIONS:
        ag = Agreement(match_px=match_px)
        people = []
        for img, r in zip(frames, skeletons[(spec, size)], strict=True):
            kp = b.infer(perturb(img, kind, rng))
            people.append(len(kp))
            ag.add(r, kp)
        out.append(
            {
                "backend": f"{spec}@{kind}",
                "input": size,
                "input_px": size,
                "frames": len(frames),
                "people_mean": round(statistics.fmean(people), 2),
                "agreement": ag.summary(),
            }
        )
    return out


def write_json_dir(directory: Path, skeletons: list[np.ndarray]) -> None:
    for i, kp in enumerate(skeletons):
        doc = {
            "version": 1.3,
            "people": [{"person_id": [-1], "pose_keypoints_2d": p.ravel().round(3).tolist()} for p in kp],
        }
        (directory / f"bench_{i:012d}_keypoints.json").write_text(json.dumps(doc))


def bench_clip(clip: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every backend × size on the first `--frames` frames of `clip`; returns the clip's record."""
    crop = tuple(int(v) for v in args.crop.split(",")) if args.crop else None
    frames = decode(clip, args.frames, args.start, crop, args.step)  # type: ignore[arg-type]
    h, w = frames[0].shape[:2]
    rows: list[dict[str, Any]] = []
    configs: list[tuple[str, str, Any]] = []
    for spec in args.backends.split(","):
        name, opts = backend_options(spec)
        for size in args.sizes.split(","):
            try:
                b = create_backend(name, threads=args.threads, **opts, **size_options(size))
            except StageError as e:
                rows.append({"backend": spec, "input": size, "unavailable": str(e).split(";")[0]})
                break
            configs.append((spec, size, b))
    net_rows, skeletons = run_interleaved(configs, frames, args.warmup)
    by_key = {(r["backend"], r["input"]): r for r in net_rows}
    for (spec, size, _), row in zip(configs, net_rows, strict=True):
        ref_key = ("opencv-openpose", size)
        if spec != "opencv-openpose" and ref_key in skeletons:
            ref_row = by_key[("opencv-openpose", row["input"])]
            row["vs_opencv"] = round(row["fps"] / ref_row["fps"], 2)
            agreement = Agreement(match_px=args.match_px)
            for ref_kp, cand_kp in zip(skeletons[ref_key], skeletons[(spec, size)], strict=True):
                agreement.add(ref_kp, cand_kp)
            row["agreement"] = agreement.summary()
    if args.stability:
        net_rows += stability_rows(configs, skeletons, frames, args.match_px)
    rows = net_rows + rows
    for _, _, b in configs:
        b.close()
    replay = next((skeletons[(s, z)] for s, z, _ in configs if s == "opencv-openpose"), None)
    replay = replay or next(iter(skeletons.values()), None)

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
    print(
        f"{'backend':<23}{'input':<12}{'px':<9}{'ms/frame':>9}{'fps':>7}{'forward':>9}{'grouping':>10}"
        f"{'people':>8}{'vs cv':>7}{'same P':>8}{'matched':>9}{'joint px':>9}"
    )
    for r in rows:
        if "unavailable" in r:
            print(f"{r['backend']:<23}{r['input']:<12}  unavailable: {r['unavailable'][:70]}")
            continue
        if "ms_median" not in r:  # a stability row: agreement only
            ag = r["agreement"]
            print(
                f"{r['backend']:<23}{r['input']:<12}{r['input_px']:<9}{'-':>9}{'-':>7}{'-':>9}{'-':>10}"
                f"{r['people_mean']:>8.2f}{'-':>7}{ag['same_people_count_share']:>8.2f}"
                f"{ag['ref_people_matched_share']:>9.2f}{ag['mean_joint_distance_px']:>9.2f}"
            )
            continue
        fw = f"{r['forward_ms_median']:.1f}" if "forward_ms_median" in r else "-"
        gr = f"{r['grouping_ms_median']:.1f}" if "grouping_ms_median" in r else "-"
        vs = f"{r['vs_opencv']:.2f}" if "vs_opencv" in r else "-"
        ag = r.get("agreement")
        agree = (
            f"{ag['same_people_count_share']:>8.2f}{ag['ref_people_matched_share']:>9.2f}"
            f"{ag['mean_joint_distance_px']:>9.2f}"
            if ag
            else f"{'-':>8}{'-':>9}{'-':>9}"
        )
        print(
            f"{r['backend']:<23}{r['input']:<12}{r.get('input_px', '-'):<9}{r['ms_median']:>9.1f}"
            f"{r['fps']:>7.1f}{fw:>9}{gr:>10}{r['people_mean']:>8.2f}{vs:>7}{agree}"
        )
    return {
        "clip": clip.name,
        "frame_size": f"{w}x{h}",
        "crop": args.crop,
        "frames": len(frames),
        "rows": rows,
    }


def rss_mb(pid: int | None) -> float:
    """Resident memory of a process (Linux /proc), MB; 0 when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def bench_shared(clip: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """N cameras (threads, each waiting for its answer like the daemon's pose stage) served by one
    shared pose process vs by N processes of their own; total frames/s, per-camera spread, RSS."""
    from pipeline.messages import Frame
    from stages.pose.server import PoseServer

    frames = decode(clip, max(4, args.shared_frames // 4), args.start, None, args.step)
    name, opts = backend_options(args.backends.split(",")[1 if "," in args.backends else 0])
    opts = {**opts, "threads": args.threads} if args.threads is not None else opts
    rows = []
    for n in (int(v) for v in args.shared.split(",")):
        for mode in ("shared", "separate"):
            servers = [PoseServer(name, opts) for _ in range(1 if mode == "shared" else n)]
            for srv in servers:
                srv.start()
            per_cam = [0] * n

            def camera(i: int, srv: PoseServer, per_cam: list[int] = per_cam) -> None:
                for k in range(args.shared_frames):
                    srv.submit(Frame(f"cam{i}", k, 0.0, 0.0, frames[k % len(frames)])).result(timeout=600)
                    per_cam[i] += 1

            for i in range(n):  # warm-up: one frame per camera
                servers[i % len(servers)].submit(Frame(f"cam{i}", -1, 0.0, 0.0, frames[0])).result(
                    timeout=600
                )
            threads = [threading.Thread(target=camera, args=(i, servers[i % len(servers)])) for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            rss = sum(rss_mb(srv.pid) for srv in servers)
            batches = sum(srv.stats.batches for srv in servers)
            done = sum(srv.stats.frames for srv in servers)
            for srv in servers:
                srv.close()
            rows.append(
                {
                    "cameras": n,
                    "mode": mode,
                    "processes": len(servers),
                    "backend": name + (f":{opts['precision']}" if "precision" in opts else ""),
                    "fps_total": round(n * args.shared_frames / wall, 2),
                    "fps_per_camera_min": round(min(per_cam) / wall, 2),
                    "mean_batch": round(done / max(1, batches), 2),
                    "rss_mb_total": rss,
                }
            )
    print(f"\n{clip.name}: N cameras through one shared pose process vs one process each")
    print(
        f"{'cameras':>8}{'mode':>10}{'procs':>7}{'fps total':>11}{'min cam fps':>13}{'batch':>7}{'RSS MB':>9}"
    )
    for r in rows:
        print(
            f"{r['cameras']:>8}{r['mode']:>10}{r['processes']:>7}{r['fps_total']:>11.2f}"
            f"{r['fps_per_camera_min']:>13.2f}{r['mean_batch']:>7.2f}{r['rss_mb_total']:>9.1f}"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", type=Path, action="append", help="repeatable (default: samples/vtest.avi)")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--start", type=int, default=0, help="first frame index used")
    ap.add_argument("--step", type=int, default=1, help="use every step-th frame (spread over the clip)")
    ap.add_argument("--crop", default=None, help="x0,y0,x1,y1 (e.g. 320,0,640,240 for fall-01-cam0)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--stability",
        action="store_true",
        help="also opencv-openpose vs itself on JPEG-q95 / ±1-grey-level copies (yardstick for agreement)",
    )
    ap.add_argument(
        "--backends",
        default="opencv-openpose,openvino-openpose,openvino-openpose:f32",
        help="comma list of OpenPose-graph backends; NAME:f32/bf16 forces openvino's precision",
    )
    ap.add_argument("--sizes", default="432x368", help="comma list of WxH or person=H (px)")
    ap.add_argument("--threads", type=int, default=None, help="runtime threads (default: the runtime's)")
    ap.add_argument(
        "--match-px", type=float, default=10.0, help="agreement: max mean joint distance of a pair"
    )
    ap.add_argument("--shared", default=None, help="also compare shared vs per-camera processes, e.g. 1,2,4")
    ap.add_argument("--shared-frames", type=int, default=20, help="frames per camera in --shared runs")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pose_fps.json")
    args = ap.parse_args()

    if args.threads is not None:
        cv2.setNumThreads(args.threads)
    load_start = os.getloadavg()[0]
    clips = args.clip or [REPO / "samples" / "vtest.avi"]
    runs = [bench_clip(c, args) for c in clips]
    shared = bench_shared(clips[0], args) if args.shared else None
    try:
        import openvino

        ov_version = openvino.__version__
    except ImportError:
        ov_version = None
    machine = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "openvino": ov_version,
        "cv2_threads": cv2.getNumThreads(),
        # the CPU may be shared: a 1-minute load above the CPU count inflates every number
        "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "runs": runs, "shared": shared}, indent=2) + "\n")
    print(
        f"\n{machine['cpus']} CPUs ({machine['processor']}), cv2 threads {machine['cv2_threads']}, "
        f"openvino {ov_version}, load avg {machine['loadavg_1m']}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
