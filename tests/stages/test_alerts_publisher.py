"""AlertPublisher against a real Mosquitto: order, retained availability + LWT, broker outage,
broker down at start, SIGKILL of the publisher process with unacknowledged alerts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import msgpack
import pytest

from config.broker import BrokerConfig
from pipeline.messages import AlertEnvelope
from pipeline.outbox import Outbox
from stages.alerts import AlertPublisher
from tests.stages.mqtt_helpers import Collector

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[2]


def cfg_for(broker: object, **kw: object) -> BrokerConfig:
    base: dict[str, object] = dict(
        host=broker.host,  # type: ignore[attr-defined]
        port=broker.port,  # type: ignore[attr-defined]
        keepalive_s=5,
        reconnect_min_delay_s=0.1,
        reconnect_max_delay_s=0.5,
    )
    base.update(kw)
    return BrokerConfig(**base)  # type: ignore[arg-type]


def alert(cam: str, seq: int) -> AlertEnvelope:
    # opaque payload: the publisher never looks inside
    payload = msgpack.packb({"device": cam, "seq": seq, "pad": os.urandom(32)})
    return AlertEnvelope(camera_id=cam, seq=seq, capture_ts=float(seq), payload=payload, window_seq=seq)


def seqs(payloads: list[bytes]) -> list[int]:
    return [msgpack.unpackb(p)["seq"] for p in payloads]


def first_occurrences(values: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def test_alerts_arrive_in_order_with_availability_stats_and_evidence(mosquitto, tmp_path: Path) -> None:
    col = Collector(mosquitto.host, mosquitto.port, ["veilcam/#"])
    ob = Outbox(tmp_path / "outbox.sqlite")
    pub = AlertPublisher(cfg_for(mosquitto), ob, ["cam1"])
    pub.start()
    try:
        for s in range(1, 61):
            ob.put(alert("cam1", s))
        assert col.wait_for(lambda m: len([x for x in m if x[0] == "veilcam/cam1/alerts"]) >= 60)
        assert seqs(col.payloads("/alerts")) == list(range(1, 61))
        assert pub.wait_idle(10) and ob.depth() == 0
        assert b"online" in col.payloads("/available")

        assert pub.publish_stats("cam1", {"fps": {"pose": 4.5}, "drops": 0})
        pub.publish_evidence("cam1", {"v": 1, "sign_pub": b"k" * 32})
        assert col.wait_for(lambda m: any(t.endswith("/stats") for t, _p, _r in m))
        assert col.wait_for(lambda m: any(t.endswith("/enclave") for t, _p, _r in m))
        assert json.loads(col.payloads("/stats")[0]) == {"drops": 0, "fps": {"pose": 4.5}}
        # retained: a consumer that connects later still gets availability and evidence
        late = Collector(mosquitto.host, mosquitto.port, ["veilcam/cam1/available", "veilcam/cam1/enclave"])
        assert late.wait_for(lambda m: len(m) >= 2)
        got = {t: (p, r) for t, p, r in late.messages}
        assert got["veilcam/cam1/available"] == (b"online", True)
        assert msgpack.unpackb(got["veilcam/cam1/enclave"][0]) == {"v": 1, "sign_pub": b"k" * 32}
        late.close()
    finally:
        pub.stop()
    assert col.wait_for(lambda m: col.payloads("/available")[-1:] == [b"offline"])
    assert pub.counters["acked"] == 60
    col.close()
    ob.close()


def test_multi_device_availability(mosquitto, tmp_path: Path) -> None:
    col = Collector(mosquitto.host, mosquitto.port, ["veilcam/+/available", "veilcam/+/alerts"])
    ob = Outbox(tmp_path / "o.sqlite")
    pub = AlertPublisher(cfg_for(mosquitto, topic_prefix="veilcam"), ob, ["a", "b"])
    pub.start()
    ob.put(alert("a", 1))
    ob.put(alert("b", 1))
    assert col.wait_for(lambda m: len([1 for t, p, _ in m if p == b"online"]) >= 2)
    assert col.wait_for(lambda m: len([1 for t, _p, _ in m if t.endswith("/alerts")]) >= 2)
    pub.stop()
    assert col.wait_for(lambda m: len([1 for t, p, _ in m if p == b"offline"]) >= 2)
    topics = {t for t, p, _ in col.messages if p == b"offline"}
    assert topics == {"veilcam/a/available", "veilcam/b/available"}
    col.close()
    ob.close()


def _persistent_broker(mosquitto, tmp_path: Path) -> None:
    """Same port, but with persistence so a subscriber's session + queue survive the restart."""
    mosquitto.stop()
    conf = mosquitto.conf.read_text().replace("persistence false", "persistence true")
    conf += f"persistence_location {tmp_path}/\nautosave_interval 1\n"
    # as root, Mosquitto drops to user `mosquitto`, who cannot write its database into tmp_path
    conf += "user root\n" if os.geteuid() == 0 else ""
    mosquitto.conf.write_text(conf)
    mosquitto.start()


