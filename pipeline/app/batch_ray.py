"""The Ray side of a batch run: joining or starting Ray, the segment task, progress, the bar."""

from __future__ import annotations

import logging
import os
from typing import Any

from config.schema import VeilcamConfig
from pipeline.app.batch_segments import SegmentOutput, SegmentSpec, run_segment
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


class FrameProgress:
    """Ray actor: owned frames posed per segment (max, so a retried segment does not count twice)."""

    def __init__(self) -> None:
        self.frames: dict[str, int] = {}

    def report(self, key: str, n: int) -> None:
        self.frames[key] = max(self.frames.get(key, 0), int(n))

    def total(self) -> int:
        return sum(self.frames.values())


def segment_task(
    spec: SegmentSpec, cfg_doc: dict[str, Any], progress: Any, threads: int | None
) -> SegmentOutput:
    """Ray task body: rebuild the config (validated again on the node) and run the segment."""
    logging.getLogger().setLevel(logging.WARNING)
    cfg = VeilcamConfig.model_validate(cfg_doc)

    def on_frames(n: int) -> None:
        if progress is not None:
            progress.report.remote(spec.key, n)

    return run_segment(spec, cfg, on_frames=on_frames, threads=threads)


def warm_up() -> int:
    """Ray task: nothing but the imports of this module tree (deserialising it does them), so
    workers pay their cold start while the driver plans the run and loads the evaluator."""
    return os.getpid()


def connect_ray(address: str = "auto", local_cpus: int | None = None) -> str:
    """Join or start Ray; returns what happened ("joined ADDRESS", "local", "already")."""
    import ray

    if ray.is_initialized():
        return "already"
    quiet: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address not in ("auto", "local"):
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ConfigError(f"--ray {address}: cannot join the Ray cluster: {e}") from e
        return f"joined {address}"
    if address == "auto":  # reads RAY_ADDRESS, else the address `ray start --head` left on this host
        try:
            ray.init(address="auto", **quiet)
            return "joined running cluster"
        except (ConnectionError, RuntimeError) as e:
            log.info("batch: no running Ray cluster to join (%s); starting a local one", e)
    ray.init(
        num_cpus=local_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        **quiet,
    )
    return "local"


class NoBar:
    def update(self, n: int = 1) -> None:
        return None

    def grow(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None


class FrameBar:
    """tqdm over frames of all clips; its total grows as clips are planned."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc="batch", unit="frame", dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def grow(self, n: int) -> None:
        self._bar.total = (self._bar.total or 0) + n
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def progress_bar(total: int, enabled: bool) -> Any:
    return FrameBar(total) if enabled else NoBar()


__all__ = ["FrameBar", "FrameProgress", "NoBar", "connect_ray", "progress_bar", "segment_task", "warm_up"]
