"""Stage threads under supervision: restart after a failure with backoff, within a Frigate-style
budget (default 5 restarts / 60 s); past the budget the camera is marked failed and the rest of the
daemon keeps running."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from config.schema import SupervisorConfig
from pipeline.errors import VeilcamError
from pipeline.queues import QueueClosed
from pipeline.stats import CameraStats

log = logging.getLogger(__name__)


@dataclass
class _Task:
    name: str
    target: Callable[[threading.Event], None]
    stop: threading.Event
    thread: threading.Thread | None = None
    restarts: deque[float] = field(default_factory=deque)
    state: str = "pending"  # running | done | failed
    error: BaseException | None = None


class Supervisor:
    """Runs stage loops in threads; restarts a failed one with backoff within a budget.

    A stage returning normally is done. A stage raising is restarted after `backoff_s` (doubling)
    unless it already restarted `max_restarts` times within `window_s` — then it is failed and
    `on_failed(task_name, error)` runs (the camera pipeline closes its queues).
    """

    def __init__(
        self,
        camera_id: str,
        cfg: SupervisorConfig,
        stats: CameraStats,
        on_failed: Callable[[str, BaseException], None],
        *,
        max_restarts: int | None = None,
    ) -> None:
        self.camera_id = camera_id
        self.cfg = cfg
        self.stats = stats
        self.on_failed = on_failed
        self.max_restarts = cfg.max_restarts if max_restarts is None else max_restarts
        self.tasks: list[_Task] = []

    def add(self, name: str, target: Callable[[threading.Event], None], stop: threading.Event) -> None:
        self.tasks.append(_Task(name, target, stop))

    def start(self) -> None:
        for task in self.tasks:
            task.state = "running"
            task.thread = threading.Thread(
                target=self._loop, args=(task,), name=f"veilcam-{self.camera_id}-{task.name}", daemon=True
            )
            task.thread.start()

    def _loop(self, task: _Task) -> None:
        backoff = self.cfg.backoff_s
        while True:
            try:
                task.target(task.stop)
                task.state = "done"
                return
            except QueueClosed:
                task.state = "done"
                return
            except Exception as e:
                now = time.monotonic()
                while task.restarts and task.restarts[0] < now - self.cfg.window_s:
                    task.restarts.popleft()
                if isinstance(e, VeilcamError):
                    log.error("camera %s: stage %s failed: %s", self.camera_id, task.name, e)
                else:
                    log.exception("camera %s: stage %s crashed", self.camera_id, task.name)
                if len(task.restarts) >= self.max_restarts or task.stop.is_set():
                    task.state = "failed"
                    task.error = e
                    if not task.stop.is_set():
                        log.error(
                            "camera %s: stage %s gave up after %d restarts in %.0f s",
                            self.camera_id,
                            task.name,
                            len(task.restarts),
                            self.cfg.window_s,
                        )
                    self.on_failed(task.name, e)
                    return
                task.restarts.append(now)
                self.stats.inc("stage_restarts")
                log.warning(
                    "camera %s: restarting stage %s in %.1f s (%d/%d in %.0f s)",
                    self.camera_id,
                    task.name,
                    backoff,
                    len(task.restarts),
                    self.max_restarts,
                    self.cfg.window_s,
                )
                if task.stop.wait(backoff):
                    task.state = "done"
                    return
                backoff = min(backoff * 2, 30.0)

    def join(self, timeout_s: float | None = None) -> bool:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for task in self.tasks:
            if task.thread is None:
                continue
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            task.thread.join(remaining)
        return all(t.thread is None or not t.thread.is_alive() for t in self.tasks)

    def alive(self) -> bool:
        return any(t.thread is not None and t.thread.is_alive() for t in self.tasks)


__all__ = ["Supervisor"]