def test_broker_restart_mid_stream_delivers_everything_once_after_dedupe(mosquitto, tmp_path: Path) -> None:
    _persistent_broker(mosquitto, tmp_path)
    col = Collector(
        mosquitto.host, mosquitto.port, ["veilcam/+/alerts"], client_id="consumer-1", persistent=True
    )
    ob = Outbox(tmp_path / "o.sqlite")
    pub = AlertPublisher(cfg_for(mosquitto), ob, ["cam1"])
    pub.start()
    total = 150
    done = threading.Event()

    def produce() -> None:
        for s in range(1, total + 1):
            ob.put(alert("cam1", s))
            time.sleep(0.01)
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    assert col.wait_for(lambda m: len(m) >= 30)
    mosquitto.stop()
    time.sleep(1.5)  # outage: the producer keeps writing to the outbox
    assert not pub.connected
    mosquitto.start()
    producer.join()
    assert done.is_set()
    assert col.wait_for(lambda m: set(seqs([p for _t, p, _r in m])) >= set(range(1, total + 1)), 40)
    got = seqs(col.payloads("/alerts"))
    deduped = first_occurrences(got)
    assert deduped == list(range(1, total + 1))  # every alert, in order, none twice after dedupe
    assert pub.wait_idle(10)
    assert pub.counters["disconnects"] >= 1
    pub.stop()
    col.close()
    ob.close()


def test_broker_down_at_start_keeps_retrying(mosquitto, tmp_path: Path) -> None:
    mosquitto.stop()
    ob = Outbox(tmp_path / "o.sqlite")
    pub = AlertPublisher(cfg_for(mosquitto), ob, ["cam1"])
    pub.start()
    for s in range(1, 11):
        ob.put(alert("cam1", s))
    time.sleep(1.0)
    assert not pub.connected and ob.depth() == 10
    assert pub._thread is not None and pub._thread.is_alive()
    mosquitto.start()
    col = Collector(mosquitto.host, mosquitto.port, ["veilcam/+/alerts"])
    # the publisher may have connected before the collector subscribed: alerts then already acked.
    # Put one more to prove the link works, and check the outbox drained.
    assert pub.wait_idle(20)
    ob.put(alert("cam1", 11))
    assert col.wait_for(lambda m: 11 in seqs([p for _t, p, _r in m]))
    assert pub.counters["connect_failures"] >= 1
    pub.stop()
    col.close()
    ob.close()


_PUBLISHER_SCRIPT = textwrap.dedent(
    """
    import sys, time, msgpack
    from config.broker import BrokerConfig
    from pipeline.messages import AlertEnvelope
    from pipeline.outbox import Outbox
    from stages.alerts import AlertPublisher

    host, port, db = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cfg = BrokerConfig(host=host, port=port, keepalive_s=5, reconnect_min_delay_s=0.1,
                       reconnect_max_delay_s=0.5, client_id="pub-under-test")
    ob = Outbox(db)
    pub = AlertPublisher(cfg, ob, ["cam1"])
    pub.start()
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "put":
            for s in range(int(rest[0]), int(rest[1]) + 1):
                ob.put(AlertEnvelope("cam1", s, float(s), msgpack.packb({"device": "cam1", "seq": s}), s))
            print("stored", rest[1], flush=True)
        elif cmd == "idle":
            print("idle", pub.wait_idle(float(rest[0])), flush=True)
    """
)


