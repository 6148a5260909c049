"""Test harness (no tests here): a throw-away deployment with real enclave processes.

The `enclave_bridge` package is copied into the test's directory and the enclave processes import
it from there (PYTHONPATH), so the measurement is stable while the working tree changes, and a test
can modify "enclave code" without touching the repository.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from enclave_bridge.host.client import EnclaveClient
from enclave_bridge.host.packaging import package_model
from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.attest import PlatformKey, Verifier
from enclave_bridge.shared.errors import TransportError
from enclave_bridge.shared.keys import (
    DataKey,
    ModelKey,
    PartyKey,
    b64e,
    generate_data_key,
    generate_model_key,
)
from enclave_bridge.shared.measurement import PACKAGE_ROOT, compute_measurement
from enclave_bridge.shared.policy import create_policy, sign_policy

LABELS = ["walk", "fall", "fight", "wave"]


def copy_enclave_code(dest: Path) -> Path:
    """Copy the enclave package to `dest/enclave_bridge`; returns `dest` (a PYTHONPATH entry)."""
    shutil.copytree(
        PACKAGE_ROOT, dest / "enclave_bridge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return dest


def write_small_model(d: Path) -> tuple[Path, Path, Path]:
    """A freshly initialised ST-GCN checkpoint + label map + metadata."""
    torch.manual_seed(0)
    model = STGCN(len(LABELS))
    ckpt, labels, meta = d / "model.pt", d / "labels.txt", d / "model.json"
    torch.save(model.state_dict(), ckpt)
    labels.write_text("\n".join(LABELS) + "\n")
    meta.write_text(
        json.dumps(
            {
                "num_class": len(LABELS),
                "layout": "openpose",
                "strategy": "spatial",
                "T": 16,
                "stride": 8,
                "fps": 10,
            }
        )
    )
    return ckpt, labels, meta


def window(seed: int = 0, t: int = 16, m: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((3, t, 18, m)) * 0.3).astype(np.float32)


@dataclass
class Deployment:
    root: Path
    code: Path
    platform: PlatformKey
    do: PartyKey
    mo: PartyKey
    c1: PartyKey
    c2: PartyKey
    dk: DataKey
    mk: ModelKey
    package: Path
    key_cfg: dict[str, Any]
    eval_cfg: dict[str, Any]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    extra_secrets: list[bytes] = field(default_factory=list)

    @property
    def platform_pub(self) -> bytes:
        return self.platform.public

    @property
    def ke_addr(self) -> str:
        return f"unix:{self.root / 'ke.sock'}"

    @property
    def ev_addr(self) -> str:
        return f"unix:{self.root / 'ev.sock'}"

    def cfg_path(self, role: str) -> Path:
        return self.root / f"{role}.yaml"

    def measurement(self, role: str, code: Path | None = None) -> str:
        cfg = self.key_cfg if role == "key" else self.eval_cfg
        return compute_measurement(cfg, (code or self.code) / "enclave_bridge")

    def verifier(self, role: str, allowed: list[str] | None = None) -> Verifier:
        return Verifier(
            self.platform_pub, allowed if allowed is not None else [self.measurement(role)], role=role
        )

    def start(
        self, role: str, code: Path | None = None, state: str | None = None, extra: list[str] | None = None
    ) -> subprocess.Popen[bytes]:
        name = "key-enclave" if role == "key" else "enclave"
        addr = self.ke_addr if role == "key" else self.ev_addr
        log = (self.root / f"{role}.log").open("ab")
        cmd = [
            sys.executable,
            "-m",
            "pipeline",
            "--log-level",
            "DEBUG",
            name,
            "--listen",
            addr,
            "--state-dir",
            str(self.root / (state or f"{role}-state")),
            "--config",
            str(self.cfg_path(role)),
            "--platform-key",
            str(self.root / "platform" / "platform.key"),
            *(extra or []),
        ]
        env = dict(os.environ, PYTHONPATH=str(code or self.code))
        proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[role] = proc
        self._wait_ready(addr, proc, role)
        return proc

    def _wait_ready(self, addr: str, proc: subprocess.Popen[bytes], role: str) -> None:
        from enclave_bridge.host.client import _Rpc

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{role} enclave exited: {self.log(role)[-3000:]}")
            rpc = _Rpc(addr, 5.0)
            try:
                rpc.call("status")
                return
            except TransportError:
                time.sleep(0.1)
            finally:
                rpc.close()
        raise RuntimeError(f"{role} enclave not ready: {self.log(role)[-3000:]}")

    def stop(self, role: str) -> None:
        proc = self.procs.pop(role, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for role in list(self.procs):
            self.stop(role)

    def log(self, role: str) -> str:
        p = self.root / f"{role}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def client(self) -> EnclaveClient:
        return EnclaveClient(self.ev_addr, timeout_s=120)

    def signed_policy(self, version: int = 1, rules: dict[str, Any] | None = None) -> dict[str, Any]:
        doc = create_policy(
            [
                (self.c1.public, ["window_seq", "t0", "t1", "track_id", "label", "score", "topk"]),
                (self.c2.public, ["label", "t1"]),
            ],
            version=version,
            rules=rules,
        )
        return sign_policy(sign_policy(doc, self.do), self.mo)

    def secrets(self) -> list[bytes]:
        """Every secret byte string that must never show up in a log."""
        from enclave_bridge.shared.keys import raw_private_bytes

        out = [self.dk.export_secret(), self.mk.export_secret(), *self.extra_secrets]
        for pk in (self.do, self.mo, self.c1, self.c2):
            out += [raw_private_bytes(pk._sign), raw_private_bytes(pk._kx)]
        out += [raw_private_bytes(self.platform._sign), self.platform._secret]
        return out


def assert_no_secrets(texts: list[str], secrets: list[bytes]) -> None:
    """No secret appears as hex (any case) or base64 (standard or urlsafe) in any of `texts`."""
    blob = "\n".join(texts)
    low = blob.lower()
    for s in secrets:
        assert s.hex() not in low, "secret found (hex) in logs"
        for enc in (base64.b64encode(s).decode(), base64.urlsafe_b64encode(s).decode()):
            assert enc.rstrip("=")[:40] not in blob, "secret found (base64) in logs"


def make_deployment(root: Path) -> Deployment:
    root.mkdir(parents=True, exist_ok=True)
    code = copy_enclave_code(root / "code")
    plat = PlatformKey.generate()
    plat.save(root / "platform")
    do, mo = PartyKey.generate("data-owner", "city"), PartyKey.generate("model-owner", "vendor")
    c1, c2 = PartyKey.generate("consumer", "control-room"), PartyKey.generate("consumer", "statistics")
    dk, mk = generate_data_key("dk-1"), generate_model_key("mk-1")
    ckpt, labels, meta = write_small_model(root)
    package = package_model(ckpt, labels, json.loads(meta.read_text()), mk, root / "model.vcpkg")
    key_cfg = {"role": "key", "backend": "simulated", "data_owner_pub": b64e(do.public.sign_pub)}
    eval_cfg = {
        "role": "eval",
        "backend": "simulated",
        "data_owner_pub": b64e(do.public.sign_pub),
        "model_owner_pub": b64e(mo.public.sign_pub),
        "key_enclave": {"address": f"unix:{root / 'ke.sock'}", "measurements": []},
        "evaluator": {"mode": "enclave", "worker": None},
        "topk": 3,
    }
    dep = Deployment(root, code, plat, do, mo, c1, c2, dk, mk, package, key_cfg, eval_cfg)
    eval_cfg["key_enclave"]["measurements"] = [dep.measurement("key")]
    dep.cfg_path("key").write_text(yaml.safe_dump(key_cfg))
    dep.cfg_path("eval").write_text(yaml.safe_dump(eval_cfg))
    return dep


@pytest.fixture
def deployment(tmp_path: Path):
    # short root: Unix socket paths are limited to ~107 bytes
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"vc-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    dep = make_deployment(root)
    try:
        yield dep
    finally:
        dep.stop_all()
        shutil.rmtree(root, ignore_errors=True)
