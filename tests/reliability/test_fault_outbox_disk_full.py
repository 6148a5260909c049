"""The outbox on a disk that really fills up: the OS refuses the write (RLIMIT_FSIZE → EFBIG, the
same failure path as ENOSPC for SQLite), `put` raises a clear `StageError`, nothing committed is
lost or corrupted, and once space is back the same database accepts alerts again.
(`max_page_count`, SQLite's own cap, is covered in tests/pipeline/test_outbox_durable.py.)"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.messages import AlertEnvelope
from pipeline.outbox import Outbox

WRITER = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    from pipeline.errors import StageError
    from pipeline.messages import AlertEnvelope
    from pipeline.outbox import Outbox
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
    ob = Outbox(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
    ok, error = [], None
    for seq in range(1, 100_000):
        try:
            ob.put(AlertEnvelope("cam1", seq, 1000.0 + seq, bytes([seq % 251]) * 3000, seq))
        except StageError as e:
            error = str(e)
            break
        ok.append(seq)
    print(json.dumps({"ok": ok, "error": error}))
    """
)


def test_disk_full_is_a_clear_error_without_corruption(tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite"
    out = subprocess.run(
        [sys.executable, "-c", WRITER, str(db), str(256 * 1024)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["error"] is not None and 5 < len(r["ok"]) < 100_000
    assert str(db) in r["error"] and ("full" in r["error"] or "disk" in r["error"] or "I/O" in r["error"])
    # space is back: the database is intact, holds exactly what `put` confirmed, and takes more
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with Outbox(db) as ob:
        items = ob.pending()
        assert [i.envelope.seq for i in items] == r["ok"]
        assert all(i.envelope.payload == bytes([i.envelope.seq % 251]) * 3000 for i in items)
        ob.put(AlertEnvelope("cam1", 999_999, 0.0, b"after", 0))
        assert ob.depth() == len(r["ok"]) + 1
