"""The durable alert outbox (DESIGN §7): an alert is committed to SQLite before anyone publishes it
and deleted only when the broker acknowledged it (PUBACK).

paho keeps QoS 1 in-flight messages in memory only, so a crash, a SIGKILL or a power cut between
"enclave produced an alert" and "broker has it" would lose the alert without this table. SQLite in
WAL mode with `synchronous=FULL` makes every `put` durable when it returns; a failed write (disk
full, size cap reached, I/O error) rolls back its own transaction and never touches committed rows.

Rows are kept in insertion order (`oid`, AUTOINCREMENT so ids are never reused) and are unique by
`(camera_id, seq)`: putting the same alert twice (a retry after an error) stores it once.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from enclave_bridge.errors import StageError
from pipeline.messages import AlertEnvelope

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    oid INTEGER PRIMARY KEY AUTOINCREMENT,
    camera_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    capture_ts REAL NOT NULL,
    window_seq INTEGER NOT NULL,
    payload BLOB NOT NULL,
    stored_ts REAL NOT NULL,
    UNIQUE (camera_id, seq)
)
"""
_SELECT_PENDING = (
    "SELECT oid, camera_id, seq, capture_ts, window_seq, payload FROM outbox WHERE oid > ? ORDER BY oid"
)


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One stored, not yet acknowledged alert; `oid` is its outbox position (global order)."""

    oid: int
    envelope: AlertEnvelope


@dataclass(frozen=True, slots=True)
class OutboxStats:
    depth: int
    size_bytes: int
    stored: int
    acked: int
    duplicates: int
    write_errors: int


class Outbox:
    """SQLite-backed FIFO of alert envelopes, safe to share between threads (one connection + lock).

    `max_bytes` caps the database file (SQLite `max_page_count`); when the cap or the disk is full,
    `put` raises `StageError` and the alert is not stored — the caller decides (the daemon treats it
    as a stage failure, because silently dropping an alert is not allowed).
    """

    def __init__(self, path: str | Path, *, max_bytes: int | None = None) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stored = self._acked = self._duplicates = self._errors = 0
        self._listeners: list[Callable[[], None]] = []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(self.path), timeout=10.0, check_same_thread=False, isolation_level=None
            )
        except (OSError, sqlite3.Error) as e:
            raise StageError(f"outbox {self.path}: cannot open: {e}") from e
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            check = self._db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no answer'}")
            self._db.execute(_SCHEMA)
            if max_bytes is not None:
                page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
                pages = max(2, max_bytes // page)
                self._db.execute(f"PRAGMA max_page_count={int(pages)}")
        except sqlite3.Error as e:
            self._db.close()
            raise StageError(
                f"outbox {self.path}: not a usable SQLite database ({e}); move it aside to start a new "
                "outbox (unacknowledged alerts in it would then not be re-sent)"
            ) from e
        depth = self.depth()
        if depth:
            log.info("outbox %s: %d unacknowledged alert(s) from a previous run", self.path, depth)

    # -- writes ----------------------------------------------------------------------------------
    def put(self, envelope: AlertEnvelope) -> int:
        """Commit one alert durably and return its `oid` (the existing one for a duplicate)."""
        if not isinstance(envelope.payload, bytes | bytearray) or not envelope.payload:
            raise StageError(f"outbox: alert {envelope.camera_id}/{envelope.seq} has an empty payload")
        with self._lock:
            try:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO outbox (camera_id, seq, capture_ts, window_seq, payload, "
                    "stored_ts) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        envelope.camera_id,
                        int(envelope.seq),
                        float(envelope.capture_ts),
                        int(envelope.window_seq),
                        bytes(envelope.payload),
                        time.time(),
                    ),
                )
                if cur.rowcount == 1 and cur.lastrowid is not None:
                    self._stored += 1
                    oid = int(cur.lastrowid)
                else:
                    self._duplicates += 1
                    row = self._db.execute(
                        "SELECT oid FROM outbox WHERE camera_id = ? AND seq = ?",
                        (envelope.camera_id, int(envelope.seq)),
                    ).fetchone()
                    oid = int(row[0]) if row is not None else -1
                listeners = list(self._listeners)
            except sqlite3.Error as e:
                self._errors += 1
                raise self._error("store alert", e) from e
        for fn in listeners:
            fn()
        return oid

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call `fn()` after every successful `put` (the publisher wakes up instead of polling)."""
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def ack(self, oid: int) -> bool:
        """Delete an acknowledged alert; False when it was not there (already acked)."""
        with self._lock:
            try:
                cur = self._db.execute("DELETE FROM outbox WHERE oid = ?", (int(oid),))
            except sqlite3.Error as e:
                self._errors += 1
                raise self._error("delete acknowledged alert", e) from e
            if cur.rowcount:
                self._acked += 1
                return True
            return False

    def ack_many(self, oids: list[int]) -> int:
        """Delete several acknowledged alerts in one transaction (one fsync instead of one each);
        returns how many were still there."""
        if not oids:
            return 0
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                n = 0
                for oid in oids:
                    n += self._db.execute("DELETE FROM outbox WHERE oid = ?", (int(oid),)).rowcount
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                self._errors += 1
                raise self._error("delete acknowledged alerts", e) from e
            self._acked += n
            return n

    # -- reads -----------------------------------------------------------------------------------
    def pending(self, limit: int | None = None, after_oid: int = 0) -> list[OutboxItem]:
        """Unacknowledged alerts in the order they were stored (oldest first)."""
        sql = _SELECT_PENDING
        params: tuple[int, ...] = (int(after_oid),)
        if limit is not None:
            sql += " LIMIT ?"
            params = (*params, int(limit))
        with self._lock:
            try:
                rows = self._db.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise self._error("read pending alerts", e) from e
        return [
            OutboxItem(
                int(oid),
                AlertEnvelope(
                    camera_id=str(cam),
                    seq=int(seq),
                    capture_ts=float(ts),
                    payload=bytes(payload),
                    window_seq=int(wseq),
                ),
            )
            for oid, cam, seq, ts, wseq, payload in rows
        ]

    def depth(self, camera_id: str | None = None) -> int:
        """Unacknowledged alerts (all cameras, or one) — the `outbox_depth` gauge."""
        with self._lock:
            try:
                if camera_id is None:
                    row = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
                else:
                    row = self._db.execute(
                        "SELECT COUNT(*) FROM outbox WHERE camera_id = ?", (camera_id,)
                    ).fetchone()
            except sqlite3.Error as e:
                raise self._error("count pending alerts", e) from e
        return int(row[0])

    def size_bytes(self) -> int:
        """Database file size including the WAL (what the disk actually holds)."""
        total = 0
        for p in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total

    def stats(self) -> OutboxStats:
        depth = self.depth()
        with self._lock:
            return OutboxStats(
                depth, self.size_bytes(), self._stored, self._acked, self._duplicates, self._errors
            )

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close (idempotent)."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.debug("outbox %s: checkpoint on close failed: %s", self.path, e)
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, what: str, e: sqlite3.Error) -> StageError:
        code = getattr(e, "sqlite_errorname", "")
        if code == "SQLITE_FULL" or "full" in str(e).lower():
            msg = (
                f"outbox {self.path}: cannot {what}: disk or size cap full ({e}); "
                "stored alerts are intact — free space or raise the cap"
            )
        elif code in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or any(
            w in str(e) for w in ("malformed", "not a database")
        ):
            msg = f"outbox {self.path}: database is corrupt ({e}); move it aside to start a new outbox"
        else:
            msg = f"outbox {self.path}: cannot {what}: {e}"
        log.error("%s", msg)
        return StageError(msg)


__all__ = ["Outbox", "OutboxItem", "OutboxStats"]
