"""The evaluation enclave dies or a reply is lost: no window and no alert may be lost.

- A reply lost in transit (client timeout shorter than the evaluation): resubmitting the very same
  sealed window as a `retry` returns the same result and the same alert envelopes (idempotent),
  instead of a `replay` rejection that would silently lose the window and its numbered alert.
- The enclave process is SIGKILLed and restarted (sealed state reloaded): the same holds across
  the restart, older windows are still refused as replays.
- The camera daemon, fed a clip, survives the enclave being SIGKILLed between windows: it
  reconnects, says hello again, retries, and every window is evaluated; alert `seq` continues.
"""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

import pytest

from config.schema import REPO_ROOT, EnclaveConfig, RulesConfig
from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.host.client import EnclaveClient
from enclave_bridge.shared.attest import new_nonce
from enclave_bridge.shared.errors import TransportError
from enclave_bridge.shared.windows import seal_window
from pipeline.app.daemon import Daemon, ListSink
from pipeline.app.replay import replay_config
from stages.enclave_client import RemoteEnclave
from tests.enclave_bridge.test_enclave_service_support import make_deployment, window
from tests.security.test_security_support import RULES_ALL, provisioned, short_root

VTEST = REPO_ROOT / "samples" / "vtest.avi"


@pytest.fixture
def dep():
    d = make_deployment(short_root("rst"))
    try:
        provisioned(d)
        yield d
    finally:
        d.stop_all()
        shutil.rmtree(d.root, ignore_errors=True)


def _opener(d) -> AlertOpener:
    with d.client() as c:
        ev = c.evidence(nonce := new_nonce())
    return AlertOpener(d.c1, d.verifier("eval").verify(ev, nonce).sign_pub)


def test_lost_reply_and_enclave_crash_retry_is_idempotent(dep) -> None:
    x = window(5)
    with dep.client() as c:
        c.hello("cam1", RULES_ALL)
        assert c.submit(seal_window(dep.dk, "cam1", 1, 0.0, 1.0, x)).status == "ok"
    blob = seal_window(dep.dk, "cam1", 2, 1.0, 2.0, x)
    impatient = EnclaveClient(dep.ev_addr, timeout_s=0.005)  # gives up before the evaluation ends
    with pytest.raises(TransportError):
        impatient.submit(blob)
    impatient.close()
    impatient._rpc.timeout_s = 60  # the same client, patient now: its resubmission is flagged a retry
    auto = impatient.submit(blob)
    impatient.close()
    assert (auto.status, auto.reason, len(auto.alerts)) == ("ok", None, 1)
    with dep.client() as c:
        plain = c.submit(blob)  # a resubmission not flagged as a retry is a replay, as before
        assert (plain.status, plain.reason) == ("rejected", "replay")
        again = c.submit(blob, retry=True)  # what the daemon's retry does (same client: automatic)
        assert (again.status, again.reason, again.window_seq, len(again.alerts)) == ("ok", None, 2, 1)
        once_more = c.submit(blob, retry=True)
        assert once_more.alerts == again.alerts  # the same signed envelope: consumers dedupe it
        stats = c.stats()
    assert stats["windows_ok"] == 2 and stats["alerts"] == 2 and stats.get("windows_retried") == 3
    first_alert = _opener(dep).open(again.alerts[0])
    assert (first_alert["seq"], first_alert["window_seq"]) == (2, 2)

    # SIGKILL, restart: counters, the last result and the signing key come back sealed
    dep.procs["eval"].send_signal(signal.SIGKILL)
    dep.procs["eval"].wait(timeout=10)
    dep.start("eval")
    with dep.client() as c:
        c.hello("cam1", RULES_ALL)
        after = c.submit(blob, retry=True)
        assert (after.status, after.alerts) == ("ok", again.alerts)
        old = c.submit(seal_window(dep.dk, "cam1", 1, 0.0, 1.0, x))
        assert (old.status, old.reason) == ("rejected", "replay")
        # a *different* window claiming the last seq is a replay, not a retry
        forged_retry = c.submit(seal_window(dep.dk, "cam1", 2, 1.0, 2.0, window(6)), retry=True)
        assert (forged_retry.status, forged_retry.reason) == ("rejected", "replay")
        nxt = c.submit(seal_window(dep.dk, "cam1", 3, 2.0, 3.0, x))
    assert _opener(dep).open(nxt.alerts[0])["seq"] == 3  # alert numbering continued


def test_daemon_survives_enclave_sigkill_between_windows(dep, tmp_path: Path) -> None:
    cfg = replay_config(
        VTEST,
        state_dir=tmp_path / "state",
        overrides={"max_frames": 24, "length_frames": 8, "stride_frames": 4},
    )
    cfg = cfg.model_copy(
        update={
            "enclave": EnclaveConfig(address=dep.ev_addr, timeout_s=60, retry_backoff_s=0.5, max_retries=8),
            "rules": RulesConfig(labels=["*"], min_score=0.0, debounce_s=0.0),
        }
    )
    restarted: list[threading.Thread] = []

    def on_result(w, result, _latency) -> None:
        if not restarted:  # after the first window: kill -9 now, bring it back 1 s later
            dep.procs["eval"].send_signal(signal.SIGKILL)
            dep.procs["eval"].wait(timeout=10)
            t = threading.Timer(1.0, dep.start, args=("eval",))
            t.start()
            restarted.append(t)

    sink = ListSink()
    link = RemoteEnclave(dep.ev_addr, timeout_s=60)
    daemon = Daemon(cfg, key=dep.dk, link=link, sink=sink, metrics=False, on_result=on_result)
    daemon.start()
    assert daemon.run_until_done(tick_s=0.2) == 0
    restarted[0].join()
    stats = next(iter(daemon.cameras.values())).stats
    assert stats.get("windows_sealed") == 5
    assert stats.get("windows_dropped") == 0 and stats.get("windows_rejected") == 0
    assert stats.get("enclave_errors") >= 1  # the outage was seen and counted
    opener = _opener(dep)
    alerts = [opener.open(e.payload) for e in sink.items]
    assert [a["seq"] for a in alerts] == [1, 2, 3, 4, 5]  # sealed counter reloaded: no reuse, no gap
    assert [a["window_seq"] for a in alerts] == sorted(a["window_seq"] for a in alerts)
