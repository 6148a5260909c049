"""`veilcam run` SIGKILLed at random points, restarted on the same state: no alert lost, none doubled.

Real processes: the evaluation and key enclaves (provisioned), `veilcam run` (capture of a real
video file, the pose child with the `openpose-json` backend replaying a smooth skeleton so pose is
cheap, windowing, sealing, the window journal and the outbox). Rules alert on every window, so
every window must end up as exactly one alert. The daemon is killed with SIGKILL at a random
moment a random number of alerts into each run (often while a window is with the enclave, so
the kill lands between the enclave numbering an alert and the outbox storing it), restarted, and
finally left to finish. Then, reading the outbox and decrypting every alert:

- made = alerts the enclave numbered (its `alerts` counter); delivered = distinct alerts stored;
- lost = made - delivered must be 0 and the numbers must be exactly 1..made;
- duplicated = alerts for the same media window must be 0, and every window of the clip is there.

CI runs a few kills; the `slow` variant many, on the whole clip.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from config.broker import BrokerConfig
from config.schema import REPO_ROOT
from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.shared.attest import new_nonce
from pipeline.app.subscriber import AlertSubscriber
from tests.conftest import Broker, mosquitto_binary
from tests.enclave_bridge.test_enclave_service_support import make_deployment
from tests.reliability.test_fault_broker_kill9 import broker_with, shipped_durability_lines
from tests.security.test_security_support import provisioned, short_root

VTEST = REPO_ROOT / "samples" / "vtest.avi"  # 795 frames, 10 fps, 768x576
DEVICE = "gate"
T, STRIDE = 16, 8


@pytest.fixture
def dep():
    d = make_deployment(short_root("kill"))
    try:
        provisioned(d)
        yield d
    finally:
        d.stop_all()
        shutil.rmtree(d.root, ignore_errors=True)


def write_pose_clip(directory: Path, frames: int) -> None:
    """One person walking slowly across the frame (OpenPose `--write_json` files, COCO-18)."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(7)
    base = np.column_stack([rng.uniform(-40, 40, 18), np.linspace(-150, 150, 18)])
    for i in range(frames):
        xy = base + np.array([200 + 2.0 * i, 288])
        kp = np.column_stack([xy, np.full(18, 0.9)])
        doc = {"version": 1.3, "people": [{"pose_keypoints_2d": [round(float(v), 2) for v in kp.ravel()]}]}
        (directory / f"clip_{i:012d}_keypoints.json").write_text(json.dumps(doc))


def write_config(d, frames: int, broker: Broker | None = None) -> Path:
    root = d.root / "daemon"
    root.mkdir()
    write_pose_clip(root / "pose", frames)
    d.dk.save(root / "data.key")
    cfg = {
        "state_dir": str(root / "state"),
        "data_key_path": str(root / "data.key"),
        "enclave": {"address": d.ev_addr, "timeout_s": 60, "retry_backoff_s": 0.2},
        "rules": {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0},
        "metrics": {"enabled": False},
        "supervisor": {"shutdown_timeout_s": 20},
        **(
            {}
            if broker is None
            else {
                "broker": {
                    "host": broker.host,
                    "port": broker.port,
                    "reconnect_min_delay_s": 0.2,
                    "reconnect_max_delay_s": 1.0,
                    "keepalive_s": 5,
                }
            }
        ),
        "cameras": {
            DEVICE: {
                "source": str(VTEST),
                "max_frames": frames,
                "fps": 10,
                "pose": {
                    "backend": "openpose-json",
                    "options": {"directory": str(root / "pose"), "index": "seq"},
                },
                "window": {"length_frames": T, "stride_frames": STRIDE, "persons": 1},
            }
        },
    }
    path = root / "veilcam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stored_alerts(state: Path) -> int:
    db = state / "outbox.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return int(c.execute("SELECT count(*) FROM outbox").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # the schema is being created right now


