"""The worker side of `veilcam batch`: a clip (or one segment of a long clip) through capture, pose,
tracking and sealed windows — the very stages `veilcam replay` runs — returning ciphertext only.

This runs inside a Ray task on any node of the data owner's cluster. The data key is read there
from `data_key_path` (a file provisioned on every node, like on a capture host); it never travels
through Ray. What comes back is `SealedWindow`s (AES-GCM ciphertext + cleartext header).

Segments. A long clip is cut at multiples of the window stride into segments of about
`segment_frames` frames. Segment k *owns* the windows that end at frames [start, end); it runs pose
from `start − overlap` (overlap = the window length rounded up to whole strides, ≥ one window), so
its first owned window has full history and lies on the same stride grid as an unsplit replay's.
Windows ending before `start` are the previous segment's (dropped here as duplicates). The final,
shifted-back window at end of stream is made only by the segment that reaches the end of the clip.
A window's `seq` is `seq_base + (frame index of its last frame) + 1`, so every segment of a clip
numbers its windows without coordination, increasing in media order as the enclave requires; the
driver reserves `seq_base` per clip and run (fresh numbers on a rerun, never reused).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from config.files import load_data_key_from_config
from config.schema import CameraConfig, VeilcamConfig
from pipeline.app.daemon import PoseStage, window_params
from pipeline.errors import VeilcamError
from pipeline.messages import EndOfStream, Frame, PoseFrame, SealedWindow
from pipeline.queues import BoundedQueue, QueueClosed, QueueTimeout
from pipeline.stats import CameraStats
from stages.capture import CaptureStage
from stages.windowing import Windower

log = logging.getLogger(__name__)

SEQ_BLOCK = 2**36  # window numbers reserved per clip and run (frame index + 1 must stay below)


@dataclass(frozen=True, slots=True)
class SegmentSpec:
    """One unit of Ray work: frames [start, end) of `clip` are owned (end None = to the end)."""

    clip: str  # absolute path (the same on every node: shared storage)
    device: str
    index: int
    count: int
    start: int
    end: int | None
    warmup_from: int  # first frame pose runs on (start − overlap, ≥ 0)
    seq_base: int
    frames_estimate: int  # owned frames, for the progress bar

    @property
    def key(self) -> str:
        return f"{self.device}#{self.index}"


@dataclass(frozen=True, slots=True)
class SegmentOutput:
    """What a segment task returns: sealed windows it owns (media order) and counts."""

    spec: SegmentSpec
    windows: list[SealedWindow]
    window_frames: list[int]  # frame index of each window's last frame
    frames_owned: int
    frames_posed: int
    end_reason: str
    error: str | None
    warning: str | None
    pose_s: float  # summed pose latency (work), seconds
    wall_s: float  # in-task wall time
    node: str
    pid: int
    counters: dict[str, int] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)  # per stage: summed work (capture = decode)
    cpu_s: float = 0.0  # CPU time of the task (user + system)


def plan_segments(
    clip: str,
    device: str,
    frames_estimate: int,
    *,
    segment_frames: int,
    length_frames: int,
    stride_frames: int,
    seq_base: int,
) -> list[SegmentSpec]:
    """Cut a clip of about `frames_estimate` frames (after the fps throttle) into segments.

    Boundaries are multiples of the stride (the unsplit window grid); a clip shorter than 1.5
    segments stays whole. Overlap = ceil(T / stride) · stride ≥ T frames: the first owned window of
    a segment sees exactly the frames an unsplit replay's window there would.
    """
    if segment_frames <= 0 or frames_estimate <= segment_frames * 1.5:
        return [SegmentSpec(clip, device, 0, 1, 0, None, 0, seq_base, max(frames_estimate, 0))]
    overlap = math.ceil(length_frames / stride_frames) * stride_frames
    step = max(stride_frames, (segment_frames // stride_frames) * stride_frames)
    starts = list(range(0, frames_estimate, step))
    if len(starts) > 1 and frames_estimate - starts[-1] < step // 2:
        starts.pop()  # a short tail joins the previous segment
    specs = []
    for i, s in enumerate(starts):
        last = i == len(starts) - 1
        end = None if last else starts[i + 1]
        owned = (frames_estimate if end is None else end) - s
        specs.append(
            SegmentSpec(clip, device, i, len(starts), s, end, max(0, s - overlap), seq_base, max(owned, 0))
        )
    return specs


class _FrameSeq:
    """`SeqCounter` stand-in for `Windower`: seq = base + index of the window's last frame + 1."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.frame = -1

    def next(self) -> int:
        return self.base + self.frame + 1


def segment_camera(cfg: VeilcamConfig, spec: SegmentSpec) -> CameraConfig:
    """The clip's camera settings for this segment: capture stops at `end`, pose in this process
    (the Ray worker is already a separate process; a child per task would only add overhead)."""
    name = next(iter(cfg.cameras))
    cam = cfg.cameras[name]
    params = window_params(cfg, cam)
    update: dict[str, Any] = {
        "source": spec.clip,
        "live": False,
        "realtime": False,
        "loop": False,
        "pose": cam.pose.model_copy(update={"in_process": True, "shared": False}),
    }
    if params.fps is not None and cam.fps is None:
        update["fps"] = params.fps  # as CameraPipeline does: the model's fps throttles capture
    if spec.end is not None:
        update["max_frames"] = min(spec.end, cam.max_frames) if cam.max_frames else spec.end
    return cam.model_copy(update=update)


