"""The alert path inside the real daemon (`veilcam run`, real clip, real pose, local evaluator):
broker down at start → the daemon runs on and delivers later; broker outage + SIGKILL mid-replay
and a restart → every alert the daemon ever numbered reaches the consumer, none twice after dedupe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import torch

from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.alert_format import parse_alert
from enclave_bridge.shared.keys import PartyKey, generate_data_key
from pipeline.outbox import Outbox
from tests.stages.mqtt_helpers import Collector

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[2]
VTEST = REPO / "samples" / "vtest.avi"
DEVICE = "hall"


def setup_daemon(tmp_path: Path, broker, max_frames: int) -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    torch.manual_seed(4)
    torch.save(STGCN(3).state_dict(), model / "model.pt")
    (model / "labels.txt").write_text("idle\nwalk\nfall\n")
    (model / "model.json").write_text(json.dumps({"T": 6, "stride": 3, "fps": 10}))
    generate_data_key().save(tmp_path / "data.key")
    consumer = PartyKey.generate("consumer", "ops")
    consumer.save(tmp_path / "ops.key")
    consumer.public.save(tmp_path / "ops.pub")
    cfg = {
        "state_dir": str(tmp_path / "state"),
        "data_key_path": str(tmp_path / "data.key"),
        "enclave": {"model_dir": str(model), "recipients": [str(tmp_path / "ops.pub")]},
        "rules": {"min_score": 0.0, "debounce_s": 0},
        "broker": {
            "host": broker.host,
            "port": broker.port,
            "keepalive_s": 5,
            "reconnect_min_delay_s": 0.1,
            "reconnect_max_delay_s": 0.5,
        },
        "metrics": {"enabled": False},
        "supervisor": {"stats_interval_s": 1, "shutdown_timeout_s": 60},
        "cameras": {
            DEVICE: {"source": str(VTEST), "max_frames": max_frames, "crop": [0, 0, 384, 576], "fps": 10}
        },
    }
    # start the persisted alert numbering at 1 (a fresh counter starts at the Unix time in ms)
    (tmp_path / "state" / "alerts").mkdir(parents=True, exist_ok=True)
    (tmp_path / "state" / "alerts" / f"{DEVICE}.seq").write_text("0\n")
    path = tmp_path / "veilcam.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def spawn_daemon(cfg: Path, tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--config", str(cfg)],
        cwd=REPO,
        stdout=(tmp_path / f"{name}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )


def last_alert_seq(tmp_path: Path) -> int:
    """Highest alert number the daemon handed out (its persisted counter)."""
    return int((tmp_path / "state" / "alerts" / f"{DEVICE}.seq").read_text().strip())


def persistent_broker(mosquitto, tmp_path: Path) -> None:
    mosquitto.stop()
    conf = mosquitto.conf.read_text().replace("persistence false", "persistence true")
    conf += f"persistence_location {tmp_path}/\nautosave_interval 1\n"
    # as root, Mosquitto drops to user `mosquitto`, who cannot write its database into tmp_path
    mosquitto.conf.write_text(conf + ("user root\n" if os.geteuid() == 0 else ""))
    mosquitto.start()


def opened_seqs(col: Collector, opener: AlertOpener) -> list[int]:
    return [int(opener.open(p)["seq"]) for p in col.payloads("/alerts")]


def wait_first_alert(tmp_path: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if last_alert_seq(tmp_path) >= 1:
            return
        time.sleep(0.2)
    raise AssertionError("the daemon produced no alert")


def test_daemon_with_broker_down_at_start_runs_and_delivers_later(mosquitto, tmp_path: Path) -> None:
    persistent_broker(mosquitto, tmp_path)
    col = Collector(mosquitto.host, mosquitto.port, [f"veilcam/{DEVICE}/#"], client_id="ops", persistent=True)
    mosquitto.stop()
    cfg = setup_daemon(tmp_path, mosquitto, max_frames=24)
    daemon = spawn_daemon(cfg, tmp_path, "run1")
    try:
        wait_first_alert(tmp_path)
        time.sleep(1.0)
        assert daemon.poll() is None or daemon.returncode == 0, (tmp_path / "run1.log").read_text()[-2000:]
        mosquitto.start()
        assert daemon.wait(timeout=300) == 0, (tmp_path / "run1.log").read_text()[-2000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
    n = last_alert_seq(tmp_path)
    assert n >= 1
    opener = AlertOpener(PartyKey.load(tmp_path / "ops.key"), _signer_pub(tmp_path))
    arrived = col.wait_for(lambda m: set(opened_seqs(col, opener)) >= set(range(1, n + 1)), 120)
    with Outbox(tmp_path / "state" / "outbox.sqlite") as ob:
        left = [i.envelope.seq for i in ob.pending()]
    got = opened_seqs(col, opener)
    assert arrived, (
        f"{n} alerts numbered, got {sorted(set(got))}, still in outbox {left}: "
        + (tmp_path / "run1.log").read_text()[-3000:]
    )
    assert sorted(set(got)) == list(range(1, n + 1))
    log = (tmp_path / "run1.log").read_text()
    assert "Traceback" not in log
    assert col.wait_for(lambda m: col.payloads("/available")[-1:] == [b"offline"])
    with Outbox(tmp_path / "state" / "outbox.sqlite") as ob:
        assert ob.depth() == 0
    col.close()


def _signer_pub(tmp_path: Path) -> bytes:
    return PartyKey.load(tmp_path / "state" / "local-evaluator.key").public.sign_pub


@pytest.mark.slow
def test_daemon_sigkill_during_broker_outage_then_restart_loses_nothing(mosquitto, tmp_path: Path) -> None:
    persistent_broker(mosquitto, tmp_path)
    col = Collector(
        mosquitto.host, mosquitto.port, [f"veilcam/{DEVICE}/alerts"], client_id="ops", persistent=True
    )
    cfg = setup_daemon(tmp_path, mosquitto, max_frames=60)
    first = spawn_daemon(cfg, tmp_path, "run1")
    try:
        assert col.wait_for(lambda m: len(m) >= 1, 240), (tmp_path / "run1.log").read_text()[-2000:]
        mosquitto.stop()  # outage: alerts pile up in the outbox, none can be acknowledged
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with Outbox(tmp_path / "state" / "outbox.sqlite") as ob:
                if ob.depth() >= 2:
                    break
            time.sleep(0.3)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    with Outbox(tmp_path / "state" / "outbox.sqlite") as ob:
        unacked = [i.envelope.seq for i in ob.pending()]
    assert len(unacked) >= 2
    # the pose child of the killed daemon may linger a moment; the restarted daemon is independent
    mosquitto.start()
    second = spawn_daemon(setup_cfg_frames(cfg, 12), tmp_path, "run2")
    try:
        assert second.wait(timeout=300) == 0, (tmp_path / "run2.log").read_text()[-2000:]
    finally:
        if second.poll() is None:
            second.kill()
    n = last_alert_seq(tmp_path)
    opener = AlertOpener(PartyKey.load(tmp_path / "ops.key"), _signer_pub(tmp_path))
    assert col.wait_for(lambda m: set(opened_seqs(col, opener)) >= set(range(1, n + 1)), 120)
    got = opened_seqs(col, opener)
    assert set(unacked) <= set(got)
    assert sorted(set(got)) == list(range(1, n + 1))
    # envelope headers say the same as the decrypted content
    assert all(parse_alert(p)["device"] == DEVICE for p in col.payloads("/alerts"))
    assert all(isinstance(msgpack.unpackb(p), dict) for p in col.payloads("/alerts"))
    col.close()


def setup_cfg_frames(cfg: Path, max_frames: int) -> Path:
    doc = json.loads(cfg.read_text())
    doc["cameras"][DEVICE]["max_frames"] = max_frames
    out = cfg.with_name("veilcam-restart.yaml")
    out.write_text(json.dumps(doc))
    return out
