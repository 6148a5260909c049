"""TLS + username/password to a real Mosquitto: alerts arrive with the right credentials and CA;
a wrong password or an untrusted CA is refused, the publisher keeps retrying and keeps the alerts."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from config.broker import BrokerConfig, TLSConfig
from pipeline.messages import AlertEnvelope
from pipeline.outbox import Outbox
from stages.alerts import AlertPublisher
from tests.conftest import Broker, free_port
from tests.stages.mqtt_helpers import Collector

pytestmark = pytest.mark.broker


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, signer, ca: bool):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return b.sign(signer, hashes.SHA256())


def _pem(path: Path, obj) -> Path:
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            obj.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


@pytest.fixture
def tls_broker(tmp_path: Path):
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("veilcam test CA", ca_key, None, ca_key, ca=True)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = _cert("localhost", srv_key, ca.subject, ca_key, ca=False)
    _pem(tmp_path / "ca.pem", ca)
    _pem(tmp_path / "server.pem", srv)
    _pem(tmp_path / "server.key", srv_key)
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(tmp_path / "passwd"), "camera-lobby", "s3cret"], check=True
    )
    (tmp_path / "passwd").chmod(0o600)
    port = free_port()
    conf = tmp_path / "mosquitto-tls.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        f"cafile {tmp_path / 'ca.pem'}\ncertfile {tmp_path / 'server.pem'}\n"
        f"keyfile {tmp_path / 'server.key'}\n"
        # as root, Mosquitto drops to user `mosquitto`, who cannot read the 0600 files in tmp_path
        + ("user root\n" if os.geteuid() == 0 else "")
        + f"allow_anonymous false\npassword_file {tmp_path / 'passwd'}\n"
        + "persistence false\nmax_queued_messages 0\nlog_dest stdout\n"
    )
    broker = Broker(host="localhost", port=port, conf=conf, log=tmp_path / "mosquitto-tls.log")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _publisher(
    broker: Broker, tmp_path: Path, name: str, password: str, ca: Path
) -> tuple[AlertPublisher, Outbox]:
    (tmp_path / f"{name}.pass").write_text(password + "\n")
    cfg = BrokerConfig(
        host=broker.host,
        port=broker.port,
        username="camera-lobby",
        password_file=tmp_path / f"{name}.pass",
        tls=TLSConfig(ca_file=ca),
        reconnect_min_delay_s=0.1,
        reconnect_max_delay_s=0.5,
    )
    assert "s3cret" not in repr(cfg) and "s3cret" not in repr(cfg.password())
    ob = Outbox(tmp_path / f"{name}.sqlite")
    return AlertPublisher(cfg, ob, ["lobby"]), ob


def test_tls_and_password(tls_broker: Broker, tmp_path: Path) -> None:
    pub, ob = _publisher(tls_broker, tmp_path, "good", "s3cret", tmp_path / "ca.pem")
    col = Collector(
        tls_broker.host,
        tls_broker.port,
        ["veilcam/#"],
        username="camera-lobby",
        password="s3cret",
        ca_file=str(tmp_path / "ca.pem"),
    )
    pub.start()
    for s in range(1, 6):
        ob.put(AlertEnvelope("lobby", s, float(s), msgpack.packb({"seq": s}), s))
    assert pub.wait_idle(20)
    assert col.wait_for(lambda m: len(col.payloads("/alerts")) >= 5)
    assert [msgpack.unpackb(p)["seq"] for p in col.payloads("/alerts")] == [1, 2, 3, 4, 5]
    assert b"online" in col.payloads("/available")
    pub.stop()
    col.close()
    ob.close()


@pytest.mark.parametrize("case", ["wrong-password", "untrusted-ca"])
def test_refused_connection_keeps_alerts_and_retries(tls_broker: Broker, tmp_path: Path, case: str) -> None:
    ca = tmp_path / "ca.pem"
    if case == "untrusted-ca":
        other_key = ec.generate_private_key(ec.SECP256R1())
        ca = _pem(tmp_path / "other-ca.pem", _cert("other CA", other_key, None, other_key, ca=True))
    pub, ob = _publisher(tls_broker, tmp_path, case, "wrong" if case == "wrong-password" else "s3cret", ca)
    pub.start()
    ob.put(AlertEnvelope("lobby", 1, 1.0, b"alert"))
    deadline = time.monotonic() + 10
    while pub.counters["connect_failures"] < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pub.counters["connect_failures"] >= 2  # refused, and retried
    assert not pub.connected and ob.depth() == 1
    pub.stop(flush_timeout_s=0.5)
    assert ob.depth() == 1  # still there for the next start
    ob.close()