def _spawn(mosquitto, db: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _PUBLISHER_SCRIPT, mosquitto.host, str(mosquitto.port), str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _ask(proc: subprocess.Popen[str], cmd: str) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(cmd + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_sigkill_with_unacked_alerts_then_restart_resends(mosquitto, tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite"
    col = Collector(mosquitto.host, mosquitto.port, ["veilcam/+/alerts", "veilcam/+/available"])
    a = _spawn(mosquitto, db)
    try:
        assert _ask(a, "put 1 30") == "stored 30"
        assert _ask(a, "idle 20") == "idle True"
        assert col.wait_for(lambda m: len(col.payloads("/alerts")) >= 30)
        mosquitto.stop()  # nothing can be acknowledged now
        assert _ask(a, "put 31 60") == "stored 60"
        os.kill(a.pid, signal.SIGKILL)
        a.wait()
    finally:
        if a.poll() is None:
            a.kill()
    with Outbox(db) as check:
        assert [i.envelope.seq for i in check.pending()] == list(range(31, 61))  # unacked, durable

    col.subscribed.clear()
    mosquitto.start()
    assert col.subscribed.wait(10)
    b = _spawn(mosquitto, db)
    try:
        assert _ask(b, "idle 20") == "idle True"
        assert col.wait_for(lambda m: set(seqs(col.payloads("/alerts"))) >= set(range(1, 61)))
        assert first_occurrences(seqs(col.payloads("/alerts"))) == list(range(1, 61))
        assert col.wait_for(lambda m: col.payloads("/available")[-1:] == [b"online"])
        # SIGKILL of a connected publisher: the broker publishes the retained LWT `offline`
        os.kill(b.pid, signal.SIGKILL)
        b.wait()
        assert col.wait_for(lambda m: col.payloads("/available")[-1:] == [b"offline"], timeout_s=20)
    finally:
        if b.poll() is None:
            b.kill()
    late = Collector(mosquitto.host, mosquitto.port, ["veilcam/cam1/available"])
    assert late.wait_for(lambda m: len(m) >= 1)
    assert late.messages[0] == ("veilcam/cam1/available", b"offline", True)
    late.close()
    col.close()


def test_retained_enclave_evidence_verifies_for_consumers(mosquitto, tmp_path: Path) -> None:
    """Evidence from a provider is retained on <prefix>/<device>/enclave; a consumer that connects
    later verifies it (platform key + measurement allow-list) and gets the alert-signing key."""
    from enclave_bridge.shared.attest import PlatformKey, SessionKey, SimulatedBackend, make_evidence
    from enclave_bridge.shared.errors import AttestationError
    from enclave_bridge.shared.keys import PartyKey
    from pipeline.app.subscriber import verify_key_from_evidence

    platform = PlatformKey.generate()
    measurement = "ab" * 32
    backend = SimulatedBackend(platform, measurement, "eval")
    signer = PartyKey.generate("data-owner", "enclave-signer")
    calls: list[str] = []

    def provider(device: str) -> dict:
        calls.append(device)
        return make_evidence(backend, "eval", os.urandom(32), SessionKey(), signer.public.sign_pub)

    ob = Outbox(tmp_path / "o.sqlite")
    pub = AlertPublisher(cfg_for(mosquitto), ob, ["cam1"], evidence_provider=provider)
    pub.start()
    try:
        assert pub.wait_idle(5)
        deadline = time.monotonic() + 10
        while pub.counters["evidence_published"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        late = Collector(mosquitto.host, mosquitto.port, ["veilcam/cam1/enclave"])
        assert late.wait_for(lambda m: len(m) >= 1)
        _topic, blob, retained = late.messages[0]
        assert retained and calls == ["cam1"]
        key = verify_key_from_evidence(blob, platform.public, [measurement], max_age_s=300)
        assert key == signer.public.sign_pub
        with pytest.raises(AttestationError, match="allow-list"):
            verify_key_from_evidence(blob, platform.public, ["cd" * 32], max_age_s=300)
        with pytest.raises(AttestationError):
            verify_key_from_evidence(blob, PlatformKey.generate().public, [measurement], max_age_s=300)
        late.close()
    finally:
        pub.stop()
        ob.close()


def test_stop_flushes_even_while_the_connection_is_still_coming_up(mosquitto, tmp_path: Path) -> None:
    """A short replay can end before the (re)connection is up: `stop()` waits for it (bounded)."""
    mosquitto.stop()
    ob = Outbox(tmp_path / "o.sqlite")
    pub = AlertPublisher(cfg_for(mosquitto, flush_timeout_s=20), ob, ["cam1"])
    pub.start()
    for s in range(1, 6):
        ob.put(alert("cam1", s))
    time.sleep(0.5)
    mosquitto.start()
    pub.stop()  # not connected yet (or just now): must still deliver before returning
    assert ob.depth() == 0 and pub.counters["acked"] == 5
    ob.close()


def test_stop_with_broker_down_keeps_alerts_after_bounded_wait(mosquitto, tmp_path: Path) -> None:
    mosquitto.stop()
    ob = Outbox(tmp_path / "o.sqlite")
    pub = AlertPublisher(cfg_for(mosquitto, flush_timeout_s=1.0), ob, ["cam1"])
    pub.start()
    ob.put(alert("cam1", 1))
    pub.stop()  # returns after flush_timeout_s; the alert stays for the next start
    assert ob.depth() == 1 and pub.counters["acked"] == 0
    ob.close()
