"""`veilcam demo` as a user runs it: one command, real processes (enclaves, GPU worker, broker,
daemon), alerts printed as the subscriber sees them, nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.broker import embedded_available, mosquitto_path

REPO = Path(__file__).resolve().parents[2]


def _demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "--log-level", "WARNING", "demo", *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=env,
    )


def _no_children_left(tmp_path: Path) -> None:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in out, "a demo process is still running"


@pytest.mark.broker
def test_demo_one_command_prints_decrypted_alerts_and_cleans_up(tmp_path: Path) -> None:
    if mosquitto_path() is None and not embedded_available():
        pytest.skip("no broker: mosquitto or the embedded one (amqtt, a dependency of veilcam: reinstall it)")
    # 32 frames at 10 fps = one 30-frame window of the (default or placeholder) model
    r = _demo(tmp_path, "--max-frames", "32", "--mode", "enclave", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    alerts = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(alerts) >= 1
    a = alerts[0]
    assert a["device"] == "demo-cam" and a["seq"] == 1
    # the consumer was granted every field, and it decrypted them
    assert {"label", "score", "t0", "t1", "track_id", "window_seq", "topk"} <= set(a)
    assert 0.0 <= a["score"] <= 1.0
    assert "enclaves attested" in r.stderr and "alert(s) delivered" in r.stderr
    assert [p for p in tmp_path.iterdir() if p.name.startswith("veilcam-demo-")] == []
    _no_children_left(tmp_path)


@pytest.mark.broker
def test_demo_on_the_fall_clip_raises_a_fall_alert_end_to_end(tmp_path: Path, shared_sample) -> None:
    """Real footage through the whole secure system: pose, sealed windows, attested enclave, MQTT,
    consumer decryption — the window covering the fall (~3.0-3.7 s) arrives as `falling`."""
    if mosquitto_path() is None and not embedded_available():
        pytest.skip("no broker: mosquitto or the embedded one (amqtt, a dependency of veilcam: reinstall it)")
    clip = shared_sample("fall-01-cam0.mp4")
    r = _demo(
        tmp_path,
        "--clip",
        str(clip),
        "--crop",
        "320",
        "0",
        "320",
        "240",
        "--max-frames",
        "0",
        "--mode",
        "enclave",
        "--min-score",
        "0.5",
        "--json",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    alerts = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    falls = [a for a in alerts if a["label"] == "falling"]
    assert any(a["t0"] <= 3.2 and a["t1"] >= 3.5 for a in falls), alerts
    _no_children_left(tmp_path)


@pytest.mark.slow
@pytest.mark.broker
def test_demo_paper_mode_with_embedded_broker_keep_dir(tmp_path: Path) -> None:
    if not embedded_available():
        pytest.skip("embedded broker (amqtt, a dependency of veilcam) is not importable: reinstall veilcam")
    keep = tmp_path / "kept"
    r = _demo(tmp_path, "--max-frames", "45", "--broker", "embedded", "--keep", str(keep))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith("ALERT ")]
    assert lines and "demo-cam #1" in lines[0]
    assert "embedded MQTT broker" in r.stderr
    # kept: configs and logs for a look; the daemon spoke MQTT 3.1.1 to the embedded broker
    assert (keep / "veilcam-demo.yaml").is_file() and (keep / "evidence.msgpack").is_file()
    assert "MQTT 3.1.1" in (keep / "daemon.log").read_text()
    _no_children_left(keep)


def test_demo_missing_clip_is_a_clear_error(tmp_path: Path) -> None:
    r = _demo(tmp_path, "--clip", str(tmp_path / "nope.avi"))
    assert r.returncode == 1
    assert "clip" in r.stderr and "not found" in r.stderr
