"""The daemon end to end on a real clip: real pose child process, real AES-GCM windows, the local
evaluator's real ST-GCN, real alert envelopes opened as a consumer would; plus its failure modes."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from config.schema import (
    REPO_ROOT,
    CameraConfig,
    EnclaveConfig,
    MetricsConfig,
    ReconnectConfig,
    RulesConfig,
    SupervisorConfig,
    VeilcamConfig,
)
from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.keys import PartyKey, generate_data_key
from pipeline.app.daemon import Daemon, ListSink, make_local_enclave
from pipeline.app.replay import format_summary, plot_timeline, replay_config, run_replay
from pipeline.errors import StageError

VTEST = REPO_ROOT / "samples" / "vtest.avi"
LABELS = ["walking", "standing", "falling"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (randomly initialised) ST-GCN with model.json window defaults T=8, stride=4, 10 fps."""
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(3)
    torch.save(STGCN(len(LABELS)).state_dict(), d / "model.pt")
    (d / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (d / "model.json").write_text(json.dumps({"T": 8, "stride": 4, "fps": 10}))
    return d


def config_for(clip: Path, model_dir: Path, state: Path, max_frames: int, **cam: object) -> VeilcamConfig:
    cfg = replay_config(clip, state_dir=state, overrides={"max_frames": max_frames, **cam})
    return cfg.model_copy(
        update={
            "enclave": EnclaveConfig(model_dir=model_dir),
            "rules": RulesConfig(labels=["*"], min_score=0.0, debounce_s=0.0),
        }
    )


def test_replay_real_clip_end_to_end(tmp_path: Path, model_dir: Path) -> None:
    cfg = config_for(VTEST, model_dir, tmp_path / "state", max_frames=20)
    consumer = PartyKey.generate("consumer", "ops")
    sink = ListSink()
    report = run_replay(VTEST, cfg, progress=False, consumer_key=consumer, sink=sink)
    assert report.error is None and report.exit_code == 0
    assert report.frames == 20
    assert report.stages["pose"].count == 20
    # T=8, stride=4 from model.json: windows end at frames 8, 12, 16, 20.
    assert report.windows == 4 and report.window_length_frames == 8
    seqs = [s for s, *_ in report.windows_timeline]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert [status for *_, status in report.windows_timeline] == ["ok"] * 4
    # Every window raised an alert (min_score 0), opened with the consumer key (verified + decrypted).
    assert len(report.alerts) == 4 == len(sink.items)
    assert [a["window_seq"] for a in report.alerts] == seqs
    assert all(a["label"] in LABELS for a in report.alerts)
    # flat list: pytest >= 9.2 refuses approx on nested sequences
    assert [t for a in report.alerts for t in (a["t0"], a["t1"])] == pytest.approx(
        [0.0, 0.7, 0.4, 1.1, 0.8, 1.5, 1.2, 1.9]
    )
    assert [e.window_seq for e in sink.items] == seqs
    text = format_summary(report)
    assert "pose" in text and "end_to_end" in text and report.alerts[0]["label"] in text
    png = plot_timeline(report, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_window_seq_continues_across_runs(tmp_path: Path, model_dir: Path) -> None:
    state = tmp_path / "state"
    first = run_replay(VTEST, config_for(VTEST, model_dir, state, max_frames=8), progress=False)
    second = run_replay(VTEST, config_for(VTEST, model_dir, state, max_frames=8), progress=False)
    s1 = [s for s, *_ in first.windows_timeline]
    s2 = [s for s, *_ in second.windows_timeline]
    assert s1 and s2 and min(s2) > max(s1)
    a1 = [a["seq"] for a in first.alerts]
    a2 = [a["seq"] for a in second.alerts]
    assert a1 and a2 and min(a2) > max(a1)  # alert numbers are persisted as well


def test_wrong_data_key_is_a_clear_error(tmp_path: Path, model_dir: Path) -> None:
    cfg = config_for(VTEST, model_dir, tmp_path / "state", max_frames=8)
    enclave_key, camera_key = generate_data_key(), generate_data_key()
    link = make_local_enclave(cfg, enclave_key, [PartyKey.generate("consumer", "ops").public])
    report = run_replay(VTEST, cfg, key=camera_key, link=link, progress=False)
    assert report.exit_code == 1
    assert report.windows_rejected == report.windows == 1
    assert "rejected 1 of 1 windows" in report.error and camera_key.kid in report.error
    assert report.alert_envelopes == 0


def test_corrupt_and_truncated_clips(tmp_path: Path, model_dir: Path) -> None:
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    with pytest.raises(StageError, match="cannot decode"):
        run_replay(garbage, config_for(garbage, model_dir, tmp_path / "s1", max_frames=8), progress=False)
    data = VTEST.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 50])  # ~2%: a dozen frames decode, then the file ends
    cfg = config_for(cut, model_dir, tmp_path / "s2", max_frames=None)
    report = run_replay(cut, cfg, progress=False)
    assert report.exit_code == 1 and "truncated" in report.error
    assert 0 < report.frames < 795
    assert report.windows >= 1  # what was decoded is still evaluated


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_failed_camera_is_given_up_within_budget_and_the_daemon_survives(
    tmp_path: Path, model_dir: Path, unused_tcp_port: int
) -> None:
    """An unreachable RTSP camera fails (restart budget 2), a file camera beside it completes,
    /healthz reports 503 and /metrics counts the restarts."""
    key = generate_data_key()
    cfg = VeilcamConfig(
        state_dir=tmp_path / "state",
        data_key_path=tmp_path / "unused.key",
        enclave=EnclaveConfig(model_dir=model_dir),
        rules=RulesConfig(min_score=0.0, debounce_s=0.0),
        metrics=MetricsConfig(listen="127.0.0.1:0"),
        supervisor=SupervisorConfig(max_restarts=2, window_s=60, backoff_s=0.05),
        cameras={
            "gate": CameraConfig(
                source=f"rtsp://127.0.0.1:{unused_tcp_port}/live",
                # down at start: reconnect loop first (1 attempt here), then the supervisor's budget
                reconnect=ReconnectConfig(open_timeout_s=1, initial_backoff_s=0.05, max_attempts=1),
            ),
            "file": CameraConfig(source=str(VTEST), max_frames=12),
        },
    )
    link = make_local_enclave(cfg, key, [PartyKey.generate("consumer", "ops").public])
    sink = ListSink()
    daemon = Daemon(cfg, key=key, link=link, sink=sink)
    daemon.start()
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(daemon.run_until_done(tick_s=0.1)))
    gate = daemon.cameras["gate"]
    base = daemon.metrics_server.url
    deadline = time.monotonic() + 60
    while gate.stats.status != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gate.stats.status == "failed"
    assert gate.stats.get("stage_restarts") == 2
    code, body = _get(base + "/healthz")
    assert code == 503 and json.loads(body)["cameras"]["gate"] == "failed"
    code, body = _get(base + "/metrics")
    text = body.decode()
    assert code == 200
    assert 'veilcam_events_total{camera="gate",event="stage_restarts"} 2.0' in text
    assert 'veilcam_queue_depth{camera="file",queue="frames"}' in text
    assert "veilcam_stage_latency_seconds_bucket" in text
    runner.start()
    runner.join(120)
    assert result == [1]  # a camera failed: non-zero exit so systemd restarts the daemon
    file_cam = daemon.cameras["file"]
    assert file_cam.stats.status == "done" and file_cam.stats.get("windows_sealed") == 2
    assert len(sink.items) == 2
    assert "cannot open stream" in str(gate.failure)


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sd_notify_ready_watchdog_stopping(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    messages: list[str] = []
    done = threading.Event()

    def reader() -> None:  # plays systemd: reads every notification as it arrives
        while not done.is_set():
            try:
                messages.append(sock.recv(256).decode())
            except TimeoutError:
                continue

    t = threading.Thread(target=reader)
    t.start()
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    key = generate_data_key()
    cfg = config_for(VTEST, model_dir, tmp_path / "state", max_frames=8)
    link = make_local_enclave(cfg, key, [PartyKey.generate("consumer", "ops").public])
    daemon = Daemon(cfg, key=key, link=link, sink=ListSink(), metrics=False)
    daemon.start()
    assert daemon.run_until_done(tick_s=0.05) == 0
    time.sleep(0.3)
    done.set()
    t.join(5)
    sock.close()
    assert messages[0] == "READY=1" and messages[-1] == "STOPPING=1"
    assert "WATCHDOG=1" in messages


def test_sd_notify_never_blocks_the_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody reads the notify socket: notifications are dropped, the caller never blocks."""
    import socket

    from pipeline.app.daemon import Notifier

    sock_path = tmp_path / "deaf.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    n = Notifier()
    t = threading.Thread(target=lambda: [n.notify("WATCHDOG=1") for _ in range(5000)], daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive()  # a blocking socket would hang after ~10 queued datagrams
    sock.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    Notifier().notify("READY=1")  # not under systemd: a no-op


def test_unreachable_enclave_is_a_clear_error(tmp_path: Path, model_dir: Path) -> None:
    cfg = config_for(VTEST, model_dir, tmp_path / "state", max_frames=8)
    sock = tmp_path / "no-enclave.sock"
    cfg = cfg.model_copy(update={"enclave": EnclaveConfig(address=f"unix:{sock}", timeout_s=2)})
    report = run_replay(VTEST, cfg, key=generate_data_key(), progress=False)
    assert report.exit_code == 1
    assert str(sock) in report.error
    assert report.alert_envelopes == 0
