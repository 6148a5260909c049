"""The durable alert outbox (ARCHITECTURE.md §7): an alert is committed to SQLite before anyone publishes it
and deleted only when the broker acknowledged it (PUBACK).

paho keeps QoS 1 in-flight messages in memory only, so a crash, a SIGKILL or a power cut between
"enclave produced an alert" and "broker has it" would lose the alert without this table. SQLite in
WAL mode with `synchronous=FULL` makes every `put` durable when it returns; a failed write (disk
full, size cap reached, I/O error) rolls back its own transaction and never touches committed rows.

Rows are kept in insertion order (`oid`, AUTOINCREMENT so ids are never reused) and are unique by
`(camera_id, seq)`: putting the same alert twice (a retry after an error) stores it once.

The same database is the daemon's window journal, which closes the gap between "the enclave
numbered and sealed an alert" and "the alert is in the outbox": a sealed window is committed
(`put_window`) before it is submitted, and its alerts are stored in the same transaction that
removes it (`commit_window`). A daemon killed in between finds the window at its next start and
resubmits it flagged `resend`, which the enclave answers with the very same alert envelopes
(same `seq`), so nothing is lost and nothing is numbered twice. One window per camera is in flight
at a time, so the journal holds at most one per camera. `progress` records, per file camera, the
media time up to which windows were evaluated, so a restarted replay of the same file does not
evaluate (and alert on) the same media times again under new window numbers.

Why one module of ~430 lines: the outbox is one SQLite journal whose tables (alerts, windows in
flight, replay progress) change in the same transactions; splitting it would split those
transactions.
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

from enclave_bridge.shared.errors import StageError
from pipeline.messages import AlertEnvelope, SealedWindow

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
_SCHEMA_WINDOWS = """
CREATE TABLE IF NOT EXISTS windows (
    camera_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    capture_ts REAL NOT NULL,
    t0 REAL NOT NULL,
    t1 REAL NOT NULL,
    kid TEXT NOT NULL,
    blob BLOB NOT NULL,
    stored_ts REAL NOT NULL,
    PRIMARY KEY (camera_id, seq)
)
"""
_SCHEMA_PROGRESS = """
CREATE TABLE IF NOT EXISTS progress (
    camera_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    t1 REAL NOT NULL
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
            self._db.execute(_SCHEMA_WINDOWS)
            self._db.execute(_SCHEMA_PROGRESS)
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

    # -- the window journal ----------------------------------------------------------------------
    def put_window(self, w: SealedWindow) -> None:
        """Commit a sealed window durably before it is submitted to the enclave."""
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO windows (camera_id, seq, capture_ts, t0, t1, kid, blob, "
                    "stored_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        w.camera_id,
                        int(w.seq),
                        float(w.capture_ts),
                        float(w.t0),
                        float(w.t1),
                        w.kid,
                        bytes(w.blob),
                        time.time(),
                    ),
                )
            except sqlite3.Error as e:
                self._errors += 1
                raise self._error("journal window", e) from e

    def commit_window(
        self, w: SealedWindow, envelopes: list[AlertEnvelope], source: str | None = None
    ) -> list[int]:
        """In one transaction: store the window's alerts, forget the window and (file cameras)
        advance the camera's `progress` to the window's end. Returns the alerts' `oid`s."""
        for env in envelopes:
            if not isinstance(env.payload, bytes | bytearray) or not env.payload:
                raise StageError(f"outbox: alert {env.camera_id}/{env.seq} has an empty payload")
        oids: list[int] = []
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for env in envelopes:
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO outbox (camera_id, seq, capture_ts, window_seq, payload, "
                        "stored_ts) VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            env.camera_id,
                            int(env.seq),
                            float(env.capture_ts),
                            int(env.window_seq),
                            bytes(env.payload),
                            time.time(),
                        ),
                    )
                    if cur.rowcount == 1 and cur.lastrowid is not None:
                        oids.append(int(cur.lastrowid))
                    else:
                        self._duplicates += 1
                self._db.execute(
                    "DELETE FROM windows WHERE camera_id = ? AND seq = ?", (w.camera_id, int(w.seq))
                )
                if source is not None:
                    self._db.execute(
                        "INSERT INTO progress (camera_id, source, t1) VALUES (?, ?, ?) "
                        "ON CONFLICT(camera_id) DO UPDATE SET source = excluded.source, t1 = excluded.t1",
                        (w.camera_id, source, float(w.t1)),
                    )
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                self._errors += 1
                raise self._error("store alerts of a window", e) from e
            self._stored += len(oids)
            listeners = list(self._listeners)
        if envelopes:
            for fn in listeners:
                fn()
        return oids

    def forget_window(self, w: SealedWindow) -> None:
        """Remove a journalled window that will not be resubmitted (dropped, counted elsewhere)."""
        with self._lock:
            try:
                self._db.execute(
                    "DELETE FROM windows WHERE camera_id = ? AND seq = ?", (w.camera_id, int(w.seq))
                )
            except sqlite3.Error as e:
                self._errors += 1
                raise self._error("forget window", e) from e

    def pending_windows(self, camera_id: str) -> list[SealedWindow]:
        """Windows journalled but never answered (a crash in flight), oldest first."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT seq, capture_ts, t0, t1, kid, blob FROM windows WHERE camera_id = ? ORDER BY seq",
                    (camera_id,),
                ).fetchall()
            except sqlite3.Error as e:
                raise self._error("read journalled windows", e) from e
        return [
            SealedWindow(camera_id, int(q), float(ts), float(t0), float(t1), str(kid), bytes(blob))
            for q, ts, t0, t1, kid, blob in rows
        ]

    def progress(self, camera_id: str, source: str) -> float | None:
        """Media time up to which this camera's file `source` was evaluated (None: not started, or
        another file now)."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT source, t1 FROM progress WHERE camera_id = ?", (camera_id,)
                ).fetchone()
            except sqlite3.Error as e:
                raise self._error("read progress", e) from e
        return float(row[1]) if row is not None and row[0] == source else None

    def clear_progress(self, camera_id: str) -> None:
        """The file was evaluated to its end: the next run starts it over (a new replay)."""
        with self._lock:
            try:
                self._db.execute("DELETE FROM progress WHERE camera_id = ?", (camera_id,))
            except sqlite3.Error as e:
                self._errors += 1
                raise self._error("clear progress", e) from e

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
