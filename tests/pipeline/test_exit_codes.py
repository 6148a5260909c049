"""Honest exits (issue 12): `veilcam subscribe` with a key the policy does not name says so and
exits 1 (genuine alerts are not "forged"); an unreachable broker is exit 1 unless `--wait`;
`veilcam broker` serves, refuses a taken port in one line and stops on SIGTERM; `veilcam run`
exits 1 when a camera evaluated no window. Real brokers (Mosquitto, else the embedded one), real
processes, a real clip."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from config.broker import BrokerConfig
from enclave_bridge.shared.keys import PartyKey
from pipeline.app.subscriber import AlertSubscriber
from pipeline.broker import free_port, start_broker
from pipeline.messages import AlertEnvelope
from pipeline.outbox import Outbox
from stages.alerts import AlertPublisher
from tests.pipeline.test_subscriber_alerts import Parties

REPO = Path(__file__).resolve().parents[2]
VEILCAM = [sys.executable, "-m", "pipeline"]


def test_genuine_alert_without_a_grant_is_no_forgery() -> None:
    p = Parties()
    stranger = PartyKey.generate("consumer", "stranger")
    from enclave_bridge.host.alert_opener import AlertOpener

    got: list[dict[str, object]] = []
    sub = AlertSubscriber(BrokerConfig(), AlertOpener(stranger, p.signer.public.sign_pub), got.append)
    assert sub.handle("veilcam/lobby/alerts", p.alert("lobby", 1)) is None
    forged = p.alert("lobby", 2, signer=PartyKey.generate("data-owner", "mallory"))
    assert sub.handle("veilcam/lobby/alerts", forged) is None
    st = sub.stats
    assert (st.rejected_no_grant, st.rejected_forged, st.delivered) == (1, 1, 0)
    assert sub.no_grant.is_set()
    sub.stop()


def test_subscribe_with_a_key_without_grant_exits_1(tmp_path: Path) -> None:
    p = Parties()
    PartyKey.generate("consumer", "stranger").save(tmp_path / "stranger.key")
    p.signer.public.save(tmp_path / "signer.pub")
    with start_broker("auto", workdir=tmp_path / "broker") as broker:
        proc = subprocess.Popen(
            [*VEILCAM, "subscribe", "--broker", broker.address, "--timeout-s", "60",
             "--consumer-key", str(tmp_path / "stranger.key"), "--signer-pub", str(tmp_path / "signer.pub")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                if line.startswith("# subscribed"):
                    break
            ob = Outbox(tmp_path / "o.sqlite")
            pub = AlertPublisher(BrokerConfig(host=broker.host, port=broker.port), ob, ["lobby"])
            pub.start()
            ob.put(AlertEnvelope("lobby", 1, 1.0, p.alert("lobby", 1), 1))
            assert pub.wait_idle(20)
            out, err = proc.communicate(timeout=60)
            pub.stop()
            ob.close()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 1, err
    assert "this key has no grant in the policy" in err
    assert "0 forged" in err and "1 without a grant" in err
    assert out.strip() == ""


def test_subscribe_to_an_unreachable_broker_exits_1_unless_waiting(tmp_path: Path) -> None:
    p = Parties()
    p.consumer.save(tmp_path / "ops.key")
    p.signer.public.save(tmp_path / "signer.pub")
    port = free_port()  # nothing listens there
    keys = ["--consumer-key", str(tmp_path / "ops.key"), "--signer-pub", str(tmp_path / "signer.pub")]
    argv = [*VEILCAM, "subscribe", "--broker", f"127.0.0.1:{port}", *keys]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 1
    assert f"veilcam: error: broker 127.0.0.1:{port}: cannot connect" in r.stderr
    assert "--wait" in r.stderr
    r = subprocess.run(
        [*argv, "--wait", "--timeout-s", "2"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "# 0 alert(s)" in r.stderr


def test_veilcam_broker_serves_refuses_a_taken_port_and_stops(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*VEILCAM, "broker", "--port", str(port), "--kind", "embedded"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith(f"embedded MQTT broker on 127.0.0.1:{port}"), first + proc.stderr.read()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        second = subprocess.run(
            [*VEILCAM, "broker", "--port", str(port)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        assert second.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
        assert "Traceback" not in second.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with socket.socket() as s:  # the embedded broker child is gone with it
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert list(tmp_path.iterdir()) == []  # its temp workdir is not here, and nothing else was written


def test_run_exits_1_when_a_camera_evaluated_no_window(tmp_path: Path) -> None:
    """An empty scene (nobody to track) gives no window: the daemon says so and exits 1."""
    clip = tmp_path / "empty.avi"
    w = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (160, 120))
    for _ in range(12):
        w.write(np.full((120, 160, 3), 40, np.uint8))
    w.release()
    cfg = {
        "state_dir": "state",
        "data_key_path": "data.key",
        "enclave": {"address": None, "recipients": ["ops.pub"]},
        "metrics": {"enabled": False},
        "cameras": {"wall": {"source": "empty.avi"}},
    }
    (tmp_path / "veilcam.yaml").write_text(yaml.safe_dump(cfg))
    keys = subprocess.run(
        [*VEILCAM, "keygen", "--data-key", str(tmp_path / "data.key")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert keys.returncode == 0, keys.stderr
    PartyKey.generate("consumer", "ops").public.save(tmp_path / "ops.pub")
    r = subprocess.run(
        [*VEILCAM, "run", "--config", str(tmp_path / "veilcam.yaml")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr[-2000:]
    assert "camera wall: no window was evaluated (12 frame(s) captured" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("kind", ["embedded"])
def test_start_broker_checks_the_port_before_starting(tmp_path: Path, kind: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        from enclave_bridge.shared.errors import ConfigError

        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            start_broker(kind, port=port, workdir=tmp_path)  # type: ignore[arg-type]


def test_evidence_from_an_unreachable_broker_fails_or_is_waited_for(tmp_path: Path) -> None:
    """`--evidence-from-broker` needs the broker before anything else: exit 1 at once without
    `--wait`; with it, retried until `--timeout-s`, then exit 1 naming the cause."""
    p = Parties()
    p.consumer.save(tmp_path / "ops.key")
    (tmp_path / "platform.pub").write_bytes(b"unused: never reached")
    port = free_port()
    argv = [
        *VEILCAM,
        "subscribe",
        "--broker",
        f"127.0.0.1:{port}",
        "--consumer-key",
        str(tmp_path / "ops.key"),
    ]
    argv += [
        "--evidence-from-broker",
        "--platform-pub",
        str(tmp_path / "platform.pub"),
        "--measurement",
        "00",
    ]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 1 and f"broker 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "retrying" not in r.stderr
    r = subprocess.run(
        [*argv, "--wait", "--timeout-s", "3"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert r.returncode == 1 and f"broker 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "enclave evidence not available yet" in r.stderr  # it did retry
