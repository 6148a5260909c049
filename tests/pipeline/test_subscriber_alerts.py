"""The alert consumer: genuine alerts open, duplicates are dropped, forgeries and replays are
rejected and counted; end to end through the outbox, the publisher, Mosquitto and `veilcam subscribe`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import paho.mqtt.client as mqtt
import pytest

from config.broker import BrokerConfig
from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.measured.alerts import build_alert
from enclave_bridge.shared.keys import PartyKey, fingerprint
from enclave_bridge.shared.policy import ALERT_FIELDS, Recipient
from pipeline.app.subscriber import AlertSubscriber, SeenSet, format_alert
from pipeline.messages import AlertEnvelope
from pipeline.outbox import Outbox
from stages.alerts import AlertPublisher

REPO = Path(__file__).resolve().parents[2]


class Parties:
    """A stand-in enclave signer (same `build_alert` the enclave runs) and one consumer."""

    def __init__(self) -> None:
        self.signer = PartyKey.generate("data-owner", "enclave-signer")
        self.consumer = PartyKey.generate("consumer", "ops")
        self.recipients = [
            Recipient("ops", self.consumer.public.rid, self.consumer.public.kx_pub, tuple(ALERT_FIELDS))
        ]

    def alert(self, device: str, seq: int, label: str = "fall", signer: PartyKey | None = None) -> bytes:
        s = signer or self.signer
        fields = {
            "window_seq": seq * 3,
            "t0": 1.0 * seq,
            "t1": 1.0 * seq + 10,
            "track_id": 7,
            "label": label,
            "score": 0.93,
            "topk": [[label, 0.93], ["walk", 0.05]],
        }
        return build_alert(
            device,
            seq,
            time.time(),  # the enclave stamps alerts with its current time (consumers check freshness)
            fields,
            self.recipients,
            s.sign,
            fingerprint(s.public.sign_pub),
        )

    def opener(self) -> AlertOpener:
        return AlertOpener(self.consumer, self.signer.public.sign_pub)


def make_sub(
    p: Parties, state: Path | None = None, **kw: Any
) -> tuple[AlertSubscriber, list[dict[str, Any]]]:
    got: list[dict[str, Any]] = []
    cfg = kw.pop("cfg", None) or BrokerConfig()
    return AlertSubscriber(cfg, p.opener(), got.append, state_path=state, **kw), got


def test_genuine_alert_opens_and_duplicates_are_dropped() -> None:
    p = Parties()
    sub, _ = make_sub(p)
    blob = p.alert("cam1", 1)
    a = sub.handle("veilcam/cam1/alerts", blob)
    assert a is not None
    assert (a["device"], a["seq"], a["label"], a["track_id"]) == ("cam1", 1, "fall", 7)
    assert sub.handle("veilcam/cam1/alerts", blob) is None
    assert sub.handle("veilcam/cam1/alerts", p.alert("cam1", 2)) is not None
    assert (sub.stats.delivered, sub.stats.duplicates, sub.stats.received) == (2, 1, 3)
    line = format_alert(a)
    assert "cam1 #1" in line and "fall 0.93" in line and "track 7" in line


def test_forgeries_are_rejected_and_counted() -> None:
    p = Parties()
    sub, _ = make_sub(p)
    blob = p.alert("cam1", 1)
    env = msgpack.unpackb(blob)
    # 1) tampered signature
    bad_sig = dict(env, sig=bytes(64))
    # 2) tampered ciphertext, original signature
    bad_ct = dict(env, ct=env["ct"][:-1] + bytes([env["ct"][-1] ^ 1]))
    # 3) signed by somebody else's key (claims the enclave's kid)
    mallory = PartyKey.generate("data-owner", "mallory")
    forged = msgpack.unpackb(p.alert("cam1", 5, signer=mallory))
    forged["kid"] = env["kid"]
    forged_blob = msgpack.packb(forged)
    for payload in (
        msgpack.packb(bad_sig),
        msgpack.packb(bad_ct),
        forged_blob,
        p.alert("cam1", 6, signer=mallory),  # honest kid of another key
        b"\x00garbage",
    ):
        assert sub.handle("veilcam/cam1/alerts", payload) is None
    assert sub.stats.rejected_forged == 5 and sub.stats.delivered == 0
    # the forged seq did not poison the duplicate filter: the genuine alert still opens
    assert sub.handle("veilcam/cam1/alerts", p.alert("cam1", 5)) is not None


def test_replays_are_rejected_and_counted() -> None:
    p = Parties()
    sub, _ = make_sub(p)
    a1 = p.alert("cam1", 1)
    assert sub.handle("veilcam/cam1/alerts", a1) is not None
    # genuine alert of cam1 re-published on cam2's topic
    assert sub.handle("veilcam/cam2/alerts", p.alert("cam1", 2)) is None
    # a different genuine envelope re-using a seen (device, seq): e.g. an enclave rolled back
    assert sub.handle("veilcam/cam1/alerts", p.alert("cam1", 1, label="walk")) is None
    assert sub.stats.rejected_replayed == 2 and sub.stats.delivered == 1


def test_persisted_dedupe_survives_restart(tmp_path: Path) -> None:
    p = Parties()
    state = tmp_path / "seen.sqlite"
    blob = p.alert("cam1", 1)
    sub, _ = make_sub(p, state)
    assert sub.handle("veilcam/cam1/alerts", blob) is not None
    sub.seen.close()
    sub2, _ = make_sub(p, state)
    assert sub2.handle("veilcam/cam1/alerts", blob) is None
    assert sub2.stats.duplicates == 1
    assert SeenSet(state).check_and_add("cam1", 2, b"x") == "new"


@pytest.mark.broker
def test_end_to_end_outbox_publisher_subscriber(mosquitto, tmp_path: Path) -> None:
    p = Parties()
    cfg = BrokerConfig(
        host=mosquitto.host, port=mosquitto.port, reconnect_min_delay_s=0.1, reconnect_max_delay_s=0.5
    )
    sub, got = make_sub(p, cfg=cfg)
    sub.start()
    assert sub.subscribed.wait(10)
    ob = Outbox(tmp_path / "o.sqlite")
    pub = AlertPublisher(cfg, ob, ["cam1"])
    pub.start()
    blobs = [p.alert("cam1", s) for s in range(1, 21)]
    for s, b in enumerate(blobs, 1):
        ob.put(AlertEnvelope("cam1", s, float(s), b, s * 3))
    assert pub.wait_idle(20)
    # an attacker with broker access: re-publishes a genuine alert, and publishes a forgery
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    raw.connect(mosquitto.host, mosquitto.port)
    raw.loop_start()
    raw.publish("veilcam/cam1/alerts", blobs[3], qos=1).wait_for_publish(5)
    raw.publish(
        "veilcam/cam1/alerts", msgpack.packb(dict(msgpack.unpackb(blobs[4]), sig=bytes(64))), qos=1
    ).wait_for_publish(5)
    raw.publish("veilcam/cam9/alerts", blobs[5], qos=1).wait_for_publish(5)
    raw.disconnect()
    raw.loop_stop()
    deadline = time.monotonic() + 10
    while sub.stats.received < 23 and time.monotonic() < deadline:
        time.sleep(0.05)
    pub.stop()
    sub.stop()
    assert [a["seq"] for a in got] == list(range(1, 21))
    st = sub.stats
    assert (st.delivered, st.duplicates, st.rejected_forged, st.rejected_replayed) == (20, 1, 1, 1)
    ob.close()


@pytest.mark.broker
def test_veilcam_subscribe_cli(mosquitto, tmp_path: Path) -> None:
    p = Parties()
    p.consumer.save(tmp_path / "ops.key")
    p.signer.public.save(tmp_path / "signer.pub")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "pipeline", "subscribe",
            "--broker", f"{mosquitto.host}:{mosquitto.port}",
            "--consumer-key", str(tmp_path / "ops.key"),
            "--signer-pub", str(tmp_path / "signer.pub"),
            "--json", "--count", "3", "--timeout-s", "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # wait until subscribed (printed on stderr)
            if line.startswith("# subscribed"):
                break
        cfg = BrokerConfig(host=mosquitto.host, port=mosquitto.port)
        ob = Outbox(tmp_path / "o.sqlite")
        pub = AlertPublisher(cfg, ob, ["lobby"])
        pub.start()
        for s in (1, 2, 2, 3):
            ob.put(AlertEnvelope("lobby", s, float(s), p.alert("lobby", s), s))
        assert pub.wait_idle(20)
        out, _err = proc.communicate(timeout=60)
        pub.stop()
        ob.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    lines = [json.loads(x) for x in out.splitlines()]
    alerts = [x for x in lines if "seq" in x]
    assert [(a["device"], a["seq"], a["label"]) for a in alerts] == [
        ("lobby", 1, "fall"),
        ("lobby", 2, "fall"),
        ("lobby", 3, "fall"),
    ]
    assert lines[-1]["subscriber_stats"]["delivered"] == 3


@pytest.mark.broker
def test_subscribe_with_evidence_retained_by_the_daemon(mosquitto, tmp_path: Path) -> None:
    """`--evidence-from-broker`: the signing key comes from the retained, attested evidence."""
    from enclave_bridge.shared.attest import (
        PlatformKey,
        SessionKey,
        SimulatedBackend,
        make_evidence,
        save_platform_pub,
    )

    p = Parties()
    p.consumer.save(tmp_path / "ops.key")
    platform = PlatformKey.generate()
    save_platform_pub(tmp_path / "platform.pub", platform.public)
    measurement = "5a" * 32
    backend = SimulatedBackend(platform, measurement, "eval")
    cfg = BrokerConfig(host=mosquitto.host, port=mosquitto.port)
    ob = Outbox(tmp_path / "o.sqlite")
    pub = AlertPublisher(
        cfg,
        ob,
        ["lobby"],
        evidence_provider=lambda _d: make_evidence(
            backend, "eval", os.urandom(32), SessionKey(), p.signer.public.sign_pub
        ),
    )
    pub.start()
    deadline = time.monotonic() + 10
    while pub.counters["evidence_published"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)

    def subscribe(measure: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable, "-m", "pipeline", "subscribe",
                "--broker", f"{mosquitto.host}:{mosquitto.port}", "--device", "lobby",
                "--consumer-key", str(tmp_path / "ops.key"), "--evidence-from-broker",
                "--platform-pub", str(tmp_path / "platform.pub"), "--measurement", measure,
                "--count", "1", "--timeout-s", "60",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip

    try:
        bad = subscribe("00" * 32)
        _out, err = bad.communicate(timeout=60)
        assert bad.returncode == 1 and "allow-list" in err
        good = subscribe(measurement)
        assert good.stderr is not None
        for line in good.stderr:
            if line.startswith("# subscribed"):
                break
        ob.put(AlertEnvelope("lobby", 1, 1.0, p.alert("lobby", 1), 1))
        out, _err = good.communicate(timeout=60)
        assert good.returncode == 0
        assert "lobby #1" in out and "fall 0.93" in out
    finally:
        pub.stop()
        ob.close()


def test_seen_set_memory_is_bounded_and_old_seqs_stay_duplicates() -> None:
    seen = SeenSet(max_entries=100)
    for s in range(1, 1001):
        assert seen.check_and_add("cam1", s, bytes([s % 256])) == "new"
    assert len(seen._mem) == 100
    assert seen.check_and_add("cam1", 5, b"\x05") == "duplicate"  # forgotten, below the floor
    assert seen.check_and_add("cam1", 999, b"other") == "conflict"  # remembered: content compared
    assert seen.check_and_add("cam2", 5, b"x") == "new"  # floors are per device
