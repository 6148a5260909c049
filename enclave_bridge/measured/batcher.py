"""Cross-camera batching in the enclave: windows that queue up while the evaluator is busy are
evaluated together in one `evaluate((N, 3, T, V, M))` call.

Why: per enclave core, one pass over N windows costs less than N passes (one set of worker round
trips, GEMMs over N× the rows, per-stage fixed costs paid once). Each connection thread hands its
window to one evaluation thread and waits for its own row of logits, so nothing but the stacked
input is shared: masks are drawn per stage over the whole batch (fresh, uniform, never reused — the
same as for one window), and labels, rules and alerts stay per window and per device in the caller.
Only windows of one shape are stacked; a batch never waits for more windows than are already
queued (no added latency when the enclave is idle).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

_Windows = npt.NDArray[np.float32]  # one window (3, T, V, M) or a stack (N, 3, T, V, M)
_Logits = npt.NDArray[np.float64]  # (num_class,) for one window
_Item = tuple[_Windows, Future[_Logits]]  # a queued window and where its logits go


@dataclass
class BatchStats:
    batches: int = 0
    windows: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size → count


class WindowBatcher:
    """`evaluate_one(x)` from many threads → batched `evaluate(stack)` on one thread."""

    def __init__(
        self, evaluate: Callable[[_Windows], npt.NDArray[np.floating[Any]]], max_batch: int = 4
    ) -> None:
        if not 1 <= max_batch <= 64:
            raise ValueError("max_batch must be in 1..64")
        self._evaluate = evaluate
        self.max_batch = max_batch
        self._q: queue.Queue[_Item | None] = queue.Queue()
        self._held: deque[_Item] = deque()  # other shapes, next time
        self.stats = BatchStats()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="enclave-batcher", daemon=True)
        self._closed = False
        self._thread.start()

    def evaluate_one(self, x: _Windows) -> _Logits:
        """Logits (num_class,) of one window (3, T, V, M); the evaluator's errors are raised here."""
        if self._closed:
            raise RuntimeError("batcher closed")
        fut: Future[_Logits] = Future()
        self._q.put((np.ascontiguousarray(x), fut))
        return fut.result()

    def _next_batch(self) -> list[_Item] | None:
        first = self._held.popleft() if self._held else self._q.get()
        if first is None:
            return None
        batch = [first]
        shape = first[0].shape
        keep: deque[_Item] = deque()
        while self._held and len(batch) < self.max_batch:
            item = self._held.popleft()
            (batch if item[0].shape == shape else keep).append(item)
        while len(batch) < self.max_batch:
            try:
                queued = self._q.get_nowait()
            except queue.Empty:
                break
            if queued is None:
                self._q.put(None)  # close after this batch
                break
            (batch if queued[0].shape == shape else keep).append(queued)
        self._held.extendleft(reversed(keep))
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                logits = np.asarray(self._evaluate(np.stack([x for x, _ in batch])), dtype=np.float64)
            except Exception as e:
                if len(batch) == 1:
                    batch[0][1].set_exception(e)
                else:  # one bad window (e.g. non-finite values) must not fail the others: one by one
                    self._one_by_one(batch)
                continue
            with self._lock:
                s = self.stats
                s.batches += 1
                s.windows += len(batch)
                s.largest = max(s.largest, len(batch))
                s.sizes[len(batch)] = s.sizes.get(len(batch), 0) + 1
            for i, (_, fut) in enumerate(batch):
                fut.set_result(logits[i])

    def _one_by_one(self, batch: list[_Item]) -> None:
        for x, fut in batch:
            try:
                fut.set_result(np.asarray(self._evaluate(x[None]), dtype=np.float64)[0])
            except Exception as e:
                fut.set_exception(e)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._q.put(None)
            self._thread.join(timeout=10)


__all__ = ["BatchStats", "WindowBatcher"]
