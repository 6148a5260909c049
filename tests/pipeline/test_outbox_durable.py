"""The durable alert outbox: order, ack, durability across close/reopen and SIGKILL, corrupt and
full databases give clear errors without losing committed rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from enclave_bridge.shared.errors import StageError
from pipeline.messages import AlertEnvelope
from pipeline.outbox import Outbox


def env(seq: int, cam: str = "cam1", size: int = 64) -> AlertEnvelope:
    return AlertEnvelope(
        camera_id=cam, seq=seq, capture_ts=1000.0 + seq, payload=os.urandom(size), window_seq=seq * 2
    )


def test_pending_in_insertion_order_and_ack_deletes(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite")
    sent = [env(s, cam) for s, cam in [(5, "a"), (1, "b"), (6, "a"), (2, "b")]]
    oids = [ob.put(e) for e in sent]
    assert oids == sorted(oids)
    items = ob.pending()
    assert [i.envelope for i in items] == sent
    assert ob.depth() == 4 and ob.depth("a") == 2
    assert ob.ack(oids[1]) is True
    assert ob.ack(oids[1]) is False
    assert [i.envelope for i in ob.pending()] == [sent[0], sent[2], sent[3]]
    assert [i.envelope for i in ob.pending(limit=1, after_oid=oids[0])] == [sent[2]]
    st = ob.stats()
    assert (st.depth, st.stored, st.acked) == (3, 4, 1)
    ob.close()


def test_duplicate_put_is_stored_once(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite")
    e = env(7)
    first = ob.put(e)
    assert ob.put(e) == first
    assert ob.depth() == 1 and ob.stats().duplicates == 1
    ob.close()


def test_empty_payload_refused(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite")
    with pytest.raises(StageError, match="empty payload"):
        ob.put(AlertEnvelope("cam1", 1, 0.0, b""))
    ob.close()


def test_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "o.sqlite"
    sent = [env(s) for s in range(1, 21)]
    with Outbox(path) as ob:
        oids = [ob.put(e) for e in sent]
        for oid in oids[:5]:
            ob.ack(oid)
    with Outbox(path) as ob:
        assert [i.envelope for i in ob.pending()] == sent[5:]
        # ids keep growing after a restart (AUTOINCREMENT), so order stays global
        assert ob.put(env(99)) > oids[-1]


def test_committed_rows_survive_sigkill(tmp_path: Path) -> None:
    """A writer killed with SIGKILL right after `put` returned loses nothing (WAL, synchronous=FULL)."""
    path = tmp_path / "o.sqlite"
    script = textwrap.dedent(
        f"""
        import os, sys
        from pipeline.messages import AlertEnvelope
        from pipeline.outbox import Outbox
        ob = Outbox({str(path)!r})
        for s in range(1, 51):
            ob.put(AlertEnvelope("cam1", s, float(s), bytes([s]) * 100, s))
        print("stored", flush=True)
        sys.stdin.read()  # wait to be killed, connection still open, WAL not checkpointed
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "stored"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Outbox(path) as ob:
        items = ob.pending()
    assert [i.envelope.seq for i in items] == list(range(1, 51))
    assert all(i.envelope.payload == bytes([i.envelope.seq]) * 100 for i in items)


def test_not_a_database_gives_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    path.write_bytes(b"this is not sqlite at all" * 200)
    with pytest.raises(StageError, match="not a usable SQLite database"):
        Outbox(path)


def test_corrupted_pages_give_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        for s in range(200):
            ob.put(env(s, size=400))
    data = bytearray(path.read_bytes())
    assert len(data) > 8192
    # keep the 100-byte header valid, scribble over the b-tree pages
    for off in range(4096, len(data) - 64, 1024):
        data[off : off + 64] = b"\xa5" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(StageError, match=r"outbox .*(corrupt|not a usable)"):
        ob2 = Outbox(path)
        ob2.pending()


def test_size_cap_full_is_clear_and_keeps_committed_rows(tmp_path: Path) -> None:
    """SQLite `max_page_count` stands in for a full disk: same SQLITE_FULL error path."""
    path = tmp_path / "o.sqlite"
    ob = Outbox(path, max_bytes=64 * 1024)
    stored: list[AlertEnvelope] = []
    with pytest.raises(StageError, match="full"):
        for s in range(10_000):
            e = env(s, size=2000)
            ob.put(e)
            stored.append(e)
    assert 5 < len(stored) < 10_000
    assert ob.stats().write_errors == 1
    # everything committed before the failure is intact and in order; acking frees room again
    assert [i.envelope for i in ob.pending()] == stored
    for item in ob.pending(limit=5):
        ob.ack(item.oid)
    ob.put(env(20_000, size=2000))
    ob.close()
    with Outbox(path) as again:
        seqs = [i.envelope.seq for i in again.pending()]
    assert seqs == [e.seq for e in stored[5:]] + [20_000]


def test_ack_many_in_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        oids = [ob.put(env(s)) for s in range(1, 11)]
        assert ob.ack_many([*oids[:6], oids[0], 10_000]) == 6
        assert [i.envelope.seq for i in ob.pending()] == [7, 8, 9, 10]
        assert ob.stats().acked == 6
    with Outbox(path) as ob:
        assert ob.depth() == 4
