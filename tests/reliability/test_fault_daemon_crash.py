"""The daemon dies between the enclave's reply and the outbox commit: no alert lost, none doubled.

Real evaluation + key enclave processes (`tests/enclave_bridge/test_enclave_service_support`), the
real outbox database, real sealed windows:
- the crash gap itself, made deterministic: a window is journalled and answered (the enclave numbers
  and seals alert #N) but the daemon "dies" before storing the alert; the next start finds the
  window, resubmits it flagged `resend` and stores the very same alert #N (same bytes);
- a restarted file replay resumes after the media time already evaluated (no second alert for the
  same window under a new number) and a finished replay starts over next time;
- an enclave restart longer than the old retry budget (1+2+4 s) loses no window with the default
  settings; an enclave that never comes back drops windows, which is counted and exits 1.
The SIGKILL-at-random-points runs are in `test_fault_daemon_sigkill.py`.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from config.schema import REPO_ROOT, EnclaveConfig, RulesConfig
from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.shared.attest import new_nonce
from enclave_bridge.shared.windows import seal_window
from pipeline.app.daemon import Daemon
from pipeline.app.replay import replay_config
from pipeline.messages import EndOfStream, SealedWindow
from pipeline.outbox import Outbox
from pipeline.queues import BoundedQueue
from pipeline.stats import CameraStats
from stages.enclave_client import EnclaveStage, RemoteEnclave
from tests.enclave_bridge.test_enclave_service_support import make_deployment, window
from tests.security.test_security_support import RULES_ALL, provisioned, short_root

VTEST = REPO_ROOT / "samples" / "vtest.avi"
DEV = "cam1"


@pytest.fixture(scope="module")
def dep():
    d = make_deployment(short_root("crash"))
    try:
        provisioned(d)
        yield d
    finally:
        d.stop_all()
        shutil.rmtree(d.root, ignore_errors=True)


def opener(d) -> AlertOpener:
    with d.client() as c:
        ev = c.evidence(nonce := new_nonce())
    return AlertOpener(d.c1, d.verifier("eval").verify(ev, nonce).sign_pub)


def sealed(d, dev: str, seq: int, t: float, seed: int) -> SealedWindow:
    blob = seal_window(d.dk, dev, seq, t, t + 1.6, window(seed))
    return SealedWindow(dev, seq, time.time(), t, t + 1.6, d.dk.kid, blob)


def stage(d, outbox: Outbox, dev: str, items: list, source: str | None = None) -> EnclaveStage:
    q: BoundedQueue[SealedWindow | EndOfStream] = BoundedQueue(100, "block")
    for it in items:
        q.put(it)
    q.close()
    return EnclaveStage(
        dev,
        RemoteEnclave(d.ev_addr, timeout_s=60),
        RULES_ALL,
        q,
        outbox.put,
        CameraStats(dev),
        journal=outbox,
        source_key=source,
    )


def test_crash_between_reply_and_commit_loses_and_doubles_nothing(dep, tmp_path: Path) -> None:
    dev = "gap1"
    ob = Outbox(tmp_path / "outbox.sqlite")
    w1, w2 = sealed(dep, dev, 1, 0.0, 1), sealed(dep, dev, 2, 0.8, 2)
    stage(dep, ob, dev, [w1]).run(threading.Event())  # alert #1 committed normally
    # the next window is journalled and answered (alert #2 numbered and sealed in the enclave) ...
    ob.put_window(w2)
    link = RemoteEnclave(dep.ev_addr, timeout_s=60)
    link.hello(dev, RULES_ALL)
    answered = link.submit(w2.blob)
    link.close()
    assert answered.status == "ok" and len(answered.alerts) == 1
    ob.close()  # ... and the daemon dies before the outbox commit
    ob = Outbox(tmp_path / "outbox.sqlite")  # next start
    assert [w.seq for w in ob.pending_windows(dev)] == [2]
    st = stage(dep, ob, dev, [sealed(dep, dev, 3, 1.6, 3)])
    st.run(threading.Event())
    assert st.stats.get("windows_resubmitted") == 1 and st.stats.get("windows_dropped") == 0
    items = ob.pending()
    assert [i.envelope.seq for i in items] == [1, 2, 3]
    assert items[1].envelope.payload == answered.alerts[0]  # the very alert the enclave sealed
    assert ob.pending_windows(dev) == []
    got = [opener(dep).open(i.envelope.payload) for i in items]
    assert [a["window_seq"] for a in got] == [1, 2, 3]
    ob.close()


def test_restarted_replay_resumes_after_evaluated_media_times(dep, tmp_path: Path) -> None:
    dev = "resume1"
    ob = Outbox(tmp_path / "outbox.sqlite")
    src = "clip.avi|1|1"
    first = [sealed(dep, dev, 10 + i, i * 0.8, i) for i in range(3)]
    stage(dep, ob, dev, first, source=src).run(threading.Event())  # killed after 3 windows
    assert ob.progress(dev, src) == pytest.approx(first[-1].t1)
    # the restarted replay produces the same media times again, under new window numbers
    again = [sealed(dep, dev, 20 + i, i * 0.8, 10 + i) for i in range(5)]
    st = stage(dep, ob, dev, [*again, EndOfStream(dev, 0, time.time(), reason="eof")], source=src)
    st.run(threading.Event())
    assert st.stats.get("windows_skipped_done") == 3 and st.stats.get("windows_submitted") == 2
    got = [opener(dep).open(i.envelope.payload) for i in ob.pending()]
    assert [a["t0"] for a in got] == pytest.approx([0.0, 0.8, 1.6, 2.4, 3.2])  # each media time once
    assert ob.progress(dev, src) is None  # replay finished: the next run is a new replay
    assert ob.progress("other", src) is None
    ob.close()


def daemon_cfg(d, tmp_path: Path, **enclave):
    cfg = replay_config(
        VTEST,
        state_dir=tmp_path / "state",
        overrides={"max_frames": 24, "length_frames": 8, "stride_frames": 4},
    )
    return cfg.model_copy(
        update={
            "enclave": EnclaveConfig(address=d.ev_addr, timeout_s=60, **enclave),
            "rules": RulesConfig(labels=["*"], min_score=0.0, debounce_s=0.0),
        }
    )


def test_enclave_restart_longer_than_old_retry_budget_loses_nothing(dep, tmp_path: Path) -> None:
    """Default retry settings; the enclave is down 8 s (the old 3 retries gave up after 7 s)."""
    restarted: list[threading.Thread] = []

    def on_result(w, result, _latency) -> None:
        if not restarted:
            dep.procs["eval"].send_signal(signal.SIGKILL)
            dep.procs["eval"].wait(timeout=10)
            t = threading.Timer(8.0, dep.start, args=("eval",))
            t.start()
            restarted.append(t)

    cfg = daemon_cfg(dep, tmp_path)
    ob = Outbox(tmp_path / "outbox.sqlite")
    daemon = Daemon(
        cfg,
        key=dep.dk,
        link=RemoteEnclave(dep.ev_addr, 60),
        sink=ob,
        outbox=ob,
        metrics=False,
        on_result=on_result,
    )
    daemon.start()
    assert daemon.run_until_done(tick_s=0.2) == 0
    restarted[0].join()
    st = next(iter(daemon.cameras.values())).stats
    assert st.get("windows_dropped") == 0 and st.get("windows_sealed") == 5 and st.get("enclave_errors") >= 1
    ob2 = Outbox(tmp_path / "outbox.sqlite")
    assert len(ob2.pending()) == 5 and ob2.pending_windows(next(iter(daemon.cameras.values())).device) == []
    ob2.close()


def test_window_dropped_after_retry_timeout_fails_the_run(dep, tmp_path: Path) -> None:
    """The enclave dies after the first window and stays down: retries end after
    `retry_timeout_s`, the other windows are dropped, counted (metrics `windows_dropped`), and the
    exit status says so."""
    from prometheus_client import CollectorRegistry, generate_latest

    from pipeline.metrics import VeilcamCollector

    def on_result(w, result, _latency) -> None:
        if dep.procs["eval"].poll() is None:
            dep.procs["eval"].send_signal(signal.SIGKILL)
            dep.procs["eval"].wait(timeout=10)

    cfg = daemon_cfg(dep, tmp_path, retry_backoff_s=0.1, retry_timeout_s=1.0)
    ob = Outbox(tmp_path / "outbox.sqlite")
    daemon = Daemon(
        cfg,
        key=dep.dk,
        link=RemoteEnclave(dep.ev_addr, 60),
        sink=ob,
        outbox=ob,
        metrics=False,
        on_result=on_result,
    )
    try:
        daemon.start()
        assert daemon.run_until_done(tick_s=0.2) == 1
    finally:
        dep.start("eval")
    cam = next(iter(daemon.cameras.values()))
    assert cam.stats.get("windows_dropped") == cam.stats.get("windows_sealed") - 1 >= 2
    registry = CollectorRegistry()
    registry.register(VeilcamCollector(daemon))
    text = generate_latest(registry).decode()
    n = cam.stats.get("windows_dropped")
    assert f'veilcam_events_total{{camera="{cam.device}",event="windows_dropped"}} {n}.0' in text


def test_resumed_replay_with_every_window_done_is_not_an_unproductive_camera() -> None:
    """Killed after its last window was stored: the restarted run skips every window (done by the
    previous run) and must exit 0, not report "no window was evaluated"."""
    from types import SimpleNamespace

    from pipeline.app.cli_daemon import unproductive_camera

    stats = CameraStats("gate")
    cam = SimpleNamespace(device="gate", stats=stats, end=EndOfStream("gate", 99, time.time(), reason="eof"))
    assert unproductive_camera(cam) is not None  # nothing evaluated at all: an error
    stats.inc("windows_skipped_done", 12)
    assert unproductive_camera(cam) is None
