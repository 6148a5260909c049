"""The demo's local broker: Mosquitto and the embedded (amqtt, MQTT 3.1.1) one; the publisher falls
back from MQTT 5 to 3.1.1 by itself and still delivers in order."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from config.broker import BrokerConfig
from pipeline.broker import embedded_available, mosquitto_path, start_broker
from pipeline.messages import AlertEnvelope
from pipeline.outbox import Outbox
from stages.alerts import AlertPublisher
from tests.stages.mqtt_helpers import Collector


def _roundtrip(host: str, port: int, tmp_path: Path, n: int = 20) -> AlertPublisher:
    col = Collector(host, port, ["veilcam/+/alerts", "veilcam/+/available"])
    ob = Outbox(tmp_path / "o.sqlite")
    pub = AlertPublisher(
        BrokerConfig(
            host=host, port=port, reconnect_min_delay_s=0.1, reconnect_max_delay_s=0.5, connect_timeout_s=2
        ),
        ob,
        ["cam1"],
    )
    pub.start()
    for s in range(1, n + 1):
        ob.put(AlertEnvelope("cam1", s, float(s), msgpack.packb({"seq": s}), s))
    assert pub.wait_idle(30)
    assert col.wait_for(lambda m: len(col.payloads("/alerts")) >= n)
    assert [msgpack.unpackb(p)["seq"] for p in col.payloads("/alerts")] == list(range(1, n + 1))
    assert col.payloads("/available")[:1] == [b"online"]
    pub.stop()
    col.close()
    ob.close()
    return pub


@pytest.mark.broker
def test_mosquitto_local_broker(tmp_path: Path) -> None:
    if mosquitto_path() is None:
        pytest.skip("mosquitto not installed")
    with start_broker("mosquitto", workdir=tmp_path / "b") as broker:
        assert broker.kind == "mosquitto"
        pub = _roundtrip(broker.host, broker.port, tmp_path)
        assert pub.protocol == "5"
    assert broker.proc is None


def test_embedded_broker_and_fallback_to_311(tmp_path: Path) -> None:
    if not embedded_available():
        pytest.skip("embedded broker (amqtt, a dependency of veilcam) is not importable: reinstall veilcam")
    with start_broker("embedded", workdir=tmp_path / "b") as broker:
        assert broker.kind == "embedded" and not broker.mqtt5
        pub = _roundtrip(broker.host, broker.port, tmp_path)
        assert pub.protocol == "3.1.1"  # refused MQTT 5, reconnected with 3.1.1 on its own
        assert pub.counters["connect_failures"] >= 1


def test_pinned_protocol_311_connects_directly(tmp_path: Path) -> None:
    if not embedded_available():
        pytest.skip("embedded broker (amqtt, a dependency of veilcam) is not importable: reinstall veilcam")
    with start_broker("embedded", workdir=tmp_path / "b") as broker:
        ob = Outbox(tmp_path / "o.sqlite")
        pub = AlertPublisher(BrokerConfig(host=broker.host, port=broker.port, protocol="3.1.1"), ob, ["c"])
        pub.start()
        ob.put(AlertEnvelope("c", 1, 1.0, b"x"))
        assert pub.wait_idle(20)
        assert pub.counters["connect_failures"] == 0
        pub.stop()
        ob.close()
