"""The README's provisioning walkthrough, command by command, as a user runs it (real processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.host.client import EnclaveClient
from enclave_bridge.shared.attest import PlatformKey, Verifier, load_platform_pub
from enclave_bridge.shared.keys import PartyKey, load_data_key, load_model_key, raw_private_bytes
from enclave_bridge.shared.windows import seal_window
from tests.enclave_bridge.test_enclave_service_support import (
    assert_no_secrets,
    copy_enclave_code,
    window,
    write_small_model,
)


class Shell:
    """Runs `veilcam …` like a user would (python -m pipeline), with the copied enclave code."""

    def __init__(self, root: Path, code: Path) -> None:
        self.root, self.env = root, dict(os.environ, PYTHONPATH=str(code), VEILCAM_PASSPHRASE="")
        self.outputs: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.outputs += [p.stdout, p.stderr]
        assert (p.returncode == 0) == ok, f"veilcam {' '.join(args)} → {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    def spawn(self, log: str, *args: str, sock: str) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            cwd=self.root,
            env=self.env,
            stdout=(self.root / log).open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 90
        while not (self.root / sock).exists():
            assert proc.poll() is None, (self.root / log).read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            p.wait(timeout=10)


@pytest.fixture
def shell():
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"vcli-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    root.mkdir()
    sh = Shell(root, copy_enclave_code(root / "code"))
    try:
        yield sh
    finally:
        sh.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_readme_walkthrough(shell):
    sh, root = shell, shell.root
    write_small_model(root)
    # 1. platform (enclave host operator) and the parties' keys
    sh.run("platform", "init", "--dir", "platform")
    for role, name in (("data-owner", "city"), ("model-owner", "vendor"), ("consumer", "control-room")):
        sh.run("keygen", "--role", role, "--out", f"keys/{name}")
    assert oct((root / "keys/city.key").stat().st_mode & 0o777) == "0o600"
    assert oct((root / "keys/city.data.key").stat().st_mode & 0o777) == "0o600"
    # 2. model owner packages the model
    sh.run(
        "model",
        "package",
        "--checkpoint",
        "model.pt",
        "--labels",
        "labels.txt",
        "--meta",
        "model.json",
        "--model-key",
        "keys/vendor.model.key",
        "--out",
        "model.vcpkg",
    )
    # 3. enclave configs from the owners' public keys (both owners review them; they are measured)
    sh.run(
        "enclave-config", "--role", "key", "--data-owner-pub", "keys/city.pub", "--out", "key-enclave.yaml"
    )
    sh.run(
        "enclave-config",
        "--role",
        "eval",
        "--data-owner-pub",
        "keys/city.pub",
        "--model-owner-pub",
        "keys/vendor.pub",
        "--key-enclave",
        f"unix:{root}/key.sock",
        "--out",
        "enclave.yaml",
    )
    meas = sh.run("measure", "--config", "enclave.yaml").stdout.strip()
    assert len(meas) == 64
    # 4. key enclave + data key
    sh.spawn(
        "key-enclave.log",
        "key-enclave",
        "--listen",
        f"unix:{root}/key.sock",
        "--state-dir",
        "state/key",
        "--config",
        "key-enclave.yaml",
        "--platform-key",
        "platform/platform.key",
        sock="key.sock",
    )
    sh.run(
        "provision",
        "data-key",
        "--key-enclave",
        f"unix:{root}/key.sock",
        "--data-key",
        "keys/city.data.key",
        "--owner-key",
        "keys/city.key",
        "--platform-pub",
        "platform/platform.pub",
        "--allow-config",
        "key-enclave.yaml",
        "--allow-eval-config",
        "enclave.yaml",
    )
    # 5. evaluation enclave + model + policy
    sh.spawn(
        "enclave.log",
        "enclave",
        "--listen",
        f"unix:{root}/enclave.sock",
        "--state-dir",
        "state/eval",
        "--config",
        "enclave.yaml",
        "--platform-key",
        "platform/platform.key",
        sock="enclave.sock",
    )
    wrong = sh.run(
        "provision",
        "model",
        "--enclave",
        f"unix:{root}/enclave.sock",
        "--package",
        "model.vcpkg",
        "--model-key",
        "keys/vendor.model.key",
        "--owner-key",
        "keys/vendor.key",
        "--platform-pub",
        "platform/platform.pub",
        "--measurement",
        "0" * 64,
        ok=False,
    )
    assert "not in the allow-list" in wrong.stderr
    sh.run(
        "provision",
        "model",
        "--enclave",
        f"unix:{root}/enclave.sock",
        "--package",
        "model.vcpkg",
        "--model-key",
        "keys/vendor.model.key",
        "--owner-key",
        "keys/vendor.key",
        "--platform-pub",
        "platform/platform.pub",
        "--allow-config",
        "enclave.yaml",
    )
    sh.run(
        "policy", "create", "--recipient", "keys/control-room.pub=label,score,t0,t1", "--out", "policy.json"
    )
    sh.run("policy", "sign", "--policy", "policy.json", "--key", "keys/city.key")
    sh.run("policy", "sign", "--policy", "policy.json", "--key", "keys/vendor.key")
    sh.run("provision", "policy", "--enclave", f"unix:{root}/enclave.sock", "--policy", "policy.json")
    # 6. attest
    out = sh.run(
        "attest",
        "--enclave",
        f"unix:{root}/enclave.sock",
        "--platform-pub",
        "platform/platform.pub",
        "--measurement",
        meas,
        "--evidence-out",
        "evidence.msgpack",
    )
    report = json.loads(out.stdout)
    assert report["verified"] is True and report["measurement"] == meas
    bad = sh.run(
        "attest",
        "--enclave",
        f"unix:{root}/enclave.sock",
        "--platform-pub",
        "platform/platform.pub",
        "--measurement",
        "1" * 64,
        ok=False,
    )
    assert json.loads(bad.stdout)["verified"] is False and "FAILED" in bad.stderr
    # 7. the daemon's view: windows in, alerts out, readable by the consumer
    ev = msgpack.unpackb((root / "evidence.msgpack").read_bytes())
    enclave = Verifier(load_platform_pub(root / "platform/platform.pub"), [meas], role="eval").verify(
        ev, None
    )
    dk = load_data_key(root / "keys/city.data.key")
    with EnclaveClient(f"unix:{root}/enclave.sock") as c:
        c.hello("cam1", {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0})
        r = c.submit(seal_window(dk, "cam1", 1, 0.0, 1.6, window(5), (2,)))
    assert r.status == "ok" and len(r.alerts) == 1
    alert = AlertOpener(PartyKey.load(root / "keys/control-room.key"), enclave.sign_pub).open(r.alerts[0])
    assert set(alert) == {"device", "seq", "ts", "label", "score", "t0", "t1"}

    secrets = [dk.export_secret(), load_model_key(root / "keys/vendor.model.key").export_secret()]
    for name in ("city", "vendor", "control-room"):
        pk = PartyKey.load(root / f"keys/{name}.key")
        secrets += [raw_private_bytes(pk._sign), raw_private_bytes(pk._kx)]
    plat = PlatformKey.load(root / "platform/platform.key")
    secrets += [raw_private_bytes(plat._sign), plat._secret]
    logs = [(root / f).read_text() for f in ("key-enclave.log", "enclave.log")]
    assert_no_secrets(logs + sh.outputs, secrets)