def start(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "pipeline", "--log-level", "DEBUG", "run", "--config", str(cfg)]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def kill_at_random_points(
    d, kills: int, frames: int, seed: int, broker: Broker | None = None
) -> dict[str, int]:
    """Kill, restart, finish; then count. With `broker`, alerts are counted at a persistent MQTT
    consumer (verified, decrypted, deduplicated), else in the outbox (no publisher)."""
    rng = random.Random(seed)
    cfg = write_config(d, frames, broker)
    state = cfg.parent / "state"
    log = cfg.parent / "daemon.log"
    expected = 1 + (frames - T) // STRIDE
    with d.client() as c:
        ev = c.evidence(nonce := new_nonce())
    opener = AlertOpener(d.c1, d.verifier("eval").verify(ev, nonce).sign_pub)
    got: list[dict] = []
    sub = None
    if broker is not None:
        sub = AlertSubscriber(
            BrokerConfig(
                host=broker.host, port=broker.port, reconnect_min_delay_s=0.2, reconnect_max_delay_s=1
            ),
            opener,
            got.append,
            client_id="ops-kill",
            persistent=True,
        )
        sub.start()
        assert sub.subscribed.wait(20)
    tried = 0
    finished = False
    made_so_far = (lambda: len(got)) if sub is not None else (lambda: stored_alerts(state))
    try:
        while tried < kills and not finished:
            before = made_so_far()
            more = rng.randint(0, 2)  # kill this many alerts into the run (0: during start-up/recovery)
            proc = start(cfg, log)
            deadline = time.monotonic() + 180
            while proc.poll() is None and made_so_far() < min(before + more, expected):
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))  # a random point inside the next window's round trip
            if proc.poll() is not None:
                assert proc.returncode == 0, log.read_text()[-3000:]
                finished = True
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            tried += 1
        if not finished:
            proc = start(cfg, log)
            assert proc.wait(600) == 0, log.read_text()[-3000:]
        with d.client() as c:
            stats = c.stats()
        made = int(stats["alerts"])
        if sub is not None:
            deadline = time.monotonic() + 60
            while sub.stats.delivered < made and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # late re-deliveries, if any, arrive now
            alerts = list(got)
        else:
            with sqlite3.connect(f"file:{state / 'outbox.sqlite'}?mode=ro", uri=True) as c:
                alerts = [
                    opener.open(bytes(r[0])) for r in c.execute("SELECT payload FROM outbox ORDER BY oid")
                ]
    finally:
        if sub is not None:
            sub.stop()
    with sqlite3.connect(f"file:{state / 'outbox.sqlite'}?mode=ro", uri=True) as c:
        journalled = int(c.execute("SELECT count(*) FROM windows").fetchone()[0])
    seqs = sorted(a["seq"] for a in alerts)
    windows = [round(float(a["t0"]), 3) for a in alerts]
    report = {
        "kills": tried,
        "windows": expected,
        "alerts_made": made,
        "alerts_delivered": len(set(seqs)),
        "lost": made - len(set(seqs)),
        "duplicated": len(windows) - len(set(windows)),
        "redeliveries_dropped_by_consumer": sub.stats.duplicates if sub is not None else 0,
        "resends_answered_from_enclave_memory": int(stats.get("windows_retried", 0)),
        "resubmitted": log.read_text().count("left in flight by a previous run"),
    }
    print("daemon SIGKILL run", report)
    assert seqs == list(range(1, made + 1)), f"lost or doubled numbers: {seqs}"
    assert report["duplicated"] == 0, f"a media window alerted twice: {sorted(windows)}"
    assert len(set(windows)) == expected == made, report
    assert journalled == 0
    return report


def test_daemon_sigkill_at_random_points_loses_and_doubles_nothing(dep) -> None:
    r = kill_at_random_points(dep, kills=3, frames=96, seed=int(os.environ.get("VEILCAM_KILL_SEED", "19")))
    assert r["kills"] >= 1


@pytest.mark.slow
@pytest.mark.broker
def test_daemon_sigkill_many_times_loses_and_doubles_nothing(dep, tmp_path: Path) -> None:
    """30 kills over the whole clip, alerts delivered through a durable Mosquitto to a consumer."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
    broker = broker_with(tmp_path, shipped_durability_lines())
    broker.start()
    try:
        r = kill_at_random_points(
            dep, kills=30, frames=792, seed=int(os.environ.get("VEILCAM_KILL_SEED", "1919")), broker=broker
        )
    finally:
        broker.stop()
    assert r["kills"] >= 20
