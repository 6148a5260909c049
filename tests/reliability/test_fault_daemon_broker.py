"""`veilcam run` as a real process through a broker outage and a SIGKILL: nothing lost.

A file camera replays a clip through the real pose child, windowing, the local evaluator, the
durable outbox and the MQTT publisher into a real Mosquitto (with persistence, so the consumer's
session survives the broker restart); a consumer with a persistent session verifies, decrypts
and de-duplicates. Mid-stream the broker goes down (~5 s here, 60 s in the `slow` variant),
the daemon is SIGKILLed while alerts sit unacknowledged in its outbox, the broker comes back
and the daemon is restarted on the same state directory. Every alert the system ever numbered
(`1..N`, N = the persisted alert counter) must reach the consumer exactly once after dedupe.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from config.broker import BrokerConfig
from config.schema import REPO_ROOT
from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.keys import PartyKey, generate_data_key
from pipeline.app.subscriber import AlertSubscriber
from tests.conftest import Broker, free_port, mosquitto_binary

VTEST = REPO_ROOT / "samples" / "vtest.avi"
DEVICE = "gate"


def persistent_broker(d: Path) -> Broker:
    port = free_port()
    (d / "mq").mkdir()
    conf = d / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
        f"persistence_location {d / 'mq'}/\nautosave_interval 1\nmax_queued_messages 0\n"
        # as root, Mosquitto drops to user `mosquitto`, who could not write its database here
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    return Broker("127.0.0.1", port, conf, d / "mosquitto.log")


def write_setup(d: Path, broker: Broker, frames: int) -> tuple[Path, PartyKey, PartyKey]:
    torch.manual_seed(1)
    model = d / "model"
    model.mkdir()
    torch.save(STGCN(3).state_dict(), model / "model.pt")
    (model / "labels.txt").write_text("walking\nstanding\nfalling\n")
    (model / "model.json").write_text(json.dumps({"T": 8, "stride": 4, "fps": 10}))
    consumer = PartyKey.generate("consumer", "ops")
    consumer.public.save(d / "ops.pub")
    signer = PartyKey.generate("data-owner", "local-evaluator")
    signer.save(d / "signer.key")
    generate_data_key().save(d / "data.key")
    cfg = {
        "state_dir": str(d / "state"),
        "data_key_path": str(d / "data.key"),
        "enclave": {
            "address": None,
            "model_dir": str(model),
            "recipients": [str(d / "ops.pub")],
            "signing_key_path": str(d / "signer.key"),
        },
        "rules": {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0},
        "broker": {
            "host": broker.host,
            "port": broker.port,
            "reconnect_min_delay_s": 0.2,
            "reconnect_max_delay_s": 1.0,
            "keepalive_s": 5,
        },
        "metrics": {"enabled": False},
        "supervisor": {"stats_interval_s": 1, "shutdown_timeout_s": 30},
        "cameras": {DEVICE: {"source": str(VTEST), "max_frames": frames}},
    }
    path = d / "veilcam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (d / "state" / "alerts").mkdir(parents=True)
    (d / "state" / "alerts" / f"{DEVICE}.seq").write_text("0\n")  # alert numbers start at 1
    return path, consumer, signer


def outbox_depth(state: Path) -> int:
    db = state / "outbox.sqlite"
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
        return int(c.execute("SELECT count(*) FROM outbox").fetchone()[0])


def wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def run_daemon(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "pipeline", "--log-level", "DEBUG", "run", "--config", str(cfg)]
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=dict(os.environ))


def scenario(d: Path, outage_s: float, frames: int) -> dict[str, int]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
    broker = persistent_broker(d)
    broker.start()
    cfg, consumer, signer = write_setup(d, broker, frames)
    state = d / "state"
    got: list[dict] = []
    sub = AlertSubscriber(
        BrokerConfig(host=broker.host, port=broker.port, reconnect_min_delay_s=0.2, reconnect_max_delay_s=1),
        AlertOpener(consumer, signer.public.sign_pub),
        got.append,
        client_id="ops-consumer",
        persistent=True,
    )
    sub.start()
    daemon = None
    try:
        assert sub.subscribed.wait(20)
        daemon = run_daemon(cfg, d / "daemon1.log")
        wait_for(lambda: len(got) >= 1, 240, "the first alert")
        broker.stop()  # outage begins
        t_down = time.monotonic()
        wait_for(lambda: outbox_depth(state) >= 2 or daemon.poll() is not None, 240, "alerts queued")
        assert daemon.poll() is None, "daemon finished before it could be killed mid-stream"
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(30)
        queued_at_kill = outbox_depth(state)
        time.sleep(max(0.0, outage_s - (time.monotonic() - t_down)))
        broker.start()  # outage over
        daemon = run_daemon(cfg, d / "daemon2.log")  # same state dir: outbox re-sent, seqs continue
        assert daemon.wait(600) == 0, (d / "daemon2.log").read_text()[-3000:]
        total = int((state / "alerts" / f"{DEVICE}.seq").read_text().strip())
        wait_for(lambda: sub.stats.delivered >= total, 60, f"{total} alerts at the consumer")
        time.sleep(1.0)  # late duplicates, if any, would arrive now
        seqs = [a["seq"] for a in got]
        assert sorted(seqs) == list(range(1, total + 1)), f"lost or duplicated: {seqs}"
        assert outbox_depth(state) == 0
        return {
            "alerts": total,
            "queued_at_kill": queued_at_kill,
            "duplicates_dropped": sub.stats.duplicates,
            "forged": sub.stats.rejected_forged,
        }
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        sub.stop()
        broker.stop()


@pytest.mark.broker
def test_broker_outage_and_daemon_sigkill_lose_nothing(tmp_path: Path) -> None:
    r = scenario(tmp_path, outage_s=5.0, frames=28)
    assert r["queued_at_kill"] >= 2 and r["forged"] == 0
    print("fault run", r)


@pytest.mark.broker
@pytest.mark.slow
def test_broker_outage_60s_and_daemon_sigkill_lose_nothing(tmp_path: Path) -> None:
    r = scenario(tmp_path, outage_s=60.0, frames=60)
    assert r["queued_at_kill"] >= 2 and r["forged"] == 0
    print("fault run (60 s outage)", r)
