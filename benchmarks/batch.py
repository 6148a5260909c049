"""`veilcam batch` on a local Ray vs sequential `veilcam replay`, Ray's per-clip overhead, and a
projection for an archive of 50 cameras × 720 h (issue 18).

    python benchmarks/batch.py [--frames 100] [--workers 2] [--clip PATH ...]

1. Speed-up: the same clips (default: 4 shared sample clips, each cut at `--frames` frames after
   the 10 fps throttle) replayed one after the other through `pipeline.app.replay.run_replay` (the
   code of `veilcam replay`: pose in a child process, all cores for OpenCV), then through
   `run_batch` on a local Ray with `--workers` CPUs (one task per clip, 1 CPU each). Frames/s of
   both, their ratio, and whether the alerts are identical (clip, t0, t1, label, score, track).
   Ray's start is timed apart (paid once per run, not per clip).
2. Overhead per clip: dispatch→result latency of each task minus its in-task wall time
   (scheduling, argument and result transfer), plus the in-task set-up (config, key, pose model,
   not counted in per-frame work), as a fraction of a 30-s clip's pose time (300 frames × the
   measured pose time per frame). At most `--workers` tasks are in flight, so no task waits in
   Ray's queue and the latency is not inflated by queueing.
3. Projection: per-frame work measured in the Ray run (decode, pose, windowing, enclave per
   frame) → core-seconds per frame → wall time for 50 × 720 h × 36,000 frames/h on N nodes of a
   stated size, CPU pose (measured) and GPU pose (an assumed GPU pose rate, stated as such: no
   GPU here).

The machine is shared: the load average before and after each phase is recorded; contention
slows both runs, but not alike (see the note in the output). Writes
`benchmarks/results/batch.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "samples"
DEFAULT_CLIPS = [
    REPO / "samples" / "vtest.avi",
    SHARED / "exercise.avi",
    SHARED / "real" / "gmdcsa_s1_fall14_backward.mp4",
    SHARED / "skateboarding.mp4",
]
ARCHIVE_FRAMES = 50 * 720 * 36_000  # 50 cameras × 720 h × 36,000 frames/h (10 fps)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def alert_tuple(clip: str, a: dict[str, Any], track_key: str) -> tuple[Any, ...]:
    return (
        str(Path(clip).resolve()),
        round(float(a["t0"]), 4),
        round(float(a["t1"]), 4),
        str(a["label"]),
        round(float(a["score"]), 5),
        int(a[track_key]),
    )


def sequential(clips: list[str], frames: int, state: Path) -> dict[str, Any]:
    import resource

    from pipeline.app.replay import replay_config, run_replay

    def cpu() -> float:  # this process + its reaped children (the pose child processes)
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    out: dict[str, Any] = {"load_before": load(), "alerts": [], "frames": 0, "per_clip": []}
    cpu0 = cpu()
    t = time.monotonic()
    for i, clip in enumerate(clips):
        cfg = replay_config(clip, state_dir=state / f"seq-{i}", overrides={"max_frames": frames})
        t_clip = time.monotonic()
        r = run_replay(clip, cfg, progress=False)
        if r.error:
            raise SystemExit(f"replay {clip}: {r.error}")
        out["frames"] += r.frames
        out["alerts"] += [alert_tuple(clip, a, "track_id") for a in r.alerts]
        pose = r.stages.get("pose")
        out["per_clip"].append(
            {
                "clip": Path(clip).name,
                "frames": r.frames,
                "wall_s": round(time.monotonic() - t_clip, 3),
                "pose_s": round(pose.latency_sum_s, 3) if pose else None,
            }
        )
    out["wall_s"] = time.monotonic() - t
    out["cpu_s"] = round(cpu() - cpu0, 2)
    out["cpu_s_per_frame"] = round(out["cpu_s"] / max(out["frames"], 1), 4)
    out["frames_per_s"] = out["frames"] / out["wall_s"]
    out["load_after"] = load()
    return out


def batch(clips: list[str], frames: int, workers: int, state: Path) -> dict[str, Any]:
    from pipeline.app.batch import BatchOptions, connect_ray, run_batch
    from pipeline.app.batch_report import read_report

    t = time.monotonic()
    connect_ray("local", workers)
    ray_start_s = time.monotonic() - t
    out: dict[str, Any] = {"load_before": load(), "ray_start_s": round(ray_start_s, 2)}
    opts = BatchOptions(
        out=state / "batch.jsonl",
        ray="local",
        local_cpus=workers,
        cpus_per_clip=1.0,
        progress=False,
        max_inflight=workers,
        device_prefix="bench",
        segment_frames=0,
    )
    s = run_batch(clips, None, opts, overrides={"max_frames": frames})
    if s.clips_failed:
        raise SystemExit(f"batch failures: {s.failures}")
    alerts, _ = read_report(opts.out)
    out.update(
        cpu_s=round(sum(o.cpu_s for o in s.outcomes), 2),
        cpu_s_per_frame=round(sum(o.cpu_s for o in s.outcomes) / max(s.frames, 1), 4),
        frames=s.frames,
        wall_s=s.wall_s,
        frames_per_s=s.frames_per_s,
        alerts=[alert_tuple(a["clip"], a, "track") for a in alerts],
        load_after=load(),
        per_clip=[
            {
                "clip": Path(o.clip).name,
                "frames": o.frames,
                "task_wall_s": round(o.task_wall_s, 3),
                "task_latency_s": round(o.task_latency_s, 3),
                "ray_overhead_s": round(o.task_latency_s - o.task_wall_s, 3),
                "first_task_on_its_worker": o.first_task_on_worker,
                "cpu_s": round(o.cpu_s, 2),
                "timings_s": {k: round(v, 3) for k, v in o.timings_s.items()},
            }
            for o in s.outcomes
        ],
    )
    return out


def projection(
    cpu_s_per_frame: float,
    pose_share: float,
    enclave_s_per_frame: float,
    *,
    node_cores: int = 32,
    gpus_per_node: int = 1,
    gpu_pose_fps: float = 400.0,
) -> dict[str, Any]:
    """Wall time of the archive on N nodes from measured per-frame work.

    `cpu_s_per_frame`: CPU seconds of the Ray tasks per frame (decode, pose, tracking, sealing) —
    CPU time, so contention on this machine does not inflate it the way wall time would.
    `pose_share`: pose's part of the tasks' stage time. CPU pose: all of it on cores. GPU pose: pose
    at `gpu_pose_fps` per GPU — an ASSUMPTION (no GPU here) — and the rest on cores; the slower of
    the two sets the rate. `enclave_s_per_frame`: the evaluator's time per frame (one window every
    stride frames), giving how many enclaves keep up.
    """
    non_pose = cpu_s_per_frame * (1.0 - pose_share)
    out: dict[str, Any] = {
        "archive_frames": ARCHIVE_FRAMES,
        "node": f"{node_cores} cores; GPU case: {gpus_per_node} GPU(s) per node",
        "gpu_pose_fps_assumed": gpu_pose_fps,
        "core_s_per_frame_cpu_pose": round(cpu_s_per_frame, 5),
        "core_s_per_frame_non_pose": round(non_pose, 5),
        "enclave_s_per_frame": round(enclave_s_per_frame, 6),
        "rows": [],
    }
    for nodes in (1, 10, 50, 100):
        cpu_fps = nodes * node_cores / cpu_s_per_frame
        gpu_fps = min(nodes * gpus_per_node * gpu_pose_fps, nodes * node_cores / max(non_pose, 1e-9))
        out["rows"].append(
            {
                "nodes": nodes,
                "cpu_pose_frames_per_s": round(cpu_fps, 1),
                "cpu_pose_days": round(ARCHIVE_FRAMES / cpu_fps / 86400, 1),
                "gpu_pose_frames_per_s": round(gpu_fps, 1),
                "gpu_pose_days": round(ARCHIVE_FRAMES / gpu_fps / 86400, 1),
                "enclaves_needed_cpu": max(1, math.ceil(cpu_fps * enclave_s_per_frame)),
                "enclaves_needed_gpu": max(1, math.ceil(gpu_fps * enclave_s_per_frame)),
            }
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", type=Path, action="append", help="repeatable (default: 4 sample clips)")
    ap.add_argument("--frames", type=int, default=100, help="frames per clip after the 10 fps throttle")
    ap.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--order", choices=("seq-first", "ray-first"), default="seq-first")
    ap.add_argument("--node-cores", type=int, default=32, help="projection: cores per node")
    ap.add_argument("--gpus-per-node", type=int, default=1, help="projection: GPUs per node (GPU pose)")
    ap.add_argument(
        "--gpu-pose-fps", type=float, default=400.0, help="projection: ASSUMED pose frames/s per GPU"
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "batch.json")
    args = ap.parse_args()
    clips = [str(c.resolve()) for c in (args.clip or DEFAULT_CLIPS) if c.exists()]
    if not clips:
        raise SystemExit("no clips found")
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="veilcam-bench-batch-") as tmp:
        state = Path(tmp)
        if args.order == "seq-first":
            seq = sequential(clips, args.frames, state)
            ray_run = batch(clips, args.frames, args.workers, state)
        else:
            ray_run = batch(clips, args.frames, args.workers, state)
            seq = sequential(clips, args.frames, state)
    identical = sorted(seq["alerts"]) == sorted(ray_run["alerts"])
    frames = ray_run["frames"]
    sums: dict[str, float] = {}
    for c in ray_run["per_clip"]:
        for k, v in c["timings_s"].items():
            sums[k] = sums.get(k, 0.0) + v
    per_frame = {k: v / frames for k, v in sums.items() if k != "enclave" and frames}
    enclave_per_frame = sums.get("enclave", 0.0) / frames if frames else 0.0
    pose_per_frame = per_frame.get("pose", 0.0)
    clip30_pose_s = 300 * pose_per_frame  # a 30-s clip at 10 fps
    overheads = [c["ray_overhead_s"] for c in ray_run["per_clip"]]
    warm = [c["ray_overhead_s"] for c in ray_run["per_clip"] if not c["first_task_on_its_worker"]]
    cold = [c["ray_overhead_s"] for c in ray_run["per_clip"] if c["first_task_on_its_worker"]]
    non_pose = [c["task_wall_s"] - c["timings_s"].get("pose", 0.0) for c in ray_run["per_clip"]]
    ray_start_per_clip = ray_run["ray_start_s"] / len(clips)
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "clips": [Path(c).name for c in clips],
        "frames_per_clip": args.frames,
        "order": args.order,
        "sequential": {k: v for k, v in seq.items() if k != "alerts"} | {"alerts": len(seq["alerts"])},
        "ray": {k: v for k, v in ray_run.items() if k != "alerts"} | {"alerts": len(ray_run["alerts"])},
        "speedup_frames_per_s": round(ray_run["frames_per_s"] / seq["frames_per_s"], 3),
        "alerts_identical": identical,
        "per_frame_work_s": {k: round(v, 5) for k, v in per_frame.items()},
        "overhead": {
            "ray_per_clip_s": [round(x, 3) for x in overheads],
            "ray_start_s_per_clip_this_run": round(ray_start_per_clip, 3),
            "in_task_non_pose_wall_per_clip_s": [round(x, 3) for x in non_pose],
            "pose_time_30s_clip_s": round(clip30_pose_s, 2),
            "ray_fraction_of_30s_clip_worst": round(max(overheads) / clip30_pose_s, 4)
            if clip30_pose_s
            else None,
            "warm_worker_overhead_s": warm,
            "cold_worker_overhead_s": cold,
            "warm_fraction_of_30s_clip": round(max(warm) / clip30_pose_s, 5)
            if warm and clip30_pose_s
            else None,
            "cold_fraction_of_30s_clip": round(max(cold) / clip30_pose_s, 4)
            if cold and clip30_pose_s
            else None,
        },
        "projection": projection(
            ray_run["cpu_s_per_frame"],
            pose_per_frame / max(sum(per_frame.values()), 1e-9),
            enclave_per_frame,
            node_cores=args.node_cores,
            gpus_per_node=args.gpus_per_node,
            gpu_pose_fps=args.gpu_pose_fps,
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
