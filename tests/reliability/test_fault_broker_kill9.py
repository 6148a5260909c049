"""Mosquitto killed with `kill -9` after acknowledging alerts: with the shipped settings none is lost.

The daemon's outbox deletes an alert when the broker's PUBACK arrives; from then on only the broker
holds it for a consumer that is away (persistent session). With `persistence true` alone Mosquitto
writes its database every 30 minutes or on a clean shutdown, so a crash loses the session and its
queued alerts (issue 19.2: 28 made, 19 received). Here the real `AlertPublisher` drains a real
outbox into a real Mosquitto while the consumer is away; every alert is acknowledged (outbox
empty); the broker is SIGKILLed and restarted; the consumer comes back with its session.

- with the durability settings of the shipped `config/mosquitto.conf`: every alert arrives;
- control, `persistence true` alone (what the README used to say): alerts are lost — the test
  can tell the difference.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from config.broker import BrokerConfig
from config.schema import REPO_ROOT
from pipeline.messages import AlertEnvelope
from pipeline.outbox import Outbox
from stages.alerts import AlertPublisher
from tests.conftest import Broker, free_port, mosquitto_binary

pytestmark = pytest.mark.broker

SHIPPED = REPO_ROOT / "config" / "mosquitto.conf"
DURABILITY_KEYS = {
    "persistence",
    "autosave_on_changes",
    "autosave_interval",
    "max_queued_messages",
    "persistent_client_expiration",
}
N = 30


def shipped_durability_lines() -> list[str]:
    """The durability settings exactly as shipped (network, TLS and ACL lines are the site's)."""
    lines = [ln.strip() for ln in SHIPPED.read_text().splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith("#") and ln.split()[0] in DURABILITY_KEYS]
    assert {ln.split()[0] for ln in kept} == DURABILITY_KEYS
    return kept


def broker_with(d: Path, settings: list[str]) -> Broker:
    port = free_port()
    (d / "mq").mkdir(parents=True)
    conf = d / "mosquitto.conf"
    body = [f"listener {port} 127.0.0.1", "allow_anonymous true", f"persistence_location {d / 'mq'}/"]
    body += [*settings, "log_dest stdout"]
    if os.geteuid() == 0:  # as root Mosquitto drops to user `mosquitto`, who cannot write here
        body.append("user root")
    conf.write_text("\n".join(body) + "\n")
    return Broker("127.0.0.1", port, conf, d / "mosquitto.log")


class Consumer:
    """A persistent-session MQTT consumer (fixed client id, clean_session false)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.got: list[bytes] = []
        self.subscribed = threading.Event()
        self._lock = threading.Lock()

    def connect(self) -> mqtt.Client:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="ops-away", clean_session=False, protocol=mqtt.MQTTv311
        )
        c.on_connect = lambda cl, *_: cl.subscribe("veilcam/+/alerts", qos=1)
        c.on_subscribe = lambda *_: self.subscribed.set()

        def on_message(_c, _u, msg) -> None:
            with self._lock:
                self.got.append(bytes(msg.payload))

        c.on_message = on_message
        c.connect(self.broker.host, self.broker.port, keepalive=10)
        c.loop_start()
        return c


def scenario(d: Path, settings: list[str]) -> tuple[int, int]:
    """(alerts acknowledged by the broker, alerts the consumer received after the crash)."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
    broker = broker_with(d, settings)
    broker.start()
    consumer = Consumer(broker)
    outbox = Outbox(d / "outbox.sqlite")
    pub = AlertPublisher(
        BrokerConfig(host=broker.host, port=broker.port, reconnect_min_delay_s=0.2), outbox, devices=["gate"]
    )
    try:
        c = consumer.connect()
        assert consumer.subscribed.wait(10)
        c.disconnect()  # the consumer goes away; its session stays with the broker
        c.loop_stop()
        pub.start()
        for seq in range(1, N + 1):
            outbox.put(AlertEnvelope("gate", seq, time.time(), os.urandom(200) + seq.to_bytes(4, "big"), seq))
        deadline = time.monotonic() + 60
        while outbox.depth() > 0:  # every alert PUBACKed: the daemon no longer holds any of them
            assert time.monotonic() < deadline, "alerts not acknowledged"
            time.sleep(0.05)
        acked = N - outbox.depth()
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGKILL)  # kill -9
        broker.proc.wait(10)
        broker.proc = None
        pub.stop(flush_timeout_s=1)
        broker.start()
        consumer.subscribed.clear()
        c = consumer.connect()
        deadline = time.monotonic() + 10
        while len(consumer.got) < N and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # anything more (duplicates) would arrive now
        c.disconnect()
        c.loop_stop()
        return acked, len({p for p in consumer.got})
    finally:
        outbox.close()
        broker.stop()


def test_shipped_mosquitto_settings_survive_kill_9(tmp_path: Path) -> None:
    acked, received = scenario(tmp_path, shipped_durability_lines())
    print(f"broker kill -9 (shipped settings): {acked} acknowledged, {received} received")
    assert acked == N and received == N


def test_persistence_alone_loses_alerts_on_kill_9(tmp_path: Path) -> None:
    """The control: the old advice (`persistence true`, default autosave) loses what was queued."""
    acked, received = scenario(tmp_path, ["persistence true", "max_queued_messages 0"])
    print(f"broker kill -9 (persistence true only): {acked} acknowledged, {received} received")
    assert acked == N and received < N
