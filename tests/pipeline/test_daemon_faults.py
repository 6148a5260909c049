"""`veilcam run` as a real process with a live (looping, real-time) camera, real pose, the local
evaluator and a real Mosquitto: health on /metrics and /healthz and on the MQTT stats topic while it
runs, then SIGTERM → a graceful flush (every numbered alert delivered, outbox empty, `offline`
retained, exit code 0). Broker outages and SIGKILL restarts are in tests/stages/test_alerts_daemon.py."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.keys import PartyKey, generate_data_key
from pipeline.outbox import Outbox
from tests.stages.mqtt_helpers import Collector

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[2]
VTEST = REPO / "samples" / "vtest.avi"
DEVICE = "gate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, broker, metrics_port: int) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    torch.manual_seed(5)
    torch.save(STGCN(2).state_dict(), model / "model.pt")
    (model / "labels.txt").write_text("calm\nbusy\n")
    generate_data_key().save(tmp_path / "data.key")
    consumer = PartyKey.generate("consumer", "ops")
    consumer.save(tmp_path / "ops.key")
    consumer.public.save(tmp_path / "ops.pub")
    (tmp_path / "state" / "alerts").mkdir(parents=True)
    (tmp_path / "state" / "alerts" / f"{DEVICE}.seq").write_text("0\n")  # alerts numbered from 1
    cfg = {
        "state_dir": str(tmp_path / "state"),
        "data_key_path": str(tmp_path / "data.key"),
        "enclave": {"model_dir": str(model), "recipients": [str(tmp_path / "ops.pub")]},
        "rules": {"min_score": 0.0, "debounce_s": 0},
        "broker": {"host": broker.host, "port": broker.port, "reconnect_min_delay_s": 0.1},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "supervisor": {"stats_interval_s": 0.5, "shutdown_timeout_s": 60},
        "cameras": {
            DEVICE: {
                "source": str(VTEST),
                "live": True,  # paced at the clip's 10 fps, drop-oldest queues
                "loop": True,
                "crop": [0, 0, 384, 288],
                "window": {"length_frames": 6, "stride_frames": 3},
            }
        },
    }
    path = tmp_path / "veilcam.yaml"
    path.write_text(json.dumps(cfg))
    return path


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except OSError:
        return 0, ""


def test_sigterm_flushes_and_goes_offline(mosquitto, tmp_path: Path) -> None:
    col = Collector(mosquitto.host, mosquitto.port, [f"veilcam/{DEVICE}/#"], client_id="ops", persistent=True)
    mport = free_port()
    cfg = write_config(tmp_path, mosquitto, mport)
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--config", str(cfg)],
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        ok = col.wait_for(
            lambda m: (
                any(t.endswith("/alerts") for t, _, _ in m) and any(t.endswith("/stats") for t, _, _ in m)
            ),
            240,
        )
        assert ok, log.read_text()[-3000:]
        assert col.payloads("/available")[:1] == [b"online"]
        code, health = http_get(f"http://127.0.0.1:{mport}/healthz")
        assert code == 200 and json.loads(health)["cameras"] == {DEVICE: "running"}
        code, metrics = http_get(f"http://127.0.0.1:{mport}/metrics")
        assert code == 200
        assert f'veilcam_stage_fps{{camera="{DEVICE}",stage="pose"}}' in metrics
        assert f'veilcam_outbox_depth{{camera="{DEVICE}"}}' in metrics
        assert (
            f'veilcam_queue_dropped_total{{camera="{DEVICE}",policy="drop_oldest",queue="frames"}}' in metrics
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "graceful shutdown" in text and "Traceback" not in text
    # Every alert the daemon numbered reached the consumer; nothing left behind.
    n = int((tmp_path / "state" / "alerts" / f"{DEVICE}.seq").read_text())
    signer = PartyKey.load(tmp_path / "state" / "local-evaluator.key").public.sign_pub
    opener = AlertOpener(PartyKey.load(tmp_path / "ops.key"), signer)
    assert col.wait_for(lambda m: len(col.payloads("/alerts")) >= n, 30)
    seqs = sorted({opener.open(p)["seq"] for p in col.payloads("/alerts")})
    assert seqs == list(range(1, n + 1))
    with Outbox(tmp_path / "state" / "outbox.sqlite") as ob:
        assert ob.depth() == 0
    assert col.wait_for(lambda m: col.payloads("/available")[-1:] == [b"offline"], 10)
    # Stats: operational numbers only.
    stats = [json.loads(p) for p in col.payloads("/stats")]
    assert stats and stats[-1]["camera"] == DEVICE
    assert {"stages", "queues", "counters"} <= set(stats[-1])
    assert stats[-1]["queues"]["frames"]["policy"] == "drop_oldest"
    body = " ".join(col.payloads("/stats")[i].decode() for i in range(len(stats)))
    assert "calm" not in body and "busy" not in body  # no labels in health stats
    assert http_get(f"http://127.0.0.1:{mport}/healthz")[0] == 0  # the endpoint went away with it
    col.close()


def test_second_sigterm_stops_at_once_without_broker(tmp_path: Path) -> None:
    """No broker configured (alerts stay in the outbox); SIGTERM twice: the daemon exits cleanly."""

    class _NoBroker:
        host, port = "127.0.0.1", 1

    cfg_path = write_config(tmp_path, _NoBroker(), free_port())
    doc = json.loads(cfg_path.read_text())
    doc["broker"] = None
    cfg_path.write_text(json.dumps(doc))
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--config", str(cfg_path)],
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        while "veilcam daemon running" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "graceful shutdown" in text and "Traceback" not in text
    assert (tmp_path / "state" / "outbox.sqlite").is_file()
