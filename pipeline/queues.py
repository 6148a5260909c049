"""Bounded queues with a declared drop rule (docs/ARCHITECTURE.md §2).

Every edge between two stages is a `BoundedQueue` of fixed capacity. The policy says what happens
when the producer is faster than the consumer:

- `drop_oldest` — live capture: the oldest queued item is discarded (counted) so the newest frame
  always gets in and capture never stalls;
- `latest_wins` — windows waiting for a lagging enclave: an item replaces the pending item with
  the same key (or the oldest one when no key matches), counted as coalesced;
- `block` — replay: the producer waits (up to `timeout_s`, forever when None), nothing is dropped,
  so runs are deterministic.

An `EndOfStream` is never dropped or coalesced. Under `drop_oldest`/`latest_wins` it always gets
in at once, even into a full queue (which then holds capacity + 1 items, never more, since nothing
follows the marker), so consumers learn about the end without losing the newest item; under
`block` it waits for space like any item.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from pipeline.errors import StageError
from pipeline.messages import EndOfStream

T = TypeVar("T")

PolicyName = Literal["drop_oldest", "latest_wins", "block"]
POLICIES: tuple[str, ...] = ("drop_oldest", "latest_wins", "block")


class QueueClosed(StageError):
    """`put`/`get` on a queue that was closed (shutdown); carries no item."""


class QueueTimeout(StageError):
    """A blocking `put` did not get space within its timeout."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A snapshot of one queue's counters (exported to /metrics and the MQTT stats topic)."""

    name: str
    policy: str
    capacity: int
    depth: int
    max_depth: int
    put: int
    got: int
    dropped: int
    coalesced: int


class BoundedQueue(Generic[T]):
    """A thread-safe FIFO of fixed `capacity` with a drop `policy` (see module docstring).

    `key` (for `latest_wins`) maps an item to the identity it coalesces on, e.g. a camera or track;
    without it any pending item is replaced by the newer one.
    """

    def __init__(
        self,
        capacity: int,
        policy: PolicyName | str = "block",
        *,
        name: str = "queue",
        timeout_s: float | None = None,
        key: Callable[[T], Hashable] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"queue {name}: capacity must be >= 1, got {capacity}")
        if policy not in POLICIES:
            raise ValueError(f"queue {name}: unknown policy {policy!r} (expected one of {POLICIES})")
        self.name = name
        self.capacity = capacity
        self.policy = str(policy)
        self.timeout_s = timeout_s
        self._key = key
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._put = 0
        self._got = 0
        self._dropped = 0
        self._coalesced = 0
        self._max_depth = 0

    # -- producer side -------------------------------------------------------------------------
    def put(self, item: T) -> bool:
        """Enqueue `item` under the queue's policy. Returns False when an older item was dropped
        or coalesced to make room (the put itself always succeeds unless closed/timed out)."""
        with self._lock:
            if self._closed:
                raise QueueClosed(f"queue {self.name} is closed")
            evicted = False
            if isinstance(item, EndOfStream) and self.policy != "block":
                pass  # the marker may exceed capacity by one: it must not cost the newest item
            elif len(self._items) >= self.capacity:
                if self.policy == "drop_oldest":
                    self._evict_oldest_data()
                    evicted = True
                elif self.policy == "latest_wins":
                    self._coalesce(item)
                    evicted = True
                else:
                    self._wait_for_space()
            self._items.append(item)
            self._put += 1
            self._max_depth = max(self._max_depth, len(self._items))
            self._not_empty.notify()
            return not evicted

    def _wait_for_space(self) -> None:
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while len(self._items) >= self.capacity and not self._closed:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise QueueTimeout(f"queue {self.name}: no space within {self.timeout_s} s")
            self._not_full.wait(remaining if remaining is not None else 0.5)
        if self._closed:
            raise QueueClosed(f"queue {self.name} is closed")

    def _evict_oldest_data(self) -> None:
        for i, old in enumerate(self._items):
            if not isinstance(old, EndOfStream):
                del self._items[i]
                self._dropped += 1
                return
        raise QueueClosed(f"queue {self.name} is full of end-of-stream markers")

    def _coalesce(self, item: T) -> None:
        if self._key is not None:
            k = self._key(item)
            for i, old in enumerate(self._items):
                if not isinstance(old, EndOfStream) and self._key(old) == k:
                    del self._items[i]
                    self._coalesced += 1
                    return
        for i, old in enumerate(self._items):
            if not isinstance(old, EndOfStream):
                del self._items[i]
                self._coalesced += 1
                return
        raise QueueClosed(f"queue {self.name} is full of end-of-stream markers")

    # -- consumer side -------------------------------------------------------------------------
    def get(self, timeout_s: float | None = None) -> T:
        """Dequeue the oldest item; raises `QueueTimeout` after `timeout_s` and `QueueClosed` when
        the queue is closed and empty."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while not self._items:
                if self._closed:
                    raise QueueClosed(f"queue {self.name} is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise QueueTimeout(f"queue {self.name}: empty for {timeout_s} s")
                self._not_empty.wait(remaining if remaining is not None else 0.5)
            item = self._items.popleft()
            self._got += 1
            self._not_full.notify()
            return item

    def drain(self, stop: threading.Event, poll_s: float = 0.2) -> Iterator[T]:
        """Yield items until the queue is closed and empty, or `stop` is set while it is empty.

        The pull loop every stage shares: a stop request is honoured only between items, so an
        item already taken is always handled.
        """
        while True:
            try:
                yield self.get(timeout_s=poll_s)
            except QueueTimeout:
                if stop.is_set():
                    return
            except QueueClosed:
                return

    def close(self) -> None:
        """Wake every waiter; further puts raise, gets drain what is left then raise."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def stats(self) -> QueueStats:
        with self._lock:
            return QueueStats(
                name=self.name,
                policy=self.policy,
                capacity=self.capacity,
                depth=len(self._items),
                max_depth=self._max_depth,
                put=self._put,
                got=self._got,
                dropped=self._dropped,
                coalesced=self._coalesced,
            )


__all__ = ["POLICIES", "BoundedQueue", "PolicyName", "QueueClosed", "QueueStats", "QueueTimeout"]