def run_segment(
    spec: SegmentSpec,
    cfg: VeilcamConfig,
    *,
    on_frames: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> SegmentOutput:
    """Capture → pose → tracking + sealed windows for one segment, in this process.

    `on_frames(n)` is told the number of owned frames posed so far (progress). Errors of the source
    (missing, undecodable) come back in `error`, not as exceptions, so the run goes on.
    """
    t_start = time.monotonic()
    cpu_start = _cpu_s()
    if threads:
        _limit_threads(threads)
    name = next(iter(cfg.cameras))
    cam = segment_camera(cfg, spec)
    params = window_params(cfg, cfg.cameras[name])
    stats = CameraStats(spec.device)
    key = load_data_key_from_config(cfg)
    q = cam.queues
    frames: BoundedQueue[Frame | EndOfStream] = BoundedQueue(q.frames, "block", name="frames")
    to_pose: BoundedQueue[Frame | EndOfStream] = BoundedQueue(q.frames, "block", name="to_pose")
    poses: BoundedQueue[PoseFrame | EndOfStream] = BoundedQueue(q.poses, "block", name="poses")
    capture = CaptureStage(spec.device, cam, frames, stats)
    owned = 0
    posed = 0

    def on_pose(pf: PoseFrame) -> None:
        nonlocal owned, posed
        posed += 1
        if pf.seq >= spec.start:
            owned += 1
            if on_frames is not None and owned % 10 == 0:
                on_frames(owned)

    pose = PoseStage(spec.device, cam, to_pose, poses, stats, on_frame=on_pose)
    counter = _FrameSeq(spec.seq_base)
    windower = Windower(
        spec.device,
        key,
        counter,  # type: ignore[arg-type]  # duck-typed: only next() is used
        length_frames=params.length_frames,
        stride_frames=params.stride_frames,
        persons=params.persons,
        tracker=cam.window.tracker,
        stats=stats,
        flush_partial=cam.window.flush_partial,
        min_frames=cam.window.min_frames,
        min_joints=cam.window.min_joints,
    )
    stop = threading.Event()
    errors: list[BaseException] = []

    def guarded(fn: Callable[[threading.Event], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn(stop)
            except BaseException as e:  # recorded and returned as the segment's error
                errors.append(e)
                for qq in (frames, to_pose, poses):
                    qq.close()

        return run

    def relay(stop_ev: threading.Event) -> None:
        """Frames before the warm-up point are decoded (to find the position) but never posed."""
        for item in frames.drain(stop_ev):
            if isinstance(item, EndOfStream):
                to_pose.put(item)
                return
            if item.seq < spec.warmup_from:
                stats.inc("skipped_warmup")
                continue
            to_pose.put(item)

    threads_ = [
        threading.Thread(target=guarded(capture.run), name=f"capture-{spec.key}", daemon=True),
        threading.Thread(target=guarded(relay), name=f"relay-{spec.key}", daemon=True),
        threading.Thread(target=guarded(pose.run), name=f"pose-{spec.key}", daemon=True),
    ]
    for t in threads_:
        t.start()
    kept: list[SealedWindow] = []
    kept_frames: list[int] = []
    win_timing = stats.stage("windowing")
    last_seq = -1
    end_reason = "error"
    try:
        while True:
            try:
                item = poses.get(timeout_s=0.5)
            except QueueTimeout:
                if errors:
                    break
                continue
            except QueueClosed:
                break
            if isinstance(item, EndOfStream):
                end_reason = item.reason
                truncated_here = item.reason == "max_frames" and spec.end is not None
                if not truncated_here and last_seq >= spec.start:
                    counter.frame = last_seq
                    for w in windower.flush():
                        kept.append(w)
                        kept_frames.append(last_seq)
                break
            last_seq = item.seq
            counter.frame = item.seq
            t_win = time.monotonic()
            made = windower.push(item)
            win_timing.observe(time.monotonic() - t_win)
            for w in made:
                if item.seq >= spec.start and (spec.end is None or item.seq < spec.end):
                    kept.append(w)
                    kept_frames.append(item.seq)
    finally:
        stop.set()
        for qq in (frames, to_pose, poses):
            qq.close()
        pose.close()
        for t in threads_:
            t.join(10)
    if on_frames is not None:
        on_frames(owned)
    error: str | None = None
    if errors:
        e = errors[0]
        error = str(e) if isinstance(e, VeilcamError) else f"{type(e).__name__}: {e}"
    warning = None
    if end_reason == "truncated":
        warning = "the video ended before the frame count its header gives (truncated or corrupt file)"
    pose_stats = stats.stages.get("pose")
    return SegmentOutput(
        spec=spec,
        windows=kept,
        window_frames=kept_frames,
        frames_owned=owned,
        frames_posed=posed,
        end_reason=end_reason,
        error=error,
        warning=warning,
        pose_s=float(pose_stats.snapshot().latency_sum_s) if pose_stats is not None else 0.0,
        wall_s=time.monotonic() - t_start,
        node=socket.gethostname(),
        pid=os.getpid(),
        counters={k: v for k, v in stats.counters.items() if v},
        timings_s={n: float(st.snapshot().latency_sum_s) for n, st in stats.stages.items()},
        cpu_s=_cpu_s() - cpu_start,
    )


def _cpu_s() -> float:
    """CPU seconds of this process (a Ray worker runs one task at a time: the task's CPU)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return float(ru.ru_utime + ru.ru_stime)


def _limit_threads(n: int) -> None:
    """Match OpenCV's and torch's thread pools to the CPUs Ray gave this task (oversubscribing a
    node with N tasks × all-core pools makes every task slower)."""
    import sys

    import cv2

    cv2.setNumThreads(max(1, n))
    torch = sys.modules.get("torch")  # only when a backend uses it: importing it costs seconds
    if torch is not None:
        torch.set_num_threads(max(1, n))


__all__ = ["SEQ_BLOCK", "SegmentOutput", "SegmentSpec", "plan_segments", "run_segment", "segment_camera"]
