"""An enclave pool of two real `veilcam enclave` processes (simulated backend, provisioned like a
deployment: data key via the key enclave, model package, signed policy): devices are spread over
both, and when one enclave is killed mid-run its devices fail over — no window is lost, every
alert opens with the consumer key and the verified key of the enclave that signed it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from config.broker import BrokerConfig
from config.schema import EnclaveConfig
from enclave_bridge.host.client import provision_data_key, provision_model
from enclave_bridge.shared.attest import new_nonce
from enclave_bridge.shared.windows import seal_window
from pipeline.app.batch import BatchOptions, BatchRun
from pipeline.app.batch_report import read_report
from pipeline.app.subscriber import AlertSubscriber, PoolOpener
from pipeline.errors import IntegrityError
from stages.enclave_pool import EnclavePool
from tests.app.batch_helpers import EXERCISE, VTEST, base_config
from tests.enclave_bridge.test_enclave_service_support import deployment  # noqa: F401

RULES = {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0}


def _start_eval(dep, name: str) -> tuple[str, subprocess.Popen[bytes]]:
    """One more evaluation enclave of the same deployment (same code and config: same measurement)."""
    from enclave_bridge.host.client import EnclaveClient
    from enclave_bridge.shared.errors import TransportError

    addr = f"unix:{dep.root / (name + '.sock')}"
    cmd = [
        sys.executable, "-m", "pipeline", "--log-level", "DEBUG", "enclave",
        "--listen", addr,
        "--state-dir", str(dep.root / f"{name}-state"),
        "--config", str(dep.cfg_path("eval")),
        "--platform-key", str(dep.root / "platform" / "platform.key"),
    ]  # fmt: skip
    log = (dep.root / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        cmd,
        cwd=dep.root,
        env=dict(os.environ, PYTHONPATH=str(dep.code)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError((dep.root / f"{name}.log").read_text()[-3000:])
        try:
            with EnclaveClient(addr, timeout_s=5) as c:
                c.stats()
            break
        except TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return addr, proc


def _pool_of_two(dep) -> tuple[list[str], list[subprocess.Popen[bytes]], list[bytes]]:
    """Key enclave + two provisioned evaluation enclaves; their addresses, processes, verified keys."""
    from enclave_bridge.host.client import EnclaveClient

    dep.start("key")
    provision_data_key(dep.ke_addr, dep.dk, dep.do, dep.verifier("key"), [dep.measurement("eval")])
    addrs, procs, keys = [], [], []
    for name in ("ev-a", "ev-b"):  # "provision N enclaves in one go": the same steps per address
        addr, proc = _start_eval(dep, name)
        provision_model(addr, dep.package.read_bytes(), dep.mk, dep.mo, dep.verifier("eval"))
        with EnclaveClient(addr, timeout_s=60) as c:
            c.set_policy(dep.signed_policy())
            nonce = new_nonce()
            keys.append(dep.verifier("eval").verify(c.evidence(nonce), nonce).sign_pub)
        addrs.append(addr)
        procs.append(proc)
    return addrs, procs, keys


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def test_pool_spreads_devices_and_fails_over_without_losing_a_window(deployment) -> None:  # noqa: F811
    dep = deployment
    addrs, procs, keys = _pool_of_two(dep)
    pool = EnclavePool(addrs, timeout_s=30, backoff_s=0.5)
    try:
        for dev in ("cam-a", "cam-b"):
            pool.hello(dev, RULES)
        assert sorted(pool.assignment.values()) == sorted(addrs)  # one device per enclave
        rng = np.random.default_rng(1)
        sent: dict[str, list[int]] = {"cam-a": [], "cam-b": []}
        answered: dict[str, list[int]] = {"cam-a": [], "cam-b": []}
        envelopes: list[bytes] = []
        victim = pool.assignment["cam-a"]
        for i in range(8):
            if i == 3:  # kill cam-a's enclave between windows: its next window fails in transit
                _kill(procs[addrs.index(victim)])
            for dev in ("cam-a", "cam-b"):
                seq = 1000 + i
                data = (rng.standard_normal((3, 16, 18, 1)) * 0.3).astype(np.float32)
                blob = seal_window(dep.dk, dev, seq, i * 0.8, i * 0.8 + 1.6, data, [1])
                sent[dev].append(seq)
                r = pool.submit(blob)
                assert r.status == "ok", r.reason
                answered[dev].append(r.window_seq)
                envelopes.extend(r.alerts)
        assert answered == sent  # no window lost, none rejected
        assert pool.assignment["cam-a"] != victim and pool.failovers == 1
        assert pool.assignment["cam-b"] != victim  # the survivor serves both now
        st = pool.stats()
        assert st["enclaves"][victim]["healthy"] is False
        # every alert opens with the consumer key and the verified key of the enclave that signed it
        openers = PoolOpener(dep.c1, keys)
        opened = [openers.open(e) for e in envelopes]
        # a consumer's duplicate filter: cam-a's alert numbers restarted at the new enclave, yet
        # every alert is delivered once (seq is scoped by device and signing enclave)
        sub = AlertSubscriber(BrokerConfig(), PoolOpener(dep.c1, keys), lambda _a: None)
        delivered = [
            sub.handle(f"veilcam/{a['device']}/alerts", e) for a, e in zip(opened, envelopes, strict=True)
        ]
        assert all(d is not None for d in delivered) and sub.stats.rejected_replayed == 0
        assert all(
            sub.handle(f"veilcam/{a['device']}/alerts", e) is None
            for a, e in zip(opened, envelopes, strict=True)
        )
        with pytest.raises(IntegrityError, match="not one of the pool"):
            PoolOpener(dep.c1, keys[:1] if victim == addrs[1] else keys[1:]).open(
                next(e for e, a in zip(envelopes, opened, strict=True) if a["device"] == "cam-a")
            )
        assert sorted((a["device"], a["window_seq"]) for a in opened) == sorted(
            (d, s) for d, seqs in sent.items() for s in seqs
        )
    finally:
        pool.close()
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)


@pytest.mark.slow
def test_batch_over_a_pool_of_two_with_one_killed_mid_run(deployment, tmp_path: Path) -> None:  # noqa: F811
    dep = deployment
    addrs, procs, keys = _pool_of_two(dep)
    over = {"max_frames": 40, "length_frames": 8, "stride_frames": 4}
    base = base_config(tmp_path, enclave=EnclaveConfig(addresses=addrs, timeout_s=60, retry_backoff_s=0.5))
    dep.dk.save(base.data_key_path)  # the provisioned data key seals the windows
    clips = [str(VTEST.resolve()), str(EXERCISE.resolve())]
    opts = BatchOptions(
        out=tmp_path / "pool.jsonl", progress=False, consumer_key=dep.c1, enclave_verify_keys=keys
    )
    run = BatchRun(clips, base, opts, overrides=over)
    result: dict[str, object] = {}
    t = threading.Thread(target=lambda: result.setdefault("summary", run.run()))
    t.start()
    killed = None
    deadline = time.monotonic() + 300
    try:
        while t.is_alive() and time.monotonic() < deadline:
            link = run.link
            if isinstance(link, EnclavePool) and any(m.windows for m in link.members):
                busy = next(m for m in link.members if m.windows)
                killed = busy.address
                _kill(procs[addrs.index(killed)])
                break
            time.sleep(0.05)
        t.join(600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
    assert killed is not None
    s = result["summary"]
    assert s.clips_failed == 0, s.failures
    alerts, _ = read_report(tmp_path / "pool.jsonl")
    # windows end at frames 7, 11, …, 39 of each clip (10 fps): 9 per clip, every one alerts
    expected = sorted((c, round((f - 7) / 10, 4), round(f / 10, 4)) for c in clips for f in range(7, 40, 4))
    got = sorted((a["clip"], round(a["t0"], 4), round(a["t1"], 4)) for a in alerts)
    assert got == expected
    assert all(a["label"] is not None for a in alerts)  # opened: signed by a verified pool enclave
    assert s.windows == 18 and s.alerts == 18
