"""The in-process evaluator behind `EnclaveLink` and the enclave stage (rejections, alerts, retries)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.keys import PartyKey, generate_data_key
from enclave_bridge.shared.policy import ALERT_FIELDS, Recipient
from enclave_bridge.shared.windows import seal_window
from pipeline.errors import ConfigError, TransportError
from pipeline.messages import AlertEnvelope, EndOfStream, SealedWindow
from pipeline.queues import BoundedQueue
from pipeline.stats import CameraStats
from stages.enclave_client import (
    EnclaveLink,
    EnclaveStage,
    LocalEnclave,
    SubmitResult,
    alert_header,
    load_model_dir,
)

LABELS = ["walk", "fall", "wave"]


@pytest.fixture(scope="module")
def model() -> STGCN:
    torch.manual_seed(0)
    return STGCN(len(LABELS)).eval()


def make_local(model: STGCN, key, consumer: PartyKey, start_seq: int = 100) -> LocalEnclave:
    pub = consumer.public
    counter = iter(range(start_seq, 10**9))
    return LocalEnclave(
        {key.kid: key},
        model,
        LABELS,
        PartyKey.generate("data-owner", "local-evaluator"),
        [Recipient(pub.name, pub.rid, pub.kx_pub, tuple(ALERT_FIELDS))],
        lambda _device: next(counter),
    )


def window(key, seq: int, t0: float = 0.0, device: str = "cam") -> bytes:
    data = np.random.default_rng(seq).normal(0, 0.1, (3, 8, 18, 2)).astype(np.float32)
    return seal_window(key, device, seq, t0, t0 + 0.7, data, [4, 9])


def test_local_evaluator_alert_opens_for_the_consumer(model: STGCN) -> None:
    key, consumer = generate_data_key(), PartyKey.generate("consumer", "ops")
    enc = make_local(model, key, consumer)
    assert isinstance(enc, EnclaveLink)
    enc.hello("cam", {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0})
    res = enc.submit(window(key, 1))
    assert res.status == "ok" and res.window_seq == 1 and len(res.alerts) == 1
    alert = AlertOpener(consumer, enc.verify_key).open(res.alerts[0])
    assert alert["device"] == "cam" and alert["seq"] == 100
    assert alert["window_seq"] == 1 and alert["track_id"] == 4
    assert alert["label"] in LABELS and 0 <= alert["score"] <= 1
    assert alert["topk"][0] == [alert["label"], alert["score"]]
    # The same scores as running the model directly on the plaintext window.
    data = np.random.default_rng(1).normal(0, 0.1, (3, 8, 18, 2)).astype(np.float32)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(data[None])).double(), 1)[0]
    assert alert["score"] == pytest.approx(float(probs.max()), abs=1e-6)
    assert alert_header(res.alerts[0]) == (100, "cam")
    assert enc.stats()["windows_ok"] == 1


def test_rejections_replay_wrong_key_unknown_device(model: STGCN) -> None:
    key, consumer = generate_data_key(), PartyKey.generate("consumer", "ops")
    enc = make_local(model, key, consumer)
    enc.hello("cam", {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0})
    blob = window(key, 5)
    assert enc.submit(blob).status == "ok"
    replay = enc.submit(blob)
    assert replay.status == "rejected" and "replay" in replay.reason
    other = generate_data_key()
    wrong = enc.submit(window(other, 6))
    assert wrong.status == "rejected" and "kid" in wrong.reason
    forged = generate_data_key(kid=key.kid)  # same kid, different bytes: tag fails
    bad_tag = enc.submit(window(forged, 7))
    assert bad_tag.status == "rejected" and "authentication failed" in bad_tag.reason
    assert enc.submit(window(key, 8, device="stranger")).reason.endswith("has not said hello")
    assert enc.submit(b"\x00garbage").status == "rejected"
    assert enc.stats()["windows_rejected"] == 5
    assert enc.submit(window(key, 9)).status == "ok"  # a forged window did not advance the counter


def test_rules_threshold_labels_and_debounce(model: STGCN) -> None:
    key, consumer = generate_data_key(), PartyKey.generate("consumer", "ops")
    enc = make_local(model, key, consumer)
    with pytest.raises(ConfigError, match="not labels of the model"):
        enc.hello("cam", {"labels": ["explode"], "min_score": 0.0})
    enc.hello("cam", {"labels": ["*"], "min_score": 1.0, "debounce_s": 0})
    assert enc.submit(window(key, 1)).alerts == []  # nothing reaches score 1.0
    enc.hello("cam", {"labels": ["*"], "min_score": 0.0, "debounce_s": 5.0})
    counts = [len(enc.submit(window(key, s, t0=float(s))).alerts) for s in range(2, 12)]
    # t1 = s + 0.7; same track and (with a fixed model and similar inputs) mostly the same label:
    # an alert per label at most every 5 s of media time.
    assert sum(counts) <= 2 * len(LABELS) and counts[0] == 1


def test_load_model_dir(tmp_path: Path, model: STGCN) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_model_dir(tmp_path)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    m, labels, meta = load_model_dir(tmp_path)
    assert isinstance(m, STGCN) and not m.training
    assert labels == LABELS and meta == {}
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"model\.json"):
        load_model_dir(tmp_path)


class FlakyLink:
    """A real LocalEnclave behind a link that fails the first `failures` submits in transport."""

    def __init__(self, inner: LocalEnclave, failures: int) -> None:
        self.inner, self.failures, self.hellos = inner, failures, 0

    def hello(self, device, rules):
        self.hellos += 1
        return self.inner.hello(device, rules)

    def submit(self, blob: bytes) -> SubmitResult:
        if self.failures:
            self.failures -= 1
            raise TransportError("connection refused (test)")
        return self.inner.submit(blob)

    def stats(self):
        return self.inner.stats()

    def close(self) -> None:
        return None


def run_stage(link, key, seqs, **kw) -> tuple[list[AlertEnvelope], CameraStats, EnclaveStage]:
    q: BoundedQueue[SealedWindow | EndOfStream] = BoundedQueue(100, "block")
    for s in seqs:
        q.put(SealedWindow("cam", s, 0.0, float(s), s + 0.7, key.kid, window(key, s, t0=float(s))))
    q.put(EndOfStream("cam", 0, 0.0))
    out: list[AlertEnvelope] = []
    stats = CameraStats("cam")
    ends: list[EndOfStream] = []
    stage = EnclaveStage(
        "cam",
        link,
        {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0},
        q,
        out.append,
        stats,
        retry_backoff_s=0.01,
        on_end=ends.append,
        **kw,
    )
    stage.run(threading.Event())
    assert len(ends) == 1
    return out, stats, stage


def test_stage_sends_alerts_to_sink_and_counts(model: STGCN) -> None:
    key, consumer = generate_data_key(), PartyKey.generate("consumer", "ops")
    out, stats, _ = run_stage(make_local(model, key, consumer), key, [1, 2, 3])
    assert [a.window_seq for a in out] == [1, 2, 3]
    assert [a.seq for a in out] == [100, 101, 102]
    assert stats.get("windows_submitted") == 3 and stats.get("alerts") == 3
    assert stats.stage("enclave").snapshot().count == 3


def test_stage_retries_transport_errors_then_drops_counted(model: STGCN) -> None:
    key, consumer = generate_data_key(), PartyKey.generate("consumer", "ops")
    link = FlakyLink(make_local(model, key, consumer), failures=2)
    out, stats, _ = run_stage(link, key, [1, 2], max_retries=3)
    assert len(out) == 2 and stats.get("enclave_errors") == 2 and link.hellos >= 2
    link = FlakyLink(make_local(model, key, consumer), failures=3)
    out, stats, _ = run_stage(link, key, [1, 2], max_retries=1)
    assert stats.get("windows_dropped") == 1  # window 1: 2 attempts failed
    assert [a.window_seq for a in out] == [2]  # window 2: first attempt failed, retry succeeded


def test_stage_counts_rejections_with_a_data_key_hint(model: STGCN, caplog: pytest.LogCaptureFixture) -> None:
    key, consumer = generate_data_key(), PartyKey.generate("consumer", "ops")
    enc = make_local(model, generate_data_key(), consumer)  # the enclave holds another key
    out, stats, _ = run_stage(enc, key, [1, 2, 3])
    assert out == [] and stats.get("windows_rejected") == 3
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1  # logged once per reason, not per window
    assert "data_key_path" in errors[0].getMessage()


def test_local_evaluator_applies_the_model_input_transform(model: STGCN, tmp_path: Path) -> None:
    from enclave_bridge.measured.model_inputs import apply_input_transform

    key, consumer = generate_data_key(), PartyKey.generate("consumer", "ops")
    pub = consumer.public
    enc = LocalEnclave(
        {key.kid: key},
        model,
        LABELS,
        PartyKey.generate("data-owner", "local-evaluator"),
        [Recipient(pub.name, pub.rid, pub.kx_pub, tuple(ALERT_FIELDS))],
        lambda _device: 1,
        input_transform="person-centred",
    )
    enc.hello("cam", {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0})
    data = np.random.default_rng(1).normal(0, 0.1, (3, 8, 18, 2)).astype(np.float32)
    res = enc.submit(window(key, 1))
    alert = AlertOpener(consumer, enc.verify_key).open(res.alerts[0])
    with torch.no_grad():
        x = torch.from_numpy(apply_input_transform(data[None], "person-centred"))
        probs = torch.softmax(model(x).double(), 1)[0]
    assert alert["score"] == pytest.approx(float(probs.max()), abs=1e-6)
    # a package naming an unknown transform is refused when the model directory is loaded
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (tmp_path / "model.json").write_text('{"input_transform": "mirror"}')
    with pytest.raises(ConfigError, match="input_transform"):
        load_model_dir(tmp_path)
