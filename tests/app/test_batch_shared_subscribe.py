"""Consumers at scale: two `veilcam subscribe --share GROUP` processes on a real Mosquitto split the
alert stream (every alert reaches exactly one of them), while a plain subscriber still sees all."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from enclave_bridge.measured.alerts import build_alert
from enclave_bridge.shared.keys import PartyKey, fingerprint
from enclave_bridge.shared.policy import ALERT_FIELDS, Recipient
from pipeline.app.subscriber import AlertSubscriber
from pipeline.errors import ConfigError
from tests.conftest import REPO_ROOT

N_ALERTS = 24
DEVICES = ("cam-1", "cam-2", "cam-3")


def _subscriber(broker, keys: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [
        sys.executable, "-m", "pipeline", "subscribe",
        "--broker", f"{broker.host}:{broker.port}",
        "--consumer-key", str(keys / "consumer.key"),
        "--signer-pub", str(keys / "signer.pub"),
        "--json", "--timeout-s", "60", "--count", str(N_ALERTS),
        *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until it is subscribed before anything is published
        line = proc.stderr.readline()
        if line.startswith("# subscribed to"):
            return proc
        if not line and proc.poll() is not None:
            raise AssertionError(f"subscriber exited: {proc.stderr.read()}")
    raise AssertionError("subscriber did not subscribe within 60 s")


def _alerts_of(proc: subprocess.Popen[str]) -> list[tuple[str, int]]:
    out, _ = proc.communicate(timeout=90)
    docs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return sorted((d["device"], d["seq"]) for d in docs if "seq" in d and "device" in d)


@pytest.mark.broker
def test_shared_subscription_splits_the_stream(mosquitto, tmp_path: Path) -> None:
    signer = PartyKey.generate("data-owner", "enclave-signer")
    consumer = PartyKey.generate("consumer", "ops")
    consumer.save(tmp_path / "consumer.key")
    signer.public.save(tmp_path / "signer.pub")
    recipients = [Recipient("ops", consumer.public.rid, consumer.public.kx_pub, tuple(ALERT_FIELDS))]
    shared = [
        _subscriber(mosquitto, tmp_path, "--share", "ops"),
        _subscriber(mosquitto, tmp_path, "--share", "ops"),
    ]
    plain = _subscriber(mosquitto, tmp_path)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    sent = []
    try:
        for i in range(N_ALERTS):
            dev, seq = DEVICES[i % len(DEVICES)], i // len(DEVICES) + 1
            fields = {"window_seq": i, "t0": 0.0, "t1": 1.0, "track_id": 1, "label": "fall", "score": 0.9}
            blob = build_alert(
                dev, seq, time.time(), fields, recipients, signer.sign, fingerprint(signer.public.sign_pub)
            )
            pub.publish(f"veilcam/{dev}/alerts", blob, qos=1).wait_for_publish(10)
            sent.append((dev, seq))
    finally:
        pub.loop_stop()
        pub.disconnect()
    assert _alerts_of(plain) == sorted(sent)  # a non-shared consumer sees everything (then exits)
    time.sleep(1.0)  # the group got its copies by now too; neither member reaches --count alone
    for p in shared:
        p.send_signal(signal.SIGINT)
    got = [_alerts_of(p) for p in shared]
    assert sorted(got[0] + got[1]) == sorted(sent)  # every alert once across the group
    assert not set(got[0]) & set(got[1])
    assert got[0] and got[1]  # the broker really split the stream


def test_share_group_name_is_checked() -> None:
    from config.broker import BrokerConfig
    from enclave_bridge.host.alert_opener import AlertOpener

    k = PartyKey.generate("consumer", "x")
    opener = AlertOpener(k, k.public.sign_pub)
    with pytest.raises(ConfigError, match="group name"):
        AlertSubscriber(BrokerConfig(), opener, print, share_group="a/b")
    sub = AlertSubscriber(BrokerConfig(), opener, print, share_group="ops", device="cam-7")
    assert sub.topic == "$share/ops/veilcam/cam-7/alerts"
