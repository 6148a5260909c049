"""BoundedQueue: each policy's drop rule, counters, EndOfStream handling, blocking and closing."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.messages import EndOfStream
from pipeline.queues import BoundedQueue, QueueClosed, QueueTimeout


def eos() -> EndOfStream:
    return EndOfStream("cam", 0, 0.0)


def drain(q: BoundedQueue) -> list:
    out = []
    while len(q):
        out.append(q.get(timeout_s=0))
    return out


def test_drop_oldest_keeps_newest_and_counts() -> None:
    q: BoundedQueue[int] = BoundedQueue(3, "drop_oldest", name="frames")
    results = [q.put(i) for i in range(10)]
    assert results[:3] == [True, True, True]
    assert results[3:] == [False] * 7
    assert drain(q) == [7, 8, 9]
    s = q.stats()
    assert (s.dropped, s.coalesced, s.put, s.got, s.max_depth) == (7, 0, 10, 3, 3)


def test_latest_wins_coalesces_by_key() -> None:
    q: BoundedQueue[tuple[str, int]] = BoundedQueue(2, "latest_wins", name="windows", key=lambda x: x[0])
    q.put(("a", 1))
    q.put(("b", 1))
    assert q.put(("a", 2)) is False  # replaces ("a", 1), keeps order of the rest
    assert drain(q) == [("b", 1), ("a", 2)]
    assert q.stats().coalesced == 1
    assert q.stats().dropped == 0


def test_latest_wins_without_matching_key_replaces_oldest() -> None:
    q: BoundedQueue[tuple[str, int]] = BoundedQueue(1, "latest_wins", key=lambda x: x[0])
    q.put(("a", 1))
    q.put(("b", 1))
    assert drain(q) == [("b", 1)]
    assert q.stats().coalesced == 1


def test_end_of_stream_gets_in_when_full_under_dropping_policies() -> None:
    for policy in ("drop_oldest", "latest_wins"):
        q: BoundedQueue[object] = BoundedQueue(2, policy)
        q.put(1)
        q.put(2)
        marker = eos()
        assert q.put(marker) is True  # never blocks, never dropped, evicts nothing
        assert drain(q) == [1, 2, marker]
        assert q.stats().dropped == 0 and q.stats().max_depth == 3


def test_end_of_stream_waits_under_block_and_drops_nothing() -> None:
    q: BoundedQueue[object] = BoundedQueue(1, "block", timeout_s=0.05)
    q.put(1)
    with pytest.raises(QueueTimeout):
        q.put(eos())
    assert drain(q) == [1]
    marker = eos()
    q.put(marker)
    assert drain(q) == [marker]
    assert q.stats().dropped == 0


def test_block_waits_for_consumer_and_never_drops() -> None:
    q: BoundedQueue[int] = BoundedQueue(2, "block")
    got: list[int] = []

    def consumer() -> None:
        for _ in range(50):
            time.sleep(0.001)
            got.append(q.get(timeout_s=5))

    t = threading.Thread(target=consumer)
    t.start()
    for i in range(50):
        assert q.put(i) is True
    t.join(10)
    assert got == list(range(50))
    s = q.stats()
    assert s.dropped == 0 and s.coalesced == 0 and s.max_depth <= 2


def test_block_timeout_raises() -> None:
    q: BoundedQueue[int] = BoundedQueue(1, "block", timeout_s=0.05)
    q.put(1)
    with pytest.raises(QueueTimeout):
        q.put(2)


def test_get_timeout_and_close() -> None:
    q: BoundedQueue[int] = BoundedQueue(1, "block")
    with pytest.raises(QueueTimeout):
        q.get(timeout_s=0.01)
    q.put(5)
    q.close()
    assert q.get(timeout_s=0) == 5  # drains what is left
    with pytest.raises(QueueClosed):
        q.get(timeout_s=1)
    with pytest.raises(QueueClosed):
        q.put(6)


def test_close_wakes_a_blocked_producer() -> None:
    q: BoundedQueue[int] = BoundedQueue(1, "block")
    q.put(1)
    errors: list[BaseException] = []

    def producer() -> None:
        try:
            q.put(2)
        except QueueClosed as e:
            errors.append(e)

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.05)
    q.close()
    t.join(5)
    assert not t.is_alive() and len(errors) == 1


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="capacity"):
        BoundedQueue(0)
    with pytest.raises(ValueError, match="policy"):
        BoundedQueue(1, "drop_newest")


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 8),
    policy=st.sampled_from(["drop_oldest", "latest_wins"]),
    ops=st.lists(st.booleans(), max_size=80),
)
def test_counters_balance(capacity: int, policy: str, ops: list[bool]) -> None:
    """put = got + depth + dropped + coalesced, depth <= capacity, whatever the interleaving."""
    q: BoundedQueue[int] = BoundedQueue(capacity, policy)
    n = 0
    for is_put in ops:
        if is_put:
            q.put(n)
            n += 1
        elif len(q):
            q.get(timeout_s=0)
        assert len(q) <= capacity
    s = q.stats()
    assert s.put == s.got + s.depth + s.dropped + s.coalesced
    # FIFO among survivors
    rest = drain(q)
    assert rest == sorted(rest)
