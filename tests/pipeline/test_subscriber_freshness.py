"""A consumer without `--state` rejects genuine alerts outside a freshness window (issue 19.7).

Without the seen-set, nothing told a 15-minute-old genuine alert re-published by anyone from a new
one. Real envelopes (`build_alert`, real keys) go through `AlertSubscriber.handle`, the exact path
broker messages take.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from config.broker import BrokerConfig
from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.measured.alerts import build_alert
from enclave_bridge.shared.keys import PartyKey, fingerprint, raw_public_bytes
from enclave_bridge.shared.policy import ALERT_FIELDS, Recipient
from pipeline.app.cli_mqtt import freshness_window
from pipeline.app.subscriber import AlertSubscriber


@pytest.fixture
def parts():
    signer = Ed25519PrivateKey.generate()
    pub = raw_public_bytes(signer.public_key())
    consumer = PartyKey.generate("consumer", "ops")
    recips = [Recipient("ops", consumer.public.rid, consumer.public.kx_pub, tuple(ALERT_FIELDS))]

    def alert(seq: int, age_s: float) -> bytes:
        fields = {"label": "falling", "score": 0.9}
        return build_alert("gate", seq, time.time() - age_s, fields, recips, signer.sign, fingerprint(pub))

    return AlertOpener(consumer, pub), alert


def subscriber(opener: AlertOpener, max_age_s: float | None) -> AlertSubscriber:
    return AlertSubscriber(
        BrokerConfig(host="127.0.0.1", port=1), opener, lambda a: None, max_age_s=max_age_s
    )


def test_old_genuine_alert_is_rejected_without_state(parts) -> None:
    opener, alert = parts
    sub = subscriber(opener, freshness_window(None, None))
    assert sub.handle("veilcam/gate/alerts", alert(1, age_s=900.0)) is None  # 15 min old, re-published
    assert sub.stats.rejected_stale == 1 and sub.stats.delivered == 0
    assert sub.handle("veilcam/gate/alerts", alert(2, age_s=-3600.0)) is None  # from "the future"
    fresh = sub.handle("veilcam/gate/alerts", alert(3, age_s=2.0))
    assert fresh is not None and fresh["seq"] == 3
    assert (sub.stats.rejected_stale, sub.stats.delivered, sub.stats.rejected_forged) == (2, 1, 0)


def test_window_is_configurable_and_off_with_state(parts, tmp_path: Path) -> None:
    opener, alert = parts
    assert freshness_window(None, tmp_path / "seen.sqlite") is None  # the seen-set guards instead
    assert freshness_window(60.0, tmp_path / "seen.sqlite") == 60.0
    assert freshness_window(0.0, None) is None
    assert subscriber(opener, None).handle("veilcam/gate/alerts", alert(1, age_s=900.0)) is not None
    short = subscriber(opener, freshness_window(60.0, None))
    assert short.handle("veilcam/gate/alerts", alert(2, age_s=120.0)) is None
