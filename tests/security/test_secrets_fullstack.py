"""Secrets never leave their boundary: a full replay with DEBUG logging everywhere.

camera daemon (in-process, real pose child, real windowing) → real key enclave + evaluation
enclave processes (`paper` mode) → GPU worker process behind a recording TCP proxy → durable
outbox → real Mosquitto, with a raw subscriber on `#`. Afterwards every log line, every byte the
GPU worker received, every byte the broker delivered, and every file written outside sealed
storage is scanned for: key material (raw/hex/base64 of the data key, model key, every private
key, the platform secret), plaintext skeleton values (float32/float64 byte runs and printed
values of the windows actually sealed), model weights, and the plaintext alert labels.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import time
from pathlib import Path

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import torch

from config.broker import BrokerConfig
from config.schema import REPO_ROOT, EnclaveConfig, RulesConfig, SupervisorConfig
from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.host.packaging import package_model
from enclave_bridge.shared.attest import new_nonce
from enclave_bridge.shared.ring import P
from enclave_bridge.shared.wire import unpack_tensor
from pipeline.app.daemon import build_daemon
from pipeline.app.replay import replay_config
from tests.enclave_bridge.test_enclave_service_support import make_deployment
from tests.security.test_security_support import (
    GpuWorker,
    TcpProxy,
    files_outside,
    find_secrets,
    provisioned,
    short_root,
)

VTEST = REPO_ROOT / "samples" / "vtest.avi"
LABELS = ["qzxfalling", "qzxfighting", "qzxwaving", "qzxwalking"]  # distinctive: easy to find if leaked


def skeleton_needles(windows: list[np.ndarray], per_window: int = 40) -> dict[str, bytes]:
    """Byte runs that appear only if a window's values leak: 4 consecutive non-zero float32
    values, the same as float64, and printed values (as a log line would show them)."""
    out: dict[str, bytes] = {}
    for w_i, w in enumerate(windows):
        flat = np.ascontiguousarray(w, dtype=np.float32).ravel()
        idx = [i for i in range(0, flat.size - 4, 4) if np.all(np.abs(flat[i : i + 4]) > 1e-3)]
        for i in idx[:: max(1, len(idx) // per_window)][:per_window]:
            out[f"window{w_i}[{i}] f32"] = flat[i : i + 4].tobytes()
            out[f"window{w_i}[{i}] f64"] = flat[i : i + 2].astype(np.float64).tobytes()
            text = repr(float(flat[i]))
            if len(text) >= 9:
                out[f"window{w_i}[{i}] text"] = text.encode()
    return out


def weight_needles(ckpt: Path, n: int = 30) -> dict[str, bytes]:
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    out = {}
    for name in ("st_gcn_networks.3.gcn.conv.weight", "st_gcn_networks.9.tcn.3.weight", "fcn.weight"):
        flat = sd[name].numpy().astype(np.float32).ravel()
        for i in range(0, min(flat.size - 4, 4 * n), 4):
            out[f"{name}[{i}] f32"] = flat[i : i + 4].tobytes()
    return out


def frames(stream: bytes) -> list[object]:
    """Decode a recorded stream of length-prefixed msgpack frames.

    A frame whose map announces `raw: [{dtype, shape}, ...]` is followed by that many raw tensor
    segments (8-byte length, C-order bytes); they are decoded into the frame as `_raw`."""
    out, i = [], 0
    while i + 4 <= len(stream):
        (n,) = struct.unpack(">I", stream[i : i + 4])
        if i + 4 + n > len(stream):
            break
        frame = msgpack.unpackb(stream[i + 4 : i + 4 + n], raw=False)
        i += 4 + n
        if isinstance(frame, dict) and isinstance(frame.get("raw"), list):
            segs = []
            for desc in frame["raw"]:
                (k,) = struct.unpack(">Q", stream[i : i + 8])
                data = stream[i + 8 : i + 8 + k]
                segs.append(np.frombuffer(data, dtype=desc["dtype"]).reshape(desc["shape"]))
                i += 8 + k
            frame["_raw"] = segs
        out.append(frame)
    return out


def near_zero_fraction(a: np.ndarray, radius: int = 1 << 20) -> float:
    """Share of ring elements within `radius` of 0 (mod P). Fixed-point plaintext (small signed
    integers) is almost all there; uniform masked values almost never (2·radius/P ≈ 0.1 %)."""
    v = a.astype(np.int64) % P
    return float(np.mean((v < radius) | (v > P - radius)))


@pytest.mark.broker
def test_full_replay_leaks_nothing(mosquitto, monkeypatch: pytest.MonkeyPatch) -> None:
    dep = make_deployment(short_root("sec"))
    # the model owner's package with distinctive labels
    (dep.root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    meta = json.loads((dep.root / "model.json").read_text())
    package_model(dep.root / "model.pt", dep.root / "labels.txt", meta, dep.mk, dep.package)
    worker = GpuWorker(dep.root / "worker.log")
    proxy = TcpProxy(worker.addr)
    daemon_log = dep.root / "daemon.log"
    handler = logging.FileHandler(daemon_log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    broker_seen: list[tuple[str, bytes]] = []
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw-all")
    raw.on_message = lambda _c, _u, m: broker_seen.append((m.topic, bytes(m.payload)))
    raw.on_connect = lambda c, *_a: c.subscribe("#", qos=1)
    sealed: list[np.ndarray] = []
    import stages.windowing as windowing

    real_seal = windowing.seal_window

    def spy_seal(key, device, seq, t0, t1, data, track_ids=()):  # records what the camera sealed
        sealed.append(np.array(data, copy=True))
        return real_seal(key, device, seq, t0, t1, data, track_ids)

    monkeypatch.setattr(windowing, "seal_window", spy_seal)
    try:
        provisioned(dep, {"mode": "paper", "worker": proxy.addr})
        with dep.client() as c:
            ev = c.evidence(nonce := new_nonce())
        opener = AlertOpener(dep.c1, dep.verifier("eval").verify(ev, nonce).sign_pub)
        raw.connect(mosquitto.host, mosquitto.port)
        raw.loop_start()
        state = dep.root / "daemon-state"
        cfg = replay_config(
            VTEST, state_dir=state, overrides={"max_frames": 12, "length_frames": 8, "stride_frames": 4}
        )
        cfg = cfg.model_copy(
            update={
                "enclave": EnclaveConfig(address=dep.ev_addr, timeout_s=120),
                "rules": RulesConfig(labels=["*"], min_score=0.0, debounce_s=0.0),
                "broker": BrokerConfig(host=mosquitto.host, port=mosquitto.port),
                "supervisor": SupervisorConfig(stats_interval_s=0.5),
                "data_key_path": dep.root / "camera" / "data.key",
            }
        )
        dep.dk.save(cfg.data_key_path)
        daemon = build_daemon(cfg)  # what `veilcam run` builds: outbox + MQTT publisher
        daemon.start()
        assert daemon.run_until_done(tick_s=0.2) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(t.endswith("/alerts") for t, _ in broker_seen) < 2:
            time.sleep(0.1)
        raw.loop_stop()
        raw.disconnect()
        mosquitto.stop()  # flushes the broker's own log, scanned below
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
        proxy.close()
        worker.stop()
        dep.stop_all()
    try:
        # the run did what it should: 3 windows sealed, evaluated via the worker, alerts on the broker
        assert len(sealed) == 2
        alerts = [p for t, p in broker_seen if t.endswith("/alerts")]
        assert len(alerts) == 2
        opened = [opener.open(p) for p in alerts]
        assert all(a["label"] in LABELS for a in opened)
        to_worker = frames(bytes(proxy.to_upstream))
        computes = [f for f in to_worker if isinstance(f, dict) and f.get("op") == "compute"]
        loads = [f for f in to_worker if isinstance(f, dict) and f.get("op") == "load"]
        assert computes and loads
        # what the worker saw is uniformly masked: inputs and weights alike (protocol v2: terms
        # carry inline int64 tensors over TCP, a load carries each op's weight slots)
        n_inputs = n_weights = 0
        for f in computes:
            for term in f["terms"]:
                assert "shm" not in term  # a TCP worker gets inline tensors, nothing else
                # inline in the frame, or a raw segment after it (workers that negotiated raw frames)
                x = f["_raw"][term["raw"]] if "raw" in term else unpack_tensor(term["input"])
                assert x.dtype == np.int64 and x.min() >= 0 and x.max() < P
                assert near_zero_fraction(x) < 0.02, "unmasked input reached the GPU worker"
                n_inputs += 1
        for f in loads:
            for op in f["ops"]:
                for v in op["slots"]:
                    w = unpack_tensor(v)
                    assert w.dtype == np.int64
                    if w.size >= 64:
                        assert near_zero_fraction(w) < 0.02, "unmasked weights reached the GPU worker"
                        n_weights += 1
        assert n_inputs >= len(computes) and n_weights > 10

        sources: dict[str, bytes] = {
            "daemon log": daemon_log.read_bytes(),
            "enclave log": (dep.root / "eval.log").read_bytes(),
            "key enclave log": (dep.root / "key.log").read_bytes(),
            "gpu worker log": (dep.root / "worker.log").read_bytes(),
            "broker log": mosquitto.log.read_bytes(),  # what the broker itself logged
            "gpu worker received": bytes(proxy.to_upstream),
            "gpu worker replied": bytes(proxy.to_client),
            "broker delivered": b"\n".join(t.encode() + b" " + p for t, p in broker_seen),
        }
        for d in ("eval-state", "key-state", "daemon-state"):
            written = files_outside(dep.root / d, [dep.root / d / "sealed"])
            sources.update({f"{d}/{k}": v for k, v in written.items()})
        assert any(k.startswith("daemon-state/outbox") for k in sources)
        secrets = {f"secret#{i}": s for i, s in enumerate(dep.secrets())}
        needles = {**skeleton_needles(sealed), **weight_needles(dep.root / "model.pt")}
        needles.update({f"label {lab}": lab.encode() for lab in LABELS})
        # positive control: the scanner does find each kind of needle when it is there
        control = {
            "control": sealed[0].tobytes()
            + f"{float(sealed[0].ravel()[np.flatnonzero(np.abs(sealed[0].ravel()) > 1e-3)[0]])!r}".encode()
            + LABELS[1].encode()
            + dep.dk.export_secret().hex().encode()
        }
        found = find_secrets(control, secrets, needles)
        assert any("f32" in h for h in found) and any("label" in h for h in found)
        assert any("secret#0" in h for h in found)
        hits = find_secrets(sources, secrets, needles)
        assert hits == [], f"leaked: {hits[:20]}"
        print(
            "scanned",
            {k: len(v) for k, v in sources.items()},
            f"{len(secrets)} secrets, {len(needles)} needles",
        )
    finally:
        shutil.rmtree(dep.root, ignore_errors=True)
